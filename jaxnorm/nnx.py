"""Flax ``nnx`` modules: drop-in replacements for ``flax.nnx``'s normalization layers.

Each class subclasses its ``flax.nnx`` namesake (``isinstance`` and Flax's
type filters treat it as Flax's) and replaces only ``__call__``, a thin shell
over the functional core in :mod:`jaxnorm`. README, "Differences from Flax",
lists every deliberate difference. This module imports none of
jaxnorm's linen code.
"""

from jaxnorm._src.nnx_modern import AdaIN
from jaxnorm._src.nnx_modern import AdaLNZero
from jaxnorm._src.nnx_modern import ConditionalBatchNorm
from jaxnorm._src.nnx_modern import DyT
from jaxnorm._src.nnx_modern import FiLM
from jaxnorm._src.nnx_modern import FilterResponseNorm
from jaxnorm._src.nnx_modern import QKNorm
from jaxnorm._src.nnx_modern import QKNormAttention
from jaxnorm._src.nnx_modern import StdConv
from jaxnorm._src.nnx_modern import WeightStandardization
from jaxnorm._src.nnx_modern import precise_batch_stats
from jaxnorm._src.nnx_norm import BatchNorm
from jaxnorm._src.nnx_norm import BatchRenorm
from jaxnorm._src.nnx_norm import GroupNorm
from jaxnorm._src.nnx_norm import InstanceNorm
from jaxnorm._src.nnx_norm import LayerNorm
from jaxnorm._src.nnx_norm import RMSNorm
from jaxnorm._src.nnx_wrappers import Dropout
from jaxnorm._src.nnx_wrappers import SpectralNorm
from jaxnorm._src.nnx_wrappers import WeightNorm

__all__ = (
    "AdaIN",
    "AdaLNZero",
    "BatchNorm",
    "BatchRenorm",
    "ConditionalBatchNorm",
    "Dropout",
    "DyT",
    "FiLM",
    "FilterResponseNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "QKNorm",
    "QKNormAttention",
    "RMSNorm",
    "SpectralNorm",
    "StdConv",
    "WeightNorm",
    "WeightStandardization",
    "precise_batch_stats",
)
