"""The meter line protocol: CRC-8, framing, parsing, line splitting, and the examples in docs/meter-protocol.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.meter import ina219, protocol
from edge.meter.errors import MeterError, ProtocolError
from edge.meter.protocol import Ack, Identity, LineSplitter, MeterFault, Sample
from firmware_tools.ina219_model import EmulatedI2C, EmulatedINA219
from firmware_tools.meter_firmware import main as firmware
from firmware_tools.meter_firmware.ina219 import INA219

DOC = Path(__file__).resolve().parents[1] / "docs" / "meter-protocol.md"
FRAMED = re.compile(r"^[ -~]*\*[0-9A-F]{2}$")


# --- CRC-8 ------------------------------------------------------------------------------------------
def test_crc8_check_value():
    assert protocol.crc8(b"123456789") == 0xF4
    assert protocol.crc8(b"") == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_host_and_firmware_crc_agree(data):
    assert protocol.crc8(data) == firmware.crc8(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.data())
def test_crc8_catches_every_single_byte_error(data, draw):
    pos = draw.draw(st.integers(0, len(data) - 1))
    flip = draw.draw(st.integers(1, 255))
    damaged = bytearray(data)
    damaged[pos] ^= flip
    assert protocol.crc8(bytes(damaged)) != protocol.crc8(data)


# --- messages ---------------------------------------------------------------------------------------
hex16 = st.integers(0, 0xFFFF)
ident_text = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=",*"),
                     min_size=1, max_size=20)
messages = st.one_of(
    st.builds(Sample, st.integers(0, 2**40), st.integers(0, 2**50), hex16, hex16),
    st.builds(Identity, st.integers(0, 99), ident_text, ident_text,
              st.sampled_from([100.0, 10.0, 101.3, 12.5, 2000.0]), hex16, hex16),
    st.builds(MeterFault, st.integers(0, 99),
              st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="*"),
                      max_size=40)),
    st.builds(Ack, st.sampled_from(["START", "STOP", "CAL", "CFG"]),
              st.lists(st.from_regex(r"[0-9A-F]{1,6}", fullmatch=True), max_size=3).map(tuple)),
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_every_message_round_trips(message):
    line = protocol.encode(message)
    assert line.endswith(b"\n") and FRAMED.match(line.decode().strip())
    assert protocol.parse_line(line) == message
    assert protocol.parse_line(line.replace(b"\n", b"\r\n")) == message


def _meter(out: list[str], meter_id: str = "qflm") -> firmware.Meter:
    """The firmware on an emulated chip reading 10 mV across the shunt and 5 V on the bus."""
    chip = EmulatedINA219()
    meter = firmware.Meter(INA219(EmulatedI2C({0x40: chip})), out.append, meter_id=meter_id)
    chip.set_inputs(0.010, 5.0)
    return meter


def test_firmware_lines_parse_on_the_host():
    out: list[str] = []
    meter = _meter(out, "t")
    meter.identify()
    meter.sample(123)
    meter.handle("START 10")
    meter.handle("FOO")
    parsed = [protocol.parse_line(line.encode()) for line in out]
    assert parsed == [Identity(1, "t", firmware.FIRMWARE, 100.0, 0x399F, 4096),
                      Sample(0, 123, 0x03E8, 0x2712), Ack("START", ("10",)),
                      MeterFault(1, "unknown command FOO; use START, STOP, ID?, CAL, CFG")]


@pytest.mark.parametrize("line, reason", [
    (b"S,0,1000,03E8,2712*53\n", "crc"),
    (b"S,0,1000,03E8,2712\n", "frame"),
    (b"S,0,1000,03E8,2712*5\n", "frame"),
    (b"S,0,1000,03E8,2712*ZZ\n", "frame"),
    (b"S,0,1000,03E8*" + b"%02X" % protocol.crc8(b"S,0,1000,03E8"), "format"),
    (protocol.frame("S,-1,1000,03E8,2712"), "format"),
    (protocol.frame("S,0,10.5,03E8,2712"), "format"),
    (protocol.frame("S,0,1000,3E8,2712"), "format"),
    (protocol.frame("S,0,1000,03EG,2712"), "format"),
    (protocol.frame("#QFLM,1,x,1.0,abc,399F,1000"), "format"),
    (protocol.frame("#QFLM,1,x,1.0,100,399F"), "format"),
    (protocol.frame("E,x,text"), "format"),
    (protocol.frame("E,1"), "format"),
    (protocol.frame("OK"), "format"),
    (protocol.frame("X,1,2"), "unknown"),
    ("S,é*00\n".encode("utf-8"), "crc"),
])
def test_bad_lines_are_rejected_with_a_reason(line, reason):
    with pytest.raises(ProtocolError) as info:
        protocol.parse_line(line)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError) and isinstance(info.value, MeterError)


@pytest.mark.parametrize("body, message", [
    ("#QFLM,1,x,1.0,nan,399F,1000", "shunt resistance must be a positive finite number of milliohms, got 'nan'"),
    ("#QFLM,1,x,1.0,-100,399F,1000", "positive finite number of milliohms, got '-100'"),
    ("#QFLM,1,x,1.0,0,399F,1000", "positive finite number of milliohms, got '0'"),
    ("#QFLM,1,x,1.0,inf,399F,1000", "positive finite number of milliohms, got 'inf'"),
    ("#QFLM,1,x,1.0,1e999,399F,1000", "positive finite number of milliohms, got '1e999'"),
    ("#QFLM,1,x,1.0,1e-300,399F,1000", "at least 0.001 milliohms (1 uOhm), got '1e-300'"),
    ("#QFLM,1,,1.0,100,399F,1000", "meter id is empty"),
    ("#QFLM,1,x,,100,399F,1000", "firmware version is empty"),
    ("#QFLM,-1,x,1.0,100,399F,1000", "protocol version must be a non-negative decimal integer"),
    ("#QFLM,1,x,1.0,100,399,1000", "config register must be 4 hex digits"),
])
def test_an_unusable_identity_names_its_field(body, message):
    with pytest.raises(ProtocolError, match=f"^meter identity: .*{re.escape(message)}") as info:
        protocol.parse_line(protocol.frame(body))
    assert info.value.reason == "format"


def test_non_ascii_body_with_a_matching_crc_is_an_encoding_error():
    body = "S,\u00e9".encode("latin-1")
    with pytest.raises(ProtocolError) as info:
        protocol.parse_line(body + b"*%02X\n" % protocol.crc8(body))
    assert info.value.reason == "encoding"


def test_frame_refuses_bodies_that_would_break_the_framing():
    for body in ("a*b", "a\nb", "a\rb", "caf\u00e9"):
        with pytest.raises(ProtocolError):
            protocol.frame(body)


def test_commands_with_and_without_checksum():
    assert protocol.command("START", 1000) == b"START 1000*EF\n"
    assert protocol.command("CAL", 100.0, 12.5) == protocol.frame("CAL 100 12.5")
    assert protocol.command("STOP", crc=False) == b"STOP\n"
    with pytest.raises(ProtocolError, match="understands"):
        protocol.command("RESET")


# --- line splitting ---------------------------------------------------------------------------------
def test_splitter_resynchronises_after_garbage():
    good = [protocol.encode(Sample(i, 1000 * i, 0x03E8, 0x2712)) for i in range(3)]
    garbage = bytes(range(256)).replace(b"\n", b"") * 2  # 510 bytes, no newline
    splitter = LineSplitter()
    lines = splitter.feed(good[0] + garbage[:100]) + splitter.feed(garbage[100:] + b"\n" + good[1] + good[2])
    assert [protocol.parse_line(x) for x in lines] == [Sample(i, 1000 * i, 0x03E8, 0x2712) for i in range(3)]
    assert splitter.overlong == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 400), max_size=8))
def test_splitting_does_not_depend_on_how_bytes_arrive(cuts):
    stream = b"".join(protocol.encode(Sample(i, 37 * i, i, 0x2712)) for i in range(12))
    whole = LineSplitter().feed(stream)
    splitter = LineSplitter()
    pieces, last = [], 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts) + [len(stream)]:
        pieces += splitter.feed(stream[last:cut])
        last = cut
    assert pieces == whole and len(whole) == 12


# --- the documentation's examples -------------------------------------------------------------------
def _doc_framed_lines() -> list[str]:
    found = []
    for raw in DOC.read_text().splitlines():
        if not raw.startswith("    "):
            continue
        text = raw.strip()
        if text[:2] in ("> ", "< "):
            text = text[2:]
        if FRAMED.match(text):
            found.append(text)
    return found


def test_every_framed_line_in_the_doc_has_the_right_checksum():
    lines = _doc_framed_lines()
    assert len(lines) >= 20
    for line in lines:
        body, _, crc = line.rpartition("*")
        assert protocol.crc8(body.encode()) == int(crc, 16), line


def test_doc_meter_lines_parse_and_doc_commands_are_accepted_by_the_firmware():
    commands = 0
    for line in _doc_framed_lines():
        if line.split(",")[0] in ("S", "#QFLM", "E", "OK"):
            protocol.parse_line(line.encode())
        elif line.rpartition("*")[0].split()[0] in protocol.COMMANDS:
            out: list[str] = []
            _meter(out).handle(line)
            assert len(out) == 1 and not out[0].startswith("E,"), (line, out)
            commands += 1
    assert commands >= 6


def test_doc_crc_walkthrough_matches_the_table():
    crc = 0
    rows = re.findall(r"^\| `([0-9A-F]{2})` \(`.`\) \| `[0-9A-F]{2} \^ [0-9A-F]{2} = ([0-9A-F]{2})` \| `([0-9A-F]{2})` \|$",
                      DOC.read_text(), flags=re.M)
    assert len(rows) == 3
    for byte, index, entry in rows:
        assert crc ^ int(byte, 16) == int(index, 16)
        crc = protocol.crc8(bytes([int(byte, 16)])) if crc == 0 else protocol._CRC_TABLE[crc ^ int(byte, 16)]
        assert crc == int(entry, 16)


def test_doc_sample_table_decodes_as_stated():
    rows = re.findall(r"^\| `(S,[^`]+)` \| (.+) \|$", DOC.read_text(), flags=re.M)
    assert len(rows) == 5
    identity = protocol.parse_line(next(line for line in _doc_framed_lines() if line.startswith("#QFLM")).encode())
    for line, rest in rows:
        seq, t_us, shunt_mv, amps, volts, cnvr, ovf, watts = (cell.strip() for cell in rest.split("|"))
        sample = protocol.parse_line(line.encode())
        assert (sample.seq, sample.t_us) == (int(seq), int(t_us))
        shunt = ina219.shunt_voltage(sample.shunt_raw)
        bus, ready, overflow = ina219.bus_voltage(sample.bus_raw)
        current = shunt / identity.shunt_ohms
        assert shunt * 1e3 == pytest.approx(float(shunt_mv), abs=0.005)
        assert current == pytest.approx(float(amps), abs=5e-5)
        assert bus == pytest.approx(float(volts), abs=5e-4)
        assert (int(ready), int(overflow)) == (int(cnvr), int(ovf))
        assert bus * current == pytest.approx(float(watts), abs=5e-5)
