"""Cross-cell cryptography (pure): pairing tokens and MACs, link keys, the short auth string.

- Pairing: the invite's token (192 random bits) is never stored and never travels back; both
  sides derive a MAC key from it with HKDF, and every pairing message is an HMAC-SHA256 over its
  canonical JSON with that key.
- Link key: each side derives the same key on its own from X25519 of its private key and the
  other's public key, through HKDF with both public keys (sorted) as salt. No secret is exchanged.
- Short authentication string: 16 digits from both public keys (sorted), the same on both cells,
  for the owners to compare by voice. 53 bits make grinding a matching key pair impractical.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TOKEN_BYTES = 24


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _hkdf(material: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(material)


def pairing_key(token: str) -> bytes:
    return _hkdf(token.encode(), b"picell pairing v1", b"pairing mac")


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def mac(key: bytes, obj: Any) -> str:
    return hmac.new(key, canonical(obj), hashlib.sha256).hexdigest()


def mac_ok(key: bytes, obj: Any, claimed: str) -> bool:
    return hmac.compare_digest(mac(key, obj), claimed if isinstance(claimed, str) else "")


def _raw(public_b64: str) -> bytes:
    return base64.b64decode(public_b64)


def link_key(our_private_b64: str, their_public_b64: str) -> bytes:
    ours = X25519PrivateKey.from_private_bytes(base64.b64decode(our_private_b64))
    theirs = X25519PublicKey.from_public_bytes(_raw(their_public_b64))
    shared = ours.exchange(theirs)
    our_public = ours.public_key().public_bytes_raw()
    salt = b"".join(sorted([our_public, _raw(their_public_b64)]))
    return _hkdf(shared, salt, b"picell link v1")


def short_auth_string(public_a: str, public_b: str) -> str:
    digest = hashlib.sha256(b"picell sas v1" + b"".join(sorted([_raw(public_a), _raw(public_b)])))
    number = int.from_bytes(digest.digest()[:8], "big") % 10**16
    digits = f"{number:016d}"
    return " ".join(digits[i : i + 4] for i in range(0, 16, 4))
