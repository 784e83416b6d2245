"""model-release: checkpoint -> verified, licensed, published release."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("model-release")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"

TOOL_NAME = "model-release"

from release.deferred import defer_rfc3987_syntax  # noqa: E402 - after the version, before any jsonschema import

defer_rfc3987_syntax()
