"""What a device may claim: bounds on an update's values and sample count, and on the aggregate.

Every check returns None when the claim is possible, else a sentence saying
why not; the caller records it with reason ``out_of_bounds`` (ingest) or
drops the update from the round (aggregation)::

    bounds = UpdateBounds.for_round(n=8, settings=BoundSettings())
    problem = bounds.check(delta, samples=50, shard_size=120)   # None, or "samples 4294967295 > ..."

Where the defaults come from (docs/security.md, "Bounds"):

- At n < 32 bits every weight lives on the grid [-1, 1] (edge.fixedpoint), so
  a model difference has |value| <= 2; the m-bit uplink quantizer picks a
  power-of-two scale, which can round a magnitude up by less than a factor
  2. Hence ``|value| <= 4`` per tensor entry.
- At n = 32 (float training) weights have no grid. ``float_update_abs``
  (default 16) is a configured sanity limit, far above what SGD moves a
  weight in one round at the learning rates the testbed uses (lr <= 1,
  gradients of a softmax MLP on [0, 1] inputs are O(1) per step).
- ``samples`` at most the shard size the device declared in its first hello
  (fixed from then on: a later hello cannot raise it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

GRID_DIFFERENCE = 2.0  # weights on the [-1, 1] grid differ by at most 2
SCALE_SLACK = 2.0  # a power-of-two uplink scale rounds a magnitude up by less than 2x


@dataclass(frozen=True)
class BoundSettings:
    """The ``[bounds]`` table of basestation.toml (0 means: derive from the architecture and the round's n)."""

    max_update_abs: float = 0.0
    float_update_abs: float = 16.0


@dataclass(frozen=True)
class UpdateBounds:
    """The limits one round's updates are held to."""

    max_abs: float

    @classmethod
    def for_round(cls, n: int, settings: BoundSettings | None = None) -> "UpdateBounds":
        """The bound for a round training at ``n`` bits.

            >>> UpdateBounds.for_round(8).max_abs
            4.0
        """
        settings = settings or BoundSettings()
        if settings.max_update_abs > 0:
            return cls(float(settings.max_update_abs))
        if n >= 32:
            return cls(float(settings.float_update_abs))
        return cls(GRID_DIFFERENCE * SCALE_SLACK)

    def check_values(self, values: Mapping[str, np.ndarray]) -> str | None:
        """None if every entry is finite and within ``max_abs``, else which tensor is not."""
        for name, value in values.items():
            arr = np.asarray(value)
            if arr.size == 0:
                continue
            if not np.all(np.isfinite(arr)):
                return f"tensor {name!r} holds non-finite values"
            top = float(np.max(np.abs(arr)))
            if top > self.max_abs:
                return f"tensor {name!r} reaches |value| {top:.6g}, the bound is {self.max_abs:g}"
        return None

    def check(self, values: Mapping[str, np.ndarray], samples: int, shard_size: int | None) -> str | None:
        """Samples first (cheap), then the values."""
        problem = check_samples(samples, shard_size)
        return problem if problem is not None else self.check_values(values)


def check_samples(samples: int, shard_size: int | None) -> str | None:
    """None if ``1 <= samples <= shard_size`` (any positive count when the size is unknown)."""
    if samples < 1:
        return f"samples {samples} < 1"
    if shard_size is not None and samples > shard_size:
        return f"samples {samples} > the shard size {shard_size} the device declared"
    return None


def check_result(delta: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray], loss: float,
                 accuracy: float, bounds: UpdateBounds) -> str | None:
    """None if an aggregate can be committed: finite, within the bound, and a finite evaluation."""
    problem = bounds.check_values(delta)
    if problem is not None:
        return f"aggregate: {problem}"
    for name, value in weights.items():
        if not np.all(np.isfinite(value)):
            return f"new model: tensor {name!r} holds non-finite values"
    if not (math.isfinite(loss) and math.isfinite(accuracy)):
        return f"evaluation of the new model is not finite (loss {loss!r}, accuracy {accuracy!r})"
    return None
