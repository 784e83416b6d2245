"""Memory stays bounded by the largest tensor, not by the checkpoint.

Each conversion runs in a fresh interpreter that reports its own VmHWM (peak RSS of the process's
current image: unlike ru_maxrss, it does not carry the pytest parent's memory across exec).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, tiny_config, write_folder

# ~300 MB of bf16 weights; the largest tensors (embeddings, lm_head) are 16 MB each.
CFG = tiny_config(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=8,
    num_key_value_heads=8,
    num_hidden_layers=8,
    vocab_size=8192,
)
CHILD = """
import sys
from pathlib import Path
{body}
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
"""


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out |= {p + f"self_attn.{x}_proj.weight": (h, h) for x in "qkvo"}
        out |= {
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    return out


def peak_rss(body: str, *args: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(body=body), *args], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["st-sharded", "bin-sharded"])
def test_peak_memory_is_bounded_by_the_largest_tensor(tmp_path, layout):
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes(CFG).items()}
    total = sum(t.nbytes for t in state.values())
    largest = max(t.nbytes for t in state.values())
    src = write_folder(tmp_path / "src", CFG, state, layout)
    del state
    budget = 2 * largest + 64 * 2**20
    assert total > 2 * budget, "the checkpoint must be much bigger than the budget for this test to mean anything"

    baseline = peak_rss("import release.formats.safetensors")
    peak = peak_rss(
        "from release.formats.safetensors import convert\nconvert(sys.argv[1], sys.argv[2])",
        str(src),
        str(tmp_path / "out"),
    )
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() or (
        tmp_path / "out" / "model.safetensors"
    ).is_file()
    grown = peak - baseline
    assert grown < budget, f"convert grew RSS by {grown / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB checkpoint"


# GGUF: a tied 49152-token embedding (SmolLM2's tokenizer) is the largest tensor, 50 MB in bf16;
# 60 layers make the checkpoint ~18x that.
GGUF_CFG = tiny_config(
    hidden_size=512, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=8,
    num_hidden_layers=60, vocab_size=49152, tie_word_embeddings=True,
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("gtype", ["F16", "Q8_0"])
def test_gguf_peak_memory_is_bounded_by_the_largest_tensor(tmp_path, smollm2, gtype):
    import shutil

    gen = torch.Generator().manual_seed(0)
    state = {
        k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
        for k, s in shapes(GGUF_CFG).items()
        if k != "lm_head.weight"
    }
    total = sum(t.nbytes for t in state.values())
    largest = max(t.nbytes for t in state.values())
    src = write_folder(tmp_path / "src", GGUF_CFG, state, "st-single", tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2.hf / name, src / name)
    del state
    # The quantizers work in float32 (2x a bf16 tensor) with a few temporaries of that size.
    budget = 6 * largest + 64 * 2**20
    assert total > 1.5 * budget
    baseline = peak_rss("import release.formats.gguf")
    peak = peak_rss(
        f"from release.formats.gguf import write_gguf\nwrite_gguf(sys.argv[1], sys.argv[2], [{gtype!r}])",
        str(src),
        str(tmp_path / "out"),
    )
    assert len(list((tmp_path / "out").glob("*.gguf"))) == 1
    grown = peak - baseline
    print(f"{gtype}: RSS grew {grown / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB checkpoint, largest tensor "
          f"{largest / 2**20:.0f} MiB")  # fmt: skip
    assert grown < budget, f"gguf grew RSS by {grown / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB checkpoint"
