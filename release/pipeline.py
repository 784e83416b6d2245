"""`model-release build`: a release file -> a verified, licensed, signed release, resumably.

The pipeline is the flow of the single commands, each step one ``model-release`` command run in
its own process (so memory is returned after each step, steps run in parallel with ``--jobs``, and
a crash or ``kill -9`` takes down one step, not the build):

    check -> convert -> gguf-<TYPE>... -+-> validate-<variant>... -> card -> manifest -> sign
          -> reference ---------------- |
          -> gptq ----------------------+

Every step records, in ``DIST/.steps/<step>.json`` (written atomically after the step succeeds),
the hash of its inputs (its settings plus the fingerprints of what it consumed) and the size and
mtime of each file it wrote. A rerun skips a step whose record matches; anything else is redone,
and so is everything downstream, because downstream inputs include upstream fingerprints. Each
command writes atomically, so an interrupted step leaves no finished-looking output, and its
record is missing, so the rerun redoes exactly that step.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from release.architectures import data_file, resolve
from release.atomic import atomic_file
from release.errors import BadInputError, CheckFailedError
from release.formats.gguf_names import set_name, variant_files
from release.licensing import decide
from release.metadata import ReleaseMetadata
from release.resources import Need, disk_free, fmt, gpu_free, mem_available, vm_hwm
from release.validation.report import RELEASE_REPORTS, report_paths

STEPS_DIR = ".steps"
WORK_DIR = ".work"
FAMILIES = ("safetensors", "gguf", "gptq")


# --- the release file ----------------------------------------------------------------------------


def _line_of(node: Any, path: list[Any], key: str | None = None) -> int | None:
    """Line (1-based) of the YAML node at ``path``, or of the mapping key ``key`` inside it."""
    import yaml

    for part in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return None
        if node is None:
            return None
    if key is not None and isinstance(node, yaml.MappingNode):
        node = next((k for k, _ in node.value if k.value == key), node)
    return node.start_mark.line + 1


@dataclass
class ReleaseFile:
    path: Path
    data: dict[str, Any]
    meta: ReleaseMetadata

    @property
    def name(self) -> str:
        return str(self.data["release"]["name"])

    @property
    def version(self) -> str:
        return str(self.data["release"]["version"])

    def section(self, key: str) -> dict[str, Any]:
        return dict(self.data.get(key) or {})

    def relative(self, value: str) -> Path:
        p = Path(os.path.expandvars(value)).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)

    def source(self) -> Path:
        src = self.data["source"]
        if "fixture" in src:
            from release import fixtures

            fx = fixtures.smollm2()
            return fx.bin if src["fixture"] == "smollm2-bin" else fx.hf
        path = self.relative(src["path"])
        if not path.exists():
            raise BadInputError(f"{self.path}:{self.line(['source', 'path'])}: source {path} does not exist")
        return path

    def line(self, path: list[Any]) -> int | str:
        import yaml

        try:
            node = yaml.compose(self.path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            return "?"
        return _line_of(node, path) or "?"

    def signing_key(self, override: Path | None = None) -> Path | None:
        if override is not None:
            return override
        s = self.section("signing")
        if s.get("key_env") and os.environ.get(s["key_env"]):
            return Path(os.environ[s["key_env"]])
        return self.relative(s["key"]) if s.get("key") else None


def load_release_file(path: Path) -> ReleaseFile:
    """Parse, check against the JSON Schema (errors name the key and its line), decide licenses."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        node = yaml.compose(text) if path.suffix in (".yaml", ".yml") else None
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read the release file ({exc})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: a release file is a mapping (release, source, variants, ...)")
    errors = sorted(
        jsonschema.Draft202012Validator(data_file("schemas", "release_file.schema.json")).iter_errors(data),
        key=lambda e: list(map(str, e.absolute_path)),
    )
    if errors:
        e = errors[0]
        where = list(e.absolute_path)
        extra = re.search(r"'([^']+)' (?:was|were) unexpected", e.message)
        line = _line_of(node, where, extra.group(1)) if (node is not None and extra) else None
        line = line or (_line_of(node, where) if node is not None else None)
        key = ".".join(map(str, [*where, *([extra.group(1)] if extra else [])])) or "(top level)"
        msg = f"unknown key {key!r}" if extra else f"{key}: {e.message}"
        raise BadInputError(f"{path}:{line or '?'}: {msg}", hint=f"schema: {len(errors)} problem(s) in all")
    meta = ReleaseMetadata.from_file(path)
    rf = ReleaseFile(path, data, meta)
    known = data_file("gguf", "types.json")["types"]
    for i, t in enumerate(((data.get("variants") or {}).get("gguf") or {}).get("types") or []):
        if t not in known:
            line = _line_of(node, ["variants", "gguf", "types", i]) if node is not None else None
            raise BadInputError(f"{path}:{line or '?'}: unknown GGUF type {t!r} (known: {', '.join(known)})")
    decision = decide(meta)
    if decision.violations:
        raise CheckFailedError(
            f"{path}:{rf.line(['release', 'license'])}: license check failed: {decision.violations[0]}"
        )
    return rf


def _dist_copy(rf: ReleaseFile) -> bytes:
    """The release file the steps read (``--metadata``) from the dist folder: as written, except
    that custom license texts are named by absolute path (they are relative to the original)."""
    import yaml

    customs = (rf.data.get("release") or {}).get("licenses") or []
    if not customs:
        return rf.path.read_bytes()
    data = copy.deepcopy(rf.data)
    for lic in data["release"]["licenses"]:
        lic["text"] = str((rf.path.parent / lic["text"]).resolve())
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


# --- steps and records ---------------------------------------------------------------------------


def _fingerprint(paths: list[Path]) -> list[list[Any]]:
    out = []
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Step:
    name: str
    family: str  # safetensors | gguf | gptq | release (card/manifest/sign) | reference
    argv: list[str]
    settings: dict[str, Any]
    deps: list[str]
    outputs: Callable[[], list[Path]]  # what the step wrote, listed after it ran
    need: Need  # estimated peak RAM / GPU memory / disk, for the up-front fit check and --jobs
    ok_codes: tuple[int, ...] = (0,)  # validate: 1 (a failed check) is a result, not a crash

    @property
    def memory(self) -> int:
        return self.need.ram

    def digest_argv(self) -> list[str]:
        """The arguments that define the result: ``--forward`` (resident or streamed, chosen from
        free memory) gives the same logits either way, so it does not make a step stale."""
        out, skip = [], False
        for a in self.argv[3:]:
            if skip:
                skip = False
                continue
            if a == "--forward":
                skip = True
                continue
            out.append(a)
        return out


@dataclass
class StepResult:
    name: str
    status: str  # done | skipped | failed | blocked
    seconds: float = 0.0
    exit_code: int = 0
    output: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    peak_rss_bytes: int = 0  # of the step's process (wait4), 0 when it did not run
    log: str = ""  # its stderr, kept under DIST/.work/logs


class Records:
    def __init__(self, dist: Path) -> None:
        self.dir = dist / STEPS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, step: str) -> Path:
        return self.dir / f"{step}.json"

    def load(self, step: str) -> dict[str, Any] | None:
        p = self.path(step)
        try:
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
        except json.JSONDecodeError:
            return None

    def valid(self, step: str, inputs: str) -> dict[str, Any] | None:
        """The record, if its inputs match and every output is still as the step left it."""
        rec = self.load(step)
        if not rec or rec.get("inputs") != inputs:
            return None
        for f, size, mtime in rec["files"]:
            p = Path(f)
            if not p.is_file() or p.stat().st_size != size or p.stat().st_mtime_ns != mtime:
                return None
        return rec

    def save(self, step: str, inputs: str, files: list[list[Any]], output: dict[str, Any], seconds: float) -> None:
        rec = {"step": step, "inputs": inputs, "files": files, "output": output, "seconds": round(seconds, 2),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        with atomic_file(self.path(step), force=True) as tmp:
            tmp.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")

    def fingerprint(self, step: str) -> str:
        rec = self.load(step)
        return _digest(rec["files"]) if rec else "missing"


def _itemsize(dtype: str, shape: Any) -> int:
    if dtype in ("fp32", "float32"):
        return 4
    if dtype == "keep":
        return max(1, round(shape.stored_bytes / max(shape.parameters, 1)))
    return 2


def _forward_mode(shape: Any, tokens: int, device: str) -> str:
    """The forward pass's own ``auto`` rule, decided here so the estimate and the run agree."""
    from release import resources as res

    gpu = res.gpu_free() if device == "cuda" else None
    return "resident" if res.resident_fits(shape, tokens, device, res.mem_available(), gpu) else "streamed"


def _validate_need(family: str, shape: Any, tokens: int, device: str, forward_need: Need) -> Need:
    from release import resources as res

    if family == "gguf":
        return res.llama_cpp_validate_need(shape)
    if family == "gptq":
        stored = int(shape.parameters * 4.25 / 8) + shape.vocab * shape.hidden * 2  # 4-bit, fp16 embeddings
        return res.gptq_validate_need(stored, shape.forward_activations(tokens), device)
    return forward_need


@dataclass
class Plan:
    dist: Path
    steps: list[Step]
    variants: list[dict[str, Any]]  # name, family, path, producing step, validate step


def plan_build(
    rf: ReleaseFile, dist_root: Path, *, only: set[str] | None = None, device: str = "auto", key: Path | None = None
) -> Plan:
    """The steps for this release file (not yet run)."""
    dist = Path(dist_root).absolute() / f"{rf.name}-{rf.version}"
    src = rf.source()
    from release import resources as res

    shape = res.model_shape(src)
    cli = [sys.executable, "-m", "release.cli"]
    meta_args = ["--metadata", str(dist / "release.yaml")]
    release = rf.data["release"]
    cfg = rf.section("variants")
    evaluation = rf.section("evaluation")
    thresholds = evaluation.get("thresholds") or {}
    ref = dist / WORK_DIR / "reference.safetensors"
    wanted = set(FAMILIES) if only is None else only
    main, gguf_dir, gptq_dir = dist / rf.name, dist / f"{rf.name}-GGUF", dist / f"{rf.name}-GPTQ"
    tokens = min(int(evaluation.get("max_tokens", 512)), 512)  # the built-in prompts are shorter than 512
    source_fp = _fingerprint([src])
    steps: list[Step] = []
    variants: list[dict[str, Any]] = []

    st = cfg.get("safetensors") or {}
    dtype = st.get("dtype", "keep")
    convert = [*cli, "convert", str(src), "-o", str(main), "--dtype", dtype, "--force", *meta_args]
    convert += ["--max-shard-size", st.get("max_shard_size", "5GB")]
    # The main folder is always built: the GGUF files are made from it.
    steps.append(Step("convert", "safetensors", convert, {"source": source_fp, "cfg": st, "meta": release}, [],
                      lambda: [main], res.convert_need(shape, _itemsize(dtype, shape))))  # fmt: skip
    ref_device = "cuda" if device in ("cuda", "auto") and _has_cuda() else "cpu"
    # Resident or streamed is decided here, from the same estimates the fit check and --jobs use.
    forward = _forward_mode(shape, tokens, ref_device)
    forward_need = res.forward_need(shape, tokens, ref_device, forward)
    reference = [*cli, "reference", str(src), "-o", str(ref), "--force", "--device", ref_device, "--forward", forward]
    if evaluation.get("prompts"):
        reference += ["--prompts", str(rf.relative(evaluation["prompts"]))]
    if evaluation.get("max_tokens"):
        reference += ["--max-tokens", str(evaluation["max_tokens"])]
    steps.append(Step("reference", "reference", reference, {"source": source_fp, "eval": evaluation}, [],
                      lambda: [ref], forward_need))  # fmt: skip
    if "safetensors" in wanted:
        variants.append({"name": dtype, "family": "safetensors", "path": main, "after": "convert"})

    gg = cfg.get("gguf") or {}
    gguf_types = list(gg.get("types") or [])
    known = {k.upper(): v for k, v in data_file("gguf", "types.json")["types"].items()}
    split = gg.get("split_max_size")
    if "gguf" in wanted:
        imatrix, collect = _imatrix_plan(rf, gg, cfg, gguf_types, known, src, gguf_dir, cli, ref_device, forward,
                                         forward_need)  # fmt: skip
        if collect is not None:
            steps.append(collect)
        for t in gguf_types:
            out = gguf_dir / f"{rf.name}-{t}.gguf"
            args = [*cli, "gguf", str(main), "-o", str(gguf_dir), "-t", t, "--name", rf.name, "--force", *meta_args]
            if split:
                args += ["--split-max-size", str(split)]
            spec = known.get(t.upper(), {"bpw": 16, "via": "gguf"})
            deps, settings = ["convert"], {"meta": release}
            if spec["via"] == "llama.cpp":
                args += ["--imatrix", imatrix["file"] if imatrix is not None else "none"]
                deps += [collect.name] if collect is not None else []
                settings["imatrix"] = imatrix
            steps.append(Step(f"gguf-{t}", "gguf", args, settings, deps, lambda o=out: variant_files(o),
                              res.gguf_need(shape, spec["bpw"], spec["via"])))  # fmt: skip
            variants.append({"name": t, "family": "gguf", "path": out, "after": f"gguf-{t}"})

    gq = cfg.get("gptq")
    if gq is not None and "gptq" in wanted:
        arch = resolve(json.loads((src / "config.json").read_text(encoding="utf-8")))
        if why := arch.spec.get("gptq_refused"):  # refused before any step runs, not after the others
            where = rf.line(["variants", "gptq"])
            raise BadInputError(f"{rf.path}:{where}: GPTQ is not available for {arch.name}: {why}")
        args = [*cli, "gptq", str(src), "-o", str(gptq_dir), "--force", "--device", device, *meta_args]
        flags = {"bits": "--bits", "group_size": "--group-size", "samples": "--samples", "seq_len": "--seq-len",
                 "seed": "--seed"}  # fmt: skip
        args += [x for k, flag in flags.items() if k in gq for x in (flag, str(gq[k]))]
        if "calibration" in gq:
            args += ["--calibration", str(rf.relative(gq["calibration"]))]
        args += [
            "--desc-act" if gq.get("desc_act") else "--no-desc-act",
            "--sym" if gq.get("sym", True) else "--no-sym",
        ]
        steps.append(Step("gptq", "gptq", args, {"source": source_fp, "cfg": gq, "meta": release}, [],
                          lambda: [gptq_dir], res.gptq_need(shape, ref_device)))  # fmt: skip
        variants.append({"name": f"gptq-{gq.get('bits', 4)}bit", "family": "gptq", "path": gptq_dir, "after": "gptq"})

    for v in variants:
        v["validate"] = f"validate-{v['family']}" + (f"-{v['name']}" if v["family"] == "gguf" else "")
        over = thresholds.get(_kind(v, st), {})
        args = [*cli, "validate", str(v["path"]), "-r", str(ref), "--device", ref_device, "--forward", forward]
        reports_dir = None if v["family"] == "gguf" else dist / RELEASE_REPORTS
        args += ["--reports-dir", str(reports_dir)] if reports_dir is not None else []
        args += ["--max-kl", str(over["max_kl_mean"])] if "max_kl_mean" in over else []
        args += ["--min-top1", str(over["min_top1"])] if "min_top1" in over else []
        reports = list(report_paths(Path(v["path"]), reports_dir).values())
        steps.append(Step(v["validate"], v["family"], args, {"thresholds": over}, [v["after"], "reference"],
                          lambda r=reports: r, _validate_need(v["family"], shape, tokens, ref_device, forward_need),
                          ok_codes=(0, 1)))  # fmt: skip

    if only is None:  # a partial build is not a release: no cards, manifest or signature
        url = str(release.get("repo_url") or "")
        if "huggingface.co/" not in url or "/" not in url.split("huggingface.co/", 1)[1].strip("/"):
            # The manifest names the Hub repositories; say so now, not after hours of quantization.
            raise BadInputError(
                f"{rf.path}:{rf.line(['release'])}: release.repo_url must name the Hub repository "
                "(https://huggingface.co/ORG/NAME): the manifest and cards are written for it",
                hint="or build one family with --only",
            )
        folders = [main, *([gguf_dir] if gguf_types else []), *([gptq_dir] if gq is not None else [])]
        docs = ["README.md", "LICENSE", "USE_POLICY.md", "NOTICE", "kl-comparison.png"]
        steps.append(Step("card", "release", [*cli, "card", str(dist)], {"meta": release},
                          [v["validate"] for v in variants],
                          lambda: [f / d for f in folders for d in docs if (f / d).is_file()], res.SMALL))  # fmt: skip
        steps.append(Step("manifest", "release", [*cli, "manifest", str(dist), "-r", str(ref)], {}, ["card"],
                          lambda: [f / "release-manifest.json" for f in folders], res.SMALL))  # fmt: skip
        key = rf.signing_key(key)
        if key is not None:
            if not key.is_file():
                raise BadInputError(f"signing key {key} does not exist", hint="make one with `model-release keygen`")
            steps.append(Step("sign", "release", [*cli, "sign", str(dist), "--key", str(key)],
                              {"key": _digest(key.read_bytes())}, ["manifest"],
                              lambda: [f / "release.sig" for f in folders], res.SMALL))  # fmt: skip
    return Plan(dist, steps, variants)


def _imatrix_plan(
    rf: ReleaseFile,
    gg: dict[str, Any],
    cfg: dict[str, Any],
    types: list[str],
    known: dict[str, Any],
    src: Path,
    gguf_dir: Path,
    cli: list[str],
    device: str,
    forward: str,
    need: Need,
) -> tuple[dict[str, Any] | None, Step | None]:
    """The importance matrix the llama.cpp types are quantized with, as (its settings, with the
    file the gguf steps get, or None: no imatrix; the step that collects it, or None). ``auto``,
    the default, collects it from the source in a step whose output ships in the GGUF folder; a
    given file is used as it is; ``none`` or no llama.cpp type: none."""
    if not any(known.get(t.upper(), {}).get("via") == "llama.cpp" for t in types):
        return None, None
    choice = str(gg.get("imatrix", "auto"))
    if choice == "none":
        return None, None
    if choice != "auto":
        given = rf.relative(choice)
        if not given.is_file():
            raise BadInputError(
                f"{rf.path}:{rf.line(['variants', 'gguf', 'imatrix'])}: imatrix file {given} does not exist"
            )
        return {"file": str(given), "given": _fingerprint([given])}, None
    out = gguf_dir / f"{rf.name}.imatrix"
    calibration = gg.get("calibration") or (cfg.get("gptq") or {}).get("calibration")
    args = [*cli, "imatrix", str(src), "-o", str(out), "--force", "--device", device, "--forward", forward]
    settings: dict[str, Any] = {"file": str(out), "source": _fingerprint([src])}
    if calibration:
        args += ["--calibration", str(rf.relative(calibration))]
        settings["calibration"] = _fingerprint([rf.relative(calibration)])
    return settings, Step("imatrix", "gguf", args, settings, [], lambda: [out], need)


def _kind(v: dict[str, Any], st: dict[str, Any]) -> str:
    if v["family"] == "gguf":
        return f"gguf-{v['name']}"
    if v["family"] == "gptq":
        return v["name"]
    return "lossless" if st.get("dtype", "keep") == "keep" else "safetensors-cast"


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


# --- running -------------------------------------------------------------------------------------


@dataclass
class BuildResult:
    release_dir: str
    ok: bool
    exit_code: int
    steps: list[StepResult]
    variants: list[dict[str, Any]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tidy(plan: Plan, rf: ReleaseFile) -> None:
    """Remove what an interrupted run or a changed release file left: temporary folders of killed
    steps, and variants the release file no longer asks for (with their records)."""
    for p in list(plan.dist.rglob(".*")):
        if (
            ".partial-" in p.name
            or p.name.startswith((".model-release-", ".gptq-offload-"))
            or p.name.endswith(".restamp")
        ):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    names = {s.name for s in plan.steps}
    gguf_dir = plan.dist / f"{rf.name}-GGUF"
    keep = {Path(v["path"]).name for v in plan.variants if v["family"] == "gguf"}
    if gguf_dir.is_dir():
        for f in list(gguf_dir.iterdir()):
            logical = set_name(f.name)
            if f.name.endswith(".gguf") and logical not in keep and f.exists():
                stem = Path(logical).stem
                for g in [*gguf_dir.glob(f"{stem}.*"), *gguf_dir.glob(f"{stem}-*-of-*.gguf")]:
                    g.unlink(missing_ok=True)
        if "imatrix" not in names:  # no longer collected (imatrix: none, or a given file)
            (gguf_dir / f"{rf.name}.imatrix").unlink(missing_ok=True)
    for rec in (plan.dist / STEPS_DIR).glob("*.json"):
        if rec.stem not in names and (
            rec.stem.startswith(("gguf-", "validate-gguf-")) or rec.stem in ("gptq", "validate-gptq", "imatrix")
        ):
            rec.unlink()
            if rec.stem == "gptq":
                shutil.rmtree(plan.dist / f"{rf.name}-GPTQ", ignore_errors=True)


def build(
    release_file: Path,
    dist_root: Path = Path("dist"),
    *,
    only: set[str] | None = None,
    jobs: int = 1,
    device: str = "auto",
    key: Path | None = None,
    verbose: bool = False,
    on_event: Callable[[str, Step, StepResult | None], None] = lambda *_: None,
) -> BuildResult:
    """Run the plan. ``verbose``: steps' stderr (library warnings included) goes to the terminal
    instead of DIST/.work/logs/<step>.log."""
    started = time.monotonic()
    rf = load_release_file(release_file)  # bad keys and license violations fail here, before heavy work
    if only is not None and (bad := only - set(FAMILIES)):
        raise BadInputError(f"--only takes {', '.join(FAMILIES)}; not {', '.join(sorted(bad))}")
    plan = plan_build(rf, dist_root, only=only, device=device, key=key)
    check_fits(plan, Records(plan.dist) if (plan.dist / STEPS_DIR).is_dir() else None)
    plan.dist.mkdir(parents=True, exist_ok=True)
    logs = plan.dist / WORK_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    copy = plan.dist / "release.yaml"
    body = _dist_copy(rf)
    if not copy.is_file() or copy.read_bytes() != body:
        with atomic_file(copy, force=True) as tmp:
            tmp.write_bytes(body)
    _tidy(plan, rf)
    records = Records(plan.dist)
    results: dict[str, StepResult] = {}
    pending = list(plan.steps)
    running: dict[str, tuple[subprocess.Popen, Step, str, float]] = {}
    budget = mem_available()
    peaks: dict[str, int] = {}
    while pending or running:
        progressed = False
        for step in list(pending):
            if any(
                d in [p.name for p in pending] or d in running for d in step.deps if d in {s.name for s in plan.steps}
            ):
                continue
            if any(results.get(d) and results[d].status in ("failed", "blocked") for d in step.deps):
                pending.remove(step)
                results[step.name] = StepResult(step.name, "blocked", message="an earlier step failed")
                on_event("blocked", step, results[step.name])
                progressed = True
                continue
            failed_validation = [d for d in step.deps if d.startswith("validate-") and results.get(d)
                                 and results[d].exit_code == 1]  # fmt: skip
            if failed_validation:
                pending.remove(step)
                results[step.name] = StepResult(step.name, "blocked", message=f"{failed_validation[0]} failed")
                on_event("blocked", step, results[step.name])
                progressed = True
                continue
            inputs = _digest({"argv": step.digest_argv(), "settings": step.settings,
                              "deps": {d: records.fingerprint(d) for d in step.deps}})  # fmt: skip
            rec = records.valid(step.name, inputs)
            if rec is not None:
                pending.remove(step)
                code = int(rec["output"].get("exit_code", 0)) if isinstance(rec["output"], dict) else 0
                results[step.name] = StepResult(step.name, "skipped", 0.0, code, rec["output"])
                on_event("skipped", step, results[step.name])
                progressed = True
                continue
            in_use = sum(s.memory for _, s, _, _ in running.values())
            if len(running) >= max(1, jobs) or (running and in_use + step.memory > budget):
                continue
            on_event("start", step, None)
            log = logs / f"{step.name}.log"
            with open(log, "w", encoding="utf-8") as err:
                proc = subprocess.Popen(
                    [*step.argv, "--json"], stdout=subprocess.PIPE, stderr=None if verbose else err, text=True
                )
            running[step.name] = (proc, step, inputs, time.monotonic())
            pending.remove(step)
            progressed = True
        for name, (proc, step, inputs, t0) in list(running.items()):
            peaks[name] = max(peaks.get(name, 0), vm_hwm(proc.pid))  # sampled every 50 ms while it runs
            exit_peak = _reap(proc)
            if exit_peak is None:
                continue
            peak = peaks.pop(name) or exit_peak
            out, _ = proc.communicate()
            log = logs / f"{name}.log"
            del running[name]
            progressed = True
            seconds = time.monotonic() - t0
            try:
                data = json.loads(out) if out.strip() else {}
            except json.JSONDecodeError:
                data = {"raw": out[-2000:]}
            if proc.returncode in step.ok_codes:
                data = {**(data if isinstance(data, dict) else {}), "exit_code": proc.returncode}
                records.save(name, inputs, _fingerprint(step.outputs()), data, seconds)
                results[name] = StepResult(name, "done", seconds, proc.returncode, data, "", peak, str(log))
            else:
                message = _failure_message(proc.returncode, data, log, seconds, peak)
                results[name] = StepResult(name, "failed", seconds, proc.returncode, data, message, peak, str(log))
            on_event("finish", step, results[name])
        if not progressed:
            time.sleep(0.05)
    ordered = [results[s.name] for s in plan.steps]
    variants = _variant_rows(plan, results)
    failed = [r for r in ordered if r.status == "failed"]
    bad_validation = [v for v in variants if v.get("passed") is False]
    code = max(2 if r.exit_code == 2 else 1 for r in failed) if failed else int(bool(bad_validation))
    return BuildResult(str(plan.dist), code == 0, code, ordered, variants, round(time.monotonic() - started, 2))


def check_fits(plan: Plan, records: Records | None) -> None:
    """Refuse, before any heavy work, a plan one of whose steps cannot fit this machine (its RAM,
    GPU memory, or the free disk the outputs still to write need), naming the step and the sizes."""
    ram, gpu = mem_available(), None
    disk_needed = 0
    for step in plan.steps:
        rec = records.load(step.name) if records is not None else None
        if rec is not None and all(Path(f).is_file() for f, _, _ in rec["files"]):
            continue  # built before: its outputs are there, it will be skipped or redone in place
        need = step.need
        if need.ram > ram:
            hint = "free memory, build on a larger machine"
            hint += ", or use --device cuda" if step.family in ("reference", "gptq") else ""
            msg = f"{step.name} needs about {fmt(need.ram)} of memory; {fmt(ram)} is available"
            raise BadInputError(msg, hint=hint)
        if need.gpu:
            gpu = gpu_free() if gpu is None else gpu
            if gpu is None or need.gpu > gpu:
                have = "no CUDA device" if gpu is None else f"{fmt(gpu)} free"
                raise BadInputError(f"{step.name} needs about {fmt(need.gpu)} of GPU memory; {have}")
        disk_needed += need.disk
    free = disk_free(plan.dist)
    if disk_needed > free:
        raise BadInputError(
            f"the outputs still to write need about {fmt(disk_needed)} of disk; {fmt(free)} is free at {plan.dist}",
            hint="free space or build elsewhere (-o)",
        )


def _reap(proc: subprocess.Popen) -> int | None:
    """``wait4``'s peak RSS (bytes) of a finished step, with its exit status set; None while it
    runs. A fallback only: it includes the parent's peak at fork (see ``resources.vm_hwm``)."""
    try:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    except ChildProcessError:  # already reaped elsewhere
        return 0 if proc.poll() is not None else None
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024  # Linux reports kilobytes


def _failure_message(code: int, data: Any, log: Path, seconds: float, peak: int) -> str:
    """One line that says why a step failed: its own error, or the signal that killed it (the
    OOM killer's SIGKILL), never the last line of some library's warning."""
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "?"
        why = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by signal {-code} ({name}){why} after {seconds:.0f} s; peak {fmt(peak)}"
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    try:
        lines = [x.strip() for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
    except OSError:
        lines = []
    errors = [x for x in lines if x.lower().startswith("error")]
    quiet = [x for x in lines if "warn" not in x.lower()]
    last = errors[-1] if errors else (quiet[-1] if quiet else f"exit {code}")
    return f"{last} (exit {code}; log: {log})"


def _variant_rows(plan: Plan, results: dict[str, StepResult]) -> list[dict[str, Any]]:
    rows = []
    for v in plan.variants:
        path = Path(v["path"])
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".gguf")) \
            if path.is_dir() else sum(f.stat().st_size for f in variant_files(path))  # fmt: skip
        r = results.get(v["validate"])
        row: dict[str, Any] = {"variant": v["name"], "family": v["family"], "path": str(path), "bytes": size}
        variants = (r.output.get("variants") or []) if r else []
        if variants:
            m = variants[0]
            row |= {"kind": m.get("kind"), "kl_mean": m["metrics"].get("kl_mean"),
                    "top1_agreement": m["metrics"].get("top1_agreement"), "passed": m.get("passed")}  # fmt: skip
        rows.append(row)
    return rows
