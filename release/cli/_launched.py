"""The step launcher's process (``python -m release.cli._launched FD``, started by
``pipeline.launcher.Launcher``): it serves fork requests, and each forked child becomes the step,
running the ``model-release`` command as ``python -m release.cli`` would. Here, beside the CLI, so
that the pipeline (which the CLI imports) does not import the CLI back."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

from release.pipeline.launcher import serve
from release.resources import cpu_threads

_PR_SET_NAME = 15


def _become_step(request: dict[str, Any]) -> list[str]:
    """In the forked child: the step's environment, name, thread count and ``sys.argv`` (as
    ``python -m release.cli`` sets it); its arguments."""
    argv = [str(a) for a in request["argv"]]
    _set_title(argv)  # first: setproctitle finds the argv area through the environment it started with
    os.environ.clear()
    os.environ.update(request["env"])
    if request["prctl"] is not None:  # `ps -o comm` and top show the step, not the launcher
        request["prctl"](_PR_SET_NAME, f"mr {argv[0] if argv else 'step'}"[:15].encode())
    if "torch" in sys.modules:  # OpenMP read the launcher's environment when torch was loaded
        sys.modules["torch"].set_num_threads(cpu_threads())  # the step's OMP_NUM_THREADS
    sys.argv = [str(Path(__file__).with_name("__main__.py")), *argv]
    return argv


def _set_title(argv: list[str]) -> None:
    """`ps`, `pgrep -f` and /proc/PID/cmdline show the step's command line, as for a spawned step,
    not the launcher's. setproctitle rewrites the process's argv area (Python has no API for it);
    without it (an install without the build extra) they show the launcher's. It also sets the
    short name, which the caller sets after it."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(" ".join([sys.executable, "-m", "release.cli", *argv]))


def main() -> None:
    request = serve(socket.socket(fileno=int(sys.argv[1])))
    if request is None:
        return
    argv = _become_step(request)
    from release.cli import app, quiet_libraries, run

    quiet_libraries(argv)
    # Exits through SystemExit: the interpreter's normal exit (atexit, threads joined, buffers flushed).
    run(lambda: app(args=argv, prog_name="python -m release.cli"))


if __name__ == "__main__":
    main()
