"""The test vectors of docs/wire-format.md, parsed from the page, against the code in both directions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from edge.wire import (
    Message,
    QuantizedTensor,
    decode_message,
    dequantize,
    encode_message,
    message_size,
    model_hash,
    pack_bits,
    unpack_bits,
)

DOC = (Path(__file__).resolve().parents[1] / "docs" / "wire-format.md").read_text(encoding="utf-8")


def block_after(anchor: str) -> str:
    """The body of the first fenced code block after ``<!-- vector:ANCHOR -->``."""
    match = re.search(rf"<!-- vector:{re.escape(anchor)} -->\s*```\w*\n(.*?)```", DOC, re.S)
    assert match, f"docs/wire-format.md has no code block after <!-- vector:{anchor} -->"
    return match.group(1)


def pack_vectors() -> list[tuple[int, list[int], bytes]]:
    table = DOC.split("<!-- vector:pack -->", 1)[1].strip().split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        n, values, packed = (cell.strip() for cell in line.strip("|").split("|"))
        rows.append((int(n), [int(v) for v in values.split(",")], bytes.fromhex(packed.strip("`"))))
    return rows


def test_the_doc_has_pack_vectors_for_several_widths():
    assert {n for n, _, _ in pack_vectors()} >= {1, 3, 8, 12, 17, 32}


@pytest.mark.parametrize("n,values,packed", pack_vectors())
def test_pack_vector(n, values, packed):
    assert pack_bits(values, n) == packed
    assert unpack_bits(packed, n, len(values)).tolist() == values


def vector(name: str) -> tuple[Message, bytes, bytes]:
    spec = json.loads(block_after(f"{name}:input"))
    tensors = []
    for t in spec["tensors"]:
        if t["rounding"] == "none":
            values = np.array(t["floats"], np.float32)
        else:
            values = np.array(t["codes"], np.int64)
        tensors.append(QuantizedTensor(t["name"], tuple(t["shape"]), t["bits"], t["scale_exp"], t["rounding"],
                                       values.reshape(t["shape"])))
    msg = Message(spec["msg_type"], spec["experiment"], spec["device"], spec["round"],
                  bytes.fromhex(spec["base_hash"]), spec["samples"], spec["kind"], tuple(tensors),
                  bytes.fromhex(spec["nonce"]))
    data = bytes.fromhex("".join(block_after(f"{name}:hex").split()))
    return msg, data, bytes.fromhex(spec["key"]), bytes.fromhex(spec.get("public_key", spec["key"]))


@pytest.mark.parametrize("name", ["update", "model"])
def test_message_vector_encodes_to_the_doc_hex(name):
    msg, data, key, _ = vector(name)
    assert encode_message(msg, key) == data


@pytest.mark.parametrize("name", ["update", "model"])
def test_doc_hex_decodes_to_the_vector_inputs(name):
    msg, data, _, check = vector(name)  # a model is checked with the public key
    assert decode_message(data, key=check) == msg
    assert len(data) == message_size([(t.name, t.shape, t.bits) for t in msg.tensors],
                                     experiment=msg.experiment, device=msg.device, msg_type=msg.msg_type)


def test_model_vector_hash_is_the_hash_of_its_weights():
    msg, _, key, public = vector("model")
    from edge.wire.signing import public_key

    assert public_key(key) == public
    weights = dequantize(msg.tensors)
    assert weights["out.sign"].tolist() == [0.25, -0.25, -0.25, 0.25, -0.25]
    assert model_hash(weights) == msg.base_hash


def test_update_vector_size_statement():
    _, data, _, _ = vector("update")
    assert len(data) == 170 == (108 + 4 + 5) + (10 + 8 + 9) + (10 + 4 + 7) + 3 + 2


@pytest.mark.parametrize("m,size", [(8, 2619), (4, 1414), (32, 9849)])
def test_digits_mlp_sizes_in_the_doc(m, size):
    shapes = [("0.weight", (64, 32)), ("0.bias", (32,)), ("2.weight", (32, 10)), ("2.bias", (10,))]
    assert f"{size} bytes" in DOC or f"{size}\nbytes" in DOC
    assert message_size([(n, s, m) for n, s in shapes], experiment="exp1", device="pi-03") == size
