"""One error model for every command.

Expected failures raise a ``ReleaseError`` carrying an exit code and one human line; the CLI
prints that line (or its JSON form) and exits with the code. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # a validation / license / verification check said no
EXIT_BAD_INPUT = 2  # the input (or the environment: disk full) is unusable


class ReleaseError(Exception):
    """An expected failure: one line for people, an exit code for machines."""

    exit_code: int = EXIT_BAD_INPUT
    kind: str = "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"ok": False, "error": self.kind, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        out["exit_code"] = self.exit_code
        return out


class BadInputError(ReleaseError):
    """The input cannot be used: wrong format, corrupt, unsupported, missing pieces."""

    exit_code = EXIT_BAD_INPUT
    kind = "bad_input"


class CheckFailedError(ReleaseError):
    """The input was read fine but a check on the result failed."""

    exit_code = EXIT_CHECK_FAILED
    kind = "check_failed"


class MissingExtraError(BadInputError):
    """The command needs a library the installed profile leaves out (``pip install 'model-release[X]'``)."""

    kind = "missing_extra"


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def os_error_to_release_error(exc: OSError, doing: str) -> ReleaseError:
    """Turn an OSError met while ``doing`` something into one clear line."""
    if exc.errno in _DISK_ERRNOS:
        reason = {
            errno.ENOSPC: "no space left on device",
            errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file size limit exceeded",
        }[exc.errno]
        return BadInputError(f"{reason} while {doing}", hint="free some space or write elsewhere")
    return BadInputError(f"{exc.strerror or exc} while {doing}" + (f": {exc.filename}" if exc.filename else ""))
