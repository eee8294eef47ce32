"""jaxnorm: normalization layers for JAX and Flax.

The functional core lives here: pure functions over ``params`` and ``state``
pytrees. Flax modules are in :mod:`jaxnorm.linen` and :mod:`jaxnorm.nnx`,
PyTorch conventions in :mod:`jaxnorm.interop`.
"""

from jaxnorm._src.batch_norm import batch_norm
from jaxnorm._src.batch_norm import batch_norm_init
from jaxnorm._src.batch_norm import batch_renorm
from jaxnorm._src.conditional import adain
from jaxnorm._src.conditional import adaln_zero
from jaxnorm._src.conditional import adaln_zero_init
from jaxnorm._src.conditional import conditional_batch_norm
from jaxnorm._src.conditional import conditional_batch_norm_init
from jaxnorm._src.conditional import film
from jaxnorm._src.conditional import film_init
from jaxnorm._src.dropout import dropout
from jaxnorm._src.dyt import dyt
from jaxnorm._src.dyt import dyt_init
from jaxnorm._src.fold import fold_batch_norm
from jaxnorm._src.fold import fold_batch_norm_tree
from jaxnorm._src.frn import frn
from jaxnorm._src.frn import frn_init
from jaxnorm._src.group_norm import group_norm
from jaxnorm._src.group_norm import group_norm_init
from jaxnorm._src.group_norm import instance_norm
from jaxnorm._src.layer_norm import layer_norm
from jaxnorm._src.layer_norm import layer_norm_init
from jaxnorm._src.layer_norm import rms_norm
from jaxnorm._src.layer_norm import rms_norm_init
from jaxnorm._src.moments import moments
from jaxnorm._src.precise_bn import precise_stats_init
from jaxnorm._src.precise_bn import precise_stats_result
from jaxnorm._src.precise_bn import precise_stats_update
from jaxnorm._src.qk_norm import qk_norm
from jaxnorm._src.qk_norm import qk_norm_init
from jaxnorm._src.weight_norm import spectral_norm
from jaxnorm._src.weight_norm import spectral_norm_init
from jaxnorm._src.weight_norm import weight_norm
from jaxnorm._src.weight_norm import weight_norm_data_init
from jaxnorm._src.weight_norm import weight_norm_init
from jaxnorm._src.weight_standardization import scaled_weight_standardization
from jaxnorm._src.weight_standardization import weight_standardization

__version__ = "0.1.0"

__all__ = (
    "adain",
    "adaln_zero",
    "adaln_zero_init",
    "batch_norm",
    "batch_norm_init",
    "batch_renorm",
    "conditional_batch_norm",
    "conditional_batch_norm_init",
    "dropout",
    "dyt",
    "dyt_init",
    "film",
    "film_init",
    "fold_batch_norm",
    "fold_batch_norm_tree",
    "frn",
    "frn_init",
    "group_norm",
    "group_norm_init",
    "instance_norm",
    "layer_norm",
    "layer_norm_init",
    "moments",
    "precise_stats_init",
    "precise_stats_result",
    "precise_stats_update",
    "qk_norm",
    "qk_norm_init",
    "rms_norm",
    "rms_norm_init",
    "scaled_weight_standardization",
    "spectral_norm",
    "spectral_norm_init",
    "weight_norm",
    "weight_norm_data_init",
    "weight_norm_init",
    "weight_standardization",
)


def __getattr__(name):
  # Submodules that need optional or heavier imports load on first use.
  if name in ("linen", "nnx", "interop"):
    import importlib

    return importlib.import_module(f"jaxnorm.{name}")
  raise AttributeError(f"module 'jaxnorm' has no attribute {name!r}")
