"""`build --executor ray`: the SmolLM2 release on a two-node Ray cluster started on this machine
(``ray.cluster_utils.Cluster``, as Ray's own tests do: two raylets, each its own node with its own
CPUs and memory). The release equals the local build byte for byte, its steps run on both nodes, a
Ray worker killed mid-step is named and the rerun resumes; a step no node can hold, a folder a node
cannot see and a cluster that is not there are refused before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DEMO, gone_within, leftovers

NODE_MEMORY = 6 << 30  # Ray's logical memory per node: above every SmolLM2 step's estimate


@pytest.fixture(scope="module")
def cluster(demo_release):
    """Two nodes with the demo build's thread count as CPUs each: one step at a time per node, so two
    steps at once land on two nodes."""
    from ray.cluster_utils import Cluster

    cpus = int(demo_release.out["threads"])
    args = {"num_cpus": cpus, "memory": NODE_MEMORY, "object_store_memory": 100 << 20}
    c = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    c.add_node(**args)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def _build(cluster, rf: Path, out: Path, *extra: object) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "release.cli", "build", str(rf), "-o", str(out), "--executor", "ray", "--json",
           "--only", "safetensors,gguf", *map(str, extra)]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _step_process(gguf_dir: Path) -> tuple[int, int, str] | None:
    """(pid, parent pid, GGUF type) of a `model-release gguf` step writing into gguf_dir, if one runs."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
            stat = (proc / "stat").read_text()
        except (OSError, ValueError):
            continue
        if "release.cli" in argv and "gguf" in argv and str(gguf_dir) in argv:
            return int(proc.name), int(stat.rsplit(")", 1)[1].split()[1]), argv[argv.index("-t") + 1]
    return None


@pytest.mark.real_model
def test_release_on_two_nodes_equals_the_local_build_and_resumes_after_a_killed_worker(cluster, demo_release, tmp_path):
    threads = demo_release.out["threads"]
    out = tmp_path / "dist"
    dist = out / f"{DEMO}-1.0"
    gguf_dir = dist / f"{DEMO}-GGUF"
    proc = _build(cluster, demo_release.rf, out, "--threads", threads)
    deadline = time.monotonic() + 600  # generous: the other test worker shares the two cores
    # Wait for a GGUF step writing (its temporary folder), then SIGKILL the Ray worker that runs it.
    while (
        not (gguf_dir.is_dir() and any(p.name.startswith(".model-release-") for p in gguf_dir.iterdir()))
        or (found := _step_process(gguf_dir)) is None
    ):
        assert proc.poll() is None and time.monotonic() < deadline, "build ended before a GGUF step"
        time.sleep(0.02)
    step_pid, worker_pid, gtype = found
    assert worker_pid != proc.pid  # the step is a child of a Ray worker, not of the build
    os.kill(worker_pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    res = json.loads(stdout)
    steps = {s["name"]: s for s in res["steps"]}
    killed = steps[f"gguf-{gtype}"]
    assert killed["status"] == "failed", killed
    # Named, in one line: the Ray worker, the node; not a Ray traceback.
    assert "Ray worker running the step" in killed["message"] and killed["node"] in killed["message"], killed
    assert "\n" not in killed["message"] and "Traceback" not in killed["message"]
    # The step died with its worker (SIGTERM from the kernel) and cleaned up. Within 120 s: Python
    # runs the SIGTERM handler only once a C call returns (llama.cpp's quantizer took 18 s for
    # SmolLM2's Q4_K_M in a loaded suite), and a step still in C 60 s after ends itself, uncleaned.
    if not gone_within(step_pid, 120):
        pytest.fail(f"the step process {step_pid} outlived its Ray worker")
    left = {p.name: sorted(f"{q.name} {q.stat().st_size}" for q in p.iterdir())
            for p in gguf_dir.iterdir() if p.name.startswith(".model-release-")}  # fmt: skip
    log = dist / ".work" / "logs" / f"gguf-{gtype}.log"  # what the killed step said (its clean-up's line)
    assert not left, (left, log.read_text(errors="replace")[-2000:] if log.is_file() else "no log")
    done_before = {n for n, s in steps.items() if s["status"] == "done"}

    proc = _build(cluster, demo_release.rf, out, "--threads", threads)
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    res = json.loads(stdout)
    status = {s["name"]: s["status"] for s in res["steps"]}
    assert res["executor"] == "ray" and status[f"gguf-{gtype}"] == "done"
    assert all(status[n] == "skipped" for n in done_before if n != "lossless-gguf")
    assert leftovers(dist) == [] and not (dist / ".work" / "lossless-gguf").exists()
    # Every step on a node of the cluster, both nodes used, each named in the JSON and the record.
    records = {p.stem: json.loads(p.read_text()) for p in (dist / ".steps").glob("*.json")}
    nodes = {s["node"] for s in res["steps"] if s["status"] == "done"} | {r["node"] for r in records.values()}
    alive = {f"{n['NodeManagerHostname']}/{n['NodeID'][:8]}" for n in _ray_nodes(cluster)}
    assert nodes == alive and len(alive) == 2, (nodes, alive)
    # The same bytes as the local build of the same release file (demo_release: `build --jobs 2`).
    local = demo_release.dir
    for rel in (f"{DEMO}/model.safetensors", f"{DEMO}-GGUF/{DEMO}-Q8_0.gguf", f"{DEMO}-GGUF/{DEMO}-Q4_K_M.gguf",
                f"{DEMO}-GGUF/{DEMO}.imatrix", ".work/reference.safetensors"):  # fmt: skip
        assert (dist / rel).read_bytes() == (local / rel).read_bytes(), rel


def _ray_nodes(cluster) -> list[dict]:
    """The cluster's alive nodes, from a short-lived driver of its own (not this test process)."""
    code = "import json, ray; ray.init(); print(json.dumps([n for n in ray.nodes() if n['Alive']]))"
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.real_model
def test_a_step_no_node_can_hold_is_refused_before_work(cluster, demo_release, tmp_path):
    threads = int(demo_release.out["threads"])
    proc = _build(cluster, demo_release.rf, tmp_path / "dist", "--threads", threads + 1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stdout + stderr
    err = json.loads(stdout)  # --json: the error as JSON, one message line
    assert err["message"].startswith(f"convert needs {threads + 1} CPU(s) and about "), err
    assert "the largest node is " in err["message"] and f": {threads} CPU(s)" in err["message"], err
    assert "lower --threads" in err["hint"] and "\n" not in err["message"]
    assert not (tmp_path / "dist").exists()  # nothing written, no step started


def test_fits_a_node_names_the_need_and_the_largest_node():
    """Memory and GPUs as well as CPUs, checked without a cluster: a node with the CPUs but not the
    memory does not do, and a CUDA step needs a node with a GPU."""
    from release.errors import BadInputError
    from release.pipeline.plan import _fits_a_node
    from release.pipeline.ray_executor import Node
    from release.pipeline.steps import Step
    from release.resources import Need

    nodes = [Node("a" * 32, "big/aaaaaaaa", 64, 200 << 30, 0), Node("b" * 32, "gpu/bbbbbbbb", 8, 60 << 30, 1)]
    step = Step("reference", "reference", [], {}, [], list, Need(ram=100 << 30), threads=8)
    _fits_a_node(step, nodes)  # the big CPU node holds it
    step.need = Need(ram=100 << 30, gpu=40 << 30)
    with pytest.raises(BadInputError, match=r"reference needs 8 CPU\(s\) and about .* of memory and a GPU; .*"
                       r"the largest node is gpu/bbbbbbbb: 8 CPU\(s\), .* 1 GPU"):  # fmt: skip
        _fits_a_node(step, nodes)
    step.need = Need(ram=300 << 30)
    with pytest.raises(BadInputError, match=r"the largest node is big/aaaaaaaa"):
        _fits_a_node(step, nodes)


@pytest.mark.real_model
def test_a_folder_one_node_cannot_see_is_refused(cluster, tmp_path):
    """The driver writes a token file, a task on each node reads it. Every node of this one-machine
    cluster sees /tmp, so the second node is made blind by a reader that fails there."""
    import ray

    from release.errors import BadInputError
    from release.pipeline.ray_executor import RayExecutor

    ex = RayExecutor(cluster.address)
    try:
        ex.check_shared_storage(tmp_path / "seen")  # every node reads the token back
        blind = ex.nodes()[1]

        def reader(path: str) -> str:
            import ray

            if ray.get_runtime_context().get_node_id() == blind.id:
                return "unreadable: No such file or directory"
            return Path(path).read_text(encoding="utf-8")

        with pytest.raises(BadInputError) as err:
            ex.check_shared_storage(tmp_path / "blind", reader=reader)
        msg = str(err.value)
        assert f"not visible from node(s) {blind.name} (unreadable: No such file or directory)" in msg, msg
        assert ex.nodes()[0].name not in msg
        assert list((tmp_path / "blind").iterdir()) == []  # the token file is removed either way
    finally:
        ray.shutdown()


@pytest.mark.real_model
def test_no_cluster_is_one_line_at_once(smollm2, tmp_path):
    """An address where no Ray cluster listens: refused in seconds (ray.init alone waits minutes)."""
    from tests.conftest import demo_release_file

    rf = demo_release_file(tmp_path / "release.yaml")
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "release.cli", "build", str(rf), "-o", str(tmp_path / "dist"),
                        "--executor", "ray"], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert r.returncode == 2, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "no Ray cluster answers at 127.0.0.1:1" in errors[0], r.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "dist").exists()


@pytest.mark.real_model
def test_cuda_steps_follow_the_clusters_gpus_not_this_machines(smollm2, tmp_path):
    """The driver of a cluster build often has no GPU: with ``--device auto`` the reference, the
    transformers validations and GPTQ are planned for CUDA when a node has one (Ray then places them
    on it, ``num_gpus=1``), and for the CPU when none has."""
    from release.pipeline import load_release_file, plan_build
    from tests.conftest import demo_release_file

    rf = load_release_file(demo_release_file(tmp_path / "release.yaml", gptq={"bits": 4}))

    def plan(cuda: bool) -> dict:
        return {s.name: s for s in plan_build(rf, tmp_path / "dist", only={"gptq"}, cuda=cuda).steps}

    gpus, cpus = plan(True), plan(False)
    for name in ("reference", "gptq", "validate-gptq"):
        assert gpus[name].need.gpu and not cpus[name].need.gpu, name
    ref = gpus["reference"].argv
    assert ref[ref.index("--device") + 1] == "cuda" and cpus["reference"].argv[ref.index("--device") + 1] == "cpu"
