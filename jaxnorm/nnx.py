"""Flax ``nnx`` modules: drop-in replacements for ``flax.nnx``'s normalization layers.

The modules are thin shells over the functional core in :mod:`jaxnorm`.
"""

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
    "BatchNorm",
    "BatchRenorm",
    "Dropout",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "SpectralNorm",
    "WeightNorm",
)
