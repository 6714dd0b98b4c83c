"""Split a dataset into per-device shards (.npz) plus a held-out test file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", help="'digits', 'mnist-subset', 'mnist:DIR' or 'fashion-mnist:DIR'")
    parser.add_argument("--devices", type=int, default=4, help="number of shards to write")
    parser.add_argument("--scheme", default="iid", help="'iid', 'dirichlet:ALPHA' or 'shards:K'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--out", type=Path, required=True, help="directory for device-NNN.npz and test.npz")


def run(args: argparse.Namespace) -> int:
    from edge.cli import CommandError
    from edge.data import load_dataset, partition, save_shard

    try:
        ds = load_dataset(args.dataset, seed=args.seed)
        parts = partition(ds.y_train, args.devices, args.scheme, seed=args.seed)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    sizes = {}
    for device, index in enumerate(parts):
        path = save_shard(args.out / f"device-{device:03d}.npz", ds.x_train[index], ds.y_train[index])
        sizes[path.name] = len(index)
    save_shard(args.out / "test.npz", ds.x_test, ds.y_test)
    print(json.dumps({"dataset": ds.name, "scheme": args.scheme, "shards": sizes, "test": len(ds.y_test)}))
    return 0
