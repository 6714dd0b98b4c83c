"""Run an exported model on a device: ``qfl edge infer MODEL --input FILE.npz [--json]``.

The model is a .tflite or .onnx file ``qfl export`` wrote (any TFLite/ONNX
classifier with one float32 input works with the runtimes). ``--input`` is an
.npz with an array ``x`` (N, *input_shape) float32 in [0, 1], and optionally
``y`` (N,) labels: a shard from ``qfl partition`` is one. It prints the
predicted classes, and the accuracy when labels are given; ``--json`` prints
one JSON object instead. The runtime is the first installed of LiteRT
(ai-edge-litert), tflite-runtime, ONNX Runtime, or qfl's own numpy engine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CHOICES = ("auto", "litert", "tflite-runtime", "onnxruntime", "numpy")


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``qfl edge infer``."""
    parser.add_argument("model", type=Path, metavar="MODEL", help="the .tflite or .onnx file")
    parser.add_argument("--input", type=Path, required=True, metavar="FILE.npz",
                        help="an .npz with array x (N, ...) and optionally labels y (N,)")
    parser.add_argument("--runtime", choices=CHOICES, default="auto",
                        help="which runtime runs the model (auto: the first installed)")
    parser.add_argument("--batch", type=int, default=256, help="samples per call into the runtime")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Load the model and inputs, predict, print."""
    import numpy as np

    from edge.cli import CommandError
    from edge.infer.runtimes import ModelUnreadable, RuntimeUnavailable, load

    if args.batch < 1:
        raise CommandError(f"--batch must be at least 1, got {args.batch}")
    x, y = _inputs(args.input)
    try:
        runner = load(args.model, args.runtime)
    except (RuntimeUnavailable, ModelUnreadable, ModuleNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    except (ValueError, OSError, RuntimeError) as exc:  # a corrupt or foreign file
        raise CommandError(f"cannot load {args.model}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    try:
        start = time.perf_counter()
        logits = np.concatenate([runner.run(x[i:i + args.batch]) for i in range(0, len(x), args.batch)])
        seconds = time.perf_counter() - start
    except ValueError as exc:
        raise CommandError(f"{args.input}: {exc}") from None
    predictions = logits.argmax(axis=1)
    result = {"model": str(args.model), "runtime": runner.name, "samples": int(len(x)),
              "predictions": predictions.tolist(), "seconds": round(seconds, 6)}
    if y is not None:
        result["accuracy"] = float((predictions == y).mean()) if len(y) else None
    if args.json:
        json.dump(result, sys.stdout)
        print()
        return 0
    print(" ".join(map(str, result["predictions"])))
    summary = f"{runner.name}: {len(x)} samples in {seconds * 1e3:.1f} ms"
    if y is not None and len(y):
        summary += f", accuracy {result['accuracy']:.4f} ({int((predictions == y).sum())}/{len(y)})"
    print(summary, file=sys.stderr)
    return 0


def _inputs(path: Path):
    """``x`` as float32 and ``y`` as int64 (or None) from an .npz file, with one-line errors."""
    import numpy as np

    from edge.cli import CommandError

    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data:
                raise CommandError(f"{path} has no array 'x' (it holds: {', '.join(data.files) or 'nothing'})")
            x, y = data["x"], data["y"] if "y" in data else None
    except FileNotFoundError:
        raise CommandError(f"no input file at {path}") from None
    except (ValueError, OSError) as exc:
        raise CommandError(f"{path} is not an .npz file ({exc})") from None
    if x.dtype.kind not in "fiub" or x.ndim < 2:
        raise CommandError(f"{path}: x must be a numeric batch (N, ...), got dtype {x.dtype} shape {x.shape}")
    if y is not None and (y.shape != (len(x),) or y.dtype.kind not in "iu"):
        raise CommandError(f"{path}: y must hold {len(x)} integer labels, got dtype {y.dtype} shape {y.shape}")
    if len(x) == 0:
        raise CommandError(f"{path} holds no samples (x has shape {x.shape})")
    x = x.astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise CommandError(f"{path}: x holds {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf)")
    return x, None if y is None else y.astype(np.int64)
