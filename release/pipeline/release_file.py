"""The release file: YAML (or JSON) checked against its JSON Schema, errors naming the key and its
line, licenses decided from the lineage before any heavy work."""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from release.datafiles import data_file
from release.errors import BadInputError, CheckFailedError
from release.licensing import decide
from release.metadata import ReleaseMetadata


def _line_of(node: Any, path: list[Any], key: str | None = None) -> int | None:
    """Line (1-based) of the YAML node at ``path``, or of the mapping key ``key`` inside it."""
    import yaml

    for part in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return None
        if node is None:
            return None
    if key is not None and isinstance(node, yaml.MappingNode):
        node = next((k for k, _ in node.value if k.value == key), node)
    return node.start_mark.line + 1


@dataclass
class ReleaseFile:
    path: Path
    data: dict[str, Any]
    meta: ReleaseMetadata

    @property
    def name(self) -> str:
        return str(self.data["release"]["name"])

    @property
    def version(self) -> str:
        return str(self.data["release"]["version"])

    def section(self, key: str) -> dict[str, Any]:
        return dict(self.data.get(key) or {})

    def relative(self, value: str) -> Path:
        p = Path(os.path.expandvars(value)).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)

    def source(self) -> Path:
        src = self.data["source"]
        if "fixture" in src:
            from release import fixtures

            fx = fixtures.smollm2()
            return fx.bin if src["fixture"] == "smollm2-bin" else fx.hf
        path = self.relative(src["path"])
        if not path.exists():
            raise BadInputError(f"{self.path}:{self.line(['source', 'path'])}: source {path} does not exist")
        return path

    def line(self, path: list[Any]) -> int | str:
        import yaml

        try:
            node = yaml.compose(self.path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            return "?"
        return _line_of(node, path) or "?"

    def signing_key(self, override: Path | None = None) -> Path | None:
        if override is not None:
            return override
        s = self.section("signing")
        if s.get("key_env") and os.environ.get(s["key_env"]):
            return Path(os.environ[s["key_env"]])
        return self.relative(s["key"]) if s.get("key") else None


def load_release_file(path: Path) -> ReleaseFile:
    """Parse, check against the JSON Schema (errors name the key and its line), decide licenses."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        node = yaml.compose(text) if path.suffix in (".yaml", ".yml") else None
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read the release file ({exc})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: a release file is a mapping (release, source, variants, ...)")
    errors = sorted(
        jsonschema.Draft202012Validator(data_file("schemas", "release_file.schema.json")).iter_errors(data),
        key=lambda e: list(map(str, e.absolute_path)),
    )
    if errors:
        e = errors[0]
        where = list(e.absolute_path)
        extra = re.search(r"'([^']+)' (?:was|were) unexpected", e.message)
        line = _line_of(node, where, extra.group(1)) if (node is not None and extra) else None
        line = line or (_line_of(node, where) if node is not None else None)
        key = ".".join(map(str, [*where, *([extra.group(1)] if extra else [])])) or "(top level)"
        msg = f"unknown key {key!r}" if extra else f"{key}: {e.message}"
        raise BadInputError(f"{path}:{line or '?'}: {msg}", hint=f"schema: {len(errors)} problem(s) in all")
    meta = ReleaseMetadata.from_file(path)
    rf = ReleaseFile(path, data, meta)
    known = data_file("gguf", "types.json")["types"]
    for i, t in enumerate(((data.get("variants") or {}).get("gguf") or {}).get("types") or []):
        if t not in known:
            line = _line_of(node, ["variants", "gguf", "types", i]) if node is not None else None
            raise BadInputError(f"{path}:{line or '?'}: unknown GGUF type {t!r} (known: {', '.join(known)})")
    decision = decide(meta)
    if decision.violations:
        raise CheckFailedError(
            f"{path}:{rf.line(['release', 'license'])}: license check failed: {decision.violations[0]}"
        )
    return rf


def dist_copy(rf: ReleaseFile) -> bytes:
    """The release file the steps read (``--metadata``) from the dist folder: as written, except
    that custom license texts are named by absolute path (they are relative to the original)."""
    import yaml

    customs = (rf.data.get("release") or {}).get("licenses") or []
    if not customs:
        return rf.path.read_bytes()
    data = copy.deepcopy(rf.data)
    for lic in data["release"]["licenses"]:
        lic["text"] = str((rf.path.parent / lic["text"]).resolve())
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()
