"""Make a Llama checkpoint of a real model's shape with random weights, one tensor at a time.

Used by `bench_scale.py` (the 7B- and 70B-shaped checkpoints) and `gpu_check.py`. Weights are drawn
with std 0.02 (norms 1), so activations stay in the range trained models have; the tokenizer is
copied from a real model folder (the SmolLM2 fixture's by default), so every command runs on it.
Memory: one shard of at most --shard-gb is built and written at a time (`safetensors.torch.save_file`
needs a shard whole), never the model.

    python bench/shaped_model.py llama2-7b OUT [--layers N] [--tokenizer DIR] [--device cpu|cuda] [--headers-only]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import time
from pathlib import Path

SHAPES = {
    # Llama-2-7B's body with the fixture tokenizer's vocabulary (49152): the tokenizer must match.
    "llama2-7b": {"hidden": 4096, "inter": 11008, "heads": 32, "kv": 32, "layers": 32},
    "llama2-70b": {"hidden": 8192, "inter": 28672, "heads": 64, "kv": 8, "layers": 80},
    "smollm2-135m": {"hidden": 576, "inter": 1536, "heads": 9, "kv": 3, "layers": 30, "tied": True},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "tokenizer.model")  # fmt: skip


def default_tokenizer() -> Path:
    from release import fixtures

    return fixtures.smollm2().hf


def make(
    shape: str,
    out: Path,
    *,
    layers: int | None = None,
    tokenizer: Path | None = None,
    device: str = "cpu",
    shard_gb: float = 4.0,
    seed: int = 0,
    headers_only: bool = False,
) -> Path:
    import torch
    from safetensors.torch import save_file

    s = dict(SHAPES[shape])
    n_layers = layers or s["layers"]
    tok = Path(tokenizer) if tokenizer else default_tokenizer()
    spec = json.loads((tok / "tokenizer.json").read_text())
    ids = [*spec["model"]["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))]
    vocab = max(ids) + 1
    hd = s["hidden"] // s["heads"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*dims: int) -> torch.Tensor:
        return (torch.randn(*dims, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    def ones(n: int) -> torch.Tensor:  # norms
        return torch.ones(n, dtype=torch.bfloat16)

    def tensors():  # (name, shape, filled with), in file order
        yield "model.embed_tokens.weight", (vocab, s["hidden"]), rand
        for i in range(n_layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", (s["hidden"],), ones
            yield p + "self_attn.q_proj.weight", (s["heads"] * hd, s["hidden"]), rand
            yield p + "self_attn.k_proj.weight", (s["kv"] * hd, s["hidden"]), rand
            yield p + "self_attn.v_proj.weight", (s["kv"] * hd, s["hidden"]), rand
            yield p + "self_attn.o_proj.weight", (s["hidden"], s["heads"] * hd), rand
            yield p + "post_attention_layernorm.weight", (s["hidden"],), ones
            yield p + "mlp.gate_proj.weight", (s["inter"], s["hidden"]), rand
            yield p + "mlp.up_proj.weight", (s["inter"], s["hidden"]), rand
            yield p + "mlp.down_proj.weight", (s["hidden"], s["inter"]), rand
        yield "model.norm.weight", (s["hidden"],), ones
        if not s.get("tied"):
            yield "lm_head.weight", (vocab, s["hidden"]), rand

    limit = int(shard_gb * (1 << 30))
    size = 0
    # Plan shards from shapes first (file names need the count), then fill them one at a time.
    plan: list[list[tuple[str, tuple[int, ...], object]]] = [[]]
    for name, shape, fill in tensors():
        n = 2 * math.prod(shape)
        if size + n > limit and plan[-1]:
            plan.append([])
            size = 0
        plan[-1].append((name, shape, fill))
        size += n
    weight_map = {}
    total = 0
    for i, items in enumerate(plan, 1):
        fname = f"model-{i:05d}-of-{len(plan):05d}.safetensors" if len(plan) > 1 else "model.safetensors"
        if headers_only:
            total += _sparse_shard(out / fname, [(name, shape) for name, shape, _ in items])
        else:
            shard = {name: fill(*shape) for name, shape, fill in items}
            total += sum(t.numel() * 2 for t in shard.values())
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            del shard
        weight_map.update({name: fname for name, _, _ in items})
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
        "intermediate_size": s["inter"], "num_attention_heads": s["heads"], "num_key_value_heads": s["kv"],
        "num_hidden_layers": n_layers, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": bool(s.get("tied")),
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        if (tok / f).is_file():
            shutil.copy2(tok / f, out / f)
    return out


def _sparse_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]]) -> int:
    """A bf16 safetensors file with these tensors' header and no data: a sparse file of the full size
    (0 bytes on disk). Enough for everything that reads headers only (``build --dry-run``'s plan, the
    estimates); the safetensors library writes no file without its data, hence by hand (its format:
    an 8-byte little-endian header length, the JSON header padded with spaces to 8 bytes, the data)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.truncate(8 + len(body) + offset)
    return offset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--headers-only", action="store_true", help="sparse files: tensor headers, no data")
    a = ap.parse_args()
    t0 = time.monotonic()
    make(a.shape, a.out, layers=a.layers, tokenizer=a.tokenizer, device=a.device, shard_gb=a.shard_gb,
         headers_only=a.headers_only)  # fmt: skip
    print(f"{a.out}: {a.shape} written in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
