"""Architectures as data (``release/data/architectures/*.json``), in the manner of mergekit.

A description lists the tensors a model must have, their shapes as expressions over config.json,
which tensor may be tied to another, and which stored tensors are leftovers to drop. Adding an
architecture with the same kind of layout is adding a JSON file. A description may ``extends``
another (``llama``): dictionaries merge key by key, and ``null`` removes an inherited entry.

``requires`` lists conditions over config values (``a == b or c == d``) that the runtimes we
write for need; a config that breaks one is refused with its ``why`` rather than converted into
a file that computes something else.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from release.datafiles import data_dir
from release.errors import BadInputError


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@cache
def registry() -> dict[str, dict[str, Any]]:
    folder = data_dir("architectures")
    raw = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            spec = json.loads(entry.read_text(encoding="utf-8"))
            raw[spec["name"]] = spec

    def full(name: str) -> dict[str, Any]:
        spec = raw[name]
        parent = spec.get("extends")
        return _merge(full(parent), spec) if parent else spec

    return {name: full(name) for name in sorted(raw)}


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Pow: operator.pow}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}  # fmt: skip


def _evaluate(expr: str, lookup: Callable[[str], Any], divide: Callable[[Any, Any], Any]) -> Any:
    """The one evaluator of the expressions in the data (shapes, scales, ``requires``): config
    names (through ``lookup``), numbers, + - * / **, comparisons and and/or/not, walked node by
    node; nothing else parses, and Python's ``eval`` is never called."""
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError:
        raise ValueError(f"bad expression {expr!r}") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            return lookup(node.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return divide(ev(node.left), ev(node.right))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not ev(node.operand)
        if isinstance(node, ast.BoolOp):  # Python's and/or: the deciding operand, short-circuited
            value = ev(node.values[0])
            for operand in node.values[1:]:
                if bool(value) != isinstance(node.op, ast.And):
                    return value
                value = ev(operand)
            return value
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            left = ev(node.left)
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = ev(right_node)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        raise ValueError(f"bad expression {expr!r}: {type(node).__name__} is not allowed")

    return ev(tree)


def evaluate(expr: str | int, values: dict[str, Any]) -> int:
    """Evaluate a shape expression (``a * b + 2 * c``) over config values; a division must be exact."""
    if isinstance(expr, int):
        return expr

    def integer(name: str) -> int:
        value = values.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadInputError(f"config.json: {name} is missing or not an integer")
        return value

    def exact(a: int, b: int) -> int:
        if b == 0 or a % b:
            raise BadInputError(f"config.json: {expr} is not a whole number ({a} / {b})")
        return a // b

    result = _evaluate(expr, integer, exact)
    if not isinstance(result, int) or isinstance(result, bool):
        raise ValueError(f"bad shape expression {expr!r}: not an integer")
    return result


def eval_number(expr: str, values: dict[str, Any]) -> float:
    """A float expression over config values (``hidden_size ** 0.5``)."""

    def number(name: str) -> float:
        value = values.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise BadInputError(f"cannot evaluate {expr!r} over config.json ({name} is not a number)")
        return float(value)

    return float(_evaluate(expr, number, operator.truediv))


def check(expr: str, values: dict[str, Any]) -> bool:
    """Evaluate a ``requires`` condition: names are config values (None when absent); a
    comparison with an absent value is false."""
    try:
        return bool(_evaluate(expr, values.get, operator.truediv))
    except (TypeError, ZeroDivisionError):
        return False


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
        # transformers 5 moved rope_theta (and the scaling type) into a nested rope_parameters dict,
        # one per layer type for models with local and global layers (Gemma 3): the global layers'
        # are the model's, the local layers' get a _swa suffix.
        rope = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        if isinstance(rope.get("full_attention"), dict):
            for k, v in (rope.get("sliding_attention") or {}).items():
                values.setdefault(f"{k}_swa", v)
            rope = rope["full_attention"]
        for k, v in rope.items():
            values.setdefault(k, v)
        if isinstance(values.get("rope_scaling"), dict) and "rope_type" not in values:
            values["rope_type"] = values["rope_scaling"].get("rope_type") or values["rope_scaling"].get("type")
        if isinstance(values.get("layer_types"), list):
            values["swa_layers"] = [t == "sliding_attention" for t in values["layer_types"]]
        for key, default in self.spec.get("config_defaults", {}).items():
            if values.get(key) is None:
                values[key] = evaluate(default, values) if isinstance(default, str) else default
        self.values = values
        for req in self.spec.get("requires", []):
            if not check(req["check"], values):
                raise BadInputError(f"config.json: {self.name} needs {req['check']}: {req['why']}")

    @property
    def attention(self) -> str:
        """transformers' attention kernel for this model: sdpa unless the description says otherwise
        (Gemma 2's soft-capped attention runs only in the eager implementation)."""
        return str(self.spec.get("attention", "sdpa"))

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
