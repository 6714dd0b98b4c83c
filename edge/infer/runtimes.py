"""Run an exported model with an inference runtime: LiteRT, tflite-runtime, ONNX Runtime, or qfl's numpy engine.

    >>> runner = load("model.tflite")              # the first installed runtime that runs .tflite  # doctest: +SKIP
    >>> runner.name, runner.run(x).shape
    ('litert', (N, 10))

Every runner takes a float32 batch ``(N, *input_shape)`` (flat samples of the
right size are reshaped) and returns float32 logits ``(N, classes)``. The
runtimes are imported only when asked for, so a device needs just the one it
uses. ``"numpy"`` reads the file's weights and runs them in ``edge.network``'s
fixed-point engine at the file's precision: no runtime at all, but the file
must be one qfl wrote (its metadata names the architecture and precision),
and reading it needs the ``tflite``/``flatbuffers`` packages (pure Python).
"""

from __future__ import annotations

import importlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

# Preference order per file type: the first installed one is used by default.
RUNTIMES = {
    ".tflite": ("litert", "tflite-runtime", "numpy"),
    ".onnx": ("onnxruntime",),
}
MODULES = {"litert": "ai_edge_litert.interpreter", "tflite-runtime": "tflite_runtime.interpreter",
           "onnxruntime": "onnxruntime", "numpy": "numpy"}
INSTALL = {"litert": "pip install ai-edge-litert", "tflite-runtime": "pip install 'tflite-runtime==2.14.*' (numpy < 2)",
           "onnxruntime": "pip install onnxruntime", "numpy": "pip install tflite flatbuffers"}


TFLITE_IDENTIFIER = b"TFL3"
# What the pure-Python flatbuffers reader raises on a truncated or garbled file.
_CORRUPT_FLATBUFFER = (struct.error, IndexError, KeyError, TypeError, ValueError, UnicodeDecodeError)


class RuntimeUnavailable(RuntimeError):
    """The requested runtime is not installed or cannot run this file."""


class ModelUnreadable(ValueError):
    """The file is not a model of the type its suffix names (or is corrupt)."""


@dataclass
class Runner:
    """A loaded model: ``run(x) -> logits`` with the runtime called ``name``."""

    name: str
    input_shape: tuple[int, ...]
    _run: Callable[[np.ndarray], np.ndarray]

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits of the batch ``x`` (N, *input_shape) or (N, features), float32."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim < 1 or (x.shape[1:] != self.input_shape and
                          (x.ndim < 2 or int(np.prod(x.shape[1:])) != int(np.prod(self.input_shape)))):
            raise ValueError(f"the model expects inputs of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {x.shape}")
        return np.asarray(self._run(np.ascontiguousarray(x.reshape(len(x), *self.input_shape))), dtype=np.float32)


def installed(name: str) -> bool:
    """Whether runtime ``name`` can be imported here."""
    try:
        importlib.import_module(MODULES[name])
    except Exception:  # an incompatible build (e.g. numpy 2 under tflite-runtime) fails in other ways too
        return False
    return True


def available(path: str | Path) -> list[str]:
    """The runtimes installed here that run a file like ``path``, in preference order."""
    return [name for name in RUNTIMES.get(Path(path).suffix, ()) if name == "numpy" or installed(name)]


def load(path: str | Path, runtime: str = "auto", *, threads: int = 1) -> Runner:
    """Load the model at ``path`` with ``runtime`` ("auto": the first of :data:`RUNTIMES` installed)."""
    path = Path(path)
    kinds = RUNTIMES.get(path.suffix)
    if kinds is None:
        raise RuntimeUnavailable(f"{path}: unknown model type {path.suffix!r}; give a .tflite or .onnx file")
    if not path.is_file():
        raise RuntimeUnavailable(f"no model file at {path}")
    if path.suffix == ".tflite":
        _check_tflite_identifier(path)
    if runtime == "auto":
        runtime = available(path)[0]
    if runtime not in kinds:
        raise RuntimeUnavailable(f"runtime {runtime!r} does not run {path.suffix} files; choose one of: "
                                 f"{', '.join(kinds)}")
    if runtime != "numpy" and not installed(runtime):
        raise RuntimeUnavailable(f"runtime {runtime!r} is not installed (or does not import here): "
                                 f"{INSTALL[runtime]}")
    if runtime in ("litert", "tflite-runtime"):
        return _tflite(path, runtime, threads)
    if runtime == "onnxruntime":
        return _onnxruntime(path, threads)
    return _numpy(path)


def _check_tflite_identifier(path: Path) -> None:
    """Raise :class:`ModelUnreadable` unless ``path`` starts like a TFLite flatbuffer."""
    with path.open("rb") as handle:
        head = handle.read(8)
    if head[4:8] != TFLITE_IDENTIFIER:
        raise ModelUnreadable(f"cannot read {path}: not a TFLite model (no {TFLITE_IDENTIFIER.decode()!r} "
                              "flatbuffer identifier)")


def _tflite(path: Path, runtime: str, threads: int) -> Runner:
    module = importlib.import_module(MODULES[runtime])
    try:
        interpreter = module.Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError) as exc:  # a file TFLite rejects
        raise RuntimeUnavailable(f"{runtime} cannot load {path}: {str(exc).strip().splitlines()[0]}") from None
    except Exception as exc:  # tflite-runtime 2.14 under numpy 2 imports but fails here (_ARRAY_API not found)
        raise RuntimeUnavailable(f"{runtime} does not work with numpy {np.__version__} here "
                                 f"({type(exc).__name__}); tflite-runtime 2.14 needs numpy < 2") from None
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    state = {"shape": None}

    def run(x: np.ndarray) -> np.ndarray:
        if state["shape"] != x.shape:  # the batch is dynamic: resize, then plan the memory again
            interpreter.resize_tensor_input(source["index"], list(x.shape))
            interpreter.allocate_tensors()
            state["shape"] = x.shape
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(target["index"]).copy()

    return Runner(runtime, tuple(int(s) for s in source["shape"][1:]), run)


def _onnxruntime(path: Path, threads: int) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # ORT's graph optimizations rewrite QuantizeLinear/DequantizeLinear pairs around Gemm (measured on the
    # 8-bit MLP: logits off by up to 0.12, 2.2% of classes changed); unoptimized, the QDQ file is exact.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT's errors (InvalidProtobuf, InvalidGraph, Fail, ...) share no base class
        raise ModelUnreadable(f"cannot read {path}: {_ort_reason(exc)}") from None
    source = session.get_inputs()[0]
    name = source.name
    return Runner("onnxruntime", tuple(int(s) for s in source.shape[1:]),
                  lambda x: session.run(None, {name: x})[0])


def _ort_reason(exc: Exception) -> str:
    """One line saying why ONNX Runtime rejected a file."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    detail = detail.rsplit("failed:", 1)[-1].strip().rstrip(".")
    if type(exc).__name__ == "InvalidProtobuf":
        return f"not an ONNX model ({detail})"
    return f"ONNX Runtime rejects it ({detail})"


def _numpy(path: Path) -> Runner:
    from edge.network import Network
    from models import get_architecture

    arch_name, bits, weights = _read_qfl_model(path)
    arch = get_architecture(arch_name)
    net = Network(arch, bits=bits, seed=0)
    net.set_weights(weights)
    return Runner("numpy", tuple(arch.input_shape), lambda x: net.predict(x).astype(np.float32))


def _read_qfl_model(path: Path) -> tuple[str, int, dict[str, Any]]:
    """Architecture name, precision and weights of a model file qfl wrote."""
    from models import get_architecture

    if path.suffix == ".tflite":
        from models.tflite import read_metadata, read_weights

        try:
            meta = read_metadata(path)
        except ModuleNotFoundError as exc:
            raise RuntimeUnavailable(str(exc)) from None
        except _CORRUPT_FLATBUFFER as exc:
            raise _corrupt(path, exc) from None
        if "architecture" not in meta:
            raise RuntimeUnavailable(f"{path} was not written by qfl export (no qfl metadata); the numpy engine "
                                     "runs only qfl's own models")
        bits = int(meta.get("bits") or meta.get("qfl.weight_bits") or 32)
        arch = get_architecture(meta["architecture"])
        try:
            return meta["architecture"], bits, read_weights(path, arch)
        except _CORRUPT_FLATBUFFER as exc:
            raise _corrupt(path, exc) from None
    raise RuntimeUnavailable(f"the numpy engine runs .tflite files qfl wrote, not {path.suffix}")


def _corrupt(path: Path, exc: Exception) -> ModelUnreadable:
    return ModelUnreadable(f"cannot read {path}: corrupt TFLite model ({type(exc).__name__} in its flatbuffer)")
