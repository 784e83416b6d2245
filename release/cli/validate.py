"""`model-release reference` and `model-release validate`: is every variant close to its source?"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from release.choices import TOP_K
from release.cli._output import FORWARD_HELP, JSON_HELP, QUIET_HELP, print_json, run, run_or_json, stdout

if TYPE_CHECKING:
    from release.progress import Reporter
    from release.validation.reference import ReferenceResult
    from release.validation.validate import ValidationResult


def reference_command(
    src: Path = typer.Argument(..., help="The source checkpoint (HF folder) every variant is compared with."),
    out: Path = typer.Option(..., "--output", "-o", help="Reference file to write (.safetensors)."),
    prompts: Path | None = typer.Option(
        None, "--prompts", help="JSONL evaluation set, one {'id', 'text'} per line (default: built-in medical+general)."
    ),
    max_tokens: int = typer.Option(512, "--max-tokens", min=2, help="Tokens per prompt at most."),
    top_k: int = typer.Option(TOP_K, "--top-k", min=1, help="Reference log-probs kept per token (plus the rest mass)."),
    device: str = typer.Option("cpu", "--device", help="torch device for the source model, e.g. cpu, cuda."),
    forward: str = typer.Option(
        "auto",
        "--forward",
        help=FORWARD_HELP,
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Run the source model in float32 on the evaluation set; store token ids, top-k log-probs and hashes.

    Exit codes: 0 written, 2 bad input.
    """

    def work(rep: Reporter) -> ReferenceResult:
        from release.validation.reference import build_reference

        return build_reference(
            src,
            out,
            prompts_file=prompts,
            max_tokens=max_tokens,
            top_k=top_k,
            device=device,
            forward=forward,
            force=force,
            reporter=rep,
        )

    result = run_or_json(work, as_json=as_json, quiet=quiet)
    if result is None:
        return
    stdout.print(
        f"{result.output}: {result.prompt_count} prompts, {result.predicted_tokens} predicted tokens, "
        f"top-{result.top_k} (mean rest mass {result.mean_rest_mass:.4f}), perplexity {result.perplexity:.3f}, "
        f"{result.seconds_per_1000_tokens:.2f} s per 1000 tokens",
        highlight=False,
    )


def validate_command(
    variants: list[Path] = typer.Argument(..., help="Safetensors folders, GPTQ folders or .gguf files."),
    reference: Path = typer.Option(..., "--reference", "-r", help="File written by `model-release reference`."),
    runtime: str = typer.Option(
        "auto", "--runtime", help="auto (llama.cpp for GGUF, transformers otherwise), transformers, llama.cpp."
    ),
    max_kl: float | None = typer.Option(None, "--max-kl", help="Override the mean-KL threshold."),
    min_top1: float | None = typer.Option(None, "--min-top1", help="Override the top-1 agreement threshold."),
    prompts: Path | None = typer.Option(None, "--prompts", help="The evaluation set the reference was made with."),
    device: str = typer.Option("cpu", "--device", help="torch device for transformers variants."),
    forward: str = typer.Option(
        "auto",
        "--forward",
        help=FORWARD_HELP,
    ),
    reports_dir: Path | None = typer.Option(
        None, "--reports-dir", help="Where a folder variant's reports go (default: beside the folder)."
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Compare variants with the reference: mean and 99th-percentile KL per token, top-1 agreement,
    perplexity ratio, max log-prob difference, against per-kind thresholds
    (release/data/validation_thresholds.json). Writes VARIANT.validation.json, .validation.md and
    .kl.png beside each variant.

    Exit codes: 0 all pass, 1 a variant fails a threshold, 2 bad input (missing file, a reference of
    another model or tokenizer).
    """

    def work(rep: Reporter) -> ValidationResult:
        from release.validation.validate import validate

        return validate(
            variants,
            reference,
            runtime=runtime,
            max_kl=max_kl,
            min_top1=min_top1,
            prompts_file=prompts,
            device=device,
            forward=forward,
            reports_dir=reports_dir,
            reporter=rep,
        )

    result = run(work, as_json=as_json, quiet=quiet)
    failure = result.failure()
    if as_json:
        print_json(result.to_dict())
    else:
        from rich.table import Table

        table = Table(title=f"against {reference}", header_style="bold")
        table.add_column("variant", overflow="fold")
        table.add_column("kind", overflow="fold")
        for col in ("mean KL", "p99 KL", "top-1", "ppl", "result"):
            table.add_column(col, no_wrap=True, justify="right")
        for r in result.variants:
            m = r.metrics
            table.add_row(
                Path(r.variant).name, f"{r.kind} ({r.runtime})", f"{m['kl_mean']:.2e}", f"{m['kl_p99']:.2e}",
                f"{m['top1_agreement']:.3f}", f"{m['perplexity_ratio']:.4f}", "pass" if r.passed else "FAIL",
            )  # fmt: skip
        stdout.print(table)
    if failure is not None:
        print(f"error: {failure.message}", file=sys.stderr)
        raise typer.Exit(failure.exit_code)
