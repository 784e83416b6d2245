"""Every architecture in release/data/architectures, proven on a tiny random model made with
transformers' own classes (tests/tiny_archs.py): its F16 GGUF computes in llama.cpp what
transformers computes in float32 (mean KL < 1e-4, same greedy tokens), Q8_0 and Q4_K_M load and
run, the streamed forward pass gives the resident one's logits, and each kind of conversion
mistake (a wrong q/k permutation, a missing bias, an unshifted norm, a lost rope scaling) is caught
by the same comparison."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from release.architectures import registry
from release.formats.gguf import write_gguf
from release.validation.runtimes import llama_threads
from tests.tiny_archs import ARCHS, REGISTRY_NAME, make_model, save

VOCAB = 49152  # the fixture's tokenizer
N_TOKENS = 256
F16_KL = 1e-4


def _ids(seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.integers(100, VOCAB, N_TOKENS)]


def _kl(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    p, q = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean()), float((ref.argmax(-1) == got.argmax(-1)).double().mean())


def _llama_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from llama_cpp import Llama

    m = Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, **llama_threads())
    try:
        m.eval(ids)
        return torch.tensor(np.array(m.scores[: len(ids)]))
    finally:
        m.close()


def _greedy_llama(path: Path, ids: list[int], n: int) -> list[int]:
    from llama_cpp import Llama

    m = Llama(model_path=str(path), n_ctx=512, verbose=False, **llama_threads())
    try:
        out = []
        for tok in m.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(int(tok))
            if len(out) == n:
                return out
        return out
    finally:
        m.close()


@pytest.fixture(scope="module")
def built(smollm2, tmp_path_factory):
    """arch -> (source folder, float32 model, GGUF folder with F16, Q8_0, Q4_K_M)."""
    out = {}
    base = tmp_path_factory.mktemp("archs")
    for arch in ARCHS:
        model = make_model(arch, VOCAB)
        src = save(model.to(torch.bfloat16), base / arch / "src", smollm2.hf)
        model.float()  # the reference: the bf16 weights, computed in float32
        write_gguf(src, base / arch / "gguf", ["F16", "Q8_0", "Q4_K_M"], name="m", imatrix="none")
        out[arch] = (src, model, base / arch / "gguf")
    return out


@pytest.fixture(scope="module")
def f16_logits(built):
    """arch -> (token ids, transformers' float32 logits, llama.cpp's logits of the F16 file), computed
    once per architecture: the F16 test and each damage test of that architecture compare against them."""
    cache: dict[str, tuple[list[int], torch.Tensor, torch.Tensor]] = {}

    def get(arch: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        if arch not in cache:
            _, model, folder = built[arch]
            ids = _ids()
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0]
            cache[arch] = (ids, ref, _llama_logits(folder / "m-F16.gguf", ids))
        return cache[arch]

    return get


def _spec(arch: str) -> dict:
    return registry()[REGISTRY_NAME.get(arch, arch)]


def test_every_architecture_file_is_proven_here():
    assert {REGISTRY_NAME.get(a, a) for a in ARCHS} == set(registry())


@pytest.mark.real_model
@pytest.mark.parametrize("arch", list(ARCHS))
def test_f16_matches_transformers_and_quants_run(built, f16_logits, arch):
    _, model, folder = built[arch]
    ids, ref, got = f16_logits(arch)
    kl, top1 = _kl(ref, got)
    print(f"{arch}: KL(transformers || llama.cpp F16) {kl:.2e}, top-1 {top1:.3f}")
    assert kl < F16_KL and top1 > 0.95, (kl, top1)
    # Greedy continuation: every token llama.cpp picks is transformers' argmax on the same path
    # (or within 0.02 logits of it: random models have near-ties that float rounding may flip).
    # (80 tokens: past the longrope model's 64-token original context, where transformers switches to
    # the long factors; llama.cpp chooses them by its context window, not by the sequence.)
    prompt = ids[:80]
    path = _greedy_llama(folder / "m-F16.gguf", prompt, 16)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + path])).logits[0, len(prompt) - 1 : -1]
    gaps = logits.max(-1).values - logits[torch.arange(len(path)), torch.tensor(path)]
    assert len(path) == 16 and float(gaps.max()) < 0.02, gaps.tolist()
    for q in ("Q8_0", "Q4_K_M"):
        got = _llama_logits(folder / f"m-{q}.gguf", ids[:64])
        assert torch.isfinite(got).all() and got.shape == (64, VOCAB)
        kl_q, _ = _kl(ref[:64], got)
        assert kl_q < 0.05, (q, kl_q)  # runs, and computes the same model (a broken one gives > 1)


def _damage(path: Path, tensor: str, how) -> Path:
    """A copy of a GGUF file with one tensor's values (or one array key's first element, ``key:NAME``)
    changed in place, located by the header reader (gguf-py's would parse the 49k-token vocabulary)."""
    from release.formats.gguf_header import read_header

    bad = path.with_name("damaged.gguf")
    shutil.copyfile(path, bad)
    header = read_header(bad)
    if tensor.startswith("key:"):
        field = header.fields[tensor.removeprefix("key:")]
        dtype, offset, shape = gguf.GGUFReader.gguf_scalar_to_np[field.item_type], field.offset, (1,)
    else:
        t = next(t for t in header.tensors if t.name == tensor)
        dtype = {gguf.GGMLQuantizationType.F16: np.float16, gguf.GGMLQuantizationType.F32: np.float32}[t.tensor_type]
        offset, shape = t.offset, tuple(reversed(t.shape))  # numpy's row-major order
    data = np.memmap(bad, dtype=dtype, mode="r+", offset=offset, shape=shape)
    how(data)
    data.flush()
    del data
    return bad


def _unpermute(heads: int):
    def undo(data: np.ndarray) -> None:
        rows = data.shape[0]
        # Interleaved (GGML) back to split halves: the mistake of a converter that forgets to permute.
        data[...] = data.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(data.shape).copy()

    return undo


SWA_PATTERN = "gemma3.attention.sliding_window_pattern"
DAMAGE = {
    "wrong q/k permutation": ("llama3", "blk.0.attn_q.weight", _unpermute(4)),
    "missing bias": ("qwen2", "blk.0.attn_q.bias", lambda d: d.__setitem__(..., 0)),
    "norm not shifted by 1": ("gemma2", "blk.1.attn_norm.weight", lambda d: d.__isub__(1.0)),
    "q/k norm lost": ("olmo2", "blk.0.attn_k_norm.weight", lambda d: d.__setitem__(..., 1.0)),
    "llama3 rope scaling lost": ("llama3", "rope_freqs.weight", lambda d: d.__setitem__(..., 1.0)),
    "longrope factors lost": ("phi3_longrope", "rope_factors_long.weight", lambda d: d.__setitem__(..., 1.0)),
    "a local layer made global": ("gemma3", f"key:{SWA_PATTERN}", lambda d: d.__setitem__(..., 0)),
}


@pytest.mark.real_model
@pytest.mark.parametrize("mistake", list(DAMAGE))
def test_each_conversion_mistake_is_caught(built, f16_logits, mistake):
    arch, tensor, how = DAMAGE[mistake]
    folder = built[arch][2]
    ids, ref, good = f16_logits(arch)
    kl_good, _ = _kl(ref, good)
    kl_bad, _ = _kl(ref, _llama_logits(_damage(folder / "m-F16.gguf", tensor, how), ids))
    print(f"{mistake}: KL {kl_good:.2e} -> {kl_bad:.2e}")
    assert kl_good < F16_KL < kl_bad, (kl_good, kl_bad)


@pytest.mark.real_model
@pytest.mark.parametrize("arch", [a for a in ARCHS if _spec(a).get("streamed_forward")])
def test_streamed_forward_gives_the_resident_logits(built, arch):
    from release.forward import ResidentModel, StreamedModel

    src = built[arch][0]
    prompts = [_ids(2)[:100], _ids(3)[:17]]  # 100 > the Gemma models' 64-token sliding window
    resident = list(ResidentModel(src, "cpu").logits(prompts))
    streamed_model = StreamedModel(src, "cpu")
    try:
        streamed = list(streamed_model.logits(prompts))
    finally:
        streamed_model.close()
    for a, b in zip(resident, streamed, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())


def _config_refused(built, cli, tmp_path, arch: str, change: dict, expect: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(built[arch][0], src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    r = cli("gguf", src, "-o", tmp_path / "out", "--type", "F16")
    assert r.exit_code == 2 and expect in r.error_lines[0], r.stdout + r.stderr
    assert len(r.error_lines) <= 2 and not (tmp_path / "out").exists()


def test_what_llama_cpp_cannot_compute_is_refused(built, cli, tmp_path):
    # Gemma 2 with a query scale llama.cpp does not apply.
    _config_refused(built, cli, tmp_path / "a", "gemma2", {"query_pre_attn_scalar": 100}, "query_pre_attn_scalar")
    # A rope scaling this architecture's GGUF cannot carry.
    yarn = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}
    _config_refused(built, cli, tmp_path / "b", "olmo2", yarn, "rope scaling 'yarn' is not supported for olmo2")
    # Qwen2 with sliding-window layers.
    _config_refused(built, cli, tmp_path / "c", "qwen2", {"use_sliding_window": True}, "sliding-window")


@pytest.mark.real_model
def test_olmo2_release_builds_end_to_end(built, cli, tmp_path):
    """`build` on a non-Llama architecture (OLMo 2, the base of Fully Open Meditron's 32B):
    safetensors, GGUF with the importance matrix, GPTQ, reference, validation, cards, manifest."""
    import yaml

    src = built["olmo2"][0]
    release = {
        "release": {"name": "Tiny-OLMo2-demo", "version": "1.0", "license": "apache-2.0",
                    "repo_url": "https://huggingface.co/example/Tiny-OLMo2-demo",
                    "base_models": [{"name": "OLMo-2-1124-7B", "organization": "allenai", "license": "apache-2.0"}]},
        "source": {"path": str(src)},
        "variants": {"safetensors": {"dtype": "keep"}, "gguf": {"types": ["Q8_0", "Q4_K_M"]},
                     "gptq": {"bits": 4, "samples": 8, "seq_len": 128}},
        # A random model's top-1 flips on near-ties that a trained model does not have; KL is kept.
        "evaluation": {"thresholds": {"gguf-Q4_K_M": {"min_top1": 0.5}, "gptq-4bit": {"min_top1": 0.3}}},
    }  # fmt: skip
    (tmp_path / "release.yaml").write_text(yaml.safe_dump(release, sort_keys=False))
    r = cli("build", tmp_path / "release.yaml", "-o", tmp_path / "dist", "--jobs", "2", "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    rows = {v["variant"]: v for v in out["variants"]}
    assert set(rows) == {"keep", "Q8_0", "Q4_K_M", "gptq-4bit"}
    assert all(v.get("passed") for v in rows.values()), (rows, [s.get("message") for s in out["steps"]])
    assert rows["keep"]["kl_mean"] < 1e-9 and rows["Q8_0"]["kl_mean"] < 1e-3
    dist = Path(out["release_dir"])
    manifest = json.loads((dist / "Tiny-OLMo2-demo-GGUF" / "release-manifest.json").read_text())
    assert {f["path"] for f in manifest["files"]} >= {"Tiny-OLMo2-demo-Q8_0.gguf", "Tiny-OLMo2-demo.imatrix"}
    q4 = dist / "Tiny-OLMo2-demo-GGUF" / "Tiny-OLMo2-demo-Q4_K_M.gguf"
    assert gguf.GGUFReader(q4).get_field("general.architecture").contents() == "olmo2"
    from release.agreement import gguf_license

    assert gguf_license(q4) == "apache-2.0"  # what manifest checked: llama.cpp's file keeps the key up front
    assert "olmo2" in (dist / "Tiny-OLMo2-demo" / "README.md").read_text().lower()


@pytest.mark.real_model
@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gemma3", "apertus"])
def test_gptq_4bit_loads_in_transformers(built, arch, tmp_path):
    """GPTQModel's own definition of each family (Llama and OLMo 2 go through its Llama one, tested
    on SmolLM2 and in the OLMo 2 build): 4-bit quantizes, loads in transformers and computes the model."""
    from release.formats.gptq import GPTQSettings, quantize
    from release.forward import ResidentModel

    src, model, _ = built[arch]
    quantize(src, tmp_path / "gptq", GPTQSettings(bits=4, samples=4, seq_len=64))
    ids = _ids(4)[:64]
    got = next(iter(ResidentModel(tmp_path / "gptq", "cpu", quantized=True).logits([ids])))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    kl, _ = _kl(ref, got)
    print(f"{arch}: GPTQ 4-bit KL {kl:.2e}")
    assert torch.isfinite(got).all() and kl < 0.1, kl


def test_gptq_refused_for_phi3_with_the_reason(built, cli, tmp_path):
    r = cli("gptq", built["phi3"][0], "-o", tmp_path / "out")
    assert r.exit_code == 2 and "GPTQ is not available for phi3" in r.error_lines[0], r.stderr
    assert len(r.error_lines) <= 2 and not (tmp_path / "out").exists()


# ---- tokenizers of the SentencePiece families, and an unknown BPE pre-tokenizer --------------

SPM_TEXTS = [
    "The patient was admitted with acute myocardial infarction.",
    "Dose: 75 mg daily, 1234 units; café naïve 東京 🦙",
    "  two leading spaces and\ttabs\nnewline",
    "aspirin",
]


def _train_spm(folder: Path, *, dummy_prefix: bool) -> Path:
    """A SentencePiece BPE model with byte fallback, as Gemma (no dummy prefix) and Phi-3 / Llama 2
    (dummy prefix) train theirs."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = ["the", "patient", "was", "admitted", "with", "acute", "myocardial", "infarction", "aspirin", "dose"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 9999)}." for _ in range(2000)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=2, eos_id=1, pad_id=-1,
        add_dummy_prefix=dummy_prefix, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, minloglevel=2,
    )  # fmt: skip
    return folder / "tokenizer.model"


@pytest.mark.parametrize(("arch", "dummy_prefix"), [("gemma2", False), ("phi3", True)])
def test_sentencepiece_families_tokenize_like_sentencepiece(tmp_path, arch, dummy_prefix):
    """Gemma's tokenizer.model has no dummy prefix, and its GGUF says so (add_space_prefix false, as
    llama.cpp's converter writes for Gemma); Phi-3's is Llama 2's kind. llama.cpp must give
    SentencePiece's own ids for both."""
    import sentencepiece
    from llama_cpp import Llama

    model = _train_spm(tmp_path / "spm", dummy_prefix=dummy_prefix)
    src = tmp_path / "src"
    # Phi-3 adds its chat tokens after the pieces (<|assistant|> ... at 32000+ of 32064 rows): here
    # two, past the 400 pieces, in added_tokens.json and tokenizer_config.json as Phi-3 ships them.
    make_model(arch, 404).to(torch.bfloat16).save_pretrained(src)
    shutil.copyfile(model, src / "tokenizer.model")
    added = {"<|assistant|>": 400, "<|end|>": 401}
    (src / "added_tokens.json").write_text(json.dumps(added))
    decoder = {str(i): {"content": t, "special": True} for t, i in added.items()}
    (src / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    write_gguf(src, tmp_path / "out", ["F16"], name="spm")
    r = gguf.GGUFReader(tmp_path / "out" / "spm-F16.gguf")
    assert r.get_field("tokenizer.ggml.model").contents() == "llama"
    if not dummy_prefix:
        assert r.get_field("tokenizer.ggml.add_space_prefix").contents() is False
    m = Llama(model_path=str(tmp_path / "out" / "spm-F16.gguf"), vocab_only=True, verbose=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    for text in SPM_TEXTS:
        assert m.tokenize(text.encode(), add_bos=False, special=True) == sp.encode(text), text
        tagged = f"<|assistant|>{text}<|end|>"
        assert m.tokenize(tagged.encode(), add_bos=False, special=True) == [400, *sp.encode(text), 401], text


def test_unknown_bpe_pre_tokenizer_is_refused_with_its_hash(tmp_path, cli):
    """A byte-level BPE tokenizer llama.cpp has no pre-tokenizer for (trained here) would tokenize
    differently in the GGUF: refused, naming the check hash and where to add it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the patient was admitted with acute myocardial infarction"] * 50, trainer)
    src = tmp_path / "src"
    make_model("qwen2", 300).to(torch.bfloat16).save_pretrained(src)
    tok.save(str(src / "tokenizer.json"))
    r = cli("gguf", src, "-o", tmp_path / "out", "--type", "F16")
    assert r.exit_code == 2, r.stdout + r.stderr
    assert "llama.cpp has no pre-tokenizer for this BPE tokenizer (check hash" in r.error_lines[0]
    assert "bpe_pre_tokenizers.json" in r.stderr and not (tmp_path / "out").exists()


def test_mistral_sliding_window_is_warned_about(tmp_path, smollm2):
    """llama.cpp runs Mistral as llama, without its sliding window: said in the result, not hidden."""
    src = save(make_model("mistral", VOCAB, sliding_window=64), tmp_path / "src", smollm2.hf)
    result = write_gguf(src, tmp_path / "out", ["F16"], name="m")
    assert any("sliding_window is 64 tokens" in w for w in result.warnings), result.warnings


def test_build_refuses_gptq_for_phi3_before_any_step(built, cli, tmp_path):
    import yaml

    release = {
        "release": {"name": "Tiny-Phi3", "version": "1.0", "license": "mit",
                    "repo_url": "https://huggingface.co/example/Tiny-Phi3",
                    "base_models": [{"name": "Phi-3-mini-4k-instruct", "organization": "microsoft", "license": "mit",
                                     "copyright": "Copyright (c) Microsoft Corporation."}]},
        "source": {"path": str(built["phi3"][0])},
        "variants": {"safetensors": {"dtype": "keep"}, "gguf": {"types": ["Q8_0"]}, "gptq": {"bits": 4}},
    }  # fmt: skip
    (tmp_path / "release.yaml").write_text(yaml.safe_dump(release, sort_keys=False))
    r = cli("build", tmp_path / "release.yaml", "-o", tmp_path / "dist")
    assert r.exit_code == 2 and "GPTQ is not available for phi3" in r.error_lines[0], r.stderr
    assert "release.yaml:" in r.error_lines[0] and not (tmp_path / "dist").exists()


def test_every_gguf_type_for_gemma3(tmp_path):
    """Every type the project writes, on the family with the most particulars (shifted norms,
    q/k norms, local and global layers, tied head), with a 400-token SentencePiece vocabulary so
    that llama.cpp's quantizers spend their time on the layers: each file loads in llama.cpp and
    computes the model (mean KL over 64 tokens, loose limits: a random model is not a trained
    one), the IQ types with the importance matrix collected from the source. (Llama: every type
    on SmolLM2, test_gguf.py.)"""
    from release.formats.gguf import gguf_types

    model = make_model("gemma3", 404)  # transformers' GemmaTokenizer adds 4 special tokens to the 400
    src = tmp_path / "src"
    model.to(torch.bfloat16).save_pretrained(src)
    model.float()
    shutil.copyfile(_train_spm(tmp_path / "spm", dummy_prefix=False), src / "tokenizer.model")
    types = list(gguf_types())
    result = write_gguf(src, tmp_path / "out", types, name="m")
    assert [o.type for o in result.outputs] == types and result.imatrix is not None
    ids = [int(i) % 390 + 5 for i in _ids(5)[:64]]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    kls = {o.type: _kl(ref, _llama_logits(tmp_path / "out" / o.file, ids))[0] for o in result.outputs}
    print({t: f"{kl:.1e}" for t, kl in kls.items()})
    assert kls["F32"] < 1e-5 and kls["F16"] < F16_KL and kls["Q8_0"] < 1e-3, kls
    assert all(kl < 0.5 for kl in kls.values()), kls


def test_tokenizer_ids_past_the_embeddings_are_refused(tmp_path, cli):
    """transformers' GemmaTokenizer adds 4 special tokens after a 400-piece SentencePiece model; a
    400-row model cannot embed them. The forward pass (here the importance matrix's) says so in
    one line instead of failing inside torch."""
    src = tmp_path / "src"
    make_model("gemma3", 400).to(torch.bfloat16).save_pretrained(src)
    shutil.copyfile(_train_spm(tmp_path / "spm", dummy_prefix=False), src / "tokenizer.model")
    r = cli("imatrix", src, "-o", tmp_path / "m.imatrix")
    assert r.exit_code == 2, r.stdout + r.stderr
    assert len(r.error_lines) == 1, r.error_lines
    assert "tokenizer gives token id 40" in r.error_lines[0] and "vocab_size is 400" in r.error_lines[0]
