"""Train one model centrally with the fixed-point trainer and print its test accuracy.

    qfl train --dataset digits --model mlp --bits 8 --epochs 20 --seed 0
    qfl train --bits 4 --mode master --json

Progress goes to stderr, one line per epoch (not with ``--json``); the result
goes to stdout, as a line of text or as one JSON object with ``accuracy``,
``loss`` (test), ``train_loss``, ``bits``, ``mode``, ``model``, ``dataset``,
``epochs``, ``iterations``, ``seed``, ``params``, ``seconds`` (training time,
without loading data) and the optimizer settings.
"""

from __future__ import annotations

import argparse

from edge.cli import seed

DEFAULT_LR = 0.03  # with momentum 0.9 (an effective step of 0.3), the same for every n (docs/fixed-point.md)
DEFAULT_MOMENTUM = 0.9


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``qfl train``."""
    parser.add_argument("--dataset", default="digits", help="'digits', 'mnist-subset', 'mnist:DIR' or 'fashion-mnist:DIR'")
    parser.add_argument("--model", default="mlp", help="architecture: mlp, mlp-mnist, cnn, cnn-mnist")
    parser.add_argument("--bits", type=int, default=8, help="training precision n, 1..32 (32 = float32)")
    parser.add_argument("--mode", choices=("int", "master"), default="int",
                        help="int: n-bit integer weights only; master: float master copy, straight-through")
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the initial weights, batches and rounding")
    parser.add_argument("--data-seed", type=seed, default=0, help="seed of the train/test split")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="SGD learning rate")
    parser.add_argument("--lr-schedule", choices=("step", "cosine", "constant"), default="step",  # edge.trainer.LR_SCHEDULES
                        help="learning rate over the epochs: step drops it to a tenth for the last quarter "
                             "(default), cosine decays it towards 0 epoch by epoch, constant keeps it")
    parser.add_argument("--momentum", type=float, default=DEFAULT_MOMENTUM, help="SGD momentum, 0 <= m < 1")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per SGD step")
    parser.add_argument("--error-rounding", choices=("stochastic", "nearest"), default="stochastic",
                        help="how backward errors are rounded onto the n-bit grid")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    """Load the data, train epoch by epoch, evaluate on the test set and report."""
    import json
    import math
    import sys

    from edge.cli import CommandError

    if not 1 <= args.bits <= 32:
        raise CommandError(f"--bits must be from 1 to 32 (32 = float32), got {args.bits}")
    if args.epochs < 1:
        raise CommandError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CommandError(f"--lr must be a positive number, got {args.lr}")
    if not 0.0 <= args.momentum < 1.0:
        raise CommandError(f"--momentum must be in [0, 1), got {args.momentum}")

    from edge.data import load_dataset
    from edge.network import Network
    from edge.trainer import LocalTrainer, evaluate, train_epochs
    from models import counts, get_architecture

    try:
        arch = get_architecture(args.model)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    try:
        ds = load_dataset(args.dataset, seed=args.data_seed)
    except (ValueError, OSError) as exc:
        raise CommandError(f"cannot load dataset {args.dataset!r}: {exc}") from None
    reason = arch.mismatch(ds.name, ds.input_shape, ds.classes)
    if reason:
        raise CommandError(reason)

    net = Network(arch, bits=args.bits, mode=args.mode, seed=args.seed, error_rounding=args.error_rounding)
    trainer = LocalTrainer(lr=args.lr, momentum=args.momentum, batch_size=args.batch_size, seed=args.seed)
    seconds = 0.0
    try:
        for epoch, result in train_epochs(trainer, net, ds.x_train, ds.y_train, args.epochs, args.lr_schedule):
            seconds += result.seconds
            if not args.json:
                loss, accuracy = evaluate(net, ds.x_test, ds.y_test)
                print(f"epoch {epoch}/{args.epochs}  lr {trainer.lr:.4g}  train loss {result.loss:.4f}  "
                      f"test loss {loss:.4f}  test accuracy {accuracy:.4f}  ({seconds:.2f} s)", file=sys.stderr, flush=True)
    except FloatingPointError as exc:
        raise CommandError(str(exc)) from None
    loss, accuracy = evaluate(net, ds.x_test, ds.y_test)
    report = {
        "accuracy": accuracy,
        "loss": loss,
        "train_loss": result.loss,
        "bits": args.bits,
        "mode": args.mode,
        "model": arch.name,
        "dataset": ds.name,
        "epochs": args.epochs,
        "iterations": result.iterations * args.epochs,
        "seed": args.seed,
        "lr": args.lr,
        "lr_schedule": args.lr_schedule,
        "momentum": args.momentum,
        "batch_size": args.batch_size,
        "error_rounding": args.error_rounding,
        "params": counts(arch).params,
        "seconds": round(seconds, 4),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"test accuracy {accuracy:.4f} (loss {loss:.4f}) after {args.epochs} epoch{'' if args.epochs == 1 else 's'}: {arch.name} on {ds.name}, "
              f"{args.bits} bits, {args.mode} mode, {report['params']} parameters, {seconds:.2f} s")
    return 0
