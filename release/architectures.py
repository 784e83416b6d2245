"""Architectures as data (``release/data/architectures/*.json``), in the manner of mergekit.

A description lists the tensors a model must have, their shapes as expressions over config.json,
which tensor may be tied to another, and which stored tensors are leftovers to drop. Adding an
architecture with the same kind of layout is adding a JSON file.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from release.errors import BadInputError


def data_file(*parts: str) -> Any:
    """Load a JSON data file shipped in ``release/data``."""
    path = resources.files("release").joinpath("data", *parts)
    return json.loads(path.read_text(encoding="utf-8"))


def project_folder(name: str, env: str, marker: str) -> Path:
    """A top-level folder of the project that holds data shipped as files (``licenses/``,
    ``model_cards/``), found beside the ``release`` package; ``$env`` points elsewhere."""
    folder = Path(os.environ[env]) if os.environ.get(env) else Path(__file__).resolve().parents[1] / name
    if not (folder / marker).is_file():
        raise BadInputError(f"{folder}: no {marker} here; set {env} to the project's {name}/ folder")
    return folder


@cache
def registry() -> dict[str, dict[str, Any]]:
    folder = resources.files("release").joinpath("data", "architectures")
    out = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            spec = json.loads(entry.read_text(encoding="utf-8"))
            out[spec["name"]] = spec
    return out


_TOKEN = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*|\d+|[*/])\s*")


def evaluate(expr: str | int, values: dict[str, Any]) -> int:
    """Evaluate ``a * b / c`` over config values (left to right, integer division must be exact)."""
    if isinstance(expr, int):
        return expr
    tokens = _TOKEN.findall(expr)
    if "".join(tokens) != re.sub(r"\s+", "", expr):
        raise ValueError(f"bad shape expression {expr!r}")

    def operand(tok: str) -> int:
        if tok.isdigit():
            return int(tok)
        value = values.get(tok)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadInputError(f"config.json: {tok} is missing or not an integer")
        return value

    result = operand(tokens[0])
    for op, tok in zip(tokens[1::2], tokens[2::2], strict=True):
        value = operand(tok)
        if op == "*":
            result *= value
        elif value == 0 or result % value:
            raise BadInputError(f"config.json: {expr} is not a whole number ({result} / {value})")
        else:
            result //= value
    return result


@dataclass
class ExpectedTensor:
    name: str
    shape: tuple[int, ...]
    tied_to: str | None = None  # set when the config ties this tensor to another


@dataclass
class Architecture:
    """An architecture description bound to one config.json."""

    name: str
    spec: dict[str, Any]
    config: dict[str, Any]
    values: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [k for k in self.spec.get("required_config", []) if k not in self.config]
        if missing:
            raise BadInputError(f"config.json lacks {', '.join(missing)} required for {self.name}")
        values = dict(self.config)
        # transformers 5 moved rope_theta (and the scaling type) into a nested rope_parameters dict.
        for k, v in (self.config.get("rope_parameters") or {}).items():
            values.setdefault(k, v)
        for key, default in self.spec.get("config_defaults", {}).items():
            if values.get(key) is None:
                values[key] = evaluate(default, values) if isinstance(default, str) else default
        self.values = values

    @property
    def num_layers(self) -> int:
        return evaluate(self.spec["layer_count"], self.values)

    def expected(self) -> dict[str, ExpectedTensor]:
        """Every tensor a checkpoint of this config holds (tied ones included, marked)."""
        out: dict[str, ExpectedTensor] = {}

        def add(name: str, entry: dict[str, Any]) -> None:
            when = entry.get("when")
            if when and not self.values.get(when):
                return
            shape = tuple(evaluate(d, self.values) for d in entry["shape"])
            tied = entry.get("tied_to") if self.values.get(entry.get("tied_when", ""), False) else None
            out[name] = ExpectedTensor(name, shape, tied)

        for name, entry in self.spec.get("tensors", {}).items():
            add(name, entry)
        for layer in range(self.num_layers):
            for pattern, entry in self.spec.get("layer_tensors", {}).items():
                add(pattern.format(layer=layer), entry)
        return out

    def ignored_reason(self, name: str) -> str | None:
        for pattern, reason in self.spec.get("ignored_tensors", {}).items():
            if fnmatch.fnmatchcase(name, pattern.replace("{layer}", "*")):
                return reason
        return None


def resolve(config: dict[str, Any]) -> Architecture:
    """Find the description matching config.json's ``architectures`` / ``model_type``."""
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for name, spec in registry().items():
        if any(a in spec["architectures"] for a in archs) or (not archs and model_type in spec["model_types"]):
            return Architecture(name, spec, config)
    known = sorted(a for spec in registry().values() for a in spec["architectures"])
    what = ", ".join(archs) if archs else f"model_type {model_type!r}"
    raise BadInputError(
        f"unknown architecture {what} (supported: {', '.join(known)})",
        hint="describe it in release/data/architectures/<name>.json",
    )
