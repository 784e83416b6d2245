"""validation.json, a Markdown table and a KL histogram next to each validated variant."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from release.atomic import atomic_file
from release.validation.result import VariantResult

if TYPE_CHECKING:
    from release.validation.reference import Reference


# In a release directory, the reports of its folder variants (the model, GPTQ): not beside the
# folders at the release root, where they would sit next to the copies the manifest step puts
# inside each folder (the place they are published).
RELEASE_REPORTS = Path(".work") / "reports"


def report_paths(variant: Path, reports_dir: Path | None = None) -> dict[str, Path]:
    """``X.gguf`` -> ``X.validation.json`` ... beside it; a folder ``F`` -> ``F.validation.json``
    beside it, or in ``reports_dir`` (never inside: the folder's files are what gets published)."""
    is_file = variant.is_file() or variant.suffix == ".gguf"
    base = variant.with_suffix("") if is_file else variant
    parent = Path(reports_dir) if (reports_dir is not None and not is_file) else base.parent
    return {
        "json": parent / f"{base.name}.validation.json",
        "markdown": parent / f"{base.name}.validation.md",
        "plot": parent / f"{base.name}.kl.png",
    }


def find_folder_report(folder: Path, suffix: str) -> Path | None:
    """Where `validate` left a folder variant's report (``suffix``: .validation.json, .kl.png ...):
    beside the folder, or in the release directory's ``RELEASE_REPORTS``."""
    for parent in (folder.parent, folder.parent / RELEASE_REPORTS):
        if (parent / f"{folder.name}{suffix}").is_file():
            return parent / f"{folder.name}{suffix}"
    return None


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | runtime | mean KL | p99 KL | top-1 agreement | perplexity ratio | result |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        m = r["metrics"]
        lines.append(
            f"| {Path(r['variant']).name} | {r['runtime']} | {m['kl_mean']:.2e} | {m['kl_p99']:.2e} | "
            f"{m['top1_agreement']:.3f} | {m['perplexity_ratio']:.4f} | {'pass' if r['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines) + "\n"


def write_reports(
    variant: Path, res: VariantResult, kl: np.ndarray, ref: Reference, reports_dir: Path | None = None
) -> dict[str, str]:
    paths = report_paths(variant, reports_dir)
    data = {k: v for k, v in asdict(res).items() if k != "reports"}
    data["reference"] = {
        "file": str(ref.path),
        "source_checkpoint_hash": ref.meta.get("source_checkpoint_hash"),
        "prompts": ref.meta.get("prompts"),
        "prompts_hash": ref.meta.get("prompts_hash"),
        "top_k": int(ref.meta.get("top_k", 0)),
    }
    with atomic_file(paths["json"], force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    with atomic_file(paths["markdown"], force=True) as tmp:
        tmp.write_text(markdown_table([data]), encoding="utf-8")
    with atomic_file(paths["plot"], force=True) as tmp:
        _plot(kl, f"{variant.name} ({res.runtime}): per-token KL, mean {kl.mean():.2e}", tmp)
    return {k: str(v) for k, v in paths.items()}


def _plot(kl: np.ndarray, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here or in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    floor = 1e-8
    values = np.clip(kl, floor, None)
    bins = np.logspace(np.log10(floor), np.log10(max(values.max(), floor * 10)), 50)
    ax.hist(values, bins=bins, color="#3b6ea8")
    ax.set_xscale("log")
    ax.axvline(max(kl.mean(), floor), color="#c0392b", linestyle="--", label="mean")
    ax.axvline(max(float(np.percentile(kl, 99)), floor), color="#e67e22", linestyle=":", label="99th percentile")
    ax.set_xlabel(f"KL(reference || variant) per token (values below {floor:g} shown at {floor:g})")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def plot_side_by_side(entries: list[tuple[str, dict[str, float]]], out: Path, title: str) -> None:
    """Per-token KL of several variants as boxes (1st/25th/50th/75th/99th percentiles and the mean
    file by file), from the quantiles each validation report keeps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-8
    stats = [
        {"label": label, "whislo": max(q["p1"], floor), "q1": max(q["p25"], floor), "med": max(q["p50"], floor),
         "q3": max(q["p75"], floor), "whishi": max(q["p99"], floor), "fliers": []}
        for label, q in entries
    ]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(stats) + 2), 3.8), dpi=100)
    ax.bxp(stats, showfliers=False, patch_artist=True, boxprops={"facecolor": "#9dbbe0"})
    ax.set_yscale("log")
    ax.set_ylabel("KL(reference || variant) per token")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
