"""How GGUF variants are named on disk: ``NAME-TYPE.gguf``, or llama.cpp's split set
``NAME-TYPE-00001-of-0000N.gguf`` ... (the ``gguf-split`` convention). Kept apart from the writer
(which imports torch, gguf and llama.cpp) so that the pipeline, manifests, cards and validation can
name a variant's files cheaply."""

from __future__ import annotations

import glob
import re
from pathlib import Path

SPLIT_SUFFIX = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def set_name(filename: str) -> str:
    """``m-F16-00002-of-00003.gguf`` -> ``m-F16.gguf``: the name of the variant a part belongs to."""
    return SPLIT_SUFFIX.sub(".gguf", filename)


def variant_files(path: Path) -> list[Path]:
    """The files of a GGUF variant named ``NAME-TYPE.gguf``: that file, or its split parts in order."""
    path = Path(path)
    if path.is_file():
        return [path]
    five = "[0-9]" * 5
    parts = sorted(path.parent.glob(f"{glob.escape(path.stem)}-{five}-of-{five}.gguf"))
    return [p for p in parts if set_name(p.name) == path.name]
