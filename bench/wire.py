"""Benchmark of the wire format; prints one JSON object.

- pack_bits / unpack_bits throughput (values per second) for every n in
  1..32 on 10**6 values (in their code dtype, as the quantizer produces
  them), beside a straightforward np.packbits / np.unpackbits bit-plane
  baseline measured in the same run on the same data (and checked to give
  the same bytes);
- encode + sign + decode + verify of a 100,000-parameter 8-bit update.

Goals: >= 2e8 values/s packing and unpacking for every n, >= 1e9 for
n in {8, 16, 32}, <= 1 ms for the 100,000-parameter round trip.

Run: ``.venv/bin/python bench/wire.py [--values N] [--repeat R]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from edge.wire import code_dtype, encode_update, pack_bits, quantize_update, unpack_bits, verify_update

CHUNK = 1 << 16  # the baseline works in chunks too, so its bit planes stay a few MB


def baseline_pack(values: np.ndarray, n: int) -> bytes:
    """One uint8 per bit (a bit plane per value), then np.packbits."""
    shifts = np.arange(n, dtype=np.int64)
    out = []
    for start in range(0, values.size, CHUNK):
        u = values[start : start + CHUNK].astype(np.int64)
        planes = ((u[:, None] >> shifts) & 1).astype(np.uint8)
        out.append(planes.reshape(-1))
    return np.packbits(np.concatenate(out), bitorder="little").tobytes()


def baseline_unpack(data: bytes, n: int, count: int) -> np.ndarray:
    """np.unpackbits, then sum the bit planes back into values and sign-extend."""
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=count * n, bitorder="little").reshape(count, n)
    weights = np.int64(1) << np.arange(n, dtype=np.int64)
    out = np.empty(count, code_dtype(n))
    for start in range(0, count, CHUNK):
        u = bits[start : start + CHUNK].astype(np.int64) @ weights
        out[start : start + CHUNK] = u - ((u >> (n - 1)) & 1) * (np.int64(1) << n)
    return out


def best_rate(fn, count: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return count / best


def bench_packing(count: int, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    pack, unpack = {}, {}
    for n in range(1, 33):
        values = rng.integers(-(1 << (n - 1)), 1 << (n - 1), count).astype(code_dtype(n))
        data = pack_bits(values, n)
        if baseline_pack(values, n) != data or not np.array_equal(baseline_unpack(data, n, count), values):
            raise SystemExit(f"baseline and pack_bits disagree at n={n}")
        ours_p = best_rate(lambda: pack_bits(values, n), count, repeat)
        ours_u = best_rate(lambda: unpack_bits(data, n, count), count, repeat)
        base_p = best_rate(lambda: baseline_pack(values, n), count, 2)
        base_u = best_rate(lambda: baseline_unpack(data, n, count), count, 2)
        pack[str(n)] = {"values_per_s": ours_p, "baseline_values_per_s": base_p, "ratio": ours_p / base_p}
        unpack[str(n)] = {"values_per_s": ours_u, "baseline_values_per_s": base_u, "ratio": ours_u / base_u}
    return {"pack": pack, "unpack": unpack}


def bench_round_trip(repeat: int) -> dict:
    rng = np.random.default_rng(1)
    shapes = {"0.weight": (500, 190), "0.bias": (190,), "2.weight": (190, 25), "2.bias": (25,),
              "4.weight": (35,)}  # 95,000 + 190 + 4,750 + 25 + 35 = 100,000 parameters
    delta = {name: (rng.standard_normal(shape) * 0.01).astype(np.float32) for name, shape in shapes.items()}
    assert sum(v.size for v in delta.values()) == 100_000
    started = time.perf_counter()
    tensors = quantize_update(delta, 8, rng)
    quantize_s = time.perf_counter() - started
    key, base = bytes(range(32)), bytes(32)
    seen: set[bytes] = set()
    encode_times, verify_times, size = [], [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        data = encode_update(tensors, experiment="bench", device="pi-01", round=1, base_hash=base, samples=1000,
                             key=key)
        t1 = time.perf_counter()
        verdict = verify_update(data, experiment="bench", round=1, base_hash=base, key=key, seen_nonces=seen)
        t2 = time.perf_counter()
        if not verdict.accepted:
            raise SystemExit(f"round trip rejected: {verdict.reason} {verdict.detail}")
        encode_times.append(t1 - t0)
        verify_times.append(t2 - t1)
        size = len(data)
    totals = [a + b for a, b in zip(encode_times, verify_times)]
    return {
        "parameters": 100_000, "bits": 8, "message_bytes": size,
        "encode_sign_s_median": statistics.median(encode_times),
        "decode_verify_s_median": statistics.median(verify_times),
        "round_trip_s_median": statistics.median(totals),
        "round_trip_s_best": min(totals),
        "quantize_s_once": quantize_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=10**6, help="values per pack/unpack call")
    parser.add_argument("--repeat", type=int, default=7, help="repeats per measurement (best is kept)")
    args = parser.parse_args()
    packing = bench_packing(args.values, args.repeat)
    trip = bench_round_trip(200)
    rates = {kind: {int(n): r["values_per_s"] for n, r in packing[kind].items()} for kind in ("pack", "unpack")}
    worst = {kind: min(r.values()) for kind, r in rates.items()}
    worst_aligned = {kind: min(r[n] for n in (8, 16, 32)) for kind, r in rates.items()}
    ratios = {kind: [r["ratio"] for r in packing[kind].values()] for kind in ("pack", "unpack")}
    result = {
        "benchmark": "wire",
        "numpy": np.__version__,
        "python": platform.python_version(),
        "values_per_call": args.values,
        "summary": {
            "min_pack_values_per_s": worst["pack"],
            "min_unpack_values_per_s": worst["unpack"],
            "min_pack_values_per_s_n8_16_32": worst_aligned["pack"],
            "min_unpack_values_per_s_n8_16_32": worst_aligned["unpack"],
            "pack_ratio_to_baseline_min": min(ratios["pack"]),
            "pack_ratio_to_baseline_median": statistics.median(ratios["pack"]),
            "unpack_ratio_to_baseline_min": min(ratios["unpack"]),
            "unpack_ratio_to_baseline_median": statistics.median(ratios["unpack"]),
            "round_trip_100k_8bit_s_median": trip["round_trip_s_median"],
        },
        "goals": {
            "pack_unpack_ge_2e8_every_n": min(worst.values()) >= 2e8,
            "pack_unpack_ge_1e9_n8_16_32": min(worst_aligned.values()) >= 1e9,
            "round_trip_le_1ms": trip["round_trip_s_median"] <= 1e-3,
        },
        "round_trip": trip,
        **packing,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
