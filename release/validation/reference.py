"""Reference log-probabilities of the source model, stored once, compared with every variant.

Like llama.cpp's ``llama-perplexity --kl-divergence-base``, but compact: full log-softmax rows
of a 49k or 32k vocabulary are 64-100 kB per token in float16, so we keep, per predicted token,
the reference's top-k token ids and log-probs (float32) plus, implicitly, the rest mass
``1 - sum(top-k)``. KL is then computed over k+1 buckets (top-k tokens and "everything else"),
a lower bound of the full KL that is tight when the top-k holds nearly all the mass (k=64 holds
>= 0.97 of it on SmolLM2 for the built-in set; the file reports the mean rest mass). The log-prob
of the actual next token is kept too, for perplexity. 1200 tokens at k=64 take 0.6 MB.

The file is one safetensors file: tensors ``input_ids`` (int32, all prompts concatenated),
``offsets`` (int64, prompt boundaries), ``topk_ids`` (int32 [N, k]), ``topk_logprobs`` (float32
[N, k]), ``target_logprobs`` (float32 [N]) for the N = sum(len - 1) predicted positions; and
``__metadata__`` with the source checkpoint hash, tokenizer hash, prompt-set hash and sizes, and
the tokenizer check's probes with the source tokenizer's ids (``release.validation.tokenizer``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from release import __version__
from release.atomic import atomic_file
from release.checkpoint import open_checkpoint, plan_tensors
from release.choices import TOP_K
from release.errors import BadInputError
from release.formats.safetensors import save_small
from release.forward import open_forward
from release.inspect import describe_open
from release.progress import NULL, Reporter
from release.validation import tokenizer as tokenizer_check

FORMAT = "model-release-reference"
FORMAT_VERSION = "1"
_ROWS = 128  # predicted positions per log-softmax chunk
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Prompt:
    id: str
    kind: str
    text: str


def load_prompts(path: Path | None = None) -> tuple[list[Prompt], str, str]:
    """(prompts, name, sha256 of their canonical JSON). Default: the built-in set in release/data/eval."""
    if path is None:
        from importlib import resources

        raw = resources.files("release").joinpath("data", "eval", "default.jsonl").read_text(encoding="utf-8")
        name = "built-in:default"
    else:
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise BadInputError(f"{path}: cannot read prompts ({exc.strerror})") from None
        name = str(path)
    prompts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            prompts.append(Prompt(str(obj.get("id", n)), str(obj.get("kind", "")), str(obj["text"])))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise BadInputError(f"{name}: line {n} is not a JSON object with a 'text' field") from None
    if not prompts:
        raise BadInputError(f"{name}: no prompts")
    canon = json.dumps([asdict(p) for p in prompts], sort_keys=True, ensure_ascii=False).encode()
    return prompts, name, hashlib.sha256(canon).hexdigest()


def tokenizer_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        p = folder / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def source_tokenizer(src: Path) -> Any:
    """The source's own tokenizer, as transformers loads it (what the source's users run)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress goes to stderr; theirs would interleave
    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{src}: transformers cannot load its tokenizer ({str(exc).splitlines()[0]})") from None


def _encode(tok: Any, prompts: list[Prompt], max_tokens: int) -> list[list[int]]:
    """The prompts' token ids by the source's own tokenizer, each cut to ``max_tokens``."""
    encoded = []
    for p in prompts:
        ids = list(tok.encode(p.text))[:max_tokens]
        if len(ids) < 2:
            raise BadInputError(f"prompt {p.id!r} has fewer than 2 tokens")
        encoded.append(ids)
    return encoded


@dataclass
class ReferenceResult:
    output: str
    source: str
    source_checkpoint_hash: str
    prompts: str
    prompt_count: int
    predicted_tokens: int
    top_k: int
    mean_rest_mass: float
    perplexity: float
    seconds: float
    seconds_per_1000_tokens: float
    forward: str = "resident"
    device: str = "cpu"
    forward_reason: str = ""
    tokenizer_probes: int = 0
    probes_skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **asdict(self)}


def build_reference(
    src: Path,
    out: Path,
    *,
    prompts_file: Path | None = None,
    max_tokens: int = 512,
    top_k: int = TOP_K,
    device: str = "cpu",
    forward: str = "auto",
    force: bool = False,
    reporter: Reporter = NULL,
) -> ReferenceResult:
    """Run the source model in float32 on the evaluation set and store what validation needs."""
    started = time.monotonic()
    src = Path(src)
    prompts, prompts_name, prompts_hash = load_prompts(prompts_file)
    # The source is opened once: the checks, the hash, the shape for the forward choice and the
    # streamed model all use this one open checkpoint and its plan.
    with open_checkpoint(src) as ckpt:
        if not ckpt.has_tokenizer():
            raise BadInputError(f"{src}: no tokenizer; a reference needs the model's own tokenizer")
        plan = plan_tensors(ckpt)
        described = describe_open(ckpt, src, with_hash=True, reporter=reporter, plan=plan)
        source_hash = described["checkpoint_hash"]
        tok = source_tokenizer(src)
        encoded = _encode(tok, prompts, max_tokens)
        probes, skipped = tokenizer_check.source_probes(tok)
        offsets = [0]
        topk_ids, topk_lp, target_lp, rest = [], [], [], []
        with open_forward(src, device, forward, max(map(len, encoded)), reporter, ckpt=ckpt, plan=plan) as (
            model,
            choice,
        ):
            vocab_size = model.vocab_size
            if choice.mode == "resident":
                reporter.start(f"reference logits for {len(prompts)} prompts", len(prompts), unit="prompts")
            compute_start = time.monotonic()
            for ids, logits in zip(encoded, model.logits(encoded), strict=True):
                logits = logits[:-1]  # row t predicts token t+1; the last row predicts nothing stored
                targets = torch.tensor(ids[1:])
                # Row by row is what log_softmax does anyway; chunks bound the float64 copies (rows x vocab).
                for a in range(0, len(targets), _ROWS):
                    lp = torch.log_softmax(logits[a : a + _ROWS].double(), dim=-1)
                    values, indices = lp.topk(top_k, dim=-1)
                    topk_ids.append(indices.to(torch.int32))
                    topk_lp.append(values.float())
                    target_lp.append(lp.gather(1, targets[a : a + _ROWS].unsqueeze(1)).squeeze(1).float())
                    rest.append(1 - values.exp().sum(-1))
                    del lp
                offsets.append(offsets[-1] + len(ids))
                if choice.mode == "resident":
                    reporter.advance(1)
                del logits
            reporter.done()
    ids_all = [torch.tensor(ids, dtype=torch.int32) for ids in encoded]
    compute = time.monotonic() - compute_start
    tensors = {
        "input_ids": torch.cat(ids_all),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "topk_ids": torch.cat(topk_ids),
        "topk_logprobs": torch.cat(topk_lp),
        "target_logprobs": torch.cat(target_lp),
    }
    n_pred = int(tensors["target_logprobs"].numel())
    ppl = float(torch.exp(-tensors["target_logprobs"].double().mean()))
    mean_rest = float(torch.cat(rest).mean())
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": f"model-release {__version__}",
        "source_checkpoint_hash": source_hash,
        "source_format": described["format"],
        "source_dtypes": ",".join(sorted(described["dtypes"])),
        "tokenizer_hash": tokenizer_hash(src),
        "prompts": prompts_name,
        "prompts_hash": prompts_hash,
        "prompt_ids": json.dumps([p.id for p in prompts]),
        "vocab_size": str(vocab_size),
        "top_k": str(top_k),
        "max_tokens": str(max_tokens),
        "perplexity": repr(ppl),
        "mean_rest_mass": repr(mean_rest),
        "tokenizer_probes": tokenizer_check.dump(probes),
        "tokenizer_added_ids": json.dumps(tokenizer_check.added_ids(tok)),
        "chat_template_sha256": tokenizer_check.template_hash(tokenizer_check.chat_template_of(tok)),
    }
    with atomic_file(Path(out), force=force) as tmp:
        save_small(tensors, tmp, meta)
    return ReferenceResult(
        output=str(out),
        source=str(src),
        source_checkpoint_hash=source_hash,
        prompts=prompts_name,
        prompt_count=len(prompts),
        predicted_tokens=n_pred,
        top_k=top_k,
        mean_rest_mass=round(mean_rest, 5),
        perplexity=round(ppl, 4),
        seconds=round(time.monotonic() - started, 2),
        seconds_per_1000_tokens=round(compute / (offsets[-1] / 1000), 3),
        forward=choice.mode,
        device=device,
        forward_reason=choice.reason,
        tokenizer_probes=len(probes),
        probes_skipped=skipped,
    )


@dataclass
class Reference:
    path: Path
    meta: dict[str, str]
    input_ids: torch.Tensor
    offsets: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    target_logprobs: torch.Tensor

    @property
    def prompt_count(self) -> int:
        return len(self.offsets) - 1

    def prompts(self) -> Iterator[tuple[list[int], slice]]:
        """(token ids of a prompt, rows of its predictions in the top-k tables)."""
        row = 0
        for i in range(self.prompt_count):
            ids = self.input_ids[self.offsets[i] : self.offsets[i + 1]].tolist()
            yield ids, slice(row, row + len(ids) - 1)
            row += len(ids) - 1


def load_reference(path: Path) -> Reference:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such reference file (make one with `model-release reference`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise BadInputError(f"{path}: not a model-release reference file")
            if meta.get("format_version") != FORMAT_VERSION:
                raise BadInputError(f"{path}: reference format version {meta.get('format_version')} is not supported")
            t = {k: f.get_tensor(k) for k in ("input_ids", "offsets", "topk_ids", "topk_logprobs", "target_logprobs")}
    except BadInputError:
        raise
    except Exception as exc:  # the library raises several kinds for a damaged file
        raise BadInputError(f"{path}: unreadable reference file ({exc})") from None
    return Reference(path, meta, **t)
