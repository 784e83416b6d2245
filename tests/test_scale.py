"""The seed's sizes: the streamed (one layer at a time) forward pass gives the resident path's
numbers, catches a damaged variant, and holds one layer instead of the model; plans that cannot fit
are refused before work starts; a step killed by a signal is reported as such; GGUF split sets.

Tolerance, streamed vs resident on the CPU: 0 (bit-identical), measured on SmolLM2 for the built-in
set, with the head in one piece and in 5 vocabulary chunks. Both paths run the same transformers
modules on the same tensors of the same shapes in the same order (a prompt at a time); only *when*
each layer's weights arrive differs, and float32 summation order is fixed by the kernel and shape.
Splitting the head by vocabulary rows changes the GEMM's N, not the order of each dot product."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from release.errors import BadInputError
from release.validation.runtimes import llama_threads
from tests.conftest import leftovers, tiny_config, tiny_state, write_folder

pytestmark = pytest.mark.real_model


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_streamed_reference_equals_resident(smollm2, smollm2_reference, tmp_path):
    from release.validation.reference import build_reference

    res = build_reference(smollm2.hf, tmp_path / "streamed.safetensors", forward="streamed")
    assert res.forward == "streamed" and smollm2_reference.meta["source_checkpoint_hash"] == res.source_checkpoint_hash
    a, b = _tensors(smollm2_reference.path), _tensors(tmp_path / "streamed.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k].double() - b[k].double()).abs().max()}"


def test_streamed_head_in_vocabulary_chunks_equals_resident(smollm2):
    from transformers import AutoTokenizer

    from release.forward import ResidentModel, StreamedModel

    tok = AutoTokenizer.from_pretrained(smollm2.hf)
    prompts = [tok.encode("Metformin is a first-line treatment for type 2 diabetes."), tok.encode("def f(x):")]
    resident = list(ResidentModel(smollm2.hf, "cpu").logits(prompts))
    streamed = StreamedModel(smollm2.hf, "cpu")
    streamed.head_chunk = 10_000  # 49152 rows -> 5 chunks
    try:
        chunked = list(streamed.logits(prompts))
    finally:
        streamed.close()
    for r, c in zip(resident, chunked, strict=True):
        assert r.shape == c.shape == (len(r), 49152)
        assert torch.equal(r, c)


def test_streamed_validation_catches_a_damaged_layer(smollm2, smollm2_reference, tmp_path, cli):
    """One MLP matrix of one layer scaled by 1.25 in an otherwise exact copy: the streamed runtime
    must see it (the lossless threshold is KL 1e-9, exact top-1)."""
    copy = tmp_path / "damaged"
    shutil.copytree(smollm2.hf, copy)
    state = load_file(str(copy / "model.safetensors"))
    with safe_open(str(copy / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    state["model.layers.17.mlp.down_proj.weight"] = state["model.layers.17.mlp.down_proj.weight"] * 1.25
    save_file(state, str(copy / "model.safetensors"), metadata=meta)
    r = cli("validate", copy, "-r", smollm2_reference.path, "--forward", "streamed", "--json")
    assert r.exit_code == 1, r.stdout
    out = json.loads(r.stdout)
    v = out["variants"][0]
    assert v["forward"] == "streamed" and not v["passed"]
    assert any("mean KL" in f for f in v["failures"]) and v["metrics"]["kl_mean"] > 1e-4
    # Reports elsewhere: beside the folder would be inside the cached fixture, which then fails its
    # hash check and is rebuilt (33 s) by the next test that asks for it.
    ok = cli("validate", smollm2.hf, "-r", smollm2_reference.path, "--forward", "streamed",
             "--reports-dir", tmp_path / "reports", "--json")  # fmt: skip
    assert ok.exit_code == 0 and json.loads(ok.stdout)["variants"][0]["metrics"]["kl_mean"] == 0.0


def _peak_rss(*args: object) -> int:
    """Peak RSS (bytes) of one CLI run in a child process: its VmHWM, sampled while it runs (the
    test process's own few GB would otherwise be counted: see ``resources.vm_hwm``)."""
    from release.resources import vm_hwm

    proc = subprocess.Popen(
        [sys.executable, "-c", "from release.cli import main; main()", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, vm_hwm(proc.pid))
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:] if proc.stderr else proc.returncode
    return peak


def test_streamed_memory_is_one_layer_not_the_model(tmp_path, smollm2):
    """A model whose float32 weights (~0.6 GB) dwarf one layer (~50 MB): the streamed reference
    peaks far below the resident one."""
    cfg = tiny_config(hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=8,
                      num_hidden_layers=10, vocab_size=49152, max_position_embeddings=1024)  # fmt: skip
    src = write_folder(tmp_path / "wide", cfg, tiny_state(cfg), "st-single", tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smollm2.hf / name, src / name)
    fp32 = sum(t.numel() for t in load_file(str(src / "model.safetensors")).values()) * 4
    # One 64-token prompt: the weights, not the tokens, are what the two forwards hold differently
    # (the built-in set's 12 prompts cost 15 s of CPU per run on this 0.27B model).
    prompts = tmp_path / "one.jsonl"
    prompts.write_text(json.dumps({"id": "p", "text": "The patient was admitted with chest pain and " * 20}) + "\n")
    flags = ("--prompts", prompts, "--max-tokens", "64")
    resident = _peak_rss("reference", src, "-o", tmp_path / "r.st", "--forward", "resident", *flags)
    streamed = _peak_rss("reference", src, "-o", tmp_path / "s.st", "--forward", "streamed", *flags)
    assert resident - streamed > 0.6 * fp32, (resident / 1e6, streamed / 1e6, fp32 / 1e6)
    a, b = _tensors(tmp_path / "r.st"), _tensors(tmp_path / "s.st")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_build_refuses_a_plan_that_does_not_fit(tmp_path, cli, monkeypatch):
    from tests.conftest import demo_release_file as _release_file

    rf = _release_file(tmp_path / "release.yaml", gguf={"types": ["Q8_0"]})
    monkeypatch.setattr("release.resources.mem_available", lambda: 300 << 20)
    r = cli("build", rf, "-o", tmp_path / "dist", "--json")
    assert r.exit_code == 2
    msg = json.loads(r.stdout)["message"]
    assert msg.startswith("convert needs about") and "of memory; 315 MB is available" in msg
    assert not (tmp_path / "dist").exists()  # refused before anything was written
    monkeypatch.setattr("release.resources.mem_available", lambda: 64 << 30)
    monkeypatch.setattr("release.resources.disk_free", lambda _p: 100 << 20)
    r = cli("build", rf, "-o", tmp_path / "dist", "--json")
    assert r.exit_code == 2
    assert "of disk; 105 MB is free" in json.loads(r.stdout)["message"]


def test_forward_mode_follows_free_memory(smollm2, monkeypatch):
    from release import forward

    assert forward.choose(smollm2.hf, "cpu", "auto", 512).mode == "resident"
    # Resident: 0.54 GB of float32 weights + 0.8 GB of process + ~0.5 GB of logits at 512 tokens,
    # which 80% of 2 GB does not hold; streamed (one 7 MB layer) does.
    monkeypatch.setattr(forward, "mem_available", lambda: 2 << 30)
    choice = forward.choose(smollm2.hf, "cpu", "auto", 512)
    assert choice.mode == "streamed" and "does not fit" in choice.reason
    monkeypatch.setattr(forward, "mem_available", lambda: 100 << 20)
    with pytest.raises(BadInputError, match=r"streamed forward pass needs about .* RAM; 105 MB RAM available"):
        forward.choose(smollm2.hf, "cpu", "auto", 512)


def test_step_threads_follow_omp_num_threads(monkeypatch):
    """A step's thread count (llama.cpp's quantizer, the ggml quantizer's threads) is what
    OMP_NUM_THREADS says (a test worker sharing the machine, a Ray task's CPU request), else the
    CPUs this process may run on."""
    import os

    from release.resources import cpu_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert cpu_threads() == len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads() == len(os.sched_getaffinity(0))


def test_gptq_cpu_workers_follow_the_steps_threads_not_the_nodes_cores(monkeypatch):
    """GPTQModel's CPU worker pool: the step's thread budget (at least the 2 it needs to start), not
    every core of a large node; a value the user set is kept."""
    import os

    from release.formats.gptq import prepare_gptqmodel

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    for threads, workers in (("8", "8"), ("1", "2")):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        monkeypatch.delenv("GPTQMODEL_CPU_WORKERS", raising=False)
        prepare_gptqmodel()
        assert os.environ["GPTQMODEL_CPU_WORKERS"] == workers
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "5")
    prepare_gptqmodel()
    assert os.environ["GPTQMODEL_CPU_WORKERS"] == "5"


def test_gptq_validation_that_cannot_fit_is_refused(smollm2_gptq, smollm2_reference, cli, monkeypatch):
    monkeypatch.setattr("release.resources.mem_available", lambda: 500 << 20)
    r = cli("validate", smollm2_gptq.output, "-r", smollm2_reference.path, "--json")
    assert r.exit_code == 2
    msg = json.loads(r.stdout)["message"]
    assert "validating this GPTQ model needs about" in msg and "524 MB RAM available" in msg
    r = cli("validate", smollm2_gptq.output, "-r", smollm2_reference.path, "--device", "cuda", "--json")
    assert r.exit_code == 2 and "no CUDA device" in json.loads(r.stdout)["message"]


def test_a_killed_step_is_reported_as_killed_with_its_peak(tmp_path):
    from release.pipeline.local import failure_message, reap
    from release.resources import vm_hwm

    hog = (
        "import os, time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); "
        "time.sleep(0.5); os.kill(os.getpid(), 9)"
    )
    proc = subprocess.Popen([sys.executable, "-c", hog])
    peak, done = 0, None
    while done is None:  # as the build does: VmHWM sampled while it runs, reaped with wait4
        peak = max(peak, vm_hwm(proc.pid))
        time.sleep(0.05)
        done = reap(proc)
    assert proc.returncode == -signal.SIGKILL and 300 << 20 < peak < 1 << 30
    log = tmp_path / "step.log"
    log.write_text("error: the real cause\nW1128 torch/utils/_pytree.py:630] ... is deprecated\n")
    msg = failure_message(proc.returncode, {}, log, 41.2, peak)
    assert msg.startswith("killed by signal 9 (SIGKILL) (out of memory?) after 41 s; peak 3")
    assert msg.endswith(" MB")
    # A step that exits with an error: its own error line, not the library warning printed after it.
    assert failure_message(2, {}, log, 1, 0).startswith("error: the real cause (exit 2; log: ")
    assert failure_message(2, {"message": "from --json"}, log, 1, 0) == "from --json"


def test_gguf_split_set_loads_in_llama_cpp_as_one_variant(smollm2, smollm2_reference, tmp_path, cli):
    from llama_cpp import Llama

    r = cli("gguf", smollm2.hf, "-o", tmp_path / "one", "-t", "Q8_0", "--name", "m", "--json")
    assert r.exit_code == 0, r.stdout
    r = cli("gguf", smollm2.hf, "-o", tmp_path / "split", "-t", "Q8_0", "--name", "m",
            "--split-max-size", "60MB", "--json")  # fmt: skip
    assert r.exit_code == 0, r.stdout
    out = json.loads(r.stdout)["outputs"][0]
    parts = sorted((tmp_path / "split").glob("*.gguf"))
    assert [p.name for p in parts] == [f"m-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)] == out["parts"]
    assert all(p.stat().st_size <= 60_000_000 for p in parts)
    assert out["bytes"] == sum(p.stat().st_size for p in parts)
    single = gguf.GGUFReader(tmp_path / "one" / "m-Q8_0.gguf")
    seen = {}
    readers = [gguf.GGUFReader(p) for p in parts]  # gguf-py, the independent reader, once a part
    for i, rd in enumerate(readers):
        assert rd.fields["split.no"].contents() == i and rd.fields["split.count"].contents() == 3
        assert rd.fields["split.tensors.count"].contents() == len(single.tensors)
        seen |= {t.name: bytes(t.data) for t in rd.tensors}
    assert seen == {t.name: bytes(t.data) for t in single.tensors}
    assert set(single.fields) <= set(readers[0].fields)  # all metadata (vocabulary included) in the first part
    for rd in readers[1:]:
        assert {k for k in rd.fields if not k.startswith("GGUF.")} <= {"split.no", "split.count", "split.tensors.count"}
    ids = [1, 504, 3458, 282, 4649, 314]
    kw = {"logits_all": True, "verbose": False, "n_ctx": 64, **llama_threads()}
    a = Llama(model_path=str(parts[0]), **kw)
    b = Llama(model_path=str(tmp_path / "one" / "m-Q8_0.gguf"), **kw)
    a.eval(ids)
    b.eval(ids)
    assert (a.scores[: len(ids)] == b.scores[: len(ids)]).all()
    a.close()
    b.close()
    # Validation names the set, not a part, and writes one report for it.
    r = cli("validate", tmp_path / "split" / "m-Q8_0.gguf", "-r", smollm2_reference.path, "--json")
    assert r.exit_code == 0, r.stdout
    assert (tmp_path / "split" / "m-Q8_0.validation.json").is_file()
    assert not list((tmp_path / "split").glob("*-of-*.validation.json"))
    # Replacing a split set with a single file (--force) leaves no stale parts.
    r = cli("gguf", smollm2.hf, "-o", tmp_path / "split", "-t", "Q8_0", "--name", "m", "--force", "--json")
    assert r.exit_code == 0 and sorted(p.name for p in (tmp_path / "split").glob("*.gguf")) == ["m-Q8_0.gguf"]
    assert not leftovers(tmp_path)


def test_build_without_a_repository_is_refused_before_work(tmp_path, cli):
    """Found at 7B: the manifest step failed after 12 minutes of building for want of repo_url."""
    import yaml

    from tests.conftest import demo_release_file as _release_file

    rf = _release_file(tmp_path / "release.yaml", gguf={"types": ["Q8_0"]})
    data = yaml.safe_load(rf.read_text())
    del data["release"]["repo_url"]
    rf.write_text(yaml.safe_dump(data, sort_keys=False))
    r = cli("build", rf, "-o", tmp_path / "dist", "--json")
    assert r.exit_code == 2 and "release.repo_url must name the Hub repository" in json.loads(r.stdout)["message"]
    assert not (tmp_path / "dist").exists()
