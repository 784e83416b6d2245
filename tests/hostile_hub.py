"""A Hub that lies about transfers: our local Hub server (release.hub.server) answering every route
honestly except the downloads of files named in ``attacks``, which it serves with one attack each.
Loopback only, and every attack ends by itself within ``LIMIT`` seconds, so no test can hang on it.

- ``pad``: Content-Length announces the file plus 50 MB, and the body is the file then zeros;
- ``endless``: no Content-Length (connection: close), the file then zeros without end;
- ``drip-after``: the file, then one byte every 2 s (the issue's drip-feed);
- ``drip-within``: half the file, then one byte every 0.5 s;
- ``short``: Content-Length right, the connection closed half way.
"""

from __future__ import annotations

import time
from typing import Any

from release.hub.server import Handler, HubServer, Store

LIMIT = 30.0
PAD = 50 * 1024 * 1024


class HostileHandler(Handler):
    server: HostileHub

    def _resolve(self, rtype: str, repo_id: str, rev: str, path: str) -> None:
        attack = self.server.attacks.get(path)
        if attack is None or self.command != "GET":
            return super()._resolve(rtype, repo_id, rev, path)
        with self.state.lock:
            repo = self.store.load(rtype, repo_id)
        e = repo["commits"][Store.resolve(repo, rev)]["tree"][path]
        blob = self.store.lfs_path(e["lfs"]) if e.get("lfs") else self.store.blob_path(e["oid"])
        data = blob.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        length = {"pad": len(data) + PAD, "short": len(data)}.get(attack)
        if length is None:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        self.server.served.append(path)
        deadline = time.monotonic() + LIMIT
        try:
            if attack in ("pad", "endless"):
                self._write(data)
                zeros = bytes(1 << 20)
                while time.monotonic() < deadline and (attack == "endless" or self.server.sent < len(data) + PAD):
                    self._write(zeros)
            elif attack == "drip-after":
                self._write(data)
                while time.monotonic() < deadline:
                    time.sleep(2)
                    self._write(b"\0")
            elif attack == "drip-within":
                self._write(data[: len(data) // 2])
                for b in data[len(data) // 2 :]:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                    self._write(bytes([b]))
            elif attack == "short":
                self._write(data[: len(data) // 2])
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: what we want
            pass
        self.close_connection = True

    def _write(self, chunk: bytes) -> None:
        self.wfile.write(chunk)
        self.wfile.flush()
        self.server.sent += len(chunk)


class HostileHub(HubServer):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.RequestHandlerClass = HostileHandler
        self.attacks: dict[str, str] = {}  # file path -> attack
        self.served: list[str] = []
        self.sent = 0  # body bytes of attacked downloads written before the client went away
        self.genuine = ""  # the commit of the release as uploaded (tests move main back to it)
