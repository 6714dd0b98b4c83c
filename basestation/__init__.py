"""The basestation service: round orchestration over MQTT, aggregation, the
SQLite store, the energy model and precision solver, reports and the emulated
testbed. May import ``edge`` and ``models``; ``edge`` never imports this package.
"""
