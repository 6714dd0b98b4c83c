"""The meter firmware: ``main.py`` and ``ina219.py`` are copied to a Raspberry Pi Pico.

On CPython the same files are imported as ``firmware_tools.meter_firmware.main``
(tests, emulator); this ``__init__`` is never copied to the board.
"""
