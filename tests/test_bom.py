"""`bom.cdx.json`, the AI bill of materials in every release folder: valid CycloneDX 1.6 by
cyclonedx-python-lib's strict validator, in agreement with the folder's manifest (every file's sha256,
every variant with its measured KL, top-1 and perplexity ratio), listed and hashed by the manifest so
that the signature covers it; an invalid one is never written and an altered one is caught."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from tests.conftest import DEMO

FOLDERS = (DEMO, f"{DEMO}-GGUF", f"{DEMO}-GPTQ")


def _walk(components: list[dict]) -> dict[str, str]:
    """name -> SHA-256 of every file and data component, nested ones included."""
    out = {}
    for c in components:
        if c["type"] in ("file", "data") and c.get("hashes"):
            out[c["name"]] = c["hashes"][0]["content"]
        out |= _walk(c.get("components", []))
    return out


@pytest.mark.real_model
@pytest.mark.parametrize("folder", FOLDERS)
def test_every_folder_ships_a_valid_bom_that_agrees_with_its_manifest(demo_release, folder):
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    path = demo_release.dir / folder
    text = (path / "bom.cdx.json").read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    bom = json.loads(text)
    manifest = json.loads((path / "release-manifest.json").read_text())
    files = {f["path"]: f for f in manifest["files"]}
    # Listed and hashed by the manifest (so the signature covers it).
    assert files["bom.cdx.json"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    # Every other file of the folder, with the manifest's sha256.
    hashes = _walk(bom["components"])
    named = {name.split(": ", 1)[-1]: h for name, h in hashes.items()}  # data components: "calibration: FILE"
    evaluation = next(c for c in bom["components"] if c.get("bom-ref") == "data:evaluation")
    named["reference-logits.safetensors"] = evaluation["hashes"][0]["content"]
    for rel, f in files.items():
        if rel != "bom.cdx.json":
            assert named.get(rel) == f["sha256"], rel
    # One model component per variant, with the measured metrics and the license.
    models = {
        c["bom-ref"].removeprefix("model:"): c for c in bom["components"] if c["type"] == "machine-learning-model"
    }
    assert set(models) == set(manifest["variants"])
    for name, c in models.items():
        measured = {
            m["type"].split(" ")[0]: float(m["value"])
            for m in c["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]
        }
        v = manifest["variants"][name]
        assert measured["mean"] == pytest.approx(v["kl_mean"], rel=1e-5)
        assert measured["top-1"] == pytest.approx(v["top1_agreement"], rel=1e-5)
        assert c["licenses"] == [
            {"license": {"id": "Apache-2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"}}
        ]
        assert c["modelCard"]["modelParameters"]["architectureFamily"] == "llama"
        assert {"ref": "data:evaluation"} in c["modelCard"]["modelParameters"]["datasets"]
    assert {"model-release", "torch", "gguf"} <= {t["name"] for t in bom["formulation"][0]["components"]}
    # The GGUF k-quant was made with the importance matrix shipped beside it; Q8_0 was not.
    if folder.endswith("-GGUF"):
        assert {"ref": "data:calibration"} in models["Q4_K_M"]["modelCard"]["modelParameters"]["datasets"]
        assert {"ref": "data:calibration"} not in models["Q8_0"]["modelCard"]["modelParameters"]["datasets"]


@pytest.mark.real_model
def test_an_invalid_bom_is_not_written_and_an_altered_one_is_caught(demo_release, tmp_path):
    from release.bom import _license, validate
    from release.errors import CheckFailedError
    from release.manifest import check_files

    bom = json.loads((demo_release.dir / FOLDERS[1] / "bom.cdx.json").read_text())
    validate(bom)
    bom["components"][0]["type"] = "neural-network"  # not a CycloneDX component type
    with pytest.raises(CheckFailedError, match=r"not valid CycloneDX 1\.6"):
        validate(bom)
    # The Llama licenses have no SPDX id: a LicenseRef, with the license's own link.
    assert _license("llama2") == [
        {"license": {"name": "LicenseRef-llama2", "url": "https://ai.meta.com/llama/license/"}}
    ]

    folder = tmp_path / "gguf"
    shutil.copytree(demo_release.dir / FOLDERS[1], folder)
    manifest = json.loads((folder / "release-manifest.json").read_text())
    check_files(folder, manifest)
    altered = json.loads((folder / "bom.cdx.json").read_text())
    altered["components"][0]["modelCard"]["quantitativeAnalysis"]["performanceMetrics"][0]["value"] = "0.0001"
    (folder / "bom.cdx.json").write_text(json.dumps(altered, indent=1) + "\n")
    with pytest.raises(CheckFailedError, match=r"changed: bom\.cdx\.json"):
        check_files(folder, manifest)
