"""Importance matrices for llama.cpp's quantizer: collected here, written in llama.cpp's format.

What llama.cpp's ``llama-imatrix`` gathers, for every weight matrix of a decoder block
(``blk.*``; the output matrix is left out as ``llama-imatrix`` does by default): the sum over
calibration tokens of the squared input activation, per input column, and the number of tokens.
``llama-quantize --imatrix`` divides the two and weights each column's rounding error by the result.

Why we collect it ourselves instead of running ``llama-imatrix``: llama-cpp-python ships no imatrix
tool (only the quantizer), and ``llama-imatrix`` needs the whole model in memory in a lossless
format (14 GB at 7B in BF16, 140 GB at 70B). Here the pass is transformers' own float32 forward
(``release.forward``), one decoder layer at a time when the model does not fit: the same
bounded pass as the reference logits, with forward pre-hooks on the layers' linear modules.

The file is llama.cpp's GGUF imatrix format (``tools/imatrix/imatrix.cpp``, ``save_imatrix``):
``general.type = imatrix``, ``imatrix.datasets`` (strings), ``imatrix.chunk_count`` and
``imatrix.chunk_size`` (uint32), and per weight ``<gguf name>.in_sum2`` (F32, [1, columns]) and
``<gguf name>.counts`` (F32, [1, 1]), sorted by name. It is named ``NAME.imatrix`` (llama.cpp reads it
by content) so that nothing that lists ``*.gguf`` model files mistakes it for a variant.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from release.atomic import atomic_file, check_file_target
from release.errors import BadInputError, CheckFailedError
from release.progress import NULL, Reporter

SUFFIX = ".imatrix"
# llama.cpp's default context for llama-imatrix (-c 512): one chunk per calibration window.
DEFAULT_CHUNK = 512
# Keys llama-quantize records in a file quantized with an imatrix (tools/quantize/quantize.cpp).
KV_FILE = "quantize.imatrix.file"
KV_DATASET = "quantize.imatrix.dataset"
KV_ENTRIES = "quantize.imatrix.entries_count"
KV_CHUNKS = "quantize.imatrix.chunks_count"


@dataclass
class IMatrix:
    sums: dict[str, np.ndarray]  # GGUF weight name -> sum of squared inputs per column (float32)
    counts: dict[str, int]  # GGUF weight name -> tokens seen
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    info: dict[str, Any] = field(default_factory=dict)  # how it was collected (not in the file)

    def values(self, name: str) -> np.ndarray:
        """What llama-quantize hands the quantizer: the mean square per column."""
        count = self.counts[name]
        if count <= 0:
            return np.ones_like(self.sums[name], dtype=np.float32)
        return (self.sums[name] / np.float32(count)).astype(np.float32)


class _Writer(gguf.GGUFWriter):
    """An imatrix file has no architecture key (llama.cpp's own writer sets none)."""

    def add_architecture(self) -> None:
        pass


def write(path: Path, im: IMatrix, *, force: bool = False) -> Path:
    """Write ``im`` atomically (temporary file, fsync, rename) and read it back."""
    path = Path(path)
    with atomic_file(path, force=force) as tmp:
        w = _Writer(path=None, arch="")
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(gguf.Keys.IMatrix.DATASETS, im.datasets)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, im.chunk_count)
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, im.chunk_size)
        for name in sorted(im.sums):
            w.add_tensor(f"{name}.in_sum2", im.sums[name].astype(np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[im.counts[name]]], dtype=np.float32))
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    back = read(path)
    if set(back.sums) != set(im.sums) or back.counts != im.counts:
        raise CheckFailedError(f"{path.name}: imatrix differs from what was written")
    return path


def read(path: Path) -> IMatrix:
    """Read an imatrix GGUF file (ours or ``llama-imatrix``'s; dense models: one count per weight)."""
    path = Path(path)
    try:
        r = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise BadInputError(f"{path}: not an imatrix GGUF file ({exc})") from None
    field_type = r.fields.get(gguf.Keys.General.TYPE)
    if field_type is None or field_type.contents() != gguf.GGUFType.IMATRIX:
        raise BadInputError(f"{path}: not an imatrix file (general.type is not 'imatrix')")

    def scalar(key: str) -> int:
        f = r.fields.get(key)
        return int(f.contents()) if f is not None else 0

    datasets_field = r.fields.get(gguf.Keys.IMatrix.DATASETS)
    datasets = list(datasets_field.contents()) if datasets_field is not None else []
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for t in r.tensors:
        base, _, kind = t.name.rpartition(".")
        if kind == "in_sum2":
            sums[base] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif kind == "counts":
            c = np.array(t.data, dtype=np.float32).reshape(-1)
            if c.size != 1:
                raise BadInputError(f"{path}: {base} has {c.size} counts (mixture-of-experts files: unsupported)")
            counts[base] = int(c[0])
    if not sums or set(sums) != set(counts):
        raise BadInputError(f"{path}: imatrix entries are incomplete (every in_sum2 needs its counts)")
    return IMatrix(sums, counts, datasets, scalar(gguf.Keys.IMatrix.CHUNK_COUNT), scalar(gguf.Keys.IMatrix.CHUNK_SIZE))


# --- collection ----------------------------------------------------------------------------------


def collect(
    src: Path,
    *,
    calibration: Path | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    chunks: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    forward: str = "auto",
    reporter: Reporter = NULL,
    warnings: list[str] | None = None,
) -> IMatrix:
    """Sum of squared inputs per column of every decoder-block weight matrix, over the calibration
    windows (``chunks`` of ``chunk_size`` tokens; None: all the text gives), in float32."""
    import torch

    from release.calibration import build_calibration
    from release.checkpoint import open_checkpoint, plan_tensors
    from release.formats.gguf_names import tensor_name_map
    from release.forward import open_forward

    started = time.monotonic()
    src = Path(src)
    warn = warnings if warnings is not None else []
    # The source is opened once, for its architecture and for the forward pass.
    with open_checkpoint(src) as ckpt:
        plan = plan_tensors(ckpt)
        arch = plan.architecture
        names = tensor_name_map(arch)
        paths = arch.spec.get("streamed_forward")
        if not paths:
            raise BadInputError(f"architecture {arch.name} has no forward description for an imatrix")
        tokenizer = _tokenizer(src)
        cal = build_calibration(calibration, tokenizer, seq_len=chunk_size, seed=seed, samples=chunks, warn=warn)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook(gname: str) -> Any:
            def pre(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1])
                # Squares in float32 as llama.cpp does; sums accumulated in float64 (deterministic, and
                # no loss over millions of tokens), stored as float32.
                part = torch.square(x.float()).sum(0, dtype=torch.float64)
                sums[gname] = part if gname not in sums else sums[gname] + part
                counts[gname] = counts.get(gname, 0) + x.shape[0]

            return pre

        tokens = sum(len(w) for w in cal.windows)
        with open_forward(src, device, forward, chunk_size, reporter, ckpt=ckpt, plan=plan) as (model, choice):
            layers = model.model.get_submodule(paths["layers"])
            handles = []
            for rel, module in layers.named_modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                gname = names.get_name(f"{paths['layers']}.{rel}.weight", try_suffixes=(".weight",))
                if gname is None or not gname.startswith("blk."):
                    continue
                handles.append(module.register_forward_pre_hook(hook(gname)))
            if not handles:
                raise BadInputError(f"{src}: no decoder-layer weight matrix maps to a GGUF name")
            try:
                model.observe(cal.windows)
            finally:
                for h in handles:
                    h.remove()
    out = {k: v.cpu().numpy().astype(np.float32) for k, v in sums.items()}
    for k, v in out.items():
        if not np.isfinite(v).all():
            raise CheckFailedError(f"{k}: the importance matrix holds NaN/Inf (the source's activations overflow)")
    info = {
        "calibration": cal.describe() | {"seed": seed},
        "forward": choice.mode,
        "device": choice.device,
        "tokens": tokens,
        "entries": len(out),
        "seconds": round(time.monotonic() - started, 3),
    }
    return IMatrix(out, counts, [cal.name], len(cal.windows), chunk_size, info)


@dataclass
class IMatrixResult:
    output: str
    bytes: int
    datasets: list[str]
    chunks: int
    chunk_size: int
    entries: int
    tokens: int
    forward: str
    device: str
    seconds: float
    calibration: dict[str, Any]

    @property
    def seconds_per_1000_tokens(self) -> float:
        return self.seconds * 1000 / max(1, self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self), "seconds_per_1000_tokens": round(self.seconds_per_1000_tokens, 3)}


def collect_to_file(src: Path, out: Path, *, force: bool = False, **options: Any) -> IMatrixResult:
    """``collect`` then ``write``: what the ``imatrix`` command does."""
    check_file_target(Path(out).absolute(), force)  # before the slow part
    im = collect(src, **options)
    path = write(out, im, force=force)
    i = im.info
    return IMatrixResult(str(path), path.stat().st_size, im.datasets, im.chunk_count, im.chunk_size, len(im.sums),
                         i["tokens"], i["forward"], i["device"], i["seconds"], i["calibration"])  # fmt: skip


def _tokenizer(src: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{src}: no usable tokenizer for the calibration text ({exc})") from None


# --- the quantizer's side ------------------------------------------------------------------------


class QuantizerInputs:
    """The ctypes arrays ``llama_model_quantize`` reads (``params.imatrix``, ``params.kv_overrides``),
    built the way llama-quantize builds them, and kept alive while it runs."""

    def __init__(self, llama_cpp: Any, im: IMatrix, file_name: str) -> None:
        names = sorted(im.sums)
        self._keep: list[Any] = []
        entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
        for i, name in enumerate(names):
            values = np.ascontiguousarray(im.values(name), dtype=np.float32)
            cname = ctypes.c_char_p(name.encode())
            self._keep += [values, cname]
            entries[i].name = cname.value
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        # The last entry stays zeroed: the array's terminator.
        self.imatrix = entries
        kvs: list[tuple[str, int | str]] = [(KV_FILE, file_name)]
        if im.datasets:
            kvs.append((KV_DATASET, im.datasets[0]))
        kvs.append((KV_ENTRIES, len(names)))
        if im.chunk_count > 0:
            kvs.append((KV_CHUNKS, im.chunk_count))
        overrides = (llama_cpp.llama_model_kv_override * (len(kvs) + 1))()
        for o, (key, value) in zip(overrides, kvs, strict=False):
            o.key = key.encode()
            if isinstance(value, int):
                o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                o.value.val_i64 = value
            else:
                o.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                o.value.val_str = value.encode()[:127]
        self.kv_overrides = overrides

    def apply(self, params: Any) -> None:
        params.imatrix = ctypes.cast(self.imatrix, type(params.imatrix))
        params.kv_overrides = ctypes.cast(self.kv_overrides, type(params.kv_overrides))
