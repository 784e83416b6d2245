"""Calibration text: the deterministic token windows GPTQ and the importance matrix both learn from.

Our own medical + general texts (``release/data/calibration/default.jsonl``) or the user's file, joined
with the end-of-sequence token and cut into windows; a seeded shuffle picks some of them. Same file,
tokenizer and seed: same windows, in the same order (so the same GPTQ weights and imatrix bytes).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from release.errors import BadInputError

DEFAULT_CALIBRATION = "default.jsonl"


@dataclass
class Calibration:
    name: str  # file name only: a path would be machine-local junk in released metadata
    sha256: str
    documents: int
    tokens: int
    windows: list[list[int]] = field(repr=False)

    def describe(self) -> dict[str, Any]:
        """What a released artefact records about the text it was calibrated on."""
        out = {k: v for k, v in asdict(self).items() if k != "windows"}
        out["samples"] = len(self.windows)
        out["seq_len"] = len(self.windows[0]) if self.windows else 0
        return out


def load_calibration_texts(path: Path | None) -> tuple[str, str, list[str]]:
    """(name, sha256, documents) from a ``.txt`` (one document per line) or ``.jsonl`` (``text`` field) file."""
    if path is None:
        path = Path(str(resources.files("release").joinpath("data", "calibration", DEFAULT_CALIBRATION)))
        name = f"model-release:{DEFAULT_CALIBRATION}"
    else:
        name = Path(path).name
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read calibration file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: calibration file is not UTF-8 text") from None
    docs: list[str] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{path}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise BadInputError(f'{path}:{n}: each line needs a "text" string')
            if obj["text"].strip():
                docs.append(obj["text"])
    elif path.suffix in (".txt", ""):
        docs = [line for line in text.splitlines() if line.strip()]
    else:
        raise BadInputError(f"{path}: calibration must be .txt (one document per line) or .jsonl (a text field)")
    if not docs:
        raise BadInputError(f"{path}: no calibration text in the file")
    return name, hashlib.sha256(raw).hexdigest(), docs


def build_calibration(
    path: Path | None, tokenizer: Any, *, seq_len: int, seed: int = 0, samples: int | None = None, warn: list[str]
) -> Calibration:
    """Documents joined with the end-of-sequence token and cut into ``seq_len`` windows; a seeded
    shuffle picks ``samples`` of them (None: all)."""
    if seq_len < 8:
        raise BadInputError(f"--seq-len must be at least 8, not {seq_len}")
    name, digest, docs = load_calibration_texts(path)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for doc in docs:
        ids += list(tokenizer.encode(doc, add_special_tokens=False)) + sep
    n = len(ids) // seq_len
    if n == 0:
        raise BadInputError(
            f"calibration text {name} holds {len(ids)} tokens, fewer than one window of {seq_len}",
            hint="give more text, or a smaller window (gptq --seq-len, imatrix --chunk-size)",
        )
    windows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    random.Random(seed).shuffle(windows)
    if samples is not None:
        if samples <= 0:
            raise BadInputError(f"--samples must be positive, not {samples}")
        if samples > n:
            warn.append(f"calibration gives {n} windows of {seq_len} tokens; using all, not {samples}")
        windows = windows[:samples]
    return Calibration(name, digest, len(docs), len(ids), windows)
