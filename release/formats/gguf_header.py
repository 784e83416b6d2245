"""A GGUF file's header (keys and tensor table) without its arrays' contents.

Written by hand because ``gguf.GGUFReader`` builds a numpy view per element of every array key:
for SmolLM2's 49k tokens and 48k merges that is 2.3 s of pure Python per file here (more for
Llama 3's 128k tokens), and the quantize step, the intermediate check and the tests only need the
scalar keys, a few arrays and the tensor table. Arrays are skipped (string lengths read, numbers
not) and decoded only when asked for. The layout is the GGUF spec's (v2 and v3: little-endian,
64-bit counts); the value and tensor types are the ``gguf`` package's own enums. Tested against
``gguf.GGUFReader`` on real files.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}  # fmt: skip


@dataclass(frozen=True)
class ArrayField:
    """An array key, located but not decoded."""

    item_type: GGUFValueType
    count: int
    offset: int  # of its first item in the file
    path: Path
    nbytes: int = 0  # of its items, lengths of strings included

    def raw(self) -> bytes:
        """Its items' bytes as stored: what two files' values compare by, without decoding."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.nbytes)

    def contents(self) -> list[Any]:
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if self.item_type == GGUFValueType.STRING:
                out, at = [], self.offset
                for _ in range(self.count):
                    (n,) = struct.unpack_from("<Q", m, at)
                    out.append(bytes(m[at + 8 : at + 8 + n]).decode("utf-8", errors="replace"))
                    at += 8 + n
                return out
            dtype = np.dtype(GGUFReader.gguf_scalar_to_np[self.item_type]).newbyteorder("<")
            return np.frombuffer(m, dtype, self.count, self.offset).tolist()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first), as GGUFReader gives it
    tensor_type: GGMLQuantizationType
    offset: int  # of its data in the file (absolute)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.tensor_type]
        return self.n_elements // block * size


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any]  # scalars and strings as values, arrays as ArrayField
    tensors: list[TensorInfo]
    data_offset: int
    value_types: dict[str, GGUFValueType] = field(default_factory=dict)  # each key's, as stored

    def value(self, key: str) -> Any:
        """A key's value (an array's decoded items), None when absent."""
        v = self.fields.get(key)
        return v.contents() if isinstance(v, ArrayField) else v


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.at = buf, 0

    def take(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.at + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        s = bytes(self.buf[self.at : self.at + n]).decode("utf-8", errors="replace")
        self.at += n
        return s

    def value(self, vtype: GGUFValueType, path: Path) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item, count = GGUFValueType(self.take("<I")), self.take("<Q")
            start = self.at
            if item == GGUFValueType.STRING:
                for _ in range(count):  # lengths only
                    self.at += 8 + struct.unpack_from("<Q", self.buf, self.at)[0]
            elif item == GGUFValueType.ARRAY:
                raise ValueError("nested arrays are not read here")
            else:
                self.at += count * struct.calcsize(_SCALARS[item])
            if self.at > len(self.buf):
                raise ValueError("an array runs past the end of the file")
            return ArrayField(item, count, start, path, self.at - start)
        return self.take(_SCALARS[vtype])


def read_header(path: Path) -> GGUFHeader:
    """The header of a GGUF file. ValueError for anything that is not a whole GGUF v2/v3 header."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf)
            c.at = 4
            try:
                version = c.take("<I")
                if version not in (2, 3):
                    raise ValueError(f"GGUF version {version} (2 and 3 are read)")
                n_tensors, n_kv = c.take("<Q"), c.take("<Q")
                fields: dict[str, Any] = {}
                types: dict[str, GGUFValueType] = {}
                for _ in range(n_kv):
                    key = c.string()
                    types[key] = GGUFValueType(c.take("<I"))
                    fields[key] = c.value(types[key], path)
                infos = []
                for _ in range(n_tensors):
                    name = c.string()
                    dims = tuple(c.take("<Q") for _ in range(c.take("<I")))
                    infos.append((name, dims, GGMLQuantizationType(c.take("<I")), c.take("<Q")))
            except struct.error:
                raise ValueError("the header runs past the end of the file") from None
            align = int(fields.get("general.alignment", 32))
            data_offset = c.at + (-c.at) % align
    tensors = [TensorInfo(name, dims, t, data_offset + off) for name, dims, t, off in infos]
    return GGUFHeader(version, fields, tensors, data_offset, types)


def tensor_digests(path: Path, header: GGUFHeader | None = None) -> dict[str, str]:
    """Each tensor's ``hashing.file_digest`` of its bytes, read in pieces (a 70B file is never
    mapped whole). ValueError when a tensor runs past the end of the file."""
    from release.hashing import file_digest

    header = header or read_header(path)
    size = Path(path).stat().st_size
    out = {}
    with open(path, "rb", buffering=0) as fh:
        for t in header.tensors:
            if t.offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} runs past the end of the file")
            out[t.name] = file_digest(fh, t.offset, t.n_bytes)
    return out
