"""Exported models in real runtimes against qfl's own fixed-point forward, and ``qfl edge infer``.

Runs wherever its pieces are installed: LiteRT and ONNX Runtime in the main
environment, tflite-runtime 2.14 in the numpy-1 leg
(scripts/run-edge-tests-pi-stack.sh); a runtime that is missing skips its cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tflite")
pytest.importorskip("flatbuffers")

from edge.cli import main  # noqa: E402
from edge.data.catalog import load_dataset  # noqa: E402
from edge.fixedpoint import scale_exponent  # noqa: E402
from edge.infer.fixed_format import integer_format  # noqa: E402
from edge.infer.runtimes import installed, load  # noqa: E402
from edge.network import Network  # noqa: E402
from edge.trainer import LocalTrainer  # noqa: E402
from models import get_architecture  # noqa: E402
from models.architectures import Architecture, Conv2D, Dense, Flatten, LeakyReLU, MaxPool  # noqa: E402
from models.export import ExportError  # noqa: E402
from models.tflite import export_tflite, read_metadata, read_weights  # noqa: E402

PRECISIONS = (2, 4, 8, 16, 32)
AGREEMENT = 0.995


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


_TRAINED: dict[tuple[str, int], Network] = {}


def trained(name: str, bits: int, digits) -> Network:
    """A seeded network trained briefly on the digits (cached per module run)."""
    key = (name, bits)
    if key not in _TRAINED:
        net = Network(get_architecture(name), bits=bits, seed=0)
        LocalTrainer(lr=0.1, seed=0).train(net, digits.x_train, digits.y_train, iterations=200)
        _TRAINED[key] = net
    return _TRAINED[key]


def export(net: Network, digits, path: Path, kind: str) -> Path:
    """Write ``net`` as .tflite or .onnx, int8/QDQ at n <= 8 calibrated on the training split."""
    fmt = integer_format(net, digits.x_train) if net.bits <= 8 else None
    if kind == "tflite":
        return export_tflite(net.arch, net.get_weights(), path.with_suffix(".tflite"), fmt=fmt)
    from models.export import export_onnx

    return export_onnx(net.arch, net.get_weights(), path.with_suffix(".onnx"), fmt=fmt)


# Measured (docs/export.md): tflite-runtime 2.14's int8 kernels round requantization ties away from zero, the
# engine to even, and (when the weights need all 8 bits) round twice. A tie moves an activation by a whole step:
# a quarter of its range at 2 bits. LiteRT's kernels round like the engine. The other tflite-runtime cases pass.
KNOWN = {("tflite-runtime", "cnn", 4): "92.2 %", ("tflite-runtime", "mlp", 2): "80.2 %",
         ("tflite-runtime", "cnn", 2): "45.9 %"}


@pytest.mark.slow
@pytest.mark.parametrize("bits", PRECISIONS)
@pytest.mark.parametrize("runtime", ["litert", "tflite-runtime", "onnxruntime", "numpy"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_runtime_agrees_with_the_fixed_point_forward(runtime: str, name: str, bits: int, digits,
                                                     tmp_path: Path) -> None:
    if runtime != "numpy" and not installed(runtime):
        pytest.skip(f"{runtime} is not installed here")
    if runtime == "onnxruntime":
        pytest.importorskip("onnx")
    kind = "onnx" if runtime == "onnxruntime" else "tflite"
    net = trained(name, bits, digits)
    reference = net.predict(digits.x_test)
    runner = load(export(net, digits, tmp_path / f"{name}{bits}", kind), runtime)
    # The engine picks its activation scales per batch, so it runs the whole test set as one batch, as the
    # reference does; the runtimes have the file's fixed scales and run batches of 32.
    size = len(digits.x_test) if runtime == "numpy" else 32
    logits = np.concatenate([runner.run(digits.x_test[i:i + size]) for i in range(0, len(digits.x_test), size)])
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    known = KNOWN.get((runtime, name, bits))
    if known is not None:
        # Measured every run, so an entry that starts to pass (or gets worse) is noticed.
        assert agreement < AGREEMENT, f"{runtime} {name} n={bits} now agrees on {agreement:.1%}: drop it from KNOWN"
        pytest.xfail(f"{runtime} rounds requantization ties away from zero: {agreement:.1%} agreement "
                     f"(docs/export.md: {known} on x86-64)")
    assert agreement >= AGREEMENT, (runtime, name, bits, agreement)
    if bits == 8:
        # One step of the int8 grid that would hold these logits (the engine never rounds them).
        step = 2.0 ** scale_exponent(float(np.abs(reference).max()), 7)
        assert np.abs(logits - reference).max() <= step, (runtime, name, np.abs(logits - reference).max(), step)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("runtime", ["litert", "tflite-runtime"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_fake_quant_file_is_bit_exact_in_every_tflite_runtime(runtime: str, name: str, bits: int, digits,
                                                              tmp_path: Path) -> None:
    # The int8 file disagrees in tflite-runtime 2.14 (its requantization rounds ties away from zero, KNOWN above);
    # the fake-quant file writes the engine's rounding as ROUND (ties to even in TFLite) and must match exactly.
    if not installed(runtime):
        pytest.skip(f"{runtime} is not installed here")
    net = trained(name, bits, digits)
    fmt = integer_format(net, digits.x_train)
    path = export_tflite(net.arch, net.get_weights(), tmp_path / f"{name}{bits}fq.tflite", fmt=fmt, fake_quant=True)
    runner = load(path, runtime)
    logits = np.concatenate([runner.run(digits.x_test[i:i + 32]) for i in range(0, len(digits.x_test), 32)])
    np.testing.assert_array_equal(logits, net.predict(digits.x_test))


def test_fake_quant_needs_the_integer_format(tmp_path: Path) -> None:
    net = Network(get_architecture("mlp"), bits=8, seed=0)
    with pytest.raises(ExportError, match="needs the engine's integer format"):
        export_tflite(net.arch, net.get_weights(), tmp_path / "m.tflite", fake_quant=True)
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_two_bit_file_replays_the_engine_on_its_calibration_batch(name: str, digits, tmp_path: Path) -> None:
    # At n <= 3 the engine picks each activation exponent by least error (edge.lowbit), which depends on the
    # batch's whole distribution, not only its maximum: a file calibrated on the training split then holds
    # other exponents than the engine picks for the test set (docs/export.md). On the calibration batch itself
    # the file must give the engine's logits exactly.
    if not installed("litert"):
        pytest.skip("litert is not installed here")
    net = trained(name, 2, digits)
    batch = digits.x_test
    fmt = integer_format(net, batch)
    path = export_tflite(net.arch, net.get_weights(), tmp_path / f"{name}2.tflite", fmt=fmt)
    logits = load(path, "litert").run(batch)
    np.testing.assert_array_equal(logits, net.predict(batch))


def test_int8_file_holds_int8_weights_and_the_engines_scales(digits, tmp_path: Path) -> None:
    import tflite

    net = Network(get_architecture("cnn"), bits=8, seed=3)
    path = export(net, digits, tmp_path / "cnn8", "tflite")
    model = tflite.Model.GetRootAs(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    tensors = {graph.Tensors(i).Name().decode(): graph.Tensors(i) for i in range(graph.TensorsLength())}
    for name in ("0.weight", "3.weight", "7.weight"):
        assert tensors[name].Type() == tflite.TensorType.INT8
        assert tensors[name].Quantization().ScaleAsNumpy().tolist() in ([2.0 ** -7], [2.0 ** -8])  # 2q at half
    main_scale = tensors["0.weight"].Quantization().ScaleAsNumpy().tolist()[0]
    assert tensors["0.weight.slope"].Quantization().ScaleAsNumpy().tolist() == [main_scale * 0.125]
    assert tensors["0.Conv2D.out"].Type() == tflite.TensorType.INT8
    scale = float(tensors["input.int8"].Quantization().ScaleAsNumpy()[0])
    assert np.log2(scale).is_integer()  # a power of two, as the engine's
    meta = read_metadata(path)
    assert meta["architecture"] == "cnn" and meta["bits"] == 8 and meta["dtype"] == "int8"
    back = read_weights(path, net.arch)
    for key, value in net.get_weights().items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_float_file_above_8_bits_keeps_the_grid(tmp_path: Path) -> None:
    net = Network(get_architecture("mlp-mnist"), bits=12, seed=1)
    path = export_tflite(net.arch, net.get_weights(), tmp_path / "m.tflite", metadata={"qfl.weight_bits": "12"})
    back = read_weights(path, net.arch)
    for key, value in net.get_weights().items():
        assert ((back[key] * 2.0 ** -net.exponents[key]) % 1 == 0).all()
        np.testing.assert_array_equal(back[key], value)
    assert read_metadata(path)["dtype"] == "float32"


def test_layers_tflite_cannot_express_give_one_line_errors(tmp_path: Path) -> None:
    # Leaky ReLU after max-pool: in int8 it would act on an already rounded tensor.
    odd = Architecture("odd", (1, 8, 8), (Conv2D(4), MaxPool(2), LeakyReLU(), Flatten(), Dense(10)))
    net = Network(odd, bits=8, seed=0)
    x = np.random.default_rng(0).random((16, 64), dtype=np.float32)
    with pytest.raises(ExportError, match=r"^layer 2\.LeakyReLU: .*only right after Dense or Conv2D") as info:
        export_tflite(odd, net.get_weights(), tmp_path / "odd.tflite", fmt=integer_format(net, x))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "odd.tflite").exists()
    off_grid = {k: v + 1e-3 for k, v in net.get_weights().items()}
    with pytest.raises(ExportError, match="not on the grid"):
        export_tflite(odd, off_grid, tmp_path / "odd.tflite", fmt=integer_format(net, x))
    # The same architecture is fine in float32 (n > 8).
    export_tflite(odd, net.get_weights(), tmp_path / "odd.tflite")


@pytest.mark.skipif(not (installed("litert") or installed("tflite-runtime")), reason="no TFLite runtime")
def test_strided_unpadded_and_padded_convolutions_match(tmp_path: Path) -> None:
    arch = Architecture("odd", (1, 9, 9), (Conv2D(3, kernel=3, stride=2, padding=0), LeakyReLU(0.25),
                                           Conv2D(5, kernel=2, padding=1), Flatten(), Dense(4)))
    net = Network(arch, bits=8, seed=2)
    x = np.random.default_rng(1).random((40, 1, 9, 9), dtype=np.float32)
    path = export_tflite(arch, net.get_weights(), tmp_path / "odd.tflite", fmt=integer_format(net, x))
    runner, reference = load(path), net.predict(x)
    if runner.name == "litert":  # XNNPACK rounds ties to even, as the engine: bit-exact
        np.testing.assert_array_equal(runner.run(x), reference)
    else:  # reference kernels round ties away from zero: within one step of an int8 grid of the logits
        step = 2.0 ** scale_exponent(float(np.abs(reference).max()), 7)
        assert np.abs(runner.run(x) - reference).max() <= step


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_qfl_edge_infer_prints_predictions_and_accuracy(digits, tmp_path: Path, capsys) -> None:
    net = trained("mlp", 8, digits)
    model = export(net, digits, tmp_path / "mlp8", "tflite")
    data = _npz(tmp_path / "test.npz", x=digits.x_test, y=digits.y_test)
    assert main(["edge", "infer", str(model), "--input", str(data), "--json", "--runtime", "numpy"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected = net.predict(digits.x_test).argmax(1)
    assert result["runtime"] == "numpy" and result["samples"] == len(digits.x_test)
    assert result["accuracy"] == pytest.approx(float((expected == digits.y_test).mean()))
    assert main(["edge", "infer", str(model), "--input", str(_npz(tmp_path / "x.npz", x=digits.x_test[:5]))]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(int(c)) for c in expected[:5]]


@pytest.mark.parametrize("case, message", [
    ("missing", "no input file at"),
    ("no-x", "has no array 'x'"),
    ("shape", "expects inputs of shape"),
    ("labels", "must hold 3 integer labels"),
    ("model", "unknown model type"),
    ("empty", "holds no samples (x has shape (0, 64))"),
    ("non-finite", "x holds 2 non-finite values (NaN or inf)"),
])
def test_qfl_edge_infer_bad_input_is_one_line(case: str, message: str, digits, tmp_path: Path, capsys) -> None:
    model = export(Network(get_architecture("mlp"), bits=8, seed=0), digits, tmp_path / "m", "tflite")
    inputs = {"missing": tmp_path / "none.npz",
              "no-x": _npz(tmp_path / "a.npz", y=np.zeros(3, np.int64)),
              "shape": _npz(tmp_path / "b.npz", x=np.zeros((3, 7), np.float32)),
              "labels": _npz(tmp_path / "c.npz", x=np.zeros((3, 64), np.float32), y=np.zeros(2, np.int64)),
              "model": _npz(tmp_path / "d.npz", x=np.zeros((3, 64), np.float32)),
              "empty": _npz(tmp_path / "e.npz", x=np.zeros((0, 64), np.float32)),
              "non-finite": _npz(tmp_path / "f.npz", x=np.array([[np.nan] + [0.0] * 63, [np.inf] + [0.0] * 63,
                                                                   [0.0] * 64], np.float32))}[case]
    if case == "model":
        model = tmp_path / "m.bin"
        model.write_bytes(b"x")
    assert main(["edge", "infer", str(model), "--input", str(inputs), "--runtime", "numpy"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("name, runtime, content, message", [
    ("fake.onnx", "onnxruntime", b"hello\n", "not an ONNX model (Protobuf parsing failed)"),
    ("fake.tflite", "numpy", b"hello\n", "not a TFLite model (no 'TFL3' flatbuffer identifier)"),
    ("fake.tflite", "auto", b"hello\n", "not a TFLite model (no 'TFL3' flatbuffer identifier)"),
    ("cut.tflite", "numpy", b"\x10\x00\x00\x00TFL3" + b"garbage" * 3, "corrupt TFLite model"),
])
def test_qfl_edge_infer_model_that_is_not_one_is_one_line(name: str, runtime: str, content: bytes, message: str,
                                                          tmp_path: Path, capsys) -> None:
    if runtime == "onnxruntime" and not installed(runtime):
        pytest.skip("onnxruntime is not installed here")
    model = tmp_path / name
    model.write_bytes(content)
    inputs = _npz(tmp_path / "x.npz", x=np.zeros((3, 64), np.float32))
    assert main(["edge", "infer", str(model), "--input", str(inputs), "--runtime", runtime]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qfl edge infer: error: cannot read {model}: ") and message in err
    assert "\n" not in err and "Traceback" not in err
