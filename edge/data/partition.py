"""Seeded splits of a labelled training set over devices: IID, Dirichlet, shards."""

from __future__ import annotations

import numpy as np


def partition(labels: np.ndarray, devices: int, scheme: str = "iid", *, seed: int = 0,
              min_size: int = 2) -> list[np.ndarray]:
    """Split sample indices over ``devices``; every device gets at least ``min_size`` samples.

    ``scheme`` is ``"iid"`` (a seeded shuffle cut in equal parts), ``"dirichlet:ALPHA"``
    (per class, device proportions drawn from Dirichlet(ALPHA); small ALPHA is more
    skewed) or ``"shards:K"`` (sort by label, cut into ``devices*K`` shards, deal K
    to each device, so each sees about K classes; K is 1..number of classes and
    ``devices*K`` at most the number of samples).
    """
    labels = np.asarray(labels)
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if len(labels) < devices * min_size:
        raise ValueError(f"{len(labels)} samples cannot give {devices} devices {min_size} samples each")
    rng = np.random.default_rng(seed)
    kind, _, arg = scheme.partition(":")
    if kind == "iid" and not arg:
        return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), devices)]
    if kind == "dirichlet":
        return _dirichlet(labels, devices, _positive(arg, scheme, float), rng, min_size)
    if kind == "shards":
        return _shards(labels, devices, int(_positive(arg, scheme, int)), rng)
    raise ValueError(f"unknown partition {scheme!r}; use 'iid', 'dirichlet:ALPHA' or 'shards:K'")


def _positive(text: str, scheme: str, kind: type) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"partition {scheme!r} needs a positive number after ':', e.g. 'dirichlet:0.5' or 'shards:2'")
    return value


def _dirichlet(labels: np.ndarray, devices: int, alpha: float, rng: np.random.Generator,
               min_size: int) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(devices)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(devices, alpha)))[:-1] * len(members)).astype(int)
            for device, chunk in enumerate(np.split(members, cuts)):
                parts[device].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_size:
            return result
    raise ValueError(f"Dirichlet alpha={alpha} left a device with fewer than {min_size} samples in 100 draws; "
                     f"raise alpha or use fewer devices")


def _check_shards(labels: np.ndarray, devices: int, per_device: int) -> None:
    """Refuse a ``shards:K`` that cannot limit each device to about K classes or leaves shards empty."""
    classes = len(np.unique(labels))
    if per_device > classes:
        raise ValueError(f"partition 'shards:{per_device}' deals each device {per_device} label-sorted shards, but "
                         f"the data has {classes} classes: K must be 1..{classes} (use 'iid' for an even spread)")
    if devices * per_device > len(labels):
        raise ValueError(f"partition 'shards:{per_device}' cuts {len(labels)} samples into {devices} x {per_device} "
                         f"shards, some of them empty: K must be at most {len(labels) // devices} for {devices} devices")


def _shards(labels: np.ndarray, devices: int, per_device: int, rng: np.random.Generator) -> list[np.ndarray]:
    _check_shards(labels, devices, per_device)
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, devices * per_device)
    dealt = rng.permutation(len(shards)).reshape(devices, per_device)
    return [np.sort(np.concatenate([shards[i] for i in row])) for row in dealt]
