"""Capture what native libraries and chatty dependencies print, so our output stays ours.

llama.cpp's quantizer writes a line per tensor on fd 2; GPTQModel (through logbar) writes its
banner, logs and tables on fd 1, which would corrupt ``--json`` output. Both are redirected at
the file-descriptor level (Python-level redirection misses C code and background threads) into a
temporary file; a failure quotes its tail.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import IO


@contextlib.contextmanager
def capture_fd(fd: int) -> Iterator[IO[bytes]]:
    """Send everything written to ``fd`` (1 or 2) into a temporary file while the block runs."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), fd)
        try:
            yield log
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(ValueError, OSError):
                    stream.flush()
            os.dup2(saved, fd)
            os.close(saved)


def tail(log: IO[bytes], lines: int = 3) -> str:
    """The last lines of a captured log, joined for a one-line error message."""
    log.flush()
    log.seek(0)
    text = log.read().decode("utf-8", errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:] if line.strip())
