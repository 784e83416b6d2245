"""Shared CLI plumbing: one error path, JSON output, rich progress on stderr."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from release.errors import ReleaseError
from release.extras import missing_extra
from release.progress import Reporter
from release.resources import STEP_ENV

T = TypeVar("T")

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

JSON_HELP = "Print a machine-readable JSON summary on stdout (errors too) instead of text."
QUIET_HELP = "No progress bars."
FORWARD_HELP = (
    "resident (whole model in float32), streamed (one decoder layer at a time: a 70B model in ~4.5 GB), "
    "or auto: resident when it fits the device's free memory."
)
IMATRIX_HELP = (
    "Importance matrix for the k-quant and IQ types: auto (collect one from SRC on the calibration text and "
    "ship it as `OUT/<name>.imatrix`), a file (llama.cpp's imatrix GGUF format), or none. IQ2_M/IQ2_XS need one."
)
CALIBRATION_HELP = (
    "Calibration text: .txt (one document per line) or .jsonl (a text field). Default: the built-in "
    "medical + general set."
)


class RichReporter(Reporter):
    """Progress bars on stderr; silent when stderr is not a terminal except for warnings."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and stderr.is_terminal
        self._progress: Progress | None = None
        self._task: Any = None

    def start(self, description: str, total: int | None = None, unit: str = "bytes") -> None:
        self.done()
        if not self.enabled:
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total and unit == "bytes":
            columns += [BarColumn(), DownloadColumn(), TransferSpeedColumn()]
        elif total:
            columns += [BarColumn(), MofNCompleteColumn(), TextColumn(unit)]
        columns.append(TimeElapsedColumn())
        self._progress = Progress(*columns, console=stderr, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self, amount: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def done(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def warn(self, message: str) -> None:
        stderr.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled, ``kill``, a scheduler's time limit) raised where the command is,
    like Ctrl-C, so that every temporary output is removed on the way out instead of left behind."""


def _interrupted(signum: int, frame: Any) -> None:
    # The first SIGTERM or Ctrl-C unwinds; later ones are ignored, or one landing mid-unwind would cut
    # the clean-up short. A step whose Ray worker dies gets SIGTERM several times (Linux sends
    # PR_SET_PDEATHSIG again as each of the dead worker's threads it was handed to exits: 2-3 within
    # 20 ms, measured; one run in four left its temporary folder behind). Ctrl-C on a local build
    # reaches its steps (one process group), then the build's SIGTERM to each.
    for sig in _UNWINDING:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


_UNWINDING = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _signals_unwind_once() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupted)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when started with Ctrl-C ignored
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupted)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _interrupted:  # else interrupted: stay deaf until exit
            for sig, handler in previous.items():
                signal.signal(sig, handler)


GRACE_ENV = "MODEL_RELEASE_STOP_GRACE"  # seconds a step whose build is gone may take to stop (60)


@functools.cache  # once a process
def _watch_parent() -> None:
    """A step must not outlive its build (or Ray worker) by more than a grace period. The parent's
    death sends it SIGTERM (``parent_death_signal``), but Python runs the handler only once the main
    thread is back from C, and llama.cpp's quantizer or a torch op can stay there for minutes at
    70B: an orphan holding a node's CPUs that the scheduler counts as free. This thread (which runs
    while the main one is in C: ctypes and torch release the GIL) sees the parent change, waits the
    grace for the clean unwind, then ends the process; the next build removes what it left."""
    if not os.environ.get(STEP_ENV):
        return
    parent = os.getppid()
    grace = float(os.environ.get(GRACE_ENV) or 60)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        time.sleep(grace)
        os.write(2, f"error: the build that ran this step is gone and the step did not stop within {grace:g} s; "
                    "exiting (the next build removes its temporary output)\n".encode())  # fmt: skip
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def run(action: Callable[[Reporter], T], *, as_json: bool, quiet: bool = False) -> T:
    """Run a command body; expected failures become one line (or JSON) and their exit code."""
    _watch_parent()
    reporter = RichReporter(enabled=not (quiet or as_json))
    try:
        try:
            with _signals_unwind_once():
                return action(reporter)
        except ModuleNotFoundError as exc:  # a library of an extra this install does not have
            missing = missing_extra(exc, command_name())
            if missing is None:
                raise
            raise missing from None
    except ReleaseError as exc:
        reporter.done()
        if as_json:
            print_json(exc.to_dict())
        else:
            hint = f" ({exc.hint})" if exc.hint else ""
            # escape: messages hold brackets (pip install 'model-release[gguf]') that are not markup
            stderr.print(f"[red]error:[/] {escape(exc.message + hint)}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except Terminated:
        reporter.done()
        stderr.print("[red]error:[/] terminated (SIGTERM): nothing was written")
        raise typer.Exit(128 + signal.SIGTERM) from None
    except KeyboardInterrupt:
        reporter.done()
        stderr.print("[red]interrupted[/]: nothing was written")
        raise typer.Exit(130) from None
    finally:
        reporter.done()


def command_name() -> str | None:
    """The running command's name (``fetch``, ``gguf`` ...) as typed: the first word after the
    root options (which take no values). None when run in-process without a command line."""
    words = [a for a in sys.argv[1:] if not a.startswith("-")]
    return words[0] if words and sys.argv and Path(sys.argv[0]).name in ("model-release", "__main__.py") else None


def run_or_json(action: Callable[[Reporter], T], *, as_json: bool, quiet: bool = False) -> T | None:
    """``run``; with ``--json`` also print the result's ``to_dict()`` and return None, so a command
    goes on to print its text only when there is a result left to print."""
    result = run(action, as_json=as_json, quiet=quiet)
    if as_json:
        print_json(result.to_dict())  # type: ignore[attr-defined]
        return None
    return result


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    # Flushed now: a library's exit handler may end the process with os._exit (GPTQModel's
    # kernels on some models do), which would drop a piped, block-buffered summary.
    sys.stdout.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
