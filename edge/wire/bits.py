"""Pack n-bit two's complement integers into a little-endian bit stream.

Bit order (the only one): value i occupies stream bits [i*n, (i+1)*n), its
least significant bit first; stream bit p is bit p % 8 of byte p // 8; the
last byte is zero-padded. Unpacking sign-extends.

How it is fast without a loop over bits: n in {8, 16, 32} is a dtype view of
little-endian integers, and n = 1 is numpy's own packbits. For any other n, 8 values make exactly n bytes, so
the stream is cut into groups of 8 values. Inside a group, neighbours are
joined (lo | hi << width) into words of 2n, 4n, then 8n bits while a word
fits 64 bits; those words are placed at their bit offsets in a row of
64-bit lanes whose little-endian bytes, cut to n, are the group's bytes.
Unpacking runs the same steps backwards. Every step is one numpy operation
over all groups of a cache-sized chunk, so the work per value does not
depend on n and nothing large is precomputed.

>>> pack_bits([1, -1, 2], 3).hex()
'b900'
>>> unpack_bits(bytes.fromhex("b900"), 3, 3)
array([ 1, -1,  2], dtype=int8)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from edge.wire.errors import WireError


def code_dtype(n: int) -> np.dtype:
    """The smallest signed dtype holding n-bit values: int8, int16 or int32.

    >>> code_dtype(12)
    dtype('int16')
    """
    _check_n(n)
    return np.dtype(np.int8 if n <= 8 else np.int16 if n <= 16 else np.int32)


def packed_size(n: int, count: int) -> int:
    """Bytes that ``count`` values of ``n`` bits take: ceil(n * count / 8).

    >>> packed_size(3, 10)
    4
    """
    _check_n(n)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise WireError("bad_shape", f"count must be an integer >= 0, got {count!r}")
    return (n * int(count) + 7) // 8


def pack_bits(values: ArrayLike, n: int) -> bytes:
    """Pack integers in [-2**(n-1), 2**(n-1) - 1] into n bits each.

    ``values`` is flattened (C order). Raises WireError ("bad_bits" for n
    outside 1..32, "bad_value" for non-integer or out-of-range values).

    >>> pack_bits([-1, 0, 1, -2], 2).hex()
    '93'
    """
    _check_n(n)
    v = np.asarray(values)
    if v.size == 0:
        return b""  # also for an empty list, which numpy types as float64
    if v.dtype.kind not in "iub":
        raise WireError("bad_value", f"pack_bits expects integer values, got dtype {v.dtype}")
    v = v.reshape(-1)
    _check_range(v, n)
    if n in (8, 16, 32):
        return v.astype(f"<i{n // 8}", copy=False).tobytes()
    if n == 1:  # codes -1 and 0: the bit is set exactly for -1
        return np.packbits(v != 0, bitorder="little").tobytes()
    return _pack_groups(v, n)


def unpack_bits(data: bytes | bytearray | memoryview, n: int, count: int) -> np.ndarray:
    """Read ``count`` n-bit values from the start of ``data``, sign-extended.

    Returns a new 1-D array of dtype :func:`code_dtype` (n) (int8, int16 or
    int32). ``data`` may be longer than needed; shorter raises WireError
    ("truncated").

    >>> unpack_bits(b"\\x93", 2, 4)
    array([-1,  0,  1, -2], dtype=int8)
    """
    need = packed_size(n, count)
    buf = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    if len(buf) < need:
        raise WireError("truncated", f"{count} values of {n} bits need {need} bytes, got {len(buf)}")
    dtype = code_dtype(n)
    if count == 0:
        return np.zeros(0, dtype)
    if n in (8, 16, 32):
        return np.frombuffer(buf, dtype=f"<i{n // 8}", count=count).astype(dtype)
    if n == 1:
        bits = np.unpackbits(np.frombuffer(buf, np.uint8, count=need), count=count, bitorder="little")
        return np.negative(bits.view(np.int8))
    return _unpack_groups(buf, n, count, dtype)


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= 32:
        raise WireError("bad_bits", f"bits per value must be an integer in 1..32, got {n!r}")


def _check_range(v: np.ndarray, n: int) -> None:
    lo, hi = -(1 << (n - 1)), (1 << (n - 1)) - 1
    info = np.iinfo(v.dtype) if v.dtype.kind != "b" else None
    if v.size == 0 or (info is not None and info.min >= lo and info.max <= hi):
        return  # the dtype itself guarantees the range (e.g. int8 at n = 8)
    vmin, vmax = int(v.min()), int(v.max())
    if vmin < lo or vmax > hi:
        bad = vmin if vmin < lo else vmax
        where = int(np.flatnonzero(v == bad)[0])
        raise WireError("bad_value", f"{n}-bit values must lie in [{lo}, {hi}]; value {bad} at index {where} does not")


# Values per chunk: small enough that a chunk's temporaries stay in the CPU
# cache, large enough that numpy's per-call overhead does not dominate.
_CHUNK = 1 << 16


def _udtype(width: int) -> type[np.unsignedinteger]:
    """The smallest unsigned dtype holding ``width`` bits (width <= 64)."""
    return np.uint8 if width <= 8 else np.uint16 if width <= 16 else np.uint32 if width <= 32 else np.uint64


def _widths(n: int) -> list[int]:
    """Bit widths of the pairing levels: n, 2n, 4n, 8n while a word fits 64 bits."""
    widths = [n]
    while len(widths) < 4 and widths[-1] * 2 <= 64:
        widths.append(widths[-1] * 2)
    return widths


def _lane_slots(n: int) -> list[tuple[int, int, int]]:
    """(word index, lane, shift) of each top-level word inside a group's 64-bit lanes."""
    width = _widths(n)[-1]
    return [(k, *divmod(width * k, 64)) for k in range(8 * n // width)]


def _pack_groups(v: np.ndarray, n: int) -> bytes:
    count = v.size
    out = np.empty(packed_size(n, count), np.uint8)
    full = count - count % 8
    for start in range(0, full, _CHUNK):
        stop = min(start + _CHUNK, full)
        _pack_chunk(v[start:stop], n, out[start * n // 8 : stop * n // 8].reshape(-1, n))
    if full < count:  # the last, incomplete group: pad it with zeros to 8 values
        tail = np.zeros(8, v.dtype)
        tail[: count - full] = v[full:]
        row = np.empty((1, n), np.uint8)
        _pack_chunk(tail, n, row)
        out[full * n // 8 :] = row.reshape(-1)[: out.size - full * n // 8]
    return out.tobytes()


def _pack_chunk(v: np.ndarray, n: int, rows: np.ndarray) -> None:
    """Pack ``v`` (a multiple of 8 values) into ``rows``, an (len(v) // 8, n) uint8 view."""
    groups = v.size // 8
    # The unsafe cast to an unsigned dtype keeps the low bits of the two's complement.
    words = v.astype(_udtype(n), copy=False)
    if n != words.dtype.itemsize * 8:
        words = words & _udtype(n)((1 << n) - 1)
    words = words.reshape(groups, 8)
    widths = _widths(n)
    for width in widths[1:]:  # pair neighbours: (lo, hi) -> lo | hi << half
        dtype = _udtype(width)
        lo = words[:, 0::2].astype(dtype)
        hi = words[:, 1::2].astype(dtype)
        hi <<= dtype(width // 2)
        lo |= hi
        words = lo
    words = words.astype(np.uint64, copy=False)
    slots = _lane_slots(n)
    if len(slots) == 1:
        lanes = words
    else:
        lanes = np.zeros((groups, -(-n // 8)), np.uint64)
        top = widths[-1]
        for k, lane, shift in slots:
            lanes[:, lane] |= words[:, k] << np.uint64(shift)
            if shift + top > 64:
                lanes[:, lane + 1] |= words[:, k] >> np.uint64(64 - shift)
    rows[...] = lanes.astype("<u8", copy=False).view(np.uint8).reshape(groups, -1)[:, :n]


def _unpack_groups(buf, n: int, count: int, dtype: np.dtype) -> np.ndarray:
    src = np.frombuffer(buf, np.uint8, count=packed_size(n, count))
    out = np.empty(count - count % 8 + (8 if count % 8 else 0), dtype)
    full_bytes = (count - count % 8) * n // 8
    for start in range(0, count - count % 8, _CHUNK):
        stop = min(start + _CHUNK, count - count % 8)
        _unpack_chunk(src[start * n // 8 : stop * n // 8].reshape(-1, n), n, out[start:stop])
    if count % 8:  # the last group's bytes, zero-padded to a whole group
        row = np.zeros((1, n), np.uint8)
        row[0, : src.size - full_bytes] = src[full_bytes:]
        _unpack_chunk(row, n, out[count - count % 8 :])
    return out[:count]


def _unpack_chunk(rows: np.ndarray, n: int, out: np.ndarray) -> None:
    """Unpack ``rows`` ((groups, n) uint8) into ``out`` (8 * groups values, dtype code_dtype(n))."""
    groups = rows.shape[0]
    padded = np.zeros((groups, -(-n // 8) * 8), np.uint8)
    padded[:, :n] = rows
    lanes = padded.view("<u8").astype(np.uint64, copy=False)
    widths = _widths(n)
    top = widths[-1]
    slots = _lane_slots(n)
    if len(slots) == 1:
        words = lanes
    else:
        words = np.empty((groups, len(slots)), np.uint64)
        top_mask = np.uint64((1 << top) - 1)
        for k, lane, shift in slots:
            word = lanes[:, lane] >> np.uint64(shift)
            if shift + top > 64:
                word |= lanes[:, lane + 1] << np.uint64(64 - shift)
            if top < 64:
                word &= top_mask
            words[:, k] = word
    for width in reversed(widths[1:]):  # split each word into (lo, hi) halves
        half = width // 2
        dtype = _udtype(half)
        split = np.empty((groups, 2 * words.shape[1]), dtype)
        split[:, 0::2] = words  # the cast keeps the low bits ...
        if half != split.dtype.itemsize * 8:  # ... which need a mask unless the dtype is exactly half wide
            split[:, 0::2] &= dtype((1 << half) - 1)
        split[:, 1::2] = words >> words.dtype.type(half)
        words = split
    # Sign-extend: move bit n-1 to the top of the signed dtype and shift back arithmetically.
    spare = out.dtype.itemsize * 8 - n
    signed = words.reshape(-1).view(out.dtype)
    if spare:
        signed = signed << out.dtype.type(spare)
        np.right_shift(signed, out.dtype.type(spare), out=out)
    else:
        out[...] = signed
