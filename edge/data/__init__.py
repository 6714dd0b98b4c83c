"""Datasets, their per-device partitions, and shard files.

    >>> from edge.data import load_dataset, partition
    >>> ds = load_dataset("digits", seed=0)
    >>> parts = partition(ds.y_train, devices=4, scheme="dirichlet:0.5", seed=0)

The default dataset is scikit-learn's bundled 8x8 digits, read from the CSV
file the package ships without importing scikit-learn (a device that loads its
shard from ``.npz`` never needs it). MNIST-format IDX files load from a local
directory.
"""

from edge.data.catalog import Dataset, load_dataset
from edge.data.idx import IdxError, read_idx
from edge.data.partition import partition
from edge.data.shards import load_shard, save_shard

__all__ = ["Dataset", "IdxError", "load_dataset", "load_shard", "partition", "read_idx", "save_shard"]
