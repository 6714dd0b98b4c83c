"""ONNX export: the graph, checked and run by onnx's reference evaluator, against the engine; and ``qfl export``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the export extra: pip install 'qfl-testbed[export]'")
from onnx.reference import ReferenceEvaluator  # noqa: E402

from basestation.store import Store  # noqa: E402
from edge.cli import main  # noqa: E402
from edge.network import Network  # noqa: E402
from models import Conv2D, Dense, Flatten, LeakyReLU, MaxPool, ReLU, get_architecture  # noqa: E402
from models.architectures import Architecture  # noqa: E402
from models.export import ExportError, export_onnx, parameter_shapes  # noqa: E402

BATCH = 7


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return ReferenceEvaluator(model).run(None, {"input": x})[0]


def seeded_batch(arch: Architecture, seed: int = 1, size: int = BATCH) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (size, *arch.input_shape)).astype(np.float32)


def float_forward(arch: Architecture, weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Float32 forward of ``arch`` in plain numpy, channel-first, written from the layer definitions."""
    h = x.astype(np.float32)
    for index, layer in enumerate(arch.layers):
        if isinstance(layer, Dense):
            h = h @ weights[f"{index}.weight"] + weights[f"{index}.bias"]
        elif isinstance(layer, Conv2D):
            w, b = weights[f"{index}.weight"], weights[f"{index}.bias"]
            k, s, p = layer.kernel, layer.stride, layer.padding
            padded = np.pad(h, ((0, 0), (0, 0), (p, p), (p, p)))
            oh, ow = (padded.shape[2] - k) // s + 1, (padded.shape[3] - k) // s + 1
            out = np.empty((len(h), layer.filters, oh, ow), np.float32)
            for i in range(oh):
                for j in range(ow):
                    patch = padded[:, :, i * s:i * s + k, j * s:j * s + k]  # (N, C, k, k)
                    out[:, :, i, j] = np.einsum("nckl,fckl->nf", patch, w) + b
            h = out
        elif isinstance(layer, ReLU):
            h = np.maximum(h, 0)
        elif isinstance(layer, LeakyReLU):
            h = np.where(h > 0, h, np.float32(layer.slope) * h)
        elif isinstance(layer, MaxPool):
            n, c, hh, ww = h.shape
            s = layer.size
            h = h.reshape(n, c, hh // s, s, ww // s, s).max(axis=(3, 5))
        elif isinstance(layer, Flatten):
            h = h.reshape(len(h), -1)
    return h


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_float32_export_matches_the_engine(name: str, tmp_path: Path) -> None:
    arch = get_architecture(name)
    net = Network(arch, bits=32, seed=3)
    path = export_onnx(arch, net.get_weights(), tmp_path / f"{name}.onnx")
    x = seeded_batch(arch)
    got = run_onnx(path, x)
    assert got.shape == (BATCH, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, net.predict(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_8_bit_export_holds_the_grid_and_computes_in_float(name: str, tmp_path: Path) -> None:
    arch = get_architecture(name)
    net = Network(arch, bits=8, seed=4)
    weights = net.get_weights()
    path = export_onnx(arch, weights, tmp_path / f"{name}.onnx")

    stored = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert stored.keys() == weights.keys()
    for key, value in weights.items():
        np.testing.assert_array_equal(stored[key], value)
        q = stored[key] * 2.0 ** -net.exponents[key]  # the layer's own 8-bit grid
        assert np.array_equal(q, np.round(q)) and q.min() >= -128 and q.max() <= 127, key

    x = seeded_batch(arch)
    got = run_onnx(path, x)
    np.testing.assert_allclose(got, float_forward(arch, weights, x), rtol=1e-5, atol=1e-5)
    # The engine quantizes activations to 8 bits; the float graph is close to it, not equal.
    engine = Network(arch, bits=8, seed=0)
    engine.set_weights(weights)
    reference = engine.predict(x)
    assert not np.array_equal(got, reference)
    assert np.abs(got - reference).max() < 0.1 * np.abs(reference).max()


def test_strided_unpadded_conv_and_leaky_slope(tmp_path: Path) -> None:
    arch = Architecture("odd", (2, 9, 9), (Conv2D(4, kernel=3, stride=2, padding=0), LeakyReLU(0.25),
                                           Conv2D(3, kernel=2, stride=1, padding=1), ReLU(), MaxPool(5),
                                           Flatten(), Dense(6), LeakyReLU(0.5), Dense(5)))
    net = Network(arch, bits=32, seed=5)
    x = seeded_batch(arch, seed=2) - 0.5
    got = run_onnx(export_onnx(arch, net.get_weights(), tmp_path / "odd.onnx", opset=11), x)
    np.testing.assert_allclose(got, net.predict(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, float_forward(arch, net.get_weights(), x), rtol=1e-5, atol=1e-5)


def test_graph_interface_batch_is_dynamic(tmp_path: Path) -> None:
    arch = get_architecture("cnn")
    net = Network(arch, bits=32, seed=6)
    path = export_onnx(arch, net.get_weights(), tmp_path / "cnn.onnx", metadata={"qfl.round": 4})
    model = onnx.load(str(path))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "logits"
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 1, 8, 8]
    assert {p.key: p.value for p in model.metadata_props} == {"qfl.architecture": "cnn", "qfl.round": "4"}
    assert model.opset_import[0].version == 17
    for size in (1, 33):
        x = seeded_batch(arch, seed=size, size=size)
        np.testing.assert_allclose(run_onnx(path, x), net.predict(x), rtol=1e-5, atol=1e-5)


def test_bad_weights_and_opset_are_named(tmp_path: Path) -> None:
    arch = get_architecture("mlp")
    weights = Network(arch, bits=8, seed=0).get_weights()
    assert {k: v.shape for k, v in weights.items()} == parameter_shapes(arch)
    with pytest.raises(ExportError, match=r"missing \['2.bias'\]"):
        export_onnx(arch, {k: v for k, v in weights.items() if k != "2.bias"}, tmp_path / "a.onnx")
    with pytest.raises(ExportError, match=r"'0.weight' of 'mlp' must have shape \(64, 32\), got \(32, 64\)"):
        export_onnx(arch, {**weights, "0.weight": weights["0.weight"].T}, tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="not finite"):
        export_onnx(arch, {**weights, "2.bias": np.full(10, np.nan)}, tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="opset must be an integer from 11"):
        export_onnx(arch, weights, tmp_path / "a.onnx", opset=9)
    assert not list(tmp_path.iterdir())


def test_export_without_onnx_names_the_extra(tmp_path: Path) -> None:
    # A child interpreter in which 'import onnx' fails, as on a machine without the extra.
    code = ("import sys; sys.modules['onnx'] = None\n"
            "from models import get_architecture\n"
            "from models.export import export_onnx\n"
            "try:\n"
            f"    export_onnx(get_architecture('mlp'), {{}}, {str(tmp_path / 'x.onnx')!r})\n"
            "except ModuleNotFoundError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'qfl-testbed[export]'" in out


def test_edge_never_imports_onnx() -> None:
    code = ("import sys, json, edge.network, edge.trainer, edge.cli, edge.runtime.cli\n"
            "print(json.dumps([m for m in sys.modules if m == 'models.export' or m.split('.')[0] == 'onnx']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
    importing = re.compile(r"^\s*(import|from)\s+(onnx|models\.export)\b|import_module\(.(onnx|models\.export)", re.M)
    for path in Path(__file__).resolve().parents[1].joinpath("edge").rglob("*.py"):
        assert not importing.search(path.read_text(encoding="utf-8")), path


# ---- qfl export on real stores ----

def make_store(path: Path, experiment: str, model: str, rounds: list[tuple[int, str]]) -> dict[int, dict]:
    """A store with the initial model (round 1) and ``rounds`` = [(n, status), ...] closed after it."""
    arch = get_architecture(model)
    models = {1: Network(arch, bits=32, seed=10).get_weights()}
    with Store(path) as store, store.transaction():
        store.create_experiment(experiment, {"model": model, "seed": 10})
        store.save_model(experiment, 1, "00" * 32, models[1])
        for number, (n, status) in enumerate(rounds, start=1):
            store.open_round(experiment, number, selected=["pi-1"], n=n, m=n, deadline=0.0, quorum=1,
                             model_hash=f"{number:064x}", plan={"round": number, "n": n})
            # Off any grid, like a FedAvg result: the exporter must put it on the round's grid.
            noise = np.random.default_rng(number).normal(0, 0.01, size=1)[0]
            new = models[number] if status == "abandoned" else {k: v + np.float32(noise) for k, v in
                                                                models[number].items()}
            store.close_round(experiment, number, status, result_hash=f"{number + 1:064x}")
            models[number + 1] = new
            store.save_model(experiment, number + 1, f"{number + 1:064x}", new)
    return models


def on_grid(model: str, weights: dict, bits: int) -> dict:
    net = Network(get_architecture(model), bits=bits, seed=0)
    net.set_weights(weights)
    return net.get_weights()


def test_qfl_export_of_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    models = make_store(run_dir / "store.sqlite", "exp-cnn", "cnn", [(8, "aggregated"), (6, "abandoned")])
    (run_dir / "summary.json").write_text(json.dumps({"experiment": "exp-cnn", "store": "store.sqlite"}))
    out = tmp_path / "out" / "cnn.onnx"

    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "global model after round 2 (the one round 3 starts from)" in printed and "8-bit grid" in printed and str(out) in printed
    # Round 3 starts from round 1's aggregate (round 2 was abandoned): on round 1's 8-bit grid.
    expected = on_grid("cnn", models[3], 8)
    assert not np.array_equal(expected["0.weight"], models[3]["0.weight"])
    arch = get_architecture("cnn")
    x = seeded_batch(arch, seed=9)
    np.testing.assert_allclose(run_onnx(out, x), float_forward(arch, expected, x), rtol=1e-5, atol=1e-5)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props == {"qfl.architecture": "cnn", "qfl.experiment": "exp-cnn", "qfl.round": "3",
                     "qfl.model_hash": f"{3:064x}", "qfl.weight_bits": "8"}


def test_qfl_export_of_a_store_by_round_and_bits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "base.sqlite"
    models = make_store(store, "exp-mlp", "mlp", [(4, "aggregated"), (8, "aggregated")])
    with Store(store) as s:
        s.create_experiment("other", {"model": "cnn"})
    arch = get_architecture("mlp")
    x = seeded_batch(arch, seed=11)
    cases = [([], 3, 8), (["--round", "2"], 2, 4), (["--round", "1"], 1, 32), (["--round", "3", "--bits", "32"], 3, 32)]
    for extra, round_, bits in cases:
        out = tmp_path / f"r{round_}-{bits}.onnx"
        assert main(["export", "--store", str(store), "--experiment", "exp-mlp", *extra, "--out", str(out)]) == 0
        capsys.readouterr()
        expected = on_grid("mlp", models[round_], bits) if bits < 32 else models[round_]
        np.testing.assert_allclose(run_onnx(out, x), float_forward(arch, expected, x), rtol=1e-5, atol=1e-5,
                                   err_msg=f"round {round_} at {bits} bits")


def test_qfl_export_errors_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "base.sqlite"
    make_store(store, "a", "mlp", [(8, "aggregated")])
    with Store(store) as s:
        s.create_experiment("b", {"model": "resnet"})
        s.save_model("b", 1, "00" * 32, {"w": np.zeros(3, np.float32)})
    (tmp_path / "empty.sqlite").touch()
    out = str(tmp_path / "x.onnx")
    cases = [
        (["--store", str(store)], "holds 2 experiments (a, b); choose one with --experiment"),
        (["--store", str(store), "--experiment", "c"], "has no experiment 'c'; it has: a, b"),
        (["--store", str(store), "--experiment", "a", "--round", "7"],
         "no global model for round 7; the newest is round 2"),
        (["--store", str(store), "--experiment", "a", "--bits", "0"], "--bits must be from 1 to 32, got 0"),
        (["--store", str(store), "--experiment", "a", "--opset", "5"], "opset must be an integer from 11"),
        (["--store", str(store), "--experiment", "b"], "names the model 'resnet', which is not one of"),
        (["--store", str(tmp_path / "nope.sqlite")], "no store at"),
        (["--store", str(tmp_path / "empty.sqlite")], "is an empty file"),
        (["--run", str(tmp_path / "missing")], "is not a directory"),
        (["--run", str(tmp_path)], "holds 2 stores (base.sqlite, empty.sqlite)"),
    ]
    for args, message in cases:
        assert main(["export", *args, "--out", out]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("qfl export: error: ") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1
    assert not Path(out).exists() and not (tmp_path / "nope.sqlite").exists()


def test_qfl_export_refuses_options_it_would_ignore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "base.sqlite"
    make_store(store, "a", "mlp", [(8, "aggregated")])
    calibration = tmp_path / "c.npz"
    np.savez(calibration, x=np.zeros((2, 64), np.float32))
    cases = [
        (["--out", str(tmp_path / "m.tflite")], "names a tflite file but --format is onnx"),
        (["--format", "tflite", "--out", str(tmp_path / "m.onnx")], "names a onnx file but --format is tflite"),
        (["--format", "tflite", "--qdq", "--out", str(tmp_path / "m.tflite")], "--qdq is for --format onnx"),
        (["--calibration", str(calibration), "--out", str(tmp_path / "m.onnx")],
         "only --format tflite and --qdq have"),
        (["--bits", "16", "--qdq", "--out", str(tmp_path / "m.onnx")], "--qdq needs a model at n <= 8 bits"),
        (["--out", ""], "--out needs a file name"),
    ]
    for args, message in cases:
        assert main(["export", "--store", str(store), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("qfl export: error: ") and message in err, (args, err)
    assert not [p.name for p in tmp_path.iterdir() if p.suffix in (".onnx", ".tflite")]


def test_qfl_export_console_script(tmp_path: Path) -> None:
    store = tmp_path / "base.sqlite"
    make_store(store, "exp", "mlp", [(8, "aggregated")])
    out = tmp_path / "m.onnx"
    done = subprocess.run([sys.executable, "-m", "edge.cli", "export", "--store", str(store), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "global model after round 1 (the one round 2 starts from)" in done.stdout
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def store_with_calibration(tmp_path: Path) -> tuple[Path, dict, np.ndarray, Path]:
    """A store whose round 2 model came from an 8-bit round and round 3's from a 16-bit one, and 64 inputs."""
    from edge.data import load_dataset

    store = tmp_path / "s.sqlite"
    models = make_store(store, "exp", "mlp", [(8, "aggregated"), (16, "aggregated")])
    x = load_dataset("digits", seed=0).x_test[:64]
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=x)
    return store, models, x, calibration


def assert_file_holds_and_replays(path: Path, weights: dict, x: np.ndarray) -> Network:
    """The .tflite file at ``path`` holds ``weights`` exactly and computes the 8-bit engine's logits on ``x``."""
    from edge.infer.runtimes import load
    from models.tflite import read_weights

    net = Network(get_architecture("mlp"), bits=8, seed=0)
    net.set_weights(weights)
    for key, value in net.get_weights().items():
        np.testing.assert_array_equal(read_weights(path, net.arch)[key], value)
    np.testing.assert_array_equal(load(path, "numpy").run(x), net.predict(x))
    return net


def test_qfl_export_tflite_and_qdq_onnx_of_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tflite")
    from models.tflite import read_metadata

    store, models, x, calibration = store_with_calibration(tmp_path)
    # Round 2's model came from an 8-bit round: int8, scales calibrated on the given inputs.
    out = tmp_path / "r2.tflite"
    assert main(["export", "--store", str(store), "--round", "2", "--format", "tflite", "--calibration",
                 str(calibration), "--out", str(out)]) == 0
    assert "tflite int8" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["dtype"] == "int8" and meta["qfl.round"] == "2" and meta["qfl.calibration"] == f"{calibration}, 64 samples"
    net = assert_file_holds_and_replays(out, models[2], x)
    # The newest (from a 16-bit round) is float32 on the 16-bit grid; the default calibration is not needed.
    assert main(["export", "--store", str(store), "--format", "tflite", "--out", str(tmp_path / "r3.tflite")]) == 0
    assert "tflite float32" in capsys.readouterr().out
    # ONNX with --qdq: QuantizeLinear/DequantizeLinear before each Dense, calibrated on the dataset's train split.
    qdq = tmp_path / "r2.onnx"
    assert main(["export", "--store", str(store), "--round", "2", "--qdq", "--opset", "19", "--out", str(qdq)]) == 0
    ops = [node.op_type for node in onnx.load(str(qdq)).graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2
    assert (run_onnx(qdq, x).argmax(1) == net.predict(x).argmax(1)).mean() >= 0.95


def test_qfl_export_tflite_fake_quant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tflite")
    from models.tflite import read_metadata

    store, models, x, calibration = store_with_calibration(tmp_path)
    out = tmp_path / "fq.tflite"
    assert main(["export", "--store", str(store), "--round", "2", "--format", "tflite", "--fake-quant",
                 "--calibration", str(calibration), "--out", str(out)]) == 0
    assert "tflite float32 fake-quant" in capsys.readouterr().out
    meta = read_metadata(out)
    assert meta["dtype"] == "float32 fake-quant" and meta["bits"] == 8
    assert_file_holds_and_replays(out, models[2], x)
    # Where it does not apply: one line each, nothing written.
    for args, message in ((["--format", "onnx", "--fake-quant"], "--fake-quant is for --format tflite"),
                          (["--format", "tflite", "--fake-quant"], "needs a model at n <= 8 bits; this one is at 16")):
        target = tmp_path / "no.tflite"
        assert main(["export", "--store", str(store), *args, "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and not target.exists()


def test_qfl_export_tflite_bad_calibration_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tflite")
    store = tmp_path / "s.sqlite"
    make_store(store, "exp", "mlp", [(8, "aggregated")])
    bad = tmp_path / "bad.npz"
    np.savez(bad, y=np.zeros(3))
    not_finite = tmp_path / "nan.npz"
    np.savez(not_finite, x=np.array([[np.nan] * 64, [np.inf] * 64, [0.5] * 64], np.float32))
    for calibration, message in ((bad, "has no array 'x'"), (tmp_path / "none.npz", "no calibration file"),
                                 (not_finite, "x holds 128 values that are NaN or infinite")):
        assert main(["export", "--store", str(store), "--format", "tflite", "--calibration", str(calibration),
                     "--out", str(tmp_path / "m.tflite")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert not (tmp_path / "m.tflite").exists()
