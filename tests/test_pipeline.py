"""`model-release build`: the SmolLM2 release end to end (safetensors, GGUF, GPTQ, validation,
cards, manifest, signature), a rerun that does nothing, a build killed during a GGUF step that
resumes to the same outputs, one changed GGUF type rebuilding only what depends on it, and bad
release files refused before any heavy work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from release.pipeline import STEPS_DIR
from tests.conftest import DEMO, ROOT, gone_within, one_step_build
from tests.conftest import demo_release_file as _release_file

NAME = DEMO


def _records(dist: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (dist / STEPS_DIR).glob("*.json")}


def _build(cli, release: Path, out: Path, *extra: object):
    r = cli("build", release, "-o", out, "--json", *extra)
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


@pytest.fixture
def full(demo_release):
    """The session's demo release: every variant family, built once with two parallel jobs."""
    d = demo_release
    return {"rf": d.rf, "base": d.base, "out": d.out, "pub": d.pub, "priv": d.priv, "seconds": d.seconds}


@pytest.mark.real_model
def test_builds_the_whole_release(full, cli):
    out = full["out"]
    dist = Path(out["release_dir"])
    assert dist == full["base"] / "dist" / f"{NAME}-1.0"
    assert {s["status"] for s in out["steps"]} == {"done"}
    names = [s["name"] for s in out["steps"]]
    assert names[:2] == ["convert", "reference"] and names[-3:] == ["card", "manifest", "sign"]
    assert {"gguf-Q8_0", "gguf-Q4_K_M", "gptq", "validate-gptq", "validate-gguf-Q4_K_M"} <= set(names)
    rows = {(v["family"], v["variant"]): v for v in out["variants"]}
    assert set(rows) == {("safetensors", "keep"), ("gguf", "Q8_0"), ("gguf", "Q4_K_M"), ("gptq", "gptq-4bit")}
    assert all(v["passed"] and v["bytes"] > 0 and v["kl_mean"] is not None for v in rows.values())
    assert rows[("safetensors", "keep")]["kl_mean"] < 1e-9
    folders = {p.name for p in dist.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert folders == {NAME, f"{NAME}-GGUF", f"{NAME}-GPTQ"}
    # Each report once, where it is published: inside the folders (GGUF: beside each file), none
    # at the release root.
    assert sorted(p.name for p in dist.iterdir() if not p.name.startswith(".")) == sorted([*folders, "release.yaml"])
    for f in (NAME, f"{NAME}-GPTQ"):
        assert {"validation.json", "validation.md", "validation.kl.png"} <= {p.name for p in (dist / f).iterdir()}
        assert f"![KL per token, {f}](validation.kl.png)" in (dist / f / "README.md").read_text()
    assert (dist / f"{NAME}-GGUF" / f"{NAME}-Q8_0.kl.png").is_file()
    # Q4_K_M was quantized with the importance matrix the imatrix step collected; it ships, hashed.
    assert "imatrix" in names and names.index("imatrix") < names.index("gguf-Q4_K_M")
    gguf_manifest = json.loads((dist / f"{NAME}-GGUF" / "release-manifest.json").read_text())
    files = {f["path"]: f for f in gguf_manifest["files"]}
    assert files[f"{NAME}.imatrix"]["format"] == "imatrix" and files[f"{NAME}.imatrix"]["variant"] is None
    card = (dist / f"{NAME}-GGUF" / "README.md").read_text()
    q4_row = next(line for line in card.splitlines() if line.startswith(f"| {NAME}-Q4_K_M.gguf"))
    q8_row = next(line for line in card.splitlines() if line.startswith(f"| {NAME}-Q8_0.gguf"))
    assert q4_row.endswith("| yes: default.jsonl, 4 chunks |") and q8_row.endswith("| no |")
    assert "Tokenizer: every file was checked to tokenize 12 probes" in card  # validation's tokenizer check
    assert "## Which file should I choose?" in card and "![Per-token KL of every file](kl-comparison.png)" in card
    assert "kl-comparison.png" in files
    # card, manifest and sign shared one sha256 per file: the build's cache holds every weight file,
    # each digest the manifest's (and the signature, checked below, verifies).
    cache = json.loads((dist / ".work" / "sha256.json").read_text())
    for path, f in files.items():
        if f["size"] >= 1 << 20:
            assert cache[str(dist / f"{NAME}-GGUF" / path)][2] == f["sha256"], path
    for f in folders:
        manifest = json.loads((dist / f / "release-manifest.json").read_text())
        assert all(v and v["passed"] for v in manifest["variants"].values())
        assert manifest["name"] == NAME, f  # the GGUF folder's once said reference-logits.safetensors
        assert (dist / f / "README.md").is_file() and (dist / f / "release.sig").is_file()
    r = cli("verify", dist, "--public-key", full["pub"])
    assert r.exit_code == 0, r.stdout + r.stderr
    print(f"full build: {full['seconds']:.0f} s")


@pytest.mark.real_model
def test_rerun_after_success_does_nothing(full, cli):
    dist = Path(full["out"]["release_dir"])
    before = _records(dist)
    r, out = _build(cli, full["rf"], full["base"] / "dist", "--key", full["priv"])
    assert r.exit_code == 0, r.stdout + r.stderr
    assert {s["status"] for s in out["steps"]} == {"skipped"}
    assert _records(dist) == before  # no step record rewritten
    assert out["seconds"] < 30


@pytest.mark.real_model
def test_dry_run_prints_each_steps_needs_and_fate_and_writes_nothing(full, cli, tmp_path):
    """`build --dry-run`: on the built release every step is up to date (the removed shared intermediate
    is not needed); on a new folder every step would run; each with its needs; nothing written."""
    dist = full["base"] / "dist"
    files = {p: p.stat().st_mtime_ns for p in dist.rglob("*")}
    r = cli("build", full["rf"], "-o", dist, "--key", full["priv"], "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    fate = {s["name"]: s["status"] for s in plan["steps"]}
    assert plan["dry_run"] and list(fate) == [s["name"] for s in full["out"]["steps"]]
    assert fate.pop("lossless-gguf") == "not needed" and set(fate.values()) == {"up to date"}
    steps = {s["name"]: s for s in plan["steps"]}
    assert steps["gguf-Q4_K_M"]["after"] == ["convert", "imatrix", "lossless-gguf"]
    assert all(s["ram"] > 0 and s["threads"] == plan["threads"] for s in plan["steps"])
    assert steps["convert"]["disk"] > steps["gguf-Q4_K_M"]["disk"] > 0
    assert {p: p.stat().st_mtime_ns for p in dist.rglob("*")} == files  # nothing written or touched

    r = cli("build", full["rf"], "-o", tmp_path / "new", "--key", full["priv"], "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert {s["status"] for s in json.loads(r.stdout)["steps"]} == {"to run"}  # the intermediate too
    assert not (tmp_path / "new").exists()


@pytest.mark.real_model
def test_killed_during_gguf_resumes_to_the_same_outputs(full, cli, tmp_path):
    # The importance matrix is the full build's, given as a file (no imatrix step here): Q4_K_M
    # must then come out byte for byte as in the uninterrupted build.
    full_dist = Path(full["out"]["release_dir"])
    imatrix = full_dist / f"{NAME}-GGUF" / f"{NAME}.imatrix"
    rf = _release_file(tmp_path / "release.yaml", gguf={"types": ["Q8_0", "Q4_K_M"], "imatrix": str(imatrix)})
    out = tmp_path / "dist"
    dist = out / f"{NAME}-1.0"
    # One job until the kill: the reference is done by then, as in a long build killed at its GGUF steps.
    cmd = [sys.executable, "-m", "release.cli", "build", str(rf), "-o", str(out), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    gguf_dir = dist / f"{NAME}-GGUF"
    deadline = time.monotonic() + 600  # generous: the other test worker shares the two cores
    # Wait until a GGUF step is writing (its temporary folder exists), then kill the whole build.
    while not (gguf_dir.is_dir() and any(p.name.startswith(".model-release-") for p in gguf_dir.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "build ended before the GGUF step"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = set(_records(dist))
    assert "convert" in done_before and not any(s.startswith("gguf-") for s in done_before)
    assert not list(gguf_dir.glob("*.gguf"))  # nothing finished-looking was left

    r, res = _build(cli, rf, out, "--jobs", 2)
    assert r.exit_code == 0, r.stdout + r.stderr
    status = {s["name"]: s["status"] for s in res["steps"]}
    assert all(status[s] == "skipped" for s in done_before)  # finished steps are not redone
    assert status["gguf-Q8_0"] == status["gguf-Q4_K_M"] == "done"
    assert not any(p.name.startswith(".") and p.is_dir() for p in gguf_dir.iterdir())
    # Same bytes as the uninterrupted build: weights, configs, tokenizer.
    for rel in (f"{NAME}-GGUF/{NAME}-Q8_0.gguf", f"{NAME}-GGUF/{NAME}-Q4_K_M.gguf", f"{NAME}/model.safetensors",
                f"{NAME}/config.json", f"{NAME}/tokenizer.json", ".work/reference.safetensors"):  # fmt: skip
        assert (dist / rel).read_bytes() == (full_dist / rel).read_bytes(), rel

    # One GGUF type changed: only that file and what depends on it are rebuilt; the dropped one goes.
    rf.write_text(rf.read_text().replace("- Q4_K_M", "- Q6_K"))
    r, res = _build(cli, rf, out, "--jobs", 2)
    assert r.exit_code == 0, r.stdout + r.stderr
    ran = {s["name"] for s in res["steps"] if s["status"] == "done"}
    # The shared lossless GGUF went once Q4_K_M was made; Q6_K needs it, so it is written again (not the source).
    assert ran == {"lossless-gguf", "gguf-Q6_K", "validate-gguf-Q6_K", "card", "manifest"}
    assert not (dist / ".work" / "lossless-gguf").exists()
    assert not list(gguf_dir.glob("*Q4_K_M*")) and (gguf_dir / f"{NAME}-Q6_K.gguf").is_file()
    manifest = json.loads((gguf_dir / "release-manifest.json").read_text())
    assert set(manifest["variants"]) == {"Q8_0", "Q6_K"}

    # A variant off its (here deliberately strict) threshold fails the release: exit 1, no new
    # cards or manifests, and the table names it.
    data = yaml.safe_load(rf.read_text())
    data["evaluation"]["thresholds"] = {"gguf-Q6_K": {"max_kl_mean": 1e-6}}  # max_tokens kept
    rf.write_text(yaml.safe_dump(data, sort_keys=False))
    r, res = _build(cli, rf, out)
    assert r.exit_code == 1 and not res["ok"]
    status = {s["name"]: s["status"] for s in res["steps"]}
    assert status["validate-gguf-Q6_K"] == "done" and status["card"] == status["manifest"] == "blocked"
    # A threshold is an input of its variant's validation only: the reference and the other
    # validations are not redone.
    assert status["reference"] == status["validate-gguf-Q8_0"] == status["validate-safetensors"] == "skipped"
    failed = [v for v in res["variants"] if v["passed"] is False]
    assert [v["variant"] for v in failed] == ["Q6_K"]


def _refused(cli, path: Path, code: int, *needles: str) -> None:
    r = cli("build", path, "-o", path.parent / "dist")
    assert r.exit_code == code, r.stdout + r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
    assert not (path.parent / "dist").exists()


def test_bad_key_is_refused_with_its_line(cli, tmp_path):
    text = (ROOT / "examples" / "smollm2-release.yaml").read_text()
    bad = tmp_path / "release.yaml"
    bad.write_text(text.replace("    types: [Q8_0, Q4_K_M]", "    types: [Q8_0, Q4_K_M]\n    typo: 1"))
    line = next(i for i, s in enumerate(bad.read_text().splitlines(), 1) if "typo:" in s)
    _refused(cli, bad, 2, f"release.yaml:{line}:", "variants.gguf.typo")
    bad.write_text(text.replace("[Q8_0, Q4_K_M]", "[Q8_0, Q4_K_X]"))
    line = next(i for i, s in enumerate(bad.read_text().splitlines(), 1) if "Q4_K_X" in s)
    _refused(cli, bad, 2, f"release.yaml:{line}:", "unknown GGUF type 'Q4_K_X'")


def test_license_violation_is_refused_before_heavy_work(cli, tmp_path):
    data = yaml.safe_load((ROOT / "examples" / "meditron-release.yaml").read_text())
    data["release"]["license"] = "apache-2.0"  # a Llama 2 derivative cannot be relicensed
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    _refused(cli, path, 1, "license check failed", "llama2")


@pytest.mark.real_model
def test_only_one_family_plans_no_release_steps(smollm2, cli, tmp_path):
    """`--only gguf` (a CI family job): convert, reference, the GGUF types and their validation only."""
    from release.pipeline import load_release_file, plan_build

    rf = load_release_file(_release_file(tmp_path / "release.yaml", gguf={"types": ["Q8_0"]}, gptq={"bits": 4}))
    names = [s.name for s in plan_build(rf, tmp_path / "dist", only={"gguf"}).steps]
    assert names == ["convert", "reference", "gguf-Q8_0", "validate-gguf-Q8_0"]
    full = [s.name for s in plan_build(rf, tmp_path / "dist").steps]
    assert {"gptq", "validate-gptq", "validate-safetensors", "card", "manifest"} <= set(full)
    r = cli("build", tmp_path / "release.yaml", "-o", tmp_path / "dist", "--only", "gguf,onnx")
    assert r.exit_code == 2 and "onnx" in r.stderr and not (tmp_path / "dist").exists()


@pytest.mark.real_model
def test_imatrix_setting_plans_a_collecting_step_a_given_file_or_none(smollm2, tmp_path):
    """variants.gguf.imatrix: auto (a step the k-quants depend on; Q8_0 does not; imatrix_chunks
    limits its chunks), a given file (no step; its path and fingerprint go to the k-quant steps),
    none; a missing file is refused with its line."""
    from release.errors import BadInputError
    from release.pipeline import load_release_file, plan_build

    def plan(**gguf: object) -> dict:
        rf = load_release_file(_release_file(tmp_path / "release.yaml", gguf={"types": ["Q8_0", "Q4_K_M"], **gguf}))
        return {s.name: s for s in plan_build(rf, tmp_path / "dist", only={"gguf"}).steps}

    auto = plan()
    im_file = str(tmp_path / "dist" / f"{NAME}-1.0" / f"{NAME}-GGUF" / f"{NAME}.imatrix")
    assert auto["imatrix"].argv[3:5] == ["imatrix", str(smollm2.hf)] and im_file in auto["imatrix"].argv
    assert "imatrix" in auto["gguf-Q4_K_M"].deps and "imatrix" not in auto["gguf-Q8_0"].deps
    assert auto["gguf-Q4_K_M"].argv[-2:] == ["--imatrix", im_file] and "--imatrix" not in auto["gguf-Q8_0"].argv

    chunked = plan(imatrix_chunks=4)  # llama.cpp's --chunks: the first 4 chunks of the text
    assert chunked["imatrix"].argv[-2:] == ["--chunks", "4"] and "--chunks" not in auto["imatrix"].argv
    assert chunked["imatrix"].settings != auto["imatrix"].settings  # another count collects again

    given = tmp_path / "mine.imatrix"
    given.write_bytes(b"imatrix bytes")
    steps = plan(imatrix=str(given))
    assert "imatrix" not in steps and "imatrix" not in steps["gguf-Q4_K_M"].deps
    assert steps["gguf-Q4_K_M"].argv[-2:] == ["--imatrix", str(given)]
    assert steps["gguf-Q4_K_M"].settings["imatrix"]["given"][0][1] == len(b"imatrix bytes")

    none = plan(imatrix="none")
    assert "imatrix" not in none and none["gguf-Q4_K_M"].argv[-2:] == ["--imatrix", "none"]

    with pytest.raises(BadInputError, match=r"release\.yaml:\d+: imatrix file .*missing\.imatrix does not exist"):
        plan(imatrix=str(tmp_path / "missing.imatrix"))


@pytest.mark.real_model
def test_kquant_steps_share_one_lossless_intermediate(smollm2, tmp_path):
    """Every llama.cpp type reads one lossless GGUF per build: the release's own BF16 variant when it
    ships one as a single file (SmolLM2 is bf16), else a temporary file under .work written by its own
    step and counted once in the disk plan; direct types read the main folder."""
    from release.pipeline import load_release_file, plan_build
    from release.pipeline.plan import LOSSLESS_STEP

    def plan(*types: str, **extra: object) -> dict:
        gguf = {"types": list(types), "imatrix": "none", **extra}
        rf = load_release_file(_release_file(tmp_path / "release.yaml", gguf=gguf))
        return {s.name: s for s in plan_build(rf, tmp_path / "dist", only={"gguf"}).steps}

    dist = tmp_path / "dist" / f"{NAME}-1.0"
    steps = plan("Q4_K_M", "Q3_K_M", "Q8_0")
    inter = dist / ".work" / LOSSLESS_STEP / f"{NAME}-BF16.gguf"
    lossless = steps[LOSSLESS_STEP]
    assert lossless.temporary and lossless.argv[lossless.argv.index("-t") + 1] == "BF16"
    for t in ("Q4_K_M", "Q3_K_M"):
        argv = steps[f"gguf-{t}"].argv
        assert argv[argv.index("--intermediate") + 1] == str(inter) and LOSSLESS_STEP in steps[f"gguf-{t}"].deps
    assert "--intermediate" not in steps["gguf-Q8_0"].argv and LOSSLESS_STEP not in steps["gguf-Q8_0"].deps
    # Counted once: the k-quant steps' disk is their own output's.
    assert steps["gguf-Q4_K_M"].need.disk < lossless.need.disk / 3

    shipped = plan("Q4_K_M", "BF16")
    assert LOSSLESS_STEP not in shipped and "gguf-BF16" in shipped["gguf-Q4_K_M"].deps
    argv = shipped["gguf-Q4_K_M"].argv
    assert argv[argv.index("--intermediate") + 1] == str(dist / f"{NAME}-GGUF" / f"{NAME}-BF16.gguf")
    # F16 is not lossless for bf16 weights; a split BF16 set is not one file: both keep the temporary one.
    assert LOSSLESS_STEP in plan("Q4_K_M", "F16") and LOSSLESS_STEP in plan("Q4_K_M", "BF16", split_max_size="1GB")


def test_an_interrupted_build_stops_its_running_steps(tmp_path):
    """Ctrl-C or SIGTERM to `build` (raised as KeyboardInterrupt in it) ends the steps it runs, with
    SIGTERM first so that each removes its own temporary output: none outlives the build."""
    import threading

    from release.pipeline.local import LocalExecutor
    from release.pipeline.records import Records
    from release.pipeline.schedule import run_plan
    from release.pipeline.steps import Plan, Step
    from release.resources import Need

    pids = tmp_path / "pids"
    code = f"import os, sys, time; open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(120)"
    steps = [Step(f"s{i}", "release", [sys.executable, "-c", code], {}, [], list, Need(ram=1)) for i in range(2)]
    (tmp_path / "logs").mkdir()
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_plan(Plan(tmp_path, steps, []), Records(tmp_path), LocalExecutor(), logs=tmp_path / "logs", jobs=2,
                 budget=1 << 40)  # fmt: skip
    timer.cancel()
    assert time.monotonic() - started < 60
    started_pids = [int(p) for p in pids.read_text().split()]
    assert len(started_pids) == 2
    for pid in started_pids:  # reaped, not left as orphans or zombies
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _kill_the_build_once_its_step_runs(build: str, pid_file: Path) -> int:
    """Run ``build`` (Python code that starts a step writing its pid to ``pid_file``), SIGKILL the
    build alone once the step runs, and return the step's pid."""
    proc = subprocess.Popen([sys.executable, "-c", build], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not pid_file.is_file() or not pid_file.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "the step did not start"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    return int(pid_file.read_text())


def test_a_step_outlives_no_build_even_one_killed_with_sigkill(tmp_path):
    """`kill -9` of the build alone (not its process group) cannot run the build's clean-up: its
    steps get SIGTERM from the kernel (the parent-death signal) and run their own, instead of
    writing on, orphaned, into a folder a rerun is about to use."""
    marker, pid_file = tmp_path / "cleaned", tmp_path / "step.pid"
    step = (f"import os, signal, sys, time; from pathlib import Path\n"
            f"signal.signal(signal.SIGTERM, lambda *a: (Path({str(marker)!r}).write_text('x'), sys.exit(143)))\n"
            f"Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(120)")  # fmt: skip
    build = one_step_build(tmp_path, "s", [sys.executable, "-c", step])
    step_pid = _kill_the_build_once_its_step_runs(build, pid_file)
    if not gone_within(step_pid, 10):
        os.kill(step_pid, signal.SIGKILL)
        pytest.fail("the step outlived its build by 10 s")
    assert marker.read_text() == "x"  # it ended by SIGTERM, through its own clean-up


def test_a_step_stuck_in_c_code_ends_a_grace_period_after_its_build(tmp_path):
    """The parent-death SIGTERM waits for the main thread to come back from C (llama.cpp's
    quantizer, a torch op: minutes at 70B); the step's watch on its parent ends it a grace period
    after the build is gone instead, with one line. Here a 60 s C call, a 2 s grace."""
    pid_file = tmp_path / "step.pid"
    step = (f"import ctypes, os, typer; from pathlib import Path; from release.cli._output import run\n"
            f"def body(reporter):\n"
            f"    Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
            f"    ctypes.CDLL(None).sleep(60)  # C, no signal to end it early\n"
            f"try:\n    run(body, as_json=True)\n"
            f"except typer.Exit as e:\n    raise SystemExit(e.exit_code)")  # fmt: skip
    log = tmp_path / "step.log"
    parent = (f"import os, subprocess, sys, time\n"
              f"env = {{**os.environ, 'MODEL_RELEASE_STEP': '1', 'MODEL_RELEASE_STOP_GRACE': '2'}}\n"
              f"subprocess.Popen([sys.executable, '-c', {step!r}], env=env, stderr=open({str(log)!r}, 'w'))\n"
              f"time.sleep(120)")  # fmt: skip
    step_pid = _kill_the_build_once_its_step_runs(parent, pid_file)
    if not gone_within(step_pid, 20):
        os.kill(step_pid, signal.SIGKILL)
        pytest.fail("the step outlived its build by 20 s")
    assert "the build that ran this step is gone and the step did not stop within 2 s" in log.read_text()


_INTERRUPTED = """
import os, shutil, signal, sys, time
from pathlib import Path
import typer
from release.cli._output import run
first, second, scratch = signal.Signals[sys.argv[1]], signal.Signals[sys.argv[2]], sys.argv[3]
def body(reporter):
    Path(scratch).mkdir()
    try:
        os.kill(os.getpid(), first)
        time.sleep(30)  # the handler raises here
    finally:
        os.kill(os.getpid(), second)  # the next signal, mid-clean-up
        time.sleep(0.2)
        shutil.rmtree(scratch)
try:
    run(body, as_json=True)
except typer.Exit as e:  # what the typer app turns into the exit code
    raise SystemExit(e.exit_code)
"""


@pytest.mark.parametrize(
    ("first", "second", "code", "line"),
    [("SIGTERM", "SIGTERM", 143, "error: terminated (SIGTERM): nothing was written"),
     ("SIGINT", "SIGTERM", 130, "interrupted: nothing was written"),
     ("SIGINT", "SIGINT", 130, "interrupted: nothing was written")],
)  # fmt: skip
def test_a_second_signal_does_not_cut_a_steps_clean_up_short(first, second, code, line, tmp_path):
    """The first SIGTERM or Ctrl-C unwinds a command; the next, landing mid-clean-up, must not stop
    it. A step whose Ray worker dies gets SIGTERM two or three times within 20 ms (Linux repeats the
    parent-death signal as each of the dead worker's threads exits); Ctrl-C on a local build reaches
    its steps (one process group) and then the build's own SIGTERM to each. The same exit code and
    one line as for one signal, and the temporary folder removed."""
    scratch = tmp_path / "scratch"
    p = subprocess.run([sys.executable, "-c", _INTERRUPTED, first, second, str(scratch)], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert p.returncode == code, p.stderr
    assert p.stderr.strip() == line, p.stderr
    assert not scratch.exists()


def _counting_step(tmp_path: Path, name: str, deps: list[str], *, temporary: bool = False, fail: bool = False):
    """A step that appends its name to runs.log, reads its deps' files and writes NAME.out."""
    from release.pipeline.steps import Step
    from release.resources import Need

    out = tmp_path / "out" / f"{name}.out"
    reads = [str(tmp_path / "out" / f"{d}.out") for d in deps]
    code = (f"import sys; open({str(tmp_path / 'runs.log')!r}, 'a').write({name!r} + '\\n'); "
            f"[open(r).read() for r in {reads!r}]; "
            f"sys.exit(1) if {fail} else open({str(out)!r}, 'w').write('x')")  # fmt: skip
    return Step(name, "gguf", [sys.executable, "-c", code], {"fail": fail}, deps, lambda: [out], Need(ram=1),
                temporary=temporary)  # fmt: skip


def test_a_temporary_step_runs_only_when_a_reader_must_and_goes_when_all_have_succeeded(tmp_path):
    """The shared lossless GGUF's life in a build: written once for the steps that read it, removed
    once they have all succeeded (kept when one failed, so that the rerun reuses it), and not written
    again when every reader is up to date; a changed reader has it written again, first."""
    from release.pipeline.local import LocalExecutor
    from release.pipeline.records import Records
    from release.pipeline.schedule import run_plan
    from release.pipeline.steps import Plan

    (tmp_path / "out").mkdir()
    (tmp_path / "logs").mkdir()
    runs = tmp_path / "runs.log"
    inter = tmp_path / "out" / "inter.out"

    def run(b_fails: bool = False, a_deps: tuple[str, ...] = ("inter",)) -> dict:
        steps = [_counting_step(tmp_path, "inter", [], temporary=True), _counting_step(tmp_path, "a", list(a_deps)),
                 _counting_step(tmp_path, "b", ["inter"], fail=b_fails)]  # fmt: skip
        runs.write_text("")
        results = run_plan(Plan(tmp_path, steps, []), Records(tmp_path), LocalExecutor(), logs=tmp_path / "logs",
                           jobs=2, budget=1 << 40)  # fmt: skip
        return {n: (r.status, runs.read_text().split().count(n)) for n, r in results.items()}

    # First build: b fails, so the intermediate stays for the rerun.
    assert run(b_fails=True) == {"inter": ("done", 1), "a": ("done", 1), "b": ("failed", 1)}
    assert inter.is_file()
    # Rerun: the intermediate is up to date (not written again), b runs, then it goes.
    assert run() == {"inter": ("skipped", 0), "a": ("skipped", 0), "b": ("done", 1)}
    assert not inter.exists()
    # Nothing changed: every reader is up to date, so the removed intermediate is not made again.
    assert run() == {"inter": ("skipped", 0), "a": ("skipped", 0), "b": ("skipped", 0)}
    assert not inter.exists()
    # a's inputs change (here its deps): it must run, so the intermediate is written first, then removed.
    assert run(a_deps=("inter", "b")) == {"inter": ("done", 1), "a": ("done", 1), "b": ("skipped", 0)}
    assert not inter.exists()


def test_of_the_ready_steps_the_one_heading_the_costliest_chain_starts_first(tmp_path):
    """release/data/step_costs.json orders the ready steps: GPTQ (the longest step) starts before the
    GGUF steps planned ahead of it, and a cheap step a costly one waits on (convert, then IQ2_XS)
    before a costlier step that ends its chain (reference). The plan's own order would run them as listed."""
    from release.pipeline.local import LocalExecutor
    from release.pipeline.records import Records
    from release.pipeline.schedule import run_plan
    from release.pipeline.steps import Plan

    (tmp_path / "out").mkdir()
    (tmp_path / "logs").mkdir()
    listed = {"gguf-Q8_0": [], "reference": [], "convert": [], "gguf-IQ2_XS": ["convert"], "gptq": [],
              "validate-gptq": ["gptq"]}  # fmt: skip
    steps = [_counting_step(tmp_path, name, deps) for name, deps in listed.items()]
    results = run_plan(Plan(tmp_path, steps, []), Records(tmp_path), LocalExecutor(), logs=tmp_path / "logs",
                       jobs=1, budget=1 << 40)  # fmt: skip
    assert {r.status for r in results.values()} == {"done"}
    ran = (tmp_path / "runs.log").read_text().split()
    assert ran == ["gptq", "convert", "gguf-IQ2_XS", "validate-gptq", "reference", "gguf-Q8_0"]


def test_device_of_a_forward_pass_does_not_make_a_step_stale_but_gptqs_does():
    """The release workflow makes the reference on a CPU runner and GPTQ on a GPU runner in the same
    folder: the reference (and the importance matrix and validations) must stay up to date there."""
    from release.pipeline.steps import Step
    from release.resources import SMALL

    def argv(step: str, name: str, device: str) -> list[str]:
        cli = [sys.executable, "-m", "release.cli"]
        return Step(name, "x", [*cli, step, "SRC", "--device", device, "--forward", "resident"], {}, [],
                    list, SMALL).digest_argv()  # fmt: skip

    for step, name in [("reference", "reference"), ("imatrix", "imatrix"), ("validate", "validate-gptq")]:
        assert argv(step, name, "cuda") == argv(step, name, "cpu") == [step, "SRC"]
    assert argv("gptq", "gptq", "cuda") != argv("gptq", "gptq", "auto")


def test_a_one_family_build_leaves_the_other_families_and_live_temporaries_alone(tmp_path):
    """Two runners build gguf and gptq into one shared folder at once: neither tidies the other's
    variants, records or temporary files; a temporary of a dead process on this host goes."""
    import socket
    from types import SimpleNamespace

    from release.pipeline.build import _tidy
    from release.pipeline.steps import Plan

    dist = tmp_path / "m-1.0"
    files = {
        "gptq": dist / "m-GPTQ" / "model.safetensors",
        "gptq record": dist / ".steps" / "gptq.json",
        "gguf": dist / "m-GGUF" / "m-Q8_0.gguf",
        "gguf record": dist / ".steps" / "gguf-Q8_0.json",
        "other host": dist / "m-GGUF" / ".m-Q6_K.gguf.partial-otherhost-123-abcdef12",
        "live": dist / "m-GGUF" / f".m-Q5_0.gguf.partial-{socket.gethostname()}-{os.getpid()}-abcdef12",
        "dead": dist / "m-GGUF" / f".m-Q4_0.gguf.partial-{socket.gethostname()}-999999999-abcdef12",
    }
    for f in files.values():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    rf = SimpleNamespace(name="m")
    _tidy(Plan(dist, [], [], ("gptq",)), rf)  # a gptq build that no longer makes GPTQ: its own go
    assert not files["gptq"].exists() and not files["gptq record"].exists() and not files["dead"].exists()
    assert all(files[k].exists() for k in ("gguf", "gguf record", "other host", "live"))
    _tidy(Plan(dist, [], [], ("safetensors",)), rf)  # prepare: touches neither family
    assert all(files[k].exists() for k in ("gguf", "gguf record", "other host", "live"))
    _tidy(Plan(dist, [], [], ("gguf",)), rf)
    assert not files["gguf"].exists() and not files["gguf record"].exists()
    assert files["live"].exists() and files["other host"].exists()
