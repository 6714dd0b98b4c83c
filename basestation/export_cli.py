"""Export a trained global model to ONNX or TFLite, from a testbed run directory or a basestation store.

    qfl export --run runs/int8 --out int8.onnx                    # the run's newest global model
    qfl export --run runs/int8 --format tflite --out int8.tflite  # int8 TFLite (n <= 8)
    qfl export --run runs/int8 --format tflite --fake-quant --out fq.tflite  # bit-exact in tflite-runtime 2.14
    qfl export --store base.sqlite --experiment exp1 --round 5 --out r5.onnx

The model stored for round R is the one round R starts from, so the model
after the last of N rounds is round N + 1 (the default: the newest stored).
Its architecture is the ``model`` of the experiment's stored config. By
default the weights are put onto the n-bit grid of the round whose
aggregation produced them (rounded to nearest, as the basestation does when
it evaluates that model), so the file holds the model whose accuracy the
store records; the initial model, which no round produced, is exported as
stored. ``--bits N`` picks another grid (32 keeps the stored float32 values).
docs/export.md describes the file and how to run it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.cli import CommandError
from models.export import DEFAULT_OPSET

if TYPE_CHECKING:
    import numpy as np

STORE_NAME = "store.sqlite"  # what 'qfl testbed' writes into a run directory


@dataclass(frozen=True)
class GlobalModel:
    """A stored global model chosen for export: weights already on the grid of ``bits``."""

    experiment: str
    architecture: str
    round: int
    model_hash: str
    bits: int
    weights: dict[str, np.ndarray]
    dataset: str = "digits"
    dataset_seed: int = 0


def configure(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, metavar="RUN_DIR",
                        help="a run directory written by 'qfl testbed' (its store and summary.json)")
    source.add_argument("--store", type=Path, metavar="FILE",
                        help="a basestation store (.sqlite) to read the model from")
    parser.add_argument("--experiment", default=None, metavar="EXP",
                        help="experiment id (default: the one summary.json names, or the store's only one)")
    parser.add_argument("--round", type=int, default=None, metavar="R",
                        help="export the global model round R starts from (default: the newest stored)")
    parser.add_argument("--bits", type=int, default=None, metavar="N",
                        help="put the weights on the N-bit grid (1..32, 32 = stored float32 values; default: the "
                             "precision of the round that produced the model)")
    parser.add_argument("--format", choices=("onnx", "tflite"), default="onnx",
                        help="onnx (float32 graph) or tflite (int8 at n <= 8, float32 above)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset of the exported model")
    parser.add_argument("--qdq", action="store_true",
                        help="onnx at n <= 8: put every Dense/Conv2D input onto its int8 grid with "
                             "QuantizeLinear/DequantizeLinear, as the engine does (default: float activations)")
    parser.add_argument("--fake-quant", action="store_true",
                        help="tflite at n <= 8: a float32 file that rounds every Dense/Conv2D input onto the "
                             "engine's n-bit grid with ROUND operators, bit-exact in every TFLite runtime "
                             "(tflite-runtime 2.14 included) but without int8 speed (default: int8)")
    parser.add_argument("--calibration", type=Path, default=None, metavar="FILE.npz",
                        help="tflite at n <= 8: inputs (array x) that fix the activation scales (default: the "
                             "training split of the experiment's dataset)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write the model")


def run(args: argparse.Namespace) -> int:
    from edge.infer.fixed_format import is_integer_precision
    from models import get_architecture
    from models.export import ExportError, export_onnx

    if args.run is not None:
        store_path, experiment = locate_run(args.run, args.experiment)
    else:
        store_path, experiment = args.store, args.experiment
    _check_options(args)
    model = load_global_model(store_path, experiment, round_=args.round, bits=args.bits)
    if args.qdq and not is_integer_precision(model.bits):
        raise CommandError(f"--qdq needs a model at n <= 8 bits; this one is at {model.bits} bits (drop --qdq)")
    if args.fake_quant and not is_integer_precision(model.bits):
        raise CommandError(f"--fake-quant needs a model at n <= 8 bits; this one is at {model.bits} bits, and its "
                           "tflite file is float32 on that grid already (drop --fake-quant)")
    metadata = {"qfl.experiment": model.experiment, "qfl.round": str(model.round),
                "qfl.model_hash": model.model_hash, "qfl.weight_bits": str(model.bits)}
    try:
        if args.format == "tflite":
            path, kind = _export_tflite(model, args.calibration, args.out, metadata, args.fake_quant)
        else:
            fmt = None
            if args.qdq:
                fmt, metadata = _integer_format(model, args.calibration, metadata)
            path = export_onnx(get_architecture(model.architecture), model.weights, args.out, opset=args.opset,
                               metadata=metadata, fmt=fmt)
            kind = "onnx" if fmt is None else "onnx int8 QDQ"
    except ImportError as exc:
        raise CommandError(str(exc)) from None
    except ExportError as exc:
        raise CommandError(f"cannot export the round {model.round} model of {model.experiment!r}: {exc}") from None
    except OSError as exc:
        raise CommandError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    grid = "float32 weights as stored" if model.bits == 32 else f"weights on the {model.bits}-bit grid"
    which = "the initial global model" if model.round <= 1 else \
        f"the global model after round {model.round - 1} (the one round {model.round} starts from)"
    print(f"experiment {model.experiment!r}, {which} ({model.architecture}, {grid}, {kind}, "
          f"hash {model.model_hash[:12]}): wrote {path} ({path.stat().st_size} bytes)")
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """Refuse option combinations that would be ignored or write a file under a misleading name."""
    if args.fake_quant and args.format != "tflite":
        raise CommandError("--fake-quant is for --format tflite; an ONNX file with the engine's int8 grids is --qdq")
    if args.qdq and args.format != "onnx":
        raise CommandError("--qdq is for --format onnx; the int8 TFLite file has the engine's grids already")
    if args.calibration is not None and args.format == "onnx" and not args.qdq:
        raise CommandError("--calibration fixes activation grids, which only --format tflite and --qdq have")
    if not args.out.name:
        raise CommandError("--out needs a file name")
    suffix = args.out.suffix.lower()
    if suffix in (".onnx", ".tflite") and suffix != f".{args.format}":
        raise CommandError(f"--out {args.out} names a {suffix[1:]} file but --format is {args.format}; "
                           f"'qfl edge infer' picks the runtime by the extension")


def _export_tflite(model: GlobalModel, calibration: Path | None, out: Path, metadata: dict[str, str],
                   fake_quant: bool = False) -> tuple[Path, str]:
    """Write ``model`` as .tflite: int8 at n <= 8 (scales calibrated on ``calibration`` or the dataset), else float32.

    ``fake_quant`` (n <= 8): float32 with the int8 file's grids as ROUND operators instead.
    """
    from models import get_architecture
    from models.tflite import export_tflite

    arch = get_architecture(model.architecture)
    fmt, metadata = _integer_format(model, calibration, metadata)
    kind = "tflite float32" if fmt is None else "tflite float32 fake-quant" if fake_quant else "tflite int8"
    return export_tflite(arch, model.weights, out, fmt=fmt, metadata=metadata, fake_quant=fake_quant), kind


def _integer_format(model: GlobalModel, calibration: Path | None, metadata: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """The engine's grids for ``model`` at n <= 8 (None above), calibrated, and the metadata naming the calibration."""
    from edge.infer.fixed_format import integer_format, is_integer_precision
    from edge.network import Network
    from models import get_architecture

    if not is_integer_precision(model.bits):
        return None, metadata
    arch = get_architecture(model.architecture)
    x = _calibration_inputs(model, calibration)
    net = Network(arch, bits=model.bits, seed=0)
    net.set_weights(model.weights)
    try:
        fmt = integer_format(net, x)
    except ValueError as exc:
        raise CommandError(f"calibration inputs do not fit the {arch.name!r} model: {exc}") from None
    source = str(calibration) if calibration is not None else f"{model.dataset} training split"
    return fmt, {**metadata, "qfl.calibration": f"{source}, {len(x)} samples"}


def _calibration_inputs(model: GlobalModel, calibration: Path | None) -> np.ndarray:
    import numpy as np

    if calibration is None:
        from edge.data.catalog import load_dataset

        try:
            return load_dataset(model.dataset, seed=model.dataset_seed).x_train
        except (ValueError, OSError) as exc:
            raise CommandError(f"cannot load the dataset {model.dataset!r} to calibrate: {exc}; give "
                               "--calibration FILE.npz") from None
    try:
        with np.load(calibration, allow_pickle=False) as data:
            if "x" not in data:
                raise CommandError(f"{calibration} has no array 'x'")
            x = data["x"]
    except FileNotFoundError:
        raise CommandError(f"no calibration file at {calibration}") from None
    except (ValueError, OSError) as exc:
        raise CommandError(f"{calibration} is not an .npz file ({exc})") from None
    if x.dtype.kind not in "fiu" or x.ndim < 2 or len(x) == 0:
        raise CommandError(f"{calibration}: x must be a non-empty numeric batch, got {x.dtype} {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise CommandError(f"{calibration}: x holds {int(np.size(x) - np.isfinite(x).sum())} values that are "
                           "NaN or infinite")
    return x.astype(np.float32)


def locate_run(run_dir: Path, experiment: str | None) -> tuple[Path, str | None]:
    """The store of a run directory and the experiment to export (``experiment``, else summary.json's).

    The store is the file ``summary.json`` names under ``"store"``, else
    ``store.sqlite``, else the directory's only ``*.sqlite``/``*.db`` file.
    """

    if not run_dir.is_dir():
        raise CommandError(f"{run_dir} is not a directory; give the run directory 'qfl testbed' wrote, "
                           "or --store FILE for a store")
    summary = _read_summary(run_dir / "summary.json")
    named = summary.get("store")
    if isinstance(named, str) and named:
        store = run_dir / named
    elif (run_dir / STORE_NAME).is_file():
        store = run_dir / STORE_NAME
    else:
        found = sorted(p for pattern in ("*.sqlite", "*.sqlite3", "*.db") for p in run_dir.glob(pattern) if p.is_file())
        if len(found) != 1:
            raise CommandError(f"{run_dir} holds {len(found)} stores ({', '.join(p.name for p in found) or 'none'}) "
                               f"and no {STORE_NAME}; give --store FILE")
        store = found[0]
    wanted = experiment or summary.get("experiment")
    return store, wanted if isinstance(wanted, str) and wanted else None


def load_global_model(store_path: Path, experiment: str | None = None, *, round_: int | None = None,
                      bits: int | None = None) -> GlobalModel:
    """The global model of ``experiment`` (the store's only one if None) at ``round_`` (newest if None).

    Weights come back on the grid of ``bits``, by default that of the latest
    aggregated round before ``round_`` (32, as stored, for a model no round
    produced). Raises ``edge.cli.CommandError`` naming what is missing.

        >>> m = load_global_model(Path("runs/int8/store.sqlite"))    # doctest: +SKIP
        >>> m.round, m.bits, sorted(m.weights)[:2]
    """
    from basestation.store import Store, StoreError

    if not store_path.is_file():
        raise CommandError(f"no store at {store_path}")
    if store_path.stat().st_size == 0:  # Store() would turn an empty file into a new, empty store
        raise CommandError(f"the store {store_path} is an empty file")
    if bits is not None and not 1 <= bits <= 32:
        raise CommandError(f"--bits must be from 1 to 32, got {bits}")
    try:
        store = Store(store_path, readonly=True)
    except (StoreError, OSError) as exc:
        raise CommandError(f"cannot read the store {store_path}: {exc}") from None
    with store:
        record = _experiment(store, store_path, experiment)
        arch = _architecture_name(record.id, record.config)
        if round_ is None:
            latest = store.latest_model(record.id)
            if latest is None:
                raise CommandError(f"experiment {record.id!r} in {store_path} has no stored model yet")
            round_, model_hash, weights = latest
        else:
            stored = store.model(record.id, round_)
            if stored is None:
                latest = store.latest_model(record.id)
                newest = f"the newest is round {latest[0]}" if latest else "it has none"
                raise CommandError(f"experiment {record.id!r} has no global model for round {round_}; {newest}")
            model_hash, weights = stored
        if bits is None:
            # Abandoned rounds carry the model over unchanged, so the producer is the last aggregated round.
            producers = [r for r in store.rounds(record.id, status="aggregated") if r.round < round_]
            bits = max(producers, key=lambda r: r.round).n if producers else 32
    dataset, seed = record.config.get("dataset", "digits"), record.config.get("dataset_seed", 0)
    return GlobalModel(record.id, arch, round_, model_hash, bits, _on_grid(arch, weights, bits),
                       dataset if isinstance(dataset, str) else "digits", seed if isinstance(seed, int) else 0)


def _experiment(store: Any, store_path: Path, experiment: str | None) -> Any:
    from basestation.report.data import ReportError
    from basestation.report.load import pick_experiment

    try:
        return pick_experiment(store, store_path, experiment, hint="choose one with --experiment")
    except ReportError as exc:
        raise CommandError(str(exc)) from None


def _architecture_name(experiment: str, config: dict[str, Any]) -> str:
    from models import ARCHITECTURES

    name = config.get("model")
    if name not in ARCHITECTURES:
        raise CommandError(f"experiment {experiment!r}'s stored config names the model {name!r}, which is not one "
                           f"of: {', '.join(ARCHITECTURES)}")
    return name


def _on_grid(arch_name: str, weights: dict[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    """``weights`` rounded to nearest onto the n-bit grid by the engine itself (identity at 32 bits)."""
    from edge.network import Network
    from models import get_architecture

    # "int" and "master" mode put values on the grid alike: nearest point, saturating at the ends.
    net = Network(get_architecture(arch_name), bits=bits, mode="int", seed=0)
    try:
        net.set_weights(weights)
    except ValueError as exc:
        raise CommandError(f"the stored weights do not fit the {arch_name!r} model: {exc}") from None
    return net.get_weights()


def _read_summary(path: Path) -> dict[str, Any]:
    from basestation.report.load import read_json_object
    from basestation.report.data import ReportError

    try:
        return read_json_object(path)
    except ReportError as exc:
        raise CommandError(str(exc)) from None
