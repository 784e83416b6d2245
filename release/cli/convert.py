"""`model-release convert`: any supported checkpoint -> sharded safetensors HF folder."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from release.choices import CAST_CHOICES
from release.cli._output import JSON_HELP, QUIET_HELP, human_bytes, run_or_json, stdout

if TYPE_CHECKING:
    from release.formats.safetensors import ConvertResult
    from release.progress import Reporter

DType = Enum("DType", {k: k for k in CAST_CHOICES}, type=str)  # keep | bf16 | fp16 | fp32


def convert_command(
    src: Path = typer.Argument(
        ...,
        help="HF folder (.safetensors or .bin shards, with or without index) "
        "or a single state-dict file (.bin/.pt/.pth/.safetensors) next to config.json.",
    ),
    out: Path = typer.Option(..., "--output", "-o", help="Folder to create (written beside, then renamed)."),
    dtype: DType = typer.Option(
        "keep", "--dtype", help="Output dtype of float tensors; integer tensors are never cast."
    ),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest shard, e.g. 5GB, 500MB, 2GiB."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists and is not empty."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Write NaN/Inf weights instead of failing."),
    metadata_file: Path | None = typer.Option(
        None, "--metadata", help="Release file (JSON/YAML): name, version, license, base models -> shard metadata."
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Convert a checkpoint to sharded safetensors, streaming one tensor at a time.

    Every tensor written is read back and compared with the source (bit for bit with --dtype keep,
    after the cast otherwise). Exit codes: 0 done, 1 the written output failed its check,
    2 bad input (unreadable, unsafe or inconsistent checkpoint, disk full).
    """

    def work(rep: Reporter) -> ConvertResult:
        from release.formats.safetensors import convert
        from release.metadata import ReleaseMetadata

        return convert(
            src,
            out,
            dtype=DType(dtype).value,
            max_shard_size=max_shard_size,
            force=force,
            allow_nonfinite=allow_nonfinite,
            metadata=ReleaseMetadata.from_file(metadata_file) if metadata_file else None,
            reporter=rep,
        )

    result = run_or_json(work, as_json=as_json, quiet=quiet)
    if result is None:
        return
    from rich.table import Table

    table = Table(title=f"{result.output}", show_header=True, header_style="bold")
    table.add_column("shard")
    table.add_column("tensors", justify="right")
    table.add_column("size", justify="right")
    for s in result.shards:
        table.add_row(s["file"], str(s["tensors"]), human_bytes(s["bytes"]))
    stdout.print(table)
    for d in result.dropped:
        stdout.print(f"dropped {d['name']}: {d['reason']}", highlight=False)
    stdout.print(
        f"{result.parameters / 1e6:.1f}M parameters from {result.source_layout} ({result.source_format}), "
        f"dtype {result.dtype}, verified, {result.seconds:.1f} s\n"
        f"source checkpoint hash {result.source_checkpoint_hash}",
        highlight=False,
    )
