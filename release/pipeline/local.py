"""The local executor: each step one ``model-release`` command in a child process of this one.

An executor answers two calls for the scheduler: ``start(step, log)`` launches a step and returns
a handle; ``poll(handle)`` returns None while it runs and a ``Finished`` once it ended. The
scheduler owns everything else (dependencies, records, the memory budget), so a cluster executor
implements only these two and reports the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from release.pipeline.launcher import Launcher, LauncherError, forkable, parent_death_signal, wait_or_kill
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
    proc: subprocess.Popen | None  # None: forked by the launcher
    peak: int = 0
    pid: int = 0
    stdout: Any = None  # the launched step's stdout, a temporary file read once it ended
    launcher: Launcher | None = None


class LocalExecutor:
    """Steps as local processes; ``verbose`` sends their stderr to the terminal instead of the log.

    ``model-release`` steps are forked by the step launcher (``pipeline.launcher``: torch and the
    other libraries imported once per build, not once per step), anything else is started with
    ``subprocess``, as is every step if the launcher cannot start."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self._launcher: Launcher | None = None
        self._no_launcher = False

    def _launch(self) -> Launcher | None:
        if self._launcher is None and not self._no_launcher:
            try:
                self._launcher = Launcher(parent_death_signal(signal.SIGKILL))
            except (LauncherError, OSError):
                self._no_launcher = True
        return self._launcher

    def start(self, step: Step, log: Path) -> _Running:
        env = {**os.environ, **step.env, "OMP_NUM_THREADS": str(step.threads), STEP_ENV: "1"}
        argv = [*step.argv, "--json"]
        with open(log, "w", encoding="utf-8") as err:
            if forkable(argv) and (launcher := self._launch()) is not None:
                out = tempfile.TemporaryFile()  # noqa: SIM115 - read and closed when the step ends
                try:
                    pid = launcher.spawn(argv[3:], env, out.fileno(), 2 if self.verbose else err.fileno())
                    return _Running(None, pid=pid, stdout=out, launcher=launcher)
                except LauncherError:  # gone since: run this step and the next ones without it
                    out.close()
                    self._launcher, self._no_launcher = None, True
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=None if self.verbose else err, text=True, env=env,
                preexec_fn=parent_death_signal(),
            )  # fmt: skip
        return _Running(proc, pid=proc.pid)

    def stop(self, handle: _Running) -> None:
        # SIGTERM first: the step's command unwinds like Ctrl-C and removes its temporary output.
        if handle.proc is not None:
            handle.proc.terminate()
            wait_or_kill(handle.proc, 30)
            return
        for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self._ended(handle) is not None:
                    return
                time.sleep(0.05)

    def _ended(self, handle: _Running) -> tuple[int, int] | None:
        """A launched step's exit code and peak once it ended; killed (-9) if the launcher died and
        took it along unseen (the OOM killer's choice, or a kill of the launcher)."""
        assert handle.launcher is not None
        try:
            return handle.launcher.exit_code(handle.pid)
        except LauncherError:
            return (-signal.SIGKILL, 0)

    def poll(self, handle: _Running) -> Finished | None:
        handle.peak = max(handle.peak, vm_hwm(handle.pid))  # sampled every 50 ms while it runs
        if handle.proc is None:
            ended = self._ended(handle)
            if ended is None:
                return None
            handle.stdout.seek(0)
            out = handle.stdout.read().decode("utf-8", errors="replace")
            handle.stdout.close()
            return Finished(ended[0], parse_summary(out), max(handle.peak, ended[1]), socket.gethostname())
        proc = handle.proc
        exit_peak = reap(proc)
        if exit_peak is None:
            return None
        out, _ = proc.communicate()
        return Finished(proc.returncode, parse_summary(out), handle.peak or exit_peak, socket.gethostname())

    def close(self) -> None:
        """End the launcher (the build is over)."""
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None


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
