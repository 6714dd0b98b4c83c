"""Model architectures as plain data, with the counts the energy model needs.

    >>> from models import get_architecture, counts
    >>> arch = get_architecture("mlp")            # 64-32-10 for 8x8 digits
    >>> counts(arch).params, counts(arch).macs    # d and N_c of the paper
    (2410, 2368)
"""

from models.architectures import (
    ARCHITECTURES,
    Architecture,
    Conv2D,
    Dense,
    Flatten,
    LayerSpec,
    LeakyReLU,
    MaxPool,
    ReLU,
    get_architecture,
)
from models.counts import Counts, counts

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "Conv2D",
    "Counts",
    "Dense",
    "Flatten",
    "LayerSpec",
    "LeakyReLU",
    "MaxPool",
    "ReLU",
    "counts",
    "get_architecture",
]
