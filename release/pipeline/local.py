"""The local executor: each step one ``model-release`` command in a child process of this one.

An executor answers two calls for the scheduler: ``start(step, log)`` launches a step and returns
a handle; ``poll(handle)`` returns None while it runs and a ``Finished`` once it ended. The
scheduler owns everything else (dependencies, records, the memory budget), so a cluster executor
implements only these two and reports the same way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from release.pipeline.steps import Step
from release.resources import STEP_ENV, fmt, vm_hwm


@dataclass
class Finished:
    """What a step's run gave, whatever ran it."""

    exit_code: int  # negative: killed by that signal
    output: dict[str, Any]  # the command's --json summary ({} when it printed none)
    peak_rss_bytes: int
    where: str = ""  # the machine it ran on (a cluster executor names the node)


class Executor(Protocol):
    def start(self, step: Step, log: Path) -> Any: ...

    def poll(self, handle: Any) -> Finished | None: ...

    def stop(self, handle: Any) -> None:
        """End a running step (the build was interrupted: Ctrl-C, SIGTERM); it cleans up after itself."""
        ...


@dataclass
class _Running:
    proc: subprocess.Popen
    peak: int = 0


_PR_SET_PDEATHSIG = 1


def parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the step SIGTERM when the process that started it dies
    (a build killed with SIGKILL, a Ray worker lost), so the step unwinds and removes its temporary
    output instead of running on orphaned. ``prctl`` is looked up here, in the parent: the child of
    a threaded parent must not import or ``dlopen``. None where there is no ``prctl`` (not Linux)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


class LocalExecutor:
    """Steps as local processes; ``verbose`` sends their stderr to the terminal instead of the log."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose

    def start(self, step: Step, log: Path) -> _Running:
        with open(log, "w", encoding="utf-8") as err:
            proc = subprocess.Popen(
                [*step.argv, "--json"], stdout=subprocess.PIPE, stderr=None if self.verbose else err, text=True,
                env={**os.environ, **step.env, "OMP_NUM_THREADS": str(step.threads), STEP_ENV: "1"},
                preexec_fn=parent_death_signal(),
            )  # fmt: skip
        return _Running(proc)

    def stop(self, handle: _Running) -> None:
        # SIGTERM first: the step's command unwinds like Ctrl-C and removes its temporary output.
        proc = handle.proc
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def poll(self, handle: _Running) -> Finished | None:
        proc = handle.proc
        handle.peak = max(handle.peak, vm_hwm(proc.pid))  # sampled every 50 ms while it runs
        exit_peak = reap(proc)
        if exit_peak is None:
            return None
        out, _ = proc.communicate()
        return Finished(proc.returncode, parse_summary(out), handle.peak or exit_peak, socket.gethostname())


def parse_summary(out: str) -> dict[str, Any]:
    """A step's ``--json`` stdout as a dict ({} when empty; the raw tail when it is not JSON)."""
    try:
        data = json.loads(out) if out.strip() else {}
    except json.JSONDecodeError:
        return {"raw": out[-2000:]}
    return data if isinstance(data, dict) else {"raw": str(data)[-2000:]}


def reap(proc: subprocess.Popen) -> int | None:
    """``wait4``'s peak RSS (bytes) of a finished step, with its exit status set; None while it
    runs. A fallback only: it includes the parent's peak at fork (see ``resources.vm_hwm``)."""
    try:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    except ChildProcessError:  # already reaped elsewhere
        return 0 if proc.poll() is not None else None
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024  # Linux reports kilobytes


def failure_message(code: int, data: Any, log: Path, seconds: float, peak: int) -> str:
    """One line that says why a step failed: its own error, or the signal that killed it (the
    OOM killer's SIGKILL), never the last line of some library's warning. An executor that lost the
    step (a cluster's node gone) says so in ``data["message"]``; a killed local step printed nothing."""
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        why = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by signal {-code} ({name}){why} after {seconds:.0f} s; peak {fmt(peak)}"
    try:
        lines = [x.strip() for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        lines = []
    errors = [x for x in lines if x.lower().startswith("error")]
    quiet = [x for x in lines if "warn" not in x.lower()]
    last = errors[-1] if errors else (quiet[-1] if quiet else f"exit {code}")
    return f"{last} (exit {code}; log: {log})"
