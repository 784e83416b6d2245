"""Temporary-then-rename writing, so a crash never leaves a finished-looking output.

Everything is written into a hidden sibling folder of the target (same filesystem, so the final
``rename`` is atomic), fsynced, and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from release.errors import BadInputError, os_error_to_release_error

PARTIAL_MARK = ".partial-"


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
        tmp = target.parent / f".{target.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
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
    tmp = target.parent / f".{target.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
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
