"""What a CI log sees: `build` and `publish --json --quiet` with stderr going to a file print no
third-party progress bar or warning (torch's deprecation notices, huggingface_hub's upload bars);
`--verbose` lets them through, which shows this test can fail."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import ROOT, run_subprocess

pytestmark = pytest.mark.real_model

NOISE = re.compile(r"it/s\]|B/s\]|\d+%\||[Ww]arning|_pytree|register_constant")


def test_build_and_publish_keep_library_noise_off_stderr(smollm2, tmp_path):
    data = yaml.safe_load((ROOT / "examples" / "smollm2-release.yaml").read_text())
    data["source"] = {"fixture": "smollm2"}
    data["variants"] = {"safetensors": {"dtype": "keep"}, "gguf": {"types": ["Q8_0"]}}
    data.pop("signing")
    rf = tmp_path / "release.yaml"
    rf.write_text(yaml.safe_dump(data, sort_keys=False))
    b = run_subprocess("build", rf, "-o", tmp_path / "dist", "--json", "--quiet")
    assert b.returncode == 0, b.stdout[-2000:] + b.stderr[-2000:]
    assert not NOISE.search(b.stderr), b.stderr[:2000]
    release = json.loads(b.stdout)["release_dir"]
    hub = tmp_path / "hub"
    p = run_subprocess("publish", release, "--endpoint", f"local:{hub}", "--allow-unsigned", "--json", "--quiet")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert json.loads(p.stdout) and not NOISE.search(p.stderr), p.stderr[:2000]
    assert p.stderr.strip() == ""
    # The same publish with --verbose (to a new Hub, so there is something to upload) shows the
    # library's upload bars: the pattern above does catch them when they are there.
    v = run_subprocess("--verbose", "publish", release, "--endpoint", f"local:{tmp_path / 'hub2'}",
                       "--allow-unsigned", "--json")  # fmt: skip
    assert v.returncode == 0 and NOISE.search(v.stderr), v.stderr[:2000]
