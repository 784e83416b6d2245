"""Install profiles (``release/data/extras.json``): which extra brings which module, and the one
line for a command that needs a module its install leaves out."""

from __future__ import annotations

from release.datafiles import data_file
from release.errors import MissingExtraError


def missing_extra(exc: ModuleNotFoundError, command: str | None, what: str | None = None) -> MissingExtraError | None:
    """The one line for a command that needs a module of an extra that is not installed; None when
    the missing module is not one an extra brings (a bug, or a broken environment: keep the traceback)."""
    top = (exc.name or "").split(".")[0]
    table = data_file("extras.json")
    if top not in table["modules"]:
        return None
    extra = table["commands"].get(command or "", table["modules"][top])
    what = what or (f"`model-release {command}`" if command else "this command")
    return MissingExtraError(f"{what} needs {top}, which this install leaves out: pip install 'model-release[{extra}]'")
