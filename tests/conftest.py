"""Shared fixtures: tiny random Llama checkpoints in every input layout, and the real SmolLM2 model.

The suite runs on two pytest-xdist workers (`make test`): each worker and every process it starts
gets one thread (below, before torch is imported), the expensive session fixtures (the reference
logits, the demo release) are built once per run by whichever worker asks first and read by the
other (``once_per_run``), and ``pytest_xdist_make_scheduler`` hands out the costliest work first."""

from __future__ import annotations

import gc
import json
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: torch, llama.cpp and GPTQModel each default to every core, and two
    # workers doing so oversubscribe the machine (spinning thread pools: slower than one worker).
    # Inherited by every step a test's build starts; release.resources.cpu_threads reads it too.
    os.environ["OMP_NUM_THREADS"] = "1"
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
from filelock import FileLock
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
    *args: object,
    preexec: Callable[[], None] | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    **kw,
) -> subprocess.CompletedProcess:
    """Run the installed CLI in a child process (for resource limits and real exit paths), with
    ``env`` added to this process's environment."""
    code = "from release.cli import main; main()"
    env = {**os.environ, "COLUMNS": "200", **(env or {})}
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


# Seconds each unit of work took (setup + call) in a serial run on this 2-core machine, measured
# 2026-12-03: the scheduler hands out the costliest first, so the last minutes are not one worker
# alone on a long file. A file with module-scoped fixtures is one unit; any other test is its own.
# Unlisted units count as 1 s. The demo release is built by the first test that asks (test_gptq's).
# test_cluster.py is listed below test_imatrix.py and test_hub.py (its 170 s are mostly waits on Ray)
# so that it is handed out after the demo build it starts from: listed above them, it went to the
# other worker at 115 s and waited 30 s for that build (2026-12-06).
COSTS = {
    "tests/test_gptq.py": 480, "tests/test_architectures.py": 320, "tests/test_imatrix.py": 170,
    "tests/test_hub.py": 160, "tests/test_gguf.py": 100, "tests/test_tokenizers.py": 80,
    "tests/test_validate.py": 45, "tests/test_real_model.py": 26, "tests/test_cluster.py": 155,
    "tests/test_pipeline.py::test_killed_during_gguf_resumes_to_the_same_outputs": 150,
    "tests/test_scale.py::test_gguf_split_set_loads_in_llama_cpp_as_one_variant": 42,
    "tests/test_scale.py::test_streamed_memory_is_one_layer_not_the_model": 20,
    "tests/test_provenance.py::test_reproduce_gptq_byte_identical_on_the_cpu": 80,
    "tests/test_release_workflow.py": 110,
    "tests/test_provenance.py::test_reproduce_gguf_byte_identical_and_a_tampered_tensor_named": 65,
}  # fmt: skip
WHOLE_FILES = {"test_architectures.py", "test_cluster.py", "test_gguf.py", "test_gptq.py", "test_hub.py",
               "test_imatrix.py", "test_real_model.py", "test_release_workflow.py", "test_tokenizers.py",
               "test_validate.py"}  # fmt: skip


def work_unit(nodeid: str) -> str:
    """What one worker runs together: a file with module-scoped fixtures (built once), else one test."""
    file = nodeid.split("::", 1)[0]
    return file if Path(file).name in WHOLE_FILES else nodeid


def _cost(nodeid: str) -> float:
    unit = work_unit(nodeid)
    return COSTS.get(unit, COSTS.get(unit.split("[", 1)[0], 1))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before each test: collect, then freeze what lives (torch, transformers, llama.cpp's bindings,
    the session's fixtures), so that a full collection during the test walks only what the test
    made, not the half a million objects those libraries hold. Collected first, so no garbage is
    kept. Measured on test_gguf.py + test_tokenizers.py: 105.8 s -> 95.2 s, GC 12.6 s -> 4.8 s."""
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Costliest units first (a stable sort: a unit's tests stay in their order). Every xdist worker
    collects in this order, and the scheduler below queues the units as they first appear."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: -_cost(item.nodeid))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class CostlyFirst(LoadScopeScheduling):
        """xdist's scope scheduling over ``work_unit``s, in collection (cost) order."""

        def __init__(self, config: pytest.Config, log: object = None) -> None:
            super().__init__(config, log)
            config.option.loadscopereorder = False  # keep the cost order, not the test-count order

        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return CostlyFirst(config, log)


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], dict]) -> dict:
    """``make(folder)`` once per test run, whichever xdist worker asks first (the others wait on a
    lock, then read its JSON result); without xdist, once per session. A failed build is retried by
    the next asker."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / f"once-{name}"
    with FileLock(f"{root}.lock"):
        done = root / "result.json"
        if done.is_file():
            return json.loads(done.read_text())
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        result = make(root)
        done.write_text(json.dumps(result))
        return result


@pytest.fixture(scope="session")
def smollm2_reference(smollm2, tmp_path_factory):
    """Reference logits of the real model on the built-in evaluation set (built once per test run)."""
    from release.validation.reference import build_reference, load_reference

    def make(folder: Path) -> dict:
        build_reference(smollm2.hf, folder / "ref.safetensors")
        return {"path": str(folder / "ref.safetensors")}

    return load_reference(Path(once_per_run(tmp_path_factory, "reference", make)["path"]))


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


_DEMO_PATHS = ("rf", "base", "dist", "dir", "priv", "pub")  # the Demo fields that are paths


@pytest.fixture(scope="session")
def demo_release(smollm2, tmp_path_factory) -> Demo:
    """The SmolLM2 demo release with every variant family (safetensors; GGUF Q8_0 and Q4_K_M, the
    latter with an importance matrix on 4 chunks; GPTQ 4-bit on 12 windows of 256 tokens), built
    and signed once per session the way CI runs it: `build --jobs 2 --json --quiet` in a child
    process. The pipeline, CI-output, Hub and GPTQ tests all read this one build (a full build is
    the suite's most expensive thing); a test that changes anything works on a copy."""
    from release.signing import keygen

    def make(base: Path) -> dict:
        rf = demo_release_file(base / "release.yaml", gguf={"types": ["Q8_0", "Q4_K_M"], "imatrix_chunks": 4},
                               gptq={"bits": 4, "samples": 12, "seq_len": 256})  # fmt: skip
        priv, pub = keygen(base / "keys")
        started = time.monotonic()
        b = run_subprocess("build", rf, "-o", base / "dist", "--key", priv, "--jobs", 2, "--json", "--quiet",
                           timeout=1500)  # fmt: skip
        seconds = time.monotonic() - started
        assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
        out = json.loads(b.stdout)
        paths = dict(zip(_DEMO_PATHS, (rf, base, base / "dist", out["release_dir"], priv, pub), strict=True))
        return {**{k: str(v) for k, v in paths.items()}, "out": out, "stderr": b.stderr, "seconds": seconds}

    d = once_per_run(tmp_path_factory, "demo", make)  # JSON: the paths come back as strings
    return Demo(**{k: Path(v) if k in _DEMO_PATHS else v for k, v in d.items()})


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


def one_step_build(root: Path, name: str, argv: list[str]) -> str:
    """Python code that runs one step (``argv``; its log ROOT/logs/NAME.log) through the local
    executor and the scheduler, as a build does: what the tests that kill a build start."""
    return f"""
from pathlib import Path
from release.pipeline.local import LocalExecutor
from release.pipeline.records import Records
from release.pipeline.schedule import run_plan
from release.pipeline.steps import Plan, Step
from release.resources import Need
root = Path({str(root)!r})
(root / "logs").mkdir()
steps = [Step({name!r}, "release", {[str(a) for a in argv]!r}, {{}}, [], list, Need(ram=1))]
run_plan(Plan(root, steps, []), Records(root), LocalExecutor(), logs=root / "logs", jobs=1, budget=1 << 40)
"""


def gone_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` ends within ``seconds`` (polled every 0.1 s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
