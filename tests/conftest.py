"""Shared fixtures: tiny random Llama checkpoints in every input layout, and the real SmolLM2 model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

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


def run_subprocess(*args: object, preexec: Callable[[], None] | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the installed CLI in a child process (for resource limits and real exit paths)."""
    code = "from release.cli import main; main()"
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        preexec_fn=preexec,
        env=env,
        timeout=300,
        **kw,
    )


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct checkpoint (built once per machine, verified by hash)."""
    from release import fixtures

    return fixtures.smollm2()


@pytest.fixture(scope="session")
def smollm2_reference(smollm2, tmp_path_factory):
    """Reference logits of the real model on the built-in evaluation set (built once per test run)."""
    from release.validation.reference import build_reference, load_reference

    path = tmp_path_factory.mktemp("reference") / "ref.safetensors"
    build_reference(smollm2.hf, path)
    return load_reference(path)


@pytest.fixture(scope="session")
def smollm2_gptq(smollm2, tmp_path_factory):
    """A GPTQ 4-bit variant of the real model (built-in calibration, 12 windows of 256 tokens)."""
    from release.formats.gptq import GPTQSettings, quantize
    from release.metadata import ReleaseMetadata

    meta = ReleaseMetadata(name="SmolLM2-135M-Instruct", version="1.0", license="apache-2.0")
    out = tmp_path_factory.mktemp("gptq") / "gptq"
    return quantize(smollm2.hf, out, GPTQSettings(samples=12, seq_len=256), metadata=meta)


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a failed run must not leave behind."""
    return [p.name for p in parent.rglob("*") if any(m in p.name for m in (".partial-", ".old-", ".model-release-"))]
