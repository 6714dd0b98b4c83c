"""The emulated testbed: one machine, a private broker, the basestation and N metered edge processes.

    from basestation.testbed import TestbedSettings, run_testbed
    result = run_testbed(TestbedSettings(devices=4, rounds=10), Console())
"""

from basestation.testbed.run import RunResult, TestbedError, run_testbed
from basestation.testbed.settings import SettingsError, TestbedSettings

__all__ = ["RunResult", "SettingsError", "TestbedError", "TestbedSettings", "run_testbed"]
