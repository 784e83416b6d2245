"""Importance matrices on the real SmolLM2 model: collected in transformers' float32 forward,
written in llama.cpp's imatrix format, used by llama.cpp's quantizer, and worth it (lower KL)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from release.cards import choose_section, kv_cache_bytes
from release.errors import BadInputError
from release.formats import imatrix as imf
from release.formats.gguf import write_gguf
from release.validation.validate import validate
from tests.conftest import leftovers

CHUNKS = 4  # 4 x 512 tokens of the built-in calibration text: enough to beat no imatrix on SmolLM2
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def collected(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("imatrix") / "smol.imatrix"
    result = imf.collect_to_file(smollm2.hf, out, chunks=CHUNKS, forward="resident")
    return result, out


@pytest.mark.real_model
def test_file_is_llama_cpps_format_with_its_names_and_shapes(collected):
    result, path = collected
    r = gguf.GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields  # llama.cpp's imatrix files have none
    assert r.fields["imatrix.datasets"].contents() == ["model-release:default.jsonl"]
    assert r.fields["imatrix.chunk_count"].contents() == CHUNKS
    assert r.fields["imatrix.chunk_size"].contents() == 512
    # Names as llama.cpp's graph calls the weights (gguf's own tensor-name table), 30 blocks x 7.
    names = {f"blk.{i}.{k}.weight" for i in range(30) for k in KINDS}
    assert {t.name for t in r.tensors} == {f"{n}.{s}" for n in names for s in ("in_sum2", "counts")}
    for t in r.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        width = 1536 if ".ffn_down." in t.name else 576  # input columns; ggml order [ne0, ne1]
        expected = [width, 1] if t.name.endswith(".in_sum2") else [1, 1]
        assert t.shape.tolist() == expected, t.name
        if t.name.endswith(".counts"):
            assert float(t.data.reshape(-1)[0]) == CHUNKS * 512
    assert result.entries == 210 and result.tokens == CHUNKS * 512


@pytest.mark.real_model
def test_first_layers_sums_equal_an_independent_computation(collected, smollm2):
    """blk.0's q/k/v read the first RMS norm of the embeddings: recompute that by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from release.calibration import build_calibration

    _, path = collected
    im = imf.read(path)
    tok = AutoTokenizer.from_pretrained(smollm2.hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2.hf, dtype=torch.float32).eval()
    windows = build_calibration(None, tok, seq_len=512, samples=CHUNKS, warn=[]).windows
    with torch.no_grad():
        x = model.model.embed_tokens(torch.tensor(windows))
        w = model.model.layers[0].input_layernorm.weight
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps) * w
        expected = normed.reshape(-1, 576).double().pow(2).sum(0).numpy()
    for k in ("attn_q", "attn_k", "attn_v"):
        got = im.sums[f"blk.0.{k}.weight"]
        np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert im.counts["blk.0.attn_q.weight"] == CHUNKS * 512
    assert not np.allclose(im.sums["blk.0.attn_q.weight"], im.sums["blk.1.attn_q.weight"])


@pytest.mark.real_model
def test_same_text_and_seed_give_the_same_bytes_resident_or_streamed(collected, smollm2, tmp_path):
    _, path = collected
    again = imf.collect_to_file(smollm2.hf, tmp_path / "b.imatrix", chunks=CHUNKS, forward="streamed")
    assert again.forward == "streamed"
    assert (tmp_path / "b.imatrix").read_bytes() == path.read_bytes()
    other = imf.collect_to_file(smollm2.hf, tmp_path / "c.imatrix", chunks=CHUNKS, seed=1, forward="resident")
    assert other.entries == 210 and (tmp_path / "c.imatrix").read_bytes() != path.read_bytes()


@pytest.fixture(scope="module")
def quantized(collected, smollm2, smollm2_reference, tmp_path_factory):
    """Q4_K_M, Q3_K_M and Q2_K with and without the imatrix, plus IQ2_XS with it; validated."""
    _, im = collected
    base = tmp_path_factory.mktemp("quantized")
    types = ["Q4_K_M", "Q3_K_M", "Q2_K"]
    with_im = write_gguf(smollm2.hf, base / "with", [*types, "IQ2_XS"], name="m", imatrix=str(im))
    without = write_gguf(smollm2.hf, base / "none", types, name="m", imatrix="none")
    files = [base / "with" / o.file for o in with_im.outputs] + [base / "none" / o.file for o in without.outputs]
    report = validate(files, smollm2_reference.path)
    return with_im, without, {f"{Path(v.variant).parent.name}/{v.kind}": v for v in report.variants}


@pytest.mark.real_model
def test_imatrix_lowers_kl_and_the_file_records_it(quantized):
    with_im, without, results = quantized
    for t in ("Q4_K_M", "Q3_K_M", "Q2_K"):
        a, b = results[f"with/gguf-{t}"], results[f"none/gguf-{t}"]
        assert a.metrics["kl_mean"] < b.metrics["kl_mean"], (t, a.metrics["kl_mean"], b.metrics["kl_mean"])
        assert a.passed and b.passed, (a.failures, b.failures)
        assert a.quantization["imatrix.file"] == "smol.imatrix"
        assert a.quantization["imatrix.dataset"] == "model-release:default.jsonl"
        assert b.quantization == {}
    out = {o.type: o for o in with_im.outputs}["Q4_K_M"]
    assert out.imatrix == {"file": "smol.imatrix", "dataset": "model-release:default.jsonl",
                           "entries_count": 210, "chunks_count": CHUNKS}  # fmt: skip
    assert all(o.imatrix is None for o in without.outputs)


@pytest.mark.real_model
def test_iq2_with_imatrix_passes_its_thresholds_and_without_is_refused(quantized, smollm2, cli, tmp_path):
    _, _, results = quantized
    iq2 = results["with/gguf-IQ2_XS"]
    assert iq2.passed, iq2.failures
    assert iq2.metrics["kl_mean"] > results["with/gguf-Q2_K"].metrics["kl_mean"]  # 2.3 bits lose more than Q2_K
    out = tmp_path / "out"
    r = cli("gguf", smollm2.hf, "-o", out, "-t", "Q8_0", "-t", "IQ2_XS", "--imatrix", "none")
    assert r.exit_code == 2 and "IQ2_XS needs an importance matrix" in r.error_lines[0]
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.real_model
def test_an_imatrix_of_another_model_is_refused_before_writing(collected, smollm2, tmp_path):
    _, path = collected
    im = imf.read(path)
    im.sums["blk.3.ffn_down.weight"] = im.sums["blk.3.ffn_down.weight"][:512]
    bad = imf.write(tmp_path / "other.imatrix", im)
    with pytest.raises(BadInputError, match=r"blk\.3\.ffn_down\.weight has 512 columns in the imatrix, 1536"):
        write_gguf(smollm2.hf, tmp_path / "out", ["Q4_K_M"], imatrix=str(bad))
    assert not (tmp_path / "out").exists()
    (tmp_path / "not.imatrix").write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(BadInputError, match="not an imatrix"):
        write_gguf(smollm2.hf, tmp_path / "out", ["Q4_K_M"], imatrix=str(tmp_path / "not.imatrix"))


def test_collect_refuses_an_existing_output_before_the_slow_part(tmp_path):
    (tmp_path / "x.imatrix").write_text("keep")
    with pytest.raises(BadInputError, match="exists"):
        imf.collect_to_file(tmp_path / "no-model", tmp_path / "x.imatrix")
    assert (tmp_path / "x.imatrix").read_text() == "keep"


def test_which_file_to_choose_picks_the_lowest_kl_that_fits():
    config = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096}
    kv = kv_cache_bytes(config)
    assert kv == 2 * 32 * 8 * 128 * 4096 * 2  # f16 keys and values, 4096 tokens
    gb = 1e9

    def row(method: str, size: float, kl: float, ok: bool = True) -> dict:
        return {"method": method, "set_bytes": int(size * gb), "kl_mean": kl, "top1": 0.9, "validated": ok}

    rows = [row("Q8_0", 8.5, 0.002), row("Q4_K_M", 4.9, 0.03), row("IQ2_XS", 2.3, 0.4), row("Q2_K", 3.0, 0.9, False)]
    text = choose_section(rows, config)
    lines = [line for line in text.splitlines() if line.startswith("| ") and "GB" in line and "memory" not in line]
    # needs: IQ2_XS 2.3 + 0.54 = 2.84 GB (+1 spare: fits 4 GB); Q4_K_M 5.44 (fits 8); Q8_0 9.04 (fits 12)
    assert [line.split(" | ")[:2] for line in lines] == [
        ["| 4 to 8 GB", "IQ2_XS"],
        ["| 8 to 12 GB", "Q4_K_M"],
        ["| 12 GB or more", "Q8_0"],
    ]
    assert "Q2_K" not in text  # failed validation: never recommended
    assert "Lowest KL: **Q8_0**" in text and "Smallest file that passed validation: **IQ2_XS**" in text
    assert choose_section([row("Q2_K", 3.0, 0.9, False)], config) == ""
