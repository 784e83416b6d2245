"""A build hashes each file once: ``sha256_file`` answers from the build's cache (path, size, mtime)
for card, manifest and sign, a rewritten file is hashed again, and a signature made from cached
digests verifies with the unmodified model-signing library."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from release import hashing


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """The cache switched on (as `build` does for its steps), and every real hashing pass counted."""
    calls: list[Path] = []
    real = hashing._sha256

    def count(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(hashing, "_sha256", count)
    monkeypatch.setenv(hashing.HASH_CACHE_ENV, str(tmp_path / ".work" / "sha256.json"))
    return calls


def _big(path: Path, fill: bytes) -> Path:
    path.write_bytes(fill * (2 << 20))  # past the size from which digests are cached
    return path


def test_each_file_is_hashed_once_until_it_changes(counted, tmp_path):
    f = _big(tmp_path / "w.gguf", b"a")
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert [hashing.sha256_file(f) for _ in range(3)] == [want] * 3
    assert counted == [f]  # card, manifest and sign: one pass between them
    _big(f, b"b")  # same size, new bytes and mtime
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1_000_000))
    assert hashing.sha256_file(f) == hashlib.sha256(f.read_bytes()).hexdigest() != want
    assert counted == [f, f]
    small = tmp_path / "config.json"
    small.write_text("{}")
    hashing.sha256_file(small)
    cache = json.loads((tmp_path / ".work" / "sha256.json").read_text())
    assert list(cache) == [str(f)]  # small files are simply hashed again


def test_a_signature_from_cached_digests_verifies_with_the_library(counted, tmp_path):
    from model_signing import hashing as ms_hashing
    from model_signing import signing, verifying

    from release.signing import IGNORED, _hashing_config, keygen

    folder = tmp_path / "model"
    folder.mkdir()
    for name, fill in (("a.safetensors", b"x"), ("b.gguf", b"y")):
        _big(folder / name, fill)
        hashing.sha256_file(folder / name)  # hashed by an earlier step (the card)
    (folder / "README.md").write_text("card\n")
    priv, pub = keygen(tmp_path / "keys")
    before = len(counted)
    signing.Config().set_hashing_config(_hashing_config(folder)).use_elliptic_key_signer(private_key=priv).sign(
        folder, folder / "release.sig"
    )
    assert len(counted) == before + 1  # only README.md, below the cache's size, was read again
    plain = ms_hashing.Config().use_file_serialization(hashing_algorithm="sha256").set_ignored_paths(paths=IGNORED)
    verifying.Config().use_elliptic_key_verifier(public_key=pub).set_hashing_config(plain).verify(
        folder, folder / "release.sig"
    )
