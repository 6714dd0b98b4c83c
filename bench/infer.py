"""Inference latency of exported models: qfl's numpy forward against LiteRT, tflite-runtime and ONNX Runtime.

Prints one JSON object. For each model (digits MLP and CNN, trained briefly,
seed 0) and precision n, the model is exported (.tflite int8 at n <= 8 and
float32 above, plus the fake-quant .tflite at n <= 8; .onnx QDQ at n <= 8
and float above) and every installed runtime is timed on one thread:

- ``sample_us``: median time of one call on a single sample;
- ``batch32_us``: median time of one call on a batch of 32 (and
  ``per_sample_in_batch_us`` = that / 32);
- ``ratio_sample`` / ``ratio_batch32``: the numpy forward's time over the
  runtime's, measured in the same run (> 1: the runtime is faster);
- ``agreement``: share of the 449 test images whose predicted class equals
  the numpy forward's on the whole test set, and ``max_logit_diff``.

The runtimes are timed interleaved, round after round, so load on the
machine slows all alike; ``loadavg`` is recorded next to the figures.

    .venv/bin/python bench/infer.py [--rounds 15] [--calls 20] [--models mlp,cnn] [--bits 4,8,16,32]
"""

from __future__ import annotations

import os

# One thread everywhere: the runtimes are given one, and a multi-threaded BLAS under load stalls.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from edge.data import load_dataset  # noqa: E402
from edge.infer.fixed_format import integer_format  # noqa: E402
from edge.infer.runtimes import installed, load  # noqa: E402
from edge.network import Network  # noqa: E402
from edge.trainer import LocalTrainer  # noqa: E402
from models import get_architecture  # noqa: E402
from models.export import export_onnx  # noqa: E402
from models.tflite import export_tflite  # noqa: E402

RUNTIMES = ("litert", "tflite-runtime", "onnxruntime")


def _median_us(fn, x: np.ndarray, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--bits", default="4,8,16,32")
    args = parser.parse_args()
    ds = load_dataset("digits", seed=0)
    present = [r for r in RUNTIMES if installed(r)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for bits in (int(b) for b in args.bits.split(",")):
                net = Network(get_architecture(name), bits=bits, seed=0)
                LocalTrainer(lr=0.1, seed=0).train(net, ds.x_train, ds.y_train, iterations=200)
                fmt = integer_format(net, ds.x_train) if bits <= 8 else None
                files = {"tflite": export_tflite(net.arch, net.get_weights(), Path(tmp, f"{name}{bits}.tflite"),
                                                 fmt=fmt)}
                if "onnxruntime" in present:  # needs onnx (the export extra) to write the file
                    files["onnx"] = export_onnx(net.arch, net.get_weights(), Path(tmp, f"{name}{bits}.onnx"), fmt=fmt)
                if fmt is not None:
                    files["tflite-fake-quant"] = export_tflite(net.arch, net.get_weights(),
                                                               Path(tmp, f"{name}{bits}fq.tflite"), fmt=fmt,
                                                               fake_quant=True)
                runners = {"numpy": lambda x, net=net: net.predict(x)}
                for runtime in present:
                    runners[runtime] = load(files["onnx" if runtime == "onnxruntime" else "tflite"], runtime).run
                    if runtime != "onnxruntime" and fmt is not None:
                        runners[f"{runtime} fake-quant"] = load(files["tflite-fake-quant"], runtime).run
                reference = net.predict(ds.x_test)
                one, batch = ds.x_test[:1], ds.x_test[:32]
                sample = {r: [] for r in runners}
                batched = {r: [] for r in runners}
                for _ in range(args.rounds):
                    for runtime, fn in runners.items():
                        sample[runtime].append(_median_us(fn, one, args.calls))
                        batched[runtime].append(_median_us(fn, batch, args.calls))
                entry = {}
                base_s, base_b = float(np.median(sample["numpy"])), float(np.median(batched["numpy"]))
                for runtime, fn in runners.items():
                    s, b = float(np.median(sample[runtime])), float(np.median(batched[runtime]))
                    size = len(ds.x_test) if runtime == "numpy" else 32
                    logits = np.concatenate([fn(ds.x_test[i:i + size]) for i in range(0, len(ds.x_test), size)])
                    entry[runtime] = {
                        "sample_us": round(s, 1), "batch32_us": round(b, 1),
                        "per_sample_in_batch_us": round(b / 32, 2),
                        "ratio_sample": round(base_s / s, 2), "ratio_batch32": round(base_b / b, 2),
                        "agreement": round(float((logits.argmax(1) == reference.argmax(1)).mean()), 4),
                        "max_logit_diff": float(np.abs(logits - reference).max()),
                    }
                results[f"{name}/n={bits}"] = entry
    import numpy

    print(json.dumps({"bench": "infer", "python": platform.python_version(), "numpy": numpy.__version__,
                      "machine": platform.machine(), "runtimes": ["numpy", *present],
                      "loadavg": [round(v, 2) for v in os.getloadavg()], "threads": 1, "results": results}, indent=1))


if __name__ == "__main__":
    main()
