"""GPTQ on the real SmolLM2 model: standard layout, clean configs, provenance, loads and generates in
transformers on the CPU, beats round-to-nearest at the same bits and group size, and validation
catches a checkpoint whose group order is wrong. Bad input is refused before any quantization."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from release.calibration import build_calibration
from release.formats.gptq import GPTQSettings, quantize
from release.metadata import ReleaseMetadata
from tests.conftest import leftovers, run_subprocess

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def made(smollm2, smollm2_reference, smollm2_gptq, tmp_path_factory):
    """One GPTQ (built-in calibration, 12 windows of 256 tokens) and its round-to-nearest control."""
    base = tmp_path_factory.mktemp("rtn")
    meta = ReleaseMetadata(name="SmolLM2-135M-Instruct", version="1.0", license="apache-2.0")
    rtn = quantize(smollm2.hf, base / "rtn", GPTQSettings(method="rtn"), metadata=meta)
    return {"gptq": smollm2_gptq, "rtn": rtn, "ref": smollm2_reference, "base": base}


@pytest.mark.real_model
def test_standard_layout_clean_configs_and_provenance(made, smollm2):
    out = Path(made["gptq"].output)
    qc = json.loads((out / "quantize_config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    # SmolLM2's 576-wide rows: auto picks the largest group size that divides them.
    assert 576 % qc["group_size"] == 0 and qc["group_size"] == 64 and made["gptq"].variant == "gptq-4bit-g64"
    assert cfg["quantization_config"]["quant_method"] == "gptq" and cfg["quantization_config"]["bits"] == 4
    assert qc["checkpoint_format"] == "gptq" and qc["desc_act"] is False and qc["sym"] is True
    for text in ((out / "quantize_config.json").read_text(), (out / "config.json").read_text()):
        assert "offload_to_disk_path" not in text and "/tmp" not in text
    assert any(q.startswith("gptqmodel:") for q in qc["meta"]["quantizer"])
    assert any(q.startswith("model-release:") for q in qc["meta"]["quantizer"])
    assert qc["meta"]["calibration"]["samples"] == 12 and qc["meta"]["calibration"]["seq_len"] == 256
    assert not (out / "quant_log.csv").exists()
    # Tokenizer, chat template and generation config are the source's, byte for byte.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (smollm2.hf / name).read_bytes(), name
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta, names = f.metadata(), set(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in names}
    # Calibrated in float32 on the CPU, written as a GPU build writes it: the unquantized weights
    # (embeddings, norms) in the source's dtype, float16 scales, int32 packed weights.
    source_dtype = json.loads((smollm2.hf / "config.json").read_text())["dtype"]
    assert source_dtype == "bfloat16" and cfg["dtype"] == source_dtype
    kinds = {(k.rsplit(".", 1)[-1], d) for k, d in dtypes.items()}
    assert kinds == {("weight", "BF16"), ("scales", "F16"), ("qweight", "I32"), ("qzeros", "I32"), ("g_idx", "I32")}
    assert meta["source_checkpoint_hash"] == made["ref"].meta["source_checkpoint_hash"]
    assert meta["license"] == "apache-2.0" and meta["quantization"] == "gptq-4bit-g64"
    for layer in range(30):
        for lin in LINEARS:
            prefix = f"model.layers.{layer}.{'self_attn' if lin[0] in 'qkvo' else 'mlp'}.{lin}"
            assert {f"{prefix}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")} <= names, prefix


@pytest.mark.real_model
def test_loads_in_transformers_on_cpu_and_generates(made, smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from release.formats.gptq import import_gptqmodel

    import_gptqmodel()  # what transformers uses to run GPTQ
    out = made["gptq"].output
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids["input_ids"].shape[1] :])


@pytest.mark.real_model
def test_loads_in_gptqmodel_itself(made, smollm2):
    """GPTQModel (what AutoGPTQ users moved to) loads the released folder as it is and generates."""
    from transformers import AutoTokenizer

    from release.capture import capture_fd
    from release.formats.gptq import import_gptqmodel

    gptqmodel = import_gptqmodel()
    tok = AutoTokenizer.from_pretrained(made["gptq"].output)
    with capture_fd(1):
        model = gptqmodel.GPTQModel.load(made["gptq"].output, device="cpu")
        ids = tok("The capital of France is", return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert model.quantize_config.bits == 4 and model.quantize_config.group_size == 64
    assert "Paris" in tok.decode(gen[0, ids["input_ids"].shape[1] :])


@pytest.mark.real_model
def test_gptq_beats_round_to_nearest_and_passes_validation(made, cli):
    r = cli("validate", made["gptq"].output, "-r", made["ref"].path, "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    g = json.loads(r.stdout)["variants"][0]
    assert g["kind"] == "gptq-4bit" and g["runtime"] == "transformers" and g["passed"]
    r = cli("validate", made["rtn"].output, "-r", made["ref"].path, "--max-kl", "100", "--min-top1", "0", "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    n = json.loads(r.stdout)["variants"][0]
    print(f"GPTQ KL {g['metrics']['kl_mean']:.4f} top-1 {g['metrics']['top1_agreement']:.3f}; "
          f"RTN KL {n['metrics']['kl_mean']:.4f} top-1 {n['metrics']['top1_agreement']:.3f}")  # fmt: skip
    # The point of GPTQ: clearly closer to the source than rounding the same weights to the same grid.
    assert g["metrics"]["kl_mean"] < 0.7 * n["metrics"]["kl_mean"]
    assert g["metrics"]["top1_agreement"] > n["metrics"]["top1_agreement"]


@pytest.mark.real_model
def test_wrong_group_order_is_caught(made, cli, tmp_path):
    """Each column's g_idx says which group's scale and zero it uses. A checkpoint whose group order
    was lost (shuffled g_idx, as when act-order is applied twice or not at all) must fail validation."""
    bad = tmp_path / "wrong-order"
    shutil.copytree(made["gptq"].output, bad)
    shard = bad / "model.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    gen = torch.Generator().manual_seed(0)
    for name in [k for k in state if k.endswith(".g_idx")]:
        g = state[name]
        state[name] = g[torch.randperm(g.numel(), generator=gen)].contiguous()  # same groups, wrong columns
    save_file(state, str(shard), metadata=meta)
    for conf in ("config.json", "quantize_config.json"):  # act-order: kernels must follow g_idx
        data = json.loads((bad / conf).read_text())
        (data.get("quantization_config") or data)["desc_act"] = True
        (bad / conf).write_text(json.dumps(data))
    r = cli("validate", bad, "-r", made["ref"].path, "--json")
    assert r.exit_code == 1, r.stdout + r.stderr
    v = json.loads(r.stdout)["variants"][0]
    assert not v["passed"] and any(f.startswith("mean KL") for f in v["failures"])
    assert "wrong-order (gptq-4bit) failed" in r.error_lines[-1]


# --- bad input: refused before any quantization, nothing left at OUT ---------------------------


def _refused(r, out: Path, *needles: str) -> None:
    assert r.exit_code == 2, r.stdout + r.stderr
    assert len(r.error_lines) == 1 and r.error_lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in r.error_lines[0], r.error_lines[0]
    assert not out.exists() and not leftovers(out.parent)


def test_non_llama_model_is_refused(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    _refused(cli("gptq", src, "-o", tmp_path / "out"), tmp_path / "out", "GPT2LMHeadModel")


@pytest.mark.real_model
def test_group_size_that_does_not_divide_the_rows_is_refused(smollm2, cli, tmp_path):
    r = cli("gptq", smollm2.hf, "-o", tmp_path / "out", "--group-size", "128")
    _refused(r, tmp_path / "out", "--group-size 128", "576")
    assert "64" in r.error_lines[0]  # a size that fits (576 = 9 x 64) is named


@pytest.mark.real_model
def test_empty_or_short_calibration_is_refused(smollm2, cli, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    _refused(cli("gptq", smollm2.hf, "-o", tmp_path / "o1", "--calibration", empty), tmp_path / "o1", "no calibration")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "A short note about aspirin."}) + "\n")
    r = cli("gptq", smollm2.hf, "-o", tmp_path / "o2", "--calibration", short, "--seq-len", "256")
    _refused(r, tmp_path / "o2", "fewer than one window of 256")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    _refused(cli("gptq", smollm2.hf, "-o", tmp_path / "o3", "--calibration", bad), tmp_path / "o3", "bad.jsonl:2")


@pytest.mark.real_model
def test_calibration_windows_are_deterministic_per_seed(smollm2, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.hf)
    a = build_calibration(None, tok, seq_len=128, samples=10, seed=1, warn=[])
    b = build_calibration(None, tok, seq_len=128, samples=10, seed=1, warn=[])
    c = build_calibration(None, tok, seq_len=128, samples=10, seed=2, warn=[])
    assert a.windows == b.windows and a.windows != c.windows
    assert len(a.windows) == 10 and all(len(w) == 128 for w in a.windows)
    # Windows are cut from the documents' tokens: every window is a slice of the joined stream.
    stream = []
    for line in (Path(__file__).parents[1] / "release/data/calibration/default.jsonl").read_text().splitlines():
        stream += [*tok.encode(json.loads(line)["text"], add_special_tokens=False), tok.eos_token_id]
    starts = {tuple(stream[i : i + 128]) for i in range(0, len(stream) - 127, 128)}
    assert all(tuple(w) in starts for w in a.windows)


@pytest.mark.real_model
def test_same_seed_gives_the_same_checkpoint(tiny, smollm2, tmp_path):
    """Quantizing twice with one seed writes identical weights (a tiny model with SmolLM2's tokenizer)."""
    src, _, _ = tiny("st-single", vocab_size=49152, hidden_size=64, intermediate_size=128)
    for n in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2.hf / n, src / n)
    s = GPTQSettings(samples=4, seq_len=64, seed=3)
    one = quantize(src, tmp_path / "one", s)
    two = quantize(src, tmp_path / "two", s)
    assert (Path(one.output) / "model.safetensors").read_bytes() == (
        Path(two.output) / "model.safetensors"
    ).read_bytes()
    assert one.variant == "gptq-4bit-g64" and one.source_checkpoint_hash == two.source_checkpoint_hash


def test_gptqmodel_writes_no_logs_into_the_working_directory(smollm2_gptq):
    """GPTQModel 7.7 writes ./logs/gptq_log_*.log relative to the working directory; the gptq command
    points it into its temporary folder (a stray log once landed in the repository)."""
    assert smollm2_gptq.output and Path(smollm2_gptq.output).is_dir()
    assert not (Path.cwd() / "logs").exists(), sorted(p.name for p in (Path.cwd() / "logs").iterdir())


@pytest.mark.real_model
def test_kernels_builds_every_kernel_a_gptq_build_compiles_and_names_a_failed_build(smollm2_gptq, cli, tmp_path):
    """`kernels` builds ahead what GPTQModel compiles on first use. After the demo build (a GPTQ step
    and its validation), every kernel in GPTQModel's cache is one `kernels` builds, so a build after
    `kernels` compiles nothing; a compiler that fails is named, with exit code 1."""
    from gptqmodel.utils.cpu_features import has_avx512_bf16

    r = cli("kernels", "--device", "cpu", "--json")  # in-process: this worker has GPTQModel imported
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    status = {k["name"]: k["status"] for k in out["kernels"]}
    assert out["ok"] and status["pack_block_cpu"] == "ready"
    assert status["int4_qzero_group_scaled_cpu"] == ("ready" if has_avx512_bf16() else "unused")
    compiled = {p.parent.parent.name for p in Path(out["cache"]).glob("*/*/*.so")}
    assert "pack_block_cpu" in compiled
    ready = {n for n, s in status.items() if s == "ready"}
    assert compiled <= ready, f"a GPTQ build compiled {compiled - ready}, which `kernels` does not build"

    # A fresh process: one that has loaded a kernel keeps it, whatever the cache folder says.
    env = {"GPTQMODEL_TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "CXX": "/bin/false"}
    r = run_subprocess("kernels", "--device", "cpu", env=env)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0].split()[:2] == ["pack_block_cpu", "failed"] and "/bin/false" in lines[0]
