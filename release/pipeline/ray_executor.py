"""The Ray executor: each step a Ray task on whichever node of a running Ray cluster has the step's
resources (its memory estimate, a GPU for a CUDA step, its thread count as CPUs).

We do not schedule across machines ourselves: Ray already does, by memory and GPUs, and it is what
the field runs on clusters (vLLM's multi-node backend, KubeRay, ``ray start`` inside a SLURM
allocation). The task itself only runs the step's ``model-release`` command as a child process on
its node, exactly as the local executor does, so a step's bytes do not depend on where it ran: the
same command, the same settings and the same ``OMP_NUM_THREADS`` (the build's ``--threads``, which
is also the task's CPU request).

Connection follows Ray's own conventions: ``RAY_ADDRESS`` when set, else ``ray.init("auto")`` (a
cluster started on this machine with ``ray start``). The release folder must be on storage every
node mounts: checked before any step, with a file the driver writes and a task on each node reads.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from release.errors import BadInputError
from release.extras import missing_extra
from release.pipeline.launcher import parent_death_signal
from release.pipeline.local import Finished, parse_summary
from release.pipeline.steps import Step
from release.resources import STEP_ENV, fmt, vm_hwm

# A check task needs no CPU of its own: it must run on a node whose CPUs are all taken by steps.
_CHECK_CPUS = 0


@dataclass
class Node:
    """What one alive node offers (Ray's logical resources), named for people: host/short id."""

    id: str
    name: str
    cpus: float
    memory: int
    gpus: float

    def describe(self) -> str:
        gpus = f", {self.gpus:g} GPU(s)" if self.gpus else ", no GPU"
        return f"{self.name}: {self.cpus:g} CPU(s), {fmt(self.memory)} of memory{gpus}"


def _ray() -> Any:
    try:
        import ray
    except ModuleNotFoundError as exc:
        raise missing_extra(exc, None, "--executor ray") or exc from exc
    return ray


def run_step_here(argv: list[str], env: dict[str, str], log: str) -> dict[str, Any]:
    """The body of a step's Ray task, on the node Ray chose: the command as a child process, its stderr
    to the log on shared storage, its peak resident memory sampled, its ``--json`` summary returned.
    The node's id goes to ``<log>.node`` first, so the driver can name the node even if the task dies."""
    import ray

    Path(log + ".node").write_text(ray.get_runtime_context().get_node_id(), encoding="utf-8")
    out: list[str] = []
    # Its own session: Ray (2.60) runs each worker as a process group and cleans that group up when
    # the worker dies. Out of it, the step still dies with its worker by SIGTERM (parent_death_signal)
    # and unwinds; it acts on the first of the repeated SIGTERMs only (cli._output).
    with open(log, "w", encoding="utf-8") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **env},
                                preexec_fn=parent_death_signal(), start_new_session=True)  # fmt: skip
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read() if proc.stdout else ""), daemon=True)
    reader.start()
    peak = 0
    try:
        while proc.poll() is None:
            peak = max(peak, vm_hwm(proc.pid))
            time.sleep(0.05)
    finally:
        if proc.poll() is None:  # the task was cancelled: stop the step like Ctrl-C
            proc.terminate()
            proc.wait()
    reader.join()
    return {"exit_code": proc.returncode, "stdout": "".join(out), "peak": peak}


_HINT = "start one (`ray start --head`; SLURM and Kubernetes: docs/cluster.md) or set RAY_ADDRESS"


def _probe(address: str) -> None:
    """One line at once for a cluster that is not there: ``ray.init`` waits minutes for a GCS address
    that does not answer (measured: still waiting after 150 s). A TCP connect with a 5 s limit."""
    if "://" in address or address == "local":
        return  # Ray Client, or a new local instance: ray.init says what is wrong
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        hostport = canonicalize_bootstrap_address_or_die(None if address == "auto" else address)
    except Exception:  # no cluster found for "auto", a malformed address: ray.init's own error is clear
        return
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise BadInputError(f"no Ray cluster answers at {address} ({hostport}): {why}", hint=_HINT) from None


def _cluster_errors_to_stderr(ray: Any) -> None:
    """Ray's driver prints the cluster's error messages ("A worker died or was killed ...") to stdout
    whatever ``log_to_driver`` says, and stdout is ``--json``'s channel: send them to stderr. (Its
    listener thread looks ``print_to_stdstream`` up at each message; there is no public switch.)"""
    mod = getattr(getattr(ray, "_private", None), "worker", None)
    original = getattr(mod, "print_to_stdstream", None)
    if original is None or getattr(original, "_to_stderr", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        original({**data, "is_err": True}, ignore_prefix)

    to_stderr._to_stderr = True  # type: ignore[attr-defined]
    mod.print_to_stdstream = to_stderr  # type: ignore[union-attr]


def _read_marker(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"


@dataclass
class _Task:
    ref: Any
    step: str
    node_file: str


class RayExecutor:
    """Steps as Ray tasks on a running cluster (``RAY_ADDRESS`` or ``ray.init("auto")``)."""

    def __init__(self, address: str | None = None) -> None:
        ray = _ray()
        self.ray = ray
        self.address = address or os.environ.get("RAY_ADDRESS") or "auto"
        if not ray.is_initialized():
            import logging

            _probe(self.address)
            _cluster_errors_to_stderr(ray)
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.ERROR,
                         configure_logging=True)  # fmt: skip
            except (ConnectionError, RuntimeError, ValueError) as exc:
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise BadInputError(f"no Ray cluster to connect to at {self.address}: {why}", hint=_HINT) from exc
        self._remote = ray.remote(run_step_here)
        self._names: dict[str, str] = {n.id: n.name for n in self.nodes()}

    def nodes(self) -> list[Node]:
        """The cluster's alive nodes and their logical resources."""
        out = []
        for n in self.ray.nodes():
            if not n.get("Alive"):
                continue
            r = n.get("Resources", {})
            host = n.get("NodeManagerHostname") or n.get("NodeManagerAddress") or "?"
            out.append(Node(n["NodeID"], f"{host}/{n['NodeID'][:8]}", float(r.get("CPU", 0)), int(r.get("memory", 0)),
                            float(r.get("GPU", 0))))  # fmt: skip
        return out

    @staticmethod
    def capacity(threads: int, nodes: list[Node]) -> tuple[int, int]:
        """(steps of ``threads`` CPUs each that the nodes can run at once, the memory they may need
        together): the scheduler hands Ray no more than it can start, so a step's time is its run,
        not its queue."""
        return max(1, sum(int(n.cpus // threads) for n in nodes)), sum(n.memory for n in nodes)

    def check_shared_storage(
        self, folder: Path, nodes: list[Node] | None = None, reader: Callable[[str], str] = _read_marker
    ) -> None:
        """Refuse, before any step, a release folder some node cannot see: the driver writes a file
        with a random token there and a task pinned to each node reads it back (with ``reader``)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        marker = folder / f".cluster-check-{token[:8]}"
        marker.write_text(token, encoding="utf-8")
        try:
            read = self.ray.remote(reader)
            nodes = self.nodes() if nodes is None else nodes
            refs = [
                read.options(
                    num_cpus=_CHECK_CPUS, scheduling_strategy=NodeAffinitySchedulingStrategy(n.id, soft=False)
                ).remote(str(marker))
                for n in nodes
            ]
            seen = self.ray.get(refs, timeout=300)
        finally:
            marker.unlink(missing_ok=True)
        blind = [f"{n.name} ({got})" if got.startswith("unreadable") else n.name
                 for n, got in zip(nodes, seen, strict=True) if got != token]  # fmt: skip
        if blind:
            raise BadInputError(
                f"the release folder {folder} is not visible from node(s) {', '.join(blind)}: "
                "every node must mount it at the same path",
                hint="build on shared storage (NFS, Lustre, a Kubernetes ReadWriteMany volume): -o /shared/dist",
            )

    def start(self, step: Step, log: Path) -> _Task:
        env = {**step.env, "OMP_NUM_THREADS": str(step.threads), STEP_ENV: "1"}
        Path(f"{log}.node").unlink(missing_ok=True)  # an earlier run's
        ref = self._remote.options(
            num_cpus=step.threads, num_gpus=1 if step.need.gpu else 0, memory=max(step.need.ram, 1),
            max_retries=0, name=step.name,
        ).remote([*step.argv, "--json"], env, str(log))  # fmt: skip
        return _Task(ref, step.name, f"{log}.node")

    def poll(self, handle: _Task) -> Finished | None:
        ready, _ = self.ray.wait([handle.ref], timeout=0)
        if not ready:
            return None
        where = self._node_of(handle)
        try:
            got = self.ray.get(handle.ref)
        except self.ray.exceptions.RayError as exc:
            return Finished(-signal.SIGKILL, {"message": self._lost(exc, where)}, 0, where)
        return Finished(int(got["exit_code"]), parse_summary(got["stdout"]), int(got["peak"]), where)

    def stop(self, handle: _Task) -> None:
        # force: Ray kills the worker; its child (the step) then gets SIGTERM and cleans up.
        with contextlib.suppress(Exception):  # already finished or its node gone: nothing left to stop
            self.ray.cancel(handle.ref, force=True)

    def _node_of(self, handle: _Task) -> str:
        """The node a task ran on, from the file its task wrote when it began (so a crashed task's too)."""
        try:
            node_id = Path(handle.node_file).read_text(encoding="utf-8").strip()
        except OSError:
            return "?"  # it never began: the node was lost before, or Ray could not start it
        if node_id not in self._names:
            self._names = {n.id: n.name for n in self.nodes()} | self._names
        return self._names.get(node_id, node_id[:8])

    def _lost(self, exc: Exception, where: str) -> str:
        """One line for a task Ray could not finish: who killed it and where, not Ray's traceback."""
        ex = self.ray.exceptions
        if isinstance(exc, getattr(ex, "OutOfMemoryError", ())):
            return f"Ray's memory monitor killed the step on {where}: the node ran low on memory"
        if isinstance(exc, getattr(ex, "NodeDiedError", ())) or "node" in type(exc).__name__.lower():
            return f"node {where} was lost while running the step"
        if isinstance(exc, getattr(ex, "WorkerCrashedError", ())):
            return f"the Ray worker running the step on {where} died (killed by a signal or the OOM killer)"
        if isinstance(exc, getattr(ex, "TaskCancelledError", ())):
            return f"cancelled on {where}"
        first = str(exc).strip().splitlines()
        return f"Ray could not run the step on {where}: {type(exc).__name__}" + (f": {first[0]}" if first else "")
