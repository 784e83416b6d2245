"""Shared fixtures: tiny random Llama checkpoints in every input layout, and the real SmolLM2 model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from release.cli import app

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides: object) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


def tiny_state(cfg: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A real LlamaForCausalLM's state dict (names and shapes as transformers makes them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "torch_dtype"}))
    return {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items()}


def write_folder(
    path: Path,
    cfg: dict,
    state: dict[str, torch.Tensor],
    layout: str,
    *,
    tokenizer: bool = True,
) -> Path:
    """Write ``state`` as an HF folder. Layouts: st-single, st-sharded, bin-single, bin-sharded,
    pt-file, pth-wrapped, st-file. Returns what to pass as SRC."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    if tokenizer:
        (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
        (path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
        (path / "generation_config.json").write_text('{"bos_token_id": 1}')
    tied = cfg.get("tie_word_embeddings")
    st_state = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    names = sorted(state)
    half = names[: len(names) // 2], names[len(names) // 2 :]
    if layout == "st-single":
        save_file(st_state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    if layout == "st-file":
        save_file(st_state, str(path / "weights.safetensors"), metadata={"format": "pt"})
        return path / "weights.safetensors"
    if layout == "st-sharded":
        weight_map = {}
        for i, part in enumerate(half, 1):
            fname = f"model-{i:05d}-of-00002.safetensors"
            save_file({k: st_state[k] for k in part if k in st_state}, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part if k in st_state})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return path
    if layout == "bin-single":
        torch.save(state, path / "pytorch_model.bin")
        return path
    if layout == "bin-sharded":
        weight_map = {}
        for i, part in enumerate(half, 1):
            fname = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save({k: state[k] for k in part}, path / fname)
            weight_map.update(dict.fromkeys(part, fname))
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return path
    if layout == "pt-file":
        torch.save(state, path / "consolidated.pt")
        return path / "consolidated.pt"
    if layout == "pth-wrapped":
        torch.save({"state_dict": state}, path / "checkpoint.pth")
        return path / "checkpoint.pth"
    raise ValueError(layout)


@pytest.fixture
def tiny(tmp_path: Path) -> Callable[..., tuple[Path, dict, dict]]:
    """Factory: tiny(layout, **config overrides) -> (SRC, config, state)."""
    counter = [0]

    def make(layout: str = "st-single", *, dtype: torch.dtype = torch.bfloat16, tokenizer: bool = True, **cfg_over):
        counter[0] += 1
        cfg = tiny_config(**cfg_over)
        state = tiny_state(cfg, dtype)
        if cfg.get("tie_word_embeddings"):
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # shared, as torch.save stores it
        src = write_folder(tmp_path / f"src{counter[0]}", cfg, state, layout, tokenizer=tokenizer)
        return src, cfg, state

    return make


class Result:
    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


@pytest.fixture
def cli() -> Callable[..., Result]:
    """Run the CLI in-process (exit code, stdout, stderr separated)."""
    runner = CliRunner()

    def run(*args: object) -> Result:
        r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return Result(r.exit_code, r.stdout, r.stderr)

    return run


def run_subprocess(
    *args: object, preexec: Callable[[], None] | None = None, timeout: float = 300, **kw
) -> subprocess.CompletedProcess:
    """Run the installed CLI in a child process (for resource limits and real exit paths)."""
    code = "from release.cli import main; main()"
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        env=env,
        timeout=timeout,
        **kw,
    )


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct checkpoint (built once per machine, verified by hash). At the
    end of the session it must still match its hashes: a test that writes into the cache (a report
    beside the folder, say) would make every later build rebuild it."""
    from release import fixtures

    fixture = fixtures.smollm2()
    yield fixture
    assert fixtures.intact(fixture.root), f"a test wrote into the cached SmolLM2 fixture at {fixture.root}"


@pytest.fixture(scope="session")
def smollm2_reference(smollm2, tmp_path_factory):
    """Reference logits of the real model on the built-in evaluation set (built once per test run)."""
    from release.validation.reference import build_reference, load_reference

    path = tmp_path_factory.mktemp("reference") / "ref.safetensors"
    build_reference(smollm2.hf, path)
    return load_reference(path)


DEMO = "SmolLM2-135M-Instruct-demo"  # the demo release's name (examples/smollm2-release.yaml)


def demo_release_file(path: Path, **variants: object) -> Path:
    """examples/smollm2-release.yaml on the cached fixture, unsigned, with these variants beside
    the safetensors one."""
    import yaml

    data = yaml.safe_load((ROOT / "examples" / "smollm2-release.yaml").read_text())
    data["source"] = {"fixture": "smollm2"}
    data["variants"] = {"safetensors": {"dtype": "keep"}, **variants}
    data.pop("signing")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Demo:
    """A built release: its release file, ``dist`` (the -o folder), ``dir`` (DIST/<name>-<version>),
    the build's JSON summary and stderr, and the signing key pair."""

    rf: Path
    base: Path
    dist: Path
    dir: Path
    out: dict
    stderr: str
    seconds: float
    priv: Path
    pub: Path


@pytest.fixture(scope="session")
def demo_release(smollm2, tmp_path_factory) -> Demo:
    """The SmolLM2 demo release with every variant family (safetensors; GGUF Q8_0 and Q4_K_M, the
    latter with an importance matrix on 4 chunks; GPTQ 4-bit on 12 windows of 256 tokens), built
    and signed once per session the way CI runs it: `build --jobs 2 --json --quiet` in a child
    process. The pipeline, CI-output, Hub and GPTQ tests all read this one build (a full build is
    the suite's most expensive thing); a test that changes anything works on a copy."""
    from release.signing import keygen

    base = tmp_path_factory.mktemp("demo")
    rf = demo_release_file(base / "release.yaml", gguf={"types": ["Q8_0", "Q4_K_M"], "imatrix_chunks": 4},
                           gptq={"bits": 4, "samples": 12, "seq_len": 256})  # fmt: skip
    priv, pub = keygen(base / "keys")
    started = time.monotonic()
    b = run_subprocess("build", rf, "-o", base / "dist", "--key", priv, "--jobs", 2, "--json", "--quiet", timeout=900)
    seconds = time.monotonic() - started
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    out = json.loads(b.stdout)
    return Demo(rf, base, base / "dist", Path(out["release_dir"]), out, b.stderr, seconds, priv, pub)


@pytest.fixture(scope="session")
def smollm2_gptq(demo_release, tmp_path_factory) -> SimpleNamespace:
    """The demo release's GPTQ 4-bit variant of the real model (built-in calibration, 12 windows of
    256 tokens), copied out so that validating it writes no report into the release."""
    rec = json.loads((demo_release.dir / ".steps" / "gptq.json").read_text())
    out = tmp_path_factory.mktemp("gptq") / "gptq"
    shutil.copytree(demo_release.dir / f"{DEMO}-GPTQ", out)
    return SimpleNamespace(output=str(out), variant=rec["output"]["variant"])


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a failed run must not leave behind."""
    return [p.name for p in parent.rglob("*") if any(m in p.name for m in (".partial-", ".old-", ".model-release-"))]
