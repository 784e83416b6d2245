"""`provenance.intoto.jsonl`: the signed build record of one release folder (SLSA Provenance v1).

What a manifest and an OpenSSF signature cannot say is *how* the files were made: from which
checkpoint, with which tool versions, settings and commands, on which machine and when. This file
says it in the standard shape supply-chain tools read: one DSSE envelope (one JSON line) around an
in-toto Statement v1 whose subjects are every file of the folder with its sha256 and whose predicate
is SLSA Provenance v1:

- ``buildDefinition.externalParameters``: the release file (its sha256 and its resolved settings);
- ``buildDefinition.internalParameters``: each step's command line, node, thread count and times,
  as the build's step records (``DIST/.steps``) hold them;
- ``buildDefinition.resolvedDependencies``: the source checkpoint (its tensor hash), the evaluation
  prompts and calibration text (sha256), and exact versions of the libraries and of the llama.cpp
  commit llama-cpp-python vendors;
- ``runDetails``: builder, start and finish, and the machine (CPU model, GPU) that signed.

``sign`` writes it with the release's EC key (the one of ``release.sig``), before the OpenSSF
signature, which then covers it too: a release whose signature lists a statement and that now lacks
one, or carries an altered one, is refused by ``verify`` and ``fetch``. The envelope is made and
checked with securesystemslib's DSSE (``Envelope``, ``CryptoSigner``), the statement with the
in-toto attestation bindings, so any DSSE verifier with the public key accepts it.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from release import TOOL_NAME, __version__
from release.atomic import atomic_file
from release.errors import BadInputError, CheckFailedError
from release.manifest import MANIFEST, PROVENANCE, listed_files, load_manifest
from release.versions import library_versions, llama_cpp_commit

PAYLOAD_TYPE = "application/vnd.in-toto+json"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
# What our buildType means (which parameters, how steps are recorded) is documented in docs/provenance.md.
BUILD_TYPE = "https://model-release.readthedocs.io/provenance/build/v1"
_CLI = ("-m", "release.cli")


# -- making it -----------------------------------------------------------------------------------


def subject_names(folder: Path) -> list[str]:
    """Every file of the folder that the build record names: what the manifest lists, and the
    manifest itself (not the record, nor the signature over it)."""
    names = [p.relative_to(folder).as_posix() for p in listed_files(Path(folder))]
    return sorted([*names, *([MANIFEST] if (Path(folder) / MANIFEST).is_file() else [])])


def subjects(folder: Path) -> list[dict[str, Any]]:
    """Every subject with its sha256."""
    from release.hashing import sha256_file

    return [{"name": n, "digest": {"sha256": sha256_file(Path(folder) / n)}} for n in subject_names(folder)]


def _command(argv: list[str]) -> list[str]:
    """A step's command as a user would type it: ``model-release ...`` for ``python -m release.cli ...``."""
    if len(argv) > 2 and tuple(argv[1:3]) == _CLI:
        return [TOOL_NAME, *argv[3:]]
    return list(argv)


def _steps(dist: Path) -> list[dict[str, Any]]:
    """The build's step records, in the order they finished (none when the folder was not built here)."""
    steps = []
    for p in sorted((dist / ".steps").glob("*.json")):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        out = rec.get("output") if isinstance(rec.get("output"), dict) else {}
        steps.append({"name": rec.get("step", p.stem), "command": _command(rec.get("argv") or []),
                      "node": rec.get("node", ""), "startedOn": rec.get("started"), "finishedOn": rec.get("finished"),
                      "seconds": rec.get("seconds"), "threads": rec.get("threads") or None,
                      "exitCode": out.get("exit_code", 0)})  # fmt: skip
    return sorted(steps, key=lambda s: (s["finishedOn"] or "", s["name"]))


def flag_value(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command[:-1] else None


def _texts(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation prompts and calibration texts the steps read, each by sha256 (a step without
    ``--prompts``/``--calibration`` read the text this package ships)."""
    from importlib import resources

    from release.hashing import sha256_file

    wanted = {"reference": ("--prompts", "eval", "evaluation prompts"),
              "imatrix": ("--calibration", "calibration", "calibration text (importance matrix)"),
              "gptq": ("--calibration", "calibration", "calibration text (GPTQ)")}  # fmt: skip
    out = []
    for step in steps:
        if step["name"] not in wanted or not step["command"]:
            continue
        flag, kind, label = wanted[step["name"]]
        given = flag_value(step["command"], flag)
        if given is not None and Path(given).is_file():
            path, uri = Path(given), Path(given).absolute().as_uri()
        elif given is None:
            path = Path(str(resources.files("release").joinpath("data", kind, "default.jsonl")))
            uri = f"pkg:pypi/{TOOL_NAME}@{__version__}#release/data/{kind}/default.jsonl"
        else:  # moved since the build: named, without a digest we can no longer compute
            out.append({"name": label, "uri": Path(given).absolute().as_uri(), "annotations": {"missing": True}})
            continue
        out.append({"name": label, "uri": uri, "digest": {"sha256": sha256_file(path)}})
    return out


def _dependencies(source_hash: str | None, source_uri: str | None, steps: list[dict[str, Any]]) -> list[dict]:
    deps: list[dict[str, Any]] = []
    if source_hash:
        alg, _, value = source_hash.partition(":")
        # Not a digest of one file: model-release's checkpoint hash (blake3 over every tensor's dtype,
        # shape and bytes), the same whatever the shard layout; `inspect --hash` recomputes it.
        deps.append({"name": "source checkpoint", **({"uri": source_uri} if source_uri else {}),
                     "digest": {f"model-release-checkpoint-{alg}": value}})  # fmt: skip
    deps += _texts(steps)
    for name, version in library_versions().items():
        deps.append({"name": name, "uri": f"pkg:pypi/{name}@{version}"})
    if commit := llama_cpp_commit():
        deps.append({"name": "llama.cpp", "uri": f"git+https://github.com/ggml-org/llama.cpp@{commit}",
                     "annotations": {"vendoredBy": "llama-cpp-python"}})  # fmt: skip
    return deps


def machine() -> dict[str, Any]:
    """The signing machine: host, CPU model and count, GPU (``nvidia-smi``, when there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus: list[str] = []
    if smi := shutil.which("nvidia-smi"):
        try:
            run = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20, check=False)  # fmt: skip
            gpus = [g.strip() for g in run.stdout.splitlines() if g.strip()]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {"host": socket.gethostname(), "os": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(),
            "gpus": gpus, "python": platform.python_version()}  # fmt: skip


def _source(dist: Path) -> tuple[str | None, dict[str, Any]]:
    """(sha256, resolved settings) of the build's copy of the release file, when there is one."""
    import hashlib

    import yaml

    copy = dist / "release.yaml"
    if not copy.is_file():
        return None, {}
    body = copy.read_bytes()
    try:
        settings = yaml.safe_load(body) or {}
    except yaml.YAMLError:
        settings = {}
    return hashlib.sha256(body).hexdigest(), json.loads(json.dumps(settings, default=str))


def statement(folder: Path) -> dict[str, Any]:
    """The in-toto Statement (SLSA Provenance v1) of a release folder, checked by the in-toto bindings."""
    from google.protobuf import json_format
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.v1.statement import Statement

    folder = Path(folder)
    dist = folder.parent
    manifest = load_manifest(folder / MANIFEST)
    steps = _steps(dist)
    digest, settings = _source(dist)
    convert = next((s["command"] for s in steps if s["name"] == "convert"), [])  # model-release convert SRC ...
    source_uri = Path(convert[2]).absolute().as_uri() if len(convert) > 2 else None
    external: dict[str, Any] = {"repository": manifest["repo_id"], "version": manifest.get("version")}
    if digest:
        external["releaseFile"] = {"name": "release.yaml", "digest": {"sha256": digest}, "settings": settings}
    external["licenses"] = manifest["licenses"]
    started = min((s["startedOn"] for s in steps if s["startedOn"]), default=None)
    metadata: dict[str, Any] = {"invocationId": _invocation()} if os.environ.get("GITHUB_RUN_ID") else {}
    if started:
        metadata["startedOn"] = started
    metadata["finishedOn"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    nodes = sorted({s["node"] for s in steps if s["node"]})
    provenance = {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": external,
            "internalParameters": {"steps": steps, "variants": sorted(manifest["variants"])},
            "resolvedDependencies": _dependencies(manifest.get("source_checkpoint_hash"), source_uri, steps),
        },
        "runDetails": {
            "builder": {"id": _builder(), "version": {TOOL_NAME: __version__}},
            "metadata": metadata,
            "byproducts": [
                {"name": "machine", "content": _b64(machine())},
                {"name": "nodes", "content": _b64(nodes)},
            ],
        },
    }
    # The bindings check the shape: the predicate parses as SLSA Provenance v1 (unknown fields refused)
    # and the statement has typed subjects with digests.
    json_format.ParseDict(provenance, provenance_pb2.Provenance())
    subj = subjects(folder)
    st = Statement([], SLSA_PROVENANCE, provenance)
    from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor

    st.pb.subject.extend(ResourceDescriptor(s["name"], digest=s["digest"]).pb for s in subj)
    st.validate()
    return {"_type": STATEMENT_TYPE, "subject": subj, "predicateType": SLSA_PROVENANCE, "predicate": provenance}


def _builder() -> str:
    """A GitHub workflow (its ref) when CI built it, else this host."""
    if ref := os.environ.get("GITHUB_WORKFLOW_REF"):
        return f"{os.environ.get('GITHUB_SERVER_URL', 'https://github.com')}/{ref}"
    return f"urn:{TOOL_NAME}:host:{socket.gethostname()}"


def _invocation() -> str:
    server = os.environ.get("GITHUB_SERVER_URL", "https://github.com")
    return f"{server}/{os.environ.get('GITHUB_REPOSITORY', '')}/actions/runs/{os.environ['GITHUB_RUN_ID']}"


def _b64(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj, sort_keys=True).encode()).decode()


def _signer(private_key: Path) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.signer import CryptoSigner

    try:
        key = load_pem_private_key(Path(private_key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BadInputError(f"{private_key}: not a PEM private key ({exc})") from None
    return CryptoSigner(key)


def write(folder: Path, private_key: Path) -> Path:
    """Sign the folder's statement with the release key and write it as one DSSE envelope line."""
    from securesystemslib.dsse import Envelope

    body = json.dumps(statement(folder), sort_keys=True, separators=(",", ":")).encode()
    envelope = Envelope(payload=body, payload_type=PAYLOAD_TYPE, signatures={})
    envelope.sign(_signer(private_key))
    with atomic_file(Path(folder) / PROVENANCE, force=True) as tmp:
        tmp.write_text(json.dumps(envelope.to_dict(), sort_keys=True) + "\n", encoding="utf-8")
    return Path(folder) / PROVENANCE


# -- checking it ---------------------------------------------------------------------------------


def read(folder: Path, public_key: Path | None = None) -> dict[str, Any]:
    """The statement of a folder's ``provenance.intoto.jsonl``; with ``public_key`` its DSSE
    signature is checked first (CheckFailedError naming what is wrong)."""
    from securesystemslib.dsse import Envelope

    path = Path(folder) / PROVENANCE
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        envelope = Envelope.from_dict(json.loads(lines[0]))
    except FileNotFoundError:
        raise CheckFailedError(f"{folder}: no build record ({PROVENANCE})") from None
    except (OSError, IndexError, KeyError, ValueError, TypeError) as exc:
        raise CheckFailedError(f"{folder}: {PROVENANCE} is not a DSSE envelope ({exc})") from None
    if envelope.payload_type != PAYLOAD_TYPE:
        raise CheckFailedError(f"{folder}: {PROVENANCE}: payload type {envelope.payload_type!r}, not {PAYLOAD_TYPE}")
    if public_key is not None:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
        from securesystemslib.exceptions import VerificationError
        from securesystemslib.signer import SSlibKey

        try:
            key = SSlibKey.from_crypto(load_pem_public_key(Path(public_key).read_bytes()))
        except (OSError, ValueError, TypeError) as exc:
            raise BadInputError(f"{public_key}: not a PEM public key ({exc})") from None
        try:
            envelope.verify([key], 1)
        except VerificationError:
            raise CheckFailedError(
                f"{folder}: {PROVENANCE}: the build record's signature does not verify with {public_key}"
            ) from None
    try:
        st = json.loads(envelope.payload)
    except ValueError:
        raise CheckFailedError(f"{folder}: {PROVENANCE}: the payload is not JSON") from None
    if st.get("_type") != STATEMENT_TYPE or st.get("predicateType") != SLSA_PROVENANCE:
        raise CheckFailedError(f"{folder}: {PROVENANCE}: not an in-toto statement with SLSA provenance v1")
    return st


def check_subjects(
    folder: Path, st: dict[str, Any], only: set[str] | None = None, known: dict[str, str] | None = None
) -> None:
    """The folder's files are the statement's subjects, byte for byte. ``only``: a fetched subset
    (the variant's files): those must be subjects with their digests; the rest may be absent.
    ``known``: digests the caller has just checked these very files against (the manifest's, after
    ``check_files``), so that a 70B folder is not read once more; the others are hashed."""
    from release.hashing import sha256_file

    known = known or {}
    recorded = {s["name"]: (s.get("digest") or {}).get("sha256") for s in st.get("subject", [])}
    present = set(subject_names(folder)) if only is None else set(only)
    problems = [f"{p} is not in the build record" for p in sorted(present - set(recorded))]
    if only is None:
        problems += [f"{p} is in the build record but missing" for p in sorted(set(recorded) - present)]
    for p in sorted(present & set(recorded)):
        path = Path(folder) / p
        if path.is_file() and (known.get(p) or sha256_file(path)) != recorded[p]:
            problems.append(f"{p}: sha256 differs from the build record's")
    if problems:
        raise CheckFailedError(f"{folder}: {PROVENANCE}: " + "; ".join(problems))


def verify(
    folder: Path, public_key: Path | None, only: set[str] | None = None, known: dict[str, str] | None = None
) -> dict[str, Any]:
    """Read, check the signature (with a key) and the subjects (see check_subjects); the statement."""
    st = read(folder, public_key)
    check_subjects(folder, st, only, known)
    return st


def summary(st: dict[str, Any]) -> dict[str, Any]:
    """What `inspect` shows: source hash, tools, settings, commands, when and where."""
    pred = st["predicate"]
    bd, rd = pred["buildDefinition"], pred["runDetails"]
    deps = bd.get("resolvedDependencies", [])
    source = next((d for d in deps if d.get("name") == "source checkpoint"), None)
    source_hash = None
    if source:
        alg, value = next(iter(source["digest"].items()))
        source_hash = f"{alg.removeprefix('model-release-checkpoint-')}:{value}"
    tools = {d["name"]: d["uri"].rsplit("@", 1)[-1] for d in deps if str(d.get("uri", "")).startswith(("pkg:", "git+"))
             and "digest" not in d}  # fmt: skip
    texts = {d["name"]: (d.get("digest") or {}).get("sha256") for d in deps if d.get("name", "").endswith(
        ("prompts", "(importance matrix)", "(GPTQ)"))}  # fmt: skip
    ext = bd.get("externalParameters", {})
    machine_info: dict[str, Any] = {}
    for b in rd.get("byproducts", []):
        if b.get("name") == "machine":
            machine_info = json.loads(base64.b64decode(b["content"]))
    return {
        "repository": ext.get("repository"), "version": ext.get("version"), "source_checkpoint_hash": source_hash,
        "release_file_sha256": (ext.get("releaseFile") or {}).get("digest", {}).get("sha256"),
        "settings": (ext.get("releaseFile") or {}).get("settings", {}).get("variants"),
        "texts": texts, "tools": tools, "builder": rd["builder"]["id"],
        "started": rd.get("metadata", {}).get("startedOn"), "finished": rd.get("metadata", {}).get("finishedOn"),
        "machine": machine_info, "steps": [{"name": s["name"], "command": " ".join(s["command"])}
                                           for s in bd.get("internalParameters", {}).get("steps", [])],
        "files": len(st.get("subject", [])),
    }  # fmt: skip
