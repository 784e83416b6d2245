"""Rotary-embedding scaling in GGUF: which config ``rope_type`` becomes which keys or tensors.

Written as llama.cpp's converter writes them (``TextModel.set_gguf_parameters``,
``LlamaModel.generate_extra_tensors``, ``Phi3MiniModel``), because llama.cpp reads nothing else:

- ``linear``: scaling type and factor keys;
- ``yarn``: type, factor, original context and the optional yarn keys;
- ``llama3`` (Llama 3.1+, Apertus): no keys, a ``rope_freqs`` tensor of per-frequency divisors;
- ``longrope`` (Phi-3 128k): type and attention factor keys, ``rope_factors_long``/``_short`` tensors.

Which of these an architecture's GGUF can carry is data (``gguf.rope_scaling`` in
``release/data/architectures``); any other type is refused rather than silently dropped, which
would give a file that runs but computes other positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from release.architectures import Architecture
from release.errors import BadInputError


def rope_type(arch: Architecture) -> str | None:
    kind = arch.values.get("rope_type")
    return None if kind in (None, "default") else str(kind).lower()


def _checked(arch: Architecture) -> str | None:
    kind = rope_type(arch)
    if kind is None:
        return None
    if kind == "su":
        kind = "longrope"
    allowed = arch.spec["gguf"].get("rope_scaling", [])
    if kind not in allowed:
        can = f"(this architecture's GGUF carries: {', '.join(allowed)})" if allowed else "(this architecture has none)"
        raise BadInputError(f"config.json: rope scaling {kind!r} is not supported for {arch.name} in GGUF {can}")
    return kind


def _head_dim(arch: Architecture) -> int:
    return int(arch.values["head_dim"])


def add_scaling_keys(writer: Any, arch: Architecture) -> None:
    import gguf

    kind = _checked(arch)
    v = arch.values
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(v["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(v["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(v["original_max_position_embeddings"]))
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if v.get(key) is not None:
                add(float(v[key]))
    elif kind == "longrope":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        scale = int(v["max_position_embeddings"]) / int(v["original_max_position_embeddings"])
        orig = int(v["original_max_position_embeddings"])
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)


def extra_tensors(arch: Architecture) -> dict[str, torch.Tensor]:
    """GGUF tensors computed from config.json, by GGUF name."""
    kind = _checked(arch)
    v = arch.values
    if kind == "llama3":
        return {"rope_freqs.weight": llama3_factors(
            _head_dim(arch), float(v.get("rope_theta", 10000.0)), float(v.get("factor", 8.0)),
            float(v.get("low_freq_factor", 1.0)), float(v.get("high_freq_factor", 4.0)),
            int(v.get("original_max_position_embeddings", 8192)))}  # fmt: skip
    if kind == "longrope":
        long, short = v.get("long_factor"), v.get("short_factor")
        half = _head_dim(arch) // 2
        if not long or not short or len(long) != half or len(short) != half:
            raise BadInputError(f"config.json: longrope needs long_factor and short_factor of {half} values each")
        return {
            "rope_factors_long.weight": torch.tensor(long, dtype=torch.float32),
            "rope_factors_short.weight": torch.tensor(short, dtype=torch.float32),
        }
    return {}


def llama3_factors(dim: int, base: float, factor: float, low: float, high: float, old_ctx: int) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling as divisors of each rotary frequency (what
    llama.cpp's ``rope_freqs`` holds): 1 for short wavelengths, ``factor`` for long ones, a smooth
    blend between. The converter's loop, kept float32 as it computes it."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)
