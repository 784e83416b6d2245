"""License registry and lineage policy.

The registry (``licenses/registry.json``) and the verbatim texts live in ``licenses/`` at the top
of the project. The policy is small and explicit: weights inherit every propagating license of
their base models (a Llama 2 derivative is under the Llama 2 Community License whatever else it
adds); a declared weights license that drops an inherited one is a violation; code is under its
own license (Apache-2.0 by default). The decision lists the files and the notice each release
folder must carry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from release.datafiles import project_folder
from release.errors import BadInputError, CheckFailedError


def licenses_dir() -> Path:
    """``licenses/`` of the project (override: $MODEL_RELEASE_LICENSES)."""
    return project_folder("licenses", "MODEL_RELEASE_LICENSES", "registry.json")


@cache
def _shipped_registry() -> dict[str, dict[str, Any]]:
    return json.loads((licenses_dir() / "registry.json").read_text(encoding="utf-8"))["licenses"]


# Licenses a release file declares itself (the Gemma Terms of Use, ...): id -> registry-shaped entry.
_CUSTOM: dict[str, dict[str, Any]] = {}


def registry() -> dict[str, dict[str, Any]]:
    return {**_shipped_registry(), **_CUSTOM}


def register_custom(lic: dict[str, Any], base: Path) -> dict[str, Any]:
    """A license the registry cannot ship, declared in a release file with ``id``, ``name``,
    ``link`` and ``text`` (a path relative to the release file). Its text ships as LICENSE, pinned
    to the sha256 it has now; on the Hub it is ``license: other`` with that name and link."""
    missing = [k for k in ("id", "name", "link", "text") if not lic.get(k)]
    if missing:
        raise BadInputError(f"custom license {lic.get('id', '?')!r} lacks {', '.join(missing)}")
    if lic["id"] in _shipped_registry():
        raise BadInputError(f"custom license id {lic['id']!r} is a registry license; use it by its id")
    text = (base / lic["text"]).resolve()
    if not text.is_file():
        raise BadInputError(f"custom license {lic['id']!r}: text file {text} does not exist")
    entry = {
        "name": lic["name"], "spdx": None, "hf_id": None, "link": lic["link"],
        "propagates": bool(lic.get("propagates", True)),
        "files": [{"source": str(text), "ship_as": "LICENSE", "sha256": hashlib.sha256(text.read_bytes()).hexdigest()}],
        "notice": lic.get("notice"), "custom": True,
        "obligations": [f"Follow the {lic['name']} ({lic['link']}), shipped as LICENSE with every copy."],
    }  # fmt: skip
    _CUSTOM[lic["id"]] = entry
    return entry


def license_info(license_id: str) -> dict[str, Any]:
    """Registry entry of a Hugging Face license id; unknown ids are refused, never guessed."""
    known = registry()
    if license_id not in known:
        raise BadInputError(f"unknown license {license_id!r} (known: {', '.join(sorted(known))})")
    return known[license_id]


@dataclass
class ShippedFile:
    name: str  # name in the release folder
    source: str  # path of the verbatim text, or "generated" for NOTICE
    license: str


@dataclass
class LicenseDecision:
    weights_license: str | None
    code_license: str
    inherited: dict[str, list[str]]  # license id -> base models it comes from
    files: list[ShippedFile] = field(default_factory=list)
    notice: str | None = None
    display: str | None = None  # a phrase the agreement asks every release to show ("Built with Llama")
    copyright: list[str] = field(default_factory=list)  # lines for a license text that needs them (MIT)
    obligations: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **asdict(self)}

    def raise_for_violations(self) -> None:
        if self.violations:
            raise CheckFailedError("license check failed: " + " ".join(self.violations))


def decide(meta: Any) -> LicenseDecision:
    """The licenses a release's weights and code must carry, from its declared license and lineage."""
    inherited: dict[str, list[str]] = {}
    for base in meta.base_models:
        if base.license and license_info(base.license).get("propagates"):
            inherited.setdefault(base.license, []).append(base.name)
    declared = meta.license
    if declared:
        license_info(declared)
    violations = []
    for lic, bases in inherited.items():
        if declared and declared != lic:
            violations.append(
                f"The weights are declared {declared}, but they descend from {', '.join(bases)} under {lic} "
                f"({license_info(lic)['name']}), whose terms bind every derivative (its agreement, notice and "
                f"policy must ship with it): declare license {lic}."
            )
    if len(inherited) > 1:
        violations.append(
            f"Base models under different propagating licenses ({', '.join(inherited)}) cannot be merged."
        )
    weights = declared or (next(iter(inherited)) if len(inherited) == 1 else None)
    if weights is None:
        violations.append("No license for the weights: declare one, or name base models with their licenses.")
    code = getattr(meta, "code_license", None) or "apache-2.0"
    license_info(code)
    decision = LicenseDecision(weights, code, inherited, violations=violations)
    if weights:
        info = license_info(weights)
        prefix = info.get("name_prefix")
        name = getattr(meta, "name", None) or ""
        if prefix and not name.startswith(prefix):
            violations.append(
                f"The model is named {name!r}, but the {info['name']} (section 1.b.i) asks that a model built "
                f'from it and distributed have "{prefix}" at the beginning of its name: rename it, e.g. '
                f"{prefix}-{name}."
            )
        decision.display = info.get("display")
        if info.get("copyright_from_base"):
            decision.copyright = [b.copyright for b in meta.base_models if getattr(b, "copyright", None)]
            if not decision.copyright:
                violations.append(
                    f"The {info['name']} text must carry the copyright line of the work: declare it as "
                    'base_models[].copyright (e.g. "Copyright (c) Microsoft Corporation.").'
                )
        decision.files = [ShippedFile(f["ship_as"], f["source"], weights) for f in info["files"]]
        decision.notice = info.get("notice")
        if decision.notice:
            decision.files.append(ShippedFile("NOTICE", "generated", weights))
        decision.obligations = list(info.get("obligations", []))
    return decision


def write_license_files(decision: LicenseDecision, folder: Path) -> list[str]:
    """Copy the verbatim texts (checked against their pinned sha256) and NOTICE into a release folder."""
    from release.atomic import atomic_file

    decision.raise_for_violations()
    written = []
    pins = {f["source"]: f["sha256"] for lic in registry().values() for f in lic["files"]}
    for f in decision.files:
        if f.source == "generated":
            data = (decision.notice or "").encode() + b"\n"
        else:
            data = (licenses_dir() / f.source).read_bytes()  # a custom license's source is absolute
            if hashlib.sha256(data).hexdigest() != pins[f.source]:
                raise CheckFailedError(f"{f.source} differs from its pinned text; licenses ship verbatim")
            if b"{copyright}" in data:  # the MIT text: its copyright line comes from the base model
                data = data.replace(b"{copyright}", "\n".join(decision.copyright).encode())
        with atomic_file(folder / f.name, force=True) as tmp:
            tmp.write_bytes(data)
        written.append(f.name)
    return written


def apply_policy(meta: Any) -> Any:
    """The metadata every writer records: the decided weights license filled in; violations raise
    (exit 1) before anything is written. Metadata naming no license and no lineage passes as is."""
    if not meta.license and not meta.base_models:
        return meta
    decision = decide(meta)
    decision.raise_for_violations()
    return meta.with_(license=decision.weights_license)
