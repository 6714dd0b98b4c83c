"""Reading the emulator's profile files (boards.toml, links.toml): one TOML table per named profile."""

from __future__ import annotations

import tomllib
from pathlib import Path


def read_profile_tables(path: Path, kind: str, error: type[Exception]) -> dict:
    """The tables of the ``kind`` profiles file at ``path``; ``error`` with a one-line reason if it is missing or bad."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"{kind} profiles file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{kind} profiles file {path} is not valid TOML: {exc}") from None
