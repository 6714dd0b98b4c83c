"""Ed25519 signatures of global-model messages (RFC 8032, through ``cryptography``).

Only the basestation holds the 32-byte private key (its seed); devices hold the
32-byte public key, so a device can check a model but cannot make one. Device
updates stay HMAC-SHA256 with per-device keys (edge.wire.message).

    seed = generate_signing_key()
    sig = sign(seed, b"body")                   # 64 bytes, deterministic
    verify(public_key(seed), b"body", sig)      # True

``cryptography`` is imported on first use: an edge that never checks a model
(tests, the light load generator with check_model=False) does not load it.
"""

from __future__ import annotations

import os

from edge.wire.errors import WireError

KEY_SIZE = 32
SIGNATURE_SIZE = 64


def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - depends on the installation
        raise WireError("bad_field", "Ed25519 needs the 'cryptography' package (pip install cryptography, "
                                     "or apt-get install python3-cryptography)") from None
    return ed25519


def _raw(key: object, what: str) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
        raise WireError("bad_field", f"an Ed25519 {what} key is {KEY_SIZE} bytes, got "
                                     f"{type(key).__name__} of length {len(key) if hasattr(key, '__len__') else '?'}")
    return bytes(key)


def generate_signing_key() -> bytes:
    """A new private key (32 random bytes from os.urandom; any 32 bytes are a valid Ed25519 seed)."""
    return os.urandom(KEY_SIZE)


def public_key(private: bytes) -> bytes:
    """The 32-byte public key of a private key."""
    from cryptography.hazmat.primitives import serialization

    ed = _ed25519()
    key = ed.Ed25519PrivateKey.from_private_bytes(_raw(private, "private"))
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(private: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """The 64-byte Ed25519 signature of ``data``."""
    ed = _ed25519()
    return ed.Ed25519PrivateKey.from_private_bytes(_raw(private, "private")).sign(bytes(data))


def verify(public: bytes, data: bytes | bytearray | memoryview, signature: bytes) -> bool:
    """True if ``signature`` is the Ed25519 signature of ``data`` under ``public``."""
    from cryptography.exceptions import InvalidSignature

    ed = _ed25519()
    raw = _raw(public, "public")  # a key of the wrong form is the caller's error, not a failed signature
    try:
        key = ed.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return False
    try:
        key.verify(bytes(signature), bytes(data))
    except InvalidSignature:
        return False
    return True
