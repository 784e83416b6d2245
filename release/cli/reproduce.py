"""`model-release reproduce`: rebuild a variant from its build record and compare it with the published one."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from release.cli._output import JSON_HELP, QUIET_HELP, print_json, run, stdout
from release.cli.hub import ENDPOINT_HELP


def reproduce_command(
    target: str = typer.Argument(
        ..., help="A release folder (built or fetched) or a Hub repository ORG/NAME-GGUF, ORG/NAME-GPTQ or ORG/NAME."
    ),
    variant: str = typer.Option(..., "--variant", help="The variant to rebuild, e.g. Q4_K_M, gptq-4bit, fp16."),
    source: Path | None = typer.Option(
        None,
        "--source",
        help="The checkpoint the variant was made from (its hash must be the recorded one). Default: the "
        "release's own safetensors folder or repository, when it holds exactly those weights.",
    ),
    public_key: Path | None = typer.Option(
        None, "--public-key", help="Check the build record's signature (and, from the Hub, the release's)."
    ),
    revision: str = typer.Option("main", "--revision", help="Hub branch, tag (e.g. v1.0) or commit."),
    endpoint: str | None = typer.Option(None, "--endpoint", help=ENDPOINT_HELP),
    keep: Path | None = typer.Option(
        None, "--keep", help="Work in this folder and keep the rebuilt files there when they differ."
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Rebuild one variant with the command, settings, thread count and importance matrix its signed
    build record (provenance.intoto.jsonl) holds, from a source with the recorded checkpoint hash,
    and compare it with the published files. Exit 0 when byte-identical; exit 1 otherwise, naming
    each tensor that differs (with the largest difference of its dequantized values) and the KL of
    the rebuilt model from the published one on the release's evaluation prompts: a tampered file
    shows one tensor far off and a large KL, another CPU or compiler many tensors a rounding step
    off and a KL near zero (docs/provenance.md). Exit 2: no build record, a source with another
    hash, an unknown variant."""
    from release.reproduce import reproduce, reproduce_from_hub

    def work(rep: object) -> object:
        local = Path(target)
        if local.is_dir():
            return reproduce(local, variant, source=source, public_key=public_key, keep=keep, reporter=rep)
        if target.count("/") != 1:
            from release.errors import BadInputError

            raise BadInputError(f"{target}: no such folder, and not a Hub repository ORG/NAME")
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".reproduce-fetch-", dir=keep) as tmp:
            return reproduce_from_hub(target, variant, Path(tmp), revision=revision, endpoint=endpoint,
                                      public_key=public_key, source=source, keep=keep, reporter=rep)  # fmt: skip

    result = run(work, as_json=as_json, quiet=quiet)
    if as_json:
        print_json(result.to_dict())
    else:
        _print(result)
    if not result.identical:
        raise typer.Exit(1)


def _print(r: object) -> None:
    from release.reproduce import ReproduceResult

    assert isinstance(r, ReproduceResult)
    said = "identical: every byte matches" if r.identical else "DIFFERENT"
    stdout.print(f"{r.variant}: rebuilt with `{' '.join(r.command)}` from {r.source}; {said}", highlight=False)
    for f in r.files:
        mark = "same" if f["identical"] else ("missing from the rebuild" if f["rebuilt_sha256"] is None else "differs")
        if f.get("unreadable"):
            mark += f" (the published file is unreadable: {f['unreadable']})"
        record = "" if f["matches_build_record"] else "; the published file is not the one the build record names"
        stdout.print(f"  {f['path']}: {mark}{record}", highlight=False)
    for t in r.tensors[:20]:
        if "max_abs_diff" in t:
            stdout.print(
                f"  tensor {t['name']} ({t['type']}): {t['elements_differ']:,} of {t['elements']:,} values differ, "
                f"largest by {t['max_abs_diff']:.4g} ({t['max_rel_diff']:.2%} of the largest value)",
                highlight=False,
            )
        else:
            stdout.print(
                f"  tensor {t['name']} ({t['type']}): {'missing' if t.get('missing_from_rebuilt') else 'shape differs'}"
            )
    if len(r.tensors) > 20:
        stdout.print(f"  ... {len(r.tensors) - 20} more tensors differ (--json lists them all)")
    if r.metadata:
        stdout.print(f"  metadata keys that differ: {', '.join(r.metadata)}", highlight=False)
    if r.kl_mean is not None:
        stdout.print(
            f"  KL of the rebuilt from the published: mean {r.kl_mean:.3g}, max {r.kl_max:.3g} nats/token; "
            f"top-1 agreement {r.top1_agreement:.3f}",
            highlight=False,
        )
