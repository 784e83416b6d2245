"""GPTQModel's compiled kernels, built once per machine ahead of the first GPTQ step.

GPTQModel ships some kernels as C++ (and CUDA) sources and compiles them with the host's compiler
the first time a process needs them, caching the result under ``~/.cache/gptqmodel``. On a fresh
2-core machine with AVX512-BF16 (2026-12-06) the first GPTQ step spent 40 s compiling before it
quantized anything, and the first validation of its output another 90 s: about 165 CPU-seconds of
``cc1plus`` inside steps whose progress bars stood still. A CI runner or a new cluster node pays
that again. ``model-release kernels`` pays it up front through GPTQModel's own API for exactly this
(``gptqmodel.extension.load``, "build ... ahead of first use"); this module only says which ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from release.capture import capture_fd, tail
from release.versions import library_versions

# The kernels our GPTQ flow makes GPTQModel compile on the CPU (what its cache held after a fresh
# machine's demo build): packing quantized weights into qweight/qzeros, for every quantization; and
# the int4 x bfloat16 matrix product its CPU inference picks where the CPU has AVX512-BF16.
CPU_KERNELS = ("pack_block_cpu", "int4_qzero_group_scaled_cpu")
AVX512_BF16_ONLY = ("int4_qzero_group_scaled_cpu",)


@dataclass(frozen=True)
class Kernel:
    name: str
    status: str  # ready (built or found built, and loaded) | unused (not for this host) | failed
    seconds: float
    note: str = ""  # why not ready

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class KernelReport:
    gptqmodel: str | None  # None: not installed, nothing to build
    device: str
    kernels: tuple[Kernel, ...]
    cache: str | None = None  # where GPTQModel keeps them: worth caching between CI runs

    @property
    def ok(self) -> bool:
        return all(k.status != "failed" for k in self.kernels)

    def to_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "gptqmodel": self.gptqmodel, "device": self.device, "cache": self.cache,
                "kernels": [k.to_dict() for k in self.kernels]}  # fmt: skip


def _build(name: str, load: Callable[[], object]) -> Kernel:
    """One kernel; the compiler's output stays off the terminal and is quoted when the build fails."""
    started = time.monotonic()
    with capture_fd(1) as out, capture_fd(2) as err:
        try:
            ok, note = bool(load()), ""
        except RuntimeError as exc:  # GPTQModel's way of saying the compiler failed
            ok, note = False, _first_words(str(exc))
        except OSError as exc:  # its build cache cannot be written
            ok, note = False, f"build cache: {exc.strerror}: {exc.filename}"
        if not ok and not note:
            note = tail(err) or tail(out) or "failed to build"
    return Kernel(name, "ready" if ok else "failed", round(time.monotonic() - started, 2), note)


def _first_words(message: str) -> str:
    """GPTQModel's failure, less the build-folder diagnostics it appends after " | "."""
    first = " ".join(message.split()).split(" | ")[0]
    return first[first.find("failed to build") :] if "failed to build" in first else first


def build_kernels(device: str = "auto") -> KernelReport:
    """Build (or find built) every kernel a GPTQ step on ``device`` would compile on first use."""
    installed = library_versions(("gptqmodel",)).get("gptqmodel")
    if installed is None:
        return KernelReport(None, device, ())
    from release.formats.gptq import import_gptqmodel, resolve_device

    device = resolve_device(device)
    import_gptqmodel()
    from gptqmodel import extension
    from gptqmodel.utils.cpp import default_torch_ops_build_root
    from gptqmodel.utils.cpu_features import has_avx512_bf16

    kernels = []
    for name in CPU_KERNELS:
        if name in AVX512_BF16_ONLY and not has_avx512_bf16():
            kernels.append(Kernel(name, "unused", 0.0, "this CPU has no AVX512-BF16: GPTQModel uses its torch kernel"))
            continue
        kernels.append(_build(name, lambda n=name: extension.load(n)[n]))
    if device.startswith("cuda"):
        # GPTQ's fused column update on CUDA (nvcc); without it GPTQModel quantizes column by column
        # in Python: the same result, slower.
        from gptqmodel.quantization import gptq_cuda

        kernels.append(_build("gptq_block_update", gptq_cuda.block_update_available))
    return KernelReport(installed, device, tuple(kernels), str(default_torch_ops_build_root("")))
