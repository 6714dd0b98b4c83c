"""The measured-versus-modelled report of one or more runs.

    >>> from basestation.report import load_run, write_report
    >>> run = load_run("runs/2026-01-01-int8")            # the run directory the testbed wrote
    >>> files = write_report([run], "runs/2026-01-01-int8", target_accuracy=0.9)
    >>> files.html                                        # self-contained, figures embedded

The report shows accuracy against round and against cumulative measured
energy, measured energy beside the analytic model before and after
calibration (with MAPE), agreement with the emulator's ground truth, the
precision trajectory, and with several runs the energy each needed to reach a
target accuracy and the saving against a baseline. docs/report.md explains
every number.
"""

from basestation.report.data import EnergyRecord, ReportError, RoundRecord, RunData
from basestation.report.load import load_run

__all__ = ["EnergyRecord", "ReportError", "ReportFiles", "RoundRecord", "RunData", "load_run", "unique_names",
           "write_report"]

_WRITER = ("ReportFiles", "unique_names", "write_report")


def __getattr__(name: str):
    # The writer pulls in matplotlib; load it only when asked, so 'qfl report --help' stays quick.
    if name in _WRITER:
        from basestation.report import writer

        return getattr(writer, name)
    raise AttributeError(f"module 'basestation.report' has no attribute {name!r}")
