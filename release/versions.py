"""Exact versions of the tools that make a release: what the build record, the BOM and the cards name."""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
from pathlib import Path

from release import TOOL_NAME, __version__

# The libraries whose exact versions made the files.
LIBRARIES = ("torch", "transformers", "safetensors", "gguf", "llama-cpp-python", "gptqmodel", "optimum",
             "huggingface-hub", "numpy")  # fmt: skip


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """model-release's and each installed library's version (absent ones are left out)."""
    out = {TOOL_NAME: __version__}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def llama_cpp_commit() -> str | None:
    """The llama.cpp commit llama-cpp-python was built from, as its own ggml library reports it
    (``ggml_commit``): the package version alone does not say which vendored commit a wheel holds."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for lib in sorted(Path(next(iter(spec.submodule_search_locations)), "lib").glob("libggml-base.*")):
        try:
            fn = ctypes.CDLL(str(lib)).ggml_commit
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_char_p
        return (fn() or b"").decode() or None
    return None
