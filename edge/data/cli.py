"""Split a dataset into per-device shards (.npz) plus a held-out test file."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from edge.cli import given_path, seed

OWNED = re.compile(r"device-\d{3,}\.npz|test\.npz")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="digits", help="'digits', 'mnist-subset', 'mnist:DIR' or 'fashion-mnist:DIR'")
    parser.add_argument("--devices", type=int, default=4, help="number of shards to write")
    parser.add_argument("--scheme", default="iid",
                        help="'iid', 'dirichlet:ALPHA' or 'shards:K' (K label-sorted shards per device, "
                             "K at most the number of classes)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the split")
    parser.add_argument("--out", type=given_path, required=True,
                        help="directory for device-NNN.npz and test.npz; device-NNN.npz files of an earlier "
                             "split there are removed, other files are left alone")


def run(args: argparse.Namespace) -> int:
    """Split the dataset, write one shard per device and the test split, remove stale shards."""
    from edge.cli import CommandError
    from edge.data import load_dataset, partition, save_shard

    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out} exists and is not a directory")
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
    removed = remove_stale(args.out, keep=set(sizes) | {"test.npz"})
    if removed:
        names = ", ".join(removed) if len(removed) <= 3 else f"{removed[0]} .. {removed[-1]}"
        print(f"qfl partition: removed {len(removed)} stale file(s) of an earlier split from {args.out} ({names})",
              file=sys.stderr)
    print(json.dumps({"dataset": ds.name, "scheme": args.scheme, "shards": sizes, "test": len(ds.y_test)}))
    return 0


def remove_stale(directory: Path, keep: set[str]) -> list[str]:
    """Delete the files in ``directory`` named like the ones ``qfl partition`` writes but not in ``keep``."""
    stale = sorted(p for p in directory.iterdir() if OWNED.fullmatch(p.name) and p.name not in keep and p.is_file())
    for path in stale:
        path.unlink()
    return [p.name for p in stale]
