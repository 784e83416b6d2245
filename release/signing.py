"""Sign and verify release folders with OpenSSF model signing (``model-signing``).

Key-based signing (an EC P-256 key; `keygen` makes one) works offline; sigstore signing, for users
with network and an identity, is the library's default and is reachable with ``--sigstore``. The
signature (``release.sig``, a sigstore bundle whose payload lists every file's sha256) lives
inside the folder and is excluded from what it signs, so it travels with the repository.

A downstream user who fetched one variant has a subset of the folder. The library's ``verify``
insists on every signed file, so for a subset we check the bundle's signature with the library's
verifier and compare the files present with the digests it signed (``verify_subset``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from release.errors import BadInputError, CheckFailedError
from release.manifest import MANIFEST, PROVENANCE, SIGNATURE

IGNORED = [SIGNATURE, ".cache", ".gitattributes"]  # .cache: huggingface_hub's local_dir bookkeeping


def _hashing_config(folder: Path) -> Any:
    """model-signing's file serialization (sha256 per file), with each digest from
    ``release.hashing.sha256_file``: the same sha256 of the same bytes, but inside a build computed
    once for card, manifest and sign together (the build's hash cache). The library has no public
    hook for known digests, so its file-hasher factory is overridden; the signature's bytes are the
    library's own (the tests verify with the unmodified library)."""
    from model_signing import hashing
    from model_signing._hashing import hashing as digests
    from model_signing._hashing import io

    from release.hashing import sha256_file

    class KnownDigestHasher(io.SimpleFileHasher):
        def compute(self) -> Any:
            return digests.Digest(self.digest_name, bytes.fromhex(sha256_file(self._file)))

    class CachedConfig(hashing.Config):
        def _build_file_hasher_factory(self, hashing_algorithm: Any = "sha256", chunk_size: int = 1 << 20,
                                       max_workers: Any = None) -> Any:  # fmt: skip
            if hashing_algorithm != "sha256":  # the known digests are sha256
                return super()._build_file_hasher_factory(hashing_algorithm, chunk_size, max_workers)

            def factory(path: Path) -> Any:
                return KnownDigestHasher(path, self._build_stream_hasher(hashing_algorithm), chunk_size=chunk_size)

            return factory

    return CachedConfig().use_file_serialization(hashing_algorithm="sha256").set_ignored_paths(paths=IGNORED)


def keygen(out_dir: Path, force: bool = False) -> tuple[Path, Path]:
    """An EC P-256 key pair in PEM (what model-signing's key signer takes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from release.atomic import atomic_file

    out_dir = Path(out_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    paths = out_dir / "release-signing.key", out_dir / "release-signing.pub"
    for path, data in zip(paths, (priv, pub), strict=True):
        with atomic_file(path, force=force) as tmp:
            tmp.write_bytes(data)
            if path.suffix == ".key":
                tmp.chmod(0o600)
    return paths


def sign_folder(folder: Path, *, private_key: Path | None = None, sigstore: bool = False) -> Path:
    from model_signing import signing

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise BadInputError(f"{folder}: no {MANIFEST}; run `model-release manifest` first")
    from release.agreement import check_agreement
    from release.manifest import load_manifest

    check_agreement(folder, (load_manifest(folder / MANIFEST).get("licenses") or {}).get("weights"))
    config = signing.Config().set_hashing_config(_hashing_config(folder))
    if sigstore:
        config = config.use_sigstore_signer()
    elif private_key is not None:
        if not Path(private_key).is_file():
            raise BadInputError(f"{private_key}: no such private key")
        config = config.use_elliptic_key_signer(private_key=private_key)
    else:
        raise BadInputError("pass --key PRIVATE_KEY (offline) or --sigstore (needs network and an identity)")
    if sigstore:  # the build record is signed with the release's EC key only: no stale one left behind
        (folder / PROVENANCE).unlink(missing_ok=True)
    else:  # the build record, signed with the same key; release.sig then covers it
        from release.provenance import write as write_provenance

        write_provenance(folder, private_key)
    sig = folder / SIGNATURE
    try:
        config.sign(folder, sig)
    except (ValueError, OSError) as exc:
        raise BadInputError(f"{folder}: signing failed ({exc})") from None
    return sig


def _verifier(public_key: Path) -> Any:
    from model_signing import verifying

    if not Path(public_key).is_file():
        raise BadInputError(f"{public_key}: no such public key")
    return verifying.Config().use_elliptic_key_verifier(public_key=public_key)


def verify_folder(folder: Path, public_key: Path) -> None:
    """The whole folder matches its signature: no file changed, added or removed."""
    folder = Path(folder)
    sig = folder / SIGNATURE
    if not sig.is_file():
        raise CheckFailedError(f"{folder}: no signature ({SIGNATURE})")
    config = _verifier(public_key).set_hashing_config(_hashing_config(folder))
    try:
        config.verify(folder, sig)
    except ValueError as exc:
        raise CheckFailedError(f"{folder}: signature check failed: {exc}") from None


def signed_digests(folder: Path, public_key: Path) -> dict[str, str]:
    """Check the bundle's signature and return what it signed: relative path -> sha256 hex."""
    from model_signing._serialization import serialization  # noqa: F401  (registers serializers)

    config = _verifier(public_key)
    sig = Path(folder) / SIGNATURE
    if not sig.is_file():
        raise CheckFailedError(f"{folder}: no signature ({SIGNATURE})")
    try:
        from model_signing._signing import sign_sigstore_pb as sigstore_pb

        signature = sigstore_pb.Signature.read(sig)
        # The library's own verifier checks the signature and decodes the signed manifest; its
        # public verify() would then demand every signed file (see the module docstring).
        expected = config._verifier.verify(signature)
    except Exception as exc:  # the library raises several types for a bad signature or key
        raise CheckFailedError(f"{folder}: signature check failed: {exc}") from None
    return {rd.identifier: rd.digest.digest_hex for rd in expected.resource_descriptors()}


def verify_subset(folder: Path, public_key: Path, files: dict[str, str]) -> None:
    """``files`` (relative path -> sha256 we computed) are all signed with exactly those digests."""
    signed = signed_digests(folder, public_key)
    problems = [f"{p} is not signed" for p in files if p not in signed]
    problems += [f"{p}: sha256 differs from the signed one" for p, d in files.items() if p in signed and signed[p] != d]
    if problems:
        raise CheckFailedError(f"{folder}: signature check failed: {'; '.join(problems)}")


def check_provenance(
    folder: Path, public_key: Path | None, only: set[str] | None = None, known: dict[str, str] | None = None
) -> bool:
    """What `verify` and `fetch` ask of a folder's build record; True when one was checked. With a
    key, a record the OpenSSF signature lists must be there (a removed one is refused, not ignored),
    and its own DSSE signature must verify; without one, only its subjects are compared. ``known``:
    digests already checked against these files (provenance.check_subjects)."""
    from release.provenance import verify

    present = (Path(folder) / PROVENANCE).is_file()
    if public_key is not None and not present and PROVENANCE in signed_digests(folder, public_key):
        raise CheckFailedError(f"{folder}: the signature lists a build record ({PROVENANCE}) and it is missing")
    if not present:
        return False
    verify(folder, public_key, only, known)
    return True
