"""The sweep's grid and policy list, parsed from the command line and checked in one place.

    >>> parse_bits("--grid-bits", "4,8,16,32")
    (4, 8, 16, 32)
"""

from __future__ import annotations

from dataclasses import dataclass

POLICY_NAMES = ("fl32", "model", "measured")


class GridError(ValueError):
    """An empty, malformed or out-of-range grid, or an unknown policy; the message lists what is valid."""


def _ints(flag: str, text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise GridError(f"{flag} is empty; give comma-separated integers, e.g. {flag} 4,8,16,32")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise GridError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if len(set(values)) != len(values):
        raise GridError(f"{flag} lists a value twice: {text!r}")
    return tuple(sorted(values))


def parse_bits(flag: str, text: str) -> tuple[int, ...]:
    """Bit widths 1..32."""
    values = _ints(flag, text)
    bad = [v for v in values if not 1 <= v <= 32]
    if bad:
        raise GridError(f"{flag} values must be bit widths 1..32, got {', '.join(map(str, bad))}")
    return values


def parse_iterations(flag: str, text: str) -> tuple[int, ...]:
    """Local iterations 1..1000."""
    values = _ints(flag, text)
    bad = [v for v in values if not 1 <= v <= 1000]
    if bad:
        raise GridError(f"{flag} values must be local iterations 1..1000, got {', '.join(map(str, bad))}")
    return values


def parse_policies(text: str) -> tuple[str, ...]:
    """Policy names from ``POLICY_NAMES`` (may be empty: only the grid runs)."""
    names = tuple(p.strip() for p in str(text).split(",") if p.strip())
    bad = [n for n in names if n not in POLICY_NAMES]
    if bad:
        raise GridError(f"unknown policy {', '.join(bad)} in --policies; valid: {', '.join(POLICY_NAMES)}")
    if len(set(names)) != len(names):
        raise GridError(f"--policies lists a policy twice: {text!r}")
    return names


@dataclass(frozen=True)
class Grid:
    """The fixed settings of a sweep."""

    bits: tuple[int, ...]
    uplink_bits: tuple[int, ...]
    iterations: tuple[int, ...]

    def settings(self) -> list[tuple[int, int, int]]:
        """Every (n, m, I), I slowest."""
        return [(n, m, i) for i in self.iterations for n in self.bits for m in self.uplink_bits]
