"""Run the emulated testbed end to end: broker, basestation, N metered edge processes, report.

Everything a run writes goes to its run directory (--out/--name): settings,
shards, credentials, the SQLite store, logs, the emulators' ground-truth
power logs, summary.json and report.html. Ctrl-C stops every process and
keeps what was stored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from basestation.testbed.settings import BOARDS, POLICIES, TestbedSettings
from edge.cli import seed

_DEFAULTS = TestbedSettings()


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``qfl testbed``."""
    add = parser.add_argument
    add("--devices", type=int, default=_DEFAULTS.devices, help="edge processes, each with its own emulated meter")
    add("--rounds", type=int, default=_DEFAULTS.rounds, help="federated rounds to run")
    add("--dataset", default=_DEFAULTS.dataset, help="'digits', 'mnist-subset', 'mnist:DIR' or 'fashion-mnist:DIR'")
    add("--per-round", type=int, default=None, metavar="K",
        help="devices sampled per round (default: all); the others wait at idle power and send nothing")
    add("--sampling", default=_DEFAULTS.sampling,
        help="how the K devices are drawn: 'uniform' or 'importance' (q_k ~ 1/sigma_k^2 from the devices' "
             "reported gradient variance); both aggregate with the unbiased weights")
    add("--meters", default=_DEFAULTS.meters, choices=("fleet", "process"),
        help="'fleet': one process emulates every meter (a pty each, power from each device's own process); "
             "'process': one emulator process per device")
    add("--model", default=_DEFAULTS.model, help="architecture from models/ (mlp, mlp-mnist, cnn, cnn-mnist)")
    add("--partition", default=_DEFAULTS.partition, help="'iid', 'dirichlet:ALPHA' or 'shards:K'")
    add("--policy", default=_DEFAULTS.policy, choices=POLICIES,
        help="precision policy: 'measured' minimises calibrated energy per round x predicted rounds to target; "
             "'measured-fit' refits the analytic energy model each round and re-solves; "
             "'model' solves the analytic model once; 'fixed' keeps --bits/--uplink-bits")
    add("--bits", type=int, default=_DEFAULTS.bits, help="training precision n (the start for adaptive policies)")
    add("--uplink-bits", type=int, default=_DEFAULTS.uplink_bits, help="uplink precision m")
    add("--board", default=_DEFAULTS.board, choices=BOARDS, help="power profile the meters emulate")
    add("--iterations", type=int, default=_DEFAULTS.iterations, help="local iterations per round (I)")
    add("--lr", type=float, default=_DEFAULTS.lr, help="local SGD learning rate")
    add("--momentum", type=float, default=_DEFAULTS.momentum,
        help="local SGD momentum, 0 to 0.999; each round starts from zero velocity (0: plain SGD)")
    add("--deadline", type=float, default=_DEFAULTS.deadline_seconds, help="seconds a round waits for updates")
    add("--seed", type=seed, default=_DEFAULTS.seed, help="seed of data split, training and meter noise")
    add("--target-accuracy", type=float, default=_DEFAULTS.target_accuracy,
        help="accuracy at which the report measures the energy spent")
    add("--out", type=Path, default=_DEFAULTS.out, help="folder that receives the run directory")
    add("--name", default="", help="run directory name (default: timestamp and policy)")
    add("--compare", action="store_true",
        help="run standard 32-bit FL and then the adaptive policy on the same seed and data, and report the "
             "saving in measured energy to --target-accuracy")
    add("--link", default=_DEFAULTS.link, help="uplink link profile each device sends through "
        "(firmware_tools/emulator/links.toml: loopback, wifi, lte-m, kim2022)")
    add("--stop-at-target", action="store_true", help="end the run at the first round that reaches --target-accuracy")
    add("--history", type=Path, default=None, metavar="CURVES.json|STORE.sqlite",
        help="learning curves the 'measured' policy fits its rounds-to-target model to: a curves.json that "
             "qfl sweep writes, or an earlier run's store.sqlite (its experiments that held one setting of the "
             "same model, data and training); without it the policy holds --bits/--uplink-bits")
    add("--json", action="store_true", help="print summary.json to stdout at the end")


def run(args: argparse.Namespace) -> int:
    """Run one testbed experiment, or the comparison pair with --compare."""
    from rich.console import Console

    from firmware_tools.broker_auth import MosquittoMissing
    from basestation.testbed.compare import run_comparison
    from basestation.testbed.run import TestbedError, run_testbed
    from basestation.testbed.settings import SettingsError
    from edge.cli import CommandError

    settings = TestbedSettings(
        devices=args.devices, rounds=args.rounds, dataset=args.dataset, model=args.model, partition=args.partition,
        policy=args.policy, bits=args.bits, uplink_bits=args.uplink_bits, board=args.board,
        iterations=args.iterations, lr=args.lr, momentum=args.momentum, deadline_seconds=args.deadline, seed=args.seed,
        per_round=args.per_round, sampling=args.sampling, meters=args.meters,
        target_accuracy=args.target_accuracy, out=args.out, name=args.name, link=args.link,
        stop_at_target=args.stop_at_target, history=args.history)
    console = Console(stderr=args.json, soft_wrap=True)
    try:
        settings = settings.checked()
        if args.compare:
            summary = run_comparison(settings, console)
        else:
            summary = run_testbed(settings, console).summary
    except (SettingsError, TestbedError, MosquittoMissing, FileExistsError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0

