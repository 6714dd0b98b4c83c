"""Local training: I minibatch SGD steps, the model difference, and the statistics the convergence model needs.

    >>> from edge.data import load_dataset
    >>> from edge.network import Network
    >>> from models import get_architecture
    >>> ds = load_dataset("digits", seed=0)
    >>> net = Network(get_architecture("mlp"), bits=8, seed=0)
    >>> res = LocalTrainer(lr=0.1, seed=0).train(net, ds.x_train, ds.y_train, iterations=200)
    >>> res.loss < 1.0, sorted(res.delta) == sorted(net.get_weights())
    (True, True)

Statistics, averaged over the I iterations (each at the weights of that step):

- ``loss``: mean minibatch cross-entropy.
- ``grad_sq_norm``: mean of ||g||^2, g the minibatch gradient (the quantized
  gradient the device really used), an estimate of G^2 in Kim et al.'s bound.
- ``grad_variance``: estimate of E||g - grad F||^2 for one minibatch of size
  B (sigma^2 / B, sigma^2 the per-example variance). Each batch is split into
  halves of h1 and h2 samples with mean gradients g1 and g2; since the halves
  are independent draws, E||g1 - g2||^2 = sigma^2 (1/h1 + 1/h2), so
  ``h1 * h2 / B**2 * ||g1 - g2||^2`` is unbiased for sigma^2 / B (for equal
  halves it is ||s1 - s2||^2, s the halves' shares of g). The halves come
  from the same backward pass (two half-size products instead of one), on
  every ``variance_every``-th iteration (the first included) to keep the
  cost of a step down. It is NaN when batches have one sample.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edge.fixedpoint import Fixed
from edge.network import Network


@dataclass
class TrainResult:
    """What one call of :meth:`LocalTrainer.train` did (see the module docstring for the statistics).

    ``delta``: new weights minus weights before the call, float32, by name.
    ``samples``: training examples the device holds (the FedAvg weight).
    ``seconds``: wall-clock time of the call.
    """

    delta: dict[str, np.ndarray]
    loss: float
    grad_sq_norm: float
    grad_variance: float
    samples: int
    iterations: int
    seconds: float
    batch_size: int


class LocalTrainer:
    """Minibatch SGD with optional momentum; the same trainer at every precision (n = 32 is float32).

    Batches are drawn without replacement from a seeded permutation of the
    data, reshuffled when fewer than ``batch_size`` examples remain; the
    trainer's generator carries on across calls, so successive rounds see
    different batches. Momentum is the classic heavy ball, its velocity a
    float32 optimizer state (in int mode the weights themselves stay n-bit).
    """

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, batch_size: int = 32, seed: int = 0, *,
                 variance_every: int = 4) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(variance_every, bool) or not isinstance(variance_every, int) or variance_every < 1:
            raise ValueError(f"variance_every must be a positive integer, got {variance_every!r}")
        self.lr, self.momentum, self.batch_size = float(lr), float(momentum), batch_size
        self.variance_every = variance_every
        self.rng = np.random.default_rng(seed)
        self._velocity = np.zeros(0, dtype=np.float32)  # momentum state, kept across calls
        self._order = np.zeros(0, dtype=np.intp)  # the current permutation of the examples
        self._position = 0

    def train(self, net: Network, x: np.ndarray, y: np.ndarray, iterations: int) -> TrainResult:
        """Run ``iterations`` SGD steps of ``net`` on ``(x, y)`` and return the delta and statistics."""
        started = time.perf_counter()
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        x, y = _check_data(net, x, y)
        data = net.quantize_inputs(x)
        batch = min(self.batch_size, len(x))
        if len(self._order) != len(x):
            self._order, self._position = self.rng.permutation(len(x)), 0
        if self.momentum and len(self._velocity) != net.size:
            self._velocity = np.zeros(net.size, dtype=np.float32)
        half = batch // 2 if batch >= 2 else None
        spread = half * (batch - half) / batch**2 if half else 0.0
        before = net.snapshot()
        loss_sum = sq_norm_sum = variance_sum = 0.0
        variance_terms = 0
        for iteration in range(iterations):
            index = self._next_batch(batch)
            split = half if iteration % self.variance_every == 0 else None
            loss = net.backprop(Fixed(data.q[index], data.exponent, data.bound), y[index], split=split)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training diverged (loss {loss}); try a smaller learning rate than {self.lr}")
            g = net.grad
            loss_sum += loss
            sq_norm_sum += float(np.dot(g, g))
            if split:
                # Halves' mean gradients: g1 = s1 * B/h1, g2 = s2 * B/h2 with s1 + s2 = g.
                diff = net.grad_half * (batch / half) - (g - net.grad_half) * (batch / (batch - half))
                variance_sum += spread * float(np.dot(diff, diff))
                variance_terms += 1
            if self.momentum:
                self._velocity *= self.momentum
                self._velocity += g
                net.step(self._velocity, -self.lr)
            else:
                net.step(g, -self.lr)
        return TrainResult(
            delta=net.delta_since(before),
            loss=loss_sum / iterations,
            grad_sq_norm=sq_norm_sum / iterations,
            grad_variance=variance_sum / variance_terms if variance_terms else float("nan"),
            samples=len(x),
            iterations=iterations,
            seconds=time.perf_counter() - started,
            batch_size=batch,
        )

    def _next_batch(self, batch: int) -> np.ndarray:
        if self._position + batch > len(self._order):
            self._order, self._position = self.rng.permutation(len(self._order)), 0
        index = self._order[self._position:self._position + batch]
        self._position += batch
        return index


LR_SCHEDULES = ("step", "cosine", "constant")
STEP_DROP = 0.1
"""The "step" schedule's factor for the last quarter of the epochs."""


def epoch_lr(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (1-based) of ``epochs`` under ``schedule``, one of :data:`LR_SCHEDULES`.

    "step": ``lr``, then ``lr * STEP_DROP`` for the last quarter of the epochs;
    "cosine": from ``lr`` down along half a cosine, ``lr * (1 + cos(pi * (epoch - 1) / epochs)) / 2``;
    "constant": ``lr`` throughout.

        >>> [epoch_lr(0.04, "step", e, 8) for e in (1, 6, 7, 8)]
        [0.04, 0.04, 0.004, 0.004]
        >>> [round(epoch_lr(0.04, "cosine", e, 4), 4) for e in (1, 2, 3, 4)]
        [0.04, 0.0341, 0.02, 0.0059]
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * STEP_DROP if epoch - 1 >= 0.75 * epochs else lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def train_epochs(trainer: LocalTrainer, net: Network, x: np.ndarray, y: np.ndarray, epochs: int,
                 lr_schedule: str = "step") -> Iterator[tuple[int, TrainResult]]:
    """Train ``net`` for ``epochs`` passes over ``(x, y)`` (``len(x) // batch_size`` steps each), the
    learning rate of each pass from :func:`epoch_lr` with the trainer's ``lr`` as the base.

    Yields ``(epoch, result)`` after each pass; the trainer's ``lr`` is restored at the end. A diverged
    pass raises FloatingPointError naming its epoch.

        >>> for epoch, result in train_epochs(LocalTrainer(lr=0.03, momentum=0.9), net, ds.x_train, ds.y_train, 2):
        ...     print(epoch, result.iterations)   # doctest: +SKIP
        1 42
        2 42
    """
    base = trainer.lr
    per_epoch = max(1, len(y) // trainer.batch_size)
    try:
        for epoch in range(1, epochs + 1):
            trainer.lr = epoch_lr(base, lr_schedule, epoch, epochs)
            try:
                result = trainer.train(net, x, y, iterations=per_epoch)
            except FloatingPointError as exc:
                raise FloatingPointError(f"epoch {epoch}: {exc}") from exc
            yield epoch, result
    finally:
        trainer.lr = base


def evaluate(net: Network, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(Mean cross-entropy loss, accuracy) of ``net`` on ``(x, y)``.

        >>> loss, accuracy = evaluate(net, ds.x_test, ds.y_test)   # doctest: +SKIP
    """
    x, y = _check_data(net, x, y)
    logits = net.predict(x).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    accuracy = float((logits.argmax(axis=1) == y).mean())
    return loss, accuracy


def _check_data(net: Network, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = net.as_batch(x)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"labels must be one integer per input: {len(x)} inputs, labels of shape {y.shape}")
    if len(x) == 0:
        raise ValueError("no training data: x is empty")
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got dtype {y.dtype}")
    classes = net.arch.classes
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"labels must be in 0..{classes - 1} for model {net.arch.name!r}, got {y.min()}..{y.max()}")
    if not np.all(np.isfinite(x)):
        raise ValueError("inputs hold non-finite values (NaN or inf)")
    return x, y.astype(np.int64, copy=False)
