"""Print a decoded summary of an update or global-model message file.

``qfl inspect FILE [--key HEX | --key-file F] [--json]``: header, tensors
(bits, shape, scale, sizes, the range of the codes and of the values they
stand for) and whether the signature verified with the given key: a
device's HMAC key for an update, the basestation's Ed25519 public key for a
global model. Exit status 0 when the message decodes (and verifies, with a key), 1
when it decodes but the signature fails, 2 when it is not a valid message.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge.cli import given_path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=given_path, help="a message as published (e.g. a spooled update or a saved model)")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--key", help="as hex, to check the signature: the device's HMAC key (update) or the "
                                   "basestation's Ed25519 public key (model)")
    key.add_argument("--key-file", type=Path, help="file holding that key as hex on one line")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    import json

    from edge.cli import CommandError
    from edge.wire.errors import WireError
    from edge.wire.message import decode_message, read_header, signature_ok

    key = _read_key(args.key, args.key_file)
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    try:
        message = decode_message(data)
    except WireError as exc:
        raise CommandError(f"{args.file} is not a valid message: {exc}") from None
    try:
        signature = "not checked" if key is None else ("verified" if signature_ok(data, key) else "FAILED")
    except WireError as exc:
        raise CommandError(f"cannot check the signature of {args.file}: {exc}") from None
    summary = summarize(message, len(data), signature, version=read_header(data).version)
    summary["file"] = str(args.file)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 1 if signature == "FAILED" else 0


def _read_key(key_hex: str | None, key_file: Path | None) -> bytes | None:
    from edge.cli import CommandError
    from edge.wire.message import MIN_KEY_SIZE

    if key_file is not None:
        try:
            key_hex = key_file.read_text(encoding="ascii").strip()
        except OSError as exc:
            raise CommandError(f"cannot read the key file {key_file}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise CommandError(f"key file {key_file} must hold the key as hex digits on one line") from None
        source = f"key file {key_file}"
    else:
        source = "--key"
    if key_hex is None:
        return None
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        raise CommandError(f"{source} must be the key as hex digits (e.g. 00ff...), got {key_hex[:20]!r}") from None
    if len(key) < MIN_KEY_SIZE:
        raise CommandError(f"{source} holds {len(key)} bytes; a key has at least {MIN_KEY_SIZE}")
    return key


def summarize(message: Any, size: int, signature: str, version: int = 1) -> dict[str, Any]:
    """A JSON-ready description of a decoded message (what ``--json`` prints)."""
    from edge.wire.message import FIXED_HEADER_SIZE, TENSOR_HEADER_SIZE, trailer_size
    from edge.wire.tensor import dequantize_tensor

    tensors = []
    for t in message.tensors:
        entry = {
            "name": t.name, "shape": list(t.shape), "bits": t.bits, "rounding": t.rounding,
            "scale_exp": None if t.rounding == "none" else t.scale_exp, "count": t.count,
            "payload_bytes": t.payload_size, "header_bytes": TENSOR_HEADER_SIZE + 4 * len(t.shape) + len(t.name.encode()),
            "zeros": int((t.values == 0).sum()),
        }
        if t.count:  # min/max: the codes (raw floats at rounding none); value_min/value_max: what they stand for
            entry["min"] = float(t.values.min()) if t.rounding == "none" else int(t.values.min())
            entry["max"] = float(t.values.max()) if t.rounding == "none" else int(t.values.max())
            values = dequantize_tensor(t)
            entry["value_min"], entry["value_max"] = float(values.min()), float(values.max())
        tensors.append(entry)
    message_header = (FIXED_HEADER_SIZE + len(message.experiment.encode()) + len(message.device.encode())
                      + trailer_size(version))
    return {
        "size": size,
        "header": {
            "type": message.msg_type, "kind": message.kind, "version": version, "experiment": message.experiment,
            "device": message.device, "round": message.round, "samples": message.samples,
            "base_hash": message.base_hash.hex(), "nonce": message.nonce.hex(),
        },
        "signature": signature,
        "sizes": {
            "message_header": message_header,
            "tensor_headers": sum(t["header_bytes"] for t in tensors),
            "payloads": sum(t["payload_bytes"] for t in tensors),
            "values": sum(t["count"] for t in tensors),
        },
        "tensors": tensors,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable table of :func:`summarize`'s output."""
    h, sizes = summary["header"], summary["sizes"]
    hash_label = "model hash" if h["type"] == "model" else "base model"
    lines = [
        f"file         {summary.get('file', '-')} ({summary['size']} bytes)",
        f"message      {h['type']}, kind {h['kind']}, format version {h['version']}",
        f"experiment   {h['experiment']}",
        f"{'sender' if h['type'] == 'model' else 'device':<12} {h['device']}",
        f"round        {h['round']}",
        f"samples      {h['samples']}",
        f"{hash_label:<12} {h['base_hash']}",
        f"nonce        {h['nonce']}",
        f"signature    {summary['signature']}",
        f"sizes        {sizes['message_header']} message header + {sizes['tensor_headers']} tensor headers"
        f" + {sizes['payloads']} payload bytes for {sizes['values']} values",
        f"tensors      {len(summary['tensors'])}",
    ]
    rows = [("name", "shape", "bits", "rounding", "scale", "payload", "zeros", "code min", "code max", "value min",
             "value max")]
    for t in summary["tensors"]:
        rows.append((
            t["name"], "x".join(map(str, t["shape"])) or "scalar", str(t["bits"]), t["rounding"],
            "float32" if t["scale_exp"] is None else f"2^{t['scale_exp']}", f"{t['payload_bytes']} B",
            f"{t['zeros']}/{t['count']}", _num(t.get("min")), _num(t.get("max")), _num(t.get("value_min")),
            _num(t.get("value_max")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _num(value: float | int | None) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)
