"""`provenance.intoto.jsonl`, the signed build record in every release folder, and `reproduce`.

The record is checked as an outside verifier would: the DSSE signature by hand (PAE and ECDSA with
`cryptography`, no code of ours), the statement against the folder's files and the build's own
records. An altered, foreign-signed or removed record is refused by `verify`; `inspect` and the
cards show it. `reproduce` rebuilds Q8_0, Q4_K_M (with the shipped importance matrix) and GPTQ
4-bit byte-identical on this machine, names the one tensor a tampered GGUF has changed with its KL,
and refuses a source with another checkpoint hash."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import DEMO

pytestmark = pytest.mark.real_model
FOLDERS = (DEMO, f"{DEMO}-GGUF", f"{DEMO}-GPTQ")
RECORD = "provenance.intoto.jsonl"


def _envelope(folder: Path) -> dict:
    lines = (folder / RECORD).read_text().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def _pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding, from the spec (github.com/secure-systems-lab/dsse)."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)


def _dsse_verifies(envelope: dict, public_key: Path) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(public_key.read_bytes())
    body = base64.b64decode(envelope["payload"])
    try:
        key.verify(base64.b64decode(envelope["signatures"][0]["sig"]), _pae(envelope["payloadType"], body),
                   ec.ECDSA(hashes.SHA256()))  # fmt: skip
    except InvalidSignature:
        return False
    return True


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_folder_has_a_build_record_a_plain_dsse_verifier_accepts(demo_release, folder):
    from google.protobuf import json_format
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2

    path = demo_release.dir / folder
    env = _envelope(path)
    assert env["payloadType"] == "application/vnd.in-toto+json"
    assert _dsse_verifies(env, demo_release.pub)
    st = json.loads(base64.b64decode(env["payload"]))
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://slsa.dev/provenance/v1"
    json_format.ParseDict(st["predicate"], provenance_pb2.Provenance())  # the SLSA v1 shape, no unknown field
    # Subjects: every file of the folder but the record and the signature, with its sha256.
    files = {p.relative_to(path).as_posix(): p for p in path.rglob("*") if p.is_file()}
    subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
    assert set(subjects) == set(files) - {RECORD, "release.sig"}
    for name, digest in subjects.items():
        assert hashlib.sha256(files[name].read_bytes()).hexdigest() == digest, name
    manifest = json.loads((path / "release-manifest.json").read_text())
    assert set(subjects) == {f["path"] for f in manifest["files"]} | {"release-manifest.json"}
    bd, rd = st["predicate"]["buildDefinition"], st["predicate"]["runDetails"]
    rf = bd["externalParameters"]["releaseFile"]
    copy = demo_release.dir / "release.yaml"
    assert rf["digest"]["sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert rf["settings"]["variants"]["gguf"]["types"] == ["Q8_0", "Q4_K_M"]
    deps = {d["name"]: d for d in bd["resolvedDependencies"]}
    alg, value = manifest["source_checkpoint_hash"].split(":")
    assert deps["source checkpoint"]["digest"] == {f"model-release-checkpoint-{alg}": value}
    assert deps["torch"]["uri"] == f"pkg:pypi/torch@{importlib.metadata.version('torch')}"
    assert (
        deps["llama-cpp-python"]["uri"] == f"pkg:pypi/llama-cpp-python@{importlib.metadata.version('llama-cpp-python')}"
    )
    assert deps["llama.cpp"]["uri"].startswith("git+https://github.com/ggml-org/llama.cpp@")
    shipped = Path(__file__).parents[1] / "release" / "data"
    assert (
        deps["evaluation prompts"]["digest"]["sha256"]
        == hashlib.sha256((shipped / "eval" / "default.jsonl").read_bytes()).hexdigest()
    )
    assert (
        deps["calibration text (importance matrix)"]["digest"]["sha256"]
        == hashlib.sha256((shipped / "calibration" / "default.jsonl").read_bytes()).hexdigest()
    )
    # Each step's command line and threads, as the build's records hold them.
    steps = {s["name"]: s for s in bd["internalParameters"]["steps"]}
    records = {p.stem: json.loads(p.read_text()) for p in (demo_release.dir / ".steps").glob("*.json")}
    assert set(steps) == set(records) - {"sign"}  # the record is written by the sign step itself
    q4 = steps["gguf-Q4_K_M"]["command"]
    assert q4[:2] == ["model-release", "gguf"] and "--imatrix" in q4 and q4[q4.index("-t") + 1] == "Q4_K_M"
    assert steps["gptq"]["threads"] == records["gptq"]["threads"] >= 1
    assert rd["metadata"]["startedOn"] <= rd["metadata"]["finishedOn"]
    machine = json.loads(base64.b64decode(next(b for b in rd["byproducts"] if b["name"] == "machine")["content"]))
    assert machine["cpus"] >= 1 and machine["cpu"]


def _copy(demo_release, tmp_path: Path, folder: str = f"{DEMO}-GGUF") -> Path:
    out = tmp_path / folder
    shutil.copytree(demo_release.dir / folder, out)
    return out


def _reencode(folder: Path, change) -> None:
    env = _envelope(folder)
    st = json.loads(base64.b64decode(env["payload"]))
    change(st)
    env["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    (folder / RECORD).write_text(json.dumps(env) + "\n")


def test_verify_refuses_an_altered_foreign_or_removed_build_record(demo_release, cli, tmp_path):
    from release.provenance import write
    from release.signing import keygen

    folder = _copy(demo_release, tmp_path)
    key = ["--public-key", demo_release.pub]
    ok = cli("verify", folder, *key, "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["provenance_checked"] == [str(folder)], ok.stderr
    original = (folder / RECORD).read_bytes()

    def claim_another_source(st: dict) -> None:
        deps = st["predicate"]["buildDefinition"]["resolvedDependencies"]
        src = next(d for d in deps if d["name"] == "source checkpoint")
        src["digest"] = {k: "0" * 64 for k in src["digest"]}

    _reencode(folder, claim_another_source)
    r = cli("verify", folder, *key)
    assert r.exit_code == 1 and "build record's signature does not verify" in r.stderr, r.stderr
    # Signed again, by someone else's key: its own signature is fine, not with the release's key.
    other, _ = keygen(tmp_path / "attacker")
    write(folder, other)
    r = cli("verify", folder, *key)
    assert r.exit_code == 1 and "does not verify with" in r.stderr, r.stderr
    # Removed: the release's signature lists it.
    (folder / RECORD).unlink()
    r = cli("verify", folder, *key)
    assert r.exit_code == 1 and "lists a build record" in r.stderr and "missing" in r.stderr, r.stderr
    # Without a key only its subjects can be compared: a file it names with another digest is refused
    # even when the manifest was forged to match.
    (folder / RECORD).write_bytes(original)
    assert cli("verify", folder).exit_code == 0
    _reencode(folder, lambda st: st["subject"][0]["digest"].update(sha256="1" * 64))
    r = cli("verify", folder)
    assert r.exit_code == 1 and "sha256 differs from the build record's" in r.stderr, r.stderr


def test_inspect_and_the_cards_show_the_build_record(demo_release, cli):
    gguf = demo_release.dir / f"{DEMO}-GGUF"
    manifest = json.loads((gguf / "release-manifest.json").read_text())
    r = cli("inspect", gguf, "--json")
    assert r.exit_code == 0, r.stderr
    p = json.loads(r.stdout)["provenance"]
    assert p["source_checkpoint_hash"] == manifest["source_checkpoint_hash"]
    assert p["tools"]["llama-cpp-python"] == importlib.metadata.version("llama-cpp-python")
    assert p["settings"]["gguf"]["imatrix_chunks"] == 4 and p["started"] <= p["finished"]
    assert any(s["name"] == "gguf-Q4_K_M" and "--imatrix" in s["command"] for s in p["steps"])
    text = cli("inspect", gguf)
    assert text.exit_code == 0 and "build record" in text.stdout and manifest["source_checkpoint_hash"] in text.stdout
    main = cli("inspect", demo_release.dir / DEMO, "--json")  # a safetensors folder: the checkpoint and its record
    assert main.exit_code == 0 and {"parameters", "provenance"} <= set(json.loads(main.stdout))
    for folder in FOLDERS:
        card = (demo_release.dir / folder / "README.md").read_text()
        section = card.split("## Provenance", 1)[1].split("\n## ", 1)[0]
        assert f"`{manifest['source_checkpoint_hash']}`" in section  # the demo converts with dtype keep
        assert "model-release verify . --public-key" in section and "model-release inspect ." in section
        assert f"model-release {importlib.metadata.version('model-release')}" in section


def _reproduce(cli, folder: Path, variant: str, *extra: object) -> tuple[int, dict, str]:
    r = cli("reproduce", folder, "--variant", variant, "--json", *extra)
    return r.exit_code, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}), r.stderr


def test_reproduce_gguf_byte_identical_and_a_tampered_tensor_named(demo_release, cli, tmp_path, tiny, monkeypatch):
    import numpy as np

    from release import reproduce
    from release.formats.gguf_header import read_header

    gguf = demo_release.dir / f"{DEMO}-GGUF"
    for variant in ("Q8_0", "Q4_K_M"):  # from the release's own safetensors folder (same checkpoint hash)
        code, out, err = _reproduce(cli, gguf, variant, "--public-key", demo_release.pub)
        assert code == 0 and out["identical"], err + json.dumps(out)[:2000]
        assert out["source"] == str(demo_release.dir / DEMO) and out["files"][0]["matches_build_record"]
    assert "--imatrix" in out["command"] and f"{DEMO}.imatrix" in out["command"][out["command"].index("--imatrix") + 1]
    # One tensor of the published Q4_K_M changed (rows of another block copied in).
    (tmp_path / "dist").mkdir()
    folder = _copy(demo_release, tmp_path / "dist")
    (tmp_path / "dist" / DEMO).symlink_to(demo_release.dir / DEMO)
    path = folder / f"{DEMO}-Q4_K_M.gguf"
    t = next(t for t in read_header(path).tensors if t.name == "blk.3.attn_q.weight")
    rows = t.n_elements // t.shape[0]
    data = np.memmap(path, dtype=np.uint8, mode="r+", offset=t.offset, shape=(rows, t.n_bytes // rows))
    data[:64] = data[64:128].copy()
    data.flush()
    del data
    # And one key: the 1000th token's text, overwritten with as many x's (the file stays whole).
    tokens = read_header(path).fields["tokenizer.ggml.tokens"]
    with open(path, "r+b") as f:
        f.seek(tokens.offset)
        for _ in range(999):
            f.seek(int.from_bytes(f.read(8), "little"), 1)
        n = int.from_bytes(f.read(8), "little")
        f.write(b"x" * n)
    code, out, err = _reproduce(cli, folder, "Q4_K_M")
    assert code == 1 and not out["identical"], err
    assert [t["name"] for t in out["tensors"]] == ["blk.3.attn_q.weight"], out["tensors"]
    assert out["metadata"] == ["tokenizer.ggml.tokens"], out["metadata"]
    assert out["tensors"][0]["max_abs_diff"] > 0 and out["kl_mean"] > 0 and out["kl_max"] > out["kl_mean"]
    assert not out["files"][0]["matches_build_record"]
    # The human form of that same result (not rebuilt a second time: the command prints what
    # reproduce() returns) names the tensor and the KL, and exits 1.
    fields = {k: v for k, v in out.items() if k != "ok"}
    monkeypatch.setattr(reproduce, "reproduce", lambda *a, **k: reproduce.ReproduceResult(**fields))
    human = cli("reproduce", folder, "--variant", "Q4_K_M")
    monkeypatch.undo()
    assert human.exit_code == 1 and "tensor blk.3.attn_q.weight" in human.stdout and "KL of the rebuilt" in human.stdout
    # A published file cut short (in a copy of its own): not identical, and said so in one line, not
    # a traceback.
    (tmp_path / "cut").mkdir()
    folder = _copy(demo_release, tmp_path / "cut")
    (tmp_path / "cut" / DEMO).symlink_to(demo_release.dir / DEMO)
    cut = folder / f"{DEMO}-Q8_0.gguf"
    os.truncate(cut, cut.stat().st_size // 2)
    code, out, err = _reproduce(cli, folder, "Q8_0")
    assert code == 1 and out.get("identical") is False and out["tensors"] == [], (code, err, json.dumps(out)[:2000])
    assert "runs past the end of the file" in out["files"][0]["unreadable"], out["files"]
    fields = {k: v for k, v in out.items() if k != "ok"}
    monkeypatch.setattr(reproduce, "reproduce", lambda *a, **k: reproduce.ReproduceResult(**fields))
    human = cli("reproduce", folder, "--variant", "Q8_0")
    monkeypatch.undo()
    assert human.exit_code == 1 and "the published file is unreadable: tensor " in human.stdout, human.stdout
    # A source with another checkpoint hash is refused, both hashes named.
    src, _, _ = tiny()
    code, out, err = _reproduce(cli, gguf, "Q8_0", "--source", src)
    recorded = json.loads((demo_release.dir / DEMO / "release-manifest.json").read_text())["source_checkpoint_hash"]
    assert code == 2 and recorded in out["message"] and out["message"].count("blake3:") == 2, out


def test_reproduce_gptq_byte_identical_on_the_cpu(demo_release, cli, smollm2):
    folder = demo_release.dir / f"{DEMO}-GPTQ"
    (variant,) = json.loads((folder / "release-manifest.json").read_text())["variants"]
    # GPTQ reads the source checkpoint, not the release's safetensors folder: --source is required.
    code, out, err = _reproduce(cli, folder, variant)
    assert code == 2 and "--source" in out["hint"] and str(smollm2.hf) in out["message"], out
    code, out, err = _reproduce(cli, folder, variant, "--source", smollm2.hf)
    assert code == 0 and out["identical"], err + json.dumps(out)[:2000]
    assert {"model.safetensors", "config.json", "quantize_config.json"} <= {f["path"] for f in out["files"]}
