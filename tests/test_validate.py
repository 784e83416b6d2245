"""Validation against reference logits, on the real SmolLM2 model: good variants pass, damaged
ones fail with exit 1 and say why, a reference of another model or tokenizer is refused (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from release.formats.gguf import write_gguf
from release.formats.gguf_header import read_header
from release.formats.safetensors import convert
from release.validation.reference import build_reference, load_reference

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def setup(smollm2, smollm2_reference, tmp_path_factory):
    base = tmp_path_factory.mktemp("validate")
    ref = smollm2_reference.path
    convert(smollm2.hf, base / "st")
    write_gguf(smollm2.hf, base / "gguf", ["Q8_0"], name="m")
    return {"ref": ref, "st": base / "st", "q8": base / "gguf" / "m-Q8_0.gguf", "base": base}


def test_reference_file_holds_what_validation_needs(setup, smollm2):
    ref = load_reference(setup["ref"])
    n_pred = ref.target_logprobs.numel()
    assert ref.topk_ids.shape == (n_pred, 256) and ref.topk_logprobs.shape == (n_pred, 256)
    assert n_pred == ref.input_ids.numel() - ref.prompt_count
    assert ref.meta["source_checkpoint_hash"].startswith("blake3:")
    # Log-probs are sorted, below 0, and the top-256 holds most of the mass.
    assert (ref.topk_logprobs[:, :-1] >= ref.topk_logprobs[:, 1:]).all()
    assert float(ref.topk_logprobs.exp().sum(-1).mean()) > 0.9
    # The first prompt's top-1 equals transformers' own argmax at position 0.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2.hf, dtype=torch.float32).eval()
    ids, rows = next(ref.prompts())
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    assert torch.equal(logits.argmax(-1), ref.topk_ids[rows, 0].long())


def test_good_variants_pass_and_reports_are_written(setup, cli):
    r = cli("validate", setup["q8"], setup["st"], "-r", setup["ref"], "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    kinds = {Path(v["variant"]).name: v for v in out["variants"]}
    q8, st = kinds["m-Q8_0.gguf"], kinds["st"]
    assert q8["kind"] == "gguf-Q8_0" and q8["runtime"] == "llama.cpp" and q8["passed"]
    assert 0 < q8["metrics"]["kl_mean"] < 0.012
    assert st["kind"] == "lossless" and st["runtime"] == "transformers"
    assert st["metrics"]["kl_mean"] < 1e-9 and st["metrics"]["top1_agreement"] == 1.0
    for v in (q8, st):
        report = json.loads(Path(v["reports"]["json"]).read_text())
        assert report["metrics"] == v["metrics"] and report["reference"]["top_k"] == 256
        assert Path(v["reports"]["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "| pass |" in Path(v["reports"]["markdown"]).read_text()


def test_llama_cpp_runs_prompt_batches_on_the_steps_threads(setup, monkeypatch):
    """Validation is all prompt batches: they must run on the step's thread count (a Ray task's CPU
    request, a test worker's share), not llama-cpp-python's default of every core."""
    from release.validation.runtimes import LlamaCppRuntime

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rt = LlamaCppRuntime(setup["q8"], n_ctx=64)
    try:
        params = rt.llm.context_params
        assert (params.n_threads, params.n_threads_batch) == (1, 1)
    finally:
        rt.close()
    rt = LlamaCppRuntime(setup["q8"], n_ctx=64, threads=3)
    try:
        assert (rt.llm.context_params.n_threads, rt.llm.context_params.n_threads_batch) == (3, 3)
    finally:
        rt.close()


def test_gguf_with_two_layers_swapped_fails(setup, cli, tmp_path):
    bad = tmp_path / "swapped.gguf"
    shutil.copyfile(setup["q8"], bad)
    tensors = {t.name: t for t in read_header(setup["q8"]).tensors}
    a, b = tensors["blk.3.ffn_down.weight"], tensors["blk.20.ffn_down.weight"]
    assert a.n_bytes == b.n_bytes and a.tensor_type == b.tensor_type
    with open(setup["q8"], "rb") as f, open(bad, "r+b") as g:
        f.seek(a.offset)
        da = f.read(a.n_bytes)
        f.seek(b.offset)
        db = f.read(b.n_bytes)
        g.seek(a.offset)
        g.write(db)
        g.seek(b.offset)
        g.write(da)
    r = cli("validate", bad, "-r", setup["ref"])
    assert r.exit_code == 1
    assert r.error_lines[-1].startswith("error: swapped.gguf (gguf-Q8_0) failed: mean KL")


def test_safetensors_with_one_tensor_scaled_fails(setup, cli, tmp_path):
    bad = tmp_path / "scaled"
    shutil.copytree(setup["st"], bad)
    shard = next(bad.glob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    name = "model.layers.10.mlp.down_proj.weight"
    state[name] = (state[name].float() * 1.01).to(state[name].dtype)
    save_file(state, str(shard), metadata=meta)
    r = cli("validate", bad, "-r", setup["ref"], "--json")
    assert r.exit_code == 1
    v = json.loads(r.stdout)["variants"][0]
    assert v["kind"] == "lossless" and not v["passed"]
    assert any("max log-prob difference" in f for f in v["failures"])
    assert "scaled (lossless) failed" in r.error_lines[-1]


def test_reference_of_another_model_is_refused(setup, tiny, smollm2, cli, tmp_path):
    src, _, _ = tiny("st-single", vocab_size=49152)
    for n in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2.hf / n, src / n)
    other = tmp_path / "other-ref.safetensors"
    build_reference(src, other, max_tokens=16)
    r = cli("validate", setup["q8"], "-r", other)
    assert r.exit_code == 2
    assert "another model" in r.error_lines[-1]


def test_variant_with_another_tokenizer_is_refused(setup, smollm2, cli, tmp_path):
    variant = tmp_path / "retok"
    shutil.copytree(smollm2.hf, variant)  # the fixture records no source hash: only tokenization can tell
    tj = json.loads((variant / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġof"] = vocab["Ġof"], vocab["Ġthe"]
    (variant / "tokenizer.json").write_text(json.dumps(tj))
    r = cli("validate", variant, "-r", setup["ref"])
    assert r.exit_code == 2
    assert "tokenizes prompt" in r.error_lines[-1] and "differently from the reference" in r.error_lines[-1]


def test_missing_variant_or_reference(setup, cli, tmp_path):
    r = cli("validate", tmp_path / "nope.gguf", "-r", setup["ref"])
    assert r.exit_code == 2 and "no such variant" in r.error_lines[-1]
    r = cli("validate", setup["q8"], "-r", tmp_path / "nope.safetensors")
    assert r.exit_code == 2 and "no such reference file" in r.error_lines[-1]


@pytest.mark.parametrize("forward", ["resident", "streamed"])
def test_reference_opens_the_source_once(tiny, smollm2, tmp_path, monkeypatch, forward):
    """One `reference` run reads the source's headers once: the checks, the hash, the forward
    choice and the streamed model share one open checkpoint (it was opened five times)."""
    from release import checkpoint

    src, _, _ = tiny("st-sharded", vocab_size=49152, hidden_size=64, intermediate_size=128)
    for n in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2.hf / n, src / n)
    opened: list[str] = []
    real = checkpoint.open_tensor_file
    monkeypatch.setattr(checkpoint, "open_tensor_file", lambda p: opened.append(Path(p).name) or real(p))
    result = build_reference(src, tmp_path / "ref.safetensors", forward=forward, max_tokens=32)
    assert result.forward == forward and result.predicted_tokens > 0
    assert sorted(opened) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
