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


def sha256_file(path: Path) -> str:
    """sha256 of a whole file (what the Hub's LFS and the model card list), read in 16 MiB pieces."""
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
