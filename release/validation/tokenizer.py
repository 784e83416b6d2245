"""The tokenizer check: a variant must tokenize what users send it exactly as the source does.

Logits can be perfect while the tokenizer is broken: a GGUF whose added tokens are typed NORMAL
makes llama.cpp split ``<start_of_turn>`` into ``<``, ``start``, ``_`` ..., so every chat with the
release goes wrong while KL and top-1 look fine. The reference therefore stores, beside its
logits, the source tokenizer's ids for a set of probes (``release/data/eval/tokenizer_probes.json``:
varied texts, and conversations rendered with the source's own chat template) and the chat
template's sha256; validation tokenizes the same probes in the variant's runtime and fails the
variant when its added tokens come out differently or the chat template was not carried (a plain-text
split of the runtime's own pre-tokenizer, with the same added tokens, is a warning: see ``check``).

Plain texts are tokenized as a prompt is (BOS added as the tokenizer adds it); rendered chats as
a chat runtime does (llama-server, ``apply_chat_template``): special tokens parsed, nothing added.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from release.datafiles import data_file


@dataclass(frozen=True)
class Probe:
    id: str
    kind: str  # text | chat
    text: str
    ids: list[int]


def chat_template_of(tok: Any) -> str:
    """The tokenizer's default chat template ('' when it has none)."""
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what chats use
        template = template.get("default")
    return template if isinstance(template, str) else ""


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest() if template else ""


def source_probes(tok: Any) -> tuple[list[Probe], list[str]]:
    """The probes tokenized by the source's own (transformers) tokenizer, and why any conversation
    was left out (a template that refuses a system turn, say). A tokenizer without a chat template
    gets the plain texts only."""
    spec = data_file("eval", "tokenizer_probes.json")
    probes = [Probe(t["id"], "text", t["text"], list(tok.encode(t["text"]))) for t in spec["texts"]]
    skipped: list[str] = []
    if chat_template_of(tok):
        for conv in spec["conversations"]:
            try:
                text = tok.apply_chat_template(conv["messages"], tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja's TemplateError from the template's own raise_exception
                skipped.append(f"{conv['id']}: the chat template refuses it ({str(exc).splitlines()[0]})")
                continue
            probes.append(Probe(conv["id"], "chat", text, list(tok.encode(text, add_special_tokens=False))))
    return probes, skipped


def dump(probes: list[Probe]) -> str:
    return json.dumps([asdict(p) for p in probes], ensure_ascii=False)


def load(meta: dict[str, str]) -> list[Probe] | None:
    """The reference's probes; None for a reference made before the check existed."""
    raw = meta.get("tokenizer_probes")
    if raw is None:
        return None
    return [Probe(**p) for p in json.loads(raw)]


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def added_ids(tok: Any) -> list[int]:
    """The source tokenizer's added tokens (special or not): the ones a converter must carry."""
    return sorted(int(i) for i in getattr(tok, "added_tokens_decoder", {}))


def check(runtime: Any, meta: dict[str, str], warnings: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(failures, summary) of the variant's tokenizer against the reference's probes.

    A difference in which added tokens come out (``<start_of_turn>`` split into characters, a
    ``<b>`` lost) fails the variant: chats break. A difference in how plain text is split around
    the same added tokens is the runtime's own pre-tokenizer (llama.cpp's regexes differ from
    transformers' on a few characters, ``½`` with SmolLM2's): a warning naming the probe, since no
    conversion can change it."""
    probes = load(meta)
    if probes is None:
        warnings.append("the reference predates the tokenizer check (no probes): remake it to check special tokens")
        return [], {"checked": False}
    added = set(json.loads(meta.get("tokenizer_added_ids", "[]")))
    failures: list[str] = []
    mismatched: list[str] = []
    for p in probes:
        got = runtime.tokenize_probe(p.text, chat=p.kind == "chat")
        if got == p.ids:
            continue
        at = _first_difference(got, p.ids)
        said = f"source {runtime.pieces(p.ids[at : at + 3])}, variant {runtime.pieces(got[at : at + 3])}"
        mismatched.append(p.id)
        if [i for i in got if i in added] != [i for i in p.ids if i in added]:
            failures.append(
                f"tokenizes {p.kind} probe {p.id!r} unlike the source from token {at} on ({said}): "
                "special or added tokens not carried"
            )
        else:
            warnings.append(
                f"{runtime.name} splits {p.kind} probe {p.id!r} unlike the source from token {at} on ({said}); "
                "the added tokens agree: a difference of the runtime's pre-tokenizer"
            )
    expected = meta.get("chat_template_sha256", "")
    carried = template_hash(runtime.chat_template)
    if expected and not carried:
        template = "missing"
        failures.append("carries no chat template; the source has one")
    elif expected and carried != expected:
        template = "differs"
        failures.append("carries a chat template other than the source's")
    else:
        template = "carried" if expected else "none"
    summary = {"checked": True, "probes": len(probes), "mismatched": mismatched, "chat_template": template}
    return failures, summary
