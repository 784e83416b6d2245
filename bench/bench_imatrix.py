"""Importance-matrix collection: time per 1000 calibration tokens and peak memory, against
llama.cpp's own `llama-imatrix` on the same model and text, and at the seed's 7B shape.

1. SmolLM2-135M (the fixture): `model-release imatrix` over the built-in calibration set (10 chunks
   of 512 tokens), resident and streamed.
2. Peer, when llama.cpp's tools are given (`--llama-cpp-tools DIR` holding `llama-imatrix` and
   `llama-quantize`, built from the llama.cpp that llama-cpp-python vendors; see README): the same
   text through `llama-imatrix` on our F16 GGUF of the model. Prints the time and peak-RSS ratios,
   how closely the two matrices agree (per-column correlation), and the interplay both ways:
   `llama-quantize --imatrix OURS` loads our file, and `model-release gguf --imatrix PEERS` theirs;
   the Q4_K_M files are validated against the reference.
3. The Llama-2-7B-shaped checkpoint of `bench_scale.py` (generated under --workdir if missing,
   13.8 GB): `model-release imatrix --chunks 2` streamed (one layer at a time).

    python bench/bench_imatrix.py [--workdir DIR] [--llama-cpp-tools DIR] [--skip-7b] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_convert import run_measured  # noqa: E402

CLI = [sys.executable, "-c", "from release.cli import main; main()"]


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def ours(src: Path, out: Path, *extra: str) -> dict[str, float]:
    wall, rss, _ = run_measured([*CLI, "imatrix", str(src), "-o", str(out), "--force", "--quiet", *extra])
    from release.formats.imatrix import read

    im = read(out)
    tokens = im.chunk_count * im.chunk_size
    return {"seconds": round(wall, 1), "s_per_1000_tokens": round(wall * 1000 / tokens, 2),
            "peak_rss_gb": round(rss / 1e9, 2), "tokens": tokens}  # fmt: skip


def agreement(a: Path, b: Path) -> dict[str, float]:
    """Per weight, the correlation of log mean-square per column between two imatrix files."""
    import numpy as np

    from release.formats.imatrix import read

    x, y = read(a), read(b)
    common = sorted(set(x.sums) & set(y.sums))
    corr = []
    for n in common:
        u, v = np.log(x.values(n) + 1e-12), np.log(y.values(n) + 1e-12)
        corr.append(float(np.corrcoef(u, v)[0, 1]))
    return {"entries": len(common), "only_ours": len(set(x.sums) - set(y.sums)),
            "only_peer": len(set(y.sums) - set(x.sums)), "median_corr": float(np.median(corr)),
            "min_corr": float(np.min(corr))}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/model-release-imatrix"))
    ap.add_argument("--llama-cpp-tools", type=Path, default=os.environ.get("LLAMA_CPP_TOOLS"))
    ap.add_argument("--scale-workdir", type=Path, default=Path("/tmp/model-release-scale"))
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    from release import fixtures

    src = fixtures.smollm2().hf
    summary: dict[str, object] = {}
    print("SmolLM2-135M, built-in calibration text, 10 chunks of 512 tokens:")
    for mode in ("resident", "streamed"):
        r = ours(src, work / f"ours-{mode}.imatrix", "--forward", mode)
        summary[f"smollm2_{mode}"] = r
        print(f"  ours {mode:<9} {r['seconds']:6.1f} s, {r['s_per_1000_tokens']:5.2f} s per 1000 tokens, "
              f"peak {r['peak_rss_gb']} GB")  # fmt: skip

    tools = a.llama_cpp_tools
    if tools is not None and (tools / "llama-imatrix").is_file():
        from release.calibration import load_calibration_texts

        f16 = work / "m-F16.gguf"
        if not f16.is_file():
            subprocess.run([*CLI, "gguf", str(src), "-o", str(work), "-t", "F16", "--name", "m", "--quiet"], check=True)
        text = work / "calibration.txt"
        text.write_text("\n\n".join(load_calibration_texts(None)[2]), encoding="utf-8")
        peer_file = work / "peer.imatrix.gguf"
        cmd = [str(tools / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-o", str(peer_file), "-c", "512",
               "--chunks", "10", "-t", str(os.cpu_count() or 1), "--no-ppl"]  # fmt: skip
        wall, rss, _ = run_measured(cmd)
        o = summary["smollm2_resident"]
        assert isinstance(o, dict)
        agree = agreement(work / "ours-resident.imatrix", peer_file)
        print(f"  llama-imatrix (F16 GGUF) {wall:6.1f} s, peak {gb(rss)} GB; time ours/peer = "
              f"{o['seconds'] / wall:.2f}x, peak RSS ours/peer = {o['peak_rss_gb'] * 1e9 / rss:.2f}x")  # fmt: skip
        print(f"  agreement: {agree['entries']} common entries (ours only {agree['only_ours']}, peer only "
              f"{agree['only_peer']}); log mean-square per column correlates median {agree['median_corr']:.4f}, "
              f"min {agree['min_corr']:.4f}")  # fmt: skip
        # Interplay: llama.cpp's quantizer takes our file; ours takes theirs. Validate the results.
        q_ours_by_peer = work / "llama-quantize-with-ours-Q4_K_M.gguf"
        subprocess.run([str(tools / "llama-quantize"), "--imatrix", str(work / "ours-resident.imatrix"), str(f16),
                        str(q_ours_by_peer), "Q4_K_M"], check=True, capture_output=True)  # fmt: skip
        subprocess.run([*CLI, "gguf", str(src), "-o", str(work / "theirs"), "-t", "Q4_K_M", "--name", "m",
                        "--imatrix", str(peer_file), "--force", "--quiet"], check=True)  # fmt: skip
        ref = work / "ref.safetensors"
        if not ref.is_file():
            subprocess.run([*CLI, "reference", str(src), "-o", str(ref), "--quiet"], check=True)
        files = [q_ours_by_peer, work / "theirs" / "m-Q4_K_M.gguf"]
        p = subprocess.run([*CLI, "validate", *map(str, files), "-r", str(ref), "--json", "--quiet"],
                           capture_output=True, text=True)  # fmt: skip
        for v in json.loads(p.stdout)["variants"]:
            print(f"  {Path(v['variant']).name}: KL {v['metrics']['kl_mean']:.4f}, top-1 "
                  f"{v['metrics']['top1_agreement']:.3f}")  # fmt: skip
        summary["peer"] = {"seconds": round(wall, 1), "peak_rss_gb": round(rss / 1e9, 2), "agreement": agree}
    else:
        print("  (no --llama-cpp-tools: llama-imatrix comparison skipped)")

    if not a.skip_7b:
        from shaped_model import make

        big = a.scale_workdir / "llama2-7b-shaped"
        if not (big / "config.json").is_file():
            t0 = time.monotonic()
            make("llama2-7b", big)
            print(f"generated {big} in {time.monotonic() - t0:.0f} s", flush=True)
        r = ours(big, work / "7b.imatrix", "--chunks", "2", "--forward", "streamed")
        summary["llama2_7b_shaped_streamed"] = r
        print(f"Llama-2-7B-shaped, 2 chunks of 512 tokens, streamed: {r['seconds']:.1f} s, "
              f"{r['s_per_1000_tokens']:.1f} s per 1000 tokens, peak {r['peak_rss_gb']} GB")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
