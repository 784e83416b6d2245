"""The GitHub workflows stay clean under the field's linters: actionlint (syntax, expressions,
runner labels from .github/actionlint.yaml, deprecated action runtimes) and zizmor's offline audits
(unpinned actions, broad token permissions, persisted credentials, template injection ...), failing
on any finding of medium or high severity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

WORKFLOWS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / ".github" / "workflows").glob("*.y*ml"))
# Composite actions (the release action other repositories use): zizmor audits them too.
ACTIONS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / ".github" / "actions").glob("*/action.y*ml"))


def _tool(name: str) -> str:
    here = Path(sys.executable).parent / name  # installed by the test extra into this venv
    found = str(here) if here.is_file() else shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[test]')"
    return found


def test_there_are_workflows():
    assert ".github/workflows/release.yml" in WORKFLOWS
    assert ".github/actions/release/action.yml" in ACTIONS


def test_actionlint_finds_nothing():
    r = subprocess.run([_tool("actionlint"), *WORKFLOWS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("workflow", WORKFLOWS + ACTIONS)
def test_zizmor_finds_nothing_of_medium_or_high_severity(workflow):
    cmd = [_tool("zizmor"), "--offline", "--min-severity", "medium", "--format", "json", workflow]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    findings = json.loads(r.stdout or "[]")
    assert findings == [], json.dumps([(f.get("ident"), f.get("desc")) for f in findings], indent=1)
    assert r.returncode == 0, r.stderr
