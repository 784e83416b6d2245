"""Content hashes.

The *checkpoint hash* identifies weights, not files: BLAKE3 over the sorted list of
``name, dtype, shape, BLAKE3(tensor bytes)``. It is the same for a ``.bin``-sharded and a
safetensors copy of the same weights, and a ``convert --dtype keep`` output has the hash of its
source, so ``inspect --hash`` can prove that an output holds exactly the source's weights.
BLAKE3 is the hash Hugging Face's Xet storage is built on, and hashes several GB/s.

Write checks use xxh3-128 (not a security boundary: it compares what we meant to write with what
is on disk, at memory speed).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

import blake3
import xxhash

CHECKPOINT_HASH_PREFIX = "blake3:"
_HEX_LEN = 64
PLACEHOLDER_HASH = CHECKPOINT_HASH_PREFIX + "0" * _HEX_LEN  # same length as a real one


def tensor_digest(buf: memoryview | bytes, threads: int = blake3.blake3.AUTO) -> str:
    """BLAKE3 of one tensor's raw little-endian bytes. ``threads=1`` when the caller already runs
    the hash beside other work (convert), so the two do not fight over 2 cores."""
    return blake3.blake3(buf, max_threads=threads).hexdigest()


def write_digest(buf: memoryview | bytes) -> str:
    """Fast digest to compare bytes written with bytes read back."""
    return xxhash.xxh3_128_hexdigest(buf)


def file_digest(f: BinaryIO, start: int, length: int, chunk: int = 8 << 20) -> str:
    """``write_digest`` of a byte range of an open file, read in pieces: reading back a file we
    wrote must not map it whole into memory."""
    h = xxhash.xxh3_128()
    buf = bytearray(min(chunk, max(length, 1)))
    view = memoryview(buf)
    f.seek(start)
    left = length
    while left:
        n = f.readinto(view[: min(left, len(buf))])
        if not n:
            break
        h.update(view[:n])
        left -= n
    return h.hexdigest()


HASH_CACHE_ENV = "MODEL_RELEASE_HASH_CACHE"  # set by `build` for its steps: DIST/.work/sha256.json
_CACHED_FROM = 1 << 20  # smaller files are hashed again: faster than a cache lookup under a lock


def sha256_file(path: Path) -> str:
    """sha256 of a whole file (what the Hub's LFS, the model card, the manifest and the signature
    list). Inside a build the digest is computed once per file and reused: card, manifest and sign
    each hashed every file again (23 s each at 7B, about 8 minutes each at 70B)."""
    cache = os.environ.get(HASH_CACHE_ENV)
    if cache and Path(path).stat().st_size >= _CACHED_FROM:
        return HashCache(Path(cache)).digest(Path(path))
    return _sha256(path)


class HashCache:
    """File digests keyed by absolute path, size and mtime (a rewritten file is hashed again), in
    one JSON file that the steps of a build share; a lock file serialises their updates."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def _load(self) -> dict[str, list]:
        try:
            data = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def digest(self, path: Path) -> str:
        path = path.absolute()
        st = path.stat()
        key, stamp = str(path), [st.st_size, st.st_mtime_ns]
        entry = self._load().get(key)
        if isinstance(entry, list) and entry[:2] == stamp:
            return str(entry[2])
        digest = _sha256(path)
        if path.stat().st_mtime_ns == st.st_mtime_ns:  # not rewritten while we read it
            self._store(key, [*stamp, digest])
        return digest

    def _store(self, key: str, entry: list) -> None:
        import fcntl

        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.file.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                data = self._load()
                data[key] = entry
                tmp = self.file.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, self.file)
        except OSError:  # a cache that cannot be written only costs time
            pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def origin_hash(recorded: dict[str, str]) -> str | None:
    """The oldest checkpoint hash a model-release output's metadata records: its origin if it was
    made from another of our outputs, else its direct source."""
    return recorded.get("origin_checkpoint_hash") or recorded.get("source_checkpoint_hash")


def checkpoint_hash(entries: dict[str, tuple[str, tuple[int, ...], str]]) -> str:
    """Combine per-tensor ``(dtype, shape, digest)`` into one checkpoint hash."""
    h = blake3.blake3()
    for name in sorted(entries):
        dtype, shape, digest = entries[name]
        h.update(f"{name}\t{dtype}\t{','.join(map(str, shape))}\t{digest}\n".encode())
    return CHECKPOINT_HASH_PREFIX + h.hexdigest()
