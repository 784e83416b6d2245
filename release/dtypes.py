"""The dtype table shared by every reader and writer (safetensors codes are the lingua franca)."""

from __future__ import annotations

import torch

from release.choices import CAST_CHOICES as CAST_CHOICES  # re-exported
from release.errors import BadInputError

# safetensors dtype code -> torch dtype. The codes are the ones safetensors writes in its header.
SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

# names used in config.json's torch_dtype / dtype
CONFIG_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def itemsize(code: str) -> int:
    return SAFETENSORS_TO_TORCH[code].itemsize


def to_torch(code: str) -> torch.dtype:
    try:
        return SAFETENSORS_TO_TORCH[code]
    except KeyError:
        raise BadInputError(f"unsupported tensor dtype {code!r}") from None


def from_torch(dtype: torch.dtype) -> str:
    try:
        return TORCH_TO_SAFETENSORS[dtype]
    except KeyError:
        raise BadInputError(f"unsupported tensor dtype {dtype}") from None


def cast_code(source_code: str, target: str | None) -> str:
    """The dtype a tensor gets under ``--dtype``: floats are cast, integer tensors are kept."""
    if target is None or source_code not in FLOAT_CODES:
        return source_code
    return target
