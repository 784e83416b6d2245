"""Publish and fetch against a Hub-compatible server on 127.0.0.1, with the real huggingface_hub
client: a real SmolLM2 release (safetensors, GGUF Q8_0 + Q4_K_M, GPTQ), republishing uploads
nothing, a publish killed half way resumes without re-uploading, fetch verifies hashes and the
signature and refuses a tampered repository, and the token never appears in any output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants

from release.hub.server import HubServer
from release.manifest import MANIFEST, PROVENANCE, SIGNATURE
from tests.conftest import DEMO, ROOT, leftovers

pytestmark = pytest.mark.real_model
TOKEN = "hf_testTOKEN_d0n0tPr1nt_9f8e7d6c5b4a"
REPO = f"example/{DEMO}"
GGUF = f"{DEMO}-GGUF"  # the GGUF folder


@pytest.fixture(scope="module")
def release(demo_release, tmp_path_factory):
    """The session's demo release (RELEASE_DIR with release.yaml; model, GGUF Q8_0 + Q4_K_M and
    GPTQ folders, each validated, carded, with a manifest and a signature). Publishing reads it;
    what a test forges goes under ``base``."""
    d = demo_release
    return {"dir": d.dir, "pub": d.pub, "priv": d.priv, "base": tmp_path_factory.mktemp("hub-release")}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh local Hub requiring TOKEN; the client is pointed at it as a user would (env vars)."""
    server = HubServer(tmp_path / "hub-data", token=TOKEN).start()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the local Hub speaks LFS
    yield server
    server.stop()


def _no_token(*texts: str) -> None:
    for t in texts:
        assert TOKEN not in t


def _publish(cli, release, hub, *extra):
    r = cli("publish", release["dir"], "--endpoint", hub.url, "--tag", "v1.0", "--json", *extra)
    _no_token(r.stdout, r.stderr)
    return r


def _stored_objects(hub) -> int:
    return len(list((hub.state.root / "lfs").iterdir()))


def test_publish_real_release_then_again_uploads_nothing(cli, release, hub):
    r = _publish(cli, release, hub)
    assert r.exit_code == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert [p["repo_id"] for p in out["repos"]] == [REPO, f"{REPO}-GGUF", f"{REPO}-GPTQ"]  # by folder
    api = HfApi(endpoint=hub.url, token=TOKEN)
    for plan in out["repos"]:
        folder = Path(plan["folder"])
        remote = {f.path: f for f in api.list_repo_tree(plan["repo_id"], revision="v1.0", recursive=True)}
        local = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert set(remote) - {".gitattributes"} == local  # card, licenses, manifest, signature included
        assert {"README.md", "LICENSE", MANIFEST, SIGNATURE} <= local
        weights = [p for p in local if p.endswith((".gguf", ".safetensors"))]
        assert weights and all(remote[p].lfs is not None for p in weights)
        assert plan["uploaded"] and plan["commit"] and plan["tag"] == "v1.0"
    uploads, requests = hub.state.lfs_uploads, len(hub.state.requests)
    assert uploads == _stored_objects(hub) > 0
    heads = {p["repo_id"]: api.repo_info(p["repo_id"]).sha for p in out["repos"]}

    again = _publish(cli, release, hub)
    assert again.exit_code == 0, again.stdout + again.stderr
    second = json.loads(again.stdout)
    assert not any(p["uploaded"] for p in second["repos"])
    assert all(not p["new"] and not p["changed"] and not p["deleted"] for p in second["repos"])
    assert hub.state.lfs_uploads == uploads  # not one byte of weights sent again
    assert {p["repo_id"]: api.repo_info(p["repo_id"]).sha for p in second["repos"]} == heads  # no new commit
    assert not any(" /lfs-upload/" in q or "/commit/" in q for q in hub.state.requests[requests:])
    text = cli("publish", release["dir"], "--endpoint", hub.url, "--tag", "v1.0")
    assert "nothing to upload" in text.stdout


def test_dry_run_prints_the_plan_and_touches_nothing(cli, release, hub):
    r = cli("publish", release["dir"], "--endpoint", hub.url, "--dry-run", "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    plans = json.loads(r.stdout)["repos"]
    gguf = next(p for p in plans if p["repo_id"].endswith("-GGUF"))
    size = sum(f.stat().st_size for f in Path(gguf["folder"]).iterdir() if f.is_file())
    assert not gguf["exists"] and gguf["upload_bytes"] == size and MANIFEST in gguf["new"]
    assert not list((hub.state.root / "repos").rglob("*.json")) and hub.state.lfs_uploads == 0
    assert all(q.startswith("GET ") for q in hub.state.requests)  # reads only


def test_publish_killed_half_way_resumes_without_reuploading(cli, release, hub):
    hub.state.hold_uploads_after = 2  # the third LFS upload hangs until the publisher is killed
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"}
    cmd = [sys.executable, "-c", "from release.cli import main; main()", "publish", str(release["dir"]),
           "--endpoint", hub.url, "--tag", "v1.0"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while hub.state.lfs_uploads < 2 or sum("/lfs-upload/" in q for q in hub.state.requests) <= 2:
        assert proc.poll() is None and time.monotonic() < deadline, "publisher ended before it was cut off"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    _no_token(out, err)
    hub.state.hold_uploads_after = None
    hub.state.released.set()
    api = HfApi(endpoint=hub.url, token=TOKEN)
    first = hub.state.lfs_uploads
    assert first == 2
    # Nothing was committed: the repository being uploaded (the first, by folder) holds only its
    # initial commit, no weights; the others were not reached.
    tree = [f.path for f in api.list_repo_tree(REPO, recursive=True)]
    assert tree == [".gitattributes"]
    for later in (f"{REPO}-GGUF", f"{REPO}-GPTQ"):
        assert not api.repo_exists(later), later

    r = _publish(cli, release, hub)
    assert r.exit_code == 0, r.stdout + r.stderr
    # Every stored object was sent exactly once over both runs: the 2 that reached the server were skipped.
    assert hub.state.lfs_uploads == _stored_objects(hub) > first
    for p in json.loads(r.stdout)["repos"]:
        assert api.repo_info(p["repo_id"], revision="v1.0").sha == p["commit"]


def test_fetch_one_variant_and_verify(cli, release, hub, tmp_path):
    assert _publish(cli, release, hub).exit_code == 0
    out = tmp_path / "q8"
    r = cli("fetch", f"{REPO}-GGUF", "--variant", "Q8_0", "--revision", "v1.0", "-o", out, "--endpoint", hub.url,
            "--public-key", release["pub"], "--revalidate", "--json")  # fmt: skip
    assert r.exit_code == 0, r.stdout + r.stderr
    _no_token(r.stdout, r.stderr)
    res = json.loads(r.stdout)
    manifest = json.loads((release["dir"] / GGUF / MANIFEST).read_text())
    expected = {f["path"] for f in manifest["files"] if f["variant"] in (None, "Q8_0")}
    got = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert got == expected | {MANIFEST, SIGNATURE, PROVENANCE}  # only what Q8_0 needs: no Q4_K_M file, no .cache
    assert not any("Q4_K_M" in p for p in got)
    for p in expected:
        assert (out / p).read_bytes() == (release["dir"] / GGUF / p).read_bytes()
    assert res["signature_checked"] and res["provenance_checked"] and res["revalidated"]["passed"]
    assert res["revalidated"]["kl_mean"] == pytest.approx(manifest["variants"]["Q8_0"]["kl_mean"], rel=1e-3)

    bad = cli("fetch", f"{REPO}-GGUF", "--variant", "Q3_K_S", "-o", tmp_path / "x", "--endpoint", hub.url)
    assert bad.exit_code == 2 and "Q4_K_M, Q8_0" in bad.stderr and not (tmp_path / "x").exists()


def _fetch_refused(cli, hub, tmp_path, release, *needles: str, key: bool = False):
    out = tmp_path / "fetched"
    args = ["fetch", f"{REPO}-GGUF", "--variant", "Q8_0", "-o", out, "--endpoint", hub.url]
    r = cli(*args, *(["--public-key", release["pub"]] if key else []))
    assert r.exit_code == 1, r.stdout + r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
    assert ".partial-" not in r.stderr and str(out.parent) + "/." not in r.stderr  # no temporary folder named
    assert not out.exists() and not leftovers(tmp_path)


def test_fetch_refuses_a_tampered_repository(cli, release, hub, tmp_path):
    assert _publish(cli, release, hub).exit_code == 0
    api = HfApi(endpoint=hub.url, token=TOKEN)
    repo = f"{REPO}-GGUF"
    gguf_name = f"{DEMO}-Q8_0.gguf"
    # 1. One byte of a stored weight file changed on the server.
    sha = next(f.lfs.sha256 for f in api.list_repo_tree(repo, recursive=True) if f.path == gguf_name)
    blob = hub.state.root / "lfs" / sha
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    original = blob.read_bytes()
    blob.write_bytes(bytes(data))
    _fetch_refused(cli, hub, tmp_path, release, f"{REPO}-GGUF@main (commit ", f"changed: {gguf_name}")
    blob.write_bytes(original)
    # 2. A file added that the manifest does not list.
    api.create_commit(repo, [CommitOperationAdd("extra.py", b"print('hi')\n")], commit_message="add")
    _fetch_refused(cli, hub, tmp_path, release, "not in the manifest: extra.py")
    # 3. A listed file removed.
    api.create_commit(repo, [CommitOperationDelete("extra.py"), CommitOperationDelete("LICENSE")], commit_message="rm")
    _fetch_refused(cli, hub, tmp_path, release, "missing from the repository: LICENSE")
    # 4. A weight file and the manifest changed consistently: only the signature can tell.
    folder = release["base"] / "forged"
    shutil.copytree(release["dir"] / GGUF, folder)
    (folder / gguf_name).write_bytes(bytes(data))
    manifest = json.loads((folder / MANIFEST).read_text())
    from release.hashing import sha256_file

    for f in manifest["files"]:
        if f["path"] == gguf_name:
            f["sha256"] = sha256_file(folder / gguf_name)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    ops = [CommitOperationAdd(p, str(folder / p)) for p in (gguf_name, MANIFEST, "LICENSE")]
    # The build record names the genuine files: a forger who controls the server drops it too.
    api.create_commit(repo, [*ops, CommitOperationDelete(PROVENANCE)], commit_message="forged")
    r = cli("fetch", repo, "--variant", "Q8_0", "-o", tmp_path / "ok", "--endpoint", hub.url, "--revalidate")
    assert r.exit_code == 0  # hashes agree with the (forged) manifest...
    assert "verified" not in r.stdout and "server's own manifest only (unsigned)" in r.stdout  # ...proving nothing
    assert "checked only against the server's own manifest" in r.stderr
    _fetch_refused(cli, hub, tmp_path, release, "signature check failed", key=True)  # ...the signature does not


def test_fetch_refuses_an_altered_or_removed_build_record_and_reproduces_from_the_hub(cli, release, hub, tmp_path):
    """The build record is part of what the signature covers: a server that alters or drops it is
    refused with the key; `reproduce ORG/NAME-GGUF` fetches the variant and the safetensors
    repository (the GGUF files' source) and rebuilds the variant byte-identical."""
    assert _publish(cli, release, hub).exit_code == 0
    api = HfApi(endpoint=hub.url, token=TOKEN)
    repo = f"{REPO}-GGUF"
    r = cli("reproduce", repo, "--variant", "Q8_0", "--endpoint", hub.url, "--public-key", release["pub"], "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["identical"], r.stdout[-2000:] + r.stderr
    env = json.loads((release["dir"] / GGUF / PROVENANCE).read_text())
    env["payload"] = env["payload"][:-8] + "AAAAAAA="  # the statement's last bytes changed
    api.create_commit(repo, [CommitOperationAdd(PROVENANCE, (json.dumps(env) + "\n").encode())], commit_message="x")
    _fetch_refused(cli, hub, tmp_path, release, f"{PROVENANCE}: sha256 differs from the signed one", key=True)
    api.create_commit(repo, [CommitOperationDelete(PROVENANCE)], commit_message="drop the build record")
    _fetch_refused(cli, hub, tmp_path, release, "lists a build record", key=True)


def test_fetch_refuses_a_substituted_or_rolled_back_release(cli, release, hub, tmp_path):
    """The signed release of REPO served as another repository, or at an older-looking tag: the
    signature is genuine, the identity is not what the user asked for."""
    r = cli("publish", release["dir"], "--endpoint", hub.url, "--repo", "example/other", "--tag", "v0.1-old")
    assert r.exit_code == 0, r.stdout + r.stderr
    other = "example/other-GGUF"
    key = ["--public-key", release["pub"], "--endpoint", hub.url]
    for revision, extra, needles in [
        ("main", [], [f"says it is {REPO}-GGUF (version 1.0), not {other}", "--mirror"]),
        ("v0.1-old", ["--mirror"], ["says it is version 1.0, not v0.1-old"]),
    ]:
        out = tmp_path / "fetched"
        r = cli("fetch", other, "--variant", "Q8_0", "--revision", revision, "-o", out, *key, *extra)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.exit_code == 1 and len(errors) == 1, r.stderr
        assert all(n in errors[0] for n in needles), errors[0]
        assert not out.exists() and not leftovers(tmp_path)
    r = cli("fetch", other, "--variant", "Q8_0", "-o", tmp_path / "m", *key, "--mirror", "--json")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["signature_checked"] and any(f"the release is {REPO}-GGUF version 1.0" in w for w in res["warnings"])


def test_a_commit_is_not_taken_for_a_version_tag():
    """`--revision` may be a commit: one whose sha starts with a digit names no version."""
    from release.errors import CheckFailedError
    from release.hub.client import _check_identity

    manifest, commit = {"repo_id": "org/m-GGUF", "version": "1.0"}, "3f2a9b1c" + "0" * 32
    for revision in ("main", "v1.0", "1.0", commit, commit[:7]):
        _check_identity(manifest, "org/m-GGUF", revision, commit, False, [])
    for revision in ("v0.1-old", "0.9", "v2", "3"):  # "3" is too short to be taken for the commit 3f2a...
        with pytest.raises(CheckFailedError, match=r"says it is version 1\.0"):
            _check_identity(manifest, "org/m-GGUF", revision, commit, False, [])


def test_a_huge_manifest_or_signature_listing_is_not_believed():
    """The manifest sizes every other file; its own size and the signature's come from the server's
    listing, so they are capped: a listing of 17 MiB is refused before anything is read."""
    from types import SimpleNamespace

    from release.errors import CheckFailedError
    from release.hub.client import _bounded

    assert _bounded(SimpleNamespace(size=4096, path=MANIFEST), "org/m", "v1.0") == 4096
    with pytest.raises(CheckFailedError, match=r"release.sig is listed at 17825792 bytes; .* never more than 16 MiB"):
        _bounded(SimpleNamespace(size=17 << 20, path=SIGNATURE), "org/m", "v1.0")


def test_fetch_reads_no_reference_outside_the_download(cli, release, hub, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(release["dir"] / GGUF / "reference-logits.safetensors", outside)
    folder = release["base"] / "abs-reference"
    shutil.copytree(release["dir"] / GGUF, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["reference"]["path"] = str(outside)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    (folder / PROVENANCE).unlink()  # it names the genuine manifest: the forger drops it
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo(f"{REPO}-GGUF")
    api.upload_folder(repo_id=f"{REPO}-GGUF", folder_path=folder, commit_message="absolute reference")
    out = tmp_path / "q8"
    r = cli("fetch", f"{REPO}-GGUF", "--variant", "Q8_0", "-o", out, "--endpoint", hub.url, "--revalidate")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "reference path" in errors[0], r.stdout + r.stderr
    assert not out.exists()


def test_wrong_token_fails_without_printing_it(cli, release, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN + "x")
    for extra in ((), ("--json",)):
        r = cli("publish", release["dir"], "--endpoint", hub.url, *extra)
        assert r.exit_code == 1
        assert "401" in (r.stdout + r.stderr)
        assert TOKEN not in r.stdout + r.stderr


def test_gated_release_needs_a_token_to_fetch(cli, release, hub, tmp_path, monkeypatch):
    assert _publish(cli, release, hub, "--gated").exit_code == 0
    api = HfApi(endpoint=hub.url, token=TOKEN)
    assert api.model_info(REPO).gated == "auto"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("release.hub.client.resolve_token", lambda token=None: None)
    r = cli("fetch", REPO, "--variant", "bf16", "-o", tmp_path / "m", "--endpoint", hub.url)
    assert r.exit_code == 1 and "401" in r.stderr and not (tmp_path / "m").exists()


def test_embedded_local_target_needs_no_account(cli, release, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    target = f"local:{tmp_path / 'registry'}"
    r = cli("publish", release["dir"], "--endpoint", target, "--tag", "v1.0", "--json")
    assert r.exit_code == 0, r.stdout + r.stderr
    r = cli("fetch", f"{REPO}-GPTQ", "--variant", "gptq-4bit-g64", "--revision", "v1.0", "-o", tmp_path / "g",
            "--endpoint", target, "--public-key", release["pub"], "--json")  # fmt: skip
    assert r.exit_code == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["signature_checked"]
    assert (tmp_path / "g" / "model.safetensors").is_file() and (tmp_path / "g" / "quantize_config.json").is_file()


def test_a_xet_client_is_told_what_to_set(hub):
    """The local Hub speaks LFS; a client with Xet on gets a one-line reason, not a bare 404."""
    import urllib.error
    import urllib.request

    HfApi(endpoint=hub.url, token=TOKEN).create_repo("example/xet")
    req = urllib.request.Request(f"{hub.url}/api/models/example/xet/xet-write-token/main")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 501 and "HF_HUB_DISABLE_XET=1" in err.value.headers["X-Error-Message"]


# --- downstream users: the base install ----------------------------------------------------------

HEAVY = ("torch", "transformers", "llama_cpp", "gptqmodel", "matplotlib", "accelerate")
PROBE = """
import json, sys
sys.argv = ["model-release", *sys.argv[1:]]
from release.cli import main
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
heavy = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


def _source_copy(dest: Path) -> Path:
    """What `pip install` builds from: the package, pyproject.toml and README.md, copied (building from
    the checkout itself would leave build/ in it)."""
    shutil.copytree(ROOT / "release", dest / "release", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / f, dest / f)
    return dest


def _base_dependencies() -> Path:
    """A venv holding the base install's dependencies, resolved by pip from PyPI once per machine for
    this pyproject.toml and Python (the cache key), beside the SmolLM2 fixture. A changed dependency
    list is a new key, so a new resolve from nothing; the package itself is never cached."""
    import hashlib

    from filelock import FileLock

    from release.fixtures import cache_root

    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + sys.version.encode()).hexdigest()[:16]
    venv = cache_root() / f"base-install-{key}"
    with FileLock(f"{venv}.lock"):
        if (venv / "ready").is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        src = venv.with_name(venv.name + "-src")
        shutil.rmtree(src, ignore_errors=True)
        _source_copy(src)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        started = time.monotonic()
        r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            str(src)], capture_output=True, text=True, timeout=1200)  # fmt: skip
        shutil.rmtree(src, ignore_errors=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        print(f"base install, dependencies resolved: {time.monotonic() - started:.0f} s")
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", "model-release"], check=True
        )
        (venv / "ready").write_text(key)
        return venv


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory):
    """A venv with `pip install model-release` from this checkout, no extras: a copy of the cached
    dependencies (``_base_dependencies``) with this checkout's package installed into it without
    dependencies, which must then import and run with nothing else (`pip check` agrees)."""
    base = tmp_path_factory.mktemp("base-install")
    src = _source_copy(base / "src")
    venv = base / "venv"
    shutil.copytree(_base_dependencies(), venv, symlinks=True)
    py = str(venv / "bin" / "python")  # `python -m pip`: the copied bin/pip's shebang names the cached venv
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", str(src)],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run([py, "-m", "pip", "check", "--disable-pip-version-check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr  # every requirement of this checkout's package is there
    return venv


def _in_base(venv: Path, *args: object) -> tuple[int, list[str], str, str]:
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": ""}
    p = subprocess.run([str(venv / "bin" / "python"), "-c", PROBE.format(heavy=HEAVY), *map(str, args)],
                       capture_output=True, text=True, env=env, cwd=venv, timeout=600)  # fmt: skip
    probe = json.loads(p.stderr.strip().splitlines()[-1])
    return probe["code"], probe["heavy"], p.stdout, p.stderr


def test_base_install_fetches_and_verifies_without_torch_or_llama_cpp(cli, release, hub, base_venv, tmp_path):
    py = base_venv / "bin" / "python"
    find = f"import importlib.util as u; print([m for m in {HEAVY!r} if u.find_spec(m)])"
    present = subprocess.run([str(py), "-c", find], capture_output=True, text=True, check=True).stdout.strip()
    assert present == "[]"  # none of them is even installed
    assert _publish(cli, release, hub).exit_code == 0
    repo = f"{REPO}-GGUF"
    out = tmp_path / "q4"
    fetch = ["fetch", repo, "--variant", "Q4_K_M", "--revision", "v1.0", "--endpoint", hub.url]
    code, heavy, stdout, stderr = _in_base(base_venv, *fetch, "-o", out, "--public-key", release["pub"], "--json")
    assert code == 0, stdout + stderr
    assert heavy == []
    res = json.loads(stdout)
    assert res["signature_checked"] and any(f.endswith("Q4_K_M.gguf") for f in res["files"])
    code, heavy, stdout, stderr = _in_base(base_venv, "inspect", out / f"{DEMO}-Q4_K_M.gguf", "--json")
    assert code == 0 and heavy == [] and json.loads(stdout)["file_type"], stdout + stderr

    # --revalidate needs the validate extra: the hashes and the signature are still checked, the
    # files kept, and the one error line names the extra.
    again = tmp_path / "q4-revalidate"
    code, heavy, stdout, stderr = _in_base(
        base_venv, *fetch, "-o", again, "--public-key", release["pub"], "--revalidate"
    )
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, stderr
    assert "hashes and signature verified; not revalidated" in errors[0]
    assert "pip install 'model-release[validate]'" in errors[0] and "Traceback" not in stderr
    assert (again / f"{DEMO}-Q4_K_M.gguf").is_file()
    code, _, _, stderr = _in_base(base_venv, "gguf", out, "-o", tmp_path / "g", "-t", "Q8_0")
    assert code == 2 and "pip install 'model-release[gguf]'" in stderr and "Traceback" not in stderr
    code, heavy, stdout, _ = _in_base(base_venv, "kernels", "--json")  # no GPTQModel: nothing to build
    res = json.loads(stdout)
    assert code == 0 and heavy == [] and res["ok"] and res["gptqmodel"] is None and res["kernels"] == []

    # A tampered file on the server is refused the same way as with the full install.
    api = HfApi(endpoint=hub.url, token=TOKEN)
    name = f"{DEMO}-Q4_K_M.gguf"
    sha = next(f.lfs.sha256 for f in api.list_repo_tree(repo, revision="v1.0", recursive=True) if f.path == name)
    blob = hub.state.root / "lfs" / sha
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 0x01
    blob.write_bytes(bytes(data))
    bad = tmp_path / "tampered"
    code, heavy, stdout, stderr = _in_base(base_venv, *fetch, "-o", bad, "--public-key", release["pub"])
    assert code == 1 and f"changed: {name}" in stderr and not bad.exists() and heavy == []


# ---- a Hub that lies (tests/hostile_hub.py): every attack ends in exit 1, one error line, nothing
# at -o or beside it, and no hang --------------------------------------------------------------------

Q8 = f"{DEMO}-Q8_0.gguf"


@pytest.fixture(scope="module")
def hostile(release, tmp_path_factory):
    """A hostile Hub holding the signed GGUF repository, uploaded once; each test sets its attack."""
    from tests.hostile_hub import HostileHub

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", TOKEN)
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        server = HostileHub(tmp_path_factory.mktemp("hostile-hub"), token=TOKEN).start()
        api = HfApi(endpoint=server.url, token=TOKEN)
        api.create_repo(f"{REPO}-GGUF")
        api.upload_folder(repo_id=f"{REPO}-GGUF", folder_path=release["dir"] / GGUF, commit_message="release")
        server.genuine = api.repo_info(f"{REPO}-GGUF").sha
        yield server
        server.stop()


@pytest.fixture
def attack(hostile):
    """Set the attacks of the next fetch (file path -> kind), on the release as uploaded: a commit
    an earlier step forged is dropped (main moves back to the release's commit)."""

    def set_attack(**attacks: str) -> None:
        hostile.attacks, hostile.sent, hostile.served = dict(attacks), 0, []
        with hostile.state.lock:
            repo = hostile.store.load("model", f"{REPO}-GGUF")
            repo["refs"]["branches"]["main"] = hostile.genuine
            hostile.store.save("model", f"{REPO}-GGUF", repo)

    yield set_attack
    set_attack()


def _fetch_from(cli, hostile, tmp_path, release, *extra: object):
    out = tmp_path / "fetched"
    started = time.monotonic()
    r = cli("fetch", f"{REPO}-GGUF", "--variant", "Q8_0", "-o", out, "--endpoint", hostile.url,
            "--public-key", release["pub"], *extra)  # fmt: skip
    return r, out, time.monotonic() - started


def _refused(r, out, tmp_path, *needles: str) -> str:
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 1, r.stdout + r.stderr
    assert len(errors) == 1 and errors[0].startswith("error:"), r.stderr
    assert all(n in errors[0] for n in needles), errors[0]
    assert not out.exists() and not leftovers(tmp_path)
    return errors[0]


def _q8_size(release) -> int:
    manifest = json.loads((release["dir"] / GGUF / MANIFEST).read_text())
    return next(f["size"] for f in manifest["files"] if f["path"] == Q8)


def test_fetch_reads_no_byte_past_the_manifest_size(cli, release, hostile, attack, tmp_path):
    from tests.hostile_hub import PAD

    size = _q8_size(release)
    # 1. Announced padding (Content-Length = file + 50 MB): refused before the body is read.
    attack(**{Q8: "pad"})
    r, out, took = _fetch_from(cli, hostile, tmp_path, release)
    _refused(r, out, tmp_path, f"{Q8}: the server sends {size + PAD} bytes where the manifest lists {size}")
    assert took < 20 and hostile.sent < size + PAD // 2, (took, hostile.sent)
    # 2. Unannounced padding without end, and 3. the drip-feed after the real bytes: the listed bytes
    # are kept, nothing after them is waited for, and the signature proves what was kept.
    for kind in ("endless", "drip-after"):
        attack(**{Q8: kind})
        r, out, took = _fetch_from(cli, hostile, tmp_path, release, "--force")
        assert r.exit_code == 0 and "verified" in r.stdout, r.stdout + r.stderr
        assert took < 20 and hostile.served == [Q8], (kind, took)
        assert (out / Q8).read_bytes() == (release["dir"] / GGUF / Q8).read_bytes()
    shutil.rmtree(out)
    # 4. A connection closed half way through the announced length.
    attack(**{Q8: "short"})
    r, out, took = _fetch_from(cli, hostile, tmp_path, release)
    _refused(r, out, tmp_path, f"fetching {REPO}-GGUF failed")


def test_fetch_gives_up_on_a_stalled_transfer(cli, release, hostile, attack, tmp_path):
    """Half the file, then one byte every 0.5 s: each read returns in time (no read timeout fires),
    but the transfer moves almost nothing; --stall-timeout 2 gives up after about 2 s."""
    attack(**{Q8: "drip-within"})
    r, out, took = _fetch_from(cli, hostile, tmp_path, release, "--stall-timeout", "2")
    _refused(r, out, tmp_path, f"{Q8}: stalled at ", f"of {_q8_size(release)} bytes", "--stall-timeout")
    assert took < 15, took


def _fetch_process(hostile, out: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"}
    cmd = [sys.executable, "-c", "from release.cli import main; main()", "fetch", f"{REPO}-GGUF",
           "--variant", "Q8_0", "-o", str(out), "--endpoint", hostile.url]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while Q8 not in hostile.served or not leftovers(out.parent):  # stuck in the drip, its partial folder there
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.5)
    return proc


def test_fetch_killed_leaves_nothing_and_the_next_run_cleans_up(cli, release, hostile, attack, tmp_path):
    """SIGTERM and SIGINT unwind: exit 143 / 130, one line, the partial folder removed. SIGKILL
    cannot be caught: the next fetch to the same -o removes what the dead process left, and not the
    partial folder of a process on another host (a shared filesystem); one named the older way (no
    owner) goes when it is a day old."""
    out = tmp_path / "fetched"
    for sig, code, line in [(signal.SIGTERM, 143, "error: terminated (SIGTERM): nothing was written"),
                            (signal.SIGINT, 130, "interrupted: nothing was written")]:  # fmt: skip
        attack(**{Q8: "drip-within"})
        proc = _fetch_process(hostile, out)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == code, stderr
        assert [x for x in stderr.splitlines() if x.strip()] == [line], stderr
        assert not out.exists() and not leftovers(tmp_path)
    attack(**{Q8: "drip-within"})
    proc = _fetch_process(hostile, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and f"-{proc.pid}-" in stale[0], stale
    foreign = tmp_path / ".fetched.partial-otherhost-1-0badcafe"
    foreign.mkdir()
    old, recent = tmp_path / ".fetched.partial-0123abcd", tmp_path / ".fetched.partial-89abcdef"  # no owner named
    for p in (old, recent):
        p.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    attack()
    r = cli("fetch", f"{REPO}-GGUF", "--variant", "Q8_0", "-o", out, "--endpoint", hostile.url)
    assert r.exit_code == 0, r.stderr
    assert sorted(leftovers(tmp_path)) == sorted([foreign.name, recent.name])


def test_fetch_refuses_forged_paths_keys_and_signatures(cli, release, hostile, attack, tmp_path):
    """The content attacks: a manifest naming a path outside -o (../ or absolute), the release
    re-signed with another key, the signature stripped. Each: exit 1, one line, nothing written."""
    from release.signing import keygen, sign_folder

    api = HfApi(endpoint=hostile.url, token=TOKEN)
    repo = f"{REPO}-GGUF"
    for bad_path in ("../escape.txt", str(tmp_path / "escape.txt")):
        attack()
        manifest = json.loads((release["dir"] / GGUF / MANIFEST).read_text())
        manifest["files"].append({**manifest["files"][0], "path": bad_path})
        api.create_commit(repo, [CommitOperationAdd(MANIFEST, json.dumps(manifest).encode())], commit_message="x")
        r, out, _ = _fetch_from(cli, hostile, tmp_path, release)
        assert r.exit_code in (1, 2), r.stderr
        errors = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error:") and "escape.txt" in errors[0], r.stderr
        assert not out.exists() and not leftovers(tmp_path) and not (tmp_path / "escape.txt").exists()
        assert not (tmp_path.parent / "escape.txt").exists()
    attack()
    folder = release["base"] / "resigned"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(release["dir"] / GGUF, folder)
    other_key, _ = keygen(release["base"] / "other-key", force=True)
    sign_folder(folder, private_key=other_key)
    api.create_commit(repo, [CommitOperationAdd(SIGNATURE, str(folder / SIGNATURE))], commit_message="re-signed")
    r, out, _ = _fetch_from(cli, hostile, tmp_path, release)
    _refused(r, out, tmp_path, "signature check failed")
    attack()
    api.create_commit(repo, [CommitOperationDelete(SIGNATURE)], commit_message="stripped")
    r, out, _ = _fetch_from(cli, hostile, tmp_path, release)
    _refused(r, out, tmp_path, "no signature (release.sig) to check")
