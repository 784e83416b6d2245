"""How GGUF variants are named on disk: ``NAME-TYPE.gguf``, or llama.cpp's split set
``NAME-TYPE-00001-of-0000N.gguf`` ... (the ``gguf-split`` convention), and what GGUF calls an
architecture's tensors. Kept apart from the writer (which imports torch, gguf and llama.cpp) so that
the pipeline, manifests, cards and validation can name a variant's files cheaply."""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from release.errors import BadInputError

if TYPE_CHECKING:
    from release.architectures import Architecture


def lossless_type(dtype: str) -> str:
    """The GGUF type that holds weights stored as ``dtype`` (a safetensors code) exactly: the
    intermediate llama.cpp's quantizer reads (the writer and the build's planner must agree)."""
    return dtype if dtype in ("BF16", "F16") else "F32"


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


def tensor_name_map(arch: Architecture) -> Any:
    """``gguf.TensorNameMap`` of an architecture (its ``gguf.arch`` in release/data/architectures):
    HF tensor names -> the names llama.cpp's graph gives them (``blk.3.attn_q.weight`` ...)."""
    import gguf

    spec = arch.spec.get("gguf")
    if not spec:
        raise BadInputError(f"architecture {arch.name} has no GGUF description (release/data/architectures)")
    model_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[spec["arch"]]
    return gguf.get_tensor_name_map(model_arch, arch.num_layers)
