"""The one exception of the wire format, and the reason codes it carries."""

from __future__ import annotations

# Reason codes, one per way a message (or an argument to the encoder) can be wrong.
# They are stable strings: the basestation stores them and tests match on them.
REASONS: dict[str, str] = {
    "truncated": "the data ends before a field or payload it declares",
    "too_large": "a declared or real size exceeds the configured Limits",
    "bad_magic": "the first four bytes are not the format's magic",
    "bad_version": "a format version this reader does not read",
    "bad_length": "the declared total length does not match the data",
    "bad_crc": "the CRC32 does not match the bytes it covers",
    "bad_signature": "the HMAC-SHA256 does not match with the given key",
    "bad_type": "an unknown message type (update/model) or the wrong one for the caller",
    "bad_kind": "an unknown update kind (difference/full)",
    "bad_bits": "bits per value outside 1..32 (or a float payload not at 32 bits)",
    "bad_rounding": "an unknown rounding code",
    "bad_shape": "a negative dimension, more dimensions than the limit, or values that do not fill the shape",
    "bad_name": "a tensor, experiment or device name that is empty, too long, not UTF-8 or repeated",
    "bad_scale": "a scale exponent outside the allowed range",
    "bad_model_hash": "a model message whose hash does not match the weights it carries",
    "bad_value": "values that do not fit the declared bits, are not integers, or (float32) are NaN or inf",
    "bad_padding": "nonzero bits in the zero padding after a payload's last value",
    "bad_field": "a header field with an invalid value (nonce, hash, round, samples, key)",
    "trailing_data": "bytes after the last payload that no field declares",
}


class WireError(ValueError):
    """A message (or encoder input) that breaks the wire format.

    ``reason`` is one of the codes in :data:`REASONS` (e.g. ``"bad_crc"``);
    the message text says what was expected and what was found.

    >>> try:
    ...     raise WireError("bad_magic", "expected b'QFLW', got b'GIF8'")
    ... except WireError as exc:
    ...     exc.reason
    'bad_magic'
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown WireError reason {reason!r}; expected one of {sorted(REASONS)}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
