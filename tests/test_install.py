"""Install profiles: help and argument parsing import no heavy library, every extra a message can
name exists, and a command whose extra is missing says which one in one line (simulated here by
hiding the module; tests/test_hub.py runs the real base install in a fresh venv)."""

from __future__ import annotations

import json
import subprocess
import sys

import tomllib

from release.datafiles import data_file
from tests.conftest import ROOT

HEAVY = ("torch", "transformers", "llama_cpp", "gptqmodel", "matplotlib", "accelerate", "jinja2")


def _probe(*args: str, hide: str | None = None) -> dict:
    """Run the CLI in a child process with ``args``; report its exit code, stderr and heavy imports."""
    code = f"""
import json, sys
if {hide!r}:
    sys.modules[{hide!r}] = None  # importing it now raises ModuleNotFoundError, as when not installed
sys.argv = ["model-release", *{list(args)!r}]
from release.cli import main
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if sys.modules.get(m)]}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    return out | {"stderr": p.stderr}


def test_help_imports_nothing_heavy():
    for args in (["--help"], ["fetch", "--help"], ["gguf", "--help"], ["validate", "--help"], ["build", "--help"]):
        r = _probe(*args)
        assert r["code"] == 0 and r["heavy"] == [], (args, r)


def test_every_extra_named_exists_in_pyproject():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    table = data_file("extras.json")
    named = set(table["commands"].values()) | set(table["modules"].values())
    assert named <= set(extras), named - set(extras)
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not [d for d in base if d.split(">")[0].split("=")[0] in ("torch", "transformers", "llama-cpp-python")]


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    r = _probe("gguf", str(tmp_path), "-o", str(tmp_path / "out"), "-t", "Q8_0", hide="torch")
    errors = [line for line in r["stderr"].splitlines() if line.startswith("error:")]
    assert r["code"] == 2 and "Traceback" not in r["stderr"], r
    assert errors == ["error: `model-release gguf` needs torch, which this install leaves out: "
                      "pip install 'model-release[gguf]'"]  # fmt: skip
    r = _probe("validate", str(tmp_path / "x.gguf"), "-r", str(tmp_path / "r.safetensors"), "--json", hide="torch")
    assert r["code"] == 2
    assert not (tmp_path / "out").exists()


def test_jsonschema_checks_iris_without_compiling_grammars_at_import():
    """release.deferred: importing jsonschema after release does not compile rfc3987_syntax's Lark
    grammars (1.1-1.5 s per process), and the IRI formats the CycloneDX schema uses are still
    checked by rfc3987_syntax itself once one is asked for."""
    code = """
import json, sys, time
import release, jsonschema
loaded = "lark" in sys.modules
fc = jsonschema.Draft7Validator.FORMAT_CHECKER
bad = fc.conforms("http://example.com/a b", "iri-reference")
good = fc.conforms("https://example.com/caf\\u00e9?x=1#f", "iri")
print(json.dumps({"lark_at_import": loaded, "bad": bad, "good": good, "lark_after": "lark" in sys.modules}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(p.stdout) == {"lark_at_import": False, "bad": False, "good": True, "lark_after": True}
