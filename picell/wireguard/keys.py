"""Curve25519 key pairs in WireGuard's base64 form, made in-process (no `wg genkey` spawn)."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_RAW = serialization.Encoding.Raw


def generate_private() -> str:
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return base64.b64encode(raw).decode()


def public_from_private(private_b64: str) -> str:
    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private_b64))
    return base64.b64encode(
        key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    ).decode()


def derive_private(private_b64: str, label: str) -> str:
    """A private key derived from ours for one purpose (an exit tunnel's end): nothing to store,
    the same after a restart, and revealing it reveals nothing of `private_b64`."""
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"picell derived key v1",
               info=label.encode()).derive(base64.b64decode(private_b64))  # fmt: skip
    key = X25519PrivateKey.from_private_bytes(raw)  # clamped as X25519 (and WireGuard) clamp
    out = key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return base64.b64encode(out).decode()
