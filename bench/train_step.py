"""Time one training step (batch 32) of the digits MLP and CNN at n = 2, 4, 8, 16 and at float32.

Prints one JSON object. For each model and precision:

- ``step_us``: median time of one bare step, forward + backward + weight
  update (``Network.backprop`` then ``Network.step``), inputs quantized once
  as the trainer does;
- ``ratio``: ``step_us`` over the float32 step measured in the same run;
- ``trainer_step_us``: one iteration of ``LocalTrainer.train`` (batch
  gather, half-batch statistics, update), averaged over 64-iteration calls;
- ``int64_step_us`` / ``int64_ratio``: the same bare step with every integer
  product done by numpy int64 matmul (``edge.gemm.int64_reference``), the
  baseline the BLAS route replaces.

The configurations are timed interleaved, round after round, and the medians
are reported, so a busy machine slows all of them alike. Goals: ratio <= 1.5
for n <= 8 and <= 2 for n <= 16.

    .venv/bin/python bench/train_step.py [--rounds 25] [--steps 32] [--models mlp,cnn] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from typing import Callable

import numpy as np

from edge.data import load_dataset
from edge.fixedpoint import Fixed
from edge.gemm import int64_reference
from edge.network import Network
from edge.trainer import LocalTrainer
from models import get_architecture

BITS = (2, 4, 8, 16)
MODELS = ("mlp", "cnn")
BATCH = 32
LR = 0.1


def bare_step(model: str, bits: int, x: np.ndarray, y: np.ndarray, batches: list[np.ndarray],
              int64: bool) -> Callable[[], float]:
    """A function that runs one step per batch and returns the seconds per step."""
    net = Network(get_architecture(model), bits=bits, seed=0)
    data = net.quantize_inputs(x)
    inputs = [Fixed(data.q[b], data.exponent, data.bound) for b in batches]
    labels = [y[b] for b in batches]

    def run() -> float:
        with int64_reference() if int64 else nullcontext():
            start = time.perf_counter()
            for xb, yb in zip(inputs, labels):
                net.backprop(xb, yb)
                net.step(net.grad, -LR)
            return (time.perf_counter() - start) / len(inputs)

    return run


def trainer_step(model: str, bits: int, x: np.ndarray, y: np.ndarray, batch: int) -> Callable[[], float]:
    net = Network(get_architecture(model), bits=bits, seed=0)
    trainer = LocalTrainer(lr=LR, batch_size=batch, seed=0)

    def run() -> float:
        return trainer.train(net, x, y, iterations=64).seconds / 64

    return run


def measure(model: str, rounds: int, steps: int, batch: int, x: np.ndarray, y: np.ndarray) -> dict:
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(y), batch, replace=False) for _ in range(steps)]
    configs: dict[str, Callable[[], float]] = {"float32": bare_step(model, 32, x, y, batches, False),
                                               "float32/trainer": trainer_step(model, 32, x, y, batch)}
    for bits in BITS:
        configs[f"{bits}"] = bare_step(model, bits, x, y, batches, False)
        configs[f"{bits}/int64"] = bare_step(model, bits, x, y, batches, True)
        configs[f"{bits}/trainer"] = trainer_step(model, bits, x, y, batch)
    for run in configs.values():
        run()  # warm up
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, run in configs.items():
            times[name].append(run())
    median = {name: float(np.median(values)) * 1e6 for name, values in times.items()}
    base = median["float32"]
    result = {"float32_step_us": round(base, 2), "float32_trainer_step_us": round(median["float32/trainer"], 2),
              "bits": {}}
    for bits in BITS:
        result["bits"][str(bits)] = {
            "step_us": round(median[f"{bits}"], 2),
            "ratio": round(median[f"{bits}"] / base, 3),
            "trainer_step_us": round(median[f"{bits}/trainer"], 2),
            "trainer_ratio": round(median[f"{bits}/trainer"] / median["float32/trainer"], 3),
            "int64_step_us": round(median[f"{bits}/int64"], 2),
            "int64_ratio": round(median[f"{bits}/int64"] / base, 3),
        }
    result["goal_met"] = {
        "ratio_le_1.5_for_n_le_8": all(result["bits"][str(b)]["ratio"] <= 1.5 for b in BITS if b <= 8),
        "ratio_le_2_for_n_le_16": all(result["bits"][str(b)]["ratio"] <= 2.0 for b in BITS if b <= 16),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="interleaved timing rounds (the median is reported)")
    parser.add_argument("--steps", type=int, default=32, help="steps per timing")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated models to time (mlp, cnn)")
    parser.add_argument("--batch", type=int, default=BATCH, help="examples per step (the goals are for 32)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    if not models or any(m not in MODELS for m in models):
        parser.error(f"--models takes a comma-separated subset of {', '.join(MODELS)}, got {args.models!r}")
    if args.batch < 1:
        parser.error(f"--batch must be a positive number of examples, got {args.batch}")
    ds = load_dataset("digits", seed=0)
    if args.batch > len(ds.y_train):
        parser.error(f"--batch can be at most the {len(ds.y_train)} training examples, got {args.batch}")
    report = {
        "benchmark": "train_step",
        "batch": args.batch,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "models": {model: measure(model, args.rounds, args.steps, args.batch, ds.x_train, ds.y_train) for model in models},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
