"""``flax.nnx`` normalization modules: thin shells over the functional core.

Each module takes the constructor arguments of its ``flax.nnx`` namesake
(flax 0.12: ``num_features`` first, keyword options, ``rngs``) and keeps the
same attributes: ``scale``/``bias`` as :class:`nnx.Param`, ``mean``/``var`` as
:class:`nnx.BatchStat` (always float32). ``model.train()`` / ``model.eval()``
and ``nnx.view(model, use_running_average=...)`` switch BatchNorm's mode.
Initializers are used in ``__init__`` and not kept, so two modules built with
different initializers have equal graph definitions.

Like Flax, each call first passes the input and the variables through
``promote_dtype`` (a constructor argument, by default
``flax.nnx.nn.dtypes.promote_dtype``, stored as ``self.promote_dtype``):
``(x, scale, bias)``, or ``(x, mean, var, scale, bias)`` for BatchNorm, with
``dtype=self.dtype``. The promoted arrays are what is normalized.

The math is :mod:`jaxnorm`'s: statistics are always exact and at least
float32, so ``use_fast_variance`` is accepted for compatibility only.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes
from flax.typing import PromoteDtypeFn
import jax
import jax.numpy as jnp
from jax.nn import initializers

from jaxnorm._src import batch_norm as batch_norm_lib
from jaxnorm._src import checks
from jaxnorm._src import group_norm as group_norm_lib
from jaxnorm._src import layer_norm as layer_norm_lib
from jaxnorm._src.linen_norm import module_errors

Array = jax.Array
_NO_METADATA = MappingProxyType({})


def _shape(num_features) -> tuple[int, ...]:
  if isinstance(num_features, int) and not isinstance(num_features, bool):
    return (num_features,)
  return tuple(num_features)


def _affine(module, shape, *, rngs, use_scale, use_bias, scale_init, bias_init,
            param_dtype, scale_metadata, bias_metadata):
  """Declares ``scale`` then ``bias`` (flax's order, so keys match)."""
  if use_scale:
    module.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype),
                             **scale_metadata)
  else:
    module.scale = nnx.data(None)
  if use_bias:
    module.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype),
                            **bias_metadata)
  else:
    module.bias = nnx.data(None)


def _value(var):
  """A Variable's array, or None for a switched-off ``scale``/``bias``."""
  return None if var is None else var[...]


def _promote(module, arrays):
  """``module.promote_dtype(arrays, dtype=module.dtype)``, as Flax calls it,
  after checking ``x`` (the first array): Flax's promotion would turn an
  integer ``x`` into floats, where jaxnorm refuses it as the core does."""
  with module_errors(type(module).__name__):
    checks.check_array("x", arrays[0])
  return module.promote_dtype(arrays, dtype=module.dtype)


def _params(scale, bias=None) -> dict:
  """The core's ``params`` dict; a None term is left out."""
  return {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}


# The attributes BatchNorm and BatchRenorm keep from flax.nnx.BatchNorm's
# constructor arguments (the initializers and metadata are used, not kept).
_BATCH_NORM_ATTRS = (
    "num_features", "use_running_average", "axis", "momentum", "epsilon",
    "dtype", "param_dtype", "use_bias", "use_scale", "axis_name",
    "axis_index_groups", "use_fast_variance", "promote_dtype")


class _BatchNormBase(nnx.Module):
  """Variables and mode handling shared by BatchNorm and BatchRenorm."""

  def _init_batch_norm(self, args):
    """Declares the variables and stores the attributes, as flax.nnx.BatchNorm.

    ``args`` maps the names of ``flax.nnx.BatchNorm``'s constructor arguments
    to their values (the subclass's ``__init__`` passes its ``locals()``); the
    subclass stores its own extra arguments itself.
    """
    shape = _shape(args["num_features"])
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    _affine(self, shape, rngs=args["rngs"], use_scale=args["use_scale"],
            use_bias=args["use_bias"], scale_init=args["scale_init"],
            bias_init=args["bias_init"], param_dtype=args["param_dtype"],
            scale_metadata=args["scale_metadata"],
            bias_metadata=args["bias_metadata"])
    for name in _BATCH_NORM_ATTRS:
      setattr(self, name, args[name])

  def _core(self, params, state, x, *, train, mask):
    raise NotImplementedError

  def __call__(self, x, use_running_average: bool | None = None, *,
               mask: Array | None = None):
    """Normalizes ``x``; the call's ``use_running_average`` wins over the attribute.

    ``x``, ``mean``, ``var``, ``scale`` and ``bias`` first go through
    ``self.promote_dtype`` (with ``dtype=self.dtype``), as in Flax. At
    inference the promoted ``mean``/``var`` normalize ``x``. In training the
    batch's statistics do, and the running averages ``mean``/``var`` are
    updated in place from their stored float32 values (the update carries no
    gradient). ``mask`` (boolean, broadcast to ``x``) selects the entries in
    the statistics and the running averages.
    """
    name = type(self).__name__
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          f"{name}: `use_running_average` is None both in the constructor and "
          "in the call; pass `use_running_average=True/False` to either, or "
          "use `model.train()` / `model.eval()`.")
    train = not use_running_average
    x, mean, var, scale, bias = _promote(
        self, (x, self.mean[...], self.var[...], _value(self.scale),
               _value(self.bias)))
    if train:
      state = {"mean": self.mean[...], "var": self.var[...]}
    else:
      state = {"mean": mean, "var": var}
    with module_errors(name):
      y, new_state = self._core(_params(scale, bias), state, x, train=train,
                                mask=mask)
    if train:
      self.mean[...] = jax.lax.stop_gradient(new_state["mean"])
      self.var[...] = jax.lax.stop_gradient(new_state["var"])
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Used by ``nnx.view(model, use_running_average=...)``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class BatchNorm(_BatchNormBase):
  """Batch normalization, a drop-in for ``flax.nnx.BatchNorm``.

  ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` per feature along
  ``axis``: the batch's statistics in training (``use_running_average=False``,
  the default, or after ``model.train()``), the running averages
  ``self.mean``/``self.var`` at inference (``model.eval()``). See
  :func:`jaxnorm.batch_norm`.

  >>> import jax.numpy as jnp, jaxnorm.nnx as jn
  >>> from flax import nnx
  >>> bn = jn.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
  >>> y = bn(jnp.array([[1.0, 10.0], [3.0, 30.0]]))     # training mode
  >>> import numpy as np
  >>> np.round(np.asarray(y, float), 3).tolist()
  [[-1.0, -1.0], [1.0, 1.0]]
  >>> np.round(np.asarray(bn.mean[...], float), 3).tolist()
  [0.2, 2.0]
  >>> bn.eval()                                         # running averages now
  >>> bn.use_running_average
  True

  Args:
    num_features: size of ``x`` along ``axis`` (a tuple for several axes).
    use_running_average, axis, momentum, epsilon, dtype, param_dtype,
      use_bias, use_scale, bias_init, scale_init, axis_name,
      axis_index_groups, rngs, bias_metadata, scale_metadata: as in
      ``flax.nnx.BatchNorm``.
    use_fast_variance: accepted for compatibility; statistics are exact.
    promote_dtype: as in ``flax.nnx.BatchNorm``: called on
      ``(x, mean, var, scale, bias)`` with ``dtype=dtype`` at every call; the
      promoted arrays are normalized (the promoted ``mean``/``var`` only at
      inference; the running averages stay float32).
    virtual_batch_size: ghost batch norm: chunks of this many examples are
      normalized with their own statistics.
  """

  def __init__(
      self,
      num_features,
      *,
      use_running_average: bool | None = False,
      axis=-1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype=None,
      param_dtype=jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init=initializers.zeros,
      scale_init=initializers.ones,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata=_NO_METADATA,
      scale_metadata=_NO_METADATA,
      virtual_batch_size: int | None = None,
  ):
    self._init_batch_norm(locals())
    self.virtual_batch_size = virtual_batch_size

  def _core(self, params, state, x, *, train, mask):
    return batch_norm_lib.batch_norm(
        params, state, x, train=train, axis=self.axis, momentum=self.momentum,
        eps=self.epsilon, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask,
        virtual_batch_size=self.virtual_batch_size, dtype=self.dtype)


class BatchRenorm(_BatchNormBase):
  """Batch renormalization (Ioffe, 2017) with :class:`BatchNorm`'s variables.

  Takes the arguments of ``flax.nnx.BatchNorm`` (as :class:`BatchNorm` does,
  ``promote_dtype`` included, but not ``virtual_batch_size``) plus ``r_max``
  and ``d_max``, the clipping bounds of the corrections; see
  :func:`jaxnorm.batch_renorm`. Training uses the stored float32 running
  averages for the corrections; inference is :class:`BatchNorm`'s.
  """

  def __init__(
      self,
      num_features,
      *,
      use_running_average: bool | None = False,
      axis=-1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype=None,
      param_dtype=jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init=initializers.zeros,
      scale_init=initializers.ones,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata=_NO_METADATA,
      scale_metadata=_NO_METADATA,
      r_max: float = 3.0,
      d_max: float = 5.0,
  ):
    self._init_batch_norm(locals())
    self.r_max = r_max
    self.d_max = d_max

  def _core(self, params, state, x, *, train, mask):
    return batch_norm_lib.batch_renorm(
        params, state, x, train=train, r_max=self.r_max, d_max=self.d_max,
        axis=self.axis, momentum=self.momentum, eps=self.epsilon,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        mask=mask, dtype=self.dtype)


class LayerNorm(nnx.Module):
  """Layer normalization (Ba et al., 2016), a drop-in for ``flax.nnx.LayerNorm``.

  Each example is normalized over ``reduction_axes``; ``scale``/``bias`` of
  shape ``num_features`` run along ``feature_axes``. See
  :func:`jaxnorm.layer_norm`.
  """

  def __init__(
      self,
      num_features,
      *,
      epsilon: float = 1e-6,
      dtype=None,
      param_dtype=jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init=initializers.zeros,
      scale_init=initializers.ones,
      reduction_axes=-1,
      feature_axes=-1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata=_NO_METADATA,
      scale_metadata=_NO_METADATA,
  ):
    _affine(self, _shape(num_features), rngs=rngs, use_scale=use_scale,
            use_bias=use_bias, scale_init=scale_init, bias_init=bias_init,
            param_dtype=param_dtype, scale_metadata=scale_metadata,
            bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: Array | None = None):
    """Normalizes ``x``; ``mask`` selects the entries in the statistics."""
    x, scale, bias = _promote(self, (x, _value(self.scale), _value(self.bias)))
    with module_errors(type(self).__name__):
      return layer_norm_lib.layer_norm(
          _params(scale, bias), x, axis=self.reduction_axes,
          feature_axes=self.feature_axes, eps=self.epsilon, mask=mask,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          dtype=self.dtype)


class RMSNorm(nnx.Module):
  """RMS normalization (Zhang & Sennrich, 2019), a drop-in for ``flax.nnx.RMSNorm``.

  ``y = x / sqrt(mean(x**2) + epsilon) * scale``; see :func:`jaxnorm.rms_norm`.
  """

  def __init__(
      self,
      num_features,
      *,
      epsilon: float = 1e-6,
      dtype=None,
      param_dtype=jnp.float32,
      use_scale: bool = True,
      scale_init=initializers.ones,
      reduction_axes=-1,
      feature_axes=-1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      scale_metadata=_NO_METADATA,
  ):
    if use_scale:
      self.scale = nnx.Param(
          scale_init(rngs.params(), _shape(num_features), param_dtype),
          **scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, mask: Array | None = None):
    """Normalizes ``x``; ``mask`` selects the entries in the statistics."""
    x, scale = _promote(self, (x, _value(self.scale)))
    with module_errors(type(self).__name__):
      return layer_norm_lib.rms_norm(
          _params(scale), x, axis=self.reduction_axes,
          feature_axes=self.feature_axes, eps=self.epsilon, mask=mask,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          dtype=self.dtype)


class GroupNorm(nnx.Module):
  """Group normalization (Wu & He, 2018), a drop-in for ``flax.nnx.GroupNorm``.

  Channels last, ``num_features`` channels split into ``num_groups`` groups
  (or groups of ``group_size`` with ``num_groups=None``). See
  :func:`jaxnorm.group_norm`.
  """

  def __init__(
      self,
      num_features: int,
      num_groups: int | None = 32,
      group_size: int | None = None,
      *,
      epsilon: float = 1e-6,
      dtype=None,
      param_dtype=jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init=initializers.zeros,
      scale_init=initializers.ones,
      reduction_axes=None,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata=_NO_METADATA,
      scale_metadata=_NO_METADATA,
  ):
    self.feature_axis = -1
    with module_errors(type(self).__name__):
      groups = group_norm_lib._resolve_groups(num_groups, group_size,
                                              num_features)
    self.num_groups = groups
    self.group_size = num_features // groups
    _affine(self, (num_features,), rngs=rngs, use_scale=use_scale,
            use_bias=use_bias, scale_init=scale_init, bias_init=bias_init,
            param_dtype=param_dtype, scale_metadata=scale_metadata,
            bias_metadata=bias_metadata)
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.reduction_axes = reduction_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: Array | None = None):
    """Normalizes ``x`` of shape ``(N, ..., C)``."""
    x, scale, bias = _promote(self, (x, _value(self.scale), _value(self.bias)))
    with module_errors(type(self).__name__):
      return group_norm_lib.group_norm(
          _params(scale, bias), x, num_groups=self.num_groups, eps=self.epsilon,
          mask=mask, reduction_axes=self.reduction_axes,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          dtype=self.dtype)


class InstanceNorm(nnx.Module):
  """Instance normalization (Ulyanov et al., 2016), a drop-in for ``flax.nnx.InstanceNorm``.

  Each example and feature is normalized over every axis but the first and
  ``feature_axes``. See :func:`jaxnorm.instance_norm`.
  """

  def __init__(
      self,
      num_features,
      *,
      epsilon: float = 1e-6,
      dtype=None,
      param_dtype=jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init=initializers.zeros,
      scale_init=initializers.ones,
      feature_axes=-1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata=_NO_METADATA,
      scale_metadata=_NO_METADATA,
  ):
    _affine(self, _shape(num_features), rngs=rngs, use_scale=use_scale,
            use_bias=use_bias, scale_init=scale_init, bias_init=bias_init,
            param_dtype=param_dtype, scale_metadata=scale_metadata,
            bias_metadata=bias_metadata)
    self.num_features = num_features
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.feature_axes = feature_axes
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype

  def __call__(self, x, *, mask: Array | None = None):
    """Normalizes ``x`` of shape ``(N, spatial..., C)``."""
    x, scale, bias = _promote(self, (x, _value(self.scale), _value(self.bias)))
    with module_errors(type(self).__name__):
      return group_norm_lib.instance_norm(
          _params(scale, bias), x, eps=self.epsilon, mask=mask,
          axis=self.feature_axes, axis_name=self.axis_name,
          axis_index_groups=self.axis_index_groups, dtype=self.dtype)
