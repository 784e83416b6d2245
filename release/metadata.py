"""The one release metadata object every writer turns into its format's fields.

Nobody invents license or provenance fields locally: safetensors ``__metadata__``, GGUF
``general.*`` and the model card YAML (later) are all rendered from ``ReleaseMetadata``. License
names and links come from the registry in ``licenses/registry.json``, never from a guess.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from release import TOOL_NAME, __version__
from release.errors import BadInputError
from release.licensing import license_info


@dataclass(frozen=True)
class BaseModel:
    """A model this release descends from, with the license its weights carry."""

    name: str
    organization: str | None = None
    repo_url: str | None = None
    license: str | None = None
    copyright: str | None = None  # the base model's copyright line, for licenses that ship it (MIT)

    @classmethod
    def from_repo(cls, repo_id: str, license: str | None = None) -> BaseModel:
        """``meta-llama/Llama-2-7b-hf`` -> name, organization and Hub URL."""
        org, _, name = repo_id.rpartition("/")
        return cls(name=name, organization=org or None, repo_url=f"https://huggingface.co/{repo_id}", license=license)


@dataclass(frozen=True)
class ReleaseMetadata:
    name: str | None = None
    version: str | None = None
    source_checkpoint_hash: str | None = None  # hashing.checkpoint_hash of the source weights
    # When the source is itself a model-release output (e.g. GGUF made from a `convert --dtype fp16`
    # folder): the hash of the checkpoint that one was made from, so validation can tie a variant
    # to the original model's reference.
    origin_checkpoint_hash: str | None = None
    source_format: str | None = None  # safetensors | pytorch
    license: str | None = None  # Hugging Face license id decided for the weights
    base_models: tuple[BaseModel, ...] = field(default_factory=tuple)
    repo_url: str | None = None  # where this release is published
    code_license: str | None = None  # license of the code released beside the weights (default apache-2.0)
    base_model_relation: str | None = None  # finetune | adapter | merge (variants are always "quantized")
    description: str | None = None
    domain: str | None = None  # "medical" adds the clinical-use advisory to cards
    languages: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    gated_prompt: str | None = None  # set: the Hub repo is gated with this prompt (as Meditron's is)
    citation: str | None = None
    source_repo_url: str | None = None  # where the source checkpoint came from (GGUF general.source.*)
    quantized_by: str | None = None
    # Licenses the registry cannot ship, declared in the release file: ({id, name, link, text}, ...)
    licenses: tuple[dict[str, Any], ...] = ()
    tool: str = TOOL_NAME
    tool_version: str = __version__

    def with_(self, **changes: object) -> ReleaseMetadata:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def producer(self) -> str:
        return f"{self.tool} {self.tool_version}"

    @classmethod
    def from_file(cls, path: Path) -> ReleaseMetadata:
        """A release file (JSON or YAML): {"name", "version", "license", "base_models": [{"name", ...}], ...}."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text)
            else:
                raw = json.loads(text)
        except Exception as exc:  # OSError, JSONDecodeError, yaml.YAMLError
            raise BadInputError(f"{path}: cannot read release metadata ({exc})") from None
        if not isinstance(raw, dict):
            raise BadInputError(f"{path}: release metadata must be a JSON object")
        raw = raw.get("release", raw)  # a pipeline release file keeps these under "release"
        fields = {f.name for f in dataclasses.fields(cls)} - {"tool", "tool_version", "source_checkpoint_hash",
                                                             "origin_checkpoint_hash", "source_format"}  # fmt: skip
        unknown = sorted(set(raw) - fields)
        if unknown:
            raise BadInputError(f"{path}: unknown release metadata field(s) {', '.join(unknown)}")
        try:
            bases = tuple(BaseModel(**b) for b in raw.pop("base_models", []) or [])
            lists = {k: tuple(raw.pop(k) or ()) for k in ("languages", "datasets", "tags", "licenses") if k in raw}
            meta = cls(**raw, **lists, base_models=bases)
        except TypeError as exc:
            raise BadInputError(f"{path}: bad release metadata ({exc})") from None
        from release.licensing import register_custom

        for lic in meta.licenses:
            register_custom(dict(lic), path.parent)
        meta.check()
        return meta

    def check(self) -> None:
        for lic in [self.license, self.code_license, *(b.license for b in self.base_models)]:
            if lic:
                license_info(lic)

    def to_safetensors(self) -> dict[str, str]:
        """``__metadata__`` of every shard we write (values must be strings)."""
        out = {"format": "pt", "producer": self.producer}
        optional = {
            "source_checkpoint_hash": self.source_checkpoint_hash,
            "origin_checkpoint_hash": self.origin_checkpoint_hash,
            "source_format": self.source_format,
            "name": self.name,
            "version": self.version,
            "license": self.license,
            "base_model": ",".join(b.name for b in self.base_models) or None,
        }
        out.update({k: v for k, v in optional.items() if v})
        return out

    def to_gguf(self) -> Any:
        """A ``gguf.Metadata`` (general.* keys); the caller adds our own provenance keys."""
        import gguf

        lic = license_info(self.license) if self.license else {}
        bases = []
        for b in self.base_models:
            entry = {"name": b.name, "organization": b.organization, "repo_url": b.repo_url}
            bases.append({k: v for k, v in entry.items() if v})
        return gguf.Metadata(
            name=self.name,
            version=self.version,
            license=self.license,
            license_name=lic.get("name"),
            license_link=lic.get("link"),
            base_models=bases or None,
            repo_url=self.repo_url,
            source_url=self.source_repo_url,
            source_repo_url=self.source_repo_url,
            quantized_by=self.quantized_by,
        )

    def gguf_provenance(self) -> dict[str, str]:
        """Keys of our own namespace: llama.cpp ignores them, `inspect` and `fetch` read them."""
        out = {"model_release.producer": self.producer}
        if self.source_checkpoint_hash:
            out["model_release.source_checkpoint_hash"] = self.source_checkpoint_hash
        if self.origin_checkpoint_hash:
            out["model_release.origin_checkpoint_hash"] = self.origin_checkpoint_hash
        return out
