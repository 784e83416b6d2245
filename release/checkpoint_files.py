"""Which files hold a checkpoint's weights: an index's shards, else the single file, safetensors
before ``.bin``. Kept apart from ``checkpoint`` (which needs torch for the tensor reader) so that
what reads only headers, as a model card's parameter count does, finds the same files without it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from release.datafiles import data_file
from release.errors import BadInputError


def natural_key(name: str) -> list[object]:
    """Sort ``layers.10`` after ``layers.9``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"missing {what}: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: invalid JSON ({exc})") from None


def weight_files(root: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    names = data_file("checkpoint_files.json")["weights"]
    for kind in ("safetensors", "pytorch"):
        index = root / names[f"{kind}_index"]
        if index.is_file():
            weight_map = read_json(index, "index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise BadInputError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()), key=natural_key)
            missing = [f for f in files if not (root / f).is_file()]
            if missing:
                raise BadInputError(f"{root}: shard {missing[0]} listed in {index.name} is missing")
            return "hf-sharded", [root / f for f in files], weight_map
        single = root / names[f"{kind}_single"]
        if single.is_file():
            return "hf-single", [single], None
    raise BadInputError(
        f"{root}: no weights found (looked for {', '.join(names.values())})",
        hint="pass a single state-dict file next to its config.json as SRC",
    )
