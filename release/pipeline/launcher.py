"""The step launcher: one process per local build that forks the build's ``model-release`` steps,
importing each command's libraries once instead of once per step.

Why: a step is its own process (isolation, its own peak memory, a clean kill), and each one paid
2-6 s of CPU importing torch, transformers, llama.cpp or jsonschema before doing anything; a release
with a dozen variants runs 30-40 steps, so on a 2-core CI runner imports were a quarter of a small
model's build. Before it forks the first step of a command, the launcher imports what that command
imports (``release/data/step_imports.json``); later steps of it start with those modules in place.
It never imports more than the steps would have: a build of two steps costs what it did. A forked
step runs ``release.cli`` as ``python -m release.cli`` would: its own argv, environment, stdout,
stderr (the log), thread count, signals and normal interpreter exit. The standard library's
``multiprocessing.forkserver`` forks from a preloaded process too, but it runs a Python function
with pickled arguments, cannot hand the child its stdout and log as file descriptors, and reports
no exit status with resource usage; this is the small part it lacks, written here.

Safety of fork: the launcher is single-threaded apart from OpenBLAS's pool (which re-creates itself
after fork), never touches CUDA (steps initialise it themselves: llama.cpp, whose CUDA build may
initialise CUDA when loaded, is not imported here) and runs no torch op, so no OpenMP pool exists
to be inherited. A step whose argv is not ``python -m release.cli ...`` (tests run plain
scripts) is started with ``subprocess``, as is every step with ``MODEL_RELEASE_LAUNCHER=spawn``.
The Ray executor starts its steps with ``subprocess`` on the nodes.

Protocol (a ``SOCK_SEQPACKET`` socket pair, one JSON message per packet): the build sends
``{"argv", "env"}`` with the step's stdout and stderr as passed descriptors; the launcher answers
``{"pid"}`` once forked and ``{"exit", "pid", "code", "maxrss"}`` when the step ends. If the build dies, the
launcher gets the parent-death SIGKILL and its steps their parent-death SIGTERM from it, as they
would from the build itself.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from release.datafiles import data_file

MODE_ENV = "MODEL_RELEASE_LAUNCHER"  # "spawn": every step through subprocess, no launcher
_MAX_PACKET = 1 << 20
_PR_SET_PDEATHSIG = 1


def forkable(argv: list[str]) -> bool:
    """Whether a step's command is ``model-release`` run by this interpreter (what the launcher runs)."""
    return argv[:3] == [sys.executable, "-m", "release.cli"] and os.environ.get(MODE_ENV, "fork") != "spawn"


class LauncherError(RuntimeError):
    """The launcher could not start or went away; the executor falls back to subprocess."""


class Launcher:
    """The build's side: start the launcher, ask it to fork steps, collect how they ended."""

    def __init__(self, preexec: Any = None, timeout: float = 120.0) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "release.cli._launched", str(theirs.fileno())],
                # stdout: the build's --json channel, never the launcher's (each step gets its own)
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=preexec,
            )  # fmt: skip
        finally:
            theirs.close()
        self.sock = ours
        self.exits: dict[int, tuple[int, int]] = {}  # pid -> (exit code, peak RSS in bytes)
        if self._receive(timeout).get("ready") is not True:
            raise LauncherError("the step launcher did not start")

    def _receive(self, timeout: float | None) -> dict[str, Any]:
        """The next message (an exit is recorded and waited past when a reply is awaited)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.sock], [], [], left)[0]:
                raise LauncherError("the step launcher did not answer")
            data = self.sock.recv(_MAX_PACKET)
            if not data:
                raise LauncherError(f"the step launcher exited ({self.proc.poll()})")
            msg = json.loads(data)
            if "exit" in msg:
                self.exits[int(msg["pid"])] = (int(msg["code"]), int(msg["maxrss"]))
                if timeout == 0:
                    return msg
                continue
            return msg

    def spawn(self, argv: list[str], env: dict[str, str], stdout: int, stderr: int) -> int:
        """Fork a step running ``release.cli`` with these arguments (after ``-m release.cli``),
        environment and output descriptors; its pid."""
        request = json.dumps({"argv": argv, "env": env}).encode()
        socket.send_fds(self.sock, [request], [stdout, stderr])
        return int(self._receive(600.0)["pid"])  # the first step of a command waits for its imports

    def exit_code(self, pid: int) -> tuple[int, int] | None:
        """How step ``pid`` ended (its exit code, negative for a signal, and its peak RSS: a forked
        child's ``wait4`` peak is its own), None while it runs. Raises LauncherError when the
        launcher is gone and so is the step (killed with it: its end was not seen)."""
        try:
            while pid not in self.exits and select.select([self.sock], [], [], 0)[0]:
                self._receive(0)
        except LauncherError:
            if _alive(pid):
                return None  # orphaned, ending on its parent-death signal
            raise
        return self.exits.pop(pid, None)

    def close(self) -> None:
        """The launcher exits once the build's end of the socket is closed."""
        self.sock.close()
        wait_or_kill(self.proc, 30)


def wait_or_kill(proc: subprocess.Popen, seconds: float) -> None:
    """Wait for a child that was asked to end; SIGKILL it after ``seconds``."""
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def libc_prctl() -> Any:
    """libc's ``prctl`` through ctypes, None where there is none (not Linux). Look it up before
    forking: the child of a threaded parent must not import or ``dlopen``."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return None


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the step SIGTERM (``sig``) when the process that started
    it dies (a build killed with SIGKILL, a Ray worker lost), so the step unwinds and removes its
    temporary output instead of running on orphaned. ``prctl`` is looked up here, in the parent: the
    child of a threaded parent must not import or ``dlopen``. None where there is no ``prctl``."""
    prctl = libc_prctl()
    if prctl is None:
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)

    return hook


def serve(sock: socket.socket) -> dict[str, Any] | None:
    """The launcher's loop (``release.cli._launched`` runs it). Returns only in a forked step, with
    its request; None once the build is gone."""
    sigint = signal.getsignal(signal.SIGINT)  # as the build left it: a step restores it
    # Ctrl-C and a SIGTERM to the process group are for the build and its steps: the build stops
    # its steps and then closes the socket. The launcher ends on that, or on its parent-death SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    prctl = libc_prctl()  # the step names itself with it (release.cli._launched)
    die_with_launcher = parent_death_signal()  # the step dies with the launcher, which dies with the build
    os.environ["MPLBACKEND"] = "Agg"  # what the validation report selects; a step gets its own environment
    imports: dict[str, list[str]] = data_file("step_imports.json")["commands"]
    sock.send(json.dumps({"ready": True}).encode())
    me = os.getpid()
    children: set[int] = set()
    while True:
        if select.select([sock], [], [], 0.05)[0]:
            data, fds, _, _ = socket.recv_fds(sock, _MAX_PACKET, 2)
            if not data:
                return None
            request = json.loads(data)
            for name in imports.pop(request["argv"][0] if request["argv"] else "", []):  # once a command
                with contextlib.suppress(ImportError):
                    importlib.import_module(name)
            sys.stdout.flush()  # nothing of ours may reach a step's stdout (its --json summary)
            sys.stderr.flush()
            # Out of the collector's reach, what the step inherits: without it, each step's full
            # collections, and its exit (finalisation collects everything it holds), walk the
            # launcher's half a million objects, writing to every page that holds one (copy-on-write).
            # Measured: a tiny 13-step build 38-41 s -> 24-27 s, its steps' exits 1.2-2.3 s -> 0.
            gc.freeze()
            pid = os.fork()
            if pid == 0:
                sock.close()
                if die_with_launcher is not None:
                    die_with_launcher()
                    if os.getppid() != me:  # gone before the request took effect
                        os._exit(128 + signal.SIGTERM)
                os.dup2(fds[0], 1)
                os.dup2(fds[1], 2)
                for fd in fds:
                    os.close(fd)
                signal.signal(signal.SIGINT, sigint)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                return {**request, "prctl": prctl}
            for fd in fds:
                os.close(fd)
            children.add(pid)
            sock.send(json.dumps({"pid": pid}).encode())
        while children:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            sock.send(json.dumps({"exit": True, "pid": pid, "code": code, "maxrss": usage.ru_maxrss * 1024}).encode())
