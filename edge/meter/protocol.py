"""The meter line protocol: CRC-8 framing, the messages a meter sends, the commands it takes.

Specified in docs/meter-protocol.md (the worked examples there are checked by
tests/test_meter_protocol.py). Pure: bytes in, messages out, no serial code::

    >>> from edge.meter import protocol
    >>> protocol.parse_line(b"S,0,1000,03E8,2712*52\\n")
    Sample(seq=0, t_us=1000, shunt_raw=1000, bus_raw=10002)
    >>> protocol.command("START", 1000)
    b'START 1000*EF\\n'

Every line is ASCII and ends with ``*HH`` and a newline, ``HH`` being the
CRC-8 (polynomial 0x07, initial value 0, no reflection, no final XOR; the
"CRC-8/SMBUS" variant) of every byte before the ``*``, in upper-case hex.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

from edge.meter.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 120
MAX_RATE_HZ = 5000  # the highest rate START accepts
# seq and t_us above this cannot come from a meter (2**53 us is 285 years of uptime) and would no
# longer be exact in the host's float arithmetic.
MAX_COUNTER = 2**53
# 1 uOhm: below any real shunt (the smallest are ~50 uOhm); a tinier one makes currents overflow floats.
MIN_SHUNT_MILLIOHMS = 0.001
COMMANDS = ("START", "STOP", "ID?", "CAL", "CFG")


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc8(data: bytes) -> int:
    """CRC-8, polynomial 0x07, init 0 (check value: ``crc8(b"123456789") == 0xF4``)."""
    crc = 0
    table = _CRC_TABLE
    for byte in data:
        crc = table[crc ^ byte]
    return crc


def frame(body: str) -> bytes:
    """Append ``*HH`` and a newline to a line body.

        >>> frame("ID?")
        b'ID?*0E\\n'
    """
    if "*" in body or "\n" in body or "\r" in body:
        raise ProtocolError("format", f"a line body cannot contain '*', CR or LF: {body!r}")
    try:
        raw = body.encode("ascii")
    except UnicodeEncodeError:
        raise ProtocolError("encoding", f"a line body must be ASCII: {body!r}") from None
    return b"%s*%02X\n" % (raw, crc8(raw))


def unframe(line: bytes) -> str:
    """Check the ``*HH`` trailer of one line (with or without its CR/LF) and return the body."""
    line = line.rstrip(b"\r\n")
    star = line.rfind(b"*")
    if star < 0 or len(line) - star != 3:
        raise ProtocolError("frame", f"line does not end with '*HH': {line[:60]!r}")
    body = line[:star]
    try:
        sent = int(line[star + 1:], 16)
    except ValueError:
        raise ProtocolError("frame", f"checksum is not two hex digits: {line[star:]!r}") from None
    if crc8(body) != sent:
        raise ProtocolError("crc", f"CRC-8 mismatch (line says {sent:02X}, body gives {crc8(body):02X}): {line[:60]!r}")
    try:
        return body.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("encoding", f"line is not ASCII: {line[:60]!r}") from None


@dataclass(frozen=True)
class Sample:
    """``S,<seq>,<t_us>,<shunt raw hex>,<bus raw hex>``: one reading of the two raw registers."""

    seq: int
    t_us: int
    shunt_raw: int
    bus_raw: int

    def body(self) -> str:
        return f"S,{self.seq},{self.t_us},{self.shunt_raw:04X},{self.bus_raw:04X}"


@dataclass(frozen=True)
class Identity:
    """``#QFLM,<proto>,<meter id>,<firmware>,<shunt mOhm>,<config hex>,<cal hex>``."""

    proto: int
    meter_id: str
    firmware: str
    shunt_milliohms: float
    config: int
    calibration: int

    @property
    def shunt_ohms(self) -> float:
        return self.shunt_milliohms / 1000.0

    def body(self) -> str:
        return (f"#QFLM,{self.proto},{self.meter_id},{self.firmware},{format_number(self.shunt_milliohms)},"
                f"{self.config:04X},{self.calibration:04X}")


@dataclass(frozen=True)
class MeterFault:
    """``E,<code>,<text>``: something went wrong on the meter (codes in docs/meter-protocol.md)."""

    code: int
    text: str

    def body(self) -> str:
        return f"E,{self.code},{self.text}"


@dataclass(frozen=True)
class Ack:
    """``OK,<command>[,<value>...]``: a command was carried out."""

    command: str
    values: tuple[str, ...] = ()

    def body(self) -> str:
        return ",".join(("OK", self.command) + self.values)


Message = Union[Sample, Identity, MeterFault, Ack]


def _hex16(text: str, what: str) -> int:
    if len(text) != 4:
        raise ProtocolError("format", f"{what} must be 4 hex digits, got {text!r}")
    try:
        return int(text, 16)
    except ValueError:
        raise ProtocolError("format", f"{what} must be 4 hex digits, got {text!r}") from None


def _unsigned(text: str, what: str) -> int:
    if not text.isdigit():
        raise ProtocolError("format", f"{what} must be a non-negative decimal integer, got {text!r}")
    return int(text)


def _shunt_milliohms(text: str) -> float:
    """The identity's shunt field: a positive finite number (NaN, inf, 0 or below would poison every current)."""
    try:
        shunt = float(text)
    except ValueError:
        shunt = math.nan
    if not (math.isfinite(shunt) and shunt > 0):
        raise ProtocolError("format", f"meter identity: shunt resistance must be a positive finite number "
                                      f"of milliohms, got {text!r}")
    if shunt < MIN_SHUNT_MILLIOHMS:
        raise ProtocolError("format", f"meter identity: shunt resistance must be at least {MIN_SHUNT_MILLIOHMS} "
                                      f"milliohms (1 uOhm), got {text!r}")
    return shunt


def _parse_identity(fields: list[str], body: str) -> Identity:
    if len(fields) != 7:
        raise ProtocolError("format", f"meter identity: an identity has 7 fields "
                                      f"#QFLM,proto,id,firmware,mOhm,config,cal; got {body!r}")
    for index, what in ((2, "meter id"), (3, "firmware version")):
        if not fields[index]:
            raise ProtocolError("format", f"meter identity: {what} is empty in {body!r}")
    return Identity(_unsigned(fields[1], "meter identity: protocol version"), fields[2], fields[3],
                    _shunt_milliohms(fields[4]), _hex16(fields[5], "meter identity: config register"),
                    _hex16(fields[6], "meter identity: calibration register"))


def parse_body(body: str) -> Message:
    """Parse a line body (the part before ``*``) into a message."""
    fields = body.split(",")
    kind = fields[0]
    if kind == "S":
        if len(fields) != 5:
            raise ProtocolError("format", f"a sample has 5 fields S,seq,t_us,shunt,bus; got {body!r}")
        return Sample(_unsigned(fields[1], "seq"), _unsigned(fields[2], "t_us"),
                      _hex16(fields[3], "shunt register"), _hex16(fields[4], "bus register"))
    if kind == "#QFLM":
        return _parse_identity(fields, body)
    if kind == "E":
        parts = body.split(",", 2)
        if len(parts) != 3:
            raise ProtocolError("format", f"a meter error is E,code,text; got {body!r}")
        return MeterFault(_unsigned(parts[1], "error code"), parts[2])
    if kind == "OK":
        if len(fields) < 2 or not fields[1]:
            raise ProtocolError("format", f"an acknowledgement is OK,command[,value...]; got {body!r}")
        return Ack(fields[1], tuple(fields[2:]))
    raise ProtocolError("unknown", f"unknown line type {kind!r} (expected S, #QFLM, E or OK)")


def parse_line(line: bytes) -> Message:
    """Check the CRC of one line and parse it; raises ProtocolError with a ``reason``."""
    return parse_body(unframe(line))


def encode(message: Message) -> bytes:
    """The framed line for a message: ``encode(Sample(0, 1000, 0x3E8, 0x2712)) == b"S,0,1000,03E8,2712*52\\n"``."""
    return frame(message.body())


def format_number(value: float) -> str:
    """Shortest decimal for a command argument or a resistance: 100.0 -> '100', 12.5 -> '12.5'."""
    if float(value) == int(value):
        return str(int(value))
    return f"{value:.6g}"


def command(name: str, *args: float | str, crc: bool = True) -> bytes:
    """A command line for the meter, framed with a CRC unless ``crc=False`` (what a person types).

        >>> command("STOP", crc=False)
        b'STOP\\n'
    """
    if name not in COMMANDS:
        raise ProtocolError("unknown", f"unknown command {name!r}; the meter understands {', '.join(COMMANDS)}")
    words = [name] + [a if isinstance(a, str) else format_number(a) for a in args]
    text = " ".join(words)
    return frame(text) if crc else text.encode("ascii") + b"\n"


class LineSplitter:
    """Cuts a byte stream into lines and resynchronises after garbage.

    A fragment longer than ``max_line`` without a newline is thrown away up to
    the next newline and counted in ``overlong``; the line after it is read
    normally. Lines keep no terminator.
    """

    def __init__(self, max_line: int = MAX_LINE_BYTES):
        self.max_line = max_line
        self.overlong = 0
        self._rest = b""
        self._discarding = False

    def reset(self) -> None:
        """Forget a partial line (after a reconnect the stream starts anew)."""
        self._rest = b""
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the complete lines they finish."""
        if not data:
            return []
        parts = data.split(b"\n")
        if self._discarding:
            if len(parts) == 1:
                return []
            parts[0] = b""
            self._discarding = False
        else:
            parts[0] = self._rest + parts[0]
        self._rest = parts.pop()
        if len(self._rest) > self.max_line:
            self._rest = b""
            self._discarding = True
            self.overlong += 1
        limit = self.max_line
        lines = []
        for part in parts:
            if len(part) > limit:
                self.overlong += 1
            elif part:
                lines.append(part)
        return lines
