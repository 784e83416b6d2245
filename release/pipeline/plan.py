"""Release file -> the steps of a build, not yet run: one planner per family, and the fit check
that refuses, before any heavy work, a step this machine cannot hold.

Every planner reads the same ``_Context`` (paths, the model's shape, the forward mode and its
memory, the command prefix), so each family's rules sit in one short function.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from release import resources as res
from release.architectures import resolve
from release.choices import CAST_CHOICES
from release.datafiles import data_file
from release.errors import BadInputError
from release.formats.gguf_names import lossless_type, variant_files
from release.hashing import HASH_CACHE_ENV
from release.pipeline.records import WORK_DIR, Records, digest, fingerprint
from release.pipeline.release_file import ReleaseFile
from release.pipeline.steps import FAMILIES, Plan, Step
from release.resources import Need, fmt
from release.validation.report import RELEASE_REPORTS, report_paths


@dataclass
class _Context:
    """What every family's planner needs to know about this build."""

    rf: ReleaseFile
    dist: Path
    src: Path
    shape: res.ModelShape
    cli: list[str]  # how a step runs one model-release command
    meta_args: list[str]  # --metadata DIST/release.yaml
    device: str  # of the reference and the validations: cuda when asked and present
    gptq_device: str  # as given (auto, cpu, cuda): the gptq command decides
    forward: str  # resident | streamed, decided here so the estimate and the run agree
    forward_need: Need
    tokens: int  # evaluation tokens per prompt, at most
    source_fp: list[list[Any]]

    @property
    def ref(self) -> Path:
        return self.dist / WORK_DIR / "reference.safetensors"

    @property
    def main(self) -> Path:
        return self.dist / self.rf.name

    @property
    def gguf_dir(self) -> Path:
        return self.dist / f"{self.rf.name}-GGUF"

    @property
    def gptq_dir(self) -> Path:
        return self.dist / f"{self.rf.name}-GPTQ"


def plan_build(
    rf: ReleaseFile,
    dist_root: Path,
    *,
    only: set[str] | None = None,
    device: str = "auto",
    key: Path | None = None,
    threads: int | None = None,
    cuda: bool | None = None,
) -> Plan:
    """The steps for this release file (not yet run). ``threads``: every step's OMP_NUM_THREADS
    (default: this machine's, ``resources.cpu_threads``), the same whichever executor runs it, so a
    step's bytes do not depend on the machine that ran it (float sums follow the thread split).
    ``cuda``: whether the steps' machines have CUDA (a cluster's nodes; default: this machine)."""
    src = rf.source()
    shape = res.model_shape(src)
    evaluation = rf.section("evaluation")
    tokens = min(int(evaluation.get("max_tokens", 512)), 512)  # the built-in prompts are shorter than 512
    ref_device = "cuda" if device in ("cuda", "auto") and (_has_cuda() if cuda is None else cuda) else "cpu"
    forward = _forward_mode(shape, tokens, ref_device)
    dist = Path(dist_root).absolute() / f"{rf.name}-{rf.version}"
    ctx = _Context(rf, dist, src, shape, [sys.executable, "-m", "release.cli"],
                   ["--metadata", str(dist / "release.yaml")], ref_device, device, forward,
                   res.forward_need(shape, tokens, ref_device, forward), tokens, fingerprint([src]))  # fmt: skip
    wanted = set(FAMILIES) if only is None else only
    steps: list[Step] = [*_convert_and_reference(ctx)]
    variants: list[dict[str, Any]] = []
    if "safetensors" in wanted:
        variants.append({"name": _dtype(rf), "family": "safetensors", "path": ctx.main, "after": "convert"})
    if "gguf" in wanted:
        _gguf(ctx, steps, variants)
    if "gptq" in wanted:
        _gptq(ctx, steps, variants)
    steps += _validations(ctx, variants)
    if only is None:  # a partial build is not a release: no cards, manifest or signature
        steps += _release_steps(ctx, variants, key)
    for step in steps:  # card, manifest and sign hash each file once between them
        step.env[HASH_CACHE_ENV] = str(dist / WORK_DIR / "sha256.json")
        step.threads = threads or res.cpu_threads()
    return Plan(dist, steps, variants, tuple(f for f in FAMILIES if f in wanted))


def _dtype(rf: ReleaseFile) -> str:
    return (rf.section("variants").get("safetensors") or {}).get("dtype", "keep")


def _convert_and_reference(ctx: _Context) -> list[Step]:
    """The main folder (always built: the GGUF files are made from it) and the reference logits."""
    rf, shape = ctx.rf, ctx.shape
    st = rf.section("variants").get("safetensors") or {}
    dtype = st.get("dtype", "keep")
    convert = [*ctx.cli, "convert", str(ctx.src), "-o", str(ctx.main), "--dtype", dtype, "--force", *ctx.meta_args]
    convert += ["--max-shard-size", st.get("max_shard_size", "5GB")]
    evaluation = rf.section("evaluation")
    reference = [*ctx.cli, "reference", str(ctx.src), "-o", str(ctx.ref), "--force", "--device", ctx.device,
                 "--forward", ctx.forward]  # fmt: skip
    if evaluation.get("prompts"):
        reference += ["--prompts", str(rf.relative(evaluation["prompts"]))]
    if evaluation.get("max_tokens"):
        reference += ["--max-tokens", str(evaluation["max_tokens"])]
    main, ref = ctx.main, ctx.ref
    meta = rf.data["release"]
    return [
        Step("convert", "safetensors", convert, {"source": ctx.source_fp, "cfg": st, "meta": meta}, [],
             lambda: [main], res.convert_need(shape, _itemsize(dtype, shape))),
        Step("reference", "reference", reference, _reference_settings(ctx), [], lambda: [ref], ctx.forward_need),
    ]  # fmt: skip


def _reference_settings(ctx: _Context) -> dict[str, Any]:
    """What the reference logits depend on: the source, the prompts file (its size and mtime, not only its
    path), the token cap and the tokenizer check's probe set (a new one remakes the reference, which
    stores the source tokenizer's ids for it). Not the thresholds: changing one variant's threshold reruns that
    variant's validation, not the reference and with it every validation."""
    evaluation = ctx.rf.section("evaluation")
    settings: dict[str, Any] = {"source": ctx.source_fp, "max_tokens": evaluation.get("max_tokens")}
    settings["tokenizer_probes"] = digest(data_file("eval", "tokenizer_probes.json"))
    if evaluation.get("prompts"):
        settings["prompts"] = fingerprint([ctx.rf.relative(evaluation["prompts"])])
    return settings


def _gguf(ctx: _Context, steps: list[Step], variants: list[dict[str, Any]]) -> None:
    """One step per GGUF type; the llama.cpp types after the importance matrix and the build's one
    lossless intermediate they are all quantized from."""
    rf = ctx.rf
    gg = rf.section("variants").get("gguf") or {}
    known = {k.upper(): v for k, v in data_file("gguf", "types.json")["types"].items()}
    types = list(gg.get("types") or [])
    imatrix, collect = _imatrix_plan(ctx, gg, types, known)
    if collect is not None:
        steps.append(collect)
    lossless = _lossless(ctx, gg, types, known, steps)
    split = gg.get("split_max_size")
    for t in types:
        out = ctx.gguf_dir / f"{rf.name}-{t}.gguf"
        args = [*ctx.cli, "gguf", str(ctx.main), "-o", str(ctx.gguf_dir), "-t", t, "--name", rf.name, "--force",
                *ctx.meta_args]  # fmt: skip
        if split:
            args += ["--split-max-size", str(split)]
        spec = known.get(t.upper(), {"bpw": 16, "via": "gguf"})
        deps, settings = ["convert"], {"meta": rf.data["release"]}
        if spec["via"] == "llama.cpp":
            assert lossless is not None
            args += ["--intermediate", str(lossless[1])]
            args += ["--imatrix", imatrix["file"] if imatrix is not None else "none"]
            deps += [collect.name] if collect is not None else []
            deps.append(lossless[0])
            settings["imatrix"] = imatrix
        steps.append(Step(f"gguf-{t}", "gguf", args, settings, deps, lambda o=out: variant_files(o),
                          res.gguf_need(ctx.shape, spec["bpw"])))  # fmt: skip
        variants.append({"name": t, "family": "gguf", "path": out, "after": f"gguf-{t}"})


LOSSLESS_STEP = "lossless-gguf"


def _lossless(
    ctx: _Context, gg: dict[str, Any], types: list[str], known: dict[str, Any], steps: list[Step]
) -> tuple[str, Path] | None:
    """(the step that writes it, its path): the lossless GGUF every llama.cpp type is quantized from,
    written once per build instead of once per type (13.8 GB at 7B, 140 GB at 70B, each). It is the
    release's own F16/BF16/F32 variant when it ships one as a single file; otherwise a temporary file
    under .work, removed once every step that reads it has succeeded."""
    if not any(known.get(t.upper(), {}).get("via") == "llama.cpp" for t in types):
        return None
    cast = CAST_CHOICES.get(_dtype(ctx.rf)) or ctx.shape.dtype
    lossless = lossless_type(cast)
    shipped = {t.upper(): t for t in types}
    if lossless in shipped and not gg.get("split_max_size"):
        return f"gguf-{shipped[lossless]}", ctx.gguf_dir / f"{ctx.rf.name}-{shipped[lossless]}.gguf"
    folder = ctx.dist / WORK_DIR / LOSSLESS_STEP
    out = folder / f"{ctx.rf.name}-{lossless}.gguf"
    args = [*ctx.cli, "gguf", str(ctx.main), "-o", str(folder), "-t", lossless, "--name", ctx.rf.name, "--force",
            *ctx.meta_args]  # fmt: skip
    steps.append(Step(LOSSLESS_STEP, "gguf", args, {"meta": ctx.rf.data["release"]}, ["convert"], lambda: [out],
                      res.gguf_need(ctx.shape, known[lossless]["bpw"]), temporary=True))  # fmt: skip
    return LOSSLESS_STEP, out


def _imatrix_plan(
    ctx: _Context, gg: dict[str, Any], types: list[str], known: dict[str, Any]
) -> tuple[dict[str, Any] | None, Step | None]:
    """The importance matrix the llama.cpp types are quantized with, as (its settings, with the
    file the gguf steps get, or None: no imatrix; the step that collects it, or None). ``auto``,
    the default, collects it from the source in a step whose output ships in the GGUF folder; a
    given file is used as it is; ``none`` or no llama.cpp type: none."""
    rf = ctx.rf
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
        return {"file": str(given), "given": fingerprint([given])}, None
    out = ctx.gguf_dir / f"{rf.name}.imatrix"
    calibration = gg.get("calibration") or (rf.section("variants").get("gptq") or {}).get("calibration")
    args = [*ctx.cli, "imatrix", str(ctx.src), "-o", str(out), "--force", "--device", ctx.device,
            "--forward", ctx.forward]  # fmt: skip
    settings: dict[str, Any] = {"file": str(out), "source": ctx.source_fp}
    if calibration:
        args += ["--calibration", str(rf.relative(calibration))]
        settings["calibration"] = fingerprint([rf.relative(calibration)])
    if (chunks := gg.get("imatrix_chunks")) is not None:
        args += ["--chunks", str(chunks)]
        settings["chunks"] = chunks
    return settings, Step("imatrix", "gguf", args, settings, [], lambda: [out], ctx.forward_need)


def _gptq(ctx: _Context, steps: list[Step], variants: list[dict[str, Any]]) -> None:
    """The GPTQ step, refused before any step runs for an architecture GPTQ cannot serve."""
    rf = ctx.rf
    gq = rf.section("variants").get("gptq")
    if gq is None:
        return
    arch = resolve(json.loads((ctx.src / "config.json").read_text(encoding="utf-8")))
    if why := arch.spec.get("gptq_refused"):  # refused before any step runs, not after the others
        where = rf.line(["variants", "gptq"])
        raise BadInputError(f"{rf.path}:{where}: GPTQ is not available for {arch.name}: {why}")
    out = ctx.gptq_dir
    args = [*ctx.cli, "gptq", str(ctx.src), "-o", str(out), "--force", "--device", ctx.gptq_device, *ctx.meta_args]
    flags = {"bits": "--bits", "group_size": "--group-size", "samples": "--samples", "seq_len": "--seq-len",
             "seed": "--seed"}  # fmt: skip
    args += [x for k, flag in flags.items() if k in gq for x in (flag, str(gq[k]))]
    if "calibration" in gq:
        args += ["--calibration", str(rf.relative(gq["calibration"]))]
    args += ["--desc-act" if gq.get("desc_act") else "--no-desc-act", "--sym" if gq.get("sym", True) else "--no-sym"]
    steps.append(Step("gptq", "gptq", args, {"source": ctx.source_fp, "cfg": gq, "meta": rf.data["release"]}, [],
                      lambda: [out], res.gptq_need(ctx.shape, ctx.device)))  # fmt: skip
    variants.append({"name": f"gptq-{gq.get('bits', 4)}bit", "family": "gptq", "path": out, "after": "gptq"})


def _validations(ctx: _Context, variants: list[dict[str, Any]]) -> list[Step]:
    """One validation per variant, in its own runtime, with the release file's thresholds."""
    thresholds = ctx.rf.section("evaluation").get("thresholds") or {}
    st = ctx.rf.section("variants").get("safetensors") or {}
    steps = []
    for v in variants:
        v["validate"] = f"validate-{v['family']}" + (f"-{v['name']}" if v["family"] == "gguf" else "")
        over = thresholds.get(_kind(v, st), {})
        args = [*ctx.cli, "validate", str(v["path"]), "-r", str(ctx.ref), "--device", ctx.device,
                "--forward", ctx.forward]  # fmt: skip
        reports_dir = None if v["family"] == "gguf" else ctx.dist / RELEASE_REPORTS
        args += ["--reports-dir", str(reports_dir)] if reports_dir is not None else []
        args += ["--max-kl", str(over["max_kl_mean"])] if "max_kl_mean" in over else []
        args += ["--min-top1", str(over["min_top1"])] if "min_top1" in over else []
        reports = list(report_paths(Path(v["path"]), reports_dir).values())
        need = _validate_need(v["family"], ctx.shape, ctx.tokens, ctx.device, ctx.forward_need)
        steps.append(Step(v["validate"], v["family"], args, {"thresholds": over}, [v["after"], "reference"],
                          lambda r=reports: r, need, ok_codes=(0, 1)))  # fmt: skip
    return steps


def _release_steps(ctx: _Context, variants: list[dict[str, Any]], key: Path | None) -> list[Step]:
    """Cards, manifests and (with a key) signatures over every folder, after every validation."""
    rf = ctx.rf
    release = rf.data["release"]
    url = str(release.get("repo_url") or "")
    if "huggingface.co/" not in url or "/" not in url.split("huggingface.co/", 1)[1].strip("/"):
        # The manifest names the Hub repositories; say so now, not after hours of quantization.
        raise BadInputError(
            f"{rf.path}:{rf.line(['release'])}: release.repo_url must name the Hub repository "
            "(https://huggingface.co/ORG/NAME): the manifest and cards are written for it",
            hint="or build one family with --only",
        )
    cfg = rf.section("variants")
    gguf_types = (cfg.get("gguf") or {}).get("types") or []
    folders = [
        ctx.main,
        *([ctx.gguf_dir] if gguf_types else []),
        *([ctx.gptq_dir] if cfg.get("gptq") is not None else []),
    ]
    docs = ["README.md", "LICENSE", "USE_POLICY.md", "NOTICE", "kl-comparison.png"]
    dist = str(ctx.dist)
    steps = [
        Step("card", "release", [*ctx.cli, "card", dist], {"meta": release}, [v["validate"] for v in variants],
             lambda: [f / d for f in folders for d in docs if (f / d).is_file()], res.SMALL),
        Step("manifest", "release", [*ctx.cli, "manifest", dist, "-r", str(ctx.ref)], {}, ["card"],
             lambda: [f / "release-manifest.json" for f in folders], res.SMALL),
    ]  # fmt: skip
    key = rf.signing_key(key)
    if key is not None:
        if not key.is_file():
            raise BadInputError(f"signing key {key} does not exist", hint="make one with `model-release keygen`")
        steps.append(Step("sign", "release", [*ctx.cli, "sign", dist, "--key", str(key)],
                          {"key": digest(key.read_bytes())}, ["manifest"],
                          lambda: [f / "release.sig" for f in folders], res.SMALL))  # fmt: skip
    return steps


def _itemsize(dtype: str, shape: Any) -> int:
    if dtype in ("fp32", "float32"):
        return 4
    if dtype == "keep":
        return max(1, round(shape.stored_bytes / max(shape.parameters, 1)))
    return 2


def _forward_mode(shape: Any, tokens: int, device: str) -> str:
    """The forward pass's own ``auto`` rule, decided here so the estimate and the run agree."""
    gpu = res.gpu_free() if device == "cuda" else None
    return "resident" if res.resident_fits(shape, tokens, device, res.mem_available(), gpu) else "streamed"


def _validate_need(family: str, shape: Any, tokens: int, device: str, forward_need: Need) -> Need:
    if family == "gguf":
        return res.llama_cpp_validate_need(shape)
    if family == "gptq":
        stored = int(shape.parameters * 4.25 / 8) + shape.vocab * shape.hidden * 2  # 4-bit, fp16 embeddings
        return res.gptq_validate_need(stored, shape.forward_activations(tokens), device)
    return forward_need


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


def check_fits(plan: Plan, records: Records | None, nodes: list[Any] | None = None) -> None:
    """Refuse, before any heavy work, a plan one of whose steps cannot fit this machine (its RAM,
    GPU memory, or the free disk the outputs still to write need), naming the step and the sizes.
    With ``nodes`` (a cluster's, each with cpus, memory, gpus and ``describe()``), a step must fit
    one node instead, and the refusal names the largest."""
    ram, gpu = res.mem_available(), None
    disk_needed = 0
    built = {s.name for s in plan.steps if _built(s.name, records)}
    for step in plan.steps:
        if step.name in built:
            continue  # built before: its outputs are there, it will be skipped or redone in place
        if step.temporary and all(s.name in built for s in plan.steps if step.name in s.deps):
            continue  # removed after use, and nothing that reads it needs to run again
        need = step.need
        disk_needed += need.disk
        if nodes is not None:
            _fits_a_node(step, nodes)
            continue
        if need.ram > ram:
            hint = "free memory, build on a larger machine"
            hint += ", or use --device cuda" if step.family in ("reference", "gptq") else ""
            msg = f"{step.name} needs about {fmt(need.ram)} of memory; {fmt(ram)} is available"
            raise BadInputError(msg, hint=hint)
        if need.gpu:
            gpu = res.gpu_free() if gpu is None else gpu
            if gpu is None or need.gpu > gpu:
                have = "no CUDA device" if gpu is None else f"{fmt(gpu)} free"
                raise BadInputError(f"{step.name} needs about {fmt(need.gpu)} of GPU memory; {have}")
    free = res.disk_free(plan.dist)
    if disk_needed > free:
        raise BadInputError(
            f"the outputs still to write need about {fmt(disk_needed)} of disk; {fmt(free)} is free at {plan.dist}",
            hint="free space or build elsewhere (-o)",
        )


def _built(step: str, records: Records | None) -> bool:
    rec = records.load(step) if records is not None else None
    return rec is not None and all(Path(f).is_file() for f, _, _ in rec["files"])


def _fits_a_node(step: Step, nodes: list[Any]) -> None:
    """A cluster step needs one node with its CPUs (its thread count), memory and, for CUDA, a GPU
    (Ray counts GPUs, not their memory: the GPU memory estimate is checked by the step itself)."""
    need, gpus = step.need, 1 if step.need.gpu else 0
    if any(n.cpus >= step.threads and n.memory >= need.ram and n.gpus >= gpus for n in nodes):
        return
    largest = max(nodes, key=lambda n: (n.gpus >= gpus, n.memory, n.cpus), default=None)
    wants = f"{step.threads} CPU(s) and about {fmt(need.ram)} of memory" + (" and a GPU" if gpus else "")
    have = f"the largest node is {largest.describe()}" if largest else "the cluster has no alive node"
    raise BadInputError(f"{step.name} needs {wants}; no node of the cluster has that: {have}",
                        hint="add a larger node, or lower --threads")  # fmt: skip
