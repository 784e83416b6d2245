"""The one release metadata object every writer turns into its format's fields.

Nobody invents license or provenance fields locally: safetensors ``__metadata__`` (here), GGUF
``general.*`` and the model card YAML (later) are all rendered from ``ReleaseMetadata``. This
issue fills provenance; licensing and lineage extend the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from release import TOOL_NAME, __version__


@dataclass(frozen=True)
class BaseModel:
    """A model this release descends from, with the license its weights carry."""

    name: str
    license: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class ReleaseMetadata:
    name: str | None = None
    version: str | None = None
    source_checkpoint_hash: str | None = None  # hashing.checkpoint_hash of the source weights
    source_format: str | None = None  # safetensors | pytorch
    license: str | None = None  # Hugging Face license id decided for the weights
    base_models: tuple[BaseModel, ...] = field(default_factory=tuple)
    tool: str = TOOL_NAME
    tool_version: str = __version__

    def with_(self, **changes: object) -> ReleaseMetadata:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def producer(self) -> str:
        return f"{self.tool} {self.tool_version}"

    def to_safetensors(self) -> dict[str, str]:
        """``__metadata__`` of every shard we write (values must be strings)."""
        out = {"format": "pt", "producer": self.producer}
        optional = {
            "source_checkpoint_hash": self.source_checkpoint_hash,
            "source_format": self.source_format,
            "name": self.name,
            "version": self.version,
            "license": self.license,
            "base_model": ",".join(b.name for b in self.base_models) or None,
        }
        out.update({k: v for k, v in optional.items() if v})
        return out
