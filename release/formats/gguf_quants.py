"""Block quantization through ggml's own ``ggml_quantize_chunk`` (the library llama-cpp-python
ships), on several threads, for the types the ``gguf`` package would otherwise do in numpy.

Why: at 7B the ``gguf`` package's numpy Q8_0 (single-threaded, six full-size float32 temporaries
per tensor) was most of the GGUF step's time and its peak memory. ggml's C quantizer is the code
``gguf.quants`` reproduces bit for bit (its Q8_0 says so, and ``tests/test_gguf.py`` checks the
bytes); here it runs over row chunks converted to float32 one chunk at a time, on a thread per
core (ctypes releases the GIL). Without llama-cpp-python the ``gguf`` package's numpy path is used.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import gguf
import numpy as np
import torch

from release.resources import cpu_threads

Q = gguf.GGMLQuantizationType
# Types whose ggml quantizer needs no importance matrix and equals gguf.quants' numpy one.
TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
_CHUNK = 1 << 22  # float32 values converted at a time per thread (16 MB)


@cache
def _ggml() -> ctypes.CDLL | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    path = next((p for p in sorted(lib_dir.glob("libggml-base.*")) if p.is_file()), None)
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    return _ggml() is not None


_out = threading.local()


def _output(nbytes: int) -> np.ndarray:
    """A reused output buffer (fresh ones cost a page fault per 4 kB: 7 GB of Q8_0 at 7B)."""
    buf = getattr(_out, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _out.buf = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


def quantize(t: torch.Tensor, qtype: Q, threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray | None:
    """GGUF bytes of ``t`` (any float dtype; rows along the last dimension), shaped like
    ``gguf.quants.quantize``'s result; None when ggml is not available for this type. The result
    is a view of ``out`` (flat uint8, large enough) when given, else of a buffer this thread reuses
    at its next call: write it out before then."""
    lib = _ggml()
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = t.shape[-1]
    if lib is None or qtype not in TYPES or n % block:
        return None
    lib.ggml_quantize_init(int(qtype))
    rows = t.reshape(-1, n)
    row_bytes = n // block * type_size
    flat = out[: rows.shape[0] * row_bytes] if out is not None else _output(rows.shape[0] * row_bytes)
    out = flat.reshape(rows.shape[0], row_bytes)
    step = max(1, _CHUNK // n)

    local = threading.local()

    def work(a: int) -> None:
        # One float32 buffer per thread, reused: fresh 16 MB allocations cost a page fault per 4 kB.
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = torch.empty(step * n, dtype=torch.float32)
        src = rows[a : a + step]
        chunk = buf[: src.numel()].view(src.shape)
        chunk.copy_(src)
        dst = out.ctypes.data + a * row_bytes
        lib.ggml_quantize_chunk(int(qtype), chunk.data_ptr(), dst, 0, chunk.shape[0], n, None)

    starts = range(0, rows.shape[0], step)
    workers = threads or min(len(starts), cpu_threads())
    if workers <= 1:
        for a in starts:
            work(a)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="ggml-quantize") as pool:
            list(pool.map(work, starts))
    return out.reshape(*t.shape[:-1], row_bytes)
