"""`model-release reproduce`: rebuild one variant from its source with the settings its signed build
record holds, and say whether the result is the published file, byte for byte.

The build record (provenance.py) keeps the exact command of the step that made the variant and its
thread count. Reproducing runs that command again with four things swapped: the source (the path a
third party has; its checkpoint hash must be the one the variant records), the output folder (a
temporary one), the release file (rewritten from the record's resolved settings) and the importance
matrix (the one the release ships). ``--intermediate`` is dropped: quantizing from the source writes
the same bytes (tests/test_gguf.py).

When the bytes differ, the report says where and by how much, so that a third party can tell a
tampered file (one tensor far off, a large KL) from another CPU or compiler (many tensors off by a
rounding step, a KL near zero): every tensor that differs with the largest difference of its
dequantized values, differing metadata keys, and the KL divergence of the rebuilt file's next-token
distributions from the published one's on the release's own evaluation prompts (the token ids of
``reference-logits.safetensors``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from release import TOOL_NAME
from release.agreement import REFERENCE, gguf_header_string, recorded_hashes
from release.errors import BadInputError, CheckFailedError
from release.hashing import sha256_file
from release.manifest import MANIFEST, load_manifest
from release.progress import NULL, Reporter
from release.provenance import check_subjects, flag_value, read

_TOP_K = 64  # the published file's top-k next tokens per position: KL with a rest-of-vocabulary bucket


@dataclass
class ReproduceResult:
    folder: str
    variant: str
    step: str
    source: str
    source_checkpoint_hash: str
    command: list[str]
    identical: bool
    files: list[dict[str, Any]] = field(default_factory=list)  # path, published and rebuilt sha256
    tensors: list[dict[str, Any]] = field(default_factory=list)  # the tensors that differ
    metadata: list[str] = field(default_factory=list)  # GGUF keys whose values differ
    kl_mean: float | None = None  # of the rebuilt file from the published one, nats per token
    kl_max: float | None = None
    top1_agreement: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.identical, **asdict(self)}


def _step_name(kind: str, variant: str) -> str:
    return {"gguf": f"gguf-{variant}", "gptq": "gptq", "model": "convert"}[kind]


def _variant_files(folder: Path, manifest: dict[str, Any], kind: str, variant: str) -> list[str]:
    """The published files the step wrote and the rebuild is compared with."""
    files = manifest["files"]
    if kind == "gguf":
        return [f["path"] for f in files if f["variant"] == variant and f["format"] == "gguf"]
    made = {"safetensors", "json", "jinja", "txt"}  # weights, configs and tokenizer: what convert/gptq write
    skip = {MANIFEST, "bom.cdx.json", "validation.json", REFERENCE}
    return [f["path"] for f in files if f["format"] in made and f["path"] not in skip]


def _recorded_source(folder: Path, kind: str, published: list[str]) -> str | None:
    """The checkpoint hash of the variant's direct source, as the variant's own files record it."""
    if kind == "gguf":  # this variant's own file, not the folder's first
        return gguf_header_string(folder / published[0], "model_release.source_checkpoint_hash")
    return recorded_hashes(folder, kind).get("source_checkpoint_hash")


def _checkpoint_hash(path: Path, reporter: Reporter) -> str:
    from release.inspect import describe

    return str(describe(path, with_hash=True, reporter=reporter)["checkpoint_hash"])


def _choose_source(folder: Path, recorded: str, given: Path | None, made_from: str | None, reporter: Reporter) -> Path:
    """``given`` when its hash is the recorded one; else the release's own safetensors folder beside
    this one, when the step read that folder (``made_from`` is None otherwise: the same weights read
    from elsewhere are recorded differently, with the folder's origin) and it still holds those weights."""
    if given is not None:
        actual = _checkpoint_hash(given, reporter)
        if actual != recorded:
            raise BadInputError(
                f"{given}: checkpoint hash {actual}; the variant was made from {recorded}",
                hint="pass the checkpoint the release was built from (`model-release inspect --hash` shows a hash)",
            )
        return given
    if made_from is not None:
        raise BadInputError(
            f"{folder}: the variant was made from {made_from} (checkpoint hash {recorded}), not from the "
            "release's safetensors folder",
            hint="pass that checkpoint with --source",
        )
    main = _main_folder(folder)
    if main is not None:
        actual = _checkpoint_hash(main, reporter)
        if actual == recorded:
            return main
        raise BadInputError(
            f"{main} holds weights with checkpoint hash {actual}, not the variant's source {recorded} "
            "(a dtype cast changes it)",
            hint="pass the source checkpoint with --source",
        )
    raise BadInputError(f"{folder}: no source: pass --source DIR (checkpoint hash {recorded})")


def _reads_main(st: dict[str, Any], name: str) -> bool:
    """Whether the build record's step ``name`` read the release's own safetensors folder (the
    GGUF steps do; GPTQ and convert read the source checkpoint)."""
    steps = st["predicate"]["buildDefinition"]["internalParameters"].get("steps", [])
    convert = next((s["command"] for s in steps if s["name"] == "convert"), [])
    step = next((s["command"] for s in steps if s["name"] == name), [])
    return name != "convert" and len(step) > 2 and step[2] == flag_value(convert, "-o")


def _main_folder(folder: Path) -> Path | None:
    """The release's safetensors folder beside a -GGUF/-GPTQ one (the layout `build` and `fetch` write)."""
    for suffix in ("-GGUF", "-GPTQ"):
        if folder.name.endswith(suffix):
            main = folder.with_name(folder.name.removesuffix(suffix))
            if (main / "config.json").is_file():
                return main
    return None


def rebuild_command(command: list[str], source: Path, out: Path, metadata: Path, folder: Path) -> list[str]:
    """The recorded command with the source, output, release file and importance matrix swapped."""
    if len(command) < 3 or command[0] != TOOL_NAME:
        raise BadInputError(f"the build record's command is not a {TOOL_NAME} command: {' '.join(command)[:200]}")
    args = [sys.executable, "-m", "release.cli", command[1], str(source)]
    rest, i = command[3:], 0
    while i < len(rest):
        a = rest[i]
        value = rest[i + 1] if i + 1 < len(rest) else None
        if a in ("-o", "--output"):
            args += [a, str(out)]
        elif a == "--metadata":
            args += [a, str(metadata)]
        elif a == "--imatrix":
            shipped = folder / Path(str(value)).name
            if not shipped.is_file():
                raise BadInputError(
                    f"{folder}: the importance matrix {shipped.name} the variant was made with is missing"
                )
            args += [a, str(shipped)]
        elif a == "--intermediate":
            pass  # a lossless GGUF of the same source: quantizing from the source gives the same bytes
        else:
            args.append(a)
            i += 1
            continue
        i += 2
    return args


def reproduce(
    folder: Path,
    variant: str,
    *,
    source: Path | None = None,
    public_key: Path | None = None,
    keep: Path | None = None,
    reporter: Reporter = NULL,
) -> ReproduceResult:
    """Rebuild ``variant`` of the release folder and compare it with the published files."""
    started = time.monotonic()
    folder = Path(folder)
    st = read(folder, public_key)
    manifest = load_manifest(folder / MANIFEST)
    kind = manifest["kind"]
    if variant not in manifest["variants"]:
        raise BadInputError(f"{folder} has no variant {variant!r}", hint=f"variants: {', '.join(manifest['variants'])}")
    published = _variant_files(folder, manifest, kind, variant)
    if missing := [p for p in published if not (folder / p).is_file()]:
        raise BadInputError(f"{folder}: {', '.join(missing)} not here: fetch the variant first")
    # Everything but the variant's own files must be as the build record says (the settings, the
    # importance matrix); the variant's files are the question, answered by rebuilding them.
    recorded_digests = {s["name"]: s["digest"].get("sha256") for s in st["subject"]}
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    check_subjects(folder, st, only=(set(recorded_digests) & present) - set(published))
    bd = st["predicate"]["buildDefinition"]
    name = _step_name(kind, variant)
    step = next((s for s in bd["internalParameters"].get("steps", []) if s["name"] == name), None)
    if step is None:
        raise BadInputError(f"{folder}: the build record has no {name} step (signed without the build's records?)")
    recorded = _recorded_source(folder, kind, published)
    if not recorded:
        raise BadInputError(f"{folder}: the variant records no source checkpoint hash")
    read_from = step["command"][2] if len(step["command"]) > 2 else None
    made_from = None if _reads_main(st, name) else read_from
    src = _choose_source(folder, recorded, source, made_from, reporter)
    settings = (bd["externalParameters"].get("releaseFile") or {}).get("settings")
    if not settings and flag_value(step["command"], "--metadata"):
        raise BadInputError(f"{folder}: the build record holds no release-file settings to rebuild with")
    if keep is not None:
        Path(keep).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".reproduce-", dir=keep) as tmp:
        work = Path(tmp)
        (work / "release.yaml").write_text(yaml.safe_dump(settings or {}, sort_keys=False), encoding="utf-8")
        out = work / "out"
        args = rebuild_command(step["command"], src, out, work / "release.yaml", folder)
        env = dict(os.environ)
        if step.get("threads"):  # float sums follow the thread split (the build pins it per step too)
            env["OMP_NUM_THREADS"] = str(int(step["threads"]))
        reporter.start(f"rebuilding {variant} ({name})", None)
        run = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
        reporter.done()
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            raise CheckFailedError(f"rebuilding {variant} failed (exit {run.returncode}): {last}")
        rebuilt = out  # convert, gguf and gptq all take -o as the folder they write into
        result = ReproduceResult(str(folder), variant, name, str(src), recorded, [TOOL_NAME, *args[3:]],
                                 identical=True)  # fmt: skip
        for p in published:
            theirs = rebuilt / p
            row = {"path": p, "published_sha256": sha256_file(folder / p),
                   "rebuilt_sha256": sha256_file(theirs) if theirs.is_file() else None,
                   "recorded_sha256": recorded_digests.get(p)}  # fmt: skip
            row["identical"] = row["published_sha256"] == row["rebuilt_sha256"]
            row["matches_build_record"] = row["published_sha256"] == row["recorded_sha256"]
            result.files.append(row)
        result.identical = all(r["identical"] for r in result.files)
        if not result.identical:
            for r in result.files:
                if r["rebuilt_sha256"] is None or r["identical"]:
                    continue
                try:
                    if r["path"].endswith(".gguf"):
                        t, m = _gguf_differences(folder / r["path"], rebuilt / r["path"])
                        result.tensors += t
                        result.metadata += m
                    elif r["path"].endswith(".safetensors"):
                        result.tensors += _safetensors_differences(folder / r["path"], rebuilt / r["path"])
                        result.metadata += _header_differences(folder / r["path"], rebuilt / r["path"])
                except _unreadable() as exc:  # a published file cut short or overwritten: say so, not a traceback
                    r["unreadable"] = str(exc) or type(exc).__name__
            if result.tensors and (folder / REFERENCE).is_file():
                published_path = folder / published[0] if kind == "gguf" else folder
                rebuilt_path = rebuilt / published[0] if kind == "gguf" else rebuilt
                result.kl_mean, result.kl_max, result.top1_agreement = _kl(published_path, rebuilt_path,
                                                                           folder / REFERENCE, reporter)  # fmt: skip
        if keep is not None and not result.identical:  # what differs, kept for a closer look
            kept = Path(keep) / f"rebuilt-{variant}"
            if not kept.exists():
                rebuilt.rename(kept)
    result.seconds = round(time.monotonic() - started, 2)
    return result


def _unreadable() -> tuple[type[BaseException], ...]:
    """What reading a damaged file raises: gguf_header's ValueError, an OSError, safetensors' error."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return (OSError, ValueError)
    return (OSError, ValueError, SafetensorError)


def _gguf_differences(published: Path, rebuilt: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Tensors whose bytes differ (with their dequantized difference) and metadata keys whose values
    differ. Headers through ``gguf_header`` (gguf-py's reader decodes the whole vocabulary twice,
    2-4 s a file); tensors compared by digest, read a piece at a time, and read whole (one at a
    time) only when they differ: a 70B file is never mapped."""
    import numpy as np
    from gguf.quants import dequantize

    from release.formats.gguf_header import ArrayField, read_header, tensor_digests

    a, b = read_header(published), read_header(rebuilt)
    keys = []
    for k in sorted(set(a.fields) | set(b.fields)):
        fa, fb = a.fields.get(k), b.fields.get(k)
        if k not in a.fields or k not in b.fields or a.value_types[k] != b.value_types[k]:
            same = False
        elif isinstance(fa, ArrayField) and isinstance(fb, ArrayField):
            same = (fa.item_type, fa.count) == (fb.item_type, fb.count) and fa.raw() == fb.raw()
        else:
            same = fa == fb or (fa != fa and fb != fb)  # NaN: the same bytes, as far as a key can say
        if not same:
            keys.append(k)
    tb = {t.name: t for t in b.tensors}
    da, db = tensor_digests(published, a), tensor_digests(rebuilt, b)
    out = []
    for t in a.tensors:
        u = tb.get(t.name)
        if u is None:
            out.append({"name": t.name, "type": t.tensor_type.name, "missing_from_rebuilt": True})
            continue
        if (u.tensor_type, u.shape, db[u.name]) == (t.tensor_type, t.shape, da[t.name]):
            continue
        x = np.fromfile(published, np.uint8, t.n_bytes, offset=t.offset)
        y = np.fromfile(rebuilt, np.uint8, u.n_bytes, offset=u.offset)
        out.append(_diff(t.name, t.tensor_type.name, dequantize(x, t.tensor_type).astype(np.float32).ravel(),
                         dequantize(y, u.tensor_type).astype(np.float32).ravel()))  # fmt: skip
    return out, keys


def _safetensors_differences(published: Path, rebuilt: Path) -> list[dict[str, Any]]:
    """Through torch: numpy has no bfloat16. Packed integers (GPTQ qweight/qzeros) compare as
    integers: how many words differ and by how much."""
    import torch
    from safetensors import safe_open

    out = []
    with safe_open(str(published), "pt") as a, safe_open(str(rebuilt), "pt") as b:
        names = set(b.keys())
        for k in a.keys():  # noqa: SIM118 (safe_open has no __iter__)
            x = a.get_tensor(k)
            if k not in names:
                out.append({"name": k, "type": str(x.dtype).removeprefix("torch."), "missing_from_rebuilt": True})
                continue
            y = b.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                kind = str(x.dtype).removeprefix("torch.")
                out.append(_diff(k, kind, x.to(torch.float64).numpy().ravel(), y.to(torch.float64).numpy().ravel()))
    return out


def _header_differences(published: Path, rebuilt: Path) -> list[str]:
    """``__metadata__`` keys of a safetensors file whose values differ (provenance, license)."""
    from release.safetensors_header import parse_safetensors_header

    a = parse_safetensors_header(published)[1].get("__metadata__") or {}
    b = parse_safetensors_header(rebuilt)[1].get("__metadata__") or {}
    return sorted(f"{published.name}: {k}" for k in set(a) | set(b) if a.get(k) != b.get(k))


def _diff(name: str, kind: str, x: Any, y: Any) -> dict[str, Any]:
    import numpy as np

    if x.shape != y.shape:
        return {"name": name, "type": kind, "shape_differs": True}
    d = np.abs(x.astype(np.float64) - y.astype(np.float64))
    scale = float(np.abs(x).max()) or 1.0
    return {"name": name, "type": kind, "elements_differ": int((d > 0).sum()), "elements": int(d.size),
            "max_abs_diff": float(d.max()), "max_rel_diff": float(d.max()) / scale}  # fmt: skip


def _kl(published: Path, rebuilt: Path, reference: Path, reporter: Reporter) -> tuple[float, float, float]:
    """KL(published || rebuilt) per next-token position on the reference's prompts: the published
    runtime's top-k log-probabilities first (one model in memory at a time), then the rebuilt one's."""
    import numpy as np
    import torch

    from release.validation.metrics import compare_prompt
    from release.validation.reference import load_reference
    from release.validation.runtimes import open_runtime

    prompts = [ids for ids, _ in load_reference(reference).prompts()]
    longest = max(len(p) for p in prompts)
    tops = []
    _, rt = open_runtime(published, tokens=longest)
    try:
        reporter.start("published file's next-token distributions", len(prompts))
        for logits in rt.logits_many(prompts):
            lp = torch.log_softmax(logits[:-1].double(), dim=-1)
            v, i = lp.topk(_TOP_K, dim=-1)
            tops.append((i, v))
            reporter.advance(1)
        reporter.done()
    finally:
        rt.close()
    kls, agree = [], []
    _, rt = open_runtime(rebuilt, tokens=longest)
    try:
        reporter.start("rebuilt file's next-token distributions", len(prompts))
        for ids, logits, (i, v) in zip(prompts, rt.logits_many(prompts), tops, strict=True):
            kl, top1, _, _ = compare_prompt(logits[:-1], i, v, torch.tensor(ids[1:]))
            kls.append(kl)
            agree.append(top1)
            reporter.advance(1)
        reporter.done()
    finally:
        rt.close()
    k, a = np.concatenate(kls), np.concatenate(agree)
    return float(k.mean()), float(k.max()), float(a.mean())


def reproduce_from_hub(
    repo_id: str,
    variant: str,
    work: Path,
    *,
    revision: str = "main",
    endpoint: str | None = None,
    public_key: Path | None = None,
    source: Path | None = None,
    keep: Path | None = None,
    reporter: Reporter = NULL,
) -> ReproduceResult:
    """Fetch the variant (checked as `fetch` checks it) and, without ``source``, the release's
    safetensors repository beside it, then reproduce from those."""
    from release.hub.client import fetch

    base, name = repo_id.rsplit("/", 1)
    folder = work / name
    fetch(repo_id, variant, folder, revision=revision, public_key=public_key, endpoint=endpoint, reporter=reporter)
    kind = load_manifest(folder / MANIFEST)["kind"]
    if source is None and kind != "model" and _reads_main(read(folder), _step_name(kind, variant)):
        main = name.removesuffix(f"-{kind.upper()}")
        fetch(f"{base}/{main}", None, work / main, revision=revision, public_key=public_key,
              endpoint=endpoint, reporter=reporter)  # fmt: skip
    return reproduce(folder, variant, source=source, public_key=public_key, keep=keep, reporter=reporter)
