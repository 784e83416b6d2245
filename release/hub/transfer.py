"""One file from a Hub, read no further than the manifest says and never waited on forever.

Why not ``hf_hub_download`` for the files a manifest lists: it trusts the server for the size (a
file padded with 50 MB is read to the end before its consistency check refuses it, in two lines
that advise ``force_download``), and its timeout is per read, so a server that drip-feeds one byte
every 2 s keeps it downloading for ever. Here the URL, headers (token, user agent) and HTTP
session are still ``huggingface_hub``'s own (``hf_hub_url``, ``build_hf_headers``,
``get_session``: proxies, redirects to the CDN, certificates as the user configured them); only
the read loop is ours: it stops at the manifest's size (refusing an announced Content-Length that
differs), and fails a transfer that moved less than ``MIN_PROGRESS`` bytes in ``stall`` seconds. Bytes a server would
send past the listed size are never read (the connection is closed there); the sha256 check that
follows decides on the bytes that were.
"""

from __future__ import annotations

import time
from pathlib import Path

from release.errors import CheckFailedError

DEFAULT_STALL = 60.0  # seconds; a 70B shard over a slow link moves far more than MIN_PROGRESS in that time
MIN_PROGRESS = 64 * 1024  # bytes per stall window


def download(
    url: str, dest: Path, size: int, *, token: str | None, stall: float = DEFAULT_STALL, what: str = ""
) -> None:
    """Write exactly ``size`` bytes from ``url`` to ``dest`` or raise CheckFailedError (one line)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    name = what or dest.name
    headers = build_hf_headers(token=token, headers={"Accept-Encoding": "identity"})
    with get_session().stream("GET", url, headers=headers, timeout=stall, follow_redirects=True) as resp:
        if resp.status_code >= 400:
            resp.read()
            hf_raise_for_status(resp)  # huggingface_hub's error types, which hub_errors makes one line
        announced = resp.headers.get("Content-Length")
        if announced is not None and announced.isdigit() and int(announced) != size:
            raise CheckFailedError(
                f"{name}: the server sends {int(announced)} bytes where the manifest lists {size}: "
                "refusing a padded or truncated file"
            )
        got = 0
        mark_time, mark_bytes = time.monotonic(), 0
        with dest.open("wb") as out:
            for chunk in resp.iter_raw():  # as the bytes arrive: a chunked read would wait for a full chunk
                chunk = chunk[: size - got]  # what a server sends past the listed size is never kept
                got += len(chunk)
                out.write(chunk)
                now = time.monotonic()
                if now - mark_time >= stall:
                    if got - mark_bytes < MIN_PROGRESS and got < size:
                        raise _stalled(name, got, size, stall)
                    mark_time, mark_bytes = now, got
                if got == size:
                    break
    if got < size:
        raise CheckFailedError(f"{name}: the transfer ended at {got} of {size} bytes (rerun to retry)")


def _stalled(name: str, got: int, size: int, stall: float) -> CheckFailedError:
    return CheckFailedError(
        f"{name}: stalled at {got} of {size} bytes (less than {MIN_PROGRESS // 1024} KiB in {stall:g} s): "
        "gave up on a server that is too slow or drip-feeding (rerun to retry, or raise --stall-timeout)"
    )
