"""`model-release gptq`: an HF model folder -> a GPTQ folder that transformers, vLLM and GPTQModel load."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from release.choices import BITS
from release.cli._output import JSON_HELP, QUIET_HELP, human_bytes, run_or_json, stdout

if TYPE_CHECKING:
    from release.formats.gptq import GPTQResult
    from release.progress import Reporter


def _group_size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter("a number (64, 128, ...), -1 for per-channel, or auto") from None


def gptq_command(
    src: Path = typer.Argument(..., help="HF folder of a supported architecture (config.json, weights, tokenizer)."),
    out: Path = typer.Option(..., "--output", "-o", help="GPTQ folder to write (must be empty unless --force)."),
    bits: int = typer.Option(4, "--bits", help=f"Bits per weight: {', '.join(map(str, BITS))}."),
    group_size: str = typer.Option(
        "auto",
        "--group-size",
        help="Weights per quantization group, -1 for one group per row. auto: 128, or the largest of 64/32 "
        "that divides every layer width (SmolLM2's 576 needs 64).",
    ),
    desc_act: bool = typer.Option(
        False, "--desc-act/--no-desc-act", help="Quantize columns by decreasing activation (act-order)."
    ),
    sym: bool = typer.Option(True, "--sym/--no-sym", help="Symmetric quantization (what most kernels expect)."),
    calibration: Path | None = typer.Option(
        None,
        "--calibration",
        help="Calibration text: .txt (one document per line) or .jsonl (a text field). "
        "Default: the built-in medical + general set (28 documents, about 5.6k tokens).",
    ),
    samples: int | None = typer.Option(
        None, "--samples", help="Calibration windows to use (default: every window the text gives)."
    ),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for window order and GPTQModel: same seed, same result."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    method: str = typer.Option(
        "gptq", "--method", help="gptq, or rtn: plain round-to-nearest, no calibration (the baseline GPTQ must beat)."
    ),
    metadata_file: Path | None = typer.Option(
        None, "--metadata", help="Release file (JSON/YAML): name, version, license, base models -> shard metadata."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Quantize with GPTQModel into the standard GPTQ layout (qweight/qzeros/scales/g_idx,
    quantize_config.json, quantization_config in config.json), tokenizer and chat template included.

    Everything is checked before the slow part: the architecture, the tokenizer, the group size against
    the layer widths, the calibration text. The output appears only when complete; its configs carry
    no machine-local paths and name the quantizer versions; its shards carry the source checkpoint
    hash and license fields. Check it against the source with `model-release validate`.
    Exit codes: 0 done, 1 quantization failed, 2 bad input.
    """
    chosen_group_size = _group_size(group_size)

    def work(rep: Reporter) -> GPTQResult:
        from release.formats.gptq import GPTQSettings, quantize
        from release.metadata import ReleaseMetadata

        settings = GPTQSettings(
            bits=bits,
            group_size=chosen_group_size,
            desc_act=desc_act,
            sym=sym,
            samples=samples,
            seq_len=seq_len,
            seed=seed,
            device=device,
            method=method,
        )
        metadata = ReleaseMetadata.from_file(metadata_file) if metadata_file else None
        return quantize(src, out, settings, calibration=calibration, metadata=metadata, force=force, reporter=rep)

    result = run_or_json(work, as_json=as_json, quiet=quiet)
    if result is None:
        return
    for w in result.warnings:
        stdout.print(f"[yellow]warning:[/] {w}", highlight=False)
    cal = result.calibration
    calib = f", {cal['samples']} x {cal['seq_len']} tokens of {cal['name']}" if cal else ", no calibration"
    stdout.print(
        f"{result.variant} ({result.method}) -> {result.output}: {human_bytes(result.total_bytes)} in "
        f"{len(result.files)} files; {result.layers} layers on {result.device} in {result.quantize_seconds:.1f} s"
        f"{calib}; peak RSS {result.peak_rss_mb:.0f} MB",
        highlight=False,
    )
    stdout.print(f"source checkpoint hash {result.source_checkpoint_hash}", highlight=False)
