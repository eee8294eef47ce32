"""``flax.linen`` normalization modules: thin shells over the functional core.

Each module subclasses its ``flax.linen`` namesake (flax 0.12), so it has the
same dataclass fields, defaults, variable collections and variable names (a
checkpoint of one loads into the other), ``isinstance(m, nn.BatchNorm)`` holds
and code that filters modules by Flax's classes finds ours. Only ``__call__``
is replaced: a module declares its variables, picks train or inference mode
and calls :mod:`jaxnorm`'s functions; it holds no math.

The statistics are always exact (jaxnorm's one statistics routine, so inputs
with a large mean keep their precision) and accumulated in float32 or wider,
so the inherited ``use_fast_variance`` and ``force_float32_reductions`` fields
change nothing. Inputs Flax accepts but the core refuses (train-mode batch norm with
one value per feature, instance norm with no axis to reduce over) give Flax's
result and a :class:`UserWarning`; see :mod:`jaxnorm._src.module_common`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxnorm
from jaxnorm._src import module_common as common

Array = jax.Array


def _scale_init(module: nn.Module, zero_centered: bool):
  """The scale's initializer; zeros for a zero-centered scale left at Flax's ones."""
  if zero_centered and module.scale_init is nn.initializers.ones:
    return nn.initializers.zeros
  return module.scale_init


def _declare_affine(module: nn.Module, feature_shape: tuple[int, ...],
                    use_scale: bool, use_bias: bool, zero_centered: bool = False) -> dict:
  """Declares ``scale`` then ``bias`` (Flax's order, so keys match)."""
  params = {}
  if use_scale:
    params["scale"] = module.param("scale", _scale_init(module, zero_centered),
                                   feature_shape, module.param_dtype)
  if use_bias:
    params["bias"] = module.param("bias", module.bias_init, feature_shape,
                                  module.param_dtype)
  return params


class _BatchNormShell(nn.BatchNorm):
  """Variable handling shared by BatchNorm and BatchRenorm (Flax's fields)."""

  def _core(self, params: dict, state: dict, x: Array, *, train: bool,
            axis: int | tuple[int, ...], features: tuple[int, ...],
            axis_name: str | None,
            mask: Array | None, warn: bool) -> tuple[Array, dict]:
    raise NotImplementedError

  def _apply(self, x: Array, use_running_average: bool | None,
             mask: Array | None) -> Array:
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    name = type(self).__name__
    common.check_hyperparameters(name, epsilon=self.epsilon,
                                 momentum=self.momentum)
    feature_shape = common.feature_shape_of(name, x, self.axis, "axis")
    # Flax's reading of `axis` (any iterable; an axis named twice counts once).
    features, axis = common.batch_axes(name, x, self.axis)
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
    # Flax: no cross-device averaging while initializing, so the mapped axis
    # need not exist during `init`.
    axis_name = None if initializing else self.axis_name
    if train and axis_name is None:
      # `init` on one example is how linen models are usually built; its
      # output is not used, so only `apply` warns.
      mask = common.degenerate_batch_mask(name, x, features, mask,
                                          warn=not initializing)
    with common.module_errors(name):
      y, new_state = self._core(params, state, x, train=train, axis=axis,
                                features=features, axis_name=axis_name, mask=mask,
                                warn=not initializing)
    if train and not initializing:
      ra_mean.value = new_state["mean"]
      ra_var.value = new_state["var"]
    return y


class BatchNorm(_BatchNormShell):
  """Batch normalization (Ioffe & Szegedy, 2015), a drop-in for ``flax.linen.BatchNorm``.

  ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` per feature, with the
  batch's mean and biased variance over every axis but ``axis`` in training
  (``use_running_average=False``) and the running averages in
  ``batch_stats/{mean,var}`` (shape: ``x`` along ``axis``) at inference.
  Training updates them as ``momentum * running + (1 - momentum) * batch``
  when ``batch_stats`` is mutable; ``init`` neither updates them nor averages
  across ``axis_name``. See :func:`jaxnorm.batch_norm`.

  A subclass of ``flax.linen.BatchNorm``: every field is Flax's, with Flax's
  default; ``virtual_batch_size`` is added. A train-mode call with one value
  per feature returns ``bias``, as Flax does, with a :class:`UserWarning`
  outside ``init``.

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
      examples with its own statistics (``None``: the whole batch). A batch
      smaller than one chunk is one chunk.
  """

  virtual_batch_size: int | None = None

  def _core(self, params, state, x, *, train, axis, features, axis_name, mask,
            warn):
    k = common.chunk_size(type(self).__name__, x, features,
                          self.virtual_batch_size, warn=warn) if train else None
    return jaxnorm.batch_norm(
        params, state, x, train=train, axis=axis, momentum=self.momentum,
        eps=self.epsilon, axis_name=axis_name,
        axis_index_groups=self.axis_index_groups if axis_name else None,
        mask=mask, virtual_batch_size=k, dtype=self.dtype)

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    """Normalizes ``x``; ``mask`` (boolean, broadcast to ``x``) selects the
    entries that enter the statistics, and so the running averages."""
    return self._apply(x, use_running_average, mask)


class BatchRenorm(_BatchNormShell):
  """Batch renormalization (Ioffe, 2017) with ``BatchNorm``'s variables.

  Training normalizes with the batch statistics corrected toward the running
  ones, ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
  ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``; inference is batch norm's.
  Fields are ``flax.linen.BatchNorm``'s (it is a subclass) plus ``r_max`` and
  ``d_max``. See :func:`jaxnorm.batch_renorm`.

  Attributes:
    r_max: bound of the variance correction ``r``, >= 1.
    d_max: bound of the mean correction ``d``, >= 0.
  """

  r_max: float = 3.0
  d_max: float = 5.0

  def _core(self, params, state, x, *, train, axis, features, axis_name, mask,
            warn):
    del features, warn
    return jaxnorm.batch_renorm(
        params, state, x, train=train, r_max=self.r_max, d_max=self.d_max,
        axis=axis, momentum=self.momentum, eps=self.epsilon,
        axis_name=axis_name,
        axis_index_groups=self.axis_index_groups if axis_name else None,
        mask=mask, dtype=self.dtype)

  @nn.compact
  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    """Normalizes ``x`` (see :class:`BatchNorm`)."""
    return self._apply(x, use_running_average, mask)


class LayerNorm(nn.LayerNorm):
  """Layer normalization (Ba et al., 2016), a drop-in for ``flax.linen.LayerNorm``.

  ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with each example's
  statistics over ``reduction_axes`` (default: the last axis); ``scale`` and
  ``bias`` have the shape of ``x`` along ``feature_axes``. A subclass of
  ``flax.linen.LayerNorm`` with its fields; see :func:`jaxnorm.layer_norm`.
  """

  zero_centered_scale: bool = False
  """Store the scale as ``scale - 1``: initialized to zeros, applied as
  ``1 + scale`` (Gemma; Transformer Engine's ``zero_centered_gamma``)."""

  @nn.compact
  def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
    """Normalizes ``x``; ``mask`` selects the entries in the statistics."""
    name = type(self).__name__
    common.check_hyperparameters(name, epsilon=self.epsilon)
    reduction_axes, feature_axes = common.check_axes(
        name, x, reduction_axes=self.reduction_axes,
        feature_axes=self.feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    params = _declare_affine(self, feature_shape, self.use_scale, self.use_bias,
                             zero_centered=self.zero_centered_scale)
    with common.module_errors(name):
      return jaxnorm.layer_norm(
          params, x, axis=reduction_axes, feature_axes=feature_axes,
          eps=self.epsilon, mask=mask, axis_name=self.axis_name,
          axis_index_groups=self.axis_index_groups, dtype=self.dtype,
          zero_centered_scale=self.zero_centered_scale)


class RMSNorm(nn.RMSNorm):
  """RMS normalization (Zhang & Sennrich, 2019), a drop-in for ``flax.linen.RMSNorm``.

  ``y = x / sqrt(mean(x**2) + epsilon) * scale`` over ``reduction_axes``; no
  centering, no bias. A subclass of ``flax.linen.RMSNorm`` with its fields;
  see :func:`jaxnorm.rms_norm`.
  """

  zero_centered_scale: bool = False
  """Store the scale as ``scale - 1``: initialized to zeros, applied as
  ``1 + scale`` (Gemma; Transformer Engine's ``zero_centered_gamma``)."""

  @nn.compact
  def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
    """Normalizes ``x``; ``mask`` selects the entries in the statistics."""
    name = type(self).__name__
    common.check_hyperparameters(name, epsilon=self.epsilon)
    reduction_axes, feature_axes = common.check_axes(
        name, x, reduction_axes=self.reduction_axes,
        feature_axes=self.feature_axes)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    params = {}
    if self.use_scale:
      params["scale"] = self.param("scale", _scale_init(self, self.zero_centered_scale),
                                   feature_shape, self.param_dtype)
    with common.module_errors(name):
      return jaxnorm.rms_norm(
          params, x, axis=reduction_axes, feature_axes=feature_axes,
          eps=self.epsilon, mask=mask, axis_name=self.axis_name,
          axis_index_groups=self.axis_index_groups, dtype=self.dtype,
          zero_centered_scale=self.zero_centered_scale)


class GroupNorm(nn.GroupNorm):
  """Group normalization (Wu & He, 2018), a drop-in for ``flax.linen.GroupNorm``.

  ``x`` of shape ``(N, ..., C)``: the ``C`` channels are split into
  ``num_groups`` groups (default 32; or groups of ``group_size`` with
  ``num_groups=None``) and each example's group is normalized over its
  channels and ``reduction_axes`` (default: every axis but the first; for a
  1-D ``x`` of shape ``(C,)``, as in Flax, each group of the vector alone);
  ``scale``/``bias`` have shape ``(C,)``. A subclass of
  ``flax.linen.GroupNorm`` with its fields and its error messages; see
  :func:`jaxnorm.group_norm`.
  """

  @nn.compact
  def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
    """Normalizes ``x`` of shape ``(N, ..., C)`` (or a lone ``(C,)``)."""
    name = type(self).__name__
    common.check_hyperparameters(name, epsilon=self.epsilon)
    (channels,) = common.feature_shape_of(name, x, -1, "x")
    reduction_axes = common.check_group_reduction_axes(name, x,
                                                       self.reduction_axes)
    if reduction_axes is None and x.ndim == 1:
      # Flax's default reduces over every axis but the first and the
      # channels, plus the channels: on a lone vector (C,), the channels only,
      # so each group of the vector is normalized on its own (flax.nnx's
      # GroupNorm raises here, and so does jaxnorm's).
      reduction_axes = (0,)
    groups = common.resolve_groups(name, channels, self.num_groups,
                                   self.group_size, what="channels")
    params = _declare_affine(self, (channels,), self.use_scale, self.use_bias)
    with common.module_errors(name):
      return jaxnorm.group_norm(
          params, x, num_groups=groups, eps=self.epsilon, mask=mask,
          reduction_axes=reduction_axes, axis_name=self.axis_name,
          axis_index_groups=self.axis_index_groups, dtype=self.dtype)


class InstanceNorm(nn.InstanceNorm):
  """Instance normalization (Ulyanov et al., 2016), a drop-in for ``flax.linen.InstanceNorm``.

  Each example and feature is normalized over every axis but the first and
  ``feature_axes``; ``scale``/``bias`` have the shape of ``x`` along
  ``feature_axes``. A subclass of ``flax.linen.InstanceNorm`` with its fields;
  see :func:`jaxnorm.instance_norm`. An input with nothing to reduce over
  (``(N, C)``) gives ``bias``, as in Flax, with a :class:`UserWarning`.
  """

  @nn.compact
  def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
    """Normalizes ``x`` of shape ``(N, spatial..., C)``."""
    name = type(self).__name__
    common.check_hyperparameters(name, epsilon=self.epsilon)
    axes = common.instance_norm_axes(name, x, self.feature_axes)
    params = _declare_affine(self, tuple(x.shape[a] for a in axes),
                             self.use_scale, self.use_bias)
    xv, axes_v, mask_v, undo = common.instance_norm_view(
        name, x, axes, mask, warn=not self.is_initializing())
    with common.module_errors(name):
      return undo(jaxnorm.instance_norm(
          params, xv, eps=self.epsilon, mask=mask_v, axis=axes_v,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          dtype=self.dtype))
