"""Past one machine, measured on this one (issue 22).

1. ``cluster``: the SmolLM2 release (safetensors; GGUF Q8_0 and Q4_K_M with an importance matrix on 4
   chunks; reference and validations) built by ``build --executor ray`` on a two-node Ray cluster
   started here (``ray.cluster_utils.Cluster``, one CPU a node) against ``build --executor local
   --jobs 2``, one thread a step in both, interleaved rounds: wall time, steps per node, and whether
   every weight file is the same.
2. ``shared``: GGUF Q4_K_M, Q5_K_M and Q3_K_M of a Llama-2-7B-shaped checkpoint (bench/shaped_model.py;
   ``--layers`` of its 32), the way the build made them before this change (one ``gguf -t TYPE`` run
   per type, each writing its own lossless BF16 intermediate) and now (one ``lossless-gguf`` step,
   then ``gguf --intermediate`` per type): wall time and bytes written, and whether the files match.
3. ``needs``: what each step of a 7B and a 70B release needs (threads, memory, GPU memory, disk),
   from ``build --dry-run`` on header-only checkpoints of those shapes (sparse files: no data).

    python bench/bench_cluster.py [cluster|shared|needs ...] [--rounds 2] [--layers 32] [--workdir DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from shaped_model import make  # noqa: E402

CLI = [sys.executable, "-m", "release.cli"]
NAME = "SmolLM2-135M-Instruct-demo"
WEIGHTS = (f"{NAME}/model.safetensors", f"{NAME}-GGUF/{NAME}-Q8_0.gguf", f"{NAME}-GGUF/{NAME}-Q4_K_M.gguf",
           f"{NAME}-GGUF/{NAME}.imatrix", ".work/reference.safetensors")  # fmt: skip


def _run(cmd: list[object], env: dict[str, str] | None = None) -> tuple[float, dict]:
    t0 = time.monotonic()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.monotonic() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:6]))} failed ({r.returncode}): {r.stderr[-2000:]}{r.stdout[-2000:]}")
    return wall, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else {})


def bench_cluster(work: Path, rounds: int) -> dict:
    from ray.cluster_utils import Cluster

    from tests.conftest import demo_release_file

    work.mkdir(parents=True, exist_ok=True)
    rf = demo_release_file(work / "release.yaml", gguf={"types": ["Q8_0", "Q4_K_M"], "imatrix_chunks": 4})
    common = ["build", rf, "--only", "safetensors,gguf", "--threads", 1, "--json", "--quiet"]
    args = {"num_cpus": 1, "memory": 6 << 30, "object_store_memory": 100 << 20}
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    cluster.add_node(**args)
    cluster.wait_for_nodes()
    started = time.monotonic() - t0
    rows: dict[str, list[float]] = {"local": [], "ray": []}
    per_node: dict[str, int] = {}
    same = True
    try:
        for i in range(rounds):
            for kind in ("local", "ray"):
                out = work / f"{kind}-{i}"
                shutil.rmtree(out, ignore_errors=True)
                extra = ["--executor", kind] + (["--jobs", 2] if kind == "local" else [])
                wall, res = _run([*CLI, *common, "-o", out, *extra], {"RAY_ADDRESS": cluster.address})
                rows[kind].append(wall)
                print(f"round {i + 1}: {kind:5s} {wall:6.1f} s", flush=True)
                if kind == "ray":
                    for s in res["steps"]:
                        per_node[s["node"]] = per_node.get(s["node"], 0) + 1
            a, b = (Path(_release_dir(work / f"{k}-{i}")) for k in ("local", "ray"))
            same &= all((a / w).read_bytes() == (b / w).read_bytes() for w in WEIGHTS)
    finally:
        cluster.shutdown()
    best = {k: min(v) for k, v in rows.items()}
    print(f"two-node cluster up in {started:.1f} s; best of {rounds}: local --jobs 2 {best['local']:.1f} s, "
          f"ray 2 nodes {best['ray']:.1f} s, ratio ray/local {best['ray'] / best['local']:.2f}; "
          f"steps per node (all rounds) {per_node}; every weight file identical: {same}")  # fmt: skip
    return {"cluster_start_s": round(started, 1), "local_s": rows["local"], "ray_s": rows["ray"],
            "ratio": round(best["ray"] / best["local"], 2), "steps_per_node": per_node, "identical": same}  # fmt: skip


def _release_dir(out: Path) -> str:
    return str(next(p for p in out.iterdir() if p.is_dir()))


def bench_shared(work: Path, layers: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"llama2-7b-{layers}L"
    if not (src / "config.json").is_file():
        print(f"writing a Llama-2-7B-shaped checkpoint with {layers} layers to {src} ...", flush=True)
        make("llama2-7b", src, layers=layers)
    types = ["Q4_K_M", "Q5_K_M", "Q3_K_M"]
    base = ["gguf", src, "--name", "m", "--imatrix", "none", "--license", "apache-2.0", "--json", "--quiet"]
    before_dir, after_dir, inter_dir = work / "before", work / "after", work / "inter"
    for d in (before_dir, after_dir, inter_dir):
        shutil.rmtree(d, ignore_errors=True)
    before = {}
    for t in types:  # one run per type, each writing (and deleting) its own BF16 intermediate
        before[t], _ = _run([*CLI, *base, "-o", before_dir, "-t", t])
        print(f"before: {t} {before[t]:.1f} s", flush=True)
    inter_s, _ = _run([*CLI, *base, "-o", inter_dir, "-t", "BF16"])
    inter = inter_dir / "m-BF16.gguf"
    after = {}
    for t in types:
        after[t], _ = _run([*CLI, *base, "-o", after_dir, "-t", t, "--intermediate", inter])
        print(f"after:  {t} {after[t]:.1f} s (from the shared intermediate)", flush=True)
    outs = {t: (after_dir / f"m-{t}.gguf").stat().st_size for t in types}
    inter_bytes = inter.stat().st_size
    same = all((before_dir / f"m-{t}.gguf").read_bytes() == (after_dir / f"m-{t}.gguf").read_bytes() for t in types)
    written_before = len(types) * inter_bytes + sum(outs.values())
    written_after = inter_bytes + sum(outs.values())
    t_before, t_after = sum(before.values()), inter_s + sum(after.values())
    print(f"7B-shaped ({layers} of 32 layers), {', '.join(types)}: before {t_before:.0f} s and "
          f"{written_before / 1e9:.2f} GB written; after {t_after:.0f} s (intermediate {inter_s:.0f} s) and "
          f"{written_after / 1e9:.2f} GB written (ratio {t_after / t_before:.2f} time, "
          f"{written_after / written_before:.2f} bytes); files identical: {same}")  # fmt: skip
    return {"layers": layers, "before_s": before, "after_s": after, "intermediate_s": round(inter_s, 1),
            "intermediate_bytes": inter_bytes, "outputs_bytes": outs, "written_before": written_before,
            "written_after": written_after, "identical": same}  # fmt: skip


NEEDS_RELEASE = """release:
  name: {name}
  version: "0.1"
  license: apache-2.0
  repo_url: https://huggingface.co/example/{name}
  description: header-only {name} (bench_cluster needs).
  base_models: []
source:
  path: {src}
variants:
  safetensors: {{dtype: keep}}
  gguf: {{types: [Q8_0, Q4_K_M, Q5_K_M, Q3_K_M]}}
  gptq: {{bits: 4}}
evaluation:
  max_tokens: 512
"""


def bench_needs(work: Path, threads: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for shape in ("llama2-7b", "llama2-70b"):
        src = work / f"{shape}-headers"
        if not (src / "config.json").is_file():
            make(shape, src, headers_only=True)
        rf = work / f"{shape}.yaml"
        rf.write_text(NEEDS_RELEASE.format(name=f"{shape}-shaped", src=src))
        r = subprocess.run([*CLI, "build", str(rf), "-o", str(work / "dist"), "--dry-run", "--json", "--threads",
                            str(threads), "--device", "cpu"], capture_output=True, text=True)  # fmt: skip
        plan = json.loads(r.stdout)
        refused = f": {plan['refused']}" if plan["refused"] else ""
        print(f"\n{shape} ({threads} threads a step, CPU; exit {r.returncode}{refused})")
        print(f"{'step':24s} {'memory':>9s} {'GPU':>9s} {'disk':>9s}")
        for s in plan["steps"]:
            gpu = f"{s['gpu'] / 1e9:.1f} GB" if s["gpu"] else "-"
            print(f"{s['name']:24s} {s['ram'] / 1e9:6.1f} GB {gpu:>9s} {s['disk'] / 1e9:6.1f} GB")
        out[shape] = plan["steps"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", default=["cluster", "shared", "needs"], choices=["cluster", "shared", "needs"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=32, help="of the 7B shape's 32, for `shared`")
    ap.add_argument("--threads", type=int, default=8, help="a step's threads, for `needs`")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/model-release-cluster"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    if "cluster" in a.parts:
        results["cluster"] = bench_cluster(a.workdir / "cluster", a.rounds)
    if "shared" in a.parts:
        results["shared"] = bench_shared(a.workdir / "shared", a.layers)
    if "needs" in a.parts:
        results["needs"] = bench_needs(a.workdir / "needs", a.threads)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
