"""The floor of the fixed-point MLP step: the engine's own arithmetic, written flat, against float32.

``bench/train_step.py`` times the engine's step (layers, ``Fixed`` tuples,
checks). This script times the digits MLP's step at 8 bits (int mode,
stochastic error rounding) written as one flat function with only the numpy
operations the numerics need, and its float32 counterpart written the same
way, interleaved with the engine's two steps in one run. Before timing it
checks that each flat step trains bit for bit like the engine (same weights
after every step), so the flat step is the same computation, not a cheaper
one. The flat ratio is the least any arrangement of the Python around these
operations can reach; the gap between the engine and the flat step on each
side is the cost of the engine's structure.

Prints one JSON object::

    .venv/bin/python bench/step_floor.py [--rounds 25] [--steps 32]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from typing import Callable

import numpy as np

from edge.data import load_dataset
from edge.fixedpoint import Fixed, add_stochastic, grid_limits, power_of_two, scale_exponent
from edge.layers import softmax_cross_entropy
from edge.network import Network
from models import get_architecture

BITS = 8
BATCH = 32
LR = 0.1
_F32 = np.dtype(np.float32)


class FlatMLP:
    """The digits MLP (64-32-10) as four views into one flat buffer, stepped without layers.

    Built from a :class:`Network` (its weights, grid exponents and random
    pool), so that it starts in exactly the state the engine starts in.
    """

    def __init__(self, net: Network) -> None:
        self.q, self.grad, self.pool = net._q, net.grad, net._uniform
        self.w1, self.b1, self.w2, self.b2 = net._views(self.q)
        self.gw1, self.gb1, self.gw2, self.gb2 = net._views(self.grad)
        exponents = net.exponents
        self.ew1, self.ew2 = exponents.get("0.weight", 0), exponents.get("2.weight", 0)
        self.zeros = np.zeros((BATCH, self.w1.shape[1]), self.q.dtype)
        if net.bits < 32:
            factor = (net._inv_range * -LR).astype(self.q.dtype) * float(1 << (net.bits - 1))
            self.update = (factor, *grid_limits(net.bits, net.size, self.q.dtype))

    def step_fixed(self, x: np.ndarray, x_exponent: int, y: np.ndarray) -> None:
        """One 8-bit step: the engine's operations in the engine's order (same pool draws)."""
        acc = x @ self.w1
        acc += self.b1 * power_of_two(-x_exponent, _F32)
        e1 = x_exponent + self.ew1
        h = np.maximum(acc, self.zeros)
        active = h > self.zeros
        largest = h.item(h.argmax())  # the hidden activations: unsigned 8 bits, rounded to nearest
        shift = scale_exponent(largest, BITS)
        hq = np.multiply(h, power_of_two(-shift, _F32))
        np.rint(hq, out=hq)
        if math.ldexp(largest, -shift) >= (1 << BITS) - 0.5:
            np.minimum(hq, (1 << BITS) - 1, out=hq)
        eh = e1 + shift
        out = hq @ self.w2
        out += self.b2 * power_of_two(-eh, _F32)
        e2 = eh + self.ew2
        _, error = softmax_cross_entropy(out * power_of_two(e2, _F32), y)
        g, eg = self._errors(error)
        np.multiply(hq.T @ g, power_of_two(eh + eg, _F32), out=self.gw2)
        np.multiply(np.add.reduce(g, axis=0), power_of_two(eg, _F32), out=self.gb2)
        dh = g @ self.w2.T
        dh = dh * active
        g0, eg0 = self._errors(dh)
        eg0 += eg + self.ew2
        np.multiply(x.T @ g0, power_of_two(x_exponent + eg0, _F32), out=self.gw1)
        np.multiply(np.add.reduce(g0, axis=0), power_of_two(eg0, _F32), out=self.gb1)
        add_stochastic(self.q, self.grad, *self.update, self.pool)

    def _errors(self, error: np.ndarray) -> tuple[np.ndarray, int]:
        """A backward error on the signed 8-bit grid, stochastically rounded; its integers and exponent."""
        largest, smallest = error.item(error.argmax()), error.item(error.argmin())
        limit = (1 << (BITS - 1)) - 1
        shift = scale_exponent(max(largest, -smallest), BITS - 1)
        scaled = np.multiply(error, power_of_two(-shift, _F32))
        scaled += self.pool.draw(scaled.shape)
        np.floor(scaled, out=scaled)
        if math.ldexp(largest, -shift) > limit:
            np.minimum(scaled, limit, out=scaled)
        return scaled, shift

    def step_float(self, x: np.ndarray, y: np.ndarray) -> None:
        """One float32 step, written the same way."""
        acc = x @ self.w1
        acc += self.b1
        h = np.maximum(acc, self.zeros)
        active = h > self.zeros
        out = h @ self.w2
        out += self.b2
        _, error = softmax_cross_entropy(out, y)
        np.matmul(h.T, error, out=self.gw2)
        np.add.reduce(error, axis=0, out=self.gb2)
        dh = error @ self.w2.T
        dh = dh * active
        np.matmul(x.T, dh, out=self.gw1)
        np.add.reduce(dh, axis=0, out=self.gb1)
        self.q += self.grad * -LR


def _setup(bits: int, x: np.ndarray, batches: list[np.ndarray]) -> tuple[Network, list[Fixed]]:
    net = Network(get_architecture("mlp"), bits=bits, seed=0)
    data = net.quantize_inputs(x)
    return net, [Fixed(data.q[b], data.exponent, data.bound) for b in batches]


def steppers(x: np.ndarray, y: np.ndarray, batches: list[np.ndarray]) -> dict[str, Callable[[], None]]:
    """The four steps to time, each a function running one step per batch, after checking the flat ones."""
    labels = [y[b] for b in batches]
    runs: dict[str, Callable[[], None]] = {}
    for bits in (32, BITS):
        engine, inputs = _setup(bits, x, batches)
        flat_net, _ = _setup(bits, x, batches)
        flat = FlatMLP(flat_net)
        for xb, yb in zip(inputs, labels):  # the check: the same weights after every step
            engine.backprop(xb, yb)
            engine.step(engine.grad, -LR)
            flat.step_float(xb.q, yb) if bits == 32 else flat.step_fixed(xb.q, xb.exponent, yb)
            if not np.array_equal(engine._q, flat.q):
                raise AssertionError(f"the flat {bits}-bit step no longer trains like the engine; fix step_floor.py")

        def run_engine(net: Network = engine, inputs: list[Fixed] = inputs) -> None:
            for xb, yb in zip(inputs, labels):
                net.backprop(xb, yb)
                net.step(net.grad, -LR)

        if bits == 32:
            def run_flat(flat: FlatMLP = flat, inputs: list[Fixed] = inputs) -> None:
                for xb, yb in zip(inputs, labels):
                    flat.step_float(xb.q, yb)
        else:
            def run_flat(flat: FlatMLP = flat, inputs: list[Fixed] = inputs) -> None:
                for xb, yb in zip(inputs, labels):
                    flat.step_fixed(xb.q, xb.exponent, yb)

        name = "float32" if bits == 32 else f"{bits}"
        runs[f"engine/{name}"], runs[f"flat/{name}"] = run_engine, run_flat
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="interleaved timing rounds (the median is reported)")
    parser.add_argument("--steps", type=int, default=32, help="steps per timing")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be positive")
    ds = load_dataset("digits", seed=0)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(ds.y_train), BATCH, replace=False) for _ in range(args.steps)]
    runs = steppers(ds.x_train, ds.y_train, batches)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / args.steps)
    us = {name: round(float(np.median(values)) * 1e6, 2) for name, values in times.items()}
    report = {
        "benchmark": "step_floor",
        "model": "mlp",
        "bits": BITS,
        "batch": BATCH,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "step_us": us,
        "engine_ratio": round(us[f"engine/{BITS}"] / us["engine/float32"], 3),
        "flat_ratio": round(us[f"flat/{BITS}"] / us["flat/float32"], 3),
        "structure_us": {"float32": round(us["engine/float32"] - us["flat/float32"], 2),
                         f"{BITS}": round(us[f"engine/{BITS}"] - us[f"flat/{BITS}"], 2)},
        "bit_exact_with_engine": True,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
