"""safetensors headers read without torch: where each tensor lies, and a folder's ``__metadata__``
(our provenance). Kept apart from the tensor reader so that downstream commands (fetch, verify,
manifest, cards) can read them in the base install."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from release.errors import BadInputError

_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces


def parse_safetensors_header(path: Path) -> tuple[int, dict]:
    """Read and check a safetensors header; returns (data start offset, header dict).

    The ``safetensors`` library validates the file when it opens it (offsets, sizes, dtypes), but
    does not expose where each tensor lies; we need those offsets to map one tensor at a time.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BadInputError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise BadInputError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: corrupt safetensors header (not a JSON object)")
    return 8 + n, header


def folder_metadata(folder: Path) -> dict[str, str]:
    """``__metadata__`` of a safetensors folder's first shard (where our writers record provenance)."""
    for f in sorted(Path(folder).glob("*.safetensors"))[:1]:
        return dict(parse_safetensors_header(f)[1].get("__metadata__") or {})
    return {}


def folder_parameters(folder: Path) -> int:
    """Values stored in a safetensors checkpoint folder's weight shards (those ``weight_files``
    finds: not reference-logits.safetensors beside them), from their headers: a card's parameter
    count without importing torch (the card step would otherwise pay ~1.8 s for it)."""
    from release.checkpoint_files import weight_files

    total = 0
    for path in weight_files(Path(folder))[1]:
        header = parse_safetensors_header(path)[1]
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total
