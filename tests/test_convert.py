"""`convert` on tiny random Llama checkpoints: every input layout, casts, shards, ties, self-check."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from release import hashing
from release.errors import CheckFailedError
from release.formats import safetensors as st_format
from release.formats.safetensors import convert, parse_size, plan_shards
from release.safetensors_header import parse_safetensors_header
from release.tensors import TensorRef
from tests.conftest import leftovers

LAYOUTS = ["st-single", "st-sharded", "st-file", "bin-single", "bin-sharded", "pt-file", "pth-wrapped"]


def load_output(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_converts_bit_exact(tiny, cli, tmp_path, layout):
    src, cfg, state = tiny(layout)
    out = tmp_path / "out"
    r = cli("convert", src, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    got = load_output(out)
    assert set(got) == set(state)
    for name, t in state.items():
        assert got[name].dtype == t.dtype
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name
    assert summary["verified"] is True
    assert summary["tensors"] == len(state)
    assert json.loads((out / "config.json").read_text()) == cfg
    assert load_output(out)["model.norm.weight"].dtype == torch.bfloat16  # what config's torch_dtype says
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src if src.is_dir() else src.parent).joinpath(name).read_bytes()
    assert leftovers(tmp_path) == []


def test_same_weights_same_hash_across_formats(tiny, cli, tmp_path):
    """The checkpoint hash names the weights, not the files: .bin and safetensors copies agree,
    and a --dtype keep output hashes to its recorded source hash."""
    hashes = []
    for layout in ("st-single", "bin-sharded"):
        src, _, _ = tiny(layout)
        out = tmp_path / f"out-{layout}"
        summary = json.loads(cli("convert", src, "-o", out, "--json").stdout)
        hashes.append(summary["source_checkpoint_hash"])
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"
        assert meta["source_checkpoint_hash"] == summary["source_checkpoint_hash"]
        assert meta["producer"].startswith("model-release ")
        info = json.loads(cli("inspect", out, "--hash", "--json").stdout)
        assert info["checkpoint_hash"] == summary["source_checkpoint_hash"]
        assert info["matches_source_hash"] is True
    assert hashes[0] == hashes[1]
    assert re.fullmatch(r"blake3:[0-9a-f]{64}", hashes[0])


def test_hash_changes_when_one_value_changes(tiny, tmp_path):
    src, cfg, state = tiny("st-single")
    first = convert(src, tmp_path / "a").source_checkpoint_hash
    state["model.norm.weight"][3] += 1
    from tests.conftest import write_folder

    src2 = write_folder(tmp_path / "src-changed", cfg, state, "st-single")
    assert convert(src2, tmp_path / "b").source_checkpoint_hash != first


@pytest.mark.parametrize(
    ("flag", "dtype", "name"), [("fp32", torch.float32, "float32"), ("fp16", torch.float16, "float16")]
)
def test_cast_equals_torch_cast(tiny, cli, tmp_path, flag, dtype, name):
    src, _, state = tiny("bin-single")
    out = tmp_path / "out"
    r = cli("convert", src, "-o", out, "--dtype", flag)
    assert r.exit_code == 0, r.stderr
    got = load_output(out)
    for k, t in state.items():
        assert got[k].dtype == dtype
        assert torch.equal(got[k], t.to(dtype)), k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == name


def test_config_dtype_follows_the_weights(tiny, tmp_path):
    """A config that says bfloat16 over float32 weights is corrected with --dtype keep."""
    src, _, _ = tiny("st-single", dtype=torch.float32, torch_dtype="bfloat16")
    convert(src, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def test_integer_tensors_are_not_cast():
    ref = TensorRef("x", "I64", (3,), Path("f"))
    fl = TensorRef("y", "F32", (3,), Path("f"))
    shards = plan_shards([ref, fl], "BF16", 10**9)
    assert [t.dtype for t in shards[0].tensors] == ["I64", "BF16"]


def test_sharding_respects_limit_and_loads_with_transformers(tiny, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    src, _, state = tiny("st-single")
    out = tmp_path / "out"
    r = cli("convert", src, "-o", out, "--max-shard-size", "40KB", "--json")
    assert r.exit_code == 0, r.stderr
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s.name) for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    largest = max(t.numel() * t.element_size() for t in state.values())
    for summary in json.loads(r.stdout)["shards"]:
        assert summary["bytes"] <= max(40_000, largest)
    model = AutoModelForCausalLM.from_pretrained(out)
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k


def test_tied_lm_head_is_dropped_and_transformers_reties_it(tiny, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    src, _, state = tiny("bin-sharded", tie_word_embeddings=True)
    out = tmp_path / "out"
    summary = json.loads(cli("convert", src, "-o", out, "--json").stdout)
    assert [d["name"] for d in summary["dropped"]] == ["lm_head.weight"]
    assert "lm_head.weight" not in load_output(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])


def test_tied_but_different_is_refused(tiny, cli, tmp_path):
    src, cfg, state = tiny("st-single")
    state["lm_head.weight"] = state["lm_head.weight"].clone()  # its own, different values
    cfg["tie_word_embeddings"] = True
    from tests.conftest import write_folder

    src = write_folder(tmp_path / "bad", cfg, state, "bin-single")
    r = cli("convert", src, "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "stored tensors differ" in r.stderr
    assert not (tmp_path / "out").exists()


def test_old_llama_rotary_buffers_are_dropped(tiny, cli, tmp_path):
    src, cfg, state = tiny("st-single")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(8, dtype=torch.float32)
    from tests.conftest import write_folder

    src = write_folder(tmp_path / "old", cfg, state, "bin-single")
    summary = json.loads(cli("convert", src, "-o", tmp_path / "out", "--json").stdout)
    assert summary["dropped"][0]["name"] == "model.layers.0.self_attn.rotary_emb.inv_freq"
    assert summary["tensors"] == len(state) - 1


def test_tiny_logits_equal_after_convert(tiny, cli, tmp_path):
    from transformers import AutoModelForCausalLM

    src, _, _ = tiny("bin-sharded", dtype=torch.float32, torch_dtype="float32")
    out = tmp_path / "out"
    assert cli("convert", src, "-o", out).exit_code == 0
    ids = torch.tensor([[1, 5, 9, 200, 3, 17]])
    a = AutoModelForCausalLM.from_pretrained(out).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((src / "config.json").read_text())
    b = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "torch_dtype"}))
    sd = {}
    for f in sorted(src.glob("*.bin")):
        sd.update(torch.load(f, weights_only=True))
    b.load_state_dict(sd)
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("layout", ["st-single", "bin-single"])  # kernel copy and write() paths
def test_write_check_catches_a_corrupted_write(tiny, cli, tmp_path, monkeypatch, layout):
    """The read-back check must fail (exit 1) when a byte on disk differs from the source."""
    src, _, _ = tiny(layout)
    real_finish = st_format.ShardWriter.finish

    def finish_then_corrupt(self, metadata):  # one flipped byte on disk, after the writer is done
        real_finish(self, metadata)
        start, header = parse_safetensors_header(self.path)
        if "model.norm.weight" in header:
            offset = start + header["model.norm.weight"]["data_offsets"][0]
            with open(self.path, "r+b") as f:
                f.seek(offset)
                byte = f.read(1)[0]
                f.seek(offset)
                f.write(bytes([byte ^ 0xFF]))

    monkeypatch.setattr(st_format.ShardWriter, "finish", finish_then_corrupt)
    out = tmp_path / "out"
    r = cli("convert", src, "-o", out)
    assert r.exit_code == 1
    assert "model.norm.weight" in r.stderr and "differs from the source" in r.stderr
    assert not out.exists()
    assert leftovers(tmp_path) == []
    with pytest.raises(CheckFailedError):
        convert(src, out)


def test_force_replaces_and_refuses_without(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = cli("convert", src, "-o", out)
    assert r.exit_code == 2 and "not empty" in r.stderr
    assert (out / "keep.txt").exists()
    assert cli("convert", src, "-o", out, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500 mb") == 500 * 10**6
    assert parse_size(1234) == 1234
    assert hashing.PLACEHOLDER_HASH.startswith(hashing.CHECKPOINT_HASH_PREFIX)


def test_without_copy_file_range_falls_back_to_write(tiny, tmp_path, monkeypatch):
    """Filesystems or kernels without copy_file_range (ENOSYS, EXDEV) still convert bit-exact."""
    import errno
    import os

    calls = []

    def no_copy(*args):
        calls.append(args)
        raise OSError(errno.ENOSYS, "not implemented")

    monkeypatch.setattr(os, "copy_file_range", no_copy)
    src, _, state = tiny("st-sharded")
    convert(src, tmp_path / "out")
    assert calls, "the kernel copy was not even tried"
    got = load_output(tmp_path / "out")
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k
