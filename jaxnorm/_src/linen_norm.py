"""``flax.linen`` normalization modules: thin shells over the functional core.

Each module has the constructor arguments, defaults, variable collections and
variable names of its ``flax.linen`` namesake (flax 0.12), so a checkpoint of
one loads into the other. A module only declares its variables, picks train or
inference mode and calls :mod:`jaxnorm`'s functions; it holds no math.

Differences from Flax, all in the statistics: they are always exact (computed
on shifted data, so inputs with a large mean keep their precision) and always
accumulated in float32 or wider. ``use_fast_variance`` and
``force_float32_reductions`` are therefore accepted for compatibility only and
change nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from jaxnorm._src import batch_norm as batch_norm_lib
from jaxnorm._src import checks
from jaxnorm._src import group_norm as group_norm_lib
from jaxnorm._src import layer_norm as layer_norm_lib

Array = jax.Array


@contextlib.contextmanager
def module_errors(module_name: str):
  """Prefixes argument errors of the core with the module's class name.

  ``ValueError``/``TypeError`` raised inside keep their type and read
  ``"BatchNorm: `x` has ..."``; the original error is chained as the cause.
  """
  try:
    yield
  except (ValueError, TypeError) as err:
    msg = str(err)
    prefix = f"{module_name}: "
    # Only the core's plain errors are rewritten; subclasses (JAX's tracer
    # errors, Flax's scope errors) have their own constructors and pass as is.
    if type(err) not in (ValueError, TypeError) or msg.startswith(prefix):
      raise
    raise type(err)(prefix + msg) from err


def feature_shape_of(x, axes, arg_name: str) -> tuple[int, ...]:
  """The shape of ``x`` along ``axes`` (validated by the core's checks)."""
  checks.check_array("x", x)
  return tuple(x.shape[a] for a in checks.normalize_axes(arg_name, axes, x.ndim))


def too_small_for_batch_stats(x, feature_axes) -> bool:
  """True when ``x`` has at most one value per feature (e.g. ``init`` on one example)."""
  axes = checks.normalize_axes("axis", feature_axes, x.ndim)
  reduction = tuple(a for a in range(x.ndim) if a not in axes)
  return batch_norm_lib.values_per_feature(x, reduction) <= 1


class _BatchNormBase(nn.Module):
  """Fields and variable handling shared by BatchNorm and BatchRenorm."""

  use_running_average: bool | None = None
  axis: Any = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  def _core(self, params, state, x, *, train, axis_name, mask):
    raise NotImplementedError

  def _apply(self, x, use_running_average, mask):
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    name = type(self).__name__
    with module_errors(name):
      feature_shape = feature_shape_of(x, self.axis, "axis")
    # Same creation order as flax: running statistics, then scale, then bias
    # (the order fixes which random key each initializer receives).
    ra_mean = self.variable("batch_stats", "mean",
                            lambda s: jnp.zeros(s, jnp.float32), feature_shape)
    ra_var = self.variable("batch_stats", "var",
                           lambda s: jnp.ones(s, jnp.float32), feature_shape)
    params = _declare_affine(self, feature_shape, self.use_scale, self.use_bias)
    state = {"mean": ra_mean.value, "var": ra_var.value}
    train = not use_running_average
    initializing = self.is_initializing()
    if train and initializing and mask is None and too_small_for_batch_stats(
        x, self.axis):
      # Flax lets `init` see a single example in train mode (the output is
      # then `bias`); an all-true mask gives exactly that without the core's
      # "batch too small" error, which stays for real training steps.
      mask = jnp.ones((), bool)
    with module_errors(name):
      y, new_state = self._core(
          params, state, x, train=train,
          # Flax: no cross-device averaging while initializing, so the mapped
          # axis need not exist during `init`.
          axis_name=None if initializing else self.axis_name,
          mask=mask)
    if train and not initializing:
      ra_mean.value = new_state["mean"]
      ra_var.value = new_state["var"]
    return y


class BatchNorm(_BatchNormBase):
  """Batch normalization, a drop-in for ``flax.linen.BatchNorm``.

  ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` per feature, with the
  batch's mean and biased variance over every axis but ``axis`` in training
  (``use_running_average=False``) and the running averages in
  ``batch_stats/{mean,var}`` at inference. Training updates them as
  ``momentum * running + (1 - momentum) * batch`` when ``batch_stats`` is
  mutable; ``init`` neither updates them nor averages across ``axis_name``.
  See :func:`jaxnorm.batch_norm`.

  >>> import jax, jax.numpy as jnp, jaxnorm.linen as jl
  >>> bn = jl.BatchNorm(momentum=0.9)
  >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
  >>> variables = bn.init(jax.random.key(0), x, use_running_average=False)
  >>> jax.tree.map(jnp.shape, variables)
  {'batch_stats': {'mean': (2,), 'var': (2,)}, 'params': {'bias': (2,), 'scale': (2,)}}
  >>> y, updates = bn.apply(variables, x, use_running_average=False,
  ...                       mutable=["batch_stats"])
  >>> import numpy as np
  >>> np.round(np.asarray(y, float), 3).tolist()
  [[-1.0, -1.0], [1.0, 1.0]]
  >>> np.round(np.asarray(updates["batch_stats"]["mean"], float), 3).tolist()
  [0.2, 2.0]

  Attributes:
    use_running_average: use ``batch_stats`` instead of batch statistics; may
      be given here or to ``__call__`` (one of the two, as in Flax).
    axis: the feature axis or axes (``axis=1`` for NCHW).
    momentum: decay of the running averages.
    epsilon: added to the variance.
    dtype: output dtype (default: ``x``, ``scale`` and ``bias`` promoted).
    param_dtype: dtype of ``scale`` and ``bias``; running statistics are
      always float32.
    use_bias, use_scale: learn ``bias`` / ``scale``.
    bias_init, scale_init: their initializers.
    axis_name: mapped axis (``shard_map``/``pmap``/``vmap``) over which the
      batch statistics are averaged.
    axis_index_groups: device subgroups for ``axis_name``.
    use_fast_variance: accepted for compatibility; statistics are always exact.
    force_float32_reductions: accepted for compatibility; statistics are
      always float32 (or wider).
    virtual_batch_size: ghost batch norm: normalize each chunk of this many
      examples with its own statistics (``None``: the whole batch).
  """

  virtual_batch_size: int | None = None

  def _core(self, params, state, x, *, train, axis_name, mask):
    return batch_norm_lib.batch_norm(
        params, state, x, train=train, axis=self.axis, momentum=self.momentum,
        eps=self.epsilon, axis_name=axis_name,
        axis_index_groups=self.axis_index_groups if axis_name else None,
        mask=mask, virtual_batch_size=self.virtual_batch_size,
        dtype=self.dtype)

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: Array | None = None):
    """Normalizes ``x``; ``mask`` (boolean, broadcast to ``x``) selects the
    entries that enter the statistics, and so the running averages."""
    return self._apply(x, use_running_average, mask)


class BatchRenorm(_BatchNormBase):
  """Batch renormalization (Ioffe, 2017) with ``BatchNorm``'s variables.

  Training normalizes with the batch statistics corrected toward the running
  ones, ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
  ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``; inference is batch norm's.
  Arguments are :class:`BatchNorm`'s (without ``virtual_batch_size``) plus
  ``r_max`` and ``d_max``. See :func:`jaxnorm.batch_renorm`.
  """

  r_max: float = 3.0
  d_max: float = 5.0

  def _core(self, params, state, x, *, train, axis_name, mask):
    return batch_norm_lib.batch_renorm(
        params, state, x, train=train, r_max=self.r_max, d_max=self.d_max,
        axis=self.axis, momentum=self.momentum, eps=self.epsilon,
        axis_name=axis_name,
        axis_index_groups=self.axis_index_groups if axis_name else None,
        mask=mask, dtype=self.dtype)

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: Array | None = None):
    """Normalizes ``x`` (see :class:`BatchNorm`)."""
    return self._apply(x, use_running_average, mask)


def _declare_affine(module, feature_shape, use_scale, use_bias):
  params = {}
  if use_scale:
    params["scale"] = module.param("scale", module.scale_init, feature_shape,
                                   module.param_dtype)
  if use_bias:
    params["bias"] = module.param("bias", module.bias_init, feature_shape,
                                  module.param_dtype)
  return params


class LayerNorm(nn.Module):
  """Layer normalization (Ba et al., 2016), a drop-in for ``flax.linen.LayerNorm``.

  Each example is normalized over ``reduction_axes`` (default: the last axis);
  ``scale`` and ``bias`` run along ``feature_axes``. See
  :func:`jaxnorm.layer_norm`. ``use_fast_variance`` and
  ``force_float32_reductions`` are accepted for compatibility only.
  """

  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  reduction_axes: Any = -1
  feature_axes: Any = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: Array | None = None):
    """Normalizes ``x``; ``mask`` selects the entries in the statistics."""
    name = type(self).__name__
    with module_errors(name):
      feature_shape = feature_shape_of(x, self.feature_axes, "feature_axes")
    params = _declare_affine(self, feature_shape, self.use_scale, self.use_bias)
    with module_errors(name):
      return layer_norm_lib.layer_norm(
          params, x, axis=self.reduction_axes, feature_axes=self.feature_axes,
          eps=self.epsilon, mask=mask, axis_name=self.axis_name,
          axis_index_groups=self.axis_index_groups, dtype=self.dtype)


class RMSNorm(nn.Module):
  """RMS normalization (Zhang & Sennrich, 2019), a drop-in for ``flax.linen.RMSNorm``.

  ``y = x / sqrt(mean(x**2) + epsilon) * scale`` over ``reduction_axes``; no
  centering, no bias. See :func:`jaxnorm.rms_norm`.
  """

  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  scale_init: Any = initializers.ones
  reduction_axes: Any = -1
  feature_axes: Any = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: Array | None = None):
    """Normalizes ``x``; ``mask`` selects the entries in the statistics."""
    name = type(self).__name__
    with module_errors(name):
      feature_shape = feature_shape_of(x, self.feature_axes, "feature_axes")
    params = _declare_affine(self, feature_shape, self.use_scale, False)
    with module_errors(name):
      return layer_norm_lib.rms_norm(
          params, x, axis=self.reduction_axes, feature_axes=self.feature_axes,
          eps=self.epsilon, mask=mask, axis_name=self.axis_name,
          axis_index_groups=self.axis_index_groups, dtype=self.dtype)


class GroupNorm(nn.Module):
  """Group normalization (Wu & He, 2018), a drop-in for ``flax.linen.GroupNorm``.

  Channels last; give ``num_groups`` (default 32) or ``group_size`` (with
  ``num_groups=None``). ``scale``/``bias`` have shape ``(C,)``. See
  :func:`jaxnorm.group_norm`.
  """

  num_groups: int | None = 32
  group_size: int | None = None
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  reduction_axes: Any = None
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: Array | None = None):
    """Normalizes ``x`` of shape ``(N, ..., C)``."""
    name = type(self).__name__
    with module_errors(name):
      feature_shape = feature_shape_of(x, -1, "x")
    params = _declare_affine(self, feature_shape, self.use_scale, self.use_bias)
    with module_errors(name):
      return group_norm_lib.group_norm(
          params, x, num_groups=self.num_groups, group_size=self.group_size,
          eps=self.epsilon, mask=mask, reduction_axes=self.reduction_axes,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          dtype=self.dtype)


class InstanceNorm(nn.Module):
  """Instance normalization (Ulyanov et al., 2016), a drop-in for ``flax.linen.InstanceNorm``.

  Each example and feature is normalized over every axis but the first and
  ``feature_axes``. See :func:`jaxnorm.instance_norm`.
  """

  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  feature_axes: Any = -1
  axis_name: str | None = None
  axis_index_groups: Any = None
  use_fast_variance: bool = True
  force_float32_reductions: bool = True

  @nn.compact
  def __call__(self, x, *, mask: Array | None = None):
    """Normalizes ``x`` of shape ``(N, spatial..., C)``."""
    name = type(self).__name__
    with module_errors(name):
      feature_shape = feature_shape_of(x, self.feature_axes, "feature_axes")
    params = _declare_affine(self, feature_shape, self.use_scale, self.use_bias)
    with module_errors(name):
      return group_norm_lib.instance_norm(
          params, x, eps=self.epsilon, mask=mask, axis=self.feature_axes,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          dtype=self.dtype)
