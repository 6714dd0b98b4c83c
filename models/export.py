"""Export a trained model to ONNX: the architecture's layers as standard operators, the weights as initialisers.

    >>> from edge.network import Network
    >>> from models import get_architecture
    >>> arch = get_architecture("cnn")
    >>> export_onnx(arch, Network(arch, bits=8).get_weights(), "cnn.onnx")  # doctest: +SKIP
    PosixPath('cnn.onnx')

The graph takes ``"input"``, float32 of shape ``(batch, *arch.input_shape)``
(channel-first images, the batch dimension left symbolic), and gives
``"logits"``, float32 ``(batch, classes)``. Each layer spec becomes one
operator: Dense -> Gemm, Conv2D -> Conv (zero padding, stride), ReLU ->
Relu, LeakyReLU -> LeakyRelu, MaxPool -> MaxPool, Flatten -> Flatten. The
layouts are those of ``edge.network.Network.get_weights``: a Dense weight is
``(inputs, units)`` (``y = x W + b``, so Gemm needs no transpose), a Conv2D
weight ``(filters, channels, k, k)`` as ONNX has it, and Flatten orders
features channel-major, as the engine does.

Numerics: the weights are written as the float32 values they are given.
Weights of an n-bit network (``Network(...).get_weights()`` in "int" mode, or
``get_weights(quantized=True)`` in "master" mode) are dequantized grid values
``q * 2**-(n-1)``; for n <= 24 every one of them is exactly a float32, so the
exported weights sit exactly on the n-bit grid. Activations are not
quantized: the exported graph computes in float32, where the fixed-point
engine puts each Dense/Conv2D input onto the n-bit grid (see docs/export.md).

``onnx`` is imported only inside :func:`export_onnx`; it is the ``export``
extra (``pip install 'qfl-testbed[export]'``) and never needed on a device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.architectures import Architecture, Conv2D, Dense, Flatten, LeakyReLU, MaxPool, ReLU

DEFAULT_OPSET = 17
MIN_OPSET = 11  # Gemm with an optional, broadcast C and today's MaxPool/Conv attributes
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INSTALL_HINT = "pip install 'qfl-testbed[export]'"


class ExportError(ValueError):
    """The architecture or weights cannot be exported (names, shapes, values or opset)."""


def parameter_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the parameters of ``arch``, as ``Network.get_weights`` gives them.

        >>> from models import get_architecture
        >>> parameter_shapes(get_architecture("mlp"))
        {'0.weight': (64, 32), '0.bias': (32,), '2.weight': (32, 10), '2.bias': (10,)}
    """
    shapes: dict[str, tuple[int, ...]] = {}
    shape = arch.input_shape
    for index, (layer, out_shape) in enumerate(zip(arch.layers, arch.shapes())):
        if isinstance(layer, Dense):
            shapes[f"{index}.weight"] = (shape[0], layer.units)
            shapes[f"{index}.bias"] = (layer.units,)
        elif isinstance(layer, Conv2D):
            shapes[f"{index}.weight"] = (layer.filters, shape[0], layer.kernel, layer.kernel)
            shapes[f"{index}.bias"] = (layer.filters,)
        shape = out_shape
    return shapes


def check_weights(arch: Architecture, weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``weights`` as float32 arrays in layer order, after checking names, shapes and values against ``arch``.

    Raises :class:`ExportError` naming what is missing, unexpected, misshapen or not finite.
    """
    if not isinstance(weights, Mapping):
        raise ExportError(f"weights must be a mapping of name -> array, got {type(weights).__name__}")
    expected = parameter_shapes(arch)
    missing = [name for name in expected if name not in weights]
    extra = [name for name in weights if name not in expected]
    if missing or extra:
        raise ExportError(f"weights do not match architecture {arch.name!r}: missing {missing or 'none'}, "
                          f"unexpected {extra or 'none'}")
    checked = {}
    for name, shape in expected.items():
        value = np.asarray(weights[name])
        if value.dtype.kind not in "fiu":
            raise ExportError(f"weight {name!r} must hold numbers, got dtype {value.dtype}")
        if value.shape != shape:
            raise ExportError(f"weight {name!r} of {arch.name!r} must have shape {shape}, got {value.shape}")
        value = value.astype(np.float32)
        if not np.all(np.isfinite(value)):
            raise ExportError(f"weight {name!r} holds values that are not finite in float32")
        checked[name] = value
    return checked


def export_onnx(arch: Architecture, weights: Mapping[str, Any], path: str | Path, *, opset: int = DEFAULT_OPSET,
                metadata: Mapping[str, str] | None = None, fmt: Any = None) -> Path:
    """Write ``arch`` with ``weights`` (names and layouts of ``Network.get_weights``) as an ONNX model at ``path``.

    The weights are stored as given, in float32: pass the dequantized grid
    values of an n-bit network and the model holds exactly that grid (n <= 24).
    ``opset`` is the ONNX default-domain opset (``MIN_OPSET`` up to what the
    installed onnx knows); the model's IR version is the oldest that opset
    allows, so older runtimes load it. ``metadata`` goes into the model's
    metadata properties (e.g. experiment and round). The model is checked
    with ``onnx.checker`` before it is written; the file appears whole or not
    at all. Returns the path written.

        >>> export_onnx(get_architecture("mlp"), net.get_weights(), "mlp.onnx", opset=13)  # doctest: +SKIP

    With ``fmt`` (a ``models.integer_format.IntegerFormat``, n <= 8) the
    input of every Dense/Conv2D passes a QuantizeLinear/DequantizeLinear pair
    onto its int8 grid (QDQ), so the float graph computes what the
    fixed-point engine does: ONNX rounds to nearest, ties to even, like the
    engine, and every product and sum that follows is exact in float32.

    Raises :class:`ExportError` for weights that do not fit ``arch`` or an
    unsupported opset, and ModuleNotFoundError when onnx is not installed.
    """
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise ModuleNotFoundError(f"exporting to ONNX needs the onnx package, which is not installed: {INSTALL_HINT}",
                                  name="onnx") from None
    if not isinstance(arch, Architecture):
        raise ExportError(f"arch must be a models.Architecture (e.g. models.get_architecture('mlp')), got {arch!r}")
    if not arch.layers:
        raise ExportError(f"architecture {arch.name!r} has no layers to export")
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset must be an integer from {MIN_OPSET} to {newest} (the newest this onnx "
                          f"{onnx.__version__} knows), got {opset!r}")
    params = check_weights(arch, weights)

    nodes, initializers = [], []
    current = INPUT_NAME
    last = len(arch.layers) - 1
    for index, layer in enumerate(arch.layers):
        out = OUTPUT_NAME if index == last else f"{index}.out"
        if fmt is not None and isinstance(layer, (Dense, Conv2D)):
            current = _qdq(fmt, index, current, nodes, initializers, helper, numpy_helper)
        inputs = [current]
        if isinstance(layer, (Dense, Conv2D)):
            for suffix in ("weight", "bias"):
                name = f"{index}.{suffix}"
                initializers.append(numpy_helper.from_array(params[name], name))
                inputs.append(name)
        nodes.append(helper.make_node(_operator(layer), inputs, [out], name=f"{index}.{type(layer).__name__}",
                                      **_attributes(layer)))
        current = out

    graph = helper.make_graph(
        nodes, f"qfl_{arch.name}".replace("-", "_"),
        [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["batch", *arch.input_shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", *arch.shapes()[-1]])],
        initializer=initializers)
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="qfl-testbed",
                              producer_version=_version(), doc_string=_doc_string(arch))
    model.ir_version = helper.find_min_ir_version_for(opsets)
    helper.set_model_props(model, {"qfl.architecture": arch.name, **{str(k): str(v) for k, v in
                                                                      (metadata or {}).items()}})
    onnx.checker.check_model(model, full_check=True)
    return _write_whole(model.SerializeToString(), Path(path))


def _qdq(fmt: Any, index: int, current: str, nodes: list, initializers: list, helper: Any,
         numpy_helper: Any) -> str:
    """Append QuantizeLinear -> DequantizeLinear putting ``current`` onto layer ``index``'s input grid."""
    from models.integer_format import int8_params

    grid = fmt.inputs.get(index)
    if grid is None:
        raise ExportError(f"the integer format has no input grid for layer {index}")
    scale, zero = int8_params(grid)
    names = (f"{index}.input.scale", f"{index}.input.zero_point")
    initializers.append(numpy_helper.from_array(np.array(scale, np.float32), names[0]))
    initializers.append(numpy_helper.from_array(np.array(zero, np.int8), names[1]))
    nodes.append(helper.make_node("QuantizeLinear", [current, *names], [f"{index}.input.q"], name=f"{index}.quantize"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{index}.input.q", *names], [f"{index}.input.dq"],
                                  name=f"{index}.dequantize"))
    return f"{index}.input.dq"


def _operator(layer: object) -> str:
    """The ONNX operator type of one layer spec."""
    for spec, op in ((Dense, "Gemm"), (Conv2D, "Conv"), (ReLU, "Relu"), (LeakyReLU, "LeakyRelu"),
                     (MaxPool, "MaxPool"), (Flatten, "Flatten")):
        if isinstance(layer, spec):
            return op
    raise ExportError(f"no ONNX operator for layer spec {layer!r}")


def _attributes(layer: object) -> dict[str, Any]:
    """ONNX attributes of one layer spec (Gemm's defaults, alpha = beta = 1 and no transpose, are ours)."""
    if isinstance(layer, Conv2D):
        k, s, p = layer.kernel, layer.stride, layer.padding
        return {"kernel_shape": [k, k], "strides": [s, s], "pads": [p, p, p, p]}
    if isinstance(layer, LeakyReLU):
        return {"alpha": float(layer.slope)}
    if isinstance(layer, MaxPool):
        return {"kernel_shape": [layer.size, layer.size], "strides": [layer.size, layer.size]}
    if isinstance(layer, Flatten):
        return {"axis": 1}
    return {}


def _doc_string(arch: Architecture) -> str:
    shape, out = (", ".join(map(str, s)) for s in (arch.input_shape, arch.shapes()[-1]))
    return (f"qfl-testbed model {arch.name!r}: input (batch, {shape}) float32, output logits (batch, "
            f"{out}). Weights are the trained values in float32 (the dequantized n-bit grid); "
            "activations are computed in float.")


def _write_whole(data: bytes, path: Path) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it, so no half-written model is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qfl-testbed")
    except PackageNotFoundError:
        return "unknown"
