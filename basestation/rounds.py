"""Round bookkeeping as pure functions: who takes part, when a round closes, and the model math around it.

    selected = select_devices(["a", "b", "c", "d"], k=2, seed=0, round_=3)
    progress = RoundProgress(round=3, selected=tuple(selected), deadline=t0 + 60, quorum=quorum_count(2, 0.5))
    progress.answered.add("a")
    progress.verdict(now=time.time(), max_extensions=2)    # "wait", "aggregate", "extend" or "abandon"

Closing rule (docs/mqtt.md): a round is aggregated as soon as every selected
device answered, or at its deadline if at least ``quorum`` did. Without a
quorum at the deadline it is extended (the plan is re-published with a later
deadline) up to ``max_extensions`` times, then abandoned: the global model
stays as it was and the next round is planned with the devices online then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

VERDICTS = ("wait", "aggregate", "extend", "abandon")


def select_devices(online: Sequence[str], k: int, seed: int, round_: int) -> list[str]:
    """``k`` of the ``online`` devices drawn by a generator seeded with (seed, round); all if k <= 0 or k >= len.

        >>> select_devices(["a", "b", "c"], 0, 0, 1)
        ['a', 'b', 'c']
    """
    pool = sorted(set(online))
    if k <= 0 or k >= len(pool):
        return pool
    rng = np.random.default_rng([seed, round_])
    chosen = rng.choice(len(pool), size=k, replace=False)
    return sorted(pool[i] for i in chosen)


def quorum_count(selected: int, fraction: float) -> int:
    """Answers needed at the deadline: ceil(fraction * selected), at least 1 (0 when nobody is selected)."""
    if selected <= 0:
        return 0
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"quorum must be a fraction in [0, 1], got {fraction!r}")
    return max(1, min(selected, math.ceil(fraction * selected - 1e-9)))


@dataclass
class RoundProgress:
    """The open round: who was asked, who answered, the deadline and how often it moved."""

    round: int
    selected: tuple[str, ...]
    deadline: float
    quorum: int
    extensions: int = 0
    answered: set[str] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        """Every selected device answered."""
        return bool(self.selected) and set(self.selected) <= self.answered

    def verdict(self, now: float, max_extensions: int) -> str:
        """What to do at time ``now``: one of :data:`VERDICTS`."""
        if self.complete:
            return "aggregate"
        if now < self.deadline:
            return "wait"
        if self.answered and len(self.answered) >= self.quorum:
            return "aggregate"
        if self.extensions < max_extensions:
            return "extend"
        return "abandon"


def apply_update(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base + delta`` tensor by tensor, float32, in ``base``'s order."""
    return {name: (np.asarray(value, np.float32) + np.asarray(delta[name], np.float32)).astype(np.float32)
            for name, value in base.items()}


def quantize_model(model: str, weights: Mapping[str, np.ndarray], n: int, mode: str) -> dict[str, np.ndarray]:
    """The weights a device starts its round from: ``weights`` put on the n-bit grid by the engine."""
    from edge.network import Network
    from models import get_architecture

    net = Network(get_architecture(model), bits=n, mode=mode, seed=0)
    net.set_weights(dict(weights))
    return net.get_weights(quantized=True)  # in master mode plain get_weights() is the float copy


def evaluate_model(model: str, weights: Mapping[str, np.ndarray], n: int, mode: str, x: np.ndarray,
                   y: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``weights`` at ``n`` bits on held-out ``(x, y)``."""
    from edge.network import Network
    from edge.trainer import evaluate
    from models import get_architecture

    net = Network(get_architecture(model), bits=n, mode=mode, seed=0)
    net.set_weights(dict(weights))
    loss, accuracy = evaluate(net, x, y)
    return float(loss), float(accuracy)


def initial_model(model: str, seed: int) -> dict[str, np.ndarray]:
    """The first global model: the engine's seeded initialisation at full precision."""
    from edge.network import Network
    from models import get_architecture

    return Network(get_architecture(model), bits=32, mode="int", seed=seed).get_weights()
