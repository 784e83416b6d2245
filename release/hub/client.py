"""Publish release folders to a Hugging Face Hub and fetch one variant back, verified.

Everything goes through the unmodified ``huggingface_hub`` client (``HfApi``; a fetch reads each file
through its URL, headers and session with a bounded read loop of ours, ``release.hub.transfer``):
the endpoint is ``--endpoint``, else ``$HF_ENDPOINT`` (a company mirror), else huggingface.co; the
token is ``$HF_TOKEN`` or the user's login. ``local:DIR`` is the embedded target that needs no
account: a Hub-compatible server (``release.hub.server``) over DIR, started for the command.

Publishing is one commit per repository, only of what differs from the remote (so a second publish
uploads nothing, and a publish cut off half way resumes: LFS objects already stored are skipped by
the batch API), then gating and the version tag. The token never appears in output or errors.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from release.agreement import check_agreement
from release.cards import folder_kind, release_folders
from release.errors import BadInputError, CheckFailedError, MissingExtraError, ReleaseError
from release.extras import missing_extra
from release.hashing import sha256_file
from release.hub.transfer import DEFAULT_STALL
from release.licensing import decide
from release.manifest import (
    MANIFEST,
    NOT_LISTED,
    PROVENANCE,
    SIGNATURE,
    check_files,
    listed_files,
    load_manifest,
)
from release.progress import NULL, Reporter

DEFAULT_ENDPOINT = "https://huggingface.co"
SUFFIXES = {"model": "", "gguf": "-GGUF", "gptq": "-GPTQ"}  # the Hub's naming for variant repositories


def resolve_token(token: str | None = None) -> str | None:
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    return get_token()


def scrub(text: str, token: str | None) -> str:
    """Remove the token from anything that may be printed (client errors can echo request data)."""
    if token:
        text = text.replace(token, "***")
    return text


@contextlib.contextmanager
def hub_endpoint(endpoint: str | None) -> Iterator[tuple[str, bool]]:
    """(URL, local) of the Hub to talk to. ``local:DIR`` serves DIR on 127.0.0.1 for the duration;
    that server speaks git-LFS, not Xet, so the client's Xet path is switched off meanwhile."""
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if not endpoint.startswith("local:"):
        yield endpoint.rstrip("/"), False
        return
    from huggingface_hub import constants

    from release.hub.server import HubServer

    root = Path(endpoint.removeprefix("local:")).expanduser()
    server = HubServer(root).start()
    saved = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield server.url, True
    finally:
        constants.HF_HUB_DISABLE_XET = saved
        server.stop()


@contextlib.contextmanager
def hub_errors(what: str, token: str | None) -> Iterator[None]:
    """Client and network failures -> one line without the token (exit 1: retry resumes)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except ReleaseError:
        raise
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = "check HF_TOKEN and your rights on the repository" if status in (401, 403) else None
        first = scrub(str(exc), token).splitlines()[0]
        raise CheckFailedError(f"{what} failed (HTTP {status}): {first}", hint=hint) from None
    except (OSError, ValueError) as exc:  # connection refused, timeouts, malformed responses
        raise CheckFailedError(f"{what} failed: {scrub(str(exc), token)}", hint="rerun to resume") from None
    except Exception as exc:  # httpx errors are not OSErrors
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise CheckFailedError(f"{what} failed: {scrub(str(exc), token)}", hint="rerun to resume") from None
        raise


# --- publish -------------------------------------------------------------------------------------


@dataclass
class RepoPlan:
    repo_id: str
    folder: str
    kind: str
    exists: bool
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    upload_bytes: int = 0
    commit: str | None = None
    tag: str | None = None
    gated: bool = False
    uploaded: bool = False


@dataclass
class PublishResult:
    endpoint: str
    revision: str
    dry_run: bool
    repos: list[RepoPlan]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self)}


def _local_files(folder: Path) -> list[str]:
    names = [p.relative_to(folder).as_posix() for p in listed_files(folder)]
    return sorted([*names, *(n for n in (MANIFEST, SIGNATURE, PROVENANCE) if (folder / n).is_file())])


def _remote_files(api: Any, repo_id: str, revision: str) -> dict[str, Any] | None:
    """path -> RepoFile on the remote revision; None when the repository does not exist."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        return {
            e.path: e for e in api.list_repo_tree(repo_id, revision=revision, recursive=True) if isinstance(e, RepoFile)
        }
    except RepositoryNotFoundError:
        return None
    except RevisionNotFoundError:
        return {}


def _same(local: Path, remote: Any, sha256: str | None = None) -> bool:
    """``sha256``: the local file's digest when already known (the manifest's, just checked)."""
    if remote.size != local.stat().st_size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == (sha256 or sha256_file(local))
    from huggingface_hub.utils.sha import git_hash

    return remote.blob_id == git_hash(local.read_bytes())


def plan_repo(api: Any, folder: Path, repo_id: str, revision: str, known: dict[str, str] | None = None) -> RepoPlan:
    """What to send: ``known`` maps paths to sha256 digests already checked (the manifest's)."""
    remote = _remote_files(api, repo_id, revision)
    plan = RepoPlan(repo_id, str(folder), folder_kind(folder) or "?", remote is not None)
    remote = remote or {}
    local = _local_files(folder)
    for rel in local:
        if rel not in remote:
            plan.new.append(rel)
        elif _same(folder / rel, remote[rel], (known or {}).get(rel)):
            plan.unchanged.append(rel)
        else:
            plan.changed.append(rel)
    plan.deleted = sorted(p for p in remote if p not in local and p not in NOT_LISTED)
    plan.upload_bytes = sum((folder / p).stat().st_size for p in plan.new + plan.changed)
    return plan


def publish(
    release_dir: Path,
    *,
    repo: str | None = None,
    repos: dict[str, str] | None = None,
    revision: str = "main",
    tag: str | None = None,
    private: bool = False,
    gated: bool | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    require_signature: bool = True,
    reporter: Reporter = NULL,
) -> PublishResult:
    """Publish every release folder of RELEASE_DIR to its repository (main, -GGUF, -GPTQ)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    started = time.monotonic()
    meta, folders = release_folders(release_dir)
    weights_license = decide(meta).weights_license
    targets: list[tuple[Path, str, dict[str, str]]] = []
    for folder, kind in folders:
        if not (folder / MANIFEST).is_file():
            raise BadInputError(f"{folder}: no {MANIFEST}; run `model-release manifest` (and `sign`) first")
        manifest = load_manifest(folder / MANIFEST)
        check_files(folder, manifest)  # never publish a folder that no longer matches its manifest
        check_agreement(folder, weights_license)  # nor one whose files or card disagree
        for needed in ("README.md", "LICENSE"):
            if not (folder / needed).is_file():
                raise BadInputError(f"{folder}: no {needed}; run `model-release card` first")
        if require_signature and not (folder / SIGNATURE).is_file():
            raise BadInputError(f"{folder}: not signed", hint="run `model-release sign`, or pass --allow-unsigned")
        base = repo or manifest["repo_id"].removesuffix(SUFFIXES[kind])
        digests = {f["path"]: f["sha256"] for f in manifest["files"]}  # verified by check_files above
        targets.append((folder, (repos or {}).get(kind) or f"{base}{SUFFIXES[kind]}", digests))
    gate = bool(meta.gated_prompt) if gated is None else gated
    version_tag = tag
    token = resolve_token(token)
    plans = []
    with hub_endpoint(endpoint) as (url, _local):
        api = HfApi(endpoint=url, token=token)
        for folder, repo_id, digests in targets:
            with hub_errors(f"reading {repo_id}", token):
                plan = plan_repo(api, folder, repo_id, revision, digests)
            plan.gated, plan.tag = gate, version_tag
            plans.append(plan)
            if dry_run:
                continue
            with hub_errors(f"publishing {repo_id}", token):
                api.create_repo(repo_id, private=private, exist_ok=True)
                if revision != "main":
                    api.create_branch(repo_id, branch=revision, exist_ok=True)
                ops: list[Any] = [CommitOperationAdd(p, str(folder / p)) for p in plan.new + plan.changed]
                ops += [CommitOperationDelete(p) for p in plan.deleted]
                if ops:
                    reporter.start(f"uploading {len(ops)} file(s) to {repo_id}", None)
                    message = f"{meta.name or repo_id} {meta.version or ''}".strip()
                    info = api.create_commit(repo_id, ops, commit_message=f"Release {message}", revision=revision)
                    plan.commit, plan.uploaded = info.oid, True
                    reporter.done()
                else:
                    plan.commit = api.repo_info(repo_id, revision=revision).sha
                if gate:
                    api.update_repo_settings(repo_id, gated="auto")
                if version_tag:
                    _tag(api, repo_id, version_tag, plan.commit or revision)
    return PublishResult(url, revision, dry_run, plans, round(time.monotonic() - started, 2))


def _tag(api: Any, repo_id: str, tag: str, commit: str) -> None:
    refs = api.list_repo_refs(repo_id)
    existing = {t.name: t.target_commit for t in refs.tags}
    if tag in existing:
        if existing[tag] != commit:
            raise CheckFailedError(
                f"{repo_id}: tag {tag} already points to {existing[tag][:12]}, not to this release ({commit[:12]})",
                hint="publish under a new version tag",
            )
        return
    api.create_tag(repo_id, tag=tag, revision=commit, tag_message=f"Release {tag}")


# --- fetch ---------------------------------------------------------------------------------------


@dataclass
class FetchResult:
    repo_id: str
    variant: str
    revision: str
    commit: str
    output: str
    files: list[str]
    bytes: int
    hashes_checked: bool
    signature_checked: bool
    provenance_checked: bool  # the build record (provenance.intoto.jsonl) was there and checked
    revalidated: dict[str, Any] | None
    warnings: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self)}


SERVER_ONLY = "checked only against the server's own manifest"  # what a fetch without a checked signature proves
UNSIGNED = f"unsigned: {SERVER_ONLY}, not proven"
_VERSION_TAG = re.compile(r"^v?\d+(\.\d+)*([-+].*)?$")  # v1.0, 1.0, v2, v0.1-old; not a commit sha


def fetch(
    repo_id: str,
    variant: str | None,
    out: Path,
    *,
    revision: str = "main",
    public_key: Path | None = None,
    revalidate: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    force: bool = False,
    mirror: bool = False,
    stall: float = DEFAULT_STALL,
    reporter: Reporter = NULL,
) -> FetchResult:
    """Download one variant (and what every variant needs) into OUT, checked against the manifest
    and, with a public key, the signature. Any difference: exit 1 and nothing at OUT. Each file is
    read no further than the manifest's size, and a transfer that stalls for ``stall`` seconds fails
    (``release.hub.transfer``)."""
    from huggingface_hub import HfApi, hf_hub_url

    from release.atomic import atomic_dir
    from release.hub.transfer import download

    started = time.monotonic()
    token = resolve_token(token)
    warnings: list[str] = []
    out = Path(out).absolute()
    with hub_endpoint(endpoint) as (url, _local), atomic_dir(out, force=force) as tmp:
        api = HfApi(endpoint=url, token=token)
        with hub_errors(f"fetching {repo_id}", token):
            commit = api.repo_info(repo_id, revision=revision).sha  # every file from this one commit
            remote = _remote_files(api, repo_id, commit) or {}
            if MANIFEST not in remote:
                raise CheckFailedError(f"{repo_id}@{revision}: no {MANIFEST}; not a model-release release")

            def get(p: str, size: int) -> None:
                dest = tmp / p
                if not dest.resolve().is_relative_to(tmp.resolve()):  # the schema refuses these; twice is cheap
                    raise CheckFailedError(f"{repo_id}@{revision}: refusing the path {p!r}, outside the download")
                dest.parent.mkdir(parents=True, exist_ok=True)
                file_url = hf_hub_url(repo_id, p, revision=commit, endpoint=url)
                download(file_url, dest, size, token=token, stall=stall, what=f"{repo_id}@{revision}: {p}")

            get(MANIFEST, _bounded(remote[MANIFEST], repo_id, revision))
        with _named_for_user(tmp, f"{repo_id}@{revision} (commit {commit[:12]}, for {out})"):
            manifest = load_manifest(tmp / MANIFEST)
        _check_identity(manifest, repo_id, revision, commit, mirror, warnings)
        if variant is None and len(manifest["variants"]) == 1:  # the repository's one variant (reproduce's source)
            variant = next(iter(manifest["variants"]))
        if variant not in manifest["variants"]:
            raise BadInputError(
                f"{repo_id} has no variant {variant!r}", hint=f"variants: {', '.join(sorted(manifest['variants']))}"
            )
        listed = {f["path"]: f for f in manifest["files"]}
        extra = sorted(set(remote) - set(listed) - NOT_LISTED)
        missing = sorted(set(listed) - set(remote))
        if extra or missing:
            said = [f"not in the manifest: {', '.join(extra)}"] if extra else []
            said += [f"missing from the repository: {', '.join(missing)}"] if missing else []
            raise CheckFailedError(f"{repo_id}@{revision}: " + "; ".join(said))
        needed = sorted(p for p, f in listed.items() if f["variant"] in (None, variant))
        want = [*needed, *(p for p in (SIGNATURE, PROVENANCE) if p in remote)]
        total = sum(listed[p]["size"] for p in needed)
        reporter.start(f"downloading {variant} from {repo_id}", total)
        with hub_errors(f"fetching {repo_id}", token):
            for p in want:  # listed files: the manifest's size; the signature: its listing's, bounded
                get(p, listed[p]["size"] if p in listed else _bounded(remote[p], repo_id, revision))
                reporter.advance(listed[p]["size"] if p in listed else 0)
        reporter.done()
        signature_checked = False
        from release.signing import check_provenance

        with _named_for_user(tmp, f"{repo_id}@{revision} (commit {commit[:12]}, for {out})"):
            check_files(tmp, manifest, only=set(needed))
            # The manifest's digests of the needed files were just compared with them: not hashed again.
            digests = {p: listed[p]["sha256"] for p in needed} | {MANIFEST: sha256_file(tmp / MANIFEST)}
            if public_key is not None:
                if not (tmp / SIGNATURE).is_file():
                    raise CheckFailedError(f"{repo_id}@{revision}: no signature ({SIGNATURE}) to check")
                from release.signing import verify_subset

                signed = digests | ({PROVENANCE: sha256_file(tmp / PROVENANCE)} if (tmp / PROVENANCE).is_file() else {})
                verify_subset(tmp, public_key, signed)  # the manifest itself must be signed as it is
                signature_checked = True
            provenance_checked = check_provenance(tmp, public_key, only=set(digests), known=digests)
        if public_key is None:  # whoever controls the server also controls the manifest
            signed = SIGNATURE in remote
            why = "the release is signed but no --public-key was given" if signed else "the release is not signed"
            warnings.append(f"{why}: the files were {SERVER_ONLY}")
        revalidated, missing = None, None
        if revalidate:
            try:
                revalidated = _revalidate(tmp, manifest, variant, needed, reporter)
            except ModuleNotFoundError as exc:  # the base install: keep what was fetched and verified
                missing = missing_extra(exc, "fetch", what="--revalidate")
                if missing is None:
                    raise
    if missing is not None:
        checked = "hashes and signature verified" if signature_checked else UNSIGNED
        raise MissingExtraError(
            f"{out}: fetched, {checked}; not revalidated: {missing.message}",
            hint="run without --revalidate, or install the extra and run again",
        )
    return FetchResult(repo_id, variant, revision, commit, str(out), needed, total, True, signature_checked,
                       provenance_checked,
                       revalidated, warnings, round(time.monotonic() - started, 2))  # fmt: skip


_SMALL_FILE = 16 * 1024 * 1024  # the manifest and the signature: a few kB for any release


def _bounded(entry: Any, repo_id: str, revision: str) -> int:
    """The size to read of a file the manifest cannot size (itself, the signature): the listing's,
    refused past ``_SMALL_FILE``, so that a server announcing a huge manifest is not believed."""
    if entry.size > _SMALL_FILE:
        raise CheckFailedError(
            f"{repo_id}@{revision}: {entry.path} is listed at {entry.size} bytes; a manifest or signature "
            f"is never more than {_SMALL_FILE // (1024 * 1024)} MiB"
        )
    return int(entry.size)


def _check_identity(
    manifest: dict[str, Any], repo_id: str, revision: str, commit: str, mirror: bool, warnings: list[str]
) -> None:
    """Refuse a release served as something it is not: a signed manifest of repository A served as B
    (substitution), or version 0.1 served at the tag the user asked for as v1.0 (rollback). The
    signature, checked later, proves the manifest; this proves it is the one the user asked for.
    A revision that is the commit itself (full or abbreviated) names no version and is not compared."""
    said, version = manifest["repo_id"], manifest.get("version")
    if said != repo_id:
        if not mirror:
            raise CheckFailedError(
                f"{repo_id}@{revision}: the release says it is {said} (version {version}), not {repo_id}; "
                "refusing a substituted repository (pass --mirror if you trust this mirror of it)"
            )
        warnings.append(f"{repo_id} is a mirror: the release is {said} version {version}")
    by_commit = len(revision) >= 7 and commit.startswith(revision.lower())  # git abbreviates to 7 or more
    tagged = _VERSION_TAG.match(revision) and not by_commit and version is not None
    if tagged and revision.removeprefix("v") != version.removeprefix("v"):
        raise CheckFailedError(
            f"{repo_id}@{revision}: the release says it is version {version}, not {revision}; "
            "refusing a rolled-back or relabelled release"
        )


@contextlib.contextmanager
def _named_for_user(tmp: Path, what: str) -> Iterator[None]:
    """Checks run on the download's temporary folder; their errors name what the user asked for
    (repository, revision, commit, -o) instead of that folder, which is gone when they read it."""
    try:
        yield
    except ReleaseError as exc:
        exc.message = exc.message.replace(f"{tmp}/", f"{what}: ").replace(str(tmp), what)
        exc.args = (exc.message,)
        raise


def _revalidate(folder: Path, manifest: dict[str, Any], variant: str, files: list[str], reporter: Reporter) -> dict:
    """Re-run the logits validation of the fetched variant against the reference the release published."""
    from release.validation.validate import validate

    ref = manifest.get("reference")
    if not ref:
        raise BadInputError(f"{manifest['repo_id']}: the release published no reference logits to revalidate against")
    if ref["path"] not in files:  # only a listed, path-checked, hash-checked file of this download is read
        raise CheckFailedError(
            f"{manifest['repo_id']}: the manifest's reference path {ref['path']!r} is not one of the files fetched"
        )
    target = folder / next(p for p in files if p.endswith(".gguf")) if manifest["kind"] == "gguf" else folder
    result = validate([target], folder / ref["path"], write=False, reporter=reporter)
    v = result.variants[0]
    if failed := result.failure():
        raise failed
    return {"kind": v.kind, "passed": v.passed, **v.metrics}
