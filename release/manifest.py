"""`release-manifest.json`: what one release folder (one Hub repository) holds, checked by a JSON Schema.

Every file is listed with its size, sha256, format and the variant that needs it (null: every
variant does), next to each variant's validation summary, the licenses, and the source checkpoint
hash. Publishing uploads it, fetching downloads it first and checks every other file against it,
and the OpenSSF signature (``release.sig``) covers it with the rest of the folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jsonschema

from release import TOOL_NAME, __version__
from release.agreement import REFERENCE, check_agreement, recorded_hashes
from release.atomic import atomic_file
from release.bom import BOM, make_bom, write_bom
from release.cards import folder_kind, release_folders, repo_id
from release.datafiles import data_file
from release.errors import BadInputError, CheckFailedError
from release.hashing import origin_hash, sha256_file
from release.licensing import decide
from release.metadata import ReleaseMetadata
from release.progress import NULL, Reporter

MANIFEST = "release-manifest.json"
SIGNATURE = "release.sig"
PROVENANCE = "provenance.intoto.jsonl"  # the signed build record (provenance.py), written by `sign`
SCHEMA_ID = "model-release/release-manifest/v1"
# Files that describe the folder rather than belong to it.
NOT_LISTED = {MANIFEST, SIGNATURE, PROVENANCE, ".gitattributes"}
_FORMATS = {".safetensors": "safetensors", ".gguf": "gguf", ".json": "json", ".md": "markdown", ".txt": "text",
            ".png": "png", ".jinja": "jinja", ".imatrix": "imatrix"}  # fmt: skip
_DOCS = {"README.md", "LICENSE", "USE_POLICY.md", "NOTICE"}
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def schema() -> dict[str, Any]:
    return data_file("schemas", "release_manifest.schema.json")


def check_manifest(data: Any, where: str) -> dict[str, Any]:
    """Raise BadInputError naming the first schema violation (with its JSON path)."""
    try:
        jsonschema.validate(data, schema())
    except jsonschema.ValidationError as exc:
        at = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise BadInputError(f"{where}: release manifest invalid at {at}: {exc.message}") from None
    return data


def load_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read the release manifest ({exc})") from None
    return check_manifest(data, str(path))


def listed_files(folder: Path) -> list[Path]:
    """Files a release folder publishes: everything but hidden paths and the manifest/signature."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() not in NOT_LISTED:
            out.append(p)
    return out


def _validation_summary(report: Path) -> dict[str, Any] | None:
    if not report.is_file():
        return None
    v = json.loads(report.read_text(encoding="utf-8"))
    m = v.get("metrics", {})
    keys = ("kl_mean", "top1_agreement", "perplexity_ratio")
    return {"kind": v.get("kind", "?"), "passed": bool(v.get("passed")), **{k: float(m.get(k, 0)) for k in keys}}


def _folder_variant(folder: Path, kind: str) -> str:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if kind == "gptq":
        q = config.get("quantization_config") or {}
        if (q.get("meta") or {}).get("variant"):
            return str(q["meta"]["variant"])
        from release.formats.gptq import variant_name

        return variant_name(int(q.get("bits", 4)), int(q.get("group_size", 128)))
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    return _DTYPE_NAMES.get(dtype, dtype or "safetensors")


def _gguf_type(name: str, types: list[str]) -> str | None:
    """``<name>-<TYPE>.gguf`` (how `model-release gguf` names its files) -> TYPE."""
    return next((t for t in sorted(types, key=len, reverse=True) if name.endswith(f"-{t}.gguf")), None)


def write_manifest(
    folder: Path, meta: ReleaseMetadata, *, reference: Path | None = None, reporter: Reporter = NULL
) -> dict[str, Any]:
    """Copy the folder-level validation reports and the reference in, then write the manifest."""
    folder = Path(folder)
    kind = folder_kind(folder)
    if kind is None:
        raise BadInputError(f"{folder}: not a release folder (safetensors model, GGUF files or GPTQ folder)")
    from release.validation.report import find_folder_report

    for suffix in (".validation.json", ".validation.md", ".kl.png"):  # reports `validate` wrote
        made = find_folder_report(folder, suffix) if kind != "gguf" else None
        if made is not None:
            shutil.copyfile(made, folder / f"validation{suffix.removeprefix('.validation')}")
    if reference is not None:
        shutil.copyfile(reference, folder / REFERENCE)
    decision = decide(meta)
    check_agreement(folder, decision.weights_license)  # files and card carry the decided license
    name = meta.name or folder.name
    main_repo = repo_id(meta.repo_url, name)
    variants: dict[str, Any] = {}
    files = []
    if kind == "gguf":
        from release.choices import gguf_type_names  # the names only: formats.gguf would import torch
        from release.formats.gguf_names import set_name

        known = gguf_type_names()
        stems: dict[str, str] = {}  # a variant's file stem -> its type; its reports share the stem
        for g in sorted(folder.glob("*.gguf")):
            logical = Path(set_name(g.name))  # the parts of a split set are one variant
            if (t := _gguf_type(logical.name, known)) is not None:
                stems[logical.stem] = t
                variants[t] = _validation_summary(folder / f"{logical.stem}.validation.json")
    else:
        v = _folder_variant(folder, kind)
        variants[v] = _validation_summary(folder / "validation.json")
    listed = [p for p in listed_files(folder) if p.relative_to(folder).as_posix() != BOM]  # written below
    reporter.start(f"hashing {folder.name}", sum(p.stat().st_size for p in listed))
    for p in listed:
        rel = p.relative_to(folder).as_posix()
        if kind == "gguf":
            logical_name = set_name(p.name)  # not ``name``: that is the release's, written below
            variant = next((t for stem, t in stems.items() if logical_name.startswith(f"{stem}.")), None)
        else:
            variant = None if rel in _DOCS or rel.startswith("validation") else next(iter(variants))
        fmt = "other" if p.name in ("LICENSE", "NOTICE") else _FORMATS.get(p.suffix, "other")
        files.append(
            {"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p), "format": fmt, "variant": variant}
        )
        reporter.advance(p.stat().st_size)
    reporter.done()
    recorded = recorded_hashes(folder, kind)
    repo = main_repo if kind == "model" else f"{main_repo}-{kind.upper()}"
    bom = write_bom(folder, make_bom(folder, meta, kind, repo, decision.weights_license, variants, files,
                                     origin_hash(recorded)))  # fmt: skip
    files.append({"path": BOM, "size": bom.stat().st_size, "sha256": sha256_file(bom), "format": "json",
                  "variant": None})  # fmt: skip
    manifest = {
        "schema": SCHEMA_ID,
        "name": name,
        "version": meta.version,
        "kind": kind,
        "repo_id": repo,
        "tool": {"name": TOOL_NAME, "version": __version__},
        "licenses": {"weights": decision.weights_license, "code": decision.code_license},
        "source_checkpoint_hash": origin_hash(recorded),
        "reference": {"path": REFERENCE, "sha256": sha256_file(folder / REFERENCE)}
        if (folder / REFERENCE).is_file()
        else None,
        "variants": variants,
        "files": files,
    }
    check_manifest(manifest, str(folder / MANIFEST))
    with atomic_file(folder / MANIFEST, force=True) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def write_manifests(release_dir: Path, *, reference: Path | None = None, reporter: Reporter = NULL) -> list[dict]:
    """One manifest per release folder of RELEASE_DIR (what `card` also walks)."""
    meta, folders = release_folders(release_dir)
    decide(meta).raise_for_violations()
    return [write_manifest(f, meta, reference=reference, reporter=reporter) for f, _ in folders]


def check_files(folder: Path, manifest: dict[str, Any], only: set[str] | None = None) -> None:
    """Every listed file (or the ``only`` subset) is present with its size and sha256; nothing else is."""
    listed = {f["path"]: f for f in manifest["files"]}
    wanted = set(listed) if only is None else only
    present = {p.relative_to(folder).as_posix() for p in listed_files(folder)}
    problems = []
    if extra := sorted(present - wanted):
        problems.append(f"not in the manifest: {', '.join(extra)}")
    if missing := sorted(wanted - present):
        problems.append(f"missing: {', '.join(missing)}")
    for rel in sorted(wanted & present):
        f = listed[rel]
        p = folder / rel
        if p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
            problems.append(f"changed: {rel} (sha256 differs from the manifest)")
    if problems:
        raise CheckFailedError(f"{folder}: " + "; ".join(problems))
