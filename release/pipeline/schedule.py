"""The scheduler: runs a plan's steps through an executor in dependency order, executor-neutral.

Ready steps start costliest chain first (``critical_path``, from ``data/step_costs.json``).
It decides, for each step in turn: blocked (an earlier step failed, or a validation it follows
said no), skipped (its record matches its inputs), or started (when ``jobs`` and the memory budget
leave room). The executor only starts and polls; records, events and failure lines are made here,
so every executor behaves the same.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from release.datafiles import data_file
from release.pipeline.local import Executor, failure_message
from release.pipeline.records import Records, digest, fingerprint
from release.pipeline.steps import Plan, Step, StepResult

Event = Callable[[str, Step, "StepResult | None"], None]


def _blocked_by(step: Step, results: dict[str, StepResult]) -> str | None:
    if any(results.get(d) and results[d].status in ("failed", "blocked") for d in step.deps):
        return "an earlier step failed"
    failed = [d for d in step.deps if d.startswith("validate-") and results.get(d) and results[d].exit_code == 1]
    return f"{failed[0]} failed" if failed else None


def step_inputs(step: Step, records: Records, temp_inputs: dict[str, str]) -> str:
    """The digest a step's record must match to be skipped: its arguments, its settings and what it
    consumed (a dependency's recorded files; a temporary one's inputs, its files being removed)."""
    deps = {d: temp_inputs.get(d) or records.fingerprint(d) for d in step.deps}
    return digest({"argv": step.digest_argv(), "settings": step.settings, "deps": deps})


def step_cost(name: str, table: dict[str, Any] | None = None) -> float:
    """A step's estimated run time relative to the others (``data/step_costs.json``): the longest
    key its name starts with (``gguf-IQ2_XS`` -> ``gguf-IQ``), else the default."""
    table = table or data_file("step_costs.json")
    keys = [k for k in table["costs"] if name.startswith(k)]
    return float(table["costs"][max(keys, key=len)] if keys else table["default"])


def critical_path(plan: Plan) -> dict[str, float]:
    """Each step's cost plus that of the costliest chain of steps waiting on it: the order the
    scheduler starts ready steps in (highest first), so that the longest chain (GPTQ, then its
    validation, the cards and the manifest) starts at once instead of behind every GGUF step."""
    table = data_file("step_costs.json")
    waiting = plan.waiting_on()
    rank: dict[str, float] = {}

    def of(name: str) -> float:
        if name not in rank:
            rank[name] = step_cost(name, table) + max((of(w) for w in waiting[name]), default=0.0)
        return rank[name]

    for step in plan.steps:
        of(step.name)
    return rank


def preview(plan: Plan, records: Records) -> dict[str, str]:
    """What ``run_plan`` would do with each step, running none: ``up to date``, ``to run`` (its record
    does not match, or a step it consumes runs first), or, for a temporary step, ``not needed``."""
    state: dict[str, str] = {}
    temp_inputs: dict[str, str] = {}
    pending = list(plan.steps)
    while pending:
        names = {p.name for p in pending}
        ready = [s for s in pending if not any(d in names for d in s.deps)]
        if not ready:  # a cycle cannot be planned; say so rather than loop
            raise RuntimeError(f"steps wait on each other: {', '.join(sorted(names))}")
        for step in ready:
            pending.remove(step)
            inputs = step_inputs(step, records, temp_inputs)
            if step.temporary:
                temp_inputs[step.name] = inputs
            upstream = any(state.get(d) == "to run" for d in step.deps)
            if not upstream and records.valid(step.name, inputs) is not None:
                state[step.name] = "up to date"
            elif step.temporary:
                state[step.name] = "not needed"  # until a reader must run
            else:
                state[step.name] = "to run"
                for d in step.deps:
                    if state.get(d) == "not needed":
                        state[d] = "to run"
    return state


def run_plan(
    plan: Plan,
    records: Records,
    executor: Executor,
    *,
    logs: Path,
    jobs: int = 1,
    budget: int,
    on_event: Event = lambda *_: None,
) -> dict[str, StepResult]:
    """Every step's result, by name. ``budget``: the memory the running steps may need together.

    A temporary step (``Step.temporary``: the shared lossless GGUF) waits, once its own inputs are
    known, until a step that reads it must run; the steps that read it fingerprint its inputs, not its
    files, so removing it after use (once every reader has succeeded) makes nothing stale."""
    results: dict[str, StepResult] = {}
    planned = {s.name for s in plan.steps}
    waiting = plan.waiting_on()
    readers = {s.name: waiting[s.name] for s in plan.steps if s.temporary}
    rank = critical_path(plan)
    pending = sorted(plan.steps, key=lambda s: -rank[s.name])  # stable: ties keep the plan's order
    running: dict[str, tuple[Any, Step, str, float]] = {}
    on_demand: dict[str, tuple[Step, str]] = {}  # temporary steps not run (yet): nothing needed them
    temp_inputs: dict[str, str] = {}

    def has_room(step: Step) -> bool:
        in_use = sum(s.memory for _, s, _, _ in running.values())
        return len(running) < max(1, jobs) and (not running or in_use + step.memory <= budget)

    def launch(step: Step, inputs: str) -> None:
        on_event("start", step, None)
        running[step.name] = (executor.start(step, logs / f"{step.name}.log"), step, inputs, time.monotonic())

    try:
        while pending or running:
            progressed = False
            for step in list(pending):
                waiting = {p.name for p in pending} | set(running)
                if any(d in waiting for d in step.deps if d in planned):
                    continue
                if (why := _blocked_by(step, results)) is not None:
                    pending.remove(step)
                    results[step.name] = StepResult(step.name, "blocked", message=why)
                    on_event("blocked", step, results[step.name])
                    progressed = True
                    continue
                inputs = step_inputs(step, records, temp_inputs)
                if step.temporary:
                    temp_inputs[step.name] = inputs
                rec = records.valid(step.name, inputs)
                if rec is not None:
                    pending.remove(step)
                    code = int(rec["output"].get("exit_code", 0)) if isinstance(rec["output"], dict) else 0
                    results[step.name] = StepResult(step.name, "skipped", 0.0, code, rec["output"],
                                                    node=rec.get("node", ""))  # fmt: skip
                    on_event("skipped", step, results[step.name])
                    progressed = True
                    continue
                if step.temporary:
                    pending.remove(step)
                    on_demand[step.name] = (step, inputs)
                    progressed = True
                    continue
                if needed := [d for d in step.deps if d in on_demand]:  # it must run: make what it reads first
                    for d in needed:
                        if has_room(on_demand[d][0]):
                            launch(*on_demand.pop(d))
                            progressed = True
                    continue
                if has_room(step):
                    pending.remove(step)
                    launch(step, inputs)
                    progressed = True
            for name, (handle, step, inputs, t0) in list(running.items()):
                done = executor.poll(handle)
                if done is None:
                    continue
                del running[name]
                progressed = True
                seconds = time.monotonic() - t0
                log = logs / f"{name}.log"
                if done.exit_code in step.ok_codes:
                    data = {**done.output, "exit_code": done.exit_code}
                    records.save(
                        name,
                        inputs,
                        fingerprint(step.outputs()),
                        data,
                        seconds,
                        done.where,
                        argv=[str(a) for a in step.argv],
                        threads=step.threads,
                    )
                    results[name] = StepResult(name, "done", seconds, done.exit_code, data, "", done.peak_rss_bytes,
                                               str(log), done.where)  # fmt: skip
                else:
                    message = failure_message(done.exit_code, done.output, log, seconds, done.peak_rss_bytes)
                    results[name] = StepResult(name, "failed", seconds, done.exit_code, done.output, message,
                                               done.peak_rss_bytes, str(log), done.where)  # fmt: skip
                on_event("finish", step, results[name])
            _remove_used(plan, readers, results, on_event)
            if not progressed:
                time.sleep(0.05)
    except BaseException:  # Ctrl-C, or SIGTERM raised as KeyboardInterrupt: no step outlives the build
        for handle, *_ in running.values():
            executor.stop(handle)
        raise
    for name, (step, _) in on_demand.items():
        results[name] = StepResult(name, "skipped", message="not needed: every step that reads it is up to date")
        on_event("skipped", step, results[name])
    return results


def _remove_used(plan: Plan, readers: dict[str, list[str]], results: dict[str, StepResult], on_event: Event) -> None:
    """Remove a temporary step's outputs once every step that reads them has succeeded (kept when one
    failed, so that the rerun does not write them again)."""
    for step in plan.steps:
        r = results.get(step.name)
        if step.name not in readers or r is None or r.status not in ("done", "skipped") or r.output.get("removed"):
            continue
        if all(results.get(u) is not None and results[u].status in ("done", "skipped") for u in readers[step.name]):
            for f in step.outputs():
                Path(f).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    Path(f).parent.rmdir()  # its own folder, if nothing else is in it
            r.output = {**r.output, "removed": True}
            on_event("removed", step, r)
