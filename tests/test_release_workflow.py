"""The release workflow's logic, run here (issue 23): `.github/workflows/release.yml` is read, and
every job's own `run:` commands run with their `env:`, in the order `needs:` gives, each job in its
own folder as a separate runner would, on a tiny release (a tiny Llama model with SmolLM2's tokenizer,
its GGUF variant a split set) against a local Hub. Jobs hand data
over only the way the workflow does: the shared workspace (`vars.RELEASE_WORKSPACE`). The last job
fetches a published variant back and verifies it. A local composite action (the release action
other repositories use) runs its own steps with its inputs. Not run: installation steps (`make
install`, the action's "Install" step: this test's environment is what they install); and
`actions/checkout` is a copy of the files the jobs read. Any other action, or an expression this
harness does not know, fails the test, so an edit that makes the jobs no longer fit together fails
here before it fails on a tag."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from release.signing import keygen
from tests.conftest import ROOT, demo_release_file

pytestmark = pytest.mark.real_model
WORKFLOW = ROOT / ".github" / "workflows" / "release.yml"
WORKFLOW_DATA = yaml.safe_load(WORKFLOW.read_text())
TINY = "Tiny-Llama-ci"  # the release's name
SPLIT = "5MB"  # the Q8_0 file (15 MB, 2.6 MB of it the vocabulary) in three parts
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)+")


def _order(jobs: dict) -> list[str]:
    """Jobs in an order `needs:` allows (as GitHub schedules them, parallel ones one after another)."""
    done: list[str] = []
    while len(done) < len(jobs):
        ready = [j for j, spec in jobs.items() if j not in done and set(_needs(spec)) <= set(done)]
        assert ready, f"a cycle in needs: among {set(jobs) - set(done)}"
        done.append(ready[0])
    return done


def _needs(spec: dict) -> list[str]:
    n = spec.get("needs") or []
    return [n] if isinstance(n, str) else list(n)


def _value(expr: str, ctx: dict) -> str:
    """`a.b || 'literal' || c.d`: the first non-empty one. Anything else is not understood."""
    for part in (p.strip() for p in expr.split("||")):
        if re.fullmatch(r"'[^']*'", part):
            return part[1:-1]
        assert NAME.fullmatch(part), f"an expression this harness does not know: {expr!r}"
        scope, key = part.split(".", 1)
        assert scope in ctx, f"an expression this harness does not know: {expr!r}"
        if value := ctx[scope].get(key):
            return str(value)
    return ""


def _expand(text: str, ctx: dict) -> str:
    return EXPRESSION.sub(lambda m: _value(m.group(1), ctx), text)


def _env(mapping: dict | None, ctx: dict) -> dict[str, str]:
    return {k: _expand(str(v), ctx) for k, v in (mapping or {}).items()}


def _checkout(folder: Path, config: Path, public_key: Path) -> None:
    """What actions/checkout gives a job: the repository's files it reads (the release file, the
    published public key) and, standing in for `make install`, this test's virtual environment."""
    folder.mkdir(parents=True)
    shutil.copytree(ROOT / "examples", folder / "examples")
    shutil.copy(config, folder / config.name)
    shutil.copy(public_key, folder / "release-signing.pub")
    (folder / ".venv").symlink_to(Path(sys.prefix))


@pytest.fixture(scope="module")
def workflow(smollm2, tmp_path_factory) -> dict:
    """Every job of release.yml run in order on a tiny release (below); returns what the tests read."""
    tmp_path = tmp_path_factory.mktemp("workflow")
    jobs = WORKFLOW_DATA["jobs"]
    config = _tiny_release(tmp_path, smollm2.hf)
    priv, pub = keygen(tmp_path / "keys")
    hub, workspace = tmp_path / "hub", tmp_path / "shared"
    ctx = {
        "inputs": {"config": config.name},
        "vars": {"RELEASE_WORKSPACE": str(workspace)},
        "secrets": {"MODEL_RELEASE_SIGNING_KEY": priv.read_text(), "HF_TOKEN": "hf_local_test"},
        "github": {"repository": "example/model-release", "ref_name": "v1.0"},
    }
    ran: dict[str, list[str]] = {}
    for name in _order(jobs):
        spec = jobs[name]
        assert spec["permissions"] == {"contents": "read"}, f"{name}: least privilege"
        runner = tmp_path / "runners" / name  # its own machine: nothing shared but the workspace and the Hub
        _checkout(runner / "repo", config, pub)
        (runner / "temp").mkdir()
        (runner / "temp" / "model-release").symlink_to(Path(sys.prefix))  # what the action's install step makes
        github = {"GITHUB_REF_NAME": ctx["github"]["ref_name"], "GITHUB_REPOSITORY": ctx["github"]["repository"]}
        base = {**os.environ, **github, "RUNNER_TEMP": str(runner / "temp"), "HF_ENDPOINT": f"local:{hub}"}
        ctx["env"] = _env(WORKFLOW_DATA.get("env"), ctx) | _env(spec.get("env"), ctx)
        ran[name] = []
        for step in spec["steps"]:
            uses = step.get("uses", "")
            if uses.startswith("actions/checkout@"):
                assert step.get("with", {}).get("persist-credentials") is False
                continue
            if uses:  # a local composite action: its own steps, with its inputs
                assert uses.startswith("./"), f"{name}: an action this harness cannot run: {uses}"
                action_dir = ROOT / uses
                action = yaml.safe_load((action_dir / "action.yml").read_text())
                assert action["runs"]["using"] == "composite"
                given = _env(step.get("with"), ctx)
                assert set(given) <= set(action["inputs"]), f"{name}: inputs the action does not take"
                inputs = {k: given.get(k, v.get("default", "")) for k, v in action["inputs"].items()}
                missing = [k for k, v in action["inputs"].items() if v.get("required") and not inputs[k]]
                assert not missing, f"{name}: required inputs not given: {missing}"
                scripts = [(s, {**ctx, "inputs": inputs}, {"GITHUB_ACTION_PATH": str(action_dir)})
                           for s in action["runs"]["steps"]]  # fmt: skip
            else:
                scripts = [(step, ctx, {})]
            for s, scope, extra in scripts:
                script = s["run"]
                if script.strip().startswith("make install") or s.get("name", "").startswith("Install"):
                    continue  # what this test's environment already is
                env = base | ctx["env"] | extra | _env(s.get("env"), scope)
                bash = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", _expand(script, scope)]
                r = subprocess.run(bash, cwd=runner / "repo", env=env, capture_output=True, text=True, timeout=900)
                said = "".join(p.read_text()[-3000:] for p in (runner / "repo").glob("build-*.json"))
                assert r.returncode == 0, f"job {name}, step {s.get('name') or script[:60]!r}:\n{r.stdout[-3000:]}\n" \
                                          f"{r.stderr[-3000:]}\n{said}"  # fmt: skip
                ran[name].append(r.stdout + r.stderr)
    dist = workspace / ctx["github"]["repository"] / "v1.0" / f"{TINY}-1.0"
    return {"tmp": tmp_path, "ran": ran, "dist": dist, "hub": hub, "pub": pub}


def _tiny_release(tmp_path: Path, tokenizer_from: Path) -> Path:
    """The demo's release file on a tiny Llama model with SmolLM2's tokenizer: the workflow's logic
    does not need the real model's weights (its builds are the demo's, tests/conftest.py), and a
    tiny model makes every job seconds instead of minutes. GPTQ 8-bit, whose validation passes on a
    few calibration windows; the Q8_0 file written as a split set, as a 70B GGUF is."""
    from tests.tiny_archs import make_model, save

    src = save(make_model("llama3", 49152, tie_word_embeddings=False), tmp_path / "tiny-src", tokenizer_from)
    config = demo_release_file(tmp_path / "release-ci.yaml", gguf={"types": ["Q8_0"], "split_max_size": SPLIT},
                               gptq={"bits": 8, "samples": 4, "seq_len": 128})  # fmt: skip
    data = yaml.safe_load(config.read_text())
    data["source"] = {"path": str(src)}
    data["release"]["name"] = TINY
    data["release"]["repo_url"] = f"https://huggingface.co/example/{TINY}"
    data["publish"]["repo"] = f"example/{TINY}"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def test_the_release_workflow_runs_job_by_job_and_publishes_a_verified_release(workflow):
    jobs = WORKFLOW_DATA["jobs"]
    tmp_path, ran, dist = workflow["tmp"], workflow["ran"], workflow["dist"]
    assert set(ran) == {"check", "prepare", "gguf", "gptq", "publish"}

    def statuses(job: str, file: str) -> dict[str, str]:
        out = json.loads((tmp_path / "runners" / job / "repo" / file).read_text())
        assert out["ok"], out
        return {s["name"]: s["status"] for s in out["steps"]}

    # Work done once: the family jobs found the conversion and the reference made by prepare.
    prepare = statuses("prepare", "build-prepare.json")
    assert prepare["convert"] == prepare["reference"] == "done"
    for job in ("gguf", "gptq"):
        steps = statuses(job, f"build-{job}.json")
        assert steps["convert"] == steps["reference"] == "skipped", (job, steps)
    assert statuses("gguf", "build-gguf.json")["gguf-Q8_0"] == "done"
    assert statuses("gptq", "build-gptq.json")["gptq"] == "done"
    kernels = json.loads((tmp_path / "runners" / "gptq" / "repo" / "kernels-gptq.json").read_text())
    assert kernels["ok"] and "pack_block_cpu" in {k["name"] for k in kernels["kernels"] if k["status"] == "ready"}
    # The protected job made only what needs the key and the whole release: cards, manifests, signatures.
    final = statuses("publish", "build-release.json")
    assert {k for k, v in final.items() if v == "done"} == {"card", "manifest", "sign"}, final
    assert all(v in ("skipped",) for k, v in final.items() if k not in ("card", "manifest", "sign")), final
    # Published with the tag, and the fetch-back step verified the signature and the logits.
    fetched = ran["publish"][-1]
    assert "verified: sha256 of every file, signature, build record, logits" in fetched, fetched
    for folder in (TINY, f"{TINY}-GGUF", f"{TINY}-GPTQ"):
        assert (dist / folder / "release.sig").is_file() and (dist / folder / "provenance.intoto.jsonl").is_file()
    # The secrets stayed in the protected job: no other job's environment had them.
    for name, spec in jobs.items():
        text = json.dumps(spec)
        assert ("secrets." in text) == (name == "publish"), name
    assert not list((tmp_path / "runners" / "publish" / "temp").glob("signing.key"))


def test_split_release_is_one_variant_in_manifest_card_and_fetch(workflow):
    """variants.gguf.split_max_size through the whole release: the Q8_0 file is a split set, one
    variant in the build's summary, the manifest and the card, published, and fetched back whole
    by the workflow's fetch-back (`--variant Q8_0`, signature and logits checked)."""
    dist = workflow["dist"]
    out = json.loads((workflow["tmp"] / "runners" / "gguf" / "repo" / "build-gguf.json").read_text())
    row = next(v for v in out["variants"] if v["family"] == "gguf")
    gguf_dir = dist / f"{TINY}-GGUF"
    parts = sorted(gguf_dir.glob("*.gguf"))
    # A tensor is never cut: the embeddings (with the vocabulary, in the first part) and the output
    # matrix each exceed 5 MB and stand alone; the decoder layers fill the part between them.
    assert len(parts) == 3, [p.stat().st_size for p in parts]
    assert row["variant"] == "Q8_0" and row["bytes"] == sum(p.stat().st_size for p in parts) and row["passed"]
    assert all(s["peak_rss_bytes"] > 0 for s in out["steps"] if s["status"] == "done")
    manifest = json.loads((gguf_dir / "release-manifest.json").read_text())
    assert list(manifest["variants"]) == ["Q8_0"] and manifest["variants"]["Q8_0"]["passed"]
    listed = {f["path"]: f["variant"] for f in manifest["files"] if f["path"].endswith(".gguf")}
    assert listed == {p.name: "Q8_0" for p in parts}
    card = (gguf_dir / "README.md").read_text()
    assert all(p.name in card for p in parts) and "GGUF (split)" in card
    fetched = workflow["tmp"] / "runners" / "publish" / "temp" / "fetched"
    assert sorted(p.name for p in fetched.glob("*.gguf")) == [p.name for p in parts]
    assert all((fetched / p.name).read_bytes() == p.read_bytes() for p in parts)
    logs = {p.stem for p in (dist / ".work" / "logs").glob("*.log")}
    assert {"convert", "reference", "gguf-Q8_0", "validate-gguf-Q8_0"} <= logs
