"""Benchmark `model-release gptq` against GPTQModel called directly, in one run, on the real model.

On the SmolLM2-135M fixture, each in a fresh process (wall time, CPU time and peak RSS via wait4):
  - `model-release gptq` (4-bit, auto group size, built-in calibration, all windows);
  - the peer: a plain GPTQModel script (load, quantize, save) with the same windows and settings,
    so the ratio is our overhead (checks, source hash, restamping, config cleanup);
  - `model-release gptq --method rtn` (round-to-nearest, the control) for scale;
then validates both our outputs against reference logits: KL and top-1 of GPTQ against RTN.
Runs on the CPU here; on a machine with CUDA pass --device cuda (or auto). Usage:
    python bench/bench_gptq.py [--device cpu] [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import run_measured

PEER = """
import json, os, sys
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
from gptqmodel import GPTQModel, QuantizeConfig
src, out, windows, device, group = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3])), sys.argv[4], int(sys.argv[5])
os.chdir(os.path.dirname(os.path.abspath(out)))  # GPTQModel writes ./logs/gptq_log_*.log: not in the checkout
model = GPTQModel.load(src, QuantizeConfig(bits=4, group_size=group, desc_act=False, sym=True), device=device)
model.quantize([{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows], batch_size=1)
model.save(out)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the best time of each is reported")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "model-release-bench-gptq")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from release import fixtures
    from release.calibration import build_calibration
    from release.formats.gptq import GPTQSettings, choose_group_size, prepare_gptqmodel
    from release.validation.reference import build_reference
    from release.validation.validate import validate

    prepare_gptqmodel()
    src = fixtures.smollm2().hf
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cal = build_calibration(None, AutoTokenizer.from_pretrained(src), seq_len=GPTQSettings().seq_len, warn=[])
    (work / "windows.json").write_text(json.dumps(cal.windows))
    group = choose_group_size(json.loads((src / "config.json").read_text()), None)
    ours = [sys.executable, "-c", "from release.cli import main; main()", "gptq", str(src), "--quiet", "--force"]
    peer = [sys.executable, "-c", PEER]
    peer_device = "cuda" if args.device in ("cuda", "auto") else "cpu"
    commands = {
        "model-release gptq": [*ours, "-o", str(work / "ours"), "--device", args.device],
        "GPTQModel direct": [*peer, str(src), str(work / "peer"), str(work / "windows.json"), peer_device, str(group)],
        "model-release gptq --method rtn": [*ours, "-o", str(work / "rtn"), "--method", "rtn", "--device", args.device],
    }
    best: dict[str, tuple[float, int, float]] = {}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            shutil.rmtree(work / "peer", ignore_errors=True)
            run = run_measured(cmd)
            if name not in best or run[0] < best[name][0]:
                best[name] = run
    results = {n: {"seconds": w, "peak_rss_mb": rss / 1e6, "cpu_seconds": c} for n, (w, rss, c) in best.items()}
    ref = work / "ref.safetensors"
    build_reference(src, ref)
    checked = validate([work / "ours", work / "rtn"], ref, max_kl=100.0, min_top1=0.0)
    quality = {
        Path(v.variant).name: v.metrics | {"seconds_per_1000_tokens": v.seconds_per_1000_tokens}
        for v in checked.variants
    }
    o, p = results["model-release gptq"], results["GPTQModel direct"]
    summary = {
        "device": args.device,
        "calibration": {"samples": len(cal.windows), "seq_len": 256, "group_size": group},
        "results": results,
        "time_ratio_vs_gptqmodel": o["seconds"] / p["seconds"],
        "rss_ratio_vs_gptqmodel": o["peak_rss_mb"] / p["peak_rss_mb"],
        "quality": quality,
        "kl_ratio_gptq_vs_rtn": quality["ours"]["kl_mean"] / quality["rtn"]["kl_mean"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"SmolLM2-135M-Instruct, 4-bit g{group}, {len(cal.windows)} x 256 calibration tokens, device {args.device}")
    print(f"{'run':<34}{'seconds':>9}{'CPU s':>8}{'peak RSS MB':>13}")
    for name, r in results.items():
        print(f"{name:<34}{r['seconds']:>9.2f}{r['cpu_seconds']:>8.2f}{r['peak_rss_mb']:>13.0f}")
    print(
        f"ours / GPTQModel direct: time {summary['time_ratio_vs_gptqmodel']:.2f}x, "
        f"peak RSS {summary['rss_ratio_vs_gptqmodel']:.2f}x"
    )
    for name, q in quality.items():
        print(
            f"{'GPTQ' if name == 'ours' else 'RTN '}: mean KL {q['kl_mean']:.4f}, top-1 {q['top1_agreement']:.3f}, "
            f"ppl ratio {q['perplexity_ratio']:.3f}, validation {q['seconds_per_1000_tokens']:.1f} s / 1000 tokens"
        )
    print(f"KL GPTQ / RTN = {summary['kl_ratio_gptq_vs_rtn']:.2f}")


if __name__ == "__main__":
    main()
