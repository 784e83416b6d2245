"""Float32 logits of a checkpoint in transformers, with memory bounded by one decoder layer.

Two paths, same arithmetic:

- **resident**: ``AutoModelForCausalLM.from_pretrained(dtype=float32)``, one prompt at a time.
  Used when the float32 model fits the device (a small model on the CPU, a 7B model on a GPU).
- **streamed**: the model is built on the ``meta`` device (no memory), then each decoder layer in
  turn gets its weights from the safetensors/.bin files through our one tensor reader, cast to
  float32 on the device, runs *every* prompt's hidden states, and is emptied again. Memory is one
  layer in float32 plus activations, so a 7B model runs in ~2 GB and a 70B one in ~4.5 GB, on the
  CPU or on a GPU that holds one layer. The final norm and ``lm_head`` run the same way, the head
  in vocabulary chunks no larger than a layer.

The streamed path calls transformers' own modules (the decoder layer with its attention and MLP,
the rotary embedding, the causal-mask builder, the norm and the head) in the order the model's
``forward`` does; only the loop over layers is ours. Why not accelerate's offloading
(``device_map`` with ``offload_folder``): its hooks load every layer's weights once per forward
call, i.e. once per prompt (12 times for the built-in set); here each layer is read and cast once
for all prompts, which is what makes a 140 GB checkpoint tractable (one pass over the disk).

Which modules to call is data: ``streamed_forward`` in ``release/data/architectures/<arch>.json``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from release.architectures import eval_number
from release.errors import BadInputError
from release.progress import NULL, Reporter
from release.resources import (
    ModelShape,
    fits,
    fmt,
    forward_need,
    gpu_free,
    mem_available,
    model_shape,
    plan_shape,
    resident_fits,
)
from release.tensors import LIBC, SafetensorsFile, drop_pages

if TYPE_CHECKING:
    from release.checkpoint import Checkpoint, TensorPlan

MODES = ("auto", "resident", "streamed")


@dataclass(frozen=True)
class ForwardChoice:
    mode: str  # resident | streamed
    device: str
    reason: str


def choose(src: Path, device: str, mode: str, tokens: int, shape: ModelShape | None = None) -> ForwardChoice:
    """Resident when the float32 model fits the device with room to spare, streamed otherwise."""
    if mode not in MODES:
        raise BadInputError(f"--forward {mode!r}: choose one of {', '.join(MODES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA device is available here (use --device cpu)")
    shape = shape or model_shape(src)
    gpu = gpu_free() if device.startswith("cuda") else None
    ram = mem_available()
    resident = forward_need(shape, tokens, device, "resident")
    streamed = forward_need(shape, tokens, device, "streamed")
    if mode == "auto":
        room = resident_fits(shape, tokens, device, ram, gpu)
        mode = "resident" if room else "streamed"
        reason = (
            f"float32 model ({fmt(shape.fp32_bytes)}) fits"
            if room
            else f"float32 model ({fmt(shape.fp32_bytes)}) does not fit; one layer at a time"
        )
    else:
        reason = f"--forward {mode}"
    need = resident if mode == "resident" else streamed
    if not fits(need, ram=ram, gpu=gpu):
        where = f"{fmt(ram)} RAM available" + (f", {fmt(gpu)} GPU memory free" if gpu is not None else "")
        raise BadInputError(f"the {mode} forward pass needs about {need.describe()}; {where}")
    return ForwardChoice(mode, device, reason)


def attention_implementation(src: Path) -> str:
    """``Architecture.attention`` of a model folder, read from its config.json alone."""
    import json

    from release.architectures import resolve

    try:
        config = json.loads((Path(src) / "config.json").read_text(encoding="utf-8"))
        return resolve(config).attention
    except (OSError, ValueError, BadInputError):
        return "sdpa"  # not ours to refuse here: loading the model reports a bad config


class ForwardModel:
    """Next-token logits for many prompts: ``logits(prompts)`` yields one [len, vocab] float32 CPU
    tensor per prompt, in order."""

    vocab_size: int

    model: torch.nn.Module  # transformers' model (its layers carry any hooks a caller registers)

    def logits(self, prompts: list[list[int]]) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def check_ids(self, prompts: list[list[int]]) -> None:
        """A token id past the embedding matrix would fail deep in torch with an IndexError: say
        what it means instead (a tokenizer that does not belong to this model)."""
        top = max((max(ids) for ids in prompts if ids), default=-1)
        if top >= self.vocab_size:
            raise BadInputError(
                f"the tokenizer gives token id {top}, but the model's vocab_size is {self.vocab_size}: "
                "tokenizer and model do not belong together (special tokens added by the tokenizer class?)"
            )

    def observe(self, prompts: list[list[int]]) -> None:
        """Run every decoder layer on every prompt, for forward hooks (the importance matrix);
        the logits are not needed."""
        for _ in self.logits(prompts):
            pass


class ResidentModel(ForwardModel):
    def __init__(self, src: Path, device: str, *, quantized: bool = False) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our reporter shows progress; its bar would clutter errors

        dtype: Any = "auto" if quantized else torch.float32
        # On a GPU, straight there (device_map): never the whole float32 model in host memory.
        placement: dict[str, Any] = {} if device == "cpu" else {"device_map": device}
        attn = attention_implementation(src)
        self.model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation=attn, **placement)
        self.model = self.model.to(device).eval()
        self.device = device
        self.vocab_size = int(self.model.config.vocab_size)

    def logits(self, prompts: list[list[int]]) -> Iterator[torch.Tensor]:
        self.check_ids(prompts)
        for ids in prompts:
            with torch.no_grad():
                yield self.model(torch.tensor([ids], device=self.device)).logits[0].float().cpu()


class StreamedModel(ForwardModel):
    """The model as a meta skeleton; weights come in one module at a time (see the module doc)."""

    def __init__(
        self,
        src: Path,
        device: str,
        reporter: Reporter = NULL,
        *,
        ckpt: Checkpoint | None = None,
        plan: TensorPlan | None = None,
        owns: bool | None = None,
    ) -> None:
        """``ckpt`` (with its ``plan``): a checkpoint already open, which the caller closes unless
        ``owns`` hands it over; without it the model opens ``src`` and closes it in ``close()``."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from release.checkpoint import open_checkpoint, plan_tensors

        self.src = Path(src)
        self.device = torch.device(device)
        self.reporter = reporter
        self._owns = ckpt is None if owns is None else owns
        self.ckpt = ckpt if ckpt is not None else open_checkpoint(self.src)
        plan = plan if plan is not None else plan_tensors(self.ckpt)
        paths = plan.architecture.spec.get("streamed_forward")
        if not paths:
            self.close()
            raise BadInputError(f"architecture {plan.architecture.name} has no streamed forward description")
        self.paths: dict[str, str] = paths
        self.config = AutoConfig.from_pretrained(self.src)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(
                self.config, dtype=torch.float32, attn_implementation=plan.architecture.attention
            ).eval()
        self.config = self.model.config
        self.vocab_size = int(self.config.vocab_size)
        shape = plan_shape(plan)  # the checkpoint is open already: no second read of its headers
        # Head chunks no larger than a layer in float32 (at least 64M values).
        self.head_chunk = max(1, max(shape.largest_layer_params, 64 << 20) // int(self.config.hidden_size))

    def close(self) -> None:
        if self._owns:
            self.ckpt.close()

    # --- weights in and out -------------------------------------------------------------------

    def _tensor(self, name: str, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """A checkpoint tensor (or some of its rows) as float32 on the device, as a new tensor."""
        ref = self.ckpt.refs.get(name)
        if ref is None:
            raise BadInputError(f"{self.src}: tensor {name} is missing")
        with self.ckpt.open(ref) as t:
            part = t if rows is None else t[rows]
            if not isinstance(rows, torch.Tensor) and isinstance(self.ckpt.file_of(name), SafetensorsFile):
                return _cast_dropping_pages(part, self.device)
            if self.device.type == "cpu":
                return part.to(torch.float32, copy=True)
            return part.to(self.device).to(torch.float32)  # send stored bytes, cast on the GPU

    def _load(self, module: torch.nn.Module, prefix: str, **override: torch.Tensor) -> None:
        """Give ``module`` its weights on the device. ``override`` sets a parameter to a tensor of
        another shape (the embedding rows a prompt uses, a chunk of the head's vocabulary)."""
        state = {key: self._tensor(prefix + key) for key in module.state_dict() if key not in override}
        if state:
            module.load_state_dict(state, strict=not override, assign=True)
        for key, value in override.items():
            owner, _, leaf = key.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            target._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        for name, buf in module.named_buffers():
            if buf.is_meta:
                raise BadInputError(
                    f"{prefix}{name} is a computed buffer; this architecture cannot run streamed yet "
                    "(use --forward resident)"
                )

    def _embed_scale(self) -> float | None:
        """``embed_scale`` of the description: a config expression the embeddings are multiplied by."""
        expr = self.paths.get("embed_scale")
        return None if expr is None else float(eval_number(expr, self.config.to_dict()))

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """``final_logit_softcapping`` (Gemma): cap * tanh(logits / cap), as the model's head does."""
        key = self.paths.get("final_softcap")
        cap = getattr(self.config, key, None) if key else None
        return logits if not cap else torch.tanh(logits / cap) * cap

    @staticmethod
    def _unload(module: torch.nn.Module) -> None:
        module.to_empty(device="meta")
        trim_heap()

    # --- the forward pass ---------------------------------------------------------------------

    def observe(self, prompts: list[list[int]]) -> None:
        self._layers(prompts)
        self.reporter.advance(1)
        self.reporter.done()

    def _layers(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """Every prompt's hidden states after the last decoder layer (before the final norm)."""
        self.check_ids(prompts)
        p = self.paths
        embed = self.model.get_submodule(p["embed"])
        layers = self.model.get_submodule(p["layers"])
        rotary = _call(type(self.model.get_submodule(p["rotary"])), config=self.config, device=self.device)
        rotary = rotary.to(self.device)
        n_layers = int(self.config.num_hidden_layers)
        self.reporter.start(f"streamed forward, {n_layers} layers on {self.device}", n_layers + 2, unit="layers")
        with torch.no_grad():
            hidden = []
            scale = self._embed_scale()
            for ids in prompts:
                # Only the rows these tokens use; the embedding module itself does the lookup.
                uniq, inverse = torch.unique(torch.tensor(ids), return_inverse=True)
                rows = self._tensor(p["embed"] + ".weight", uniq)
                if scale is None:
                    self._load(embed, p["embed"] + ".", weight=rows)
                    hidden.append(embed(inverse.to(self.device)).unsqueeze(0))
                else:  # Gemma: the model (2) or a scaled embedding with a computed buffer (3) multiplies
                    hidden.append((torch.nn.functional.embedding(inverse.to(self.device), rows) * scale).unsqueeze(0))
            self._unload(embed)
            self.reporter.advance(1)
            layer_types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * n_layers)
            per_type_rope = "layer_type" in inspect.signature(rotary.forward).parameters
            extras = []
            for h in hidden:
                positions = torch.arange(h.shape[1], device=self.device)
                by_type = {}
                for kind in sorted(set(layer_types)):
                    by_type[kind] = {
                        "attention_mask": _mask(kind, self.config, h, positions),
                        "position_ids": positions.unsqueeze(0),
                        "cache_position": positions,
                        "position_embeddings": _call(rotary.forward, h, positions.unsqueeze(0), layer_type=kind)
                        if per_type_rope
                        else rotary(h, positions.unsqueeze(0)),
                    }
                extras.append(by_type)
            for i in range(n_layers):
                layer = layers[i]
                self._load(layer, f"{p['layers']}.{i}.")
                for k, h in enumerate(hidden):
                    kw = extras[k][layer_types[i]]
                    out = _call(layer.forward, h, cache=None, past_key_values=None, use_cache=False, **kw)
                    hidden[k] = out[0] if isinstance(out, tuple) else out
                self._unload(layer)
                self.reporter.advance(1)
        return hidden

    def logits(self, prompts: list[list[int]]) -> Iterator[torch.Tensor]:
        p = self.paths
        norm = self.model.get_submodule(p["norm"])
        head = self.model.get_submodule(p["head"])
        with torch.no_grad():
            hidden = self._layers(prompts)
            self._load(norm, p["norm"] + ".")
            hidden = [norm(h)[0] for h in hidden]
            self._unload(norm)
            head_name = p["head"] + ".weight"
            if head_name not in self.ckpt.refs:  # tied: the embedding matrix is the head
                head_name = p["embed"] + ".weight"
            vocab = self.vocab_size
            chunks = [slice(a, min(a + self.head_chunk, vocab)) for a in range(0, vocab, self.head_chunk)]
            self.reporter.advance(1)
            self.reporter.done()
            if len(chunks) == 1:
                self._load(head, p["head"] + ".", weight=self._tensor(head_name))
                try:
                    for h in hidden:
                        yield self._softcap(head(h).float()).cpu()
                finally:
                    self._unload(head)
                return
            for h in hidden:  # a head larger than a layer: vocabulary chunks, re-read per prompt
                parts = []
                for rows in chunks:
                    self._load(head, p["head"] + ".", weight=self._tensor(head_name, rows))
                    parts.append(self._softcap(head(h).float()).cpu())
                    self._unload(head)
                yield torch.cat(parts, dim=-1)


def _mask(kind: str, config: Any, h: torch.Tensor, positions: torch.Tensor) -> Any:
    """The attention mask transformers' model builds for one layer type (full or sliding window).
    transformers renamed these arguments across 5.x (past_key_values -> cache, ...): pass each name
    the installed version takes."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    if kind not in ("full_attention", "sliding_attention"):
        raise BadInputError(f"layer type {kind!r} has no streamed forward yet (use --forward resident)")
    build = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    return _call(build, config=config, inputs_embeds=h, input_embeds=h, attention_mask=None, cache=None,
                 past_key_values=None, cache_position=positions, position_ids=positions.unsqueeze(0))  # fmt: skip


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc keeps some after a layer's worth of frees)."""
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)


def _cast_dropping_pages(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Float32 copy of a memory-mapped tensor on ``device``, 16 MB of source at a time, each slice's
    file pages dropped once copied: the process never holds a whole stored tensor beside its float32
    copy (a 70B MLP matrix is 0.47 GB in bf16, 0.94 GB in float32)."""
    out = torch.empty(t.shape, dtype=torch.float32, device=device)
    if t.dim() == 0 or t.numel() == 0:
        return out.copy_(t)
    rows = max(1, (16 << 20) // max(1, t[0].numel() * t.element_size()))
    for a in range(0, t.shape[0], rows):
        src = t[a : a + rows]
        out[a : a + rows].copy_(src)
        drop_pages(src.data_ptr(), src.numel() * src.element_size())
    return out


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments its signature names (the rest are other versions' names)."""
    params = inspect.signature(fn).parameters
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


@contextlib.contextmanager
def open_forward(
    src: Path,
    device: str = "cpu",
    mode: str = "auto",
    tokens: int = 512,
    reporter: Reporter = NULL,
    *,
    ckpt: Checkpoint | None = None,
    plan: TensorPlan | None = None,
) -> Iterator[tuple[ForwardModel, ForwardChoice]]:
    """The forward model for a source folder, resident or streamed as ``choose`` decides. A caller
    that holds the checkpoint open passes it (``ckpt`` and its ``plan``): its headers are not read
    again, neither for the choice nor for the streamed model."""
    from release.checkpoint import plan_tensors

    if ckpt is not None and plan is None:
        plan = plan_tensors(ckpt)
    choice = choose(src, device, mode, tokens, plan_shape(plan) if plan is not None else None)
    model: ForwardModel
    if choice.mode == "resident":
        model = ResidentModel(src, device)
    else:
        model = StreamedModel(src, device, reporter, ckpt=ckpt, plan=plan)
    try:
        yield model, choice
    finally:
        if isinstance(model, StreamedModel):
            model.close()
