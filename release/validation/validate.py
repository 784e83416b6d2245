"""Validate variants against a stored reference, in the runtime each variant's users run it in."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from release.datafiles import data_file
from release.errors import BadInputError, CheckFailedError
from release.progress import NULL, Reporter
from release.resources import rss_anon
from release.validation import tokenizer as tokenizer_check
from release.validation.metrics import Accumulator, compare_prompt
from release.validation.reference import Reference, load_prompts, load_reference
from release.validation.report import write_reports
from release.validation.result import VariantResult
from release.validation.runtimes import Runtime, open_runtime


@dataclass
class ValidationResult:
    reference: str
    passed: bool
    variants: list[VariantResult]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.passed, **asdict(self)}

    def failure(self) -> CheckFailedError | None:
        failed = [r for r in self.variants if not r.passed]
        if not failed:
            return None
        return CheckFailedError(
            "; ".join(f"{Path(r.variant).name} ({r.kind}) failed: {', '.join(r.failures)}" for r in failed)
        )


def thresholds_for(kind: str) -> dict[str, float | None]:
    table = data_file("validation_thresholds.json")["kinds"]
    if kind not in table:
        raise BadInputError(f"no default thresholds for variant kind {kind!r}; pass --max-kl and --min-top1")
    return {k: v for k, v in table[kind].items() if k != "measured"}


def variant_kind(fmt: str, runtime: Runtime, path: Path, ref: Reference) -> str:
    if fmt == "gguf":
        import gguf

        ft = getattr(runtime, "file_type", None)
        try:
            name = gguf.LlamaFileType(int(ft)).name if ft is not None else "unknown"
        except ValueError:
            name = str(ft)
        return "gguf-" + name.removeprefix("MOSTLY_").removeprefix("ALL_")
    if fmt == "gptq":
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return f"gptq-{int(config['quantization_config'].get('bits', 4))}bit"
    from release.inspect import describe

    dtypes = ",".join(sorted(describe(path)["dtypes"]))
    return "lossless" if dtypes == ref.meta.get("source_dtypes") else "safetensors-cast"


def _check_same_model(path: Path, runtime: Runtime, ref: Reference, warnings: list[str]) -> None:
    """Exit-2 checks: the variant must be of the reference's model and tokenize its prompts alike."""
    vocab = int(ref.meta.get("vocab_size", 0))
    if vocab and runtime.vocab_size != vocab:
        raise BadInputError(
            f"{path}: vocabulary of {runtime.vocab_size} tokens, the reference's model has {vocab}: another model"
        )
    source = ref.meta.get("source_checkpoint_hash")
    if runtime.recorded_hashes and source not in runtime.recorded_hashes:
        raise BadInputError(
            f"{path}: made from checkpoint {runtime.recorded_hashes[0]}, the reference from {source}: another model"
        )
    if not runtime.recorded_hashes:
        warnings.append("the variant records no source checkpoint hash; only its tokenizer and outputs were checked")


def _check_tokenizer(path: Path, runtime: Runtime, ref: Reference, prompts_file: Path | None) -> None:
    prompts, _, prompts_hash = load_prompts(prompts_file)
    if prompts_hash != ref.meta.get("prompts_hash"):
        raise BadInputError(f"the prompts differ from those the reference {ref.path} was made with")
    max_tokens = int(ref.meta.get("max_tokens", 1 << 30))
    for p, (ids, _) in zip(prompts, ref.prompts(), strict=True):
        got = runtime.tokenize(p.text)[:max_tokens]
        if got != ids:
            at = next((i for i, (a, b) in enumerate(zip(got, ids, strict=False)) if a != b), min(len(got), len(ids)))
            raise BadInputError(
                f"{path}: tokenizes prompt {p.id!r} differently from the reference (from token {at} on): "
                "another tokenizer, or a reference of another model"
            )


def validate(
    variants: list[Path],
    reference: Path,
    *,
    runtime: str = "auto",
    max_kl: float | None = None,
    min_top1: float | None = None,
    prompts_file: Path | None = None,
    device: str = "cpu",
    forward: str = "auto",
    write: bool = True,
    reports_dir: Path | None = None,
    reporter: Reporter = NULL,
) -> ValidationResult:
    """Compare each variant with the reference and write each one's reports. The caller turns a
    failed variant into exit code 1 (``ValidationResult.failure``); bad input raises (exit 2)."""
    ref = load_reference(reference)
    results = []
    for path in variants:
        path = Path(path)
        started = time.monotonic()
        longest = int((ref.offsets[1:] - ref.offsets[:-1]).max())
        fmt, rt = open_runtime(path, runtime, device, forward, longest)
        warnings: list[str] = []
        try:
            _check_same_model(path, rt, ref, warnings)
            _check_tokenizer(path, rt, ref, prompts_file)
            tokenizer_failures, tokenizer_summary = tokenizer_check.check(rt, ref.meta, warnings)
            kind = variant_kind(fmt, rt, path, ref)
            limits = thresholds_for(kind) if (max_kl is None or min_top1 is None) else {}
            if max_kl is not None:
                limits["max_kl_mean"] = max_kl
            if min_top1 is not None:
                limits["min_top1"] = min_top1
            acc = Accumulator()
            reporter.start(f"validating {path.name} in {rt.name}", ref.prompt_count)
            compute = 0.0
            peak_anon = rss_anon()
            items = list(ref.prompts())
            stream = rt.logits_many([ids for ids, _ in items])
            for ids, rows in items:
                t0 = time.monotonic()
                logits = next(stream)[:-1]
                compute += time.monotonic() - t0
                peak_anon = max(peak_anon, rss_anon())
                kl, top1, target, diff = compare_prompt(
                    logits, ref.topk_ids[rows], ref.topk_logprobs[rows], torch.tensor(ids[1:])
                )
                acc.add(kl, top1, target, ref.target_logprobs[rows].double().numpy(), diff)
                reporter.advance(1)
            reporter.done()
        finally:
            rt.close()
        metrics = acc.summary()
        kl_all = acc.kl_values()  # every token's KL, once: the report's quantiles and its plot
        failures = _failures(metrics, limits) + tokenizer_failures
        res = VariantResult(
            variant=str(path),
            format=fmt,
            runtime=rt.name,
            kind=kind,
            passed=not failures,
            metrics={k: round(v, 8) if isinstance(v, float) else v for k, v in metrics.items()},
            thresholds=limits,
            failures=failures,
            warnings=warnings,
            seconds=round(time.monotonic() - started, 2),
            seconds_per_1000_tokens=round(compute / (int(ref.input_ids.numel()) / 1000), 3),
            forward=getattr(rt, "forward", ""),
            peak_anon_rss_bytes=peak_anon,
            kl_quantiles=kl_quantiles(kl_all),
            quantization=dict(rt.quantization),
            tokenizer=tokenizer_summary,
        )
        if write:
            if fmt == "gguf":  # one report per variant, named after the set when it is split
                from release.formats.gguf_names import set_name

                path = path.with_name(set_name(path.name))
            res.reports = write_reports(path, res, kl_all, ref, reports_dir)
        results.append(res)
    return ValidationResult(reference=str(reference), passed=all(r.passed for r in results), variants=results)


KL_PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def kl_quantiles(kl: np.ndarray) -> dict[str, float]:
    """The per-token KL distribution in a few numbers (the card draws the variants side by side)."""
    if kl.size == 0:
        return {}
    values = np.percentile(kl, KL_PERCENTILES)
    return {f"p{q}": float(f"{v:.6g}") for q, v in zip(KL_PERCENTILES, values, strict=True)}


def _failures(m: dict[str, float], limits: dict[str, float | None]) -> list[str]:
    out = []
    checks = [
        ("max_kl_mean", "kl_mean", "mean KL {v:.3g} > {t:.3g}", lambda v, t: v > t),
        ("min_top1", "top1_agreement", "top-1 agreement {v:.4f} < {t:.4f}", lambda v, t: v < t),
        ("max_ppl_ratio", "perplexity_ratio", "perplexity ratio {v:.4f} > {t:.4f}", lambda v, t: v > t),
        ("max_logprob_diff", "max_logprob_diff", "max log-prob difference {v:.3g} > {t:.3g}", lambda v, t: v > t),
    ]
    for limit_key, metric_key, text, bad in checks:
        t = limits.get(limit_key)
        if t is not None and bad(m[metric_key], t):
            out.append(text.format(v=m[metric_key], t=t))
    return out
