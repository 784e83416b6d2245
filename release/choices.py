"""The values the CLI offers before it imports the libraries that act on them (``--help`` and
argument parsing must not import torch): convert's dtypes, GPTQ's bit widths, the reference's
top-k, GGUF's types (read from ``release/data/gguf/types.json``)."""

from __future__ import annotations

from release.datafiles import data_file

# --dtype choices of `convert`: name -> safetensors code (None: keep the stored dtypes)
CAST_CHOICES: dict[str, str | None] = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
# GPTQ bit widths GPTQModel packs
BITS = (2, 3, 4, 8)
# reference log-probs kept per token (plus the rest mass)
TOP_K = 256


def gguf_type_names() -> list[str]:
    return list(data_file("gguf", "types.json")["types"])
