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

from release.cards import render_cards
from release.datafiles import data_file
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
    registry = json.loads((LICENSES / "registry.json").read_text())["licenses"]
    shipped = {f["source"] for lic in registry.values() for f in lic["files"]}
    assert sorted(pinned_sources()) == sorted(shipped)
    for name in pinned_sources():
        verbatim(name)
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

    licensing._shipped_registry.cache_clear()  # the registry file is read once per process
    try:
        root = release_dir(tmp_path, tiny, SMOL)
        with pytest.raises(CheckFailedError, match="differs from its pinned text"):
            render_cards(root)
    finally:
        licensing._shipped_registry.cache_clear()


# ---- Llama 3.x, MIT, custom licenses, embedded licenses (issue 13) ------------------------------

MEDITRON3 = {
    "name": "Llama-3.1-Meditron3-mini",
    "version": "1.0",
    "license": "llama3.1",
    "repo_url": "https://huggingface.co/example/Llama-3.1-Meditron3-mini",
    "base_models": [{"name": "Llama-3.1-8B", "organization": "meta-llama", "license": "llama3.1"}],
}


LLAMA3_VERSIONS = [
    ("llama3", "LLAMA3", "Meta Llama 3"),
    ("llama3.1", "LLAMA3_1", "Llama 3.1"),
    ("llama3.2", "LLAMA3_2", "Llama 3.2"),
    ("llama3.3", "LLAMA3_3", "Llama 3.3"),
]


@pytest.mark.parametrize(("lic", "stem", "version"), LLAMA3_VERSIONS)
def test_llama3_derivative_ships_agreement_policy_notice_and_built_with_llama(tmp_path, tiny, cli, lic, stem, version):
    meta = {**MEDITRON3, "license": lic, "base_models": [{"name": "Llama-3-base", "license": lic}]}
    root = release_dir(tmp_path, tiny, meta, gguf_dir=True)
    r = cli("card", root)
    assert r.exit_code == 0, r.stderr
    for folder in (root / "model", root / "gguf"):
        assert (folder / "LICENSE").read_bytes() == verbatim(f"{stem}_COMMUNITY_LICENSE.txt")
        assert (folder / "USE_POLICY.md").read_bytes() == verbatim(f"{stem}_USE_POLICY.md")
        notice = (folder / "NOTICE").read_text().strip()
        # The attribution sentence is the one the agreement itself quotes (section 1.b.iii).
        assert (
            notice.startswith(f"{version} is licensed under")
            and f"“{notice}”" in verbatim(f"{stem}_COMMUNITY_LICENSE.txt").decode()
        )
        card = ModelCard.load(folder / "README.md")
        assert card.data.license == lic and "**Built with Llama**" in card.text


def test_llama3_derivative_name_must_begin_with_llama(tmp_path, cli):
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump({**MEDITRON3, "name": "Meditron3-8B"}))
    r = cli("license", "check", path)
    assert r.exit_code == 1
    assert "'Meditron3-8B'" in r.error_lines[-1] and '"Llama" at the beginning of its name' in r.error_lines[-1]
    assert "section 1.b.i" in r.error_lines[-1]


def test_llama3_weights_cannot_be_relicensed_or_merged_with_llama2(tmp_path, cli):
    path = tmp_path / "release.yaml"
    path.write_text(yaml.safe_dump({**MEDITRON3, "license": "apache-2.0"}))
    r = cli("license", "check", path)
    assert r.exit_code == 1 and "declare license llama3.1" in r.error_lines[-1]
    merged = {**MEDITRON3, "license": None, "base_models": [*MEDITRON3["base_models"], MEDITRON["base_models"][0]]}
    path.write_text(yaml.safe_dump(merged))
    r = cli("license", "check", path)
    assert r.exit_code == 1 and "cannot be merged" in r.stderr


def test_mit_license_carries_the_base_models_copyright(tmp_path, tiny, cli):
    meta = {"name": "Phi-3-Meditron-mini", "license": "mit",
            "base_models": [{"name": "Phi-3-mini-4k-instruct", "organization": "microsoft", "license": "mit",
                             "copyright": "Copyright (c) Microsoft Corporation."}]}  # fmt: skip
    root = release_dir(tmp_path, tiny, meta)
    assert cli("card", root).exit_code == 0
    text = (root / "model" / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) Microsoft Corporation.\n\nPermission is hereby granted")
    assert "{copyright}" not in text and ModelCard.load(root / "model" / "README.md").data.license == "mit"
    no_line = {**meta, "base_models": [{**meta["base_models"][0], "copyright": None}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(no_line))
    r = cli("license", "check", tmp_path / "r.yaml")
    assert r.exit_code == 1 and "base_models[].copyright" in r.error_lines[-1]


def test_custom_license_is_shipped_hashed_and_named_on_the_hub(tmp_path, tiny, cli):
    (tmp_path / "terms").mkdir()
    terms = tmp_path / "terms" / "gemma-terms.txt"
    terms.write_text("Gemma Terms of Use (a stand-in text for the test)\n")
    meta = {"name": "Gemma-Meditron-mini", "license": "gemma",
            "repo_url": "https://huggingface.co/example/Gemma-Meditron-mini",
            "licenses": [{"id": "gemma", "name": "Gemma Terms of Use", "link": "https://ai.google.dev/gemma/terms",
                          "text": "../terms/gemma-terms.txt"}],
            "base_models": [{"name": "gemma-2-9b", "organization": "google", "license": "gemma"}]}  # fmt: skip
    root = release_dir(tmp_path, tiny, meta)
    r = cli("card", root)
    assert r.exit_code == 0, r.stderr
    assert (root / "model" / "LICENSE").read_bytes() == terms.read_bytes()
    data = ModelCard.load(root / "model" / "README.md").data
    assert (data.license, data.license_name, data.license_link) == (
        "other",
        "gemma",
        "https://ai.google.dev/gemma/terms",
    )
    assert cli("manifest", root).exit_code == 0
    manifest = json.loads((root / "model" / "release-manifest.json").read_text())
    assert {f["path"]: f["sha256"] for f in manifest["files"]}["LICENSE"] == sha256(terms)
    # Declared under a permissive license instead: refused, as for any propagating license.
    (root / "release.yaml").write_text(yaml.safe_dump({**meta, "license": "apache-2.0"}))
    r = cli("license", "check", root / "release.yaml")
    assert r.exit_code == 1 and "declare license gemma" in r.error_lines[-1]


def test_artefacts_whose_embedded_license_disagrees_are_refused(tmp_path, tiny, cli):
    """A folder built under apache-2.0 cannot be re-carded as llama2 (`card --metadata`): its
    weights still say apache-2.0. manifest refuses such files naming the file and both licenses,
    and so do sign and publish (a manifest forged to agree with the card does not help)."""
    root = release_dir(tmp_path, tiny, {**SMOL, "repo_url": "https://huggingface.co/example/SmolLM2-mini"})
    assert cli("card", root).exit_code == 0 and cli("manifest", root).exit_code == 0
    signed_before = json.loads((root / "model" / "release-manifest.json").read_text())
    card_before = (root / "model" / "README.md").read_bytes()
    relicensed = tmp_path / "relicensed.yaml"
    relicensed.write_text(yaml.safe_dump({**MEDITRON, "name": "SmolLM2-mini"}))
    r = cli("card", root, "--metadata", relicensed)
    assert r.exit_code == 1 and len(r.error_lines) == 1, r.stderr
    line = r.error_lines[0]
    assert "model.safetensors" in line and "'apache-2.0'" in line and "'llama2'" in line
    assert (root / "model" / "README.md").read_bytes() == card_before  # no card was written
    # The release file itself relicensed: manifest refuses the files.
    (root / "release.yaml").write_text(relicensed.read_text())
    (root / "model" / "release-manifest.json").unlink()
    r = cli("manifest", root)
    assert r.exit_code == 1
    line = r.error_lines[-1]
    assert "model.safetensors" in line and "'apache-2.0'" in line and "'llama2'" in line
    assert not (root / "model" / "release-manifest.json").exists()
    from release.signing import keygen, sign_folder

    priv, _ = keygen(tmp_path / "keys")
    signed_before["licenses"]["weights"] = "llama2"  # a manifest that agrees with the card, not the weights
    (root / "model" / "release-manifest.json").write_text(json.dumps(signed_before))
    with pytest.raises(CheckFailedError, match=r"embedded license is 'apache-2\.0'"):
        sign_folder(root / "model", private_key=priv)


def test_a_card_that_disagrees_is_not_sealed_or_published(tmp_path, tiny, cli):
    """Weights and release file say apache-2.0; the card (edited, or left from another release
    file) says llama2: manifest, sign and publish each refuse it in one line naming the card."""
    root = release_dir(tmp_path, tiny, {**SMOL, "repo_url": "https://huggingface.co/example/SmolLM2-mini"})
    assert cli("card", root).exit_code == 0 and cli("manifest", root).exit_code == 0
    from release.signing import keygen, sign_folder

    priv, _ = keygen(tmp_path / "keys")
    sign_folder(root / "model", private_key=priv)
    card = root / "model" / "README.md"
    text = card.read_text()
    assert "\nlicense: apache-2.0\n" in text
    card.write_text(text.replace("\nlicense: apache-2.0\n", "\nlicense: llama2\n", 1))
    wrong = r"README\.md: the card says license 'llama2', but the release's weights are under 'apache-2\.0'"
    r = cli("manifest", root)
    assert r.exit_code == 1 and len(r.error_lines) == 1 and re.search(wrong, r.error_lines[0]), r.stderr
    with pytest.raises(CheckFailedError, match=wrong):
        sign_folder(root / "model", private_key=priv)
    # A manifest that lists this card (written before the check, or by hand) is still refused by publish.
    manifest = json.loads((root / "model" / "release-manifest.json").read_text())
    entry = next(f for f in manifest["files"] if f["path"] == "README.md")
    entry.update(sha256=sha256(card), size=card.stat().st_size)
    (root / "model" / "release-manifest.json").write_text(json.dumps(manifest))
    (root / "model" / "release.sig").unlink()
    r = cli("publish", root, "--endpoint", f"local:{tmp_path / 'hub'}", "--allow-unsigned")
    assert r.exit_code == 1 and len(r.error_lines) == 1 and re.search(wrong, r.error_lines[0]), r.stderr
    assert not (tmp_path / "hub").exists() or not list((tmp_path / "hub").rglob("*.safetensors"))
    card.write_text(text)  # the card put back: sealed again
    assert cli("manifest", root).exit_code == 0


def test_gguf_embedded_license_is_read_from_the_header(tmp_path, tiny, smollm2):
    from release.agreement import check_embedded_licenses, gguf_license
    from release.formats.gguf import write_gguf

    src, _, _ = tiny("st-single", vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(smollm2.hf / name, src / name)
    meta = ReleaseMetadata(name="m", license="apache-2.0")
    write_gguf(src, tmp_path / "g", ["Q8_0"], metadata=meta)
    path = tmp_path / "g" / "m-Q8_0.gguf"
    import gguf

    fields = gguf.GGUFReader(path).fields  # the independent reader (it decodes the 49k-token vocabulary)
    assert gguf_license(path) == fields["general.license"].contents() == "apache-2.0"
    # The same header read gives the manifest its provenance keys, as GGUFReader reads them.
    from release.agreement import recorded_hashes

    hashes = {k: fields[f"model_release.{k}"].contents() for k in ("source_checkpoint_hash",)}
    assert recorded_hashes(tmp_path / "g", "gguf") == hashes and hashes["source_checkpoint_hash"].startswith("blake3:")
    check_embedded_licenses(tmp_path / "g", "apache-2.0")
    with pytest.raises(CheckFailedError, match=r"m-Q8_0\.gguf: its embedded license is 'apache-2.0'.*'llama3\.1'"):
        check_embedded_licenses(tmp_path / "g", "llama3.1")


def test_meditron3_example_is_a_valid_llama31_release(cli, tmp_path):
    from release.pipeline import load_release_file

    example = LICENSES.parent / "examples" / "meditron3-llama3.1-release.yaml"
    rf = load_release_file(example)
    assert rf.meta.license == "llama3.1" and rf.meta.name.startswith("Llama")
    r = cli("license", "check", example, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["display"] == "Built with Llama"
    renamed = tmp_path / "release.yaml"
    renamed.write_text(example.read_text().replace("name: Llama-3.1-Meditron3-8B", "name: Meditron3-8B"))
    r = cli("build", renamed, "-o", tmp_path / "dist")
    assert r.exit_code == 1 and '"Llama" at the beginning of its name' in r.error_lines[-1]
    assert not (tmp_path / "dist").exists()
