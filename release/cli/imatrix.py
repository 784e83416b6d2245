"""`model-release imatrix`: an importance matrix for llama.cpp's k-quant and IQ types."""

from __future__ import annotations

from pathlib import Path

import typer

from release.cli._output import CALIBRATION_HELP, FORWARD_HELP, JSON_HELP, QUIET_HELP, run_or_json, stdout


def imatrix_command(
    src: Path = typer.Argument(..., help="The source checkpoint (HF folder) the GGUF variants are made from."),
    out: Path = typer.Option(..., "--output", "-o", help="imatrix file to write (llama.cpp's GGUF imatrix format)."),
    calibration: Path | None = typer.Option(None, "--calibration", help=CALIBRATION_HELP),
    chunk_size: int = typer.Option(512, "--chunk-size", min=16, help="Tokens per chunk (llama-imatrix's -c)."),
    chunks: int | None = typer.Option(None, "--chunks", min=1, help="Chunks to use (default: all the text gives)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffle that orders the chunks."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu, cuda."),
    forward: str = typer.Option("auto", "--forward", help=FORWARD_HELP),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Collect the mean squared input activation per column of every decoder-layer weight matrix
    on calibration text, in float32, one layer at a time when the model does not fit, and write it
    as llama.cpp's imatrix file (`gguf --imatrix FILE`, or `llama-quantize --imatrix FILE`).

    Exit codes: 0 written, 2 bad input.
    """

    from release.formats.imatrix import IMatrixResult, collect_to_file

    result: IMatrixResult | None = run_or_json(
        lambda rep: collect_to_file(
            src,
            out,
            force=force,
            calibration=calibration,
            chunk_size=chunk_size,
            chunks=chunks,
            seed=seed,
            device=device,
            forward=forward,
            reporter=rep,
        ),
        as_json=as_json,
        quiet=quiet,
    )
    if result is None:
        return
    stdout.print(
        f"{result.output}: {result.entries} matrices, {result.chunks} chunks of {result.chunk_size} tokens, "
        f"{result.forward} forward on {result.device}, {result.seconds:.1f} s "
        f"({result.seconds_per_1000_tokens:.2f} s per 1000 tokens)",
        highlight=False,
    )
