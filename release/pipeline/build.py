"""``model-release build``: load the release file, plan, check that the plan fits, tidy what an
earlier run left, run the steps through an executor, and sum up (the final table's rows)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from release.atomic import PARTIAL_MARK, atomic_file, is_stale_partial
from release.errors import BadInputError
from release.formats.gguf_names import set_name, variant_files
from release.pipeline.local import Executor, LocalExecutor
from release.pipeline.plan import LOSSLESS_STEP, check_fits, plan_build
from release.pipeline.ray_executor import Node, RayExecutor
from release.pipeline.records import STEPS_DIR, WORK_DIR, Records
from release.pipeline.release_file import ReleaseFile, dist_copy, load_release_file
from release.pipeline.schedule import preview, run_plan
from release.pipeline.steps import FAMILIES, Plan, Step, StepResult
from release.resources import mem_available


@dataclass
class BuildResult:
    release_dir: str
    ok: bool
    exit_code: int
    steps: list[StepResult]
    variants: list[dict[str, Any]]
    seconds: float
    executor: str = "local"
    threads: int = 1  # every step's OMP_NUM_THREADS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build(
    release_file: Path,
    dist_root: Path = Path("dist"),
    *,
    only: set[str] | None = None,
    jobs: int | None = None,
    device: str = "auto",
    key: Path | None = None,
    verbose: bool = False,
    executor: Executor | str | None = None,
    threads: int | None = None,
    on_event: Callable[[str, Step, StepResult | None], None] = lambda *_: None,
) -> BuildResult:
    """Run the plan. ``executor``: ``local`` (the default: child processes of this one, ``jobs`` at a
    time within free memory), ``ray`` (Ray tasks on the cluster at ``RAY_ADDRESS``, as many at once as
    it has CPUs for), or an ``Executor``. ``threads``: every step's thread count, whatever runs it.
    ``verbose``: steps' stderr (library warnings included) goes to the terminal instead of
    DIST/.work/logs/<step>.log."""
    started = time.monotonic()
    rf, plan, kind, runner, nodes = _prepare(release_file, dist_root, only, device, key, executor, threads, verbose)
    check_fits(plan, Records(plan.dist) if (plan.dist / STEPS_DIR).is_dir() else None, nodes)
    if isinstance(runner, RayExecutor):
        assert nodes is not None
        runner.check_shared_storage(plan.dist, nodes)
        at_once, budget = runner.capacity(plan.steps[0].threads, nodes)
    else:
        at_once, budget = 1, mem_available()
    plan.dist.mkdir(parents=True, exist_ok=True)
    logs = plan.dist / WORK_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    copy = plan.dist / "release.yaml"
    body = dist_copy(rf)
    if not copy.is_file() or copy.read_bytes() != body:
        with atomic_file(copy, force=True) as tmp:
            tmp.write_bytes(body)
    _tidy(plan, rf)
    try:
        results = run_plan(plan, Records(plan.dist), runner, logs=logs, jobs=jobs or at_once, budget=budget,
                           on_event=on_event)  # fmt: skip
    finally:
        if (close := getattr(runner, "close", None)) is not None:  # the local executor's step launcher
            close()
    ordered = [results[s.name] for s in plan.steps]
    variants = _variant_rows(plan, results)
    failed = [r for r in ordered if r.status == "failed"]
    bad_validation = [v for v in variants if v.get("passed") is False]
    code = max(2 if r.exit_code == 2 else 1 for r in failed) if failed else int(bool(bad_validation))
    return BuildResult(str(plan.dist), code == 0, code, ordered, variants, round(time.monotonic() - started, 2),
                       kind, plan.steps[0].threads)  # fmt: skip


@dataclass
class PlannedStep:
    """One step of a dry run: what it would do, after what, and what it needs (bytes)."""

    name: str
    family: str
    status: str  # up to date | to run | not needed (a temporary step no reader needs)
    after: list[str]
    threads: int
    ram: int
    gpu: int | None
    disk: int
    argv: list[str]


@dataclass
class BuildPreview:
    """``build --dry-run``: the plan, each step's needs and fate, and whether it would be refused."""

    release_dir: str
    ok: bool
    exit_code: int
    executor: str
    threads: int
    steps: list[PlannedStep]
    refused: str = ""  # the refusal the build would stop on, before any step

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": True, **asdict(self)}


def preview_build(
    release_file: Path,
    dist_root: Path = Path("dist"),
    *,
    only: set[str] | None = None,
    device: str = "auto",
    key: Path | None = None,
    executor: Executor | str | None = None,
    threads: int | None = None,
) -> BuildPreview:
    """The build's plan without running or writing anything: for sizing a cluster's nodes (RAM, GPU,
    disk and threads per step) and seeing what a rerun would redo. A refusal of the fit check (a step
    too big for this machine or for every node) is reported with the plan, exit code 2."""
    _, plan, kind, _, nodes = _prepare(release_file, dist_root, only, device, key, executor, threads, False)
    records = Records(plan.dist, create=False)
    refused = ""
    try:
        check_fits(plan, records if records.dir.is_dir() else None, nodes)
    except BadInputError as exc:
        refused = exc.message + (f" ({exc.hint})" if exc.hint else "")
    fate = preview(plan, records)
    steps = [PlannedStep(s.name, s.family, fate[s.name], list(s.deps), s.threads, s.need.ram, s.need.gpu, s.need.disk,
                         [str(a) for a in s.argv[3:]]) for s in plan.steps]  # fmt: skip
    code = 2 if refused else 0
    return BuildPreview(str(plan.dist), not refused, code, kind, plan.steps[0].threads, steps, refused)


def _prepare(
    release_file: Path,
    dist_root: Path,
    only: set[str] | None,
    device: str,
    key: Path | None,
    executor: Executor | str | None,
    threads: int | None,
    verbose: bool,
) -> tuple[ReleaseFile, Plan, str, Executor, list[Node] | None]:
    """The release file read, planned, and its executor ready (with a cluster's nodes): bad input fails
    here, before any work."""
    rf = load_release_file(release_file)  # bad keys and license violations fail here, before heavy work
    if only is not None and (bad := only - set(FAMILIES)):
        raise BadInputError(f"--only takes {', '.join(FAMILIES)}; not {', '.join(sorted(bad))}")
    if threads is not None and threads < 1:
        raise BadInputError(f"--threads must be at least 1, not {threads}")
    kind, runner = _executor(executor, verbose)
    # A cluster's nodes, asked once: each step must fit one, and CUDA steps are planned when a node has
    # a GPU, not this machine. None: steps must fit this machine.
    nodes = runner.nodes() if isinstance(runner, RayExecutor) else None
    cuda = any(n.gpus > 0 for n in nodes) if nodes is not None else None
    plan = plan_build(rf, dist_root, only=only, device=device, key=key, threads=threads, cuda=cuda)
    return rf, plan, kind, runner, nodes


def _executor(executor: Executor | str | None, verbose: bool) -> tuple[str, Executor]:
    if executor is None or executor == "local":
        return "local", LocalExecutor(verbose)
    if executor == "ray":
        return "ray", RayExecutor()
    if isinstance(executor, str):
        raise BadInputError(f"--executor takes local or ray, not {executor}")
    return type(executor).__name__, executor


def _tidy(plan: Plan, rf: ReleaseFile) -> None:
    """Remove what an interrupted run or a changed release file left: temporary files of killed
    steps, and variants the release file no longer asks for (with their records). Only of the
    families this build makes, and only temporaries no live run owns: on a shared workspace
    another runner may be building the other families at the same time."""
    gguf_dir, gptq_dir = plan.dist / f"{rf.name}-GGUF", plan.dist / f"{rf.name}-GPTQ"
    mine = {"gguf": "gguf" in plan.families, "gptq": "gptq" in plan.families}
    for p in list(plan.dist.rglob(".*")):
        if PARTIAL_MARK in p.name:
            stale = is_stale_partial(p)  # its owner's host and process: removed only when that run is gone
        elif p.name.startswith(".model-release-"):  # the GGUF writer's scratch folder (no owner in its name)
            stale = mine["gguf"]
        elif p.name.startswith(".gptq-offload-"):
            stale = mine["gptq"]
        else:
            stale = p.name.endswith(".restamp")
        if stale:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    names = {s.name for s in plan.steps}
    keep = {Path(v["path"]).name for v in plan.variants if v["family"] == "gguf"}
    if mine["gguf"] and gguf_dir.is_dir():
        for f in list(gguf_dir.iterdir()):
            logical = set_name(f.name)
            if f.name.endswith(".gguf") and logical not in keep and f.exists():
                stem = Path(logical).stem
                for g in [*gguf_dir.glob(f"{stem}.*"), *gguf_dir.glob(f"{stem}-*-of-*.gguf")]:
                    g.unlink(missing_ok=True)
        if "imatrix" not in names:  # no longer collected (imatrix: none, or a given file)
            (gguf_dir / f"{rf.name}.imatrix").unlink(missing_ok=True)
    if mine["gguf"] and LOSSLESS_STEP not in names:  # no llama.cpp type left, or the release ships the lossless one
        shutil.rmtree(plan.dist / WORK_DIR / LOSSLESS_STEP, ignore_errors=True)
        (plan.dist / STEPS_DIR / f"{LOSSLESS_STEP}.json").unlink(missing_ok=True)
    for rec in (plan.dist / STEPS_DIR).glob("*.json"):
        gguf_record = rec.stem.startswith(("gguf-", "validate-gguf-")) or rec.stem == "imatrix"
        gptq_record = rec.stem in ("gptq", "validate-gptq")
        if rec.stem not in names and ((gguf_record and mine["gguf"]) or (gptq_record and mine["gptq"])):
            rec.unlink()
            if rec.stem == "gptq":
                shutil.rmtree(gptq_dir, ignore_errors=True)


def _variant_rows(plan: Plan, results: dict[str, StepResult]) -> list[dict[str, Any]]:
    rows = []
    for v in plan.variants:
        path = Path(v["path"])
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".gguf")) \
            if path.is_dir() else sum(f.stat().st_size for f in variant_files(path))  # fmt: skip
        r = results.get(v["validate"])
        row: dict[str, Any] = {"variant": v["name"], "family": v["family"], "path": str(path), "bytes": size}
        variants = (r.output.get("variants") or []) if r else []
        if variants:
            m = variants[0]
            row |= {"kind": m.get("kind"), "kl_mean": m["metrics"].get("kl_mean"),
                    "top1_agreement": m["metrics"].get("top1_agreement"), "passed": m.get("passed")}  # fmt: skip
        rows.append(row)
    return rows
