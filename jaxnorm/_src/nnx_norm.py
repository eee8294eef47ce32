"""``flax.nnx`` normalization modules: thin shells over the functional core.

Each module subclasses its ``flax.nnx`` namesake (flax 0.12) and is built by
Flax's own constructor, so it has the same constructor arguments, defaults,
attributes and variables (``scale``/``bias`` as :class:`nnx.Param`,
``mean``/``var`` as :class:`nnx.BatchStat`, always float32), and
``isinstance``, ``nnx.view(model, only=nnx.BatchNorm, ...)``,
``nnx.view_info`` and ``model.train()``/``model.eval()`` treat it as Flax's.
Only ``__call__`` is replaced, and it calls :mod:`jaxnorm`'s functions.

Like Flax, each call first passes the input and the variables through
``self.promote_dtype`` (by default ``flax.nnx.nn.dtypes.promote_dtype``):
``(x, scale, bias)``, or ``(x, mean, var, scale, bias)`` for BatchNorm, with
``dtype=self.dtype``. The promoted arrays are what is normalized.

The math is :mod:`jaxnorm`'s: statistics are always exact and at least
float32, so ``use_fast_variance`` changes nothing. Inputs Flax accepts but the
core refuses (train-mode batch norm with one value per feature, instance norm
with no axis to reduce over) give Flax's result and a :class:`UserWarning`.

This file imports no ``flax.linen`` code of jaxnorm's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes
from flax.typing import Dtype
from flax.typing import Initializer
from flax.typing import PromoteDtypeFn
from jax.nn import initializers

import jaxnorm
from jaxnorm._src import checks
from jaxnorm._src import module_common as common

Array = jax.Array
Axes = int | Sequence[int]
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})

# Flax's message when neither the constructor nor the call sets the mode.
_FLAX_NO_USE_RUNNING_AVERAGE = (
    "No `use_running_average` argument was provided to {name}.")


def _value(var: nnx.Variable | None) -> Array | None:
  """A Variable's array, or None for a switched-off ``scale``/``bias``."""
  return None if var is None else var[...]


def _flax_affine(module: nnx.Module, x: Any, names: Sequence[str]) -> tuple:
  """The ``names`` (``scale``, ``bias``) arrays as Flax's LayerNorm, RMSNorm,
  GroupNorm and InstanceNorm read them, ``self.scale[...] if self.scale else
  None``: a Variable's truth value is its length, so one that is empty along
  its first axis (``num_features=0``) counts as switched off.

  Flax then normalizes a non-empty ``x`` without them; so does this, with a
  :class:`UserWarning`, as a zero-feature module on real features is most
  likely a mistake.
  """
  values: list[Array | None] = []
  dropped: list[str] = []
  for n in names:
    var = getattr(module, n)
    if var is not None and var.ndim and var.shape[0] == 0:
      dropped.append(n)
      var = None
    values.append(_value(var))
  size: int = getattr(x, "size", 0)
  if dropped and size:
    name = type(module).__name__
    terms = " and ".join(f"`{n}`" for n in dropped)
    warnings.warn(
        f"{name}: `num_features`={getattr(module, 'num_features', 0)!r} makes "
        f"{terms} empty, and Flax skips an empty {terms.replace('`', '')}, so "
        f"`x` of shape {tuple(x.shape)} is normalized without "
        f"{'them' if len(dropped) > 1 else 'it'} (as in Flax). Build the module "
        "with `num_features` equal to the size of `x` along the feature axes.",
        UserWarning, stacklevel=3)
  return tuple(values)


def _is_flat(value: Array | None, feature_shape: tuple[int, ...]) -> bool:
  """Whether ``value`` holds several feature axes' entries in one axis: Flax's
  int ``num_features`` for several feature axes (the product of their sizes),
  which Flax reshapes to the features' shape at every call."""
  return (value is not None and len(feature_shape) > 1 and value.ndim == 1
          and value.shape[0] == math.prod(feature_shape))


def _to_features(name: str, x: Array, arg: str, feature_axes: Axes,
                 arrays: Sequence[Array | None],
                 names: Sequence[str]) -> list[Array | None]:
  """``arrays`` (scale, bias) in the shape of ``x`` along ``feature_axes``.

  A flat one (Flax's int ``num_features`` for several feature axes) is
  reshaped to the features' shape, as Flax does at each call; jaxnorm's tuple
  ``num_features`` already has it. Any other shape raises, naming the
  module's argument ``arg``.
  """
  shape = common.feature_shape_of(name, x, feature_axes, arg)
  out = []
  for key, value in zip(names, arrays, strict=True):
    if value is not None and _is_flat(value, shape):
      value = value.reshape(shape)
    elif value is not None and tuple(value.shape) != shape:
      sizes = (f"{math.prod(shape)} (or {shape})" if len(shape) > 1
               else f"{shape[0]}")
      raise ValueError(
          f"{name}: `x` has features of shape {shape} along `{arg}`="
          f"{feature_axes!r} but `{key}` has shape {tuple(value.shape)}; build "
          f"the module with `num_features`={sizes}, or choose the feature "
          f"axes with `{arg}=`.")
    out.append(value)
  return out


class _Promotes(Protocol):
  """A module with Flax's dtype attributes: what :func:`_promote` reads."""

  dtype: Dtype | None
  promote_dtype: PromoteDtypeFn


def _promote(module: _Promotes, arrays: tuple) -> tuple:
  """``module.promote_dtype(arrays, dtype=module.dtype)``, as Flax calls it,
  after checking ``x`` (the first array): Flax's promotion would turn an
  integer ``x`` into floats, where jaxnorm refuses it as the core does."""
  with common.module_errors(type(module).__name__):
    checks.check_array("x", arrays[0])
  return module.promote_dtype(arrays, dtype=module.dtype)


def _affine(shape: tuple[int, ...], *, rngs: nnx.Rngs, use_scale: bool,
            use_bias: bool, scale_init: Initializer, bias_init: Initializer,
            param_dtype: Dtype, scale_metadata: Mapping[str, Any],
            bias_metadata: Mapping[str, Any]) -> tuple[nnx.Param | None, nnx.Param | None]:
  """``(scale, bias)`` as Flax makes them: ``scale``'s key is drawn first.

  Assign them in that order (``self.scale, self.bias = _affine(...)``) so
  that the modules' variables come in Flax's order.
  """
  scale = (nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
           if use_scale else nnx.data(None))
  bias = (nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
          if use_bias else nnx.data(None))
  return scale, bias


def _feature_shape(module: nnx.Module,
                   num_features: int | Sequence[int]) -> tuple[int, ...]:
  """The variables' shape: ``num_features`` as a tuple. Zero sizes are
  allowed, as Flax builds (and runs, on zero-size inputs) such modules."""
  return common.shape_tuple(type(module).__name__, num_features, allow_zero=True)


def _store(module: nnx.Module, args: Mapping[str, Any],
           names: Sequence[str]) -> None:
  """Keeps the constructor arguments ``names`` as attributes, as Flax does."""
  for name in names:
    setattr(module, name, args[name])


def _params(scale: Array | None, bias: Array | None = None) -> dict:
  """The core's ``params`` dict; a None term is left out."""
  return {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}


# The attributes BatchNorm and BatchRenorm keep from flax.nnx.BatchNorm's
# constructor arguments (the initializers and metadata are used, not kept).
_BATCH_NORM_ATTRS = (
    "num_features", "use_running_average", "axis", "momentum", "epsilon",
    "dtype", "param_dtype", "use_bias", "use_scale", "axis_name",
    "axis_index_groups", "use_fast_variance", "promote_dtype")
_NORM_ATTRS = ("num_features", "epsilon", "dtype", "param_dtype", "use_bias",
               "use_scale", "axis_name", "axis_index_groups",
               "use_fast_variance", "promote_dtype")


class _BatchNormShell(nnx.BatchNorm):
  """Mode handling shared by BatchNorm and BatchRenorm (Flax's attributes).

  Attributes (all Flax's, set by ``flax.nnx.BatchNorm.__init__``):
    mean, var: running averages, ``nnx.BatchStat`` (float32).
    scale, bias: ``nnx.Param`` or None.
    num_features, use_running_average, axis, momentum, epsilon, dtype,
    param_dtype, use_bias, use_scale, axis_name, axis_index_groups,
    use_fast_variance, promote_dtype: the constructor's arguments.
  """

  mean: nnx.BatchStat
  var: nnx.BatchStat
  scale: nnx.Param | None
  bias: nnx.Param | None
  # Wider than Flax's `int` on purpose: a tuple for several feature axes.
  num_features: int | Sequence[int]  # type: ignore[assignment]
  use_running_average: bool | None
  # Wider than Flax's `int` on purpose: batch norm over several feature axes.
  axis: Axes  # type: ignore[assignment]
  momentum: float
  epsilon: float
  dtype: Dtype | None
  param_dtype: Dtype
  use_bias: bool
  use_scale: bool
  axis_name: str | None
  axis_index_groups: Any
  use_fast_variance: bool
  promote_dtype: PromoteDtypeFn

  def _init_batch_norm(self, args: Mapping[str, Any]) -> None:
    """Declares the variables and keeps the attributes, as flax.nnx.BatchNorm.

    ``args`` maps the names of ``flax.nnx.BatchNorm``'s constructor arguments
    to their values (the subclass's ``__init__`` passes its ``locals()``);
    ``num_features`` may also be a tuple (several feature axes).
    """
    shape = _feature_shape(self, args["num_features"])
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.scale, self.bias = _affine(
        shape, rngs=args["rngs"], use_scale=args["use_scale"],
        use_bias=args["use_bias"], scale_init=args["scale_init"],
        bias_init=args["bias_init"], param_dtype=args["param_dtype"],
        scale_metadata=args["scale_metadata"], bias_metadata=args["bias_metadata"])
    _store(self, args, _BATCH_NORM_ATTRS)

  def _core(self, params: dict, state: dict, x: Array, *, train: bool,
            axis: int | tuple[int, ...], features: tuple[int, ...],
            mask: Array | None) -> tuple[Array, dict]:
    raise NotImplementedError

  def __call__(self, x: Array, use_running_average: bool | None = None, *,
               mask: Array | None = None) -> Array:
    """Normalizes ``x``; the call's ``use_running_average`` wins over the attribute.

    ``x``, ``mean``, ``var``, ``scale`` and ``bias`` first go through
    ``self.promote_dtype`` (with ``dtype=self.dtype``), as in Flax. At
    inference the promoted ``mean``/``var`` normalize ``x`` (complex when
    ``x`` or the parameters are, as in Flax; the core gets the variance's
    real part, its imaginary part being 0). In training the
    batch's statistics do, and the running averages ``mean``/``var`` are
    updated in place from their stored float32 values (the update carries no
    gradient). ``mask`` (boolean, broadcast to ``x``) selects the entries in
    the statistics and the running averages. A train-mode call with one value
    per feature returns ``bias``, as Flax does, with a :class:`UserWarning`.
    """
    name = type(self).__name__
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          _FLAX_NO_USE_RUNNING_AVERAGE.format(name=name) + " Pass "
          "`use_running_average=True/False` to the constructor or the call, "
          "use `model.train()` / `model.eval()`, or "
          "`nnx.view(model, use_running_average=True/False)`.")
    common.check_hyperparameters(name, epsilon=self.epsilon,
                                 momentum=self.momentum)
    train = not use_running_average
    x, mean, var, scale, bias = _promote(
        self, (x, self.mean[...], self.var[...], _value(self.scale),
               _value(self.bias)))
    shape = common.feature_shape_of(name, x, self.axis, "axis")
    # Flax's reading of `axis` (any iterable; an axis named twice counts once).
    features, axis = common.batch_axes(name, x, self.axis)
    if train and _is_flat(self.mean[...], shape):
      raise ValueError(
          f"{name}: `num_features`={self.num_features!r} stores the running "
          f"averages flat, shape {tuple(self.mean.shape)}, for the features of "
          f"shape {shape} along `axis`={self.axis!r}: inference reshapes them, "
          "as Flax does, but training cannot update them (Flax fails to "
          f"broadcast the batch statistics too). Pass `num_features`={shape} "
          f"to train (a flat state reshapes to it with `.reshape({shape})`).")
    if not train:  # Flax's flat variables for several feature axes
      mean, var, scale, bias = (
          v.reshape(shape) if _is_flat(v, shape) else v
          for v in (mean, var, scale, bias))
    if train:
      state = {"mean": self.mean[...], "var": self.var[...]}
      if self.axis_name is None:
        mask = common.degenerate_batch_mask(name, x, features, mask, warn=True)
    else:
      # Promotion with a complex x or parameters makes the stored float32
      # variance complex with a zero imaginary part; Flax uses it as is
      # (rsqrt of a real positive number). The core takes a real variance,
      # so it gets the real part: the same numbers.
      state = {"mean": mean,
               "var": jnp.real(var) if jnp.iscomplexobj(var) else var}
    with common.module_errors(name):
      y, new_state = self._core(_params(scale, bias), state, x, train=train,
                                axis=axis, features=features, mask=mask)
    if train:
      self.mean[...] = jax.lax.stop_gradient(new_state["mean"])
      self.var[...] = jax.lax.stop_gradient(new_state["var"])
    return y


class BatchNorm(_BatchNormShell):
  """Batch normalization (Ioffe & Szegedy, 2015), a drop-in for ``flax.nnx.BatchNorm``.

  ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` per feature along
  ``axis``: the batch's statistics in training (``use_running_average=False``,
  the default, or after ``model.train()``), the running averages
  ``self.mean``/``self.var`` (shape ``num_features``) at inference
  (``model.eval()``). See :func:`jaxnorm.batch_norm`.

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
  >>> isinstance(bn, nnx.BatchNorm)
  True

  Args:
    num_features: size of ``x`` along ``axis``; for several axes a tuple of
      their sizes, or Flax's int (their product: flat variables, reshaped at
      each call; inference only, as in Flax).
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
      normalized with their own statistics (a batch smaller than one chunk is
      one chunk, with a :class:`UserWarning`).
  """

  virtual_batch_size: int | None

  def __init__(
      self,
      num_features: int | Sequence[int],
      *,
      use_running_average: bool | None = False,
      axis: Axes = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros,
      scale_init: Initializer = initializers.ones,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
      virtual_batch_size: int | None = None,
  ):
    self._init_batch_norm(locals())
    self.virtual_batch_size = virtual_batch_size

  def _core(self, params, state, x, *, train, axis, features, mask):
    k = common.chunk_size(type(self).__name__, x, features,
                          self.virtual_batch_size, warn=True) if train else None
    return jaxnorm.batch_norm(
        params, state, x, train=train, axis=axis, momentum=self.momentum,
        eps=self.epsilon, axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups, mask=mask,
        virtual_batch_size=k, dtype=self.dtype)


class BatchRenorm(_BatchNormShell):
  """Batch renormalization (Ioffe, 2017) with :class:`BatchNorm`'s variables.

  Takes the arguments of ``flax.nnx.BatchNorm`` (as :class:`BatchNorm` does,
  ``promote_dtype`` included, but not ``virtual_batch_size``) plus ``r_max``
  and ``d_max``, the clipping bounds of the corrections
  ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and
  ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``; see
  :func:`jaxnorm.batch_renorm`. Training uses the stored float32 running
  averages for the corrections; inference is :class:`BatchNorm`'s. A subclass
  of ``flax.nnx.BatchNorm``.
  """

  r_max: float
  d_max: float

  def __init__(
      self,
      num_features: int | Sequence[int],
      *,
      use_running_average: bool | None = False,
      axis: Axes = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros,
      scale_init: Initializer = initializers.ones,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
      r_max: float = 3.0,
      d_max: float = 5.0,
  ):
    self._init_batch_norm(locals())
    self.r_max = r_max
    self.d_max = d_max

  def _core(self, params, state, x, *, train, axis, features, mask):
    del features
    return jaxnorm.batch_renorm(
        params, state, x, train=train, r_max=self.r_max, d_max=self.d_max,
        axis=axis, momentum=self.momentum, eps=self.epsilon,
        axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
        mask=mask, dtype=self.dtype)


class LayerNorm(nnx.LayerNorm):
  """Layer normalization (Ba et al., 2016), a drop-in for ``flax.nnx.LayerNorm``.

  ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with each example's
  statistics over ``reduction_axes``; ``scale``/``bias`` of shape
  ``num_features`` run along ``feature_axes`` (for several feature axes, a
  tuple of their sizes, or Flax's int, their product, reshaped at each
  call). Built by
  ``flax.nnx.LayerNorm.__init__`` (same arguments and attributes); see
  :func:`jaxnorm.layer_norm`.

  Attributes:
    scale, bias: ``nnx.Param`` or None.
    num_features, epsilon, dtype, param_dtype, use_bias, use_scale,
    reduction_axes, feature_axes, axis_name, axis_index_groups,
    use_fast_variance, promote_dtype: the constructor's arguments.
    zero_centered_scale: store the scale as ``scale - 1`` (zeros at init,
      applied as ``1 + scale``; Gemma's convention).
  """

  scale: nnx.Param | None
  bias: nnx.Param | None
  # Wider than Flax's `int` on purpose: a tuple for several feature axes.
  num_features: int | Sequence[int]  # type: ignore[assignment]
  epsilon: float
  dtype: Dtype | None
  param_dtype: Dtype
  use_bias: bool
  use_scale: bool
  reduction_axes: Axes
  feature_axes: Axes
  axis_name: str | None
  axis_index_groups: Any
  use_fast_variance: bool
  promote_dtype: PromoteDtypeFn
  zero_centered_scale: bool

  def __init__(
      self,
      num_features: int | Sequence[int],
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros,
      scale_init: Initializer = initializers.ones,
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
      zero_centered_scale: bool = False,
  ):
    if zero_centered_scale and scale_init is initializers.ones:
      scale_init = initializers.zeros
    self.scale, self.bias = _affine(
        _feature_shape(self, num_features), rngs=rngs, use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init,
        param_dtype=param_dtype, scale_metadata=scale_metadata,
        bias_metadata=bias_metadata)
    _store(self, locals(), _NORM_ATTRS + ("reduction_axes", "feature_axes"))
    self.zero_centered_scale = zero_centered_scale

  def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
    """Normalizes ``x``; ``mask`` selects the entries in the statistics."""
    name = type(self).__name__
    common.check_hyperparameters(name, epsilon=self.epsilon)
    scale, bias = _flax_affine(self, x, ("scale", "bias"))
    x, scale, bias = _promote(self, (x, scale, bias))
    reduction_axes, feature_axes = common.check_axes(
        name, x, reduction_axes=self.reduction_axes,
        feature_axes=self.feature_axes)
    scale, bias = _to_features(name, x, "feature_axes", self.feature_axes,
                               (scale, bias), ("scale", "bias"))
    with common.module_errors(name):
      return jaxnorm.layer_norm(
          _params(scale, bias), x, axis=reduction_axes,
          feature_axes=feature_axes, eps=self.epsilon, mask=mask,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          dtype=self.dtype, zero_centered_scale=self.zero_centered_scale)


class RMSNorm(nnx.RMSNorm):
  """RMS normalization (Zhang & Sennrich, 2019), a drop-in for ``flax.nnx.RMSNorm``.

  ``y = x / sqrt(mean(x**2) + epsilon) * scale`` over ``reduction_axes``;
  ``scale`` runs along ``feature_axes`` (``num_features`` as in
  :class:`LayerNorm`). Built by ``flax.nnx.RMSNorm.__init__``; see :func:`jaxnorm.rms_norm`.

  Attributes:
    scale: ``nnx.Param`` or None.
    num_features, epsilon, dtype, param_dtype, use_scale, reduction_axes,
    feature_axes, axis_name, axis_index_groups, use_fast_variance,
    promote_dtype: the constructor's arguments.
    zero_centered_scale: store the scale as ``scale - 1`` (zeros at init,
      applied as ``1 + scale``).
  """

  scale: nnx.Param | None
  # Wider than Flax's `int` on purpose: a tuple for several feature axes.
  num_features: int | Sequence[int]  # type: ignore[assignment]
  epsilon: float
  dtype: Dtype | None
  param_dtype: Dtype
  use_scale: bool
  reduction_axes: Axes
  feature_axes: Axes
  axis_name: str | None
  axis_index_groups: Any
  use_fast_variance: bool
  promote_dtype: PromoteDtypeFn
  zero_centered_scale: bool

  def __init__(
      self,
      num_features: int | Sequence[int],
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_scale: bool = True,
      scale_init: Initializer = initializers.ones,
      reduction_axes: Axes = -1,
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
      zero_centered_scale: bool = False,
  ):
    if zero_centered_scale and scale_init is initializers.ones:
      scale_init = initializers.zeros
    if use_scale:
      self.scale = nnx.Param(
          scale_init(rngs.params(), _feature_shape(self, num_features), param_dtype),
          **scale_metadata)
    else:
      self.scale = nnx.data(None)
    _store(self, locals(), tuple(n for n in _NORM_ATTRS if n != "use_bias")
           + ("reduction_axes", "feature_axes"))
    self.zero_centered_scale = zero_centered_scale

  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    """Normalizes ``x``; ``mask`` selects the entries in the statistics."""
    name = type(self).__name__
    common.check_hyperparameters(name, epsilon=self.epsilon)
    scale, = _flax_affine(self, x, ("scale",))
    x, scale = _promote(self, (x, scale))
    reduction_axes, feature_axes = common.check_axes(
        name, x, reduction_axes=self.reduction_axes,
        feature_axes=self.feature_axes)
    scale, = _to_features(name, x, "feature_axes", self.feature_axes, (scale,),
                          ("scale",))
    with common.module_errors(name):
      return jaxnorm.rms_norm(
          _params(scale), x, axis=reduction_axes,
          feature_axes=feature_axes, eps=self.epsilon, mask=mask,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          dtype=self.dtype, zero_centered_scale=self.zero_centered_scale)


class GroupNorm(nnx.GroupNorm):
  """Group normalization (Wu & He, 2018), a drop-in for ``flax.nnx.GroupNorm``.

  Channels last: ``num_features`` channels split into ``num_groups`` groups
  (or groups of ``group_size`` with ``num_groups=None``), each example's group
  normalized over its channels and ``reduction_axes`` (default: every axis
  but the first). Built by ``flax.nnx.GroupNorm.__init__`` after jaxnorm's
  check of the groups (Flax's messages, with the values); see
  :func:`jaxnorm.group_norm`.

  Attributes:
    scale, bias: ``nnx.Param`` or None.
    num_groups, group_size, epsilon, dtype, param_dtype,
    use_bias, use_scale, reduction_axes, axis_name, axis_index_groups,
    use_fast_variance, promote_dtype: the constructor's arguments
    (``num_groups``/``group_size`` resolved to ints; no ``num_features``,
    as in Flax).
    feature_axis: -1, the channel axis.
  """

  scale: nnx.Param | None
  bias: nnx.Param | None
  feature_axis: int
  num_groups: int
  group_size: int
  epsilon: float
  dtype: Dtype | None
  param_dtype: Dtype
  use_bias: bool
  use_scale: bool
  reduction_axes: Axes | None
  axis_name: str | None
  axis_index_groups: Any
  use_fast_variance: bool
  promote_dtype: PromoteDtypeFn

  def __init__(
      self,
      num_features: int,
      num_groups: int | None = 32,
      group_size: int | None = None,
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros,
      scale_init: Initializer = initializers.ones,
      reduction_axes: Axes | None = None,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
  ):
    groups = common.resolve_groups(type(self).__name__, num_features,
                                   num_groups, group_size)
    self.scale, self.bias = _affine(
        (num_features,), rngs=rngs, use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init, param_dtype=param_dtype,
        scale_metadata=scale_metadata, bias_metadata=bias_metadata)
    self.feature_axis = -1
    _store(self, locals(), tuple(n for n in _NORM_ATTRS if n != "num_features")
           + ("reduction_axes",))
    self.num_groups = groups
    # As in Flax: the given group_size, else the channels per group (zero
    # channels in groups of 2 make 0 groups of 2).
    self.group_size = num_features // groups if group_size is None else group_size

  def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
    """Normalizes ``x`` of shape ``(N, ..., C)``."""
    name = type(self).__name__
    common.check_hyperparameters(name, epsilon=self.epsilon)
    with common.module_errors(name):
      checks.check_array("x", x)
    channels = self.num_groups * self.group_size
    if x.ndim and x.shape[-1] != channels:  # Flax's reshape to groups fails
      raise ValueError(
          f"{name}: `x` has {x.shape[-1]} channels (shape {tuple(x.shape)}) but "
          f"the module was built for {channels} (`num_features`: "
          f"{self.num_groups} groups of {self.group_size}); build it with "
          f"`num_features`={x.shape[-1]}.")
    scale, bias = _flax_affine(self, x, ("scale", "bias"))
    x, scale, bias = _promote(self, (x, scale, bias))
    reduction_axes = common.check_group_reduction_axes(name, x,
                                                       self.reduction_axes)
    # Zero channels in groups of `group_size` make 0 groups (Flax's count);
    # the core needs a positive one, and any gives the same empty output.
    num_groups = self.num_groups or 1
    with common.module_errors(name):
      return jaxnorm.group_norm(
          _params(scale, bias), x, num_groups=num_groups, eps=self.epsilon,
          mask=mask, reduction_axes=reduction_axes,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          dtype=self.dtype)


class InstanceNorm(nnx.InstanceNorm):
  """Instance normalization (Ulyanov et al., 2016), a drop-in for ``flax.nnx.InstanceNorm``.

  Each example and feature is normalized over every axis but the first and
  ``feature_axes``. Built by ``flax.nnx.InstanceNorm.__init__``; see
  :func:`jaxnorm.instance_norm`. An input with nothing to reduce over
  (``(N, C)``) gives ``bias``, as in Flax, with a :class:`UserWarning`.
  ``num_features`` for several feature axes is as in :class:`LayerNorm`.

  Attributes:
    scale, bias: ``nnx.Param`` or None.
    num_features, epsilon, dtype, param_dtype, use_bias, use_scale,
    feature_axes, axis_name, axis_index_groups, use_fast_variance,
    promote_dtype: the constructor's arguments.
  """

  scale: nnx.Param | None
  bias: nnx.Param | None
  # Wider than Flax's `int` on purpose: a tuple for several feature axes.
  num_features: int | Sequence[int]  # type: ignore[assignment]
  epsilon: float
  dtype: Dtype | None
  param_dtype: Dtype
  use_bias: bool
  use_scale: bool
  feature_axes: Axes
  axis_name: str | None
  axis_index_groups: Any
  use_fast_variance: bool
  promote_dtype: PromoteDtypeFn

  def __init__(
      self,
      num_features: int | Sequence[int],
      *,
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros,
      scale_init: Initializer = initializers.ones,
      feature_axes: Axes = -1,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = True,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = _NO_METADATA,
      scale_metadata: Mapping[str, Any] = _NO_METADATA,
  ):
    self.scale, self.bias = _affine(
        _feature_shape(self, num_features), rngs=rngs, use_scale=use_scale, use_bias=use_bias,
        scale_init=scale_init, bias_init=bias_init,
        param_dtype=param_dtype, scale_metadata=scale_metadata,
        bias_metadata=bias_metadata)
    _store(self, locals(), _NORM_ATTRS + ("feature_axes",))

  def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
    """Normalizes ``x`` of shape ``(N, spatial..., C)``."""
    name = type(self).__name__
    common.check_hyperparameters(name, epsilon=self.epsilon)
    axes = common.instance_norm_axes(name, x, self.feature_axes)
    scale, bias = _flax_affine(self, x, ("scale", "bias"))
    x, scale, bias = _promote(self, (x, scale, bias))
    scale, bias = _to_features(name, x, "feature_axes", self.feature_axes,
                               (scale, bias), ("scale", "bias"))
    xv, axes_v, mask_v, undo = common.instance_norm_view(name, x, axes, mask,
                                                         warn=True)
    with common.module_errors(name):
      return undo(jaxnorm.instance_norm(
          _params(scale, bias), xv, eps=self.epsilon, mask=mask_v, axis=axes_v,
          axis_name=self.axis_name, axis_index_groups=self.axis_index_groups,
          dtype=self.dtype))
