"""The tokenizer of an HF checkpoint as GGUF vocabulary keys, the way llama.cpp expects them.

Three kinds, tried in llama.cpp's converter's order:
- ``tokenizer.model`` (SentencePiece, Llama 2 style) -> ``tokenizer.ggml.model = llama``;
- ``tokenizer.json`` BPE with byte fallback (Llama-style fast tokenizer) -> ``llama`` via
  ``gguf.LlamaHfVocab``;
- ``tokenizer.json`` byte-level BPE (GPT-2 style, SmolLM2) -> ``gpt2`` with merges and the
  pre-tokenizer name llama.cpp needs to split text the same way.
Special token ids, add-BOS/EOS behaviour and the chat template come from ``gguf.SpecialVocab``.

Why not ``gguf.BpeVocab`` for byte-level BPE: it marks tokens of the base vocabulary as NORMAL
even when tokenizer.json declares them special (SmolLM2's ``<|im_start|>`` is one), and llama.cpp
would then split them into characters. The classification below is the converter's
(``get_vocab_base``), done with the ``tokenizers`` library directly instead of transformers.
"""

from __future__ import annotations

import hashlib
import json
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
        return _llama_hf(root, vocab_size, model)
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
    vocab: dict[str, int] = tok.get_vocab(with_added_tokens=True)
    reverse = {i: t for t, i in vocab.items()}
    _check_size(path, max(reverse) + 1, vocab_size)
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    tokens: list[bytes] = []
    types: list[int] = []
    for i in range(max(reverse) + 1):
        if i not in reverse:
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
            continue
        text = reverse[i]
        if i in added:
            entry = added[i]
            if not entry.get("normalized", True):  # llama.cpp expects added tokens pre-normalized
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if entry.get("special") or _looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text.encode("utf-8"))
    _pad(tokens, types, None, vocab_size)
    return GGUFVocab("gpt2", known["pre"], tokens, types, None, gguf.SpecialVocab(root, load_merges=True))


def _looks_special(text: str) -> bool:
    """Added tokens some models forget to mark special (the converter's does_token_look_special)."""
    return text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))


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
    _mark_added_from_config(root, tokens, scores, types)
    return GGUFVocab("llama", "default", tokens, types, scores, gguf.SpecialVocab(root, n_vocab=len(tokens)))


def _mark_added_from_config(root: Path, tokens: list[bytes], scores: list[float], types: list[int]) -> None:
    """Added tokens override pieces: added_tokens.json (USER_DEFINED), then tokenizer_config.json's
    added_tokens_decoder (special -> CONTROL), as llama.cpp's converter reads them."""
    decoder: dict[str, Any] = {}
    for name in ("added_tokens.json", "tokenizer_config.json"):
        path = root / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{path}: invalid JSON ({exc})") from None
        if name == "added_tokens.json":
            decoder.update({str(i): {"content": text, "special": False} for text, i in data.items()})
        else:
            decoder.update(data.get("added_tokens_decoder") or {})
    for key, entry in decoder.items():
        i = int(key)
        if i >= len(tokens):
            continue
        text = entry["content"]
        if entry.get("special") or _looks_special(text):
            types[i] = gguf.TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = gguf.TokenType.USER_DEFINED
        scores[i] = -1000.0
        tokens[i] = text.encode("utf-8")


def _llama_hf(root: Path, vocab_size: int, model: dict[str, Any]) -> GGUFVocab:
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
    for r, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    for i, text in enumerate(tokens):
        r = rank.get(text.decode("utf-8", errors="replace"))
        if r is not None and types[i] == gguf.TokenType.NORMAL:
            scores[i] = -float(r)
    _pad(tokens, types, scores, vocab_size)
    return GGUFVocab("llama", "default", tokens, types, scores, gguf.SpecialVocab(root, n_vocab=len(tokens)))
