"""Bad input: one clear error line, exit code 2, nothing half-written at OUT, no code executed."""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import struct
from pathlib import Path

import pytest
import torch

from tests.conftest import leftovers, run_subprocess, tiny_config, write_folder


def assert_clean_failure(r, out: Path, needle: str, code: int = 2) -> None:
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert len(r.error_lines) == 1, r.stderr  # one line, no traceback
    assert needle in r.error_lines[0], r.error_lines[0]
    assert r.error_lines[0].startswith("error:")
    assert not out.exists()
    assert leftovers(out.parent) == []


class Evil:
    """Unpickling this runs os.system: a checkpoint must never be able to do that to us."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path, cli, container):
    marker = tmp_path / "pwned"
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny_config()))
    payload = {"model.embed_tokens.weight": torch.zeros(2, 2), "x": Evil(marker)}
    if container == "zip":
        torch.save(payload, src / "pytorch_model.bin")
    else:
        with open(src / "pytorch_model.bin", "wb") as f:
            pickle.dump(payload, f)
    out = tmp_path / "out"
    r = cli("convert", src, "-o", out)
    assert not marker.exists(), "code in the checkpoint was executed"
    assert r.exit_code == 2
    assert len(r.error_lines) == 1
    assert "refused" in r.stderr or "corrupt" in r.stderr
    assert not out.exists()
    # control: the payload is real, an unsafe load does run it
    if container == "zip":
        torch.load(src / "pytorch_model.bin", weights_only=False)
    else:
        with open(src / "pytorch_model.bin", "rb") as f:
            pickle.load(f)
    assert marker.exists()


def test_truncated_safetensors(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_clean_failure(cli("convert", src, "-o", tmp_path / "out"), tmp_path / "out", "invalid safetensors")


def test_safetensors_header_that_lies_about_offsets(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single")
    f = src / "model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 1024 * 1024, end + 1024 * 1024]  # points past the file
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    assert_clean_failure(cli("convert", src, "-o", tmp_path / "out"), tmp_path / "out", "invalid safetensors")


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"GGUF" + struct.pack("<IQQ", 3, 5, 2) + struct.pack("<Q", 1000) + b"general.", "past the end"),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "GGUF version 1"),
        (b"GGML" + b"\0" * 60, "no GGUF magic"),
        (b"", "no GGUF magic"),
    ],
)
def test_a_gguf_that_is_not_one_is_one_line(cli, tmp_path, body, says):
    """inspect reads a GGUF's header itself (release.formats.gguf_header): a header cut short, an old
    version, no magic or an empty file is one error line and exit 2, never a traceback."""
    (tmp_path / "x.gguf").write_bytes(body)
    r = cli("inspect", tmp_path / "x.gguf")
    assert r.exit_code == 2 and len(r.error_lines) == 1, r.stderr
    assert "not a readable GGUF file" in r.error_lines[0] and says in r.error_lines[0], r.error_lines


def test_garbage_header_length(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single")
    (src / "model.safetensors").write_bytes(b"\xff" * 64)
    assert_clean_failure(cli("convert", src, "-o", tmp_path / "out"), tmp_path / "out", "safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_bin(tiny, cli, tmp_path, damage):
    src, _, _ = tiny("bin-single")
    f = src / "pytorch_model.bin"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        f.write_bytes(b"this is not a checkpoint" * 100)
    assert_clean_failure(cli("convert", src, "-o", tmp_path / "out"), tmp_path / "out", "corrupt")


def test_missing_config(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single")
    (src / "config.json").unlink()
    assert_clean_failure(cli("convert", src, "-o", tmp_path / "out"), tmp_path / "out", "config.json")


def test_unknown_architecture(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    r = cli("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "unknown architecture GPT2LMHeadModel")
    assert "LlamaForCausalLM" in r.stderr


def test_no_weights(tmp_path, cli):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny_config()))
    assert_clean_failure(cli("convert", src, "-o", tmp_path / "out"), tmp_path / "out", "no weights found")


def test_index_points_to_missing_shard(tiny, cli, tmp_path):
    src, _, _ = tiny("st-sharded")
    (src / "model-00002-of-00002.safetensors").unlink()
    assert_clean_failure(cli("convert", src, "-o", tmp_path / "out"), tmp_path / "out", "is missing")


def test_nan_weights_refused_unless_allowed(tiny, cli, tmp_path):
    cfg = tiny_config()
    from tests.conftest import tiny_state

    state = tiny_state(cfg)
    state["model.layers.1.mlp.up_proj.weight"][5, 7] = float("nan")
    src = write_folder(tmp_path / "src", cfg, state, "st-single")
    out = tmp_path / "out"
    assert_clean_failure(cli("convert", src, "-o", out), out, "model.layers.1.mlp.up_proj.weight holds 1 NaN/Inf")
    r = cli("convert", src, "-o", out, "--allow-nonfinite", "--json")
    assert r.exit_code == 0
    assert any("NaN/Inf" in w for w in json.loads(r.stdout)["warnings"])


def test_cast_overflow_is_reported(tmp_path, cli):
    cfg = tiny_config(torch_dtype="float32")
    from tests.conftest import tiny_state

    state = tiny_state(cfg, torch.float32)
    state["model.norm.weight"][0] = 1e6  # fine in fp32, beyond fp16's 65504
    src = write_folder(tmp_path / "src", cfg, state, "st-single")
    out = tmp_path / "out"
    assert_clean_failure(cli("convert", src, "-o", out, "--dtype", "fp16"), out, "casting F32 to F16 overflows")
    assert cli("convert", src, "-o", out, "--dtype", "bf16").exit_code == 0


def test_shape_that_does_not_fit_config(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(cli("convert", src, "-o", tmp_path / "out"), tmp_path / "out", "config.json implies")


def test_missing_and_unexpected_tensors(tmp_path, cli):
    cfg = tiny_config()
    from tests.conftest import tiny_state

    state = tiny_state(cfg)
    del state["lm_head.weight"]
    src = write_folder(tmp_path / "a", cfg, state, "st-single")
    r = cli("convert", src, "-o", tmp_path / "out")
    assert_clean_failure(r, tmp_path / "out", "missing tensors: lm_head.weight")
    assert "tie_word_embeddings" in r.stderr
    state = tiny_state(cfg)
    state["vision_tower.weight"] = torch.zeros(2)
    src = write_folder(tmp_path / "b", cfg, state, "st-single")
    assert_clean_failure(cli("convert", src, "-o", tmp_path / "out"), tmp_path / "out", "vision_tower.weight")


def test_json_error_output(tiny, cli, tmp_path):
    src, _, _ = tiny("st-single")
    (src / "config.json").unlink()
    r = cli("convert", src, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 2
    err = json.loads(r.stdout)
    assert err["ok"] is False and err["exit_code"] == 2 and "config.json" in err["message"]


def _limit_file_size() -> None:
    # A disk that fills up mid-write, without root: writes past 200 KB fail with EFBIG.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_full_disk_leaves_nothing(tiny, tmp_path):
    src, _, _ = tiny("st-single")
    out = tmp_path / "out"
    r = run_subprocess("convert", src, "-o", out, preexec=_limit_file_size)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "file size limit exceeded" in lines[0], r.stderr
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_not_enough_space_is_refused_before_writing(tiny, cli, tmp_path, monkeypatch):
    import shutil

    from release.formats import safetensors as st_format

    src, _, _ = tiny("st-single")
    monkeypatch.setattr(st_format.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    assert_clean_failure(cli("convert", src, "-o", tmp_path / "out"), tmp_path / "out", "not enough disk space")
