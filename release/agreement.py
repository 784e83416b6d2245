"""Every artefact of a release folder agrees on the weights' license, or nothing is sealed.

Three places record it: the weight files themselves (GGUF ``general.license``, safetensors and GPTQ
shards' ``__metadata__``), the card's front matter (``license``, or ``other`` with ``license_name``),
and the manifest's license decision. ``card`` refuses to write a card whose license the folder's
files do not carry; ``manifest``, ``sign`` and ``publish`` refuse a folder whose files or card
disagree with the decision. Without these, re-carding a built release under another license
(``card --metadata relicensed.yaml``) went through, and the manifest then sealed the mismatch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from release.errors import CheckFailedError
from release.licensing import license_info
from release.safetensors_header import parse_safetensors_header

CARD = "README.md"
REFERENCE = "reference-logits.safetensors"  # the reference logits a folder ships: no license of its own


def gguf_header_string(path: Path, key: str) -> str | None:
    """A string key of a GGUF file, read from its header: found by its exact length-prefixed name
    and string type (``general.license.name`` has another length), in the first MB, where the
    general.* keys and our model_release.* keys sit before the vocabulary. GGUFReader would parse
    the whole vocabulary (seconds per file) to answer the same."""
    name = key.encode()
    marker = len(name).to_bytes(8, "little") + name + (8).to_bytes(4, "little")  # 8: GGUF string
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    at = head.find(marker)
    if not head.startswith(b"GGUF") or at < 0:
        return None
    start = at + len(marker)
    n = int.from_bytes(head[start : start + 8], "little")
    return head[start + 8 : start + 8 + n].decode("utf-8", errors="replace")


def recorded_hashes(folder: Path, kind: str) -> dict[str, str]:
    """The checkpoint hashes a folder's weights record: safetensors/GPTQ shards' ``__metadata__``, or
    the first GGUF file's ``model_release.*`` keys (read from its header only)."""
    if kind != "gguf":
        from release.safetensors_header import folder_metadata

        return folder_metadata(folder)
    for g in sorted(Path(folder).glob("*.gguf")):
        found = {
            k: gguf_header_string(g, f"model_release.{k}") for k in ("source_checkpoint_hash", "origin_checkpoint_hash")
        }
        return {k: v for k, v in found.items() if v is not None}
    return {}


def gguf_license(path: Path) -> str | None:
    """``general.license`` of a GGUF file (see gguf_header_string)."""
    return gguf_header_string(path, "general.license")


def check_embedded_licenses(folder: Path, weights_license: str | None) -> None:
    """Every artefact that records a license (GGUF ``general.license``, safetensors and GPTQ
    shards' ``__metadata__``) must record the release's decision: a folder whose files say
    apache-2.0 beside a LICENSE that says llama2 is refused, naming the file and both licenses."""
    if not weights_license:
        return
    for p in sorted(Path(folder).rglob("*")):
        if p.suffix == ".gguf":
            embedded = gguf_license(p)
        elif p.suffix == ".safetensors" and p.name != REFERENCE:
            embedded = (parse_safetensors_header(p)[1].get("__metadata__") or {}).get("license")
        else:
            continue
        if embedded and embedded != weights_license:
            raise CheckFailedError(
                f"{p}: its embedded license is {embedded!r}, but the release's weights are under "
                f"{weights_license!r}; rebuild it with the release's metadata"
            )


def card_license_fields(weights_license: str | None) -> dict[str, Any]:
    """The card front matter's license keys for a decision: the Hub's id when it has one, else
    ``other`` with the license's name and link (what the Hub asks of a custom license)."""
    info = license_info(weights_license or "")
    if info.get("hf_id"):
        return {"license": info["hf_id"]}
    return {"license": "other", "license_name": weights_license, "license_link": info["link"]}


def check_card_license(folder: Path, weights_license: str | None) -> None:
    """The folder's card (when it has one) must name the decided license, as ``card`` writes it."""
    card = Path(folder) / CARD
    if not weights_license or not card.is_file():
        return
    from huggingface_hub import ModelCard

    data = ModelCard.load(card).data.to_dict()  # front matter parsed as the Hub parses it
    expected = card_license_fields(weights_license)
    said = {k: data.get(k) for k in expected}
    if said != expected:
        shown = said["license"] if said.get("license") != "other" else said.get("license_name")
        raise CheckFailedError(
            f"{card}: the card says license {shown!r}, but the release's weights are under "
            f"{weights_license!r}; run `model-release card` again"
        )


def check_agreement(folder: Path, weights_license: str | None) -> None:
    """Files and card both carry the decided license (manifest, sign, publish)."""
    check_embedded_licenses(folder, weights_license)
    check_card_license(folder, weights_license)
