"""`model-release build`: run the whole release from a release file, resumably."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from release.cli._output import JSON_HELP, QUIET_HELP, human_bytes, print_json, run, stderr, stdout

ExecutorName = Enum("ExecutorName", {k: k for k in ("local", "ray")}, type=str)  # release/pipeline/build.py


def build_command(
    release_file: Path = typer.Argument(
        ..., help="Release file (YAML/JSON; shape: release/data/schemas/release_file.schema.json)."
    ),
    dist: Path = typer.Option(Path("dist"), "--output", "-o", help="Where `DIST/<name>-<version>/` is built."),
    only: str | None = typer.Option(
        None, "--only", help="Comma-separated families to build: safetensors, gguf, gptq (no cards/manifest/signature)."
    ),
    jobs: int | None = typer.Option(
        None,
        "--jobs",
        "-j",
        min=1,
        help="Independent steps run at once (local: default 1, within free memory; ray: default as many as "
        "the cluster has CPUs for, Ray placing each by its memory, GPU and CPU needs).",
    ),
    executor: ExecutorName = typer.Option(
        ExecutorName.local,
        "--executor",
        help="Where steps run: local (child processes of this one) or ray (tasks on the Ray cluster at "
        "RAY_ADDRESS, else `ray.init('auto')`; the output folder must be on storage every node mounts; "
        "needs the cluster extra).",
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        help="Threads of every step (its OMP_NUM_THREADS; a Ray task's CPU request). Default: this "
        "machine's CPUs. The same value gives the same bytes on any executor.",
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto (CUDA when present), cpu or cuda: GPTQ, reference, validation."
    ),
    key: Path | None = typer.Option(None, "--key", help="Signing key (overrides the release file's signing section)."),
    verbose: bool = typer.Option(
        False, "--verbose", help="Show the steps' own stderr (library warnings too) instead of DIST/.work/logs/."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the plan and run nothing: each step's threads, memory, GPU memory and disk (to size a "
        "cluster's nodes), what it comes after, and whether a rerun would redo it. Writes nothing.",
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Build a release: convert -> reference logits -> each variant (GGUF types, GPTQ) -> validation
    -> cards and license files -> manifest -> signature, into `DIST/<name>-<version>/` with one folder
    per repository to publish.

    Each step records the hash of its inputs in `DIST/<name>-<version>/.steps/`: a rerun after success
    does nothing, a rerun after a crash or kill -9 redoes only the unfinished step, and changing one
    GGUF type rebuilds that file and what depends on it. A bad key or a license violation in the
    release file fails before any heavy work, and so does a plan that cannot fit this machine: each
    step's memory, GPU memory and disk are estimated from the model's shapes and checked against
    what is available (the reference and transformers validation run one decoder layer at a time
    when the float32 model does not fit, so a 7B model needs ~2 GB and a 70B one ~4.5 GB). Each
    step's stderr goes to `DIST/<name>-<version>/.work/logs/<step>.log`. With --executor ray, each step
    must fit one node of the Ray cluster instead and runs there, with the same records and the same
    bytes (docs/cluster.md).

    Exit codes: 0 built and every variant passed, 1 a validation or license check failed, 2 bad input."""
    from release.pipeline import build

    families = {f.strip() for f in only.split(",") if f.strip()} if only else None
    if dry_run:
        _dry_run(release_file, dist, families, device, key, executor.value, threads, as_json, quiet)
        return

    def event(kind: str, step: object, result: object) -> None:
        if as_json or quiet:
            return
        name = getattr(step, "name", "?")
        if kind == "start":
            stderr.print(f"[bold]>[/] {name} ...", highlight=False)
        elif kind == "skipped":
            why = getattr(result, "message", "") or "up to date"
            stderr.print(f"[dim]= {name}: {why}[/]", highlight=False)
        elif kind == "removed":
            stderr.print(f"[dim]- {name}: removed, every step that reads it is done[/]", highlight=False)
        elif kind == "blocked":
            stderr.print(f"[yellow]- {name}: not run ({getattr(result, 'message', '')})[/]", highlight=False)
        elif result is not None and getattr(result, "status", "") == "failed":
            stderr.print(f"[red]x {name} failed:[/] {escape(getattr(result, 'message', ''))}", highlight=False)
        else:
            code = getattr(result, "exit_code", 0)
            mark = "[yellow]![/]" if code else "[green]ok[/]"
            peak = human_bytes(getattr(result, "peak_rss_bytes", 0))
            on = f", on {result.node}" if executor != ExecutorName.local and getattr(result, "node", "") else ""
            stderr.print(f"{mark} {name} ({getattr(result, 'seconds', 0):.1f} s, peak {peak}{on})", highlight=False)

    result = run(
        lambda rep: build(
            release_file,
            dist,
            only=families,
            jobs=jobs,
            device=device,
            key=key,
            verbose=verbose,
            executor=executor.value,
            threads=threads,
            on_event=event,
        ),
        as_json=as_json,
        quiet=quiet,
    )
    if as_json:
        print_json(result.to_dict())
        raise typer.Exit(result.exit_code)
    table = Table(title=f"{result.release_dir} ({result.seconds:.0f} s)", header_style="bold")
    for col in ("variant", "size", "mean KL", "top-1", "result"):
        table.add_column(col, justify="right" if col in ("size", "mean KL", "top-1") else "left")
    for v in result.variants:
        passed = v.get("passed")
        verdict = "[green]pass[/]" if passed else ("[red]FAIL[/]" if passed is False else "-")
        kl = f"{v['kl_mean']:.2e}" if v.get("kl_mean") is not None else "-"
        top1 = f"{v['top1_agreement']:.3f}" if v.get("top1_agreement") is not None else "-"
        table.add_row(f"{v['family']} {v['variant']}", human_bytes(v["bytes"]), kl, top1, verdict)
    stdout.print(table)
    done = sum(s.status == "done" for s in result.steps)
    skipped = sum(s.status == "skipped" for s in result.steps)
    stdout.print(f"{done} step(s) run, {skipped} up to date", highlight=False)
    for s in result.steps:
        if s.status in ("failed", "blocked"):
            stdout.print(f"[red]{s.name}: {s.status}[/] {s.message}", highlight=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _dry_run(
    release_file: Path,
    dist: Path,
    families: set[str] | None,
    device: str,
    key: Path | None,
    executor: str,
    threads: int | None,
    as_json: bool,
    quiet: bool,
) -> None:
    from release.pipeline.build import preview_build

    plan = run(lambda _: preview_build(release_file, dist, only=families, device=device, key=key, executor=executor,
                                       threads=threads), as_json=as_json, quiet=quiet)  # fmt: skip
    if as_json:
        print_json(plan.to_dict())
        raise typer.Exit(plan.exit_code)
    title = f"{plan.release_dir}: the plan, {plan.threads} thread(s) a step, {plan.executor} executor (nothing run)"
    table = Table(title=title, header_style="bold")
    for col in ("step", "would", "after", "memory", "GPU memory", "disk"):
        table.add_column(col, justify="right" if col in ("memory", "GPU memory", "disk") else "left")
    for s in plan.steps:
        gpu = human_bytes(s.gpu) if s.gpu else "-"
        table.add_row(s.name, s.status, ", ".join(s.after) or "-", human_bytes(s.ram), gpu, human_bytes(s.disk))
    stdout.print(table)
    if plan.refused:
        stderr.print(f"[red]error:[/] the build would stop before any step: {escape(plan.refused)}", highlight=False)
        raise typer.Exit(plan.exit_code)
