"""Accuracy of the default ``int`` mode at low precision (issue 15), at seeds of its own (3, 4, 5).

The budget is the one docs/fixed-point.md documents for digits: 40 epochs,
batch 32, lr 0.03 with qfl train's step schedule, momentum 0.9, the same for every n. The MNIST-subset
targets are measured in docs/fixed-point.md, not here: one such run takes
longer than this whole file may.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge.data import load_dataset
from edge.network import Network
from edge.trainer import LocalTrainer, evaluate, train_epochs
from models import get_architecture

pytestmark = pytest.mark.slow

SEEDS = (3, 4, 5)
EPOCHS = 40


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_dataset("digits", seed=0)


def train(ds, bits: int, seed: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    net = Network(get_architecture("mlp"), bits=bits, seed=seed)
    trainer = LocalTrainer(lr=0.03, momentum=0.9, batch_size=32, seed=seed)
    list(train_epochs(trainer, net, ds.x_train, ds.y_train, EPOCHS))  # every epoch, qfl train's step schedule
    return evaluate(net, ds.x_test, ds.y_test)


def test_digits_mlp_at_4_bits_reaches_the_target(digits) -> None:  # type: ignore[no-untyped-def]
    accuracies = [train(digits, 4, seed)[1] for seed in SEEDS]
    assert np.mean(accuracies) >= 0.955, accuracies


def test_digits_mlp_at_2_bits_reaches_the_target(digits) -> None:  # type: ignore[no-untyped-def]
    # Measured: 0.913 / 0.915 / 0.900 at these seeds (0.909); 0.8998 at seeds 0-2, 0.906 over seeds 0-29
    # (docs/fixed-point.md, "Clipped straight-through estimator and step schedule").
    results = [train(digits, 2, seed) for seed in SEEDS]
    assert all(math.isfinite(loss) for loss, _ in results)
    assert np.mean([accuracy for _, accuracy in results]) >= 0.90, results


@pytest.mark.parametrize("bits", [3, 6, 8, 16, 32])
def test_digits_mlp_does_not_collapse_at_any_precision(digits, bits: int) -> None:  # type: ignore[no-untyped-def]
    loss, accuracy = train(digits, bits, SEEDS[0])
    assert math.isfinite(loss) and accuracy >= 0.9, (loss, accuracy)
