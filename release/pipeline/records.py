"""Step records: ``DIST/.steps/<step>.json``, written atomically after a step succeeds, holding the
digest of its inputs and the size and mtime of every file it wrote. A record whose inputs match
and whose files are untouched makes a rerun skip the step."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from release.atomic import atomic_file

STEPS_DIR = ".steps"
WORK_DIR = ".work"


def fingerprint(paths: list[Path]) -> list[list[Any]]:
    out = []
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Records:
    def __init__(self, dist: Path, *, create: bool = True) -> None:
        self.dir = dist / STEPS_DIR
        if create:
            self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, step: str) -> Path:
        return self.dir / f"{step}.json"

    def load(self, step: str) -> dict[str, Any] | None:
        p = self.path(step)
        try:
            return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
        except json.JSONDecodeError:
            return None

    def valid(self, step: str, inputs: str) -> dict[str, Any] | None:
        """The record, if its inputs match and every output is still as the step left it."""
        rec = self.load(step)
        if not rec or rec.get("inputs") != inputs:
            return None
        for f, size, mtime in rec["files"]:
            p = Path(f)
            if not p.is_file() or p.stat().st_size != size or p.stat().st_mtime_ns != mtime:
                return None
        return rec

    def save(
        self, step: str, inputs: str, files: list[list[Any]], output: dict[str, Any], seconds: float, node: str = "",
        argv: list[str] | None = None, threads: int = 0,
    ) -> None:  # fmt: skip
        """``argv`` and ``threads``: the step's command and OMP_NUM_THREADS, kept for the signed build
        record (provenance.py) and `reproduce`, which runs the command again with as many threads."""
        now = time.time()
        rec = {"step": step, "inputs": inputs, "files": files, "output": output, "seconds": round(seconds, 2),
               "started": _utc(now - seconds), "finished": _utc(now), "node": node, "argv": argv or [],
               "threads": threads}  # fmt: skip
        with atomic_file(self.path(step), force=True) as tmp:
            tmp.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")

    def fingerprint(self, step: str) -> str:
        rec = self.load(step)
        return digest(rec["files"]) if rec else "missing"
