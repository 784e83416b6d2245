"""`model-release inspect`: what a checkpoint, safetensors folder or GGUF file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from release.cli._output import JSON_HELP, human_bytes, print_json, run, stdout


def inspect_command(
    path: Path = typer.Argument(..., help="Checkpoint folder, single weights file, or .gguf file."),
    with_hash: bool = typer.Option(
        False,
        "--hash",
        help="Read every tensor and compute the checkpoint hash "
        "(compare with a converted output's recorded source hash).",
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show architecture, parameters, dtypes, files, size and license/provenance metadata."""

    def work(rep: Any) -> dict[str, Any]:
        from release.inspect import describe

        return describe(path, with_hash=with_hash, reporter=rep)

    info = run(work, as_json=as_json)
    if as_json:
        print_json(info)
        return
    from rich.table import Table

    table = Table(show_header=False, title=str(path))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    keys = ["kind", "format", "layout", "architecture", "model_type", "name", "file_type", "tokenizer"]
    for key in keys:
        if info.get(key) is not None:
            table.add_row(key, str(info[key]))
    table.add_row("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)")
    table.add_row("tensors", str(info["tensors"]))
    mix = info.get("dtypes") or info.get("tensor_types") or {}
    table.add_row("dtypes" if "dtypes" in info else "tensor types", ", ".join(f"{k}: {v:,}" for k, v in mix.items()))
    table.add_row("size", human_bytes(info["total_bytes"]))
    for f in info.get("files", []):
        table.add_row("  " + f["file"], f"{human_bytes(f['bytes'])}, {f['tensors']} tensors")
    if "extra_files" in info:
        table.add_row("config & tokenizer files", ", ".join(info["extra_files"]) or "none")
    table.add_row("chat template", "yes" if info.get("chat_template") else "no")
    table.add_row("license", ", ".join(f"{k}={v}" for k, v in info.get("license", {}).items()) or "none recorded")
    for k, v in info.get("metadata", {}).items():
        if k not in info.get("license", {}):
            table.add_row("  " + k, str(v))
    if "check" in info:
        table.add_row("architecture check", info["check"])
    if "checkpoint_hash" in info:
        table.add_row("checkpoint hash", info["checkpoint_hash"])
        if "matches_source_hash" in info:
            table.add_row(
                "matches source hash", "yes" if info["matches_source_hash"] else "no (expected after a dtype cast)"
            )
    stdout.print(table)
