"""`model-release gguf`: an HF checkpoint -> GGUF files for llama.cpp, one per requested type."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from release.choices import gguf_type_names
from release.cli._output import (
    CALIBRATION_HELP,
    FORWARD_HELP,
    IMATRIX_HELP,
    JSON_HELP,
    QUIET_HELP,
    human_bytes,
    run_or_json,
    stdout,
)

if TYPE_CHECKING:
    from release.formats.gguf import GGUFResult
    from release.metadata import ReleaseMetadata
    from release.progress import Reporter


def release_metadata(
    metadata_file: Path | None,
    name: str | None,
    version: str | None,
    license: str | None,
    base_models: list[str],
    repo_url: str | None,
    quantized_by: str | None,
    source_repo_url: str | None = None,
) -> ReleaseMetadata:
    """A metadata file, overridden by the flags given on the command line."""
    from release.metadata import BaseModel, ReleaseMetadata

    meta = ReleaseMetadata.from_file(metadata_file) if metadata_file else ReleaseMetadata()
    changes: dict[str, object] = {
        k: v
        for k, v in {
            "name": name,
            "version": version,
            "license": license,
            "repo_url": repo_url,
            "quantized_by": quantized_by,
            "source_repo_url": source_repo_url,
        }.items()
        if v is not None
    }
    if base_models:
        changes["base_models"] = tuple(BaseModel.from_repo(b) for b in base_models)
    meta = meta.with_(**changes)
    meta.check()
    return meta


def gguf_command(
    src: Path = typer.Argument(..., help="HF checkpoint folder of a supported architecture (e.g. `convert` output)."),
    out: Path = typer.Option(..., "--output", "-o", help="Folder for the .gguf files (created if missing)."),
    types: list[str] = typer.Option(
        ["Q8_0"], "--type", "-t", help=f"GGUF type, repeatable. One of: {', '.join(gguf_type_names())}."
    ),
    name: str | None = typer.Option(None, "--name", help="general.name and file prefix (default: SRC folder name)."),
    version: str | None = typer.Option(None, "--version", help="general.version."),
    license: str | None = typer.Option(None, "--license", help="License id of the weights, e.g. llama2, apache-2.0."),
    base_model: list[str] = typer.Option([], "--base-model", help="Hub repo id this model derives from (repeatable)."),
    repo_url: str | None = typer.Option(None, "--repo-url", help="Where this release is published."),
    quantized_by: str | None = typer.Option(None, "--quantized-by", help="general.quantized_by."),
    source_repo_url: str | None = typer.Option(
        None, "--source-repo-url", help="Where the source checkpoint is published (general.source.*)."
    ),
    metadata_file: Path | None = typer.Option(None, "--metadata", help="Release metadata JSON (flags override it)."),
    split_max_size: str | None = typer.Option(
        None,
        "--split-max-size",
        help="Write files larger than this (e.g. 48GB: the Hub advises files under 50 GB) as llama.cpp's split "
        "set NAME-TYPE-00001-of-0000N.gguf, which llama.cpp loads from the first part.",
    ),
    imatrix: str = typer.Option("auto", "--imatrix", help=IMATRIX_HELP),
    calibration: Path | None = typer.Option(None, "--calibration", help=CALIBRATION_HELP),
    imatrix_chunks: int | None = typer.Option(
        None,
        "--imatrix-chunks",
        min=1,
        help="With --imatrix auto: 512-token chunks of the calibration text to collect it on (default: all "
        "the text gives), as `imatrix --chunks` and the release file's imatrix_chunks.",
    ),
    device: str = typer.Option("cpu", "--device", help="torch device for collecting the imatrix (cpu, cuda)."),
    forward: str = typer.Option("auto", "--forward", help=FORWARD_HELP),
    intermediate: Path | None = typer.Option(
        None,
        "--intermediate",
        help="Quantize the llama.cpp types from this lossless GGUF (this source's F16/BF16/F32 file, written "
        "with the same metadata) instead of writing one: a build shares one among its k-quant steps.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace existing output files."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Write NaN/Inf weights instead of failing."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Write `OUT/<name>-<TYPE>.gguf` for every --type, reading the source once.

    F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 are converted directly; the k-quant mixes (Q6_K ... Q2_K)
    and the IQ types are made by llama.cpp's quantizer from a lossless intermediate, with an
    importance matrix collected from SRC on calibration text (--imatrix). Each file carries the
    tokenizer, chat template, hyper-parameters, license and lineage metadata, and the source
    checkpoint hash. Exit codes: 0 done, 1 a written file failed its check, 2 bad input.
    """

    def work(rep: Reporter) -> GGUFResult:
        from release.formats.gguf import write_gguf
        from release.formats.safetensors import parse_size

        return write_gguf(
            src,
            out,
            types,
            name=name,
            metadata=release_metadata(
                metadata_file, name, version, license, base_model, repo_url, quantized_by, source_repo_url
            ),
            force=force,
            split_max_size=parse_size(split_max_size) if split_max_size else None,
            allow_nonfinite=allow_nonfinite,
            imatrix=imatrix,
            calibration=calibration,
            imatrix_chunks=imatrix_chunks,
            device=device,
            forward=forward,
            intermediate=intermediate,
            reporter=rep,
        )

    result = run_or_json(work, as_json=as_json, quiet=quiet)
    if result is None:
        return
    from rich.table import Table

    table = Table(title=result.output_dir, header_style="bold")
    for col in ("type", "file", "size", "imatrix", "tensor types"):
        table.add_column(col)
    for o in result.outputs:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(o.tensor_types.items()))
        file = f"{o.file} ... ({len(o.parts)} parts)" if o.parts else o.file
        table.add_row(o.type, file, human_bytes(o.bytes), "yes" if o.imatrix else "no", kinds)
    stdout.print(table)
    if result.imatrix:
        im = result.imatrix
        made = f", collected in {im['seconds']:.1f} s ({im['forward']} on {im['device']})" if "seconds" in im else ""
        stdout.print(f"imatrix {im['path']}: {im['entries']} matrices, {im['chunks']} chunks of {im['chunk_size']} "
                     f"tokens of {', '.join(im['datasets'])}{made}", highlight=False)  # fmt: skip
    for o in result.outputs:
        if o.fallbacks:
            stdout.print(
                f"{o.type}: {len(o.fallbacks)} tensor(s) use a fallback type, e.g. {o.fallbacks[0]}", highlight=False
            )
    stdout.print(f"source checkpoint hash {result.source_checkpoint_hash}, {result.seconds:.1f} s", highlight=False)
