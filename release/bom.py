"""`bom.cdx.json`: a CycloneDX 1.6 AI bill of materials for one release folder (one Hub repository),
for the tools clinical IT teams already run on software (SBOM scanners, Dependency-Track).

Each variant is a ``machine-learning-model`` component with its files (sha256), its license (SPDX id,
or ``LicenseRef-<id>`` for the Llama licenses, which have none), the base models as external
references, and a ``modelCard``: task and architecture, the evaluation and calibration data as
``data`` components, the measured KL, top-1 agreement and perplexity ratio against the source's
reference logits, and the intended use, the advisory notice and the limitations. The tools that
wrote the release are in ``formulation``.

The document is built as JSON: cyclonedx-python-lib's object model has no ``modelCard``, which is
the point of an AI BOM; it is then checked with that library's strict JSON validator (the format's
own schema) before it is written, so an invalid BOM is never shipped. It is written by ``manifest``
before the manifest, which lists and hashes it, so the signature covers it.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from release import TOOL_NAME
from release.agreement import REFERENCE, gguf_header_string
from release.atomic import atomic_file
from release.cards import MEDICAL_ADVISORY
from release.datafiles import data_file
from release.errors import BadInputError, CheckFailedError
from release.licensing import license_info
from release.metadata import ReleaseMetadata
from release.versions import library_versions

BOM = "bom.cdx.json"
SPEC = "1.6"
# The libraries whose versions made the files (what `formulation` names); absent ones are left out.
TOOLS = ("torch", "transformers", "safetensors", "gguf", "llama-cpp-python", "gptqmodel", "huggingface-hub")
LIMITATIONS = (
    "Quantized variants approximate the source model: the measured KL divergence, top-1 agreement and "
    "perplexity ratio against the source's reference logits say by how much, on the evaluation prompts only.",
    "Validated on the evaluation prompts in one runtime per format (transformers for safetensors and GPTQ, "
    "llama.cpp for GGUF); other runtimes and longer contexts were not measured.",
)


def _license(license_id: str | None) -> list[dict[str, Any]]:
    if not license_id:
        return []
    try:
        info = license_info(license_id)
    except BadInputError:  # a license the release file declares itself: no registry entry
        return [{"license": {"name": f"LicenseRef-{license_id}"}}]
    url = {"url": info["link"]} if info.get("link") else {}
    if info.get("spdx"):
        return [{"license": {"id": info["spdx"], **url}}]
    return [{"license": {"name": f"LicenseRef-{license_id}", **url}}]


def _tools() -> list[dict[str, Any]]:
    versions = library_versions(TOOLS)
    return [{"type": "application" if name == TOOL_NAME else "library", "name": name, "version": v}
            for name, v in versions.items()]  # fmt: skip


def _architecture(folder: Path, kind: str) -> tuple[str, str]:
    """(family, architecture) from config.json, or from a GGUF file's header."""
    if kind != "gguf" and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return str(config.get("model_type", "?")), str((config.get("architectures") or ["?"])[0])
    for g in sorted(folder.glob("*.gguf")):
        arch = gguf_header_string(g, "general.architecture") or "?"
        return arch, arch
    return "?", "?"


def _metrics(summary: dict[str, Any] | None) -> list[dict[str, str]]:
    if not summary:
        return []
    names = {"kl_mean": "mean KL divergence from the source (nats/token)",
             "top1_agreement": "top-1 agreement with the source",
             "perplexity_ratio": "perplexity ratio to the source"}  # fmt: skip
    return [{"type": label, "value": f"{summary[k]:.6g}", "slice": "model-release evaluation prompts"}
            for k, label in names.items() if k in summary]  # fmt: skip


def quantized_by_llama_cpp(gguf_type: str) -> bool:
    return (data_file("gguf", "types.json")["types"].get(gguf_type) or {}).get("via") == "llama.cpp"


def _file(f: dict[str, Any]) -> dict[str, Any]:
    return {"type": "file", "bom-ref": f"file:{f['path']}", "name": f["path"],
            "hashes": [{"alg": "SHA-256", "content": f["sha256"]}]}  # fmt: skip


def make_bom(
    folder: Path, meta: ReleaseMetadata, kind: str, repo: str, weights_license: str, variants: dict[str, Any],
    files: list[dict[str, Any]], source_hash: str | None,
) -> dict[str, Any]:  # fmt: skip
    """The BOM of a folder from what ``write_manifest`` gathered (files with sha256, variants with metrics)."""
    family, arch = _architecture(folder, kind)
    licenses = _license(weights_license)
    bases = [{"type": "model-card", "url": b.repo_url, "comment": f"base model: {b.name}"}
             for b in meta.base_models if b.repo_url]  # fmt: skip
    version = {"version": meta.version} if meta.version else {}
    data = []
    ref = next((f for f in files if f["path"] == REFERENCE), None)
    if ref is not None:
        data.append({"bom-ref": "data:evaluation", "type": "data", "name": "evaluation: the source's reference logits",
                     "hashes": [{"alg": "SHA-256", "content": ref["sha256"]}],
                     "data": [{"type": "dataset", "name": "model-release evaluation prompts",
                               "contents": {"attachment": {"content": REFERENCE}}}]})  # fmt: skip
    for f in files:
        if f["path"].endswith(".imatrix"):
            data.append({"bom-ref": "data:calibration", "type": "data", "name": f"calibration: {f['path']}",
                         "hashes": [{"alg": "SHA-256", "content": f["sha256"]}],
                         "data": [{"type": "dataset", "name": "importance matrix, calibration text"}]})  # fmt: skip
    use = meta.description or f"{meta.name}: a language model released with model-release."
    considerations: dict[str, Any] = {"useCases": [use], "technicalLimitations": list(LIMITATIONS)}
    if meta.domain == "medical":
        considerations["ethicalConsiderations"] = [{"name": MEDICAL_ADVISORY}]
    components = []
    for name, summary in variants.items():
        own = [f for f in files if f["variant"] == name]
        main = next((f for f in own if f["format"] in ("gguf", "safetensors")), own[0] if own else None)
        # The calibration data only for the variants quantized with it: llama.cpp's types, in a folder
        # that ships the importance matrix they were made with.
        calibrated = kind == "gguf" and quantized_by_llama_cpp(name)
        datasets = [{"ref": d["bom-ref"]} for d in data if d["bom-ref"] != "data:calibration" or calibrated]
        component: dict[str, Any] = {
            "bom-ref": f"model:{name}", "type": "machine-learning-model", "name": f"{meta.name}-{name}",
            **version, "licenses": licenses,
            "hashes": [{"alg": "SHA-256", "content": main["sha256"]}] if main else [],
            "properties": [{"name": "model-release:variant-kind", "value": (summary or {}).get("kind", kind)}]
            + ([{"name": "model-release:source-checkpoint-hash", "value": source_hash}] if source_hash else []),
            "externalReferences": bases,
            "modelCard": {
                "modelParameters": {"task": "text-generation", "architectureFamily": family,
                                    "modelArchitecture": arch, "datasets": datasets,
                                    "inputs": [{"format": "text"}], "outputs": [{"format": "text"}]},
                "quantitativeAnalysis": {"performanceMetrics": _metrics(summary)},
                "considerations": considerations,
            },
            "components": [_file(f) for f in own],
        }  # fmt: skip
        components.append(component)
    in_data = {REFERENCE} | {f["path"] for f in files if f["path"].endswith(".imatrix")}
    shared = [_file(f) for f in files if f["variant"] is None and f["path"] not in in_data]
    # The same files give the same serial number: the BOM is as reproducible as the release.
    seal = "".join(sorted(f["sha256"] for f in files))
    serial = uuid.uuid5(uuid.NAMESPACE_URL, f"https://huggingface.co/{repo}@{meta.version}#{seal}")
    tools = _tools()
    return {
        "$schema": f"http://cyclonedx.org/schema/bom-{SPEC}.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": SPEC,
        "serialNumber": f"urn:uuid:{serial}",
        "version": 1,
        "metadata": {
            "tools": {"components": tools},
            "component": {
                "bom-ref": f"repo:{repo}",
                "type": "machine-learning-model",
                "name": repo,
                **version,
                "licenses": licenses,
                "externalReferences": [{"type": "distribution", "url": f"https://huggingface.co/{repo}"}],
            },
        },
        "components": [*components, *data, *shared],
        "formulation": [{"bom-ref": "formulation", "components": tools}],
    }


def validate(bom: dict[str, Any]) -> None:
    """cyclonedx-python-lib's strict JSON validator (the CycloneDX 1.6 schema): raise on the first error."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom))
    if error is not None:
        raise CheckFailedError(f"{BOM}: not valid CycloneDX {SPEC}: {str(error).splitlines()[0][:300]}")


def write_bom(folder: Path, bom: dict[str, Any]) -> Path:
    validate(bom)
    with atomic_file(folder / BOM, force=True) as tmp:
        tmp.write_text(json.dumps(bom, indent=1) + "\n", encoding="utf-8")
    return folder / BOM
