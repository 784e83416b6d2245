"""What a checkpoint, safetensors folder or GGUF file contains, without loading its weights."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from release import hashing
from release.errors import BadInputError, ReleaseError
from release.progress import NULL, Reporter

if TYPE_CHECKING:
    from release.checkpoint import Checkpoint, TensorPlan

# GGUF keys shown as license / lineage / provenance metadata
_GGUF_META_PREFIXES = (
    "general.license",
    "general.base_model",
    "general.source",
    "general.repo_url",
    "general.quantized_by",
    "general.version",
    "general.name",
    "model_release.",  # our provenance: producer, source checkpoint hash
)
# safetensors __metadata__ keys that are ours (see metadata.ReleaseMetadata.to_safetensors)
_LICENSE_KEYS = ("license", "base_model")


def describe(path: Path, *, with_hash: bool = False, reporter: Reporter = NULL) -> dict[str, Any]:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return describe_gguf(path)
    return describe_checkpoint(path, with_hash=with_hash, reporter=reporter)


def describe_checkpoint(path: Path, *, with_hash: bool, reporter: Reporter) -> dict[str, Any]:
    # The tensor reader needs torch (the convert extra); a GGUF file is read without it.
    from release.checkpoint import open_checkpoint

    with open_checkpoint(path) as ckpt:
        return describe_open(ckpt, path, with_hash=with_hash, reporter=reporter)


def describe_open(
    ckpt: Checkpoint, path: Path, *, with_hash: bool = False, reporter: Reporter = NULL, plan: TensorPlan | None = None
) -> dict[str, Any]:
    """``describe`` of a checkpoint the caller already holds open (and may have planned): its
    headers are not read again."""
    from release.checkpoint import iter_with_digests, plan_tensors

    dtype_params: Counter[str] = Counter()
    for ref in ckpt.refs.values():
        dtype_params[ref.dtype] += ref.numel
    files = [{"file": f.path.name, "bytes": f.path.stat().st_size, "tensors": len(f.refs)} for f in ckpt.files]
    meta = dict(ckpt.files[0].metadata)
    out: dict[str, Any] = {
        "path": str(path),
        "kind": "checkpoint",
        "format": ckpt.format,
        "layout": ckpt.layout,
        "architecture": (ckpt.config.get("architectures") or [None])[0],
        "model_type": ckpt.config.get("model_type"),
        "parameters": sum(dtype_params.values()),
        "tensors": len(ckpt.refs),
        "dtypes": dict(dtype_params.most_common()),
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "tie_word_embeddings": bool(ckpt.config.get("tie_word_embeddings", False)),
        "extra_files": [p.name for p in ckpt.extra_files()],
        "has_tokenizer": ckpt.has_tokenizer(),
        "chat_template": _has_chat_template(ckpt.root),
        "metadata": meta,
        "license": {k: meta[k] for k in _LICENSE_KEYS if k in meta},
    }
    try:
        plan = plan if plan is not None else plan_tensors(ckpt)
        out["check"] = "ok"
        refs = plan.tensors
    except ReleaseError as exc:  # inspect reports problems instead of failing on them
        out["check"] = exc.message
        refs = sorted(ckpt.refs.values(), key=lambda r: r.name)
    if with_hash:
        reporter.start("hashing tensors", sum(r.nbytes for r in refs))
        entries = {}
        for ref, digest in iter_with_digests(ckpt, refs):
            entries[ref.name] = (ref.dtype, ref.shape, digest)
            reporter.advance(ref.nbytes)
        reporter.done()
        out["checkpoint_hash"] = hashing.checkpoint_hash(entries)
        recorded = meta.get("source_checkpoint_hash")
        if recorded:
            out["matches_source_hash"] = recorded == out["checkpoint_hash"]
    return out


def _has_chat_template(root: Path) -> bool:
    if (root / "chat_template.jinja").is_file() or (root / "chat_template.json").is_file():
        return True
    cfg = root / "tokenizer_config.json"
    if cfg.is_file():
        try:
            return bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return False


def describe_gguf(path: Path) -> dict[str, Any]:
    import gguf  # imported here: only GGUF inspection needs it

    from release.formats.gguf_header import read_header

    try:
        header = read_header(path)  # the vocabulary is not decoded (gguf.GGUFReader: seconds a file)
    except (ValueError, OSError) as exc:
        raise BadInputError(f"{path}: not a readable GGUF file ({exc})") from None
    value = header.value
    types: Counter[str] = Counter()
    params = 0
    for t in header.tensors:
        types[t.tensor_type.name] += 1
        params += t.n_elements
    ftype = value("general.file_type")
    try:
        ftype_name = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else None
    except ValueError:
        ftype_name = str(ftype)
    meta = {k: value(k) for k in header.fields if k.startswith(_GGUF_META_PREFIXES)}
    return {
        "path": str(path),
        "kind": "gguf",
        "format": "gguf",
        "gguf_version": header.version,
        "architecture": value("general.architecture"),
        "name": value("general.name"),
        "file_type": ftype_name,
        "parameters": params,
        "tensors": len(header.tensors),
        "tensor_types": dict(types.most_common()),
        "total_bytes": path.stat().st_size,
        "tokenizer": value("tokenizer.ggml.model"),
        "chat_template": "tokenizer.chat_template" in header.fields,
        "metadata": meta,
        "license": {k: v for k, v in meta.items() if k.startswith(("general.license", "general.base_model"))},
    }
