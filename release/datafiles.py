"""Reading the data the package ships as files (``release/data/*.json``) and the project folders of
texts beside it (``licenses/``, ``model_cards/``).

Its own module because everything uses it (errors, architectures, formats, cards, the pipeline):
it imports nothing from the package but the error type, so no import circle can run through it.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any


def data_file(*parts: str) -> Any:
    """Load a JSON data file shipped in ``release/data``."""
    path = resources.files("release").joinpath("data", *parts)
    return json.loads(path.read_text(encoding="utf-8"))


def data_dir(*parts: str) -> Any:
    """A folder of ``release/data`` (a ``Traversable``), for data held as one file per entry."""
    return resources.files("release").joinpath("data", *parts)


def project_folder(name: str, env: str, marker: str) -> Path:
    """A top-level folder of the project that holds data shipped as files (``licenses/``,
    ``model_cards/``), found beside the ``release`` package; ``$env`` points elsewhere."""
    from release.errors import BadInputError

    folder = Path(os.environ[env]) if os.environ.get(env) else Path(__file__).resolve().parents[1] / name
    if not (folder / marker).is_file():
        raise BadInputError(f"{folder}: no {marker} here; set {env} to the project's {name}/ folder")
    return folder
