"""The scheduler: runs a plan's steps through an executor in dependency order, executor-neutral.

It decides, for each step in turn: blocked (an earlier step failed, or a validation it follows
said no), skipped (its record matches its inputs), or started (when ``jobs`` and the memory budget
leave room). The executor only starts and polls; records, events and failure lines are made here,
so every executor behaves the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from release.pipeline.local import Executor, failure_message
from release.pipeline.records import Records, digest, fingerprint
from release.pipeline.steps import Plan, Step, StepResult

Event = Callable[[str, Step, "StepResult | None"], None]


def _blocked_by(step: Step, results: dict[str, StepResult]) -> str | None:
    if any(results.get(d) and results[d].status in ("failed", "blocked") for d in step.deps):
        return "an earlier step failed"
    failed = [d for d in step.deps if d.startswith("validate-") and results.get(d) and results[d].exit_code == 1]
    return f"{failed[0]} failed" if failed else None


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
    """Every step's result, by name. ``budget``: the memory the running steps may need together."""
    results: dict[str, StepResult] = {}
    planned = {s.name for s in plan.steps}
    pending = list(plan.steps)
    running: dict[str, tuple[Any, Step, str, float]] = {}
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
                inputs = digest({"argv": step.digest_argv(), "settings": step.settings,
                                 "deps": {d: records.fingerprint(d) for d in step.deps}})  # fmt: skip
                rec = records.valid(step.name, inputs)
                if rec is not None:
                    pending.remove(step)
                    code = int(rec["output"].get("exit_code", 0)) if isinstance(rec["output"], dict) else 0
                    results[step.name] = StepResult(step.name, "skipped", 0.0, code, rec["output"])
                    on_event("skipped", step, results[step.name])
                    progressed = True
                    continue
                in_use = sum(s.memory for _, s, _, _ in running.values())
                if len(running) >= max(1, jobs) or (running and in_use + step.memory > budget):
                    continue
                on_event("start", step, None)
                handle = executor.start(step, logs / f"{step.name}.log")
                running[step.name] = (handle, step, inputs, time.monotonic())
                pending.remove(step)
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
                    records.save(name, inputs, fingerprint(step.outputs()), data, seconds)
                    results[name] = StepResult(name, "done", seconds, done.exit_code, data, "", done.peak_rss_bytes,
                                               str(log))  # fmt: skip
                else:
                    message = failure_message(done.exit_code, done.output, log, seconds, done.peak_rss_bytes)
                    results[name] = StepResult(name, "failed", seconds, done.exit_code, done.output, message,
                                               done.peak_rss_bytes, str(log))  # fmt: skip
                on_event("finish", step, results[name])
            if not progressed:
                time.sleep(0.05)
    except BaseException:  # Ctrl-C, or SIGTERM raised as KeyboardInterrupt: no step outlives the build
        for handle, *_ in running.values():
            executor.stop(handle)
        raise
    return results
