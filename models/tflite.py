"""Export a trained model to a TFLite flatbuffer without TensorFlow, and read it back.

The file is written with the ``tflite`` package's generated schema classes and
``flatbuffers`` (the ``export`` extra); nothing here imports TensorFlow.

Two kinds of file:

- **int8** (:class:`IntegerFormat` given, n <= 8): fully integer-quantized. The
  float32 input is quantized once (QUANTIZE), every Dense/Conv2D has int8
  weights, an int32 bias and an int8 output, and the logits are float32. Every scale is the power
  of two the fixed-point engine uses, so TFLite's requantization multiplies
  by an exact power of two and rounds once, as the engine does. The last
  layer, whose output the engine never rounds, multiplies its dequantized
  int8 input by its dequantized int8 weights in float32, exactly.
- **float32** (``fmt=None``): the same graph in float32, weights as given
  (the n-bit grid for 8 < n < 32, the float values at 32).
- **fake-quant** (``fmt`` and ``fake_quant=True``, n <= 8): the float32 graph
  with the n-bit grid weights, and before every Dense/Conv2D the engine's
  rounding of its input written out as operators: MUL by ``2**-e``, ROUND
  (ties to even in every TFLite kernel, as in the engine), MAXIMUM/MINIMUM
  to the grid's codes, MUL by ``2**e``. Products and sums of grid values are
  exact in float32 (below ``2**24`` units), so the file replays the engine
  bit for bit in any TFLite runtime, tflite-runtime 2.14's included, whose
  int8 requantization rounds ties the other way. It runs at float32 speed.

What the engine's format is (weight exponents, activation grids) is not known
here: it arrives as an :class:`IntegerFormat`, which ``edge.infer.fixed_format``
reads from a ``Network``. This module only maps a :class:`Grid` onto TFLite's
``real = scale * (q - zero_point)`` (:func:`int8_params`).

Layouts: the input is ``(batch, *arch.input_shape)`` float32, channel-first
like the ONNX file (a TRANSPOSE makes it NHWC before the first Conv2D); the
batch is dynamic (``shape_signature`` -1). A Dense after Flatten of an image
gets its weight rows permuted from channel-major to NHWC order, so no
transpose runs at inference.

Leaky ReLU in int8: the engine applies it to the exact accumulator and rounds
once. TFLite's LEAKY_RELU would act on an already rounded, already clamped
int8 output (two roundings, negatives clipped at -128 before the slope). So a
layer followed by ``LeakyReLU(a)`` is written twice, with the same int8
weights at scales ``s_w`` and ``a * s_w``, both onto the output grid, and
MAXIMUM of the two is ``round(leaky(acc))`` exactly (rounding is monotone).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np

from models.architectures import Architecture, Conv2D, Dense, Flatten, LeakyReLU, MaxPool, ReLU
from models.export import ExportError, _write_whole, check_weights
from models.integer_format import INT8_MAX, INT8_MIN, Grid, IntegerFormat, int8_params

INSTALL_HINT = "pip install 'qfl-testbed[export]'"
METADATA_NAME = "qfl"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def export_tflite(arch: Architecture, weights: Mapping[str, Any], path: str | Path, *,
                  fmt: IntegerFormat | None = None, metadata: Mapping[str, str] | None = None,
                  fake_quant: bool = False) -> Path:
    """Write ``arch`` with ``weights`` (``Network.get_weights`` names and layouts) as a .tflite file at ``path``.

    With ``fmt`` the file is int8 (n <= 8), else float32; with ``fmt`` and
    ``fake_quant`` it is float32 with the grids' rounding as ROUND operators
    (see the module docstring). ``metadata`` goes
    into the file's ``"qfl"`` metadata entry as JSON, beside the architecture
    and precision. Raises :class:`ExportError` naming a layer TFLite cannot
    express, weights off the given grid, or misfitting weights;
    ModuleNotFoundError without the ``tflite``/``flatbuffers`` packages.
    """
    schema, flatbuffers = _schema()
    if not isinstance(arch, Architecture):
        raise ExportError(f"arch must be a models.Architecture (e.g. models.get_architecture('mlp')), got {arch!r}")
    if fake_quant and fmt is None:
        raise ExportError("a fake-quant file needs the engine's integer format (a network at n <= 8)")
    params = check_weights(arch, weights)
    graph = _Graph(schema)
    _lower(arch, params, fmt, graph, fake_quant)
    dtype = "float32 fake-quant" if fake_quant else "int8" if fmt else "float32"
    info = {"architecture": arch.name, "bits": fmt.bits if fmt else None, "dtype": dtype,
            **{str(k): str(v) for k, v in (metadata or {}).items()}}
    if fmt is not None:
        info.update({f"format.{k}": v for k, v in fmt.notes.items()})
    data = graph.serialize(flatbuffers, json.dumps(info, sort_keys=True).encode(),
                           _description(arch, fmt, fake_quant))
    return _write_whole(data, Path(path))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``"qfl"`` metadata of a .tflite file written by :func:`export_tflite` ({} when absent)."""
    schema, _ = _schema()
    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() and entry.Name().decode() == METADATA_NAME:
            return json.loads(bytes(model.Buffers(entry.Buffer()).DataAsNumpy()).decode())
    return {}


def read_weights(path: str | Path, arch: Architecture) -> dict[str, np.ndarray]:
    """The float32 weights of ``arch`` held by a .tflite file :func:`export_tflite` wrote (dequantized).

    Inverse of the export's layouts: tensors named ``"<index>.weight"`` and
    ``"<index>.bias"`` are read, dequantized with their scale and put back
    into ``Network.get_weights`` layouts.
    """
    schema, _ = _schema()
    model = schema.Model.GetRootAs(Path(path).read_bytes(), 0)
    graph = model.Subgraphs(0)
    found: dict[str, np.ndarray] = {}
    for i in range(graph.TensorsLength()):
        tensor = graph.Tensors(i)
        name = tensor.Name().decode()
        if not name.endswith((".weight", ".bias")):
            continue
        raw = model.Buffers(tensor.Buffer()).DataAsNumpy()
        dtype = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.INT8: np.int8,
                 schema.TensorType.INT16: np.int16, schema.TensorType.INT32: np.int32}[tensor.Type()]
        value = np.frombuffer(bytes(raw), dtype=dtype).reshape(tensor.ShapeAsNumpy()).astype(np.float64)
        quant = tensor.Quantization()
        if dtype is not np.float32:
            value = value * float(quant.ScaleAsNumpy()[0])
        found[name] = value
    out: dict[str, np.ndarray] = {}
    for index, layer in enumerate(arch.layers):
        if isinstance(layer, (Dense, Conv2D)):
            w, b = found[f"{index}.weight"], found[f"{index}.bias"]
            if isinstance(layer, Conv2D):
                w = w.transpose(0, 3, 1, 2)  # (F, kh, kw, C) -> (F, C, kh, kw)
            else:
                chw = _flattened_from(arch, index) if _came_through_nhwc(arch, index) else None
                w = _dense_rows_from_tflite(w, chw)
            out[f"{index}.weight"], out[f"{index}.bias"] = w.astype(np.float32), b.astype(np.float32)
    return out


# ---------------------------------------------------------------------------
# Lowering the layer specs onto TFLite operators


def _lower(arch: Architecture, params: dict[str, np.ndarray], fmt: IntegerFormat | None, g: _Graph,
           fake_quant: bool = False) -> None:
    int8 = fmt is not None and not fake_quant
    ops = g.schema.BuiltinOperator
    shape = (1, *arch.input_shape)  # the batch is dynamic; 1 is the placeholder size
    current = g.tensor(INPUT_NAME, shape, "float32")
    g.inputs.append(current)
    layout = "nchw" if len(arch.input_shape) == 3 else "flat"
    quant: tuple[float, int] | None = None  # (scale, zero point) of the current int8 tensor
    layers = list(arch.layers)
    index = 0
    while index < len(layers):
        layer = layers[index]
        name = f"{index}.{type(layer).__name__}"
        if isinstance(layer, (Dense, Conv2D)):
            if int8:
                assert fmt is not None
                grid = fmt.inputs.get(index)
                if grid is None:
                    raise ExportError(f"the integer format has no input grid for layer {name}")
                if quant is None:  # the model input: quantize once
                    quant = int8_params(grid)
                    current = g.op(ops.QUANTIZE, [current], g.tensor("input.int8", shape, "int8", quant))
                elif int8_params(grid) != quant:
                    raise ExportError(f"layer {name}: its input grid {grid} is not the grid the previous layer "
                                      "wrote; insert nothing between them that rescales")
            elif fake_quant:
                assert fmt is not None
                grid = fmt.inputs.get(index)
                if grid is None:
                    raise ExportError(f"the integer format has no input grid for layer {name}")
                current = _round_onto_grid(g, current, shape, grid, name)
            if isinstance(layer, Conv2D) and layout == "nchw":
                shape = (shape[0], shape[2], shape[3], shape[1])
                current = g.op(ops.TRANSPOSE, [current, g.const(f"{name}.perm", np.array([0, 2, 3, 1], np.int32))],
                               g.tensor(f"{name}.nhwc", shape, g.dtype_of(current), quant))
                layout = "nhwc"
            follow = layers[index + 1] if index + 1 < len(layers) else None
            activation = follow if isinstance(follow, (ReLU, LeakyReLU)) else None
            last = index == len(layers) - 1 or (activation is not None and index + 1 == len(layers) - 1)
            current, shape, quant = _parametric(arch, index, layer, activation, last, params,
                                                fmt if int8 else None, g, current, shape, quant, layout)
            index += 2 if activation is not None else 1
            continue
        if isinstance(layer, ReLU):
            current = g.op(ops.RELU, [current], g.tensor(f"{name}.out", shape, g.dtype_of(current), quant))
        elif isinstance(layer, LeakyReLU):
            if int8:
                raise ExportError(f"layer {name}: an int8 TFLite model can express LeakyReLU only right after "
                                  "Dense or Conv2D (elsewhere it would round twice)")
            current = g.op(ops.LEAKY_RELU, [current], g.tensor(f"{name}.out", shape, "float32"),
                           options=("LeakyReluOptions", {"Alpha": float(layer.slope)}))
        elif isinstance(layer, MaxPool):
            if layout != "nhwc":
                raise ExportError(f"layer {name}: MaxPool needs an image input produced by Conv2D")
            s = layer.size
            shape = (shape[0], shape[1] // s, shape[2] // s, shape[3])
            current = g.op(ops.MAX_POOL_2D, [current], g.tensor(f"{name}.out", shape, g.dtype_of(current), quant),
                           options=("Pool2DOptions", {"Padding": g.schema.Padding.VALID, "StrideW": s, "StrideH": s,
                                                      "FilterWidth": s, "FilterHeight": s}))
        elif isinstance(layer, Flatten):
            size = int(np.prod(shape[1:]))
            shape = (shape[0], size)
            current = g.op(ops.RESHAPE, [current, g.const(f"{name}.shape", np.array([-1, size], np.int32))],
                           g.tensor(f"{name}.out", shape, g.dtype_of(current), quant),
                           options=("ReshapeOptions", {"NewShape": [-1, size]}))
            layout = "flat"
        else:
            raise ExportError(f"layer {name} ({layer!r}) has no TFLite operator")
        index += 1
    if g.dtype_of(current) != "float32":
        raise ExportError(f"architecture {arch.name!r} must end with a Dense or Conv2D layer (and its activation)")
    if g.names[current] != OUTPUT_NAME:
        g.names[current] = OUTPUT_NAME
    g.outputs.append(current)


def _parametric(arch: Architecture, index: int, layer: Dense | Conv2D, activation: ReLU | LeakyReLU | None,
                last: bool, params: dict[str, np.ndarray], fmt: IntegerFormat | None, g: _Graph, current: int,
                shape: tuple[int, ...], quant: tuple[float, int] | None,
                layout: str) -> tuple[int, tuple[int, ...], tuple[float, int] | None]:
    """Emit one Dense/Conv2D (with the ReLU or LeakyReLU that follows it); returns (tensor, shape, quant)."""
    ops, schema = g.schema.BuiltinOperator, g.schema
    name = f"{index}.{type(layer).__name__}"
    w, b = params[f"{index}.weight"], params[f"{index}.bias"]
    if isinstance(layer, Conv2D):
        w = w.transpose(0, 2, 3, 1)  # (F, C, kh, kw) -> (F, kh, kw, C), TFLite's OHWI
        k, s, p = layer.kernel, layer.stride, layer.padding
        if p and not (s == 1 and k % 2 == 1 and p == (k - 1) // 2):  # not what SAME pads: pad explicitly
            padded = (shape[0], shape[1] + 2 * p, shape[2] + 2 * p, shape[3])
            pads = np.array([[0, 0], [p, p], [p, p], [0, 0]], np.int32)
            current = g.op(ops.PAD, [current, g.const(f"{name}.pads", pads)],
                           g.tensor(f"{name}.padded", padded, g.dtype_of(current), quant))
            shape, padding = padded, schema.Padding.VALID
        else:
            padding = schema.Padding.SAME if p else schema.Padding.VALID
        oh, ow = (shape[1] - k) // s + 1 if padding == schema.Padding.VALID else shape[1], \
            (shape[2] - k) // s + 1 if padding == schema.Padding.VALID else shape[2]
        out_shape = (shape[0], oh, ow, layer.filters)
        opcode, option_name = ops.CONV_2D, "Conv2DOptions"
        base_options = {"Padding": padding, "StrideW": s, "StrideH": s, "DilationWFactor": 1, "DilationHFactor": 1}
    else:
        w = w.T  # (inputs, units) -> (units, inputs)
        flat = _flattened_from(arch, index)
        if flat is not None and layout == "flat" and _came_through_nhwc(arch, index):
            w = _dense_rows_to_tflite(w, flat)
        out_shape = (shape[0], layer.units)
        opcode, option_name = ops.FULLY_CONNECTED, "FullyConnectedOptions"
        base_options = {}
    relu = isinstance(activation, ReLU)
    fused = schema.ActivationFunctionType.RELU if relu else schema.ActivationFunctionType.NONE
    options = (option_name, {**base_options, "FusedActivationFunction": fused})
    out_name = OUTPUT_NAME if last and fmt is None else f"{name}.out"

    if fmt is None:
        weight = g.const(f"{index}.weight", w.astype(np.float32))
        bias = g.const(f"{index}.bias", b.astype(np.float32))
        out = g.op(opcode, [current, weight, bias], g.tensor(out_name, out_shape, "float32"), options=options)
        if isinstance(activation, LeakyReLU):
            out = g.op(ops.LEAKY_RELU, [out], g.tensor(f"{index + 1}.LeakyReLU.out", out_shape, "float32"),
                       options=("LeakyReluOptions", {"Alpha": float(activation.slope)}))
            if last:
                g.names[out] = OUTPUT_NAME
        return out, out_shape, None

    assert quant is not None
    nxt = _next_parametric(arch, index)
    if nxt is None:
        return _float_logits(index, layer, activation, w, b, fmt, g, current, out_shape, opcode, options)
    out_grid = fmt.inputs.get(nxt)
    if out_grid is None:
        raise ExportError(f"the integer format has no input grid for layer {nxt}, after {name}")
    out_quant = int8_params(out_grid)
    w_exp = fmt.weights.get(index)
    if w_exp is None:
        raise ExportError(f"the integer format has no weight exponent for layer {name}")
    w_scale = 2.0 ** w_exp
    q = _on_grid(w, w_scale, name)
    if q.min(initial=0) >= INT8_MIN // 2 and q.max(initial=0) <= INT8_MAX // 2:
        # Store 2q at half the scale (same real weights): every accumulator is then even. TFLite's
        # gemmlowp-style requantization (tflite-runtime 2.14, the reference kernels) halves it with a
        # rounding doubling high multiply before its rounding shift; on an odd accumulator that rounds twice.
        q, w_scale = (q.astype(np.int16) * 2).astype(np.int8), w_scale / 2
    branches = [(1.0, "")]
    if isinstance(activation, LeakyReLU):
        branches.append((float(activation.slope), ".slope"))  # the negative side: same integers, scaled weights
    outs = []
    for factor, suffix in branches:
        scale = w_scale * factor
        weight = g.const(f"{index}.weight{suffix}", q, (scale, 0))
        bias_scale = quant[0] * scale
        bias_int = np.rint(b.astype(np.float64) * factor / bias_scale)
        if np.abs(bias_int).max(initial=0) >= 2 ** 31:
            raise ExportError(f"layer {name}: the bias does not fit int32 at scale {bias_scale}")
        bias = g.const(f"{index}.bias{suffix}", bias_int.astype(np.int32), (bias_scale, 0))
        outs.append(g.op(opcode, [current, weight, bias],
                         g.tensor(f"{name}.out{suffix}", out_shape, "int8", out_quant), options=options))
    out = outs[0]
    if len(outs) == 2:
        out = g.op(ops.MAXIMUM, outs, g.tensor(f"{index + 1}.LeakyReLU.out", out_shape, "int8", out_quant))
    return out, out_shape, out_quant


def _float_logits(index: int, layer: Dense | Conv2D, activation: ReLU | LeakyReLU | None, w: np.ndarray,
                  b: np.ndarray, fmt: IntegerFormat, g: _Graph, current: int, out_shape: tuple[int, ...],
                  opcode: int, options: tuple[str, dict[str, Any]]) -> tuple[int, tuple[int, ...], None]:
    """The last Dense/Conv2D of an int8 model: int8 weights and input, dequantized, multiplied in float32.

    The engine never rounds its logits (they are the exact accumulator), and an
    int8 output would round them to 256 levels. Every product of an int8 input
    and an int8 weight at power-of-two scales is exact in float32, and so is
    their sum while it stays below 2**24 units of the finest scale, so the
    float32 logits are the engine's.
    """
    ops = g.schema.BuiltinOperator
    name = f"{index}.{type(layer).__name__}"
    w_exp = fmt.weights.get(index)
    if w_exp is None:
        raise ExportError(f"the integer format has no weight exponent for layer {name}")
    w_scale = 2.0 ** w_exp
    x = g.op(ops.DEQUANTIZE, [current], g.tensor(f"{name}.input.float", g.shapes[current], "float32"))
    weight = g.op(ops.DEQUANTIZE, [g.const(f"{index}.weight", _on_grid(w, w_scale, name), (w_scale, 0))],
                  g.tensor(f"{name}.weight.float", w.shape, "float32"))
    bias = g.const(f"{index}.bias", b.astype(np.float32))
    last = OUTPUT_NAME if activation is None or isinstance(activation, ReLU) else f"{name}.out"
    out = g.op(opcode, [x, weight, bias], g.tensor(last, out_shape, "float32"), options=options)
    if isinstance(activation, LeakyReLU):
        out = g.op(ops.LEAKY_RELU, [out], g.tensor(OUTPUT_NAME, out_shape, "float32"),
                   options=("LeakyReluOptions", {"Alpha": float(activation.slope)}))
    return out, out_shape, None


def _round_onto_grid(g: _Graph, current: int, shape: tuple[int, ...], grid: Grid, name: str) -> int:
    """The engine's rounding of a layer input onto ``grid`` as float32 operators: scale, ROUND, clamp, unscale."""
    ops = g.schema.BuiltinOperator

    def step(opcode: int, inputs: list[int], suffix: str, options: tuple[str, dict[str, Any]] | None = None) -> int:
        return g.op(opcode, inputs, g.tensor(f"{name}.grid.{suffix}", shape, "float32"), options=options)

    def scalar(suffix: str, value: float) -> int:
        return g.const(f"{name}.grid.{suffix}", np.array(value, np.float32))

    no_activation = ("MulOptions", {"FusedActivationFunction": g.schema.ActivationFunctionType.NONE})
    t = step(ops.MUL, [current, scalar("inverse_step", 2.0 ** -grid.exponent)], "scaled", no_activation)
    t = step(ops.ROUND, [t], "rounded")
    t = step(ops.MAXIMUM, [t, scalar("low", float(grid.low - grid.zero))], "floored")
    t = step(ops.MINIMUM, [t, scalar("high", float(grid.high - grid.zero))], "codes")
    return step(ops.MUL, [t, scalar("step", 2.0 ** grid.exponent)], "values", no_activation)


def _on_grid(w: np.ndarray, scale: float, name: str) -> np.ndarray:
    """``w / scale`` as int8, checking that the weights sit on that grid."""
    q = np.asarray(w, np.float64) / scale
    rounded = np.rint(q)
    if np.abs(q - rounded).max(initial=0) > 1e-6:
        raise ExportError(f"layer {name}: the weights are not on the grid of step {scale} (put them on the "
                          "grid first, e.g. with Network.set_weights)")
    if rounded.min(initial=0) < INT8_MIN or rounded.max(initial=0) > INT8_MAX:
        raise ExportError(f"layer {name}: weight integers reach {rounded.min()}..{rounded.max()}, beyond int8")
    return rounded.astype(np.int8)


def _next_parametric(arch: Architecture, index: int) -> int | None:
    for later in range(index + 1, len(arch.layers)):
        if isinstance(arch.layers[later], (Dense, Conv2D)):
            return later
    return None


def _flattened_from(arch: Architecture, index: int) -> tuple[int, ...] | None:
    """The (C, H, W) shape a Flatten right before Dense ``index`` flattened, or None."""
    if index == 0 or not isinstance(arch.layers[index - 1], Flatten):
        return None
    before = arch.input_shape if index == 1 else arch.shapes()[index - 2]
    return before if len(before) == 3 else None


def _came_through_nhwc(arch: Architecture, index: int) -> bool:
    """Whether the image flattened before Dense ``index`` was NHWC (a Conv2D ran before it)."""
    return any(isinstance(layer, Conv2D) for layer in arch.layers[:index])


def _dense_rows_to_tflite(w_t: np.ndarray, chw: tuple[int, ...]) -> np.ndarray:
    """A (units, C*H*W) weight with channel-major columns, reordered to the NHWC flatten order."""
    c, h, wd = chw
    return w_t.reshape(-1, c, h, wd).transpose(0, 2, 3, 1).reshape(len(w_t), -1)


def _dense_rows_from_tflite(w_t: np.ndarray, chw: tuple[int, ...] | None) -> np.ndarray:
    """Inverse of the export layout of a Dense weight: back to ``(inputs, units)`` channel-major."""
    if chw is not None:
        c, h, wd = chw
        w_t = w_t.reshape(-1, h, wd, c).transpose(0, 3, 1, 2).reshape(len(w_t), -1)
    return w_t.T


# ---------------------------------------------------------------------------
# The flatbuffer


class _Graph:
    """Tensors, constant buffers and operators of one subgraph, then serialised with the generated schema."""

    def __init__(self, schema: Any) -> None:
        self.schema = schema
        self.names: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.dtypes: list[str] = []
        self.quants: list[tuple[Any, Any, int] | None] = []
        self.buffers: list[bytes] = [b""]  # buffer 0 is the empty buffer by convention
        self.tensor_buffers: list[int] = []
        self.ops: list[tuple[int, list[int], list[int], tuple[str, dict[str, Any]] | None]] = []
        self.opcodes: list[int] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []

    def tensor(self, name: str, shape: tuple[int, ...], dtype: str, quant: tuple[Any, Any] | None = None,
               data: bytes | None = None, axis: int = 0) -> int:
        """Add a tensor; ``quant`` is (scale, zero point), scalars or per-channel lists along ``axis``."""
        self.names.append(name)
        self.shapes.append(tuple(int(s) for s in shape))
        self.dtypes.append(dtype)
        self.quants.append(None if quant is None else (quant[0], quant[1], axis))
        if data is None:
            self.tensor_buffers.append(0)
        else:
            self.buffers.append(data)
            self.tensor_buffers.append(len(self.buffers) - 1)
        return len(self.names) - 1

    def const(self, name: str, value: np.ndarray, quant: tuple[float, int] | None = None) -> int:
        """A constant tensor holding ``value`` (little-endian, its own dtype)."""
        value = np.ascontiguousarray(value)
        return self.tensor(name, value.shape, value.dtype.name, quant, value.astype(value.dtype.newbyteorder("<"))
                           .tobytes())

    def dtype_of(self, tensor: int) -> str:
        return self.dtypes[tensor]

    def op(self, opcode: int, inputs: list[int], output: int,
           options: tuple[str, dict[str, Any]] | None = None) -> int:
        """Add an operator with one output; returns the output tensor."""
        if opcode not in self.opcodes:
            self.opcodes.append(opcode)
        self.ops.append((self.opcodes.index(opcode), inputs, [output], options))
        return output

    def serialize(self, flatbuffers: Any, metadata: bytes, description: str) -> bytes:
        s = self.schema
        b = flatbuffers.Builder(1024)
        types = {"float32": s.TensorType.FLOAT32, "int8": s.TensorType.INT8, "int32": s.TensorType.INT32}

        def ints(start: Callable[[Any, int], None], values: list[int], prepend: str = "PrependInt32") -> int:
            start(b, len(values))
            for v in reversed(values):
                getattr(b, prepend)(v)
            return b.EndVector()

        def table_vector(start: Callable[[Any, int], None], offsets: list[int]) -> int:
            start(b, len(offsets))
            for o in reversed(offsets):
                b.PrependUOffsetTRelative(o)
            return b.EndVector()

        buffer_offsets = []
        for data in [*self.buffers, metadata]:
            vec = b.CreateNumpyVector(np.frombuffer(data, np.uint8)) if data else None
            s.BufferStart(b)
            if vec is not None:
                s.BufferAddData(b, vec)
            buffer_offsets.append(s.BufferEnd(b))

        tensors = []
        for i, name in enumerate(self.names):
            name_off = b.CreateString(name)
            shape = list(self.shapes[i])
            shape_off = ints(s.TensorStartShapeVector, shape)
            dynamic = self.tensor_buffers[i] == 0 and len(shape) > 0
            sig_off = ints(s.TensorStartShapeSignatureVector, [-1, *shape[1:]]) if dynamic else None
            quant_off = None
            if self.quants[i] is not None:
                scale, zero, axis = self.quants[i]
                scales = [float(x) for x in np.atleast_1d(scale)]
                zeros = [int(x) for x in np.atleast_1d(zero)]
                s.QuantizationParametersStartScaleVector(b, len(scales))
                for v in reversed(scales):
                    b.PrependFloat32(v)
                scale_off = b.EndVector()
                zero_off = ints(s.QuantizationParametersStartZeroPointVector, zeros,
                                "PrependInt64")
                s.QuantizationParametersStart(b)
                s.QuantizationParametersAddScale(b, scale_off)
                s.QuantizationParametersAddZeroPoint(b, zero_off)
                s.QuantizationParametersAddQuantizedDimension(b, axis)
                quant_off = s.QuantizationParametersEnd(b)
            s.TensorStart(b)
            s.TensorAddShape(b, shape_off)
            if sig_off is not None:
                s.TensorAddShapeSignature(b, sig_off)
            s.TensorAddType(b, types[self.dtypes[i]])
            s.TensorAddBuffer(b, self.tensor_buffers[i])
            s.TensorAddName(b, name_off)
            if quant_off is not None:
                s.TensorAddQuantization(b, quant_off)
            tensors.append(s.TensorEnd(b))

        operators = []
        for opcode_index, inputs, outputs, options in self.ops:
            in_off = ints(s.OperatorStartInputsVector, inputs)
            out_off = ints(s.OperatorStartOutputsVector, outputs)
            opt_off = self._options(b, options) if options else None
            s.OperatorStart(b)
            s.OperatorAddOpcodeIndex(b, opcode_index)
            s.OperatorAddInputs(b, in_off)
            s.OperatorAddOutputs(b, out_off)
            if opt_off is not None:
                s.OperatorAddBuiltinOptionsType(b, getattr(s.BuiltinOptions, options[0]))
                s.OperatorAddBuiltinOptions(b, opt_off)
            operators.append(s.OperatorEnd(b))

        graph_name = b.CreateString("main")
        tensors_off = table_vector(s.SubGraphStartTensorsVector, tensors)
        inputs_off = ints(s.SubGraphStartInputsVector, self.inputs)
        outputs_off = ints(s.SubGraphStartOutputsVector, self.outputs)
        ops_off = table_vector(s.SubGraphStartOperatorsVector, operators)
        s.SubGraphStart(b)
        s.SubGraphAddTensors(b, tensors_off)
        s.SubGraphAddInputs(b, inputs_off)
        s.SubGraphAddOutputs(b, outputs_off)
        s.SubGraphAddOperators(b, ops_off)
        s.SubGraphAddName(b, graph_name)
        subgraph = s.SubGraphEnd(b)

        codes = []
        for code in self.opcodes:
            s.OperatorCodeStart(b)
            s.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            s.OperatorCodeAddBuiltinCode(b, code)
            s.OperatorCodeAddVersion(b, _OP_VERSIONS.get((code, "int8" in self.dtypes), 1))
            codes.append(s.OperatorCodeEnd(b))

        meta_name = b.CreateString(METADATA_NAME)
        s.MetadataStart(b)
        s.MetadataAddName(b, meta_name)
        s.MetadataAddBuffer(b, len(buffer_offsets) - 1)
        meta = s.MetadataEnd(b)

        desc = b.CreateString(description)
        codes_off = table_vector(s.ModelStartOperatorCodesVector, codes)
        subgraphs_off = table_vector(s.ModelStartSubgraphsVector, [subgraph])
        buffers_off = table_vector(s.ModelStartBuffersVector, buffer_offsets)
        meta_off = table_vector(s.ModelStartMetadataVector, [meta])
        s.ModelStart(b)
        s.ModelAddVersion(b, 3)
        s.ModelAddOperatorCodes(b, codes_off)
        s.ModelAddSubgraphs(b, subgraphs_off)
        s.ModelAddDescription(b, desc)
        s.ModelAddBuffers(b, buffers_off)
        s.ModelAddMetadata(b, meta_off)
        b.Finish(s.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    def _options(self, b: Any, options: tuple[str, dict[str, Any]]) -> int:
        kind, fields = options
        module = self.schema  # the package re-exports every generated function
        vectors = {}
        for key, value in fields.items():
            if isinstance(value, list):
                getattr(module, f"{kind}Start{key}Vector")(b, len(value))
                for v in reversed(value):
                    b.PrependInt32(v)
                vectors[key] = b.EndVector()
        getattr(module, f"{kind}Start")(b)
        for key, value in fields.items():
            getattr(module, f"{kind}Add{key}")(b, vectors.get(key, value))
        return getattr(module, f"{kind}End")(b)


# Operator versions as TFLite's converter marks int8 kernels (float kernels are version 1).
_OP_VERSIONS: dict[tuple[int, bool], int] = {}


def _init_versions(schema: Any) -> None:
    ops = schema.BuiltinOperator
    for code, version in ((ops.CONV_2D, 3), (ops.FULLY_CONNECTED, 4), (ops.MAX_POOL_2D, 2), (ops.RESHAPE, 1),
                          (ops.TRANSPOSE, 2), (ops.QUANTIZE, 2), (ops.DEQUANTIZE, 2), (ops.MAXIMUM, 2),
                          (ops.RELU, 2), (ops.PAD, 2)):
        _OP_VERSIONS[(code, True)] = version


def _schema() -> tuple[Any, Any]:
    """The ``tflite`` generated schema and ``flatbuffers``, or ModuleNotFoundError naming the extra."""
    try:
        import flatbuffers
        import tflite
    except ImportError as exc:
        raise ModuleNotFoundError(f"writing or reading .tflite files needs the tflite and flatbuffers packages "
                                  f"({exc.name} is not installed): {INSTALL_HINT}", name=exc.name) from None
    if not _OP_VERSIONS:
        _init_versions(tflite)
    return tflite, flatbuffers


def _description(arch: Architecture, fmt: IntegerFormat | None, fake_quant: bool = False) -> str:
    if fmt is None:
        kind = "float32"
    elif fake_quant:
        kind = f"float32 with {fmt.bits}-bit fixed-point rounding (fake-quant)"
    else:
        kind = f"int8 ({fmt.bits}-bit fixed point)"
    return f"qfl-testbed model {arch.name!r}, {kind}; input (batch, {', '.join(map(str, arch.input_shape))}) float32"
