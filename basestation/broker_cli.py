"""Run a private Mosquitto broker for a field testbed (``qfl broker run``), or provision its devices.

    qfl broker provision --experiment exp1 --devices 4 --broker-url mqtt://10.0.0.1:1883 --out provision/
    qfl broker run --dir broker/ --credentials provision/credentials.json --bind 0.0.0.0 --port 1883

``run`` writes the config, password file and ACL into ``--dir``, starts
Mosquitto in the foreground of this command, prints its URL, and stops it by
PID on SIGTERM/SIGINT. Without ``--credentials`` the broker is anonymous and
has no ACL: only for a bench on loopback.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from edge.cli import HelpFormatter


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``run`` and ``provision`` actions."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    run_parser = actions.add_parser("run", help="run Mosquitto with a generated config until stopped",
                                    description="Write a Mosquitto config, password file and ACL into --dir "
                                                "and run the broker in the foreground until SIGTERM/SIGINT.",
                                    formatter_class=HelpFormatter)
    run_parser.add_argument("--dir", required=True, help="directory for config, passwd, acl, persistence and log")
    run_parser.add_argument("--credentials", default=None,
                            help="credentials.json from provisioning (logins and ACL); without it: anonymous")
    run_parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (0.0.0.0 for the LAN)")
    run_parser.add_argument("--port", type=int, default=1883, help="TCP port (0 picks a free one)")
    run_parser.add_argument("--tls-cert", default=None, help="server certificate (PEM) to serve mqtts://")
    run_parser.add_argument("--tls-key", default=None, help="private key of --tls-cert")
    run_parser.add_argument("--tls-ca", default=None, help="CA that signs client certificates")
    run_parser.add_argument("--require-certificate", action="store_true", help="clients must show a certificate")
    run_parser.add_argument("--autosave", type=int, default=30, help="seconds between persistence saves")
    from firmware_tools import provision

    prov = actions.add_parser("provision", help="make device keys, logins, device.toml bundles, passwd and ACL",
                              description="Make each device's keys and broker login, its device.toml bundle, "
                                          "and the broker's password file and ACL.",
                              formatter_class=HelpFormatter)
    provision.configure(prov)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    from edge.cli import CommandError

    if args.action == "provision":
        from firmware_tools.provision import ProvisionError, run as provision_run

        try:
            return provision_run(args)
        except (ProvisionError, OSError) as exc:
            raise CommandError(str(exc)) from None
    return _run_broker(args, CommandError)


def _run_broker(args: argparse.Namespace, error: type[Exception]) -> int:
    from basestation.broker import Broker, BrokerError, BrokerTls
    from firmware_tools.credentials import Credentials, CredentialsError

    accounts, experiment = [], "+"
    if args.credentials:
        try:
            creds = Credentials.load(args.credentials)
        except CredentialsError as exc:
            raise error(str(exc)) from None
        accounts, experiment = creds.accounts(), creds.experiment
    elif args.bind not in ("127.0.0.1", "localhost", "::1"):
        raise error(f"refusing an anonymous broker on {args.bind}: give --credentials (see 'qfl broker provision')")
    if args.autosave < 1:
        raise error(f"--autosave must be at least 1 second, got {args.autosave}")
    if args.require_certificate and not (args.tls_cert and args.tls_ca):
        raise error("--require-certificate needs TLS with a CA to check clients against: give --tls-cert, "
                    "--tls-key and --tls-ca")
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise error("TLS needs both --tls-cert and --tls-key")
        tls = BrokerTls(args.tls_cert, args.tls_key, args.tls_ca, args.require_certificate)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        broker = Broker(args.dir, accounts=accounts, experiment=experiment, host=args.bind, port=args.port, tls=tls,
                        autosave_interval=args.autosave).start()
    except (BrokerError, ValueError) as exc:
        raise error(str(exc)) from None
    print(f"broker running: {broker.url} (pid {broker.pid}, log {broker.log_path})", flush=True)
    try:
        while not stop.wait(1.0):
            if not broker.running:
                print(f"mosquitto exited unexpectedly; see {broker.log_path}", file=sys.stderr)
                return 1
    finally:
        broker.stop()
    return 0
