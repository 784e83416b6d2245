"""A source checkpoint: where its weights, config and tokenizer are, and which tensors it holds.

``open_checkpoint`` accepts what people actually have: an HF folder with safetensors or ``.bin``
shards (with or without an index), or a single state-dict file next to a ``config.json``. It reads
headers only; tensor data stay on disk until a writer asks for them, one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from release import TOOL_NAME, hashing
from release.architectures import Architecture, resolve
from release.checkpoint_files import natural_key, read_json, weight_files
from release.datafiles import data_file
from release.errors import BadInputError
from release.tensors import TensorFile, TensorRef, TorchPickleFile, open_tensor_file, tensor_bytes


@dataclass
class Dropped:
    name: str
    reason: str


@dataclass
class Checkpoint:
    """An opened source. Use as a context manager; ``close()`` unmaps every file."""

    root: Path
    layout: str  # hf-sharded | hf-single | state-dict-file
    format: str  # safetensors | pytorch
    config: dict[str, Any]
    files: list[TensorFile]
    refs: dict[str, TensorRef] = field(default_factory=dict)
    _file_of: dict[str, TensorFile] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in self.files:
            for name, ref in f.refs.items():
                if name in self._file_of:
                    raise BadInputError(
                        f"tensor {name!r} is stored twice ({self._file_of[name].path.name}, {f.path.name})"
                    )
                self._file_of[name] = f
                self.refs[name] = ref

    def open(self, ref: TensorRef) -> AbstractContextManager[torch.Tensor]:
        return self._file_of[ref.name].open(ref)

    def raw_range(self, ref: TensorRef) -> tuple[int, int] | None:
        return self._file_of[ref.name].raw_range(ref)

    def recorded_origin(self) -> str | None:
        """The oldest checkpoint hash a model-release output records about where it came from."""
        meta = self.files[0].metadata if self.files else {}
        if not str(meta.get("producer", "")).startswith(TOOL_NAME):
            return None
        return hashing.origin_hash(meta)

    def file_of(self, name: str) -> TensorFile:
        return self._file_of[name]

    def extra_files(self) -> list[Path]:
        """Config-side files present in the source (tokenizer, generation config, chat template)."""
        names = data_file("checkpoint_files.json")["copy"]
        return [self.root / n for n in names if (self.root / n).is_file()]

    def has_tokenizer(self) -> bool:
        names = data_file("checkpoint_files.json")["tokenizer"]
        return any((self.root / n).is_file() for n in names)

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.refs.values())

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(src: Path) -> Checkpoint:
    """Open a checkpoint folder or a single state-dict file; reads headers only."""
    src = Path(src)
    if not src.exists():
        raise BadInputError(f"{src}: no such file or directory")
    weight_map = None
    if src.is_file():
        root, layout, paths = src.parent, "state-dict-file", [src]
    else:
        root = src
        layout, paths, weight_map = weight_files(root)
    config = read_json(root / "config.json", "config.json (the model's configuration)")
    if not isinstance(config, dict):
        raise BadInputError(f"{root / 'config.json'}: not a JSON object")
    files: list[TensorFile] = []
    try:
        for p in paths:
            files.append(open_tensor_file(p))
        ckpt = Checkpoint(root, layout, files[0].format, config, files)
    except BaseException:
        for f in files:
            f.close()
        raise
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in ckpt.refs or ckpt.file_of(name).path.name != fname:
                ckpt.close()
                raise BadInputError(f"{root}: tensor {name!r} is listed in the index under {fname} but is not there")
    return ckpt


@dataclass
class TensorPlan:
    """What a converter must write: the canonical tensors, in order, and what it leaves out."""

    architecture: Architecture
    tensors: list[TensorRef]
    dropped: list[Dropped]
    tied_pairs: list[tuple[str, str]]  # (dropped duplicate, kept original) to check equal

    @property
    def parameters(self) -> int:
        return sum(r.numel for r in self.tensors)


def plan_tensors(ckpt: Checkpoint) -> TensorPlan:
    """Check the source's tensors against its architecture and decide what to keep.

    Missing tensors, unexpected tensors and wrong shapes are bad input. A tied duplicate (e.g.
    ``lm_head.weight`` when ``tie_word_embeddings`` is true) is dropped, as transformers saves it,
    after checking it equals the tensor it is tied to.
    """
    arch = resolve(ckpt.config)
    expected = arch.expected()
    keep: list[TensorRef] = []
    dropped: list[Dropped] = []
    tied: list[tuple[str, str]] = []
    unexpected: list[str] = []
    for name, ref in ckpt.refs.items():
        exp = expected.get(name)
        if exp is None:
            reason = arch.ignored_reason(name)
            if reason:
                dropped.append(Dropped(name, reason))
            else:
                unexpected.append(name)
            continue
        if ref.shape != exp.shape:
            raise BadInputError(f"tensor {name} has shape {list(ref.shape)}, config.json implies {list(exp.shape)}")
        if exp.tied_to:
            dropped.append(Dropped(name, f"tied to {exp.tied_to} (tie_word_embeddings)"))
            tied.append((name, exp.tied_to))
            continue
        keep.append(ref)
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise BadInputError(
            f"tensors not part of {arch.spec['architectures'][0]}: {', '.join(sorted(unexpected)[:3])}{more}",
            hint="is config.json the right one for these weights?",
        )
    missing = [n for n, e in expected.items() if n not in ckpt.refs and not e.tied_to]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        hint = None
        if "lm_head.weight" in missing:
            hint = "lm_head.weight is absent: if it shares embed_tokens, set tie_word_embeddings: true"
        raise BadInputError(f"missing tensors: {', '.join(missing[:3])}{more}", hint=hint)
    keep.sort(key=lambda r: natural_key(r.name))
    return TensorPlan(arch, keep, dropped, tied)


def check_tied(ckpt: Checkpoint, plan: TensorPlan) -> None:
    """A tied duplicate may only be dropped when it really is a copy."""
    for dup, orig in plan.tied_pairs:
        f = ckpt.file_of(dup)
        if isinstance(f, TorchPickleFile) and f is ckpt.file_of(orig) and f.shares_storage(dup, orig):
            continue
        a, b = ckpt.refs[dup], ckpt.refs[orig]
        if a.dtype != b.dtype:
            raise BadInputError(f"{dup} and {orig} are tied in config.json but have dtypes {a.dtype} and {b.dtype}")
        with ckpt.open(a) as ta, ckpt.open(b) as tb:
            same = torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)) if a.nbytes else True
        if not same:
            raise BadInputError(
                f"config.json ties {dup} to {orig}, but the stored tensors differ",
                hint="set tie_word_embeddings: false in config.json if the model has its own output layer",
            )


def iter_with_digests(ckpt: Checkpoint, refs: list[TensorRef]) -> Iterator[tuple[TensorRef, str]]:
    """Yield each tensor's BLAKE3 digest, one tensor mapped at a time."""
    for ref in refs:
        with ckpt.open(ref) as t:
            yield ref, hashing.tensor_digest(tensor_bytes(t))
