"""`model-release inspect`: what a checkpoint, safetensors folder or GGUF file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from release.cli._output import JSON_HELP, human_bytes, print_json, run, stdout


def inspect_command(
    path: Path = typer.Argument(
        ..., help="Checkpoint folder, single weights file, .gguf file, or a release folder (its build record)."
    ),
    with_hash: bool = typer.Option(
        False,
        "--hash",
        help="Read every tensor and compute the checkpoint hash "
        "(compare with a converted output's recorded source hash).",
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show architecture, parameters, dtypes, files, size and license/provenance metadata. For a
    release folder with a build record (provenance.intoto.jsonl): from what, with which tools and
    settings, when and where it was built (shown, not checked: `verify --public-key` checks it)."""
    from release.manifest import PROVENANCE

    record = path.is_dir() and (path / PROVENANCE).is_file()

    def work(rep: Any) -> dict[str, Any]:
        from release.inspect import describe

        out: dict[str, Any] = {}
        if record:
            from release.provenance import read, summary

            out["provenance"] = summary(read(path))
            if not (path / "config.json").is_file():  # a GGUF folder: the record is what there is to show
                return {"kind": "release folder", **out}
        return describe(path, with_hash=with_hash, reporter=rep) | out

    info = run(work, as_json=as_json)
    if as_json:
        print_json(info)
        return
    if "provenance" in info:
        _print_provenance(path, info["provenance"])
        if info.get("kind") == "release folder":
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


def _print_provenance(path: Path, p: dict[str, Any]) -> None:
    """Lines, not a table: hashes and commands stay whole for copying, at any terminal width."""
    m = p.get("machine") or {}
    rows = [
        ("repository", f"{p['repository']} {p['version'] or ''}".strip()),
        ("source checkpoint", p["source_checkpoint_hash"] or "not recorded"),
        ("release file sha256", p["release_file_sha256"] or "not recorded"),
        ("built", f"{p['started'] or '?'} -> {p['finished']}"),
        ("builder", p["builder"]),
        ("machine", f"{m.get('host', '?')}: {m.get('cpu', '?')} x{m.get('cpus', '?')}; "
                    f"GPU: {', '.join(m.get('gpus') or []) or 'none'}"),
        ("tools", ", ".join(f"{k} {v}" for k, v in p["tools"].items())),
        *((name, f"sha256 {digest}" if digest else "missing") for name, digest in p["texts"].items()),
        *([("settings", json.dumps(p["settings"], sort_keys=True))] if p.get("settings") else []),
        ("files recorded", str(p["files"])),
    ]  # fmt: skip
    stdout.print(f"{path}: build record (shown, not checked: `verify --public-key` checks it)", highlight=False)
    for k, v in rows:
        stdout.print(f"  {k}: {v}", highlight=False, soft_wrap=True)
    stdout.print(f"  steps ({len(p['steps'])}):", highlight=False)
    for s in p["steps"]:
        stdout.print(f"    {s['name']}: {s['command']}", highlight=False, soft_wrap=True)
