"""Meter firmware (MicroPython for an RP2040 with an INA219), the tools that
flash it, the meter emulator, and provisioning of Pi devices and broker credentials.
"""
