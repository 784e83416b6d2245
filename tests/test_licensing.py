"""Licenses from lineage, license files in every release folder, and model cards people can trust."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml
from huggingface_hub import ModelCard

from release.architectures import data_file
from release.cards import render_cards
from release.errors import CheckFailedError
from release.formats.safetensors import convert
from release.licensing import decide
from release.metadata import BaseModel, ReleaseMetadata

LICENSES = Path(__file__).resolve().parents[1] / "licenses"


def pinned_sources() -> dict[str, str]:
    """file -> sha256 from licenses/SOURCES.md, the record of where each verbatim text came from
    (independent of registry.json, which the code reads)."""
    rows = re.findall(r"^\| (\S+\.(?:txt|md)) \| .* \| ([0-9a-f]{64}) \|$", (LICENSES / "SOURCES.md").read_text(), re.M)
    return dict(rows)


def verbatim(name: str) -> bytes:
    data = (LICENSES / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == pinned_sources()[name], f"licenses/{name} is not the recorded text"
    return data


LLAMA2_NOTICE = (
    "Llama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta Platforms, Inc. All Rights Reserved."
)
MEDITRON = {
    "name": "Meditron-7B-mini",
    "version": "1.0",
    "license": "llama2",
    "domain": "medical",
    "languages": ["en"],
    "datasets": ["epfl-llm/guidelines"],
    "repo_url": "https://huggingface.co/example/meditron-mini",
    "gated_prompt": "Accept the Llama 2 Community License and the Acceptable Use Policy to access this model.",
    "base_models": [
        {"name": "Llama-2-7b", "organization": "meta-llama", "repo_url": "https://huggingface.co/meta-llama/Llama-2-7b",
         "license": "llama2"},
    ],
}  # fmt: skip
SMOL = {
    "name": "SmolLM2-mini",
    "license": "apache-2.0",
    "base_models": [{"name": "SmolLM2-135M-Instruct", "organization": "HuggingFaceTB", "license": "apache-2.0"}],
}


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def release_dir(tmp_path: Path, tiny, meta: dict, *, gguf_dir: bool = False) -> Path:
    """A release folder: release.yaml + a converted main model (+ a folder standing for GGUF files)."""
    root = tmp_path / "release"
    root.mkdir()
    (root / "release.yaml").write_text(yaml.safe_dump(meta))
    src, _, _ = tiny("st-single")
    convert(src, root / "model", metadata=ReleaseMetadata.from_file(root / "release.yaml"))
    if gguf_dir:
        (root / "gguf").mkdir()
        (root / "gguf" / "m-Q8_0.gguf").write_bytes(b"GGUF" + bytes(1000))
    return root


def test_license_texts_are_verbatim_copies():
    assert sorted(pinned_sources()) == ["APACHE-2.0.txt", "LLAMA2_COMMUNITY_LICENSE.txt", "LLAMA2_USE_POLICY.md"]
    for name in pinned_sources():
        verbatim(name)
    registry = json.loads((LICENSES / "registry.json").read_text())["licenses"]
    for lic in registry.values():
        for f in lic["files"]:
            assert sha256(LICENSES / f["source"]) == f["sha256"]


def test_llama2_derivative_carries_llama2_and_all_three_files(tmp_path, tiny, cli):
    root = release_dir(tmp_path, tiny, MEDITRON, gguf_dir=True)
    r = cli("card", root, "--json")
    assert r.exit_code == 0, r.stderr
    for folder in (root / "model", root / "gguf"):
        assert (folder / "LICENSE").read_bytes() == verbatim("LLAMA2_COMMUNITY_LICENSE.txt")
        assert (folder / "USE_POLICY.md").read_bytes() == verbatim("LLAMA2_USE_POLICY.md")
        assert (folder / "NOTICE").read_text().strip() == LLAMA2_NOTICE
        card = ModelCard.load(folder / "README.md")
        assert card.data.license == "llama2"
        assert card.data.extra_gated_prompt == MEDITRON["gated_prompt"]
        assert "not been validated for clinical use" in card.text
        assert "700 million monthly active users" in card.text
    main = ModelCard.load(root / "model" / "README.md").data
    assert main.base_model == ["meta-llama/Llama-2-7b"]
    variant = ModelCard.load(root / "gguf" / "README.md").data
    assert variant.base_model == ["example/meditron-mini"] and variant.base_model_relation == "quantized"
    # The weights themselves carry it too.
    from release.inspect import describe

    shown = describe(root / "model")
    assert shown["license"]["license"] == "llama2" and shown["license"]["base_model"] == "Llama-2-7b"


def test_inherited_license_when_none_declared():
    meta = ReleaseMetadata(base_models=(BaseModel("Llama-2-70b", "meta-llama", None, "llama2"),))
    d = decide(meta)
    assert d.ok and d.weights_license == "llama2" and d.code_license == "apache-2.0"
    assert [f.name for f in d.files] == ["LICENSE", "USE_POLICY.md", "NOTICE"]


def test_apache_model_gets_apache_and_no_llama_files(tmp_path, tiny, cli):
    root = release_dir(tmp_path, tiny, SMOL)
    assert cli("card", root).exit_code == 0
    folder = root / "model"
    assert (folder / "LICENSE").read_bytes() == verbatim("APACHE-2.0.txt")
    assert not (folder / "USE_POLICY.md").exists() and not (folder / "NOTICE").exists()
    assert ModelCard.load(folder / "README.md").data.license == "apache-2.0"


def test_apache_weights_descending_from_llama2_are_refused(tmp_path, tiny, cli):
    bad = {**MEDITRON, "license": "apache-2.0"}
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump(bad))
    r = cli("license", "check", path)
    assert r.exit_code == 1
    assert "descend from Llama-2-7b under llama2" in r.error_lines[-1]
    assert "declare license llama2" in r.error_lines[-1]
    # Nothing gets written with it: not a converted model, not a card.
    src, _, _ = tiny("st-single")
    r = cli("convert", src, "-o", tmp_path / "out", "--metadata", path)
    assert r.exit_code == 1 and not (tmp_path / "out").exists()
    good = release_dir(tmp_path, tiny, MEDITRON)
    (good / "release.yaml").write_text(yaml.safe_dump(bad))
    r = cli("card", good)
    assert r.exit_code == 1 and not (good / "model" / "README.md").exists()


def test_license_check_prints_the_decision(tmp_path, cli):
    path = tmp_path / "release.json"
    path.write_text(json.dumps(MEDITRON))
    r = cli("license", "check", path, "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    assert d["weights_license"] == "llama2" and d["inherited"] == {"llama2": ["Llama-2-7b"]}
    assert any("Acceptable Use Policy" in o for o in d["obligations"])


def test_card_front_matter_passes_schema_and_round_trips(tmp_path, tiny, cli):
    root = release_dir(tmp_path, tiny, MEDITRON, gguf_dir=True)
    assert cli("card", root).exit_code == 0
    schema = data_file("schemas", "model_card.schema.json")
    for folder in (root / "model", root / "gguf"):
        text = (folder / "README.md").read_text()
        front = yaml.safe_load(text.split("---\n")[1])
        jsonschema.validate(front, schema)
        assert ModelCard(text).data.to_dict() == front
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**front, "license": "other"}, schema)  # other needs license_name and link


def test_provided_files_table_matches_the_files(tmp_path, tiny, cli):
    root = release_dir(tmp_path, tiny, SMOL, gguf_dir=True)
    report = {"passed": True, "metrics": {"kl_mean": 0.00524, "top1_agreement": 0.952}}
    (root / "gguf" / "m-Q8_0.validation.json").write_text(json.dumps(report))
    (root / "gguf" / "m-Q8_0.kl.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert cli("card", root).exit_code == 0
    gguf_card = (root / "gguf" / "README.md").read_text()
    assert "![KL per token, m-Q8_0](m-Q8_0.kl.png)" in gguf_card  # the published plot is shown
    assert "see `LICENSE` in this repository, which ships with every copy." in gguf_card
    for folder, pattern in ((root / "model", "*.safetensors"), (root / "gguf", "*.gguf")):
        text = (folder / "README.md").read_text()
        rows = re.findall(
            r"^\| (\S+) \| (\w+) \| (\S+) \| \S+ \| ([\d.]+) MB \| `([0-9a-f]{64})` \| ([^|]+) \|", text, re.M
        )
        files = sorted(folder.glob(pattern))
        assert [r[0] for r in rows] == [f.name for f in files]
        for (_, _, _, size, digest, _), f in zip(rows, files, strict=True):
            assert digest == sha256(f)
            assert float(size) == pytest.approx(f.stat().st_size / 1e6, abs=0.051)
    gguf_row = re.search(r"^\| m-Q8_0.gguf .*$", (root / "gguf" / "README.md").read_text(), re.M).group(0)
    assert "5.24e-03" in gguf_row and "0.952" in gguf_row and "| Q8_0 |" in gguf_row


def test_tampered_license_text_is_not_shipped(tmp_path, tiny, monkeypatch):
    copy = tmp_path / "licenses"
    shutil.copytree(LICENSES, copy)
    (copy / "APACHE-2.0.txt").write_text("shortened license")
    monkeypatch.setenv("MODEL_RELEASE_LICENSES", str(copy))
    from release import licensing

    licensing.registry.cache_clear()
    try:
        root = release_dir(tmp_path, tiny, SMOL)
        with pytest.raises(CheckFailedError, match="differs from its pinned text"):
            render_cards(root)
    finally:
        licensing.registry.cache_clear()
