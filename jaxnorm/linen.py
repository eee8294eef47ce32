"""Flax ``linen`` modules: drop-in replacements for ``flax.linen``'s normalization layers.

Each class subclasses its ``flax.linen`` namesake (``isinstance`` and Flax's
type filters treat it as Flax's) and replaces only ``__call__``, a thin shell
over the functional core in :mod:`jaxnorm`. README, "Differences from Flax",
lists every deliberate difference.
"""

from jaxnorm._src.linen_modern import AdaIN
from jaxnorm._src.linen_modern import AdaLNZero
from jaxnorm._src.linen_modern import ConditionalBatchNorm
from jaxnorm._src.linen_modern import DyT
from jaxnorm._src.linen_modern import FiLM
from jaxnorm._src.linen_modern import FilterResponseNorm
from jaxnorm._src.linen_modern import QKNorm
from jaxnorm._src.linen_modern import QKNormAttention
from jaxnorm._src.linen_modern import StdConv
from jaxnorm._src.linen_modern import WeightStandardization
from jaxnorm._src.linen_modern import precise_batch_stats
from jaxnorm._src.linen_norm import BatchNorm
from jaxnorm._src.linen_norm import BatchRenorm
from jaxnorm._src.linen_norm import GroupNorm
from jaxnorm._src.linen_norm import InstanceNorm
from jaxnorm._src.linen_norm import LayerNorm
from jaxnorm._src.linen_norm import RMSNorm
from jaxnorm._src.linen_wrappers import Dropout
from jaxnorm._src.linen_wrappers import SpectralNorm
from jaxnorm._src.linen_wrappers import WeightNorm
from jaxnorm._src.linen_wrappers import weight_norm_data_init

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
    "weight_norm_data_init",
)
