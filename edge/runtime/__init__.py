"""The device side of the federation: ``device.toml``, the disk spool and the MQTT runtime.

    from edge.runtime import DeviceConfig, EdgeRuntime
    EdgeRuntime(DeviceConfig.load("device.toml")).run()

Run it as ``qfl edge run --config device.toml``.
"""

from edge.runtime.config import ConfigError, DeviceConfig
from edge.runtime.device import EdgeRuntime
from edge.runtime.spool import Spool

__all__ = ["ConfigError", "DeviceConfig", "EdgeRuntime", "Spool"]
