"""Checksums and atomic writes for model artifacts.

A model file is unpickled, and unpickling runs code: a file that is not byte-for-byte the one
we wrote must never be loaded. Every artifact therefore travels with its SHA-256 (a sidecar
file for online checkpoints, the manifest for registry versions), and the bytes are verified
*before* they reach ``joblib.load``. Writes go to a temporary file in the same directory and are
moved into place with ``os.replace``, so a reader sees the old file or the new one, never half.

A checksum beside the file catches corruption, not tampering: whoever can swap the pickle can
swap its checksum too. With a signing key configured (``KEYWATCH_MODEL_SIGNING_KEY``), the
registry's manifests (which hold every file's SHA-256) carry an HMAC-SHA256 made with that
key (:func:`sign`), and a manifest without a valid one is refused before any byte is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
from pathlib import Path
from typing import Any

import joblib

from features.durable import atomic_write_bytes

__all__ = [
    "ModelIntegrityError",
    "atomic_write_bytes",
    "dump_bytes",
    "load_verified",
    "sha256_bytes",
    "sha256_file",
    "sign",
    "signature_matches",
]

SIGNATURE_SCHEME = "hmac-sha256"


def sign(data: bytes, key: str | bytes) -> str:
    """``hmac-sha256:<hex>`` of ``data`` under ``key``."""
    raw_key = key.encode() if isinstance(key, str) else key
    return f"{SIGNATURE_SCHEME}:{hmac.new(raw_key, data, hashlib.sha256).hexdigest()}"


def signature_matches(data: bytes, key: str | bytes, signature: object) -> bool:
    """Whether ``signature`` is :func:`sign` of ``data`` under ``key`` (constant time)."""
    if not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign(data, key).encode(), signature.encode())


class ModelIntegrityError(RuntimeError):
    """An artifact does not match its recorded checksum or schema; it was not loaded."""


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dump_bytes(obj: Any, *, compress: int = 3) -> bytes:
    """Serialise ``obj`` with joblib into memory (so it can be hashed before it is written)."""
    buffer = io.BytesIO()
    joblib.dump(obj, buffer, compress=compress)
    return buffer.getvalue()


def load_verified(path: str | os.PathLike[str], expected_sha256: str) -> Any:
    """Unpickle ``path`` only if its bytes hash to ``expected_sha256``.

    The file is read once; the verified bytes are the ones unpickled, so the file cannot be
    swapped between the check and the load.

    Raises
    ------
    ModelIntegrityError
        If the file is missing, its checksum differs, or it does not unpickle.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelIntegrityError(f"model file {path} is missing") from None
    actual = sha256_bytes(data)
    if actual != expected_sha256.strip().lower():
        raise ModelIntegrityError(
            f"model file {path} fails its SHA-256 check (expected {expected_sha256.strip()}, "
            f"got {actual}); refusing to load it"
        )
    try:
        return joblib.load(io.BytesIO(data))
    except Exception as exc:  # a correct checksum of a broken pickle: written broken
        raise ModelIntegrityError(f"model file {path} does not unpickle: {exc}") from exc
