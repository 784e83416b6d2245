"""GGUF variants, checked by the real client (llama.cpp through llama-cpp-python) on SmolLM2-135M.

The reference is the HF model run by transformers in float32 on the same token ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from release.formats.gguf import write_gguf
from release.inspect import describe
from release.metadata import BaseModel, ReleaseMetadata
from release.validation.runtimes import llama_threads
from tests.conftest import leftovers

# Prompts for logits: plain, medical, code, French, numbers.
PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "Hypertension is defined as a systolic blood pressure above 140 mmHg; first-line treatment includes",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Les symptômes de la grippe incluent la fièvre, la toux et",
    "In 2023, 17.5% of 1,024 patients (mean age 63.2 ± 8.1 years) received 2.5 mg/kg of",
]
# Texts for tokenization: medical terms, numbers, unicode, whitespace, code, special tokens.
TEXTS = [
    "Myocardial infarction, pheochromocytoma and acetylsalicylic acid (ASA) 81 mg.",
    # (Not vulgar fractions such as " ¾": llama.cpp's smollm pre-tokenizer counts them as digits and
    # splits them from the space, HF keeps " " with the first byte. A llama.cpp difference, not ours.)
    "3.14159 2,718 1e-9 0x1F 100000000000 -42 $1,299.99 50%",
    "naïve café résumé Ærøskøbing Straße 東京 Москва العربية 🦙🚀 👩‍⚕️",
    "  leading spaces\ttabs\t\tand\n\nnewlines   \n trailing   ",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment",
    "",
    " ",
]
ALL_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q5_1", "Q6_K", "Q5_K_M", "Q4_K_M"]
# Mean KL(HF || GGUF) over every position of PROMPTS. Measured 2026-11-26: F16 4e-6, BF16 0.00075,
# Q8_0 0.0054, Q6_K 0.042, Q4_K_M 0.082, Q5_K_M 0.152, Q5_1 0.272, Q4_0 0.611 (a 135M model with
# 576-wide rows, where llama.cpp's k-quant mixes fall back to Q5_0/Q5_1/Q8_0 for most tensors).
# 2026-12-06, the k-quants with the 4-chunk imatrix of `written`: Q6_K 0.042, Q5_K_M 0.096, Q4_K_M 0.057.
KL_LIMITS = {
    "F16": 1e-4,
    "BF16": 2e-3,
    "Q8_0": 0.01,
    "Q6_K": 0.07,
    "Q4_K_M": 0.15,
    "Q5_K_M": 0.25,
    "Q5_1": 0.45,
    "Q4_0": 1.0,
}

META = ReleaseMetadata(
    name="SmolLM2-135M-Instruct",
    version="1.0",
    license="apache-2.0",
    base_models=(BaseModel.from_repo("HuggingFaceTB/SmolLM2-135M"),),
    repo_url="https://huggingface.co/example/SmolLM2-135M-Instruct-GGUF",
    quantized_by="model-release tests",
)


def llama(path: Path, **kw):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, **llama_threads(), **kw)


def kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    p = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    q = torch.log_softmax(torch.from_numpy(got).double(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return kl, top1, float(np.abs(ref - got).max())


@pytest.fixture(scope="module")
def hf(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2.hf, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def reference(hf):
    tok, model = hf
    out = []
    for text in PROMPTS:
        ids = tok.encode(text, add_special_tokens=False)
        with torch.no_grad():
            out.append((ids, model(torch.tensor([ids])).logits[0].numpy()))
    return out


@pytest.fixture(scope="module")
def written(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    # The imatrix on 4 chunks of the calibration text, as the demo release collects it: the whole text
    # (10 chunks) cost 25 s of CPU here; the k-quants stay far inside their KL limits below.
    result = write_gguf(smollm2.hf, out, ALL_TYPES, metadata=META, imatrix_chunks=4)
    return result, out


@pytest.mark.real_model
def test_every_type_written_once_with_the_expected_file_names(written):
    result, out = written
    assert sorted(o.type for o in result.outputs) == sorted(ALL_TYPES)
    # The k-quants were made with an importance matrix collected from the source (--imatrix auto), shipped beside them.
    names = [f"SmolLM2-135M-Instruct-{t}.gguf" for t in ALL_TYPES] + ["SmolLM2-135M-Instruct.imatrix"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert result.imatrix is not None and result.imatrix["entries"] == 210 and result.imatrix["chunks"] == 4
    by_type = {o.type: o for o in result.outputs}
    # SmolLM2 rows are 576 wide (not a multiple of 256): llama.cpp falls back, and we say so.
    assert by_type["Q4_K_M"].fallbacks and "576" in by_type["Q4_K_M"].fallbacks[0]
    assert by_type["F16"].fallbacks == []
    assert by_type["F16"].tensor_types == {"F16": 211, "F32": 61}


@pytest.mark.real_model
def test_f16_logits_match_transformers(written, reference):
    _, out = written
    m = llama(out / "SmolLM2-135M-Instruct-F16.gguf")
    for ids, ref in reference:
        m.reset()
        m.eval(ids)
        got = np.array(m.scores[: len(ids)])
        kl, top1, maxdiff = kl_top1(ref, got)
        assert top1 >= 0.95, (top1, ids[:5])
        assert maxdiff < 0.1, maxdiff
        assert kl < KL_LIMITS["F16"], kl


@pytest.mark.real_model
@pytest.mark.parametrize("gtype", [t for t in ALL_TYPES if t != "F16"])
def test_quantized_types_stay_close(written, reference, gtype):
    _, out = written
    m = llama(out / f"SmolLM2-135M-Instruct-{gtype}.gguf")
    kls, top1s = [], []
    for ids, ref in reference:
        m.reset()
        m.eval(ids)
        kl, top1, _ = kl_top1(ref, np.array(m.scores[: len(ids)]))
        kls.append(kl)
        top1s.append(top1)
    kl = float(np.mean(kls))
    print(f"{gtype}: mean KL {kl:.5f}, top-1 agreement {np.mean(top1s):.3f}")
    assert kl < KL_LIMITS[gtype], kl
    assert np.mean(top1s) >= 0.6


@pytest.mark.real_model
def test_damaged_variant_is_far_from_the_reference(written, reference, tmp_path):
    """The measure used above must see damage: zero one attention matrix and KL jumps."""
    _, out = written
    src = out / "SmolLM2-135M-Instruct-F16.gguf"
    bad = tmp_path / "bad.gguf"
    shutil.copyfile(src, bad)
    reader = gguf.GGUFReader(src)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight")
    with open(bad, "r+b") as f:
        f.seek(t.data_offset)
        f.write(b"\0" * t.n_bytes)
    m = llama(bad)
    ids, ref = reference[0]
    m.eval(ids)
    kl, _, _ = kl_top1(ref, np.array(m.scores[: len(ids)]))
    assert kl > 100 * KL_LIMITS["F16"]


@pytest.mark.real_model
def test_llama_cpp_tokenizes_like_transformers(written, hf):
    tok, _ = hf
    _, out = written
    m = llama(out / "SmolLM2-135M-Instruct-Q4_K_M.gguf", vocab_only=True)
    for text in TEXTS:
        want = tok.encode(text, add_special_tokens=False)
        got = m.tokenize(text.encode(), add_bos=False, special=True)
        assert got == want, text
        assert m.detokenize(got, special=True).decode("utf-8", errors="replace") == tok.decode(want), text
    assert m.token_bos() == tok.bos_token_id
    assert m.token_eos() == tok.eos_token_id


@pytest.mark.real_model
def test_chat_template_survives(written, hf):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tok, _ = hf
    _, out = written
    m = llama(out / "SmolLM2-135M-Instruct-Q8_0.gguf", vocab_only=True)
    template = m.metadata["tokenizer.chat_template"]
    assert template == tok.chat_template
    messages = [{"role": "system", "content": "You are a careful clinician."}, {"role": "user", "content": "Hi"}]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fmt = Jinja2ChatFormatter(template, eos_token=tok.eos_token, bos_token=tok.bos_token, add_generation_prompt=True)
    assert fmt(messages=messages).prompt == want


@pytest.mark.real_model
def test_header_reader_agrees_with_gguf_py(written, tmp_path):
    """release.formats.gguf_header (the quantize step's and the intermediate check's reader) gives
    gguf-py's keys, values, tensor table and data offset, on our own F16 file and llama.cpp's Q4_K_M;
    a file cut inside its vocabulary or without the magic is refused."""
    from release.formats.gguf_header import ArrayField, read_header

    _, out = written
    for name in ("SmolLM2-135M-Instruct-F16.gguf", "SmolLM2-135M-Instruct-Q4_K_M.gguf"):
        r, h = gguf.GGUFReader(out / name), read_header(out / name)
        assert list(h.fields) == [k for k in r.fields if not k.startswith("GGUF.")]
        for k in h.fields:
            assert h.value(k) == r.fields[k].contents(), (name, k)
            assert h.value_types[k] == r.fields[k].types[0], (name, k)
            if isinstance(h.fields[k], ArrayField):  # its stored bytes: gguf-py's parts after the count
                assert h.fields[k].raw() == b"".join(bytes(p) for p in r.fields[k].parts[5:]), (name, k)
        assert isinstance(h.fields["tokenizer.ggml.tokens"], ArrayField)
        assert [(t.name, t.shape, t.tensor_type, t.offset, t.n_elements) for t in h.tensors] == [
            (t.name, tuple(int(d) for d in t.shape), t.tensor_type, int(t.data_offset), int(t.n_elements))
            for t in r.tensors
        ]
        assert h.data_offset == r.data_offset
    f16 = out / "SmolLM2-135M-Instruct-F16.gguf"
    whole = f16.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[: read_header(f16).data_offset // 2])  # inside the vocabulary
    with pytest.raises(ValueError, match="past the end"):
        read_header(tmp_path / "cut.gguf")
    (tmp_path / "not.gguf").write_bytes(b"GGML" + whole[4:4096])
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_header(tmp_path / "not.gguf")


@pytest.mark.real_model
def test_metadata_reads_back(written, smollm2):
    """Every type's file, as llama.cpp reads it (its own GGUF parser, vocabulary only, 0.3 s a
    file), carries the release's metadata; one file is read again with gguf-py for the types of
    the values (gguf-py parses the 49k-token vocabulary element by element: 3-7 s a file)."""
    from llama_cpp import Llama

    result, out = written
    config = json.loads((smollm2.hf / "config.json").read_text())
    source_hash = describe(smollm2.hf, with_hash=True)["checkpoint_hash"]
    assert result.source_checkpoint_hash == source_hash
    expected = {
        "general.architecture": "llama",
        "general.name": "SmolLM2-135M-Instruct",
        "general.version": "1.0",
        "general.license": "apache-2.0",
        "general.license.name": "Apache License 2.0",
        "general.license.link": "https://www.apache.org/licenses/LICENSE-2.0",
        "general.base_model.count": 1,
        "general.base_model.0.name": "SmolLM2-135M",
        "general.base_model.0.organization": "HuggingFaceTB",
        "general.base_model.0.repo_url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M",
        "general.repo_url": META.repo_url,
        "general.quantized_by": "model-release tests",
        "model_release.source_checkpoint_hash": source_hash,
        "llama.block_count": config["num_hidden_layers"],
        "llama.embedding_length": config["hidden_size"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": config["bos_token_id"],
    }
    floats = {"llama.rope.freq_base": config["rope_parameters"]["rope_theta"],
              "llama.attention.layer_norm_rms_epsilon": config["rms_norm_eps"]}  # fmt: skip
    for o in result.outputs:
        m = Llama(model_path=str(out / o.file), vocab_only=True, verbose=False)
        try:
            md, n_vocab = dict(m.metadata), m.n_vocab()
        finally:
            m.close()
        want = {**expected, "general.file_type": gguf.LlamaFileType[f"MOSTLY_{o.type}"].value}
        assert {k: md.get(k) for k in want} == {k: str(v) for k, v in want.items()}, o.type
        for k, v in floats.items():
            assert float(md[k]) == pytest.approx(v), (o.type, k)
        assert n_vocab == config["vocab_size"], o.type
    r = gguf.GGUFReader(out / "SmolLM2-135M-Instruct-Q4_K_M.gguf")

    def val(key: str):
        field = r.get_field(key)
        assert field is not None, key
        return field.contents()

    for k, v in {**expected, "general.file_type": gguf.LlamaFileType.MOSTLY_Q4_K_M.value}.items():
        assert val(k) == v and type(val(k)) is type(v), k
    for k, v in floats.items():
        assert val(k) == pytest.approx(v), k
    assert len(val("tokenizer.ggml.tokens")) == config["vocab_size"]
    shown = describe(out / "SmolLM2-135M-Instruct-Q4_K_M.gguf")
    assert shown["metadata"]["model_release.source_checkpoint_hash"] == source_hash
    assert shown["license"]["general.license"] == "apache-2.0"


@pytest.mark.real_model
def test_generation_in_llama_cpp(written):
    _, out = written
    m = llama(out / "SmolLM2-135M-Instruct-Q8_0.gguf")
    text = m("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"]
    assert "Paris" in text


# ---- bad input: one clear error, exit 2, nothing at the output path ----------------------------


def _with_tokenizer(src: Path, smollm2) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(smollm2.hf / name, src / name)
    return src


@pytest.mark.real_model
def test_tiny_model_rope_permutation_matches_transformers(tiny, smollm2, tmp_path):
    """Grouped-query attention (4 heads, 2 KV heads): the q/k row permutation must be right."""
    src, cfg, state = tiny("st-single", vocab_size=49152, dtype=torch.float32)
    _with_tokenizer(src, smollm2)
    write_gguf(src, tmp_path / "out", ["F32"], name="tiny")
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "torch_dtype"}))
    model.load_state_dict(state)
    ids = [1, 504, 3458, 282, 4649, 314, 2, 30, 12345]
    with torch.no_grad():
        ref = model.eval()(torch.tensor([ids])).logits[0].numpy()
    m = llama(tmp_path / "out" / "tiny-F32.gguf")
    m.eval(ids)
    _, top1, maxdiff = kl_top1(ref, np.array(m.scores[: len(ids)]))
    assert maxdiff < 1e-3 and top1 == 1.0, (maxdiff, top1)


def test_unknown_type_is_refused(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single")
    r = cli("gguf", src, "-o", tmp_path / "out", "--type", "Q4_K_X")
    assert r.exit_code == 2
    assert r.error_lines[0].startswith("error: unknown GGUF type 'Q4_K_X' (known: F32, F16")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_is_refused(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single", tokenizer=False)
    out = tmp_path / "out"
    r = cli("gguf", src, "-o", out, "--type", "F16")
    assert r.exit_code == 2
    assert "no tokenizer" in r.error_lines[0] and len(r.error_lines) == 1
    assert not out.exists()


def test_non_llama_architecture_is_refused(tiny, cli, tmp_path):
    src, cfg, _ = tiny("st-single")
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    r = cli("gguf", src, "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "unknown architecture GPT2LMHeadModel" in r.error_lines[0]


@pytest.mark.real_model
def test_tokenizer_larger_than_embeddings_is_refused(tiny, smollm2, cli, tmp_path):
    src, _, _ = tiny("st-single")  # vocab_size 256 against SmolLM2's 49152 tokens
    _with_tokenizer(src, smollm2)
    out = tmp_path / "out"
    r = cli("gguf", src, "-o", out, "--type", "Q8_0")
    assert r.exit_code == 2
    assert "does not fit the tokenizer" in r.error_lines[0]
    assert not out.exists()


@pytest.mark.real_model
def test_nan_weights_refused_and_nothing_left(tiny, smollm2, cli, tmp_path):
    src, _, state = tiny("st-single", vocab_size=49152)
    state["model.layers.1.mlp.up_proj.weight"][3, 3] = float("nan")
    from safetensors.torch import save_file

    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    _with_tokenizer(src, smollm2)
    out = tmp_path / "out"
    r = cli("gguf", src, "-o", out, "--type", "F16", "--type", "Q4_K_M")
    assert r.exit_code == 2
    assert "model.layers.1.mlp.up_proj.weight holds NaN/Inf" in r.error_lines[0]
    assert not out.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.real_model
def test_imatrix_chunks_limit_the_collected_text_and_apply_only_to_auto(tiny, smollm2, cli, tmp_path):
    src, _, _ = tiny("st-single", vocab_size=49152)
    _with_tokenizer(src, smollm2)
    r = cli("gguf", src, "-o", tmp_path / "out", "-t", "Q4_K_M", "--imatrix-chunks", "2", "--json")
    assert r.exit_code == 0, r.stderr
    im = json.loads(r.stdout)["imatrix"]
    assert im["chunks"] == 2 and gguf.GGUFReader(im["path"]).fields["imatrix.chunk_count"].contents() == 2
    out = tmp_path / "none"
    r = cli("gguf", src, "-o", out, "-t", "Q4_K_M", "--imatrix", "none", "--imatrix-chunks", "2")
    assert r.exit_code == 2 and "--imatrix-chunks" in r.error_lines[0] and "--imatrix none" in r.error_lines[0]
    assert not out.exists()


@pytest.mark.real_model
def test_existing_output_needs_force(tiny, smollm2, cli, tmp_path):
    src, _, _ = tiny("st-single", vocab_size=49152)
    _with_tokenizer(src, smollm2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m-F16.gguf").write_text("keep me")
    r = cli("gguf", src, "-o", out, "--type", "F16", "--name", "m")
    assert r.exit_code == 2 and "--force" in r.error_lines[0]
    assert (out / "m-F16.gguf").read_text() == "keep me"
    r = cli("gguf", src, "-o", out, "--type", "F16", "--name", "m", "--force", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["outputs"][0]["file"] == "m-F16.gguf"
    assert (out / "m-F16.gguf").read_bytes()[:4] == b"GGUF"


@pytest.mark.real_model
def test_a_corrupted_write_is_caught(tiny, smollm2, cli, tmp_path, monkeypatch):
    from release.formats import gguf as gguf_format

    src, _, _ = tiny("st-single", vocab_size=49152)
    _with_tokenizer(src, smollm2)
    real_finish = gguf_format.GGUFFile.finish

    def finish_then_flip(self, source_hash):
        real_finish(self, source_hash)
        start, _ = self.offsets["blk.1.ffn_up.weight"]
        with open(self.path, "r+b") as f:
            f.seek(start)
            b = f.read(1)[0]
            f.seek(start)
            f.write(bytes([b ^ 0x40]))

    monkeypatch.setattr(gguf_format.GGUFFile, "finish", finish_then_flip)
    out = tmp_path / "out"
    r = cli("gguf", src, "-o", out, "--type", "Q8_0")
    assert r.exit_code == 1
    assert "blk.1.ffn_up.weight on disk differs" in r.error_lines[0]
    assert not out.exists()


def test_unknown_license_is_refused(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single")
    r = cli("gguf", src, "-o", tmp_path / "out", "--license", "wtfpl-9")
    assert r.exit_code == 2
    assert "unknown license 'wtfpl-9'" in r.error_lines[0]


# ---- SentencePiece (Llama 2 style) tokenizers ------------------------------------------------

SPM_TEXTS = [
    "The patient was admitted with acute myocardial infarction.",
    "Dose: 75 mg daily, 1234 units; café naïve 東京 🦙",
    "  two leading spaces and\ttabs\nnewline",
    "",
]


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory) -> Path:
    """A real SentencePiece BPE model (byte fallback, split digits: Llama 2's settings), trained here."""
    import random

    import sentencepiece as spm

    base = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = [
        "the",
        "patient",
        "was",
        "admitted",
        "with",
        "acute",
        "myocardial",
        "infarction",
        "aspirin",
        "dose",
        "mg",
        "kg",
        "daily",
        "units",
        "fever",
    ]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 9999)}." for _ in range(3000)]
    (base / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(base / "corpus.txt"), model_prefix=str(base / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        minloglevel=2,
    )  # fmt: skip
    return base / "tokenizer.model"


@pytest.mark.parametrize("files", ["tokenizer.model", "tokenizer.json"])
def test_sentencepiece_tokenizers_tokenize_like_transformers(tiny, tmp_path, spm_tokenizer, files):
    """Llama 2 ships tokenizer.model (SentencePiece); Llama-style fast tokenizers ship tokenizer.json
    with byte fallback. Both must tokenize in llama.cpp as SentencePiece itself does, BOS included,
    and as transformers does, except for text that starts with a space, where transformers' fast
    conversion drops one (SentencePiece and llama.cpp keep it)."""
    import sentencepiece
    from transformers import AutoTokenizer

    src, _, _ = tiny("st-single", vocab_size=400, tokenizer=False)
    shutil.copyfile(spm_tokenizer, src / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False}  # fmt: skip
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    hf_tok = AutoTokenizer.from_pretrained(src)
    if files == "tokenizer.json":
        hf_tok.save_pretrained(src)
        (src / "tokenizer.model").unlink()
    write_gguf(src, tmp_path / "out", ["F16"], name="spm")
    r = gguf.GGUFReader(tmp_path / "out" / "spm-F16.gguf")
    assert r.get_field("tokenizer.ggml.model").contents() == "llama"
    assert r.get_field("tokenizer.ggml.add_bos_token").contents() is True
    m = llama(tmp_path / "out" / "spm-F16.gguf", vocab_only=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_tokenizer))
    # Plus texts that exercise many merge orders (equal-score merges once went wrong here).
    rng = np.random.default_rng(1)
    letters = list("abcdefghijklmnopqrstuvwxyz      ")
    extra = ["".join(rng.choice(letters, size=60)) for _ in range(30)]
    for text in SPM_TEXTS + extra:
        got = m.tokenize(text.encode(), add_bos=True, special=True)
        assert got == [sp.bos_id(), *sp.encode(text)], text
        if not text.startswith(" "):
            assert got == hf_tok.encode(text), text


@pytest.mark.real_model
def test_several_types_read_the_source_once(tiny, smollm2, tmp_path, monkeypatch):
    """F16, Q8_0 and three k-quant mixes from one run: each source tensor is opened exactly once."""
    from release.checkpoint import Checkpoint

    src, _, state = tiny("st-single", vocab_size=49152, hidden_size=256, intermediate_size=512)
    _with_tokenizer(src, smollm2)
    opened: list[str] = []
    real_open = Checkpoint.open

    def counting_open(self, ref):
        opened.append(ref.name)
        return real_open(self, ref)

    monkeypatch.setattr(Checkpoint, "open", counting_open)
    types = ["F16", "Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K"]
    result = write_gguf(src, tmp_path / "out", types, name="tiny", imatrix="none")  # the pass itself
    assert sorted(opened) == sorted(state)  # every tensor once, none twice
    assert [o.type for o in result.outputs] == types
    for o in result.outputs:
        m = llama(tmp_path / "out" / o.file)
        m.eval([1, 2, 3, 4])
        assert np.isfinite(np.array(m.scores[:4])).all(), o.type
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"tiny-{t}.gguf" for t in types)


@pytest.mark.real_model
def test_a_kquant_from_a_given_intermediate_is_the_same_file(written, smollm2, tmp_path, monkeypatch):
    """A build quantizes its k-quant types from one shared lossless GGUF (--intermediate): the result
    is the file the one-type run makes from its own intermediate, byte for byte, and no source tensor
    is read for it."""
    from release.checkpoint import Checkpoint

    _, out = written
    opened: list[str] = []
    real_open = Checkpoint.open
    monkeypatch.setattr(Checkpoint, "open", lambda self, ref: opened.append(ref.name) or real_open(self, ref))
    imatrix = str(out / "SmolLM2-135M-Instruct.imatrix")
    got = write_gguf(smollm2.hf, tmp_path, ["Q4_K_M"], metadata=META, imatrix=imatrix,
                     intermediate=out / "SmolLM2-135M-Instruct-BF16.gguf")  # fmt: skip
    name = "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    assert opened == [] and got.source_checkpoint_hash.startswith("blake3:")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # the intermediate is not copied or removed


@pytest.mark.real_model
def test_a_wrong_intermediate_is_refused(tiny, smollm2, cli, tmp_path):
    """Not this source's lossless type, other tensors, or other metadata (llama.cpp copies its keys into
    every output): one line, exit 2, nothing written."""
    src, _, _ = tiny("st-single", vocab_size=49152)
    _with_tokenizer(src, smollm2)
    made = tmp_path / "made"
    r = cli("gguf", src, "-o", made, "-t", "BF16", "-t", "F16", "--name", "m", "--version", "1.0")
    assert r.exit_code == 0, r.stderr
    other, _, _ = tiny("st-sharded", vocab_size=49152, num_hidden_layers=3)
    _with_tokenizer(other, smollm2)
    assert cli("gguf", other, "-o", made / "o", "-t", "BF16", "--name", "m", "--version", "1.0").exit_code == 0
    cases = {
        "m-F16.gguf": ("1.0", "is not BF16, the lossless type of this source"),
        "o/m-BF16.gguf": ("1.0", "holds other tensors than this source"),
        "m-BF16.gguf": ("2.0", "was written with general.version='1.0', this run says '2.0'"),
    }
    for inter, (version, says) in cases.items():
        out = tmp_path / "out"
        r = cli("gguf", src, "-o", out, "-t", "Q4_K_M", "--imatrix", "none", "--name", "m", "--version", version,
                "--intermediate", made / inter)  # fmt: skip
        assert r.exit_code == 2 and says in r.error_lines[0], (inter, r.stderr)
        assert not out.exists()
    r = cli("gguf", src, "-o", tmp_path / "ok", "-t", "Q4_K_M", "--imatrix", "none", "--name", "m", "--version", "1.0",
            "--intermediate", made / "m-BF16.gguf")  # fmt: skip
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_ggml_quantizer_gives_the_gguf_packages_bytes(smollm2, qtype):
    """The writer quantizes through ggml's C ``ggml_quantize_chunk`` (threaded); the bytes must be
    those of the ``gguf`` package's numpy quantizer, on the real model's tensors and on edge cases
    (zero blocks, a row that is one block, rows not a multiple of the chunk)."""
    from safetensors import safe_open

    from release.formats import gguf_quants

    assert gguf_quants.available()
    q = gguf.GGMLQuantizationType[qtype]
    with safe_open(str(smollm2.hf / "model.safetensors"), framework="pt") as f:
        cases = [f.get_tensor("model.layers.3.mlp.down_proj.weight"), f.get_tensor("model.embed_tokens.weight")[:999]]
    edge = torch.randn(1001, 64) * 3
    edge[5] = 0
    edge[7, :32] = 1e-30
    cases += [edge.to(torch.bfloat16), torch.randn(3, 32).to(torch.float16)]
    for t in cases:
        ours = gguf_quants.quantize(t, q, threads=2)
        theirs = gguf.quants.quantize(t.to(torch.float32).numpy(), q)
        assert ours is not None and ours.shape == theirs.shape and np.array_equal(ours, theirs)
    assert gguf_quants.quantize(torch.randn(4, 48), q) is None  # not whole blocks: the caller falls back
