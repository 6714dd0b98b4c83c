"""Subcommands of ``qfl`` that live on the device side (see ``edge.cli.COMMANDS``).

Each module defines ``configure(parser)`` and ``run(args) -> int`` and imports
its heavy modules inside ``run``.
"""
