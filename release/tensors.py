"""One way to read tensors: lazily, one at a time, safely.

Every reader yields ``TensorRef`` objects (name, dtype, shape, file) without touching tensor data,
and ``open(ref)`` maps just that tensor. Data are memory-mapped; when a tensor is done its pages
are dropped from this process (``madvise(MADV_DONTNEED)``), so resident memory is bounded by the
tensor in hand, not by the file: a 10 GB shard never becomes 10 GB of RSS.

Pickle checkpoints are opened with ``torch.load(weights_only=True)``, which refuses any object
that is not a tensor or plain container: code in a checkpoint is never executed.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from release import dtypes
from release.errors import BadInputError
from release.safetensors_header import parse_safetensors_header

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


LIBC = _libc()


def drop_pages(address: int, length: int) -> None:
    """Drop a read-only private mapping's pages from RSS; they re-fault from the file if touched.

    Only used on ranges of file-backed MAP_PRIVATE mappings that we never write, so no data is lost.
    """
    if LIBC is None or length <= 0:
        return
    start = address - address % _PAGE
    end = address + length
    LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


@dataclass(frozen=True)
class TensorRef:
    """What is known about a tensor before reading it."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.itemsize(self.dtype)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (for hashing and writing)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def has_nonfinite(t: torch.Tensor) -> bool:
    """True if a float tensor holds NaN or Inf. aminmax propagates both and runs ~25 GB/s
    (``isfinite().all()`` runs 0.5 GB/s on bf16 here)."""
    if t.numel() == 0 or not t.is_floating_point():
        return False
    try:
        lo, hi = torch.aminmax(t)
        return not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)))
    except RuntimeError:  # dtypes without aminmax kernels (float8)
        return not bool(torch.isfinite(t.float()).all())


class TensorFile:
    """A file of tensors. Subclasses fill ``refs`` and implement ``open``."""

    format: str = ""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.refs: dict[str, TensorRef] = {}
        self.metadata: dict[str, str] = {}

    def open(self, ref: TensorRef) -> contextlib.AbstractContextManager[torch.Tensor]:
        raise NotImplementedError

    def raw_range(self, ref: TensorRef) -> tuple[int, int] | None:
        """(file descriptor, offset) when the tensor's bytes lie verbatim in the file, else None."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFile(TensorFile):
    format = "safetensors"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:  # the library's own validation: offsets contiguous, in bounds, sizes match dtypes
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                self.metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise BadInputError(f"{path}: invalid safetensors file ({exc})") from None
        self._start, header = parse_safetensors_header(path)
        self._offsets: dict[str, tuple[int, int]] = {}
        for name in keys:
            entry = header[name]
            code = entry["dtype"]
            if code not in dtypes.SAFETENSORS_TO_TORCH:
                raise BadInputError(f"{path}: tensor {name!r} has unsupported dtype {code}")
            ref = TensorRef(name, code, tuple(entry["shape"]), self.path)
            begin, end = entry["data_offsets"]
            if end - begin != ref.nbytes:  # already checked by the library; kept as a guard
                raise BadInputError(f"{path}: tensor {name!r} size does not match its shape")
            self.refs[name] = ref
            self._offsets[name] = (self._start + begin, end - begin)
        self._fd = os.open(path, os.O_RDONLY)
        self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY) if path.stat().st_size else None
        self._base = 0
        if self._map is not None:  # the mapping's address, for madvise; the probe view is dropped at once
            probe = torch.frombuffer(self._map, dtype=torch.uint8, count=1)
            self._base = probe.data_ptr()
            del probe

    def byte_range(self, name: str) -> tuple[int, int]:
        """(file offset, length) of a tensor's data."""
        return self._offsets[name]

    def raw_range(self, ref: TensorRef) -> tuple[int, int] | None:
        return self._fd, self._offsets[ref.name][0]

    @contextlib.contextmanager
    def open(self, ref: TensorRef) -> Iterator[torch.Tensor]:
        offset, length = self._offsets[ref.name]
        if length == 0:
            yield torch.empty(ref.shape, dtype=dtypes.to_torch(ref.dtype))
            return
        assert self._map is not None
        self._map.madvise(mmap.MADV_WILLNEED, offset - offset % _PAGE, length + offset % _PAGE)
        t = torch.frombuffer(self._map, dtype=torch.uint8, count=length, offset=offset)
        try:
            yield t.view(dtypes.to_torch(ref.dtype)).reshape(ref.shape)
        finally:
            del t
            drop_pages(self._base + offset, length)

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view; GC closes it
                self._map.close()
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _flatten_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or the common wrappers ({'state_dict': ...}, {'model': ...})."""
    if not isinstance(obj, dict):
        raise BadInputError(f"{path}: not a state dict (top level is {type(obj).__name__})")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                return _flatten_state_dict(obj[key], path)
        raise BadInputError(f"{path}: no tensors found (keys: {', '.join(list(map(str, obj))[:5])})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise BadInputError(f"{path}: state dict holds non-tensor entries: {', '.join(map(str, others[:5]))}")
    return tensors


class TorchPickleFile(TensorFile):
    """``pytorch_model*.bin`` / ``.pt`` / ``.pth``: torch's zip format, memory-mapped."""

    format = "pytorch"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        is_zip = zipfile.is_zipfile(path)
        try:
            # weights_only: the unpickler only builds tensors and containers. Anything else, such
            # as a __reduce__ that calls os.system, is refused before it runs.
            with warnings.catch_warnings():  # protocol notices about legacy pickles are noise here
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling failed"
            if "weights only" not in str(exc).lower():
                raise BadInputError(f"{path}: corrupt checkpoint, not a torch pickle ({first})") from None
            raise BadInputError(
                f"{path}: refused to load: the pickle holds objects other than tensors ({first})",
                hint="only plain state dicts are accepted; code in checkpoints is never run",
            ) from None
        except Exception as exc:  # a parser fed garbage fails in many ways (IndexError, EOFError, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInputError(f"{path}: corrupt or truncated checkpoint ({first})") from None
        self._tensors = _flatten_state_dict(obj, path)
        self.mapped = is_zip  # a legacy (pre-zip) file is read whole into memory
        for name, t in self._tensors.items():
            self.refs[name] = TensorRef(name, dtypes.from_torch(t.dtype), tuple(t.shape), self.path)

    def shares_storage(self, a: str, b: str) -> bool:
        ta, tb = self._tensors[a], self._tensors[b]
        return ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr() and ta.shape == tb.shape

    @contextlib.contextmanager
    def open(self, ref: TensorRef) -> Iterator[torch.Tensor]:
        t = self._tensors[ref.name]
        storage = t.untyped_storage()
        try:
            yield t.contiguous()
        finally:
            if self.mapped:
                drop_pages(storage.data_ptr(), storage.nbytes())

    def close(self) -> None:
        self._tensors = {}


PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}


def open_tensor_file(path: Path) -> TensorFile:
    """Open one file of tensors by its content, not only its name."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in PICKLE_SUFFIXES:
        return TorchPickleFile(path)
    raise BadInputError(
        f"{path}: unknown checkpoint file type {path.suffix!r} (expected .safetensors, .bin, .pt, .pth)"
    )
