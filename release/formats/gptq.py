"""GPTQ variants through GPTQModel (the maintained successor of AutoGPTQ).

We do not re-implement GPTQ: GPTQModel quantizes layer by layer and writes the standard layout
(qweight/qzeros/scales/g_idx, ``quantize_config.json``, ``quantization_config`` in config.json) that
transformers (+ optimum), vLLM and GPTQModel load. This module does what it does not:

- refuses bad input before the slow part (architecture, tokenizer, group size against the model's
  dimensions, calibration text too short, NaN weights);
- builds a deterministic calibration set (our own medical + general texts, or the user's file);
- writes atomically, strips machine-local keys from the configs, records who quantized it with what,
  and stamps every shard's ``__metadata__`` with the same provenance and license fields as our other
  formats (including the source checkpoint hash that ``validate`` ties to a reference).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from release import __version__, dtypes, hashing
from release.atomic import atomic_dir, check_target
from release.calibration import Calibration, build_calibration
from release.capture import capture_fd, tail
from release.checkpoint import Checkpoint, open_checkpoint, plan_tensors
from release.choices import BITS
from release.errors import BadInputError, CheckFailedError, ReleaseError, os_error_to_release_error
from release.formats.safetensors import restamp
from release.licensing import apply_policy
from release.metadata import ReleaseMetadata
from release.progress import NULL, Reporter
from release.resources import cpu_threads
from release.tensors import has_nonfinite, tensor_bytes

# Group sizes tried by --group-size auto, largest first (128 is the common default on the Hub).
AUTO_GROUP_SIZES = (128, 64, 32)
GROUP_SIZES = (1024, 512, 256, 128, 64, 32, 16)
# Config keys GPTQModel writes that describe the machine, not the checkpoint.
MACHINE_LOCAL_KEYS = ("offload_to_disk_path",)


@dataclass(frozen=True)
class GPTQSettings:
    bits: int = 4
    group_size: int | None = None  # None: the largest of AUTO_GROUP_SIZES that fits the model
    desc_act: bool = False
    sym: bool = True
    samples: int | None = None  # None: every window the calibration text gives
    seq_len: int = 256
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    method: str = "gptq"  # gptq | rtn (round-to-nearest, no calibration: the control GPTQ must beat)


def gptqmodel_version() -> str | None:
    try:
        return version("gptqmodel")
    except PackageNotFoundError:
        return None


def prepare_gptqmodel() -> None:
    """Settings GPTQModel needs before import. Its CPU worker pool asks for 2 workers by default and
    refuses to start on a machine that leaves it fewer (measured on this 2-core machine); beyond
    that, the step's thread budget, not the node's cores (a 64-core node running an 8-CPU Ray task
    got 64 workers)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, cpu_threads())))
    if gptqmodel_version() is None:
        raise BadInputError("GPTQ needs GPTQModel, which is not installed", hint="pip install 'model-release[gptq]'")


# --- checks that run before any slow work -------------------------------------------------------


def in_features(config: dict[str, Any]) -> dict[str, int]:
    """Input width of each quantized Linear family of a Llama block (the dimension groups run along)."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {
        "q/k/v/gate/up_proj (hidden_size)": hidden,
        "o_proj (heads x head_dim)": heads * head_dim,
        "down_proj (intermediate_size)": int(config["intermediate_size"]),
    }


def fitting_group_sizes(
    config: dict[str, Any], candidates: tuple[int, ...] = (1024, 256, 128, 64, 32, 16)
) -> list[int]:
    widths = in_features(config).values()
    return [g for g in candidates if all(w % g == 0 for w in widths)]


def choose_group_size(config: dict[str, Any], requested: int | None) -> int:
    """Every Linear's input width must be a multiple of the group size: transformers' CPU kernel
    refuses the checkpoint otherwise (SmolLM2: 576 % 128 != 0), and groups straddling rows make no
    sense anyway. -1 means one group per row (per-channel)."""
    if requested == -1:
        return -1
    fits = fitting_group_sizes(config)
    if requested is None:
        for g in AUTO_GROUP_SIZES:
            if g in fits:
                return g
        raise BadInputError(
            f"no group size among {', '.join(map(str, AUTO_GROUP_SIZES))} divides the model's layer widths "
            f"({_widths(config)})",
            hint="pass --group-size -1 (per-channel)" + (f" or one of {', '.join(map(str, fits))}" if fits else ""),
        )
    if requested <= 0:
        raise BadInputError(f"--group-size must be positive or -1, not {requested}")
    bad = {k: w for k, w in in_features(config).items() if w % requested}
    if bad:
        raise BadInputError(
            f"--group-size {requested} does not divide the model's layer widths ({_widths(config, bad)})",
            hint=f"sizes that fit: {', '.join(map(str, [*fits, -1]))}",
        )
    return requested


def _widths(config: dict[str, Any], only: dict[str, int] | None = None) -> str:
    return ", ".join(f"{k} = {w}" for k, w in (only or in_features(config)).items())


# --- the run -------------------------------------------------------------------------------------


@dataclass
class GPTQResult:
    output: str
    source: str
    variant: str
    method: str
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    device: str
    calibration: dict[str, Any]
    source_checkpoint_hash: str
    files: list[dict[str, Any]]
    total_bytes: int
    quantizer: list[str]
    layers: int
    seconds: float
    quantize_seconds: float
    peak_rss_mb: float
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self)}


def variant_name(bits: int, group_size: int, method: str = "gptq") -> str:
    """The name variants go by in manifests and repos: gptq-4bit-g128, gptq-4bit-g64-rtn, gptq-8bit-gch."""
    group = "ch" if group_size == -1 else str(group_size)
    return f"gptq-{bits}bit-g{group}" + ("-rtn" if method == "rtn" else "")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {device}: no CUDA device here", hint="use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise BadInputError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    return device


def _source_hash(ckpt: Checkpoint, refs: list[Any], reporter: Reporter) -> str:
    """The same checkpoint hash ``convert`` records, plus the NaN/Inf check GPTQ would hide."""
    reporter.start("hashing and checking the source", sum(r.nbytes for r in refs))
    digests: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for ref in refs:
        with ckpt.open(ref) as t:  # one mapping per tensor for both the check and the digest
            if t.is_floating_point() and has_nonfinite(t):
                raise BadInputError(f"tensor {ref.name} holds NaN/Inf values; GPTQ would spread them")
            digests[ref.name] = (ref.dtype, ref.shape, hashing.tensor_digest(tensor_bytes(t)))
        reporter.advance(ref.nbytes)
    reporter.done()
    return hashing.checkpoint_hash(digests)


def import_gptqmodel() -> Any:
    """Import GPTQModel with its import-time chatter captured: a banner on stdout (logbar), and
    torch/torchao deprecation warnings on stderr. Its logs stay at WARNING and above afterwards."""
    prepare_gptqmodel()
    with capture_fd(1) as out, capture_fd(2):
        try:
            import gptqmodel
            from logbar import LogBar
        except Exception as exc:
            raise BadInputError(
                f"GPTQModel does not import: {type(exc).__name__}: {exc}", hint=tail(out) or None
            ) from exc
    LogBar.shared().setLevel("WARNING")
    logging.getLogger("tokenicer").setLevel(logging.WARNING)
    return gptqmodel


def quantize(
    src: Path,
    out: Path,
    settings: GPTQSettings = GPTQSettings(),
    *,
    calibration: Path | None = None,
    metadata: ReleaseMetadata | None = None,
    force: bool = False,
    reporter: Reporter = NULL,
) -> GPTQResult:
    """Quantize an HF model folder to a GPTQ folder at ``out`` (atomic: all or nothing)."""
    started = time.monotonic()
    src, out = Path(src), Path(out).absolute()
    if settings.bits not in BITS:
        raise BadInputError(f"--bits must be one of {', '.join(map(str, BITS))}, not {settings.bits}")
    if settings.method not in ("gptq", "rtn"):
        raise BadInputError(f"--method must be gptq or rtn, not {settings.method!r}")
    check_target(out, force)
    if not src.is_dir():
        raise BadInputError(f"{src}: GPTQ needs an HF model folder (config.json, weights, tokenizer)")
    if src.absolute() == out:
        raise BadInputError("output must differ from the source")
    device = resolve_device(settings.device)
    warnings: list[str] = []
    with open_checkpoint(src) as ckpt:
        plan = plan_tensors(ckpt)  # unknown architecture, truncated or missing weights: refused here
        if why := plan.architecture.spec.get("gptq_refused"):
            raise BadInputError(f"GPTQ is not available for {plan.architecture.name}: {why}")
        if not ckpt.has_tokenizer():
            raise BadInputError(f"{src}: no tokenizer files; GPTQ calibration and the released variant need one")
        group_size = choose_group_size(ckpt.config, settings.group_size)
        prepare_gptqmodel()
        extra_files = ckpt.extra_files()
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{src}: cannot load the tokenizer ({exc})") from None
        cal = (
            build_calibration(
                calibration,
                tokenizer,
                seq_len=settings.seq_len,
                seed=settings.seed,
                samples=settings.samples,
                warn=warnings,
            )
            if settings.method == "gptq"
            else None
        )
        source_hash = _source_hash(ckpt, plan.tensors, reporter)
        meta = apply_policy(metadata or ReleaseMetadata()).with_(
            source_format=ckpt.format,
            origin_checkpoint_hash=ckpt.recorded_origin(),
            source_checkpoint_hash=source_hash,
        )
        layers = plan.architecture.num_layers
    variant = variant_name(settings.bits, group_size, settings.method)
    calib_info: dict[str, Any] = {}
    if cal:
        calib_info = {"name": cal.name, "sha256": cal.sha256, "documents": cal.documents, "tokens": cal.tokens}
        calib_info |= {"samples": len(cal.windows), "seq_len": settings.seq_len, "seed": settings.seed}
    with atomic_dir(out, force=force) as tmp:
        try:
            quantize_seconds = _run_gptqmodel(src, tmp, settings, group_size, device, cal, layers, reporter)
            quantizer = _finish_configs(tmp, calib_info, variant)
            (tmp / "quant_log.csv").unlink(missing_ok=True)  # per-module timings of this machine
            # Tokenizer, chat template and generation config exactly as the source has them: GPTQModel
            # re-saves them with changes (measured on SmolLM2: fix_mistral_regex added, do_sample: true).
            for p in extra_files:
                shutil.copyfile(p, tmp / p.name)
            stamp = meta.to_safetensors() | {"quantization": variant}
            shards = sorted(tmp.glob("*.safetensors"))
            if not shards:
                raise CheckFailedError("GPTQModel wrote no safetensors weights")
            f32_to = _back_to_source_dtype(src, tmp / "config.json") if device == "cpu" else None  # see _load_dtype
            reporter.start("stamping provenance into the weights", len(shards), unit="files")
            for shard in shards:
                restamp(shard, stamp, f32_to=f32_to)
                reporter.advance()
            reporter.done()
            files = [{"file": p.name, "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()]
        except OSError as exc:
            raise os_error_to_release_error(exc, f"writing {out}") from exc
    return GPTQResult(
        output=str(out),
        source=str(src),
        variant=variant,
        method=settings.method,
        bits=settings.bits,
        group_size=group_size,
        desc_act=settings.desc_act,
        sym=settings.sym,
        device=device,
        calibration=calib_info,
        source_checkpoint_hash=source_hash,
        files=files,
        total_bytes=sum(f["bytes"] for f in files),
        quantizer=quantizer,
        layers=layers,
        seconds=round(time.monotonic() - started, 2),
        quantize_seconds=round(quantize_seconds, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        warnings=warnings,
    )


def _load_dtype(device: str) -> dict[str, Any]:
    """On the CPU, calibrate in float32. GPTQModel 7.7 picks bfloat16 for every CPU, but a CPU without
    bfloat16 hardware (AVX2 only: no AVX512-BF16 or AMX) multiplies bfloat16 matrices about 6x slower
    than float32 (measured here: a 256x576 by 576x1536 product, 40 ms against 6.4 ms), and the
    calibration forward passes are most of GPTQ's time: SmolLM2 took 252 s in bfloat16, 114 s in
    float32 (both on 2 threads). float32 is also the same on every CPU, so a CPU build reproduces on another CPU:
    which is why it stays float32 where bfloat16 is faster (an AMD EPYC with AVX512-BF16, 2026-12-06: the
    same product 1.07 ms in bfloat16, 2.59 ms in float32), as its kernels differ from the emulated ones. The
    weights GPTQ does not quantize go back to the source's dtype when the shards are stamped."""
    return {"dtype": torch.float32} if device == "cpu" else {}


def _back_to_source_dtype(src: Path, written_config: Path) -> str | None:
    """When the source is 16-bit: name its dtype again in the written config.json (GPTQModel wrote
    the float32 it ran in) and return its safetensors code, for the shards' float32 tensors."""
    src_cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    name = str(src_cfg.get("torch_dtype") or src_cfg.get("dtype") or "").removeprefix("torch.")
    code = {v: k for k, v in dtypes.CONFIG_DTYPE_NAMES.items()}.get(name)
    if code not in ("BF16", "F16"):
        return None
    cfg = json.loads(written_config.read_text(encoding="utf-8"))
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = name
    written_config.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return code


def _run_gptqmodel(
    src: Path,
    tmp: Path,
    settings: GPTQSettings,
    group_size: int,
    device: str,
    cal: Calibration | None,
    layers: int,
    reporter: Reporter,
) -> float:
    """Load, quantize and save with GPTQModel; progress per layer. Returns the seconds it took."""
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    offload = Path(tempfile.mkdtemp(prefix=".gptq-offload-", dir=tmp.parent))
    began = time.monotonic()
    try:
        gptqmodel = import_gptqmodel()
        # GPTQModel writes per-module logs into ./logs of the caller's working directory (a relative
        # module constant in 7.7): point it at our temporary folder so no junk is left in the user's.
        with contextlib.suppress(ImportError, AttributeError):
            from gptqmodel.looper import loop_processor

            if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
                loop_processor._PROJECT_LOG_DIR = offload / "logs"
        GPTQModel, QuantizeConfig = gptqmodel.GPTQModel, gptqmodel.QuantizeConfig
        # stdout only: our progress bars are on stderr; GPTQModel logs through logbar on stdout.
        with capture_fd(1) as log:
            try:
                kwargs: dict[str, Any] = {
                    "bits": settings.bits,
                    "group_size": group_size,
                    "desc_act": settings.desc_act,
                    "sym": settings.sym,
                    "offload_to_disk_path": str(offload),
                }
                if settings.method == "rtn":
                    kwargs["weight_only"] = {"method": "rtn"}
                qc = QuantizeConfig(**kwargs)
                label = "round-to-nearest" if settings.method == "rtn" else "GPTQ"
                reporter.start(f"{label} {settings.bits}-bit g{group_size} on {device}: loading", None)
                model = GPTQModel.load(str(src), qc, device=device, **_load_dtype(device))
                reporter.start(f"{label} {settings.bits}-bit g{group_size} on {device}", layers, unit="layers")
                seen: set[int] = set()

                def layer_done(layer_idx: int, submodule_finalized: bool = False, **_: Any) -> None:
                    if layer_idx not in seen:
                        seen.add(layer_idx)
                        reporter.advance()

                model.layer_callback = layer_done
                samples = [{"input_ids": w, "attention_mask": [1] * len(w)} for w in cal.windows] if cal else None
                model.quantize(samples, batch_size=1)
                reporter.done()
                reporter.start("saving", None)
                model.save(str(tmp))
                reporter.done()
                del model
            except ReleaseError:
                raise
            except Exception as exc:
                said = tail(log) or None
                raise CheckFailedError(f"GPTQModel failed: {type(exc).__name__}: {exc}", hint=said) from exc
    finally:
        shutil.rmtree(offload, ignore_errors=True)
    return time.monotonic() - began


def _finish_configs(folder: Path, calibration: dict[str, Any], variant: str) -> list[str]:
    """Strip machine-local keys GPTQModel writes (its temp offload path) from quantize_config.json
    and config.json, and add who made the variant with what. Returns the quantizer list."""
    qc_path, cfg_path = folder / "quantize_config.json", folder / "config.json"
    if not qc_path.is_file() or not cfg_path.is_file():
        raise CheckFailedError("GPTQModel did not write quantize_config.json and config.json")
    qc = json.loads(qc_path.read_text(encoding="utf-8"))
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if qc.get("checkpoint_format", "gptq") != "gptq" or qc.get("quant_method", "gptq") != "gptq":
        raise CheckFailedError(f"GPTQModel wrote format {qc.get('checkpoint_format')!r}, expected gptq")
    for conf in (qc, cfg.get("quantization_config") or {}):
        meta = conf.setdefault("meta", {})
        for key in MACHINE_LOCAL_KEYS:
            conf.pop(key, None)
            meta.pop(key, None)
        quantizer = [q for q in meta.get("quantizer", []) if not q.startswith("model-release:")]
        meta["quantizer"] = [*quantizer, f"model-release:{__version__}"]
        meta["variant"] = variant
        if calibration:
            meta["calibration"] = calibration
    cfg["quantization_config"] = {**(cfg.get("quantization_config") or {}), **qc}
    for path, data in ((qc_path, qc), (cfg_path, cfg)):
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    leaked = [p.name for p in (qc_path, cfg_path) if any(k in p.read_text("utf-8") for k in MACHINE_LOCAL_KEYS)]
    if leaked:  # GPTQModel moved the key somewhere we do not strip: fail rather than ship it
        raise CheckFailedError(f"machine-local settings remain in {', '.join(leaked)}")
    return list(qc["meta"]["quantizer"])
