"""Release metadata: one object, read from a file or flags, licenses only from the registry."""

from __future__ import annotations

import json
import re

import pytest

from release.cli.gguf import release_metadata
from release.errors import BadInputError
from release.metadata import BaseModel, ReleaseMetadata


def test_metadata_file_and_flag_override(tmp_path):
    path = tmp_path / "release.json"
    path.write_text(
        json.dumps(
            {
                "name": "Meditron-7B",
                "version": "1.0",
                "license": "llama2",
                "base_models": [{"name": "Llama-2-7b", "organization": "meta-llama", "license": "llama2"}],
            }
        )
    )
    meta = release_metadata(path, None, "1.1", None, [], None, None)
    assert meta.name == "Meditron-7B" and meta.version == "1.1" and meta.license == "llama2"
    assert meta.base_models == (BaseModel("Llama-2-7b", "meta-llama", None, "llama2"),)
    g = meta.to_gguf()
    assert g.license_name == "Llama 2 Community License Agreement"
    assert g.license_link == "https://ai.meta.com/llama/license/"
    assert g.base_models == [{"name": "Llama-2-7b", "organization": "meta-llama"}]
    flags = release_metadata(path, None, None, None, ["epfl-llm/meditron-7b"], None, None, "https://example.org/src")
    assert flags.to_gguf().source_repo_url == "https://example.org/src"
    assert flags.base_models == (BaseModel("meditron-7b", "epfl-llm", "https://huggingface.co/epfl-llm/meditron-7b"),)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"name": "x", "licence": "mit"}, "unknown release metadata field(s) licence"),
        ({"license": "cc-by-nc-9"}, "unknown license 'cc-by-nc-9'"),
        ({"base_models": [{"name": "b", "license": "nope"}]}, "unknown license 'nope'"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_metadata_files_are_refused(tmp_path, content, message):
    path = tmp_path / "release.json"
    path.write_text(json.dumps(content))
    with pytest.raises(BadInputError, match=re.escape(message)):
        ReleaseMetadata.from_file(path)


def test_safetensors_metadata_carries_license_and_lineage():
    meta = ReleaseMetadata(name="m", license="apache-2.0", base_models=(BaseModel("a"), BaseModel("b")))
    st = meta.to_safetensors()
    assert st["format"] == "pt" and st["license"] == "apache-2.0" and st["base_model"] == "a,b"
    assert all(isinstance(v, str) for v in st.values())
