"""`model-release publish | fetch | hub serve`: the Hugging Face Hub side of a release."""

from __future__ import annotations

from pathlib import Path

import typer

from release.cli._output import JSON_HELP, QUIET_HELP, human_bytes, run, run_or_json, stderr, stdout

ENDPOINT_HELP = (
    "Hub URL (default: $HF_ENDPOINT, else https://huggingface.co), or local:DIR for the embedded "
    "local Hub over DIR (no account needed)."
)
hub_app = typer.Typer(help="A local Hugging Face Hub-compatible server.", no_args_is_help=True)


def publish_command(
    release_dir: Path = typer.Argument(
        ..., help="Release folder (release.yaml plus manifested, signed folders), or a release file built by `build`."
    ),
    dist: Path = typer.Option(Path("dist"), "--dist", help="With a release file: where `build` wrote it."),
    repo: str | None = typer.Option(
        None, "--repo", help="ORG/NAME of the main repository (default: from repo_url in the release file)."
    ),
    gguf_repo: str | None = typer.Option(None, "--gguf-repo", help="GGUF repository (default: ORG/NAME-GGUF)."),
    gptq_repo: str | None = typer.Option(None, "--gptq-repo", help="GPTQ repository (default: ORG/NAME-GPTQ)."),
    revision: str = typer.Option("main", "--revision", help="Branch to commit to (created if missing)."),
    tag: str | None = typer.Option(None, "--tag", help="Tag the commit, e.g. v1.0 (refused if it exists elsewhere)."),
    private: bool = typer.Option(False, "--private", help="Create the repositories private."),
    gated: bool | None = typer.Option(
        None, "--gated/--not-gated", help="Users must accept the license first (default: set when gated_prompt is)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan (repos, files, sizes, what is new); touch nothing."
    ),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Publish folders without release.sig."),
    endpoint: str | None = typer.Option(None, "--endpoint", help=ENDPOINT_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Publish every release folder to its repository: the model to ORG/NAME, GGUF files to
    ORG/NAME-GGUF, GPTQ to ORG/NAME-GPTQ, each with its card, license files, manifest and signature.

    One commit per repository holding only what differs from the remote; publishing the same release
    again uploads nothing, and a publish cut off half way completes on the next run without
    uploading again what reached the server. Token: $HF_TOKEN or your `hf auth login`; it is never
    printed. Exit codes: 0 published, 1 the Hub refused or failed (rerun to resume), 2 bad input."""
    from release.hub.client import publish

    if release_dir.is_file():  # a release file: its build folder, and its publish section as defaults
        from release.pipeline import load_release_file

        rf = run(lambda rep: load_release_file(release_dir), as_json=as_json)
        settings = rf.section("publish")
        release_dir = dist / f"{rf.name}-{rf.version}"
        repo = repo or settings.get("repo")
        endpoint = endpoint or settings.get("endpoint")
        tag = tag or (settings["tag"].replace("{version}", rf.version) if settings.get("tag") else None)
        private = private or bool(settings.get("private"))
        gated = gated if gated is not None else settings.get("gated")
    repos = {k: v for k, v in {"gguf": gguf_repo, "gptq": gptq_repo}.items() if v}
    result = run_or_json(
        lambda rep: publish(
            release_dir,
            repo=repo,
            repos=repos,
            revision=revision,
            tag=tag,
            private=private,
            gated=gated,
            dry_run=dry_run,
            endpoint=endpoint,
            require_signature=not allow_unsigned,
            reporter=rep,
        ),
        as_json=as_json,
        quiet=quiet,
    )
    if result is None:
        return
    stdout.print(f"{'plan (dry run, nothing sent)' if dry_run else 'published'} -> {result.endpoint}", highlight=False)
    for p in result.repos:
        tail = "" if dry_run else f"; commit {(p.commit or '-')[:12]}" + (f", tag {p.tag}" if p.tag else "")
        stdout.print(
            f"  {p.repo_id}{'' if p.exists else ' (new repository)'}: {len(p.new)} new, {len(p.changed)} changed, "
            f"{len(p.unchanged)} unchanged, {len(p.deleted)} to delete; {human_bytes(p.upload_bytes)} to upload"
            f"{', gated' if p.gated else ''}{tail}",
            highlight=False,
        )
    if not dry_run and not any(p.uploaded for p in result.repos):
        stdout.print("nothing to upload: every repository already holds this release", highlight=False)


def fetch_command(
    repo_id: str = typer.Argument(..., help="ORG/NAME of the repository, e.g. ORG/NAME-GGUF."),
    variant: str = typer.Option(..., "--variant", help="Variant to fetch, e.g. Q4_K_M, gptq-4bit-g128, bf16."),
    revision: str = typer.Option("main", "--revision", help="Branch, tag (e.g. v1.0) or commit."),
    out: Path | None = typer.Option(None, "--output", "-o", help="Folder to create (default: ./NAME-VARIANT)."),
    public_key: Path | None = typer.Option(None, "--public-key", help="Check the release's signature with this key."),
    revalidate: bool = typer.Option(
        False, "--revalidate", help="Re-run logits validation against the published reference."
    ),
    endpoint: str | None = typer.Option(None, "--endpoint", help=ENDPOINT_HELP),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
    mirror: bool = typer.Option(
        False, "--mirror", help="Accept a release whose manifest names another repository (a mirror you trust)."
    ),
    stall_timeout: float = typer.Option(
        60.0,
        "--stall-timeout",
        min=1.0,
        help="Give up on a file that moves less than 64 KiB in this many seconds (a stalled or drip-feeding server).",
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Download one variant (plus the manifest, signature and shared files), check every file's
    sha256 against the manifest, refuse a repository with files changed, added or removed, and with
    --public-key check the OpenSSF signature. The manifest must name the repository asked for and,
    for a version tag such as v1.0, that version (no substitution, no rollback). Without
    --public-key the files are only checked against the server's own manifest. Nothing is left at
    OUT unless all checks pass, whatever ends the run (a check, a stall, Ctrl-C, SIGTERM); no file
    is read past the size the manifest lists.
    Exit codes: 0 verified, 1 a check failed, 2 bad input (unknown variant, ...)."""
    from release.hub.client import fetch

    target = out or Path(f"{repo_id.split('/')[-1]}-{variant}")
    result = run_or_json(
        lambda rep: fetch(
            repo_id,
            variant,
            target,
            revision=revision,
            public_key=public_key,
            revalidate=revalidate,
            endpoint=endpoint,
            force=force,
            mirror=mirror,
            stall=stall_timeout,
            reporter=rep,
        ),
        as_json=as_json,
        quiet=quiet,
    )
    if result is None:
        return
    for w in result.warnings:
        stderr.print(f"[yellow]warning:[/] {w}", highlight=False)
    checks = ["sha256 of every file"] + (["signature"] if result.signature_checked else [])
    if result.provenance_checked:
        checks.append("build record" + ("" if result.signature_checked else " (its subjects; unsigned)"))
    if result.revalidated:
        r = result.revalidated
        checks.append(f"logits (mean KL {r['kl_mean']:.3g}, top-1 {r['top1_agreement']:.3f})")
    said = "verified" if result.signature_checked else "checked against the server's own manifest only (unsigned)"
    stdout.print(
        f"{repo_id}@{result.commit[:12]} {variant}: {len(result.files)} files, {human_bytes(result.bytes)} -> "
        f"{result.output}; {said}: {', '.join(checks)}",
        highlight=False,
    )


@hub_app.command("serve")
def serve_command(
    root: Path = typer.Option(Path("hub-data"), "--root", help="Folder the server stores repositories in."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8088, "--port"),
    token: str | None = typer.Option(None, "--token", envvar="MODEL_RELEASE_HUB_TOKEN", help="Require this token."),
) -> None:
    """Serve a Hub-compatible API over ROOT (create repo, LFS upload, commits, tags, downloads).
    Point clients at it with HF_ENDPOINT=http://HOST:PORT and HF_HUB_DISABLE_XET=1 (it speaks LFS)."""
    from release.hub.server import HubServer

    server = HubServer(root, host=host, port=port, token=token)
    stderr.print(f"local Hub on {server.url} storing in {root} (Ctrl-C stops)", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
