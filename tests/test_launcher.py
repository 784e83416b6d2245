"""The step launcher (release/pipeline/launcher.py): a local build forks its `model-release` steps
from one process that imported torch, transformers and llama.cpp once. A launched step must be what
a step started with subprocess is: the same summary, log, exit code, environment and thread count;
it must die with its build; and a build whose launcher cannot start still runs its steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from release.pipeline import launcher as launcher_mod
from release.pipeline.local import Finished, LocalExecutor
from release.pipeline.steps import Step
from release.resources import Need
from tests.conftest import ROOT, gone_within, leftovers, one_step_build, tiny_config, tiny_state, write_folder


def _step(*args: object, threads: int = 1) -> Step:
    argv = [sys.executable, "-m", "release.cli", *map(str, args)]
    return Step("s", "release", argv, {}, [], list, Need(ram=1), env={"MODEL_RELEASE_TEST_MARK": "x"}, threads=threads)


def _run(executor: LocalExecutor, step: Step, log: Path) -> tuple[Finished, bool]:
    """The step's result, and whether the launcher forked it (no subprocess.Popen behind it)."""
    handle = executor.start(step, log)
    while (done := executor.poll(handle)) is None:
        time.sleep(0.05)
    return done, handle.proc is None


@pytest.fixture
def src(tmp_path) -> Path:
    cfg = tiny_config()
    return write_folder(tmp_path / "m", cfg, tiny_state(cfg), "st-single")


def test_a_launched_step_gives_what_a_spawned_one_gives(src, tmp_path, monkeypatch):
    runs = {}
    for mode in ("fork", "spawn"):
        monkeypatch.setenv(launcher_mod.MODE_ENV, mode)
        executor = LocalExecutor()
        try:
            good, forked = _run(executor, _step("inspect", src), tmp_path / f"{mode}-good.log")
            bad, _ = _run(executor, _step("inspect", tmp_path / "missing"), tmp_path / f"{mode}-bad.log")
        finally:
            executor.close()
        assert forked == (mode == "fork")
        assert good.exit_code == 0 and good.peak_rss_bytes > 0, good
        runs[mode] = (good, bad, (tmp_path / f"{mode}-bad.log").read_text())
    (fgood, fbad, flog), (sgood, sbad, slog) = runs["fork"], runs["spawn"]
    assert fgood.output == sgood.output and fgood.output["architecture"]
    assert fbad.exit_code == sbad.exit_code == 2 and fbad.output == sbad.output and "missing" in fbad.output["message"]
    assert flog == slog  # --json: the error is on stdout, nothing on the log


def test_a_forked_step_has_its_own_environment_threads_and_argv():
    """The launcher imported torch under its own OMP_NUM_THREADS (OpenMP reads it once, at load):
    the step gets its own count set explicitly, its own environment and ``sys.argv`` as
    ``python -m release.cli`` sets it."""
    code = (
        "import os, sys, torch\n"
        "from release.cli._launched import _become_step\n"
        "torch.set_num_threads(2)\n"
        "env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MODEL_RELEASE_TEST_MARK': 'y'}\n"
        "argv = _become_step({'env': env, 'argv': ['gguf', '--help'], 'prctl': None})\n"
        "print(torch.get_num_threads(), os.environ['MODEL_RELEASE_TEST_MARK'], argv, sys.argv[1:],"
        " os.path.basename(sys.argv[0]))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "1 y ['gguf', '--help'] ['gguf', '--help'] __main__.py"


def test_a_build_whose_launcher_cannot_start_runs_its_steps_with_subprocess(src, tmp_path, monkeypatch):
    def refuse(*_a: object, **_k: object) -> None:
        raise launcher_mod.LauncherError("the step launcher did not start")

    monkeypatch.setattr(launcher_mod.Launcher, "__init__", refuse)
    executor = LocalExecutor()
    for _ in range(2):  # the second step does not try the launcher again
        done, forked = _run(executor, _step("inspect", src), tmp_path / "s.log")
        assert not forked and done.exit_code == 0 and done.output["architecture"], done


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.real_model
def test_a_launched_step_dies_with_its_build_and_cleans_up(smollm2, tmp_path):
    """`kill -9` of the build alone: the launcher goes with it (parent-death SIGKILL), and the step
    the launcher forked gets SIGTERM from that and removes its temporary output."""
    out = tmp_path / "gguf"
    argv = [sys.executable, "-m", "release.cli", "gguf", smollm2.hf, "-o", out, "-t", "Q8_0"]
    build = one_step_build(tmp_path, "gguf", argv)
    env = {**os.environ, launcher_mod.MODE_ENV: "fork"}
    proc = subprocess.Popen([sys.executable, "-c", build], cwd=ROOT, env=env)
    deadline = time.monotonic() + 180
    while not leftovers(tmp_path):  # the step writes its temporary folder
        assert proc.poll() is None and time.monotonic() < deadline, "the step did not start writing"
        time.sleep(0.05)
    (launcher,) = _children(proc.pid)
    (step,) = _children(launcher)
    # ps and pgrep -f see the step's command line and name, not the launcher's.
    cmdline = Path(f"/proc/{step}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    assert cmdline.startswith(" ".join(map(str, argv))), cmdline  # the executor adds --json
    assert Path(f"/proc/{step}/comm").read_text().strip() == "mr gguf"
    proc.kill()
    proc.wait()
    assert gone_within(launcher, 10), "the launcher outlived its build"
    if not gone_within(step, 120):  # Python runs the handler once llama.cpp's C call returns
        os.kill(step, signal.SIGKILL)
        pytest.fail("the launched step outlived its build")
    log = (tmp_path / "logs" / "gguf.log").read_text()
    assert leftovers(tmp_path) == [] and not out.exists(), log
    assert "error: terminated (SIGTERM): nothing was written" in log, log
