"""Import-time work deferred to first use.

jsonschema imports ``rfc3987_syntax`` (installed by cyclonedx-python-lib's validation extra) for
its "iri" format checkers, and that module compiles 39 Lark grammars when imported: 1.1-1.5 s on
this 2-core machine in every process that imports jsonschema (build, card, manifest, sign, publish,
fetch, verify), although only the CycloneDX BOM's strict validation ever checks an IRI. A stand-in
module takes its name until the first IRI is checked; then the real one is imported and answers.
Nothing is rewritten: the check is rfc3987_syntax's own, only its import moves.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_NAME = "rfc3987_syntax"
_lock = threading.Lock()


def _real() -> types.ModuleType:
    with _lock:
        module = sys.modules.get(_NAME)
        if module is None or getattr(module, "__deferred__", False):
            sys.modules.pop(_NAME, None)
            module = importlib.import_module(_NAME)
        return module


def _is_valid_syntax(term: str, value: str) -> bool:
    """rfc3987_syntax.is_valid_syntax, the only name jsonschema takes from the module."""
    return _real().is_valid_syntax(term, value)


def defer_rfc3987_syntax() -> None:
    """Put the stand-in in ``sys.modules`` unless the real module is loaded or not installed."""
    if _NAME in sys.modules or importlib.util.find_spec(_NAME) is None:
        return
    stand_in = types.ModuleType(_NAME, "Stand-in for rfc3987_syntax until an IRI is checked (release.deferred).")
    stand_in.__deferred__ = True  # type: ignore[attr-defined]
    stand_in.is_valid_syntax = _is_valid_syntax  # type: ignore[attr-defined]
    sys.modules[_NAME] = stand_in
