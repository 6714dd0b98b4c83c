"""``qfl inspect``: decoded summary, signature status and exit codes, on real message files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.cli import main
from edge.wire import encode_model, encode_update, quantize_update
from edge.wire.signing import public_key

KEY = bytes(range(32))
KEY_HEX = KEY.hex()


@pytest.fixture()
def update_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    delta = {"0.weight": rng.standard_normal((4, 3)).astype(np.float32), "0.bias": np.zeros(4, np.float32)}
    data = encode_update(quantize_update(delta, 5, rng), experiment="exp-9", device="pi-04", round=12,
                         base_hash=bytes(range(32)), samples=77, key=KEY, nonce=bytes(16))
    path = tmp_path / "update.bin"
    path.write_bytes(data)
    return path


def test_summary_with_verified_signature(update_file, capsys):
    assert main(["inspect", str(update_file), "--key", KEY_HEX]) == 0
    out = capsys.readouterr().out
    assert "signature    verified" in out
    assert "device       pi-04" in out and "round        12" in out and "samples      77" in out
    assert "base model   " + bytes(range(32)).hex() in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  0.")}
    assert lines["0.weight"][1:4] == ["4x3", "5", "stochastic"]
    assert lines["0.weight"][5] == "8"  # ceil(5 * 12 / 8) payload bytes
    assert lines["0.bias"][7] == "4/4"  # all zero ("N B" payload takes two columns)
    size = update_file.stat().st_size
    assert f"({size} bytes)" in out


def test_json_output_and_no_key(update_file, capsys):
    assert main(["inspect", str(update_file), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["signature"] == "not checked"
    assert summary["header"]["experiment"] == "exp-9" and summary["header"]["type"] == "update"
    sizes = summary["sizes"]
    assert sizes["message_header"] + sizes["tensor_headers"] + sizes["payloads"] == summary["size"]
    weight = summary["tensors"][0]
    assert (weight["shape"], weight["bits"], weight["payload_bytes"]) == ([4, 3], 5, 8)
    assert -15 <= weight["min"] <= weight["max"] <= 15


def test_wrong_key_fails_with_status_1(update_file, tmp_path, capsys):
    key_file = tmp_path / "other.key"
    key_file.write_text(bytes(range(1, 33)).hex() + "\n")
    assert main(["inspect", str(update_file), "--key-file", str(key_file)]) == 1
    assert "signature    FAILED" in capsys.readouterr().out


def test_model_message(tmp_path, capsys):
    path = tmp_path / "model.bin"
    path.write_bytes(encode_model(quantize_update({"w": np.ones(3, np.float32)}, 32, None), experiment="e",
                                  round=1, key=KEY))
    assert main(["inspect", str(path), "--key", public_key(KEY).hex()]) == 0  # models: the Ed25519 public key
    out = capsys.readouterr().out
    assert "message      model, kind full" in out and "sender       basestation" in out
    assert "float32" in out and "format version 2" in out
    assert main(["inspect", str(path), "--key", KEY_HEX]) == 1  # the private key is not what checks it
    assert "signature    FAILED" in capsys.readouterr().out
    assert main(["inspect", str(path), "--key", "00" * 16]) == 2  # not an Ed25519 public key: one line, no traceback
    assert "cannot check the signature" in capsys.readouterr().err


@pytest.mark.parametrize("mangle,message", [
    (lambda d: d[:50], "is not a valid message: truncated"),
    (lambda d: d[:-40] + bytes([d[-40] ^ 1]) + d[-39:], "is not a valid message: bad_crc"),
    (lambda d: b"GIF89a" + d[6:], "bad_magic"),
])
def test_invalid_message_is_status_2_with_reason(update_file, capsys, mangle, message):
    update_file.write_bytes(mangle(update_file.read_bytes()))
    assert main(["inspect", str(update_file)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--key", "xyz"], "--key must be the key as hex digits"),
    (["--key", "00ff"], "--key holds 2 bytes; a key has at least 16"),
    (["--key-file", "/nonexistent/key"], "cannot read the key file"),
])
def test_bad_key_arguments(update_file, capsys, args, message):
    assert main(["inspect", str(update_file), *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "absent.bin")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_console_script(update_file):
    qfl = Path(sys.executable).with_name("qfl")
    command = [str(qfl)] if qfl.exists() else [sys.executable, "-m", "edge.cli"]
    done = subprocess.run([*command, "inspect", str(update_file), "--key", KEY_HEX, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["signature"] == "verified"


def test_empty_path_is_refused_by_name(tmp_path):
    qfl = Path(sys.executable).with_name("qfl")
    command = [str(qfl)] if qfl.exists() else [sys.executable, "-m", "edge.cli"]
    done = subprocess.run([*command, "inspect", ""], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("qfl inspect: error: argument file: an empty path names "
                                                    "nothing; give a file or folder")
