"""Benchmark `model-release convert` against `cp` and against transformers, in one run.

Builds a synthetic checkpoint with Llama-2-7B tensor shapes (embeddings 32000x4096, attention
4096x4096, MLP 11008x4096; fewer layers so it fits a small machine), sharded like a Hub download,
then times, each in a child process whose peak RSS is read with wait4():

  cp          cp -r of the same folder (and cp -r + sync, since convert fsyncs what it writes)
  convert     model-release convert SRC -o OUT (--dtype keep): read, check, write, read back, verify
  peer        transformers from_pretrained(SRC) + save_pretrained(OUT)

Prints throughput ratios and peak RSS against the largest tensor. Usage:
    python bench/bench_convert.py [--layers 6] [--source safetensors|bin] [--repeat 2] [--json]
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
import torch

HIDDEN, INTER, VOCAB, HEADS = 4096, 11008, 32000, 32


def llama7b_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def random_bf16(shape: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
    """Finite bf16 values at memory speed (|x| < 2: exponent bits kept below the inf/nan pattern)."""
    bits = rng.integers(0, 1 << 16, size=int(np.prod(shape)), dtype=np.uint16) & np.uint16(0xBFFF)
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).reshape(shape)


def build(folder: Path, layers: int, source: str, shard_bytes: int = 2 * 10**9) -> None:
    if (folder / "config.json").exists():
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = llama7b_shapes(layers)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(groups, 1):
        tensors = {n: random_bf16(shapes[n], rng) for n in names}
        if source == "bin":
            fname = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
            torch.save(tensors, tmp / fname)
        else:
            from safetensors.torch import save_file

            fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
        del tensors
    index = "pytorch_model.bin.index.json" if source == "bin" else "model.safetensors.index.json"
    (tmp / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(folder)


# ru_maxrss of a child includes the RSS its parent had when it forked (Linux carries the high-water
# mark across exec), so measured commands are started by this small launcher, not by the bench process.
LAUNCHER = """
import json, os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall": time.perf_counter() - t, "rss": usage.ru_maxrss * 1024,
                  "cpu": usage.ru_utime + usage.ru_stime,
                  "code": os.waitstatus_to_exitcode(status)}))
"""


def run_measured(cmd: list[str]) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, CPU seconds) of a command; fails loudly on a non-zero exit."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, check=False)
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        res = {"code": -1}
    if res["code"] != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr[-2000:]}")
    return res["wall"], res["rss"], res["cpu"]


PEER = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
m.save_pretrained(sys.argv[2], max_shard_size="5GB")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6, help="Llama-7B-shaped layers (6 -> 2.95 GB)")
    ap.add_argument("--source", choices=["safetensors", "bin"], default="safetensors")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each; the best time is reported")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "model-release-bench")
    ap.add_argument("--no-peer", action="store_true", help="skip the transformers round trip")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    src = args.workdir / f"llama7b-shapes-{args.layers}l-{args.source}"
    print(f"building synthetic checkpoint at {src} ...", file=sys.stderr)
    build(src, args.layers, args.source)
    shapes = llama7b_shapes(args.layers)
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    largest = max(int(np.prod(s)) * 2 for s in shapes.values())
    dst = args.workdir / "out"

    def fresh() -> None:
        shutil.rmtree(dst, ignore_errors=True)
        subprocess.run(["sync"], check=True)

    cli = [sys.executable, "-c", "from release.cli import main; main()"]
    commands = {
        "cp": ["cp", "-r", str(src), str(dst)],
        "cp+sync": ["sh", "-c", f"cp -r '{src}' '{dst}' && sync"],
        "convert": [*cli, "convert", str(src), "-o", str(dst), "--quiet"],
    }
    if not args.no_peer:
        commands["transformers"] = [sys.executable, "-c", PEER, str(src), str(dst)]
    # Rounds interleave the tools, so slow phases of this machine's disk hit all of them alike.
    best: dict[str, tuple[float, int, float]] = {}
    for _ in range(args.repeat):
        for name, cmd in commands.items():
            fresh()
            run = run_measured(cmd)
            if name not in best or run[0] < best[name][0]:
                best[name] = run
    fresh()
    results = {
        name: {"seconds": w, "gb_per_s": total / w / 1e9, "peak_rss_mb": rss / 1e6, "cpu_seconds": cpu}
        for name, (w, rss, cpu) in best.items()
    }

    bound = 2 * largest + 300e6
    summary = {
        "source": args.source,
        "layers": args.layers,
        "total_gb": total / 1e9,
        "largest_tensor_mb": largest / 1e6,
        "rss_bound_mb": bound / 1e6,
        "results": results,
        "convert_vs_cp": results["convert"]["gb_per_s"] / results["cp"]["gb_per_s"],
        "convert_vs_cp_sync": results["convert"]["gb_per_s"] / results["cp+sync"]["gb_per_s"],
        "convert_rss_vs_bound": results["convert"]["peak_rss_mb"] * 1e6 / bound,
    }
    if "transformers" in results:
        summary["convert_vs_transformers_speed"] = results["convert"]["gb_per_s"] / results["transformers"]["gb_per_s"]
        summary["transformers_rss_vs_bound"] = results["transformers"]["peak_rss_mb"] * 1e6 / bound
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"synthetic Llama-7B-shaped checkpoint: {args.layers} layers, {total / 1e9:.2f} GB {args.source}, "
        f"largest tensor {largest / 1e6:.0f} MB; RSS bound 2x largest + 300 MB = {bound / 1e6:.0f} MB"
    )
    print(f"{'tool':<14}{'seconds':>9}{'GB/s':>8}{'CPU s':>8}{'peak RSS MB':>13}")
    for name, r in results.items():
        print(f"{name:<14}{r['seconds']:>9.2f}{r['gb_per_s']:>8.2f}{r['cpu_seconds']:>8.2f}{r['peak_rss_mb']:>13.0f}")
    print(f"convert throughput / cp         = {summary['convert_vs_cp']:.2f}x (target >= 0.8x)")
    print(f"convert throughput / cp+sync    = {summary['convert_vs_cp_sync']:.2f}x")
    print(f"convert peak RSS / bound        = {summary['convert_rss_vs_bound']:.2f} (target < 1)")
    if "transformers" in results:
        print(f"convert / transformers speed    = {summary['convert_vs_transformers_speed']:.2f}x")
        print(f"transformers peak RSS / bound   = {summary['transformers_rss_vs_bound']:.2f}")


if __name__ == "__main__":
    main()
