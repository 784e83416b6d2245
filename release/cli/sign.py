"""`model-release manifest | keygen | sign | verify`: seal release folders and check them."""

from __future__ import annotations

from pathlib import Path

import typer

from release.cli._output import JSON_HELP, QUIET_HELP, print_json, run, stdout
from release.errors import BadInputError


def manifest_command(
    release_dir: Path = typer.Argument(..., help="Release folder: release.yaml plus the model/GGUF/GPTQ folders."),
    reference: Path | None = typer.Option(
        None,
        "--reference",
        "-r",
        help="Reference logits to publish with every repository (enables fetch --revalidate).",
    ),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
) -> None:
    """Write `release-manifest.json` into every release folder: each file's size, sha256, format and
    variant, each variant's validation summary, the licenses and the source checkpoint hash (shape:
    `release/data/schemas/release_manifest.schema.json`). Run it after `validate` and `card`."""
    from release.manifest import write_manifests

    manifests = run(
        lambda rep: write_manifests(release_dir, reference=reference, reporter=rep), as_json=as_json, quiet=quiet
    )
    if as_json:
        print_json({"ok": True, "manifests": manifests})
        return
    for m in manifests:
        variants = ", ".join(
            f"{v}{'' if s is None else (' pass' if s['passed'] else ' FAIL')}" for v, s in m["variants"].items()
        )
        stdout.print(f"{m['repo_id']}: {len(m['files'])} files; variants: {variants}", highlight=False)


def keygen_command(
    out_dir: Path = typer.Option(Path("."), "--output", "-o", help="Folder for release-signing.key and .pub."),
    force: bool = typer.Option(False, "--force", help="Replace existing key files."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Make an EC P-256 key pair for offline signing (keep the .key secret; publish the .pub)."""
    from release.signing import keygen

    priv, pub = run(lambda rep: keygen(out_dir, force=force), as_json=as_json)
    if as_json:
        print_json({"ok": True, "private_key": str(priv), "public_key": str(pub)})
    else:
        stdout.print(f"private key {priv} (keep it secret), public key {pub}", highlight=False)


def sign_command(
    release_dir: Path = typer.Argument(..., help="Release folder (signs each model/GGUF/GPTQ folder in it)."),
    key: Path | None = typer.Option(None, "--key", help="EC private key (PEM) for offline signing."),
    sigstore: bool = typer.Option(False, "--sigstore", help="Sign with Sigstore (needs network and an identity)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Sign every release folder with OpenSSF model signing: `release.sig` inside each folder
    covers every file (the manifest included). With --key it first writes the signed build record,
    provenance.intoto.jsonl (SLSA provenance in a DSSE envelope; docs/provenance.md). Run it last,
    after `manifest`."""
    from release.cards import release_folders
    from release.signing import sign_folder

    def body(rep: object) -> list[str]:
        _, folders = release_folders(release_dir)
        return [str(sign_folder(f, private_key=key, sigstore=sigstore)) for f, _ in folders]

    sigs = run(body, as_json=as_json)
    if as_json:
        print_json({"ok": True, "signatures": sigs})
    else:
        for s in sigs:
            stdout.print(f"signed: {s}", highlight=False)


def verify_command(
    path: Path = typer.Argument(..., help="A release folder, or a folder of them (what `fetch` or `build` wrote)."),
    public_key: Path | None = typer.Option(None, "--public-key", help="Check the signature with this public key."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Check a release folder against its manifest (every file present, unchanged, nothing added)
    and its build record (provenance.intoto.jsonl: every file one of its subjects) and, with
    --public-key, against its signature and the build record's. Exit 1 names what differs."""
    from release.cards import folder_kind
    from release.manifest import MANIFEST, check_files, load_manifest
    from release.signing import check_provenance, verify_folder

    def body(rep: object) -> dict[str, bool]:
        folders = [path] if (path / MANIFEST).is_file() else [p for p in sorted(path.iterdir()) if folder_kind(p)]
        if not folders:
            raise BadInputError(f"{path}: no release folders with a {MANIFEST}")
        out = {}
        for f in folders:
            manifest = load_manifest(f / MANIFEST)
            check_files(f, manifest)
            checked = {x["path"]: x["sha256"] for x in manifest["files"]}  # just compared with the files
            recorded = check_provenance(f, public_key, known=checked)  # before the whole-folder check: clearer line
            if public_key is not None:
                verify_folder(f, public_key)
            out[str(f)] = recorded
        return out

    checked = run(body, as_json=as_json)
    if as_json:
        print_json({"ok": True, "verified": list(checked), "signature_checked": public_key is not None,
                    "provenance_checked": [f for f, ok in checked.items() if ok]})  # fmt: skip
    else:
        what = "manifest and signature" if public_key else "manifest (no --public-key: signature not checked)"
        for f, recorded in checked.items():
            record = "; build record: " + ("signed, subjects match" if public_key else "subjects match, unsigned")
            stdout.print(f"ok: {f} matches its {what}{record if recorded else '; no build record'}", highlight=False)
