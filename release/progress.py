"""Progress reporting without tying the core to a terminal library.

Core functions take a ``Reporter``; the CLI passes one that draws rich progress bars, tests and
libraries get the silent default.
"""

from __future__ import annotations


class Reporter:
    """Silent reporter; subclass to show progress. ``total`` is in bytes unless said otherwise."""

    def start(self, description: str, total: int | None = None, unit: str = "bytes") -> None:
        """Begin a step; ``total`` counts ``unit`` (bytes, layers, prompts...)."""

    def advance(self, amount: int = 1) -> None:
        pass

    def done(self) -> None:
        pass

    def warn(self, message: str) -> None:
        pass


NULL = Reporter()
