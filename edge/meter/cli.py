"""Read a power meter: a line a second (V, A, W) on stderr and an energy summary on stdout.

    qfl meter read --port /dev/ttyACM0 --seconds 10 [--json]

``--port`` is the meter's serial device, or the link path of an emulated
meter (``qfl meter emulate``, in firmware_tools). See docs/meter-protocol.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from edge.cli import CommandError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", required=True, help="serial device of the meter, or an emulator's --link path")
    parser.add_argument("--seconds", type=float, required=True, help="how long to read")
    parser.add_argument("--rate", type=int, default=1000, help="samples per second to ask of the meter")
    parser.add_argument("--idle-seconds", type=float, default=0.0,
                        help="measure an idle baseline first (for energy above idle); 0 skips it")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the meter to answer")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _check_options(args: argparse.Namespace) -> None:
    """Refuse option values the meter cannot work with, naming the option."""
    from edge.meter.reader import MAX_RATE_HZ

    if not args.seconds > 0:
        raise CommandError(f"--seconds must be positive, got {args.seconds}")
    if not 1 <= args.rate <= MAX_RATE_HZ:
        raise CommandError(f"--rate must be 1..{MAX_RATE_HZ} samples per second, got {args.rate}")
    if not args.timeout > 0:
        raise CommandError(f"--timeout must be positive, got {args.timeout}")
    if not args.idle_seconds >= 0:
        raise CommandError(f"--idle-seconds must be 0 (no baseline) or more, got {args.idle_seconds}")


def run(args: argparse.Namespace) -> int:
    """Read the meter for ``--seconds``, printing a line a second, then the energy summary."""
    from edge.meter.errors import MeterError
    from edge.meter.reader import PowerMeter

    _check_options(args)
    try:
        meter = PowerMeter(args.port, rate_hz=args.rate, idle_seconds=args.idle_seconds, timeout=args.timeout)
    except MeterError as exc:
        raise CommandError(str(exc)) from None
    with meter:
        ident = meter.identity
        print(f"meter {ident.meter_id} (firmware {ident.firmware}, protocol {ident.proto}), shunt "
              f"{ident.shunt_milliohms:g} mOhm, config {ident.config:04X}, cal {ident.calibration:04X}",
              file=sys.stderr)
        phase = meter.phase("read").begin()
        began = time.monotonic()
        try:
            while True:
                left = began + args.seconds - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(1.0, left))
                reading = meter.live()
                elapsed = time.monotonic() - began
                if reading is None:
                    print(f"{elapsed:7.1f} s   no samples ({meter.state})", file=sys.stderr)
                else:
                    print(f"{elapsed:7.1f} s   {reading.volts:6.3f} V   {reading.amps:7.4f} A   {reading.watts:7.3f} W",
                          file=sys.stderr)
        except KeyboardInterrupt:
            print("interrupted: summary of what was read", file=sys.stderr)
        phase.end()
        energy = phase.energy()
        counters = meter.counters
        summary = {
            "port": args.port,
            "meter_id": ident.meter_id,
            "seconds": round(energy.seconds, 6),
            "joules": energy.joules,
            "mean_watts": energy.mean_watts,
            "uncertainty_j": energy.uncertainty_j,
            "idle_watts": meter.idle_watts if args.idle_seconds > 0 else None,
            "joules_above_idle": energy.joules_above_idle if args.idle_seconds > 0 else None,
            "samples": energy.samples,
            "lost_samples": energy.lost_samples,
            "overflow_samples": energy.overflow_samples,
            "gaps": len(energy.gaps),
            "gap_seconds": energy.gap_seconds,
            "partial": energy.partial,
            "crc_errors": energy.crc_errors,
            "malformed_lines": energy.malformed_lines,
            "reconnects": energy.reconnects,
            "drift_ppm": meter.drift_ppm,
            "drift_uncertainty_ppm": meter.drift_uncertainty_ppm,
            "total_samples": counters.samples,
        }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"energy      {summary['joules']:.4f} J +- {summary['uncertainty_j']:.4f} J over {summary['seconds']:.3f} s")
        print(f"mean power  {summary['mean_watts']:.4f} W")
        if summary["joules_above_idle"] is not None:
            print(f"above idle  {summary['joules_above_idle']:.4f} J (idle {summary['idle_watts']:.4f} W)")
        print(f"samples     {summary['samples']} ({summary['lost_samples']} lost, "
              f"{summary['overflow_samples']} overflow)")
        print(f"gaps        {summary['gaps']} ({summary['gap_seconds']:.3f} s){'  PARTIAL' if summary['partial'] else ''}")
        print(f"link        {summary['crc_errors']} CRC errors, {summary['malformed_lines']} malformed lines, "
              f"{summary['reconnects']} reconnects, clock drift {_drift(summary)}")
    return 0


def _drift(summary: dict) -> str:
    """``"+12.3 ppm +- 4.1 ppm"``, or why there is no figure yet."""
    uncertainty = summary["drift_uncertainty_ppm"]
    if uncertainty is None:
        return "not measured (the read was too short for a clock fit)"
    return f"{summary['drift_ppm']:+.1f} ppm +- {uncertainty:.1f} ppm"
