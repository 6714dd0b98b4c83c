"""Learning curves from a store: the earlier experiments that ran one fixed setting on the same model and data.

The ``measured`` policy predicts rounds to the target from learning curves
(``basestation.energy.empirical``). ``qfl sweep`` writes them as a JSON file;
a basestation that has run experiments before holds them in its store. An
earlier experiment gives a curve when every aggregated round of it ran the
same (n, m, I) and it trained what this experiment trains: the same model,
dataset and split, and the same training settings (lr, batch, momentum,
mode, strategy, uplink scheme) and devices per round, so that its rounds and
its energy per round mean the same thing here.

    curves, skipped = curves_from_store(store, like=config.to_json(), exclude={config.experiment})

``history`` in basestation.toml's ``[precision]`` section takes a curves
JSON file, a store file, or ``"store"`` (this basestation's own store):
see :func:`resolve_history`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from basestation.energy.empirical import Curve, load_curves

SAME_TRAINING = ("lr", "batch_size", "momentum", "mode", "strategy", "uplink_scheme")
"""The ``[training]`` settings an earlier experiment must share to lend its curve (besides I, which is a variable)."""

OWN_STORE = "store"
"""The ``history`` value that means this basestation's own store."""

_SQLITE_MAGIC = b"SQLite format 3\x00"


def _mismatch(config: Mapping[str, Any], like: Mapping[str, Any]) -> str | None:
    """Why an experiment with ``config`` did not train what ``like`` trains; None when it did."""
    for key in ("model", "dataset", "dataset_seed"):
        if config.get(key) != like.get(key):
            return f"{key} {config.get(key)!r}, not {like.get(key)!r}"
    training, wanted = config.get("training") or {}, like.get("training") or {}
    for key in SAME_TRAINING:
        if training.get(key) != wanted.get(key):
            return f"training {key} {training.get(key)!r}, not {wanted.get(key)!r}"
    per_round, wanted_per_round = ((c.get("round") or {}).get("devices_per_round") for c in (config, like))
    if per_round != wanted_per_round:
        return f"devices_per_round {per_round!r}, not {wanted_per_round!r}"
    return None


def curves_from_store(store: Any, *, like: Mapping[str, Any],
                      exclude: Iterable[str] = ()) -> tuple[list[Curve], dict[str, str]]:
    """The learning curves ``store`` holds for experiments that trained what the config ``like`` trains.

    Returns the curves, one per qualifying experiment, and for every other
    experiment (except those in ``exclude``) the reason it gave none. Per
    round, ``energy_j`` is all the energy the meters measured (idle
    included), ``train_j`` and ``uplink_j`` the above-idle energy of those
    phases, summed over the devices, as ``qfl sweep`` records them.
    """
    skip = set(exclude)
    curves: list[Curve] = []
    skipped: dict[str, str] = {}
    for record in store.experiments():
        if record.id in skip:
            continue
        why = _mismatch(record.config, like)
        if why is not None:
            skipped[record.id] = why
            continue
        rounds = store.rounds(record.id, status="aggregated")
        if not rounds:
            skipped[record.id] = "no aggregated round"
            continue
        settings = {(r.n, r.m, (store.plan(record.id, r.round) or {}).get("iterations")) for r in rounds}
        if len(settings) != 1:
            skipped[record.id] = f"its rounds ran {len(settings)} settings, not one"
            continue
        (n, m, iterations), = settings
        if not isinstance(iterations, int):
            skipped[record.id] = "its round plans do not say how many local iterations they ran"
            continue
        energy, train, uplink = energy_per_round(store.energy(record.id), [r.round for r in rounds])
        curves.append(Curve(n=n, m=m, I=iterations, seed=int(record.config.get("seed") or 0),
                            accuracy=tuple(r.accuracy if r.accuracy is not None else 0.0 for r in rounds),
                            energy_j=energy, train_j=train, uplink_j=uplink))
    return curves, skipped


def energy_per_round(phases: Iterable[Any], rounds: Sequence[int]) -> tuple[tuple[float, ...], ...]:
    """``(energy_j, train_j, uplink_j)`` of ``rounds``, in that order, summed over the devices' ``phases``.

    ``energy_j`` is every phase's measured energy (idle included), ``train_j``
    and ``uplink_j`` the above-idle energy of those phases: what a learning
    curve holds (:class:`basestation.energy.empirical.Curve`). Phases of other
    rounds, and figures a phase does not have (None), are left out.
    """
    sums = {r: [0.0, 0.0, 0.0] for r in rounds}
    for e in phases:
        slot = sums.get(e.round)
        if slot is None or e.joules is None:
            continue
        slot[0] += e.joules
        if e.phase in ("train", "uplink") and e.joules_above_idle is not None:
            slot[1 if e.phase == "train" else 2] += e.joules_above_idle
    return tuple(tuple(sums[r][k] for r in rounds) for k in range(3))


def is_store_file(path: str | Path) -> bool:
    """Whether ``path`` is an SQLite file (a store) rather than a curves JSON file."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    except OSError:
        return False


def resolve_history(history: str | Path, *, own_store: Any, like: Mapping[str, Any],
                    experiment: str) -> tuple[list[Curve], dict[str, str]]:
    """The curves ``history`` names: ``"store"`` (``own_store``), another store file, or a curves JSON file.

    From a store, this experiment itself is left out and the second value
    says why each other experiment gave no curve; from a JSON file it is
    empty. Raises ValueError for a file that is neither.
    """
    from basestation.energy.empirical import CurveError
    from basestation.store import Store, StoreError

    if str(history) == OWN_STORE:
        return curves_from_store(own_store, like=like, exclude={experiment})
    if is_store_file(history):
        try:
            with Store(history, readonly=True) as other:
                return curves_from_store(other, like=like, exclude={experiment})
        except (StoreError, sqlite3.DatabaseError) as exc:
            raise ValueError(f"[precision] history: cannot read the store {history}: {exc}") from None
    try:
        return load_curves(history), {}
    except CurveError as exc:
        raise ValueError(f"[precision] history: {exc} (give a curves JSON file from qfl sweep, a store file, "
                         f"or \"{OWN_STORE}\" for this basestation's own store)") from None
