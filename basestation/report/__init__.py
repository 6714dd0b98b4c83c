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

__all__ = ["EnergyRecord", "ReportError", "ReportFiles", "RoundRecord", "RunData", "load_run", "unique_names",
           "write_report"]

# The loader pulls in the energy model (numpy) and the writer matplotlib; import them only when asked,
# so 'qfl report --help' stays quick.
_LAZY = {"load_run": "basestation.report.load", "ReportFiles": "basestation.report.writer",
         "unique_names": "basestation.report.writer", "write_report": "basestation.report.writer"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'basestation.report' has no attribute {name!r}")
