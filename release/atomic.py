"""Temporary-then-rename writing, so a crash never leaves a finished-looking output.

Everything is written into a hidden sibling folder of the target (same filesystem, so the final
``rename`` is atomic), fsynced, and only then renamed into place. The temporary name carries the
host and process that own it (``.NAME.partial-HOST-PID-RANDOM``), so that the next run towards the
same target removes what a run killed without a chance to clean up (SIGKILL, a lost node) left,
and never what a live run on this or another host is writing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from release.errors import BadInputError, os_error_to_release_error

PARTIAL_MARK = ".partial-"
_OLD_UNOWNED = 24 * 3600  # seconds: an ownerless temporary folder this old is no run's any more


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def partial_path(target: Path) -> Path:
    """A fresh temporary sibling of ``target``, named after its owner (host and process)."""
    return target.parent / f".{target.name}{PARTIAL_MARK}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove temporary siblings of ``target`` whose owner process on this host is gone. Returns
    what was removed. Those of other hosts (a shared filesystem) and of live processes stay; one
    named the older way (no owner) goes once it is a day old."""
    removed = []
    prefix = f".{target.name}{PARTIAL_MARK}"
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        if not p.name.startswith(prefix) or not is_stale_partial(p):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def is_stale_partial(p: Path) -> bool:
    """Whether a temporary ``.NAME.partial-HOST-PID-RANDOM`` belongs to a run that is gone: its
    process on this host is not alive. One of another host (a shared filesystem) is never stale
    here; one named the older way (no owner) is once it is a day old."""
    suffix = p.name.rsplit(PARTIAL_MARK, 1)[-1]
    if re.fullmatch(r"[0-9a-f]{8}", suffix):  # named before owners were recorded: by age only
        try:
            return time.time() - p.lstat().st_mtime >= _OLD_UNOWNED
        except OSError:
            return False
    parts = suffix.rsplit("-", 2)
    return len(parts) == 3 and parts[0] == _host() and parts[1].isdigit() and not _alive(int(parts[1]))


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (the directory entry makes a rename durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_target(target: Path, force: bool) -> None:
    """Refuse to replace a non-empty target unless asked to."""
    if target.exists() and not target.is_dir():
        raise BadInputError(f"output {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise BadInputError(f"output {target} is not empty", hint="use --force to replace it")


@contextlib.contextmanager
def atomic_dir(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target``.

    On any exception the temporary folder is removed and ``target`` is left as it was.
    """
    target = Path(target).absolute()
    check_target(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target)
        tmp = partial_path(target)
        tmp.mkdir()
    except OSError as exc:
        raise os_error_to_release_error(exc, f"creating {target.parent}") from exc
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_path(p)
        fsync_path(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
        tmp.rename(target)
        fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error_to_release_error(exc, f"writing {target}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_file_target(target: Path, force: bool) -> None:
    """Refuse to replace an existing file unless asked to (callers check before slow work)."""
    if target.exists() and not force:
        raise BadInputError(f"output {target} exists", hint="use --force to replace it")
    if target.is_dir():
        raise BadInputError(f"output {target} is a directory")


@contextlib.contextmanager
def atomic_file(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed to ``target``."""
    target = Path(target).absolute()
    check_file_target(target, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error_to_release_error(exc, f"creating {target.parent}") from exc
    remove_stale_partials(target)
    tmp = partial_path(target)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error_to_release_error(exc, f"writing {target}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
