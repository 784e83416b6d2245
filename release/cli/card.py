"""`model-release card` and `model-release license check`."""

from __future__ import annotations

from pathlib import Path

import typer

from release.cli._output import JSON_HELP, print_json, run, stdout
from release.errors import CheckFailedError

license_app = typer.Typer(help="License registry and lineage policy.", no_args_is_help=True)


def card_command(
    release_dir: Path = typer.Argument(..., help="Folder holding release.yaml/.json and the release folders."),
    metadata_file: Path | None = typer.Option(None, "--metadata", help="Release file, if not in RELEASE_DIR."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write README.md (model card) and the license files into every release folder of RELEASE_DIR.

    Release folders: the main safetensors model, a folder of GGUF files, a GPTQ folder. The provided-
    files table takes sizes and sha256 from the files and KL/top-1 from their `.validation.json`.
    Exit codes: 0 written, 1 a license violation or an invalid card, 2 bad input.
    """
    from release.cards import render_cards

    result = run(lambda rep: render_cards(release_dir, metadata_file=metadata_file, reporter=rep), as_json=as_json)
    if as_json:
        print_json(result)
        return
    for c in result["cards"]:
        stdout.print(f"{c['folder']}/README.md ({c['kind']}, {c['repo_id']}) + {', '.join(c['license_files'])}")


@license_app.command("check")
def license_check_command(
    release_file: Path = typer.Argument(..., help="Release file (JSON or YAML) naming license and base models."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Print the license decision for a release; exit 1 on a violation (e.g. Apache-2.0 weights
    that descend from Llama 2)."""
    from release.licensing import decide
    from release.metadata import ReleaseMetadata

    decision = run(lambda rep: decide(ReleaseMetadata.from_file(release_file)), as_json=as_json)
    if as_json:
        print_json(decision.to_dict())
    else:
        stdout.print(f"weights: {decision.weights_license}   code: {decision.code_license}", highlight=False)
        for lic, bases in decision.inherited.items():
            stdout.print(f"inherited {lic} from {', '.join(bases)}", highlight=False)
        stdout.print(f"ships: {', '.join(f.name for f in decision.files)}", highlight=False)
        for o in decision.obligations:
            stdout.print(f"- {o}", highlight=False)
    if not decision.ok:
        err = CheckFailedError("license check failed: " + " ".join(decision.violations))
        if not as_json:
            typer.echo(f"error: {err.message}", err=True)
        raise typer.Exit(err.exit_code)
