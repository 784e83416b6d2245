"""`model-release kernels`: compile GPTQModel's kernels once per machine, before a release needs them."""

from __future__ import annotations

import typer

from release.cli._output import JSON_HELP, QUIET_HELP, print_json, run, stdout


def kernels_command(
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda or cuda:N."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Build (once per machine) and list the C++ (and, on a GPU, CUDA) kernels GPTQModel compiles on
    first use, so that a release's first GPTQ step, or a new cluster node's, does not stall
    compiling. Run it once per machine or node image (`make install` does); a kernel already built
    is only loaded.

    Exit codes: 0 ready (or nothing to build: GPTQModel is not installed), 1 a kernel failed to
    build (GPTQModel then falls back to slower code).
    """
    from release.formats.gptq_kernels import build_kernels

    result = run(lambda _rep: build_kernels(device), as_json=as_json, quiet=quiet)
    if as_json:
        print_json(result.to_dict())
    elif not quiet:
        if result.gptqmodel is None:
            stdout.print("GPTQModel is not installed: nothing to build.")
        for k in result.kernels:
            note = f"  ({k.note})" if k.note else ""
            stdout.print(f"{k.name:<30} {k.status:<7} {k.seconds:7.1f} s{note}", highlight=False, markup=False)
        if result.cache:
            stdout.print(f"cache: {result.cache}", highlight=False, markup=False)
    if not result.ok:
        raise typer.Exit(1)
