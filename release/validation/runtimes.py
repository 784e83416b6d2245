"""The runtimes users run variants in: transformers (safetensors, GPTQ) and llama.cpp (GGUF).

Each runtime opens a variant, says how it tokenizes text (to prove it matches the reference's
token ids) and returns next-token logits for a list of ids, one prompt at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from release.errors import BadInputError
from release.formats.gguf_names import variant_files
from release.resources import cpu_threads


def detect(path: Path) -> str:
    """safetensors | gptq | gguf, from what the path holds."""
    path = Path(path)
    if path.suffix == ".gguf" and (path.is_file() or variant_files(path)):
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{path / 'config.json'}: invalid JSON ({exc})") from None
        if (config.get("quantization_config") or {}).get("quant_method") == "gptq":
            return "gptq"
        if any(path.glob("*.safetensors")):
            return "safetensors"
    if not path.exists():
        raise BadInputError(f"{path}: no such variant")
    raise BadInputError(f"{path}: not a safetensors folder, GPTQ folder or .gguf file")


class Runtime:
    name = ""
    vocab_size = 0
    recorded_hashes: tuple[str, ...] = ()  # checkpoint hashes the variant says it was made from
    quantization: dict[str, str] = {}  # noqa: RUF012  (read-only; how the file says it was quantized)

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def tokenize_probe(self, text: str, *, chat: bool) -> list[int]:
        """Ids as the runtime's users get them: a prompt (BOS as configured, added tokens parsed),
        or a rendered chat (special tokens parsed, nothing added)."""
        raise NotImplementedError

    def pieces(self, ids: list[int]) -> list[str]:
        """Each token's text, to name a difference."""
        raise NotImplementedError

    chat_template = ""

    def logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] float logits; row t predicts token t+1."""
        raise NotImplementedError

    def logits_many(self, prompts: list[list[int]]) -> Iterator[torch.Tensor]:
        """Logits of each prompt in turn (a streamed runtime passes all prompts through each layer)."""
        for ids in prompts:
            yield self.logits(ids)

    def close(self) -> None:
        pass


class TransformersRuntime(Runtime):
    """Weights as stored, computed in float32 (so a lossless copy reproduces the reference exactly).

    A safetensors variant runs resident or streamed one layer at a time, as the reference does
    (``release.forward``); a GPTQ variant runs resident through GPTQModel's kernels, after
    a check that it fits the device."""

    name = "transformers"
    _quiet: Any = None

    def __init__(self, path: Path, kind: str, device: str = "cpu", forward: str = "auto", tokens: int = 512) -> None:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from release.checkpoint import open_checkpoint, plan_tensors
        from release.forward import ResidentModel, StreamedModel, choose
        from release.resources import plan_shape

        hf_logging.disable_progress_bar()

        quiet: Any = contextlib.nullcontext()
        if kind == "gptq":  # transformers loads GPTQ through GPTQModel, which logs on stdout
            from release.capture import capture_fd
            from release.formats.gptq import import_gptqmodel

            check_gptq_fits(path, device, tokens)
            import_gptqmodel()
            quiet = capture_fd(1)
            self._quiet = capture_fd
        try:
            self.tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{path}: no usable tokenizer ({exc})") from None
        self.fwd: Any
        with quiet:
            if kind == "gptq":
                self.fwd = ResidentModel(path, device, quantized=True)
                self.forward = "resident"
            else:
                # The variant's headers are read once, for the choice and for the streamed model.
                ckpt = open_checkpoint(path)
                try:
                    plan = plan_tensors(ckpt)
                    choice = choose(path, device, forward, tokens, plan_shape(plan))
                except BaseException:
                    ckpt.close()
                    raise
                self.forward = choice.mode
                if choice.mode == "resident":
                    ckpt.close()
                    self.fwd = ResidentModel(path, device)
                else:
                    self.fwd = StreamedModel(path, device, ckpt=ckpt, plan=plan, owns=True)
        self.device = device
        self.vocab_size = self.fwd.vocab_size
        from release.validation.tokenizer import chat_template_of

        self.chat_template = chat_template_of(self.tok)
        from release.safetensors_header import folder_metadata

        meta = folder_metadata(path)
        self.recorded_hashes = tuple(meta[k] for k in ("source_checkpoint_hash", "origin_checkpoint_hash") if k in meta)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def tokenize_probe(self, text: str, *, chat: bool) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=not chat))

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.tok.decode([i]) for i in ids]

    def logits_many(self, prompts: list[list[int]]) -> Iterator[torch.Tensor]:
        # stdout is captured while each prompt runs, never across a yield: a consumer that stops
        # early would otherwise leave fd 1 in the capture file, --json summary included.
        it = iter(self.fwd.logits(prompts))
        while True:
            with self._quiet(1) if self._quiet else contextlib.nullcontext():
                item = next(it, None)
            if item is None:
                return
            yield item

    def logits(self, ids: list[int]) -> torch.Tensor:
        return next(iter(self.logits_many([ids])))

    def close(self) -> None:
        close = getattr(self.fwd, "close", None)
        if close is not None:
            close()


def check_gptq_fits(path: Path, device: str, tokens: int) -> None:
    """A GPTQ model runs whole on its device (its kernels need the packed layers resident). Refuse,
    naming the sizes, what would otherwise end in the OOM killer."""
    from release.resources import activations, fits, fmt, gptq_validate_need, gpu_free, mem_available

    stored = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    vocab, hidden = int(config.get("vocab_size", 0)), int(config.get("hidden_size", 0))
    act = activations(tokens, hidden, int(config.get("intermediate_size", 4 * hidden)), vocab)
    need = gptq_validate_need(stored, act, device)
    on_gpu = device.startswith("cuda")
    gpu = gpu_free() if on_gpu else None
    ram = mem_available()
    if not fits(need, ram=ram, gpu=gpu):
        where = f"{fmt(ram)} RAM available"
        if on_gpu:
            where += f", {fmt(gpu)} GPU memory free" if gpu is not None else ", no CUDA device"
        raise BadInputError(
            f"{path}: validating this GPTQ model needs about {need.describe()}; {where}",
            hint="GPTQ runs whole on one device: use a GPU with that much memory (--device cuda)",
        )


def llama_threads(threads: int | None = None) -> dict[str, int]:
    """``llama_cpp.Llama``'s two thread counts, both the step's (``cpu_threads``). Left out,
    llama-cpp-python gives prompt batches, which is all validation runs, every core of the machine
    (``n_threads_batch``): past a step's budget, and on a shared machine ggml's spinning threads
    nearly doubled a validation's time (2 cores, two validations at once: 17.4 s each, 9.1 s with
    one thread apiece)."""
    n = threads or cpu_threads()
    return {"n_threads": n, "n_threads_batch": n}


class LlamaCppRuntime(Runtime):
    name = "llama.cpp"

    def __init__(self, path: Path, n_ctx: int = 2048, threads: int | None = None) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise BadInputError("GGUF variants run in llama.cpp: pip install 'model-release[validate]'") from None
        try:
            # llama-cpp-python prints llama.cpp's level-0 log lines even when not verbose (its
            # callback compares the wrong level): "using full-size SWA cache" on every Gemma file
            # would precede our one error line. The exception says what went wrong.
            with contextlib.redirect_stderr(io.StringIO()):
                self.llm = Llama(
                    model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_batch=512,
                    **llama_threads(threads),
                )  # fmt: skip
        except (ValueError, RuntimeError) as exc:
            raise BadInputError(f"{path}: llama.cpp cannot load it ({exc})") from None
        self.vocab_size = int(self.llm.n_vocab())
        meta: dict[str, Any] = self.llm.metadata
        self.recorded_hashes = tuple(
            v
            for k, v in meta.items()
            if k in ("model_release.source_checkpoint_hash", "model_release.origin_checkpoint_hash")
        )
        self.file_type = meta.get("general.file_type")
        self.chat_template = str(meta.get("tokenizer.chat_template", ""))
        self.quantization = {k.removeprefix("quantize."): v for k, v in meta.items() if k.startswith("quantize.")}

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def tokenize_probe(self, text: str, *, chat: bool) -> list[int]:
        # special=True is how llama-server and llama-cli tokenize a rendered chat; transformers
        # always parses added tokens, so plain texts are compared the same way.
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=not chat, special=True))

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.llm.detokenize([i], special=True).decode("utf-8", errors="replace") for i in ids]

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(self.llm.scores[: len(ids)].copy())

    def close(self) -> None:
        self.llm.close()


def open_runtime(
    path: Path, runtime: str = "auto", device: str = "cpu", forward: str = "auto", tokens: int = 512
) -> tuple[str, Runtime]:
    kind = detect(path)
    if runtime == "auto":
        runtime = "llama.cpp" if kind == "gguf" else "transformers"
    if runtime == "llama.cpp":
        if kind != "gguf":
            raise BadInputError(f"{path}: llama.cpp runs GGUF files, this is a {kind} variant")
        return kind, LlamaCppRuntime(variant_files(path)[0])  # llama.cpp finds a split set's other parts
    if runtime == "transformers":
        if kind == "gguf":
            raise BadInputError(f"{path}: validate GGUF files in llama.cpp (--runtime llama.cpp or auto)")
        return kind, TransformersRuntime(path, kind, device, forward, tokens)
    raise BadInputError(f"unknown runtime {runtime!r} (auto, transformers, llama.cpp)")
