"""Reader for the IDX format of MNIST and Fashion-MNIST (raw or gzip-compressed).

Layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions,
then one big-endian uint32 per dimension, then the values in C order.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
          0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class IdxError(ValueError):
    """An IDX file that cannot be read; the message names the file and the problem."""


def read_idx(path: str | Path, *, expect_dims: int | None = None) -> np.ndarray:
    """Read one IDX file (``.gz`` is decompressed) into an array of its declared shape."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IdxError(f"{path}: not a valid gzip file ({exc})") from None
    if len(raw) < 4:
        raise IdxError(f"{path}: truncated: {len(raw)} bytes, an IDX header needs at least 4")
    zero, type_code, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _TYPES:
        raise IdxError(f"{path}: wrong magic number 0x{raw[:4].hex()}; expected 0x0000 then a type code "
                       f"(0x08 for uint8) and the dimension count")
    if expect_dims is not None and dims != expect_dims:
        raise IdxError(f"{path}: has {dims} dimensions, expected {expect_dims}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise IdxError(f"{path}: truncated header: {len(raw)} bytes, need {header}")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    dtype = np.dtype(_TYPES[type_code])
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(raw) - header
    if have < need:
        raise IdxError(f"{path}: truncated data: shape {shape} needs {need} bytes, file has {have}")
    if have > need:
        raise IdxError(f"{path}: {have - need} unexpected bytes after the data of shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        candidate = directory / name
        if candidate.exists():
            return candidate
    raise IdxError(f"{directory}: no file {stem} or {stem}.gz; expected the four MNIST-format IDX files there")


def load_idx_directory(directory: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` and the ``t10k-`` pair.

    Returns ``(x_train, y_train, x_test, y_test)`` with images as uint8 ``(N, H, W)``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise IdxError(f"{directory}: not a directory of MNIST-format IDX files")
    out = []
    for split in ("train", "t10k"):
        images_path = _find(directory, f"{split}-images-idx3-ubyte")
        labels_path = _find(directory, f"{split}-labels-idx1-ubyte")
        images = read_idx(images_path, expect_dims=3)
        labels = read_idx(labels_path, expect_dims=1)
        if len(labels) != len(images):
            raise IdxError(f"{labels_path}: {len(labels)} labels, but {images_path.name} holds {len(images)} images")
        out += [images, labels]
    return out[0], out[1], out[2], out[3]
