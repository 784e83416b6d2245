"""The real SmolLM2-135M-Instruct model: conversion is exact and transformers sees the same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from release import fixtures
from release.errors import BadInputError

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is",
    "Hypertension is defined as a blood pressure above",
    "def fibonacci(n):",
    "Les symptômes de la grippe incluent",
]


def load_tensors(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def converted(smollm2, tmp_path_factory):
    """Both real sources converted once with --dtype keep and small shards."""
    from release.formats.safetensors import convert

    base = tmp_path_factory.mktemp("real")
    results = {}
    for kind, src in (("hf", smollm2.hf), ("bin", smollm2.bin)):
        results[kind] = (convert(src, base / kind, max_shard_size="100MB"), base / kind)
    return results


def logits(folder, prompts=PROMPTS, dtype="auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return [model(**tok(p, return_tensors="pt")).logits[0] for p in prompts], model, tok


def test_fixture_is_the_pinned_model(smollm2):
    record = json.loads((smollm2.root / "fixture.json").read_text())
    assert record["source"]["sha256"] == fixtures.sha256_file(smollm2.gguf)
    for rel, digest in record["files"].items():
        assert fixtures.sha256_file(smollm2.root / rel) == digest
    cfg = json.loads((smollm2.hf / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30


def test_fixture_refuses_a_gguf_that_is_not_the_pinned_one(monkeypatch, tmp_path):
    monkeypatch.setenv("MODEL_RELEASE_CACHE", str(tmp_path))
    spec = dict(fixtures._spec(), sha256="0" * 64)
    monkeypatch.setattr(fixtures, "_spec", lambda: spec)
    with pytest.raises(BadInputError, match="sha256 differs"):
        fixtures.smollm2()
    assert not any(tmp_path.rglob("*.safetensors"))


def test_real_bit_exact_from_both_layouts(smollm2, converted):
    source = load_tensors(smollm2.hf)
    for kind in ("hf", "bin"):
        result, out = converted[kind]
        got = load_tensors(out)
        assert set(got) == set(source), kind
        for name, t in source.items():
            assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), (kind, name)
        assert len(result.shards) == 3
    assert converted["hf"][0].source_checkpoint_hash == converted["bin"][0].source_checkpoint_hash
    assert [d.get("name") for d in converted["bin"][0].dropped] == ["lm_head.weight"]


def test_real_logits_identical_and_model_still_answers(smollm2, converted):
    ref, _, _ = logits(smollm2.hf)
    for kind in ("hf", "bin"):
        got, model, tok = logits(converted[kind][1])
        for a, b in zip(ref, got, strict=True):
            assert torch.equal(a, b), kind
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids["input_ids"].shape[1] :])


def test_real_tokenizer_and_chat_template_carried(smollm2, converted):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(smollm2.hf)
    b = AutoTokenizer.from_pretrained(converted["bin"][1])
    msgs = [{"role": "user", "content": "What is hypertension?"}]
    assert a.apply_chat_template(msgs, tokenize=False) == b.apply_chat_template(msgs, tokenize=False)
    assert "<|im_start|>" in b.apply_chat_template(msgs, tokenize=False)
    text = "Metformin 500 mg b.i.d. — HbA1c 7.2 %  ✓"
    assert a(text)["input_ids"] == b(text)["input_ids"]


def test_real_cast_to_fp32(smollm2, tmp_path):
    from release.formats.safetensors import convert

    out = tmp_path / "fp32"
    convert(smollm2.bin, out, dtype="fp32")
    source = load_tensors(smollm2.hf)
    got = load_tensors(out)
    for name, t in source.items():
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], t.float()), name
    # the fp32 output is the bf16 source upcast: same logits as the source run in fp32
    ref, _, _ = logits(smollm2.hf, PROMPTS[:2], dtype=torch.float32)
    new, model, _ = logits(out, PROMPTS[:2])
    assert model.dtype == torch.float32
    for a, b in zip(ref, new, strict=True):
        assert torch.equal(a, b)


def test_inspect_real_outputs_and_gguf(smollm2, converted, cli):
    info = json.loads(cli("inspect", converted["bin"][1], "--hash", "--json").stdout)
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["parameters"] == 134_515_008
    assert info["dtypes"] == {"BF16": 134_515_008}
    assert info["matches_source_hash"] is True
    assert info["chat_template"] is True
    assert [f["file"] for f in info["files"]] == [s["file"] for s in converted["bin"][0].shards]
    g = json.loads(cli("inspect", smollm2.gguf, "--json").stdout)
    assert g["architecture"] == "llama" and g["kind"] == "gguf"
    assert g["license"] == {"general.license": "apache-2.0"}
    assert g["tensor_types"]["Q4_1"] == 210
    assert g["parameters"] == 134_515_008
    text = cli("inspect", smollm2.gguf)
    assert text.exit_code == 0 and "apache-2.0" in text.stdout
