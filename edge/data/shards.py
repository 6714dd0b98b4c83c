"""One device's data as a compressed ``.npz`` file with arrays ``x`` and ``y``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def save_shard(path: str | Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Write ``x`` and ``y`` to ``path`` atomically (a crash never leaves half a shard)."""
    path = Path(path)
    if len(x) != len(y):
        raise ValueError(f"shard needs as many labels as samples, got {len(x)} samples and {len(y)} labels")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, x=x, y=y)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a shard written by :func:`save_shard`; returns ``(x, y)``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {path} does not exist; make shards with 'qfl partition'") from None
    except (KeyError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a shard file with arrays 'x' and 'y' ({exc})") from None
    if len(x) != len(y):
        raise ValueError(f"{path}: {len(x)} samples but {len(y)} labels")
    return x, y
