"""``flax.nnx`` modules of the modern normalizations: thin shells over the core.

The same layers as :mod:`jaxnorm._src.linen_modern`, with nnx's conventions:
sizes first and ``rngs`` in the constructor, parameters as ``nnx.Param``
attributes named as the functional ``params`` keys, running statistics as
``nnx.BatchStat``, initializers used and not kept, and each call passing the
input and the parameters through ``promote_dtype`` (``dtype=self.dtype``) as
Flax's nnx layers do. This module does not import ``flax.linen``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Iterable
from types import MappingProxyType
from typing import Any
from typing import cast

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes
from flax.typing import Dtype
from flax.typing import PromoteDtypeFn
from jax.nn import initializers
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src import conditional as cond_lib
from jaxnorm._src import dyt as dyt_lib
from jaxnorm._src import frn as frn_lib
from jaxnorm._src import precise_bn as precise_lib
from jaxnorm._src import qk_norm as qk_lib
from jaxnorm._src import weight_standardization as ws_lib
from jaxnorm._src.module_common import canonical_axes
from jaxnorm._src.module_common import module_errors
from jaxnorm._src.module_common import shape_tuple
from jaxnorm._src.nnx_norm import BatchNorm as _JaxnormBatchNorm
from jaxnorm._src.nnx_norm import BatchRenorm as _JaxnormBatchRenorm
from jaxnorm._src.nnx_wrappers import _swapped

Array = jax.Array
Initializer = Callable[..., Array]
_NO_METADATA: MappingProxyType[str, Any] = MappingProxyType({})


def _param(init, rngs, shape, dtype, metadata=_NO_METADATA):
  return nnx.Param(init(rngs.params(), shape, dtype), **metadata)


def _value(var):
  return None if var is None else var[...]


def _promote(module, arrays, names=("x",)):
  """Checks the leading inputs, then ``module.promote_dtype`` as Flax calls it."""
  with module_errors(type(module).__name__):
    for name, a in zip(names, arrays, strict=False):  # the leading ones only
      checks.check_array(name, a, allow_complex=False)
  return module.promote_dtype(arrays, dtype=module.dtype)


class _Projected(nnx.Module):
  """FiLM and AdaLNZero: a ``(D, parts * C)`` projection of the condition."""

  kernel: nnx.Param
  bias: nnx.Param

  def _init_projection(self, cond_features, num_features, parts, *, kernel_init,
                       bias_init, param_dtype, rngs):
    d = checks.check_positive_int("cond_features", cond_features)
    c = checks.check_positive_int("num_features", num_features)
    self.kernel = _param(kernel_init, rngs, (d, parts * c), param_dtype)
    self.bias = _param(bias_init, rngs, (parts * c,), param_dtype)

  def _params(self, x, cond):
    x, cond, kernel, bias = _promote(
        self, (x, cond, self.kernel[...], self.bias[...]), ("x", "cond"))
    return x, cond, {"kernel": kernel, "bias": bias}


class FiLM(_Projected):
  """FiLM of a normalized input (Perez et al., 2018); see :func:`jaxnorm.film`.

  ``y = norm(x) * (1 + gamma(c)) + beta(c)`` with
  ``[gamma, beta] = c @ kernel + bias``; ``kernel`` ``(D, 2C)`` and ``bias``
  ``(2C,)`` zero-initialized by default.

  >>> import jax.numpy as jnp, jaxnorm.nnx as jn
  >>> from flax import nnx
  >>> film = jn.FiLM(5, 3, rngs=nnx.Rngs(0))
  >>> film(jnp.ones((2, 4, 3)), jnp.ones((2, 5))).shape
  (2, 4, 3)
  """

  norm: str | None
  epsilon: float
  num_groups: int | None
  dtype: Dtype | None
  param_dtype: Dtype
  promote_dtype: PromoteDtypeFn

  def __init__(
      self,
      cond_features: int,
      num_features: int,
      *,
      norm: str | None = "layer",
      epsilon: float = 1e-6,
      num_groups: int | None = 32,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      kernel_init: Initializer = initializers.zeros,
      bias_init: Initializer = initializers.zeros,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    self._init_projection(cond_features, num_features, 2, kernel_init=kernel_init,
                          bias_init=bias_init, param_dtype=param_dtype, rngs=rngs)
    self.norm = norm
    self.epsilon = epsilon
    self.num_groups = num_groups
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def __call__(self, x: ArrayLike, cond: ArrayLike, *,
               mask: ArrayLike | None = None) -> Array:
    """Modulates ``norm(x)`` (``(N, ..., C)``) by ``cond`` (``(N, D)``)."""
    x, cond, params = self._params(x, cond)
    with module_errors(type(self).__name__):
      return cond_lib.film(params, x, cond, norm=self.norm, eps=self.epsilon,
                           num_groups=self.num_groups, mask=mask, dtype=self.dtype)


class AdaLNZero(_Projected):
  """adaLN-Zero (Peebles & Xie, 2023, DiT); returns ``(h, gate)`` for ``x + gate * f(h)``.

  ``[shift, scale, gate] = c @ kernel + bias`` (zeros at init: the block is
  the identity) and ``h = LN(x) * (1 + scale) + shift``; see
  :func:`jaxnorm.adaln_zero`.

  >>> import jax.numpy as jnp, jaxnorm.nnx as jn
  >>> from flax import nnx
  >>> ada, f = jn.AdaLNZero(5, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 3, rngs=nnx.Rngs(1))
  >>> x, c = jnp.ones((2, 4, 3)), jnp.ones((2, 5))
  >>> h, gate = ada(x, c)
  >>> bool(jnp.all(x + gate * f(h) == x))
  True
  """

  norm: str
  epsilon: float
  dtype: Dtype | None
  param_dtype: Dtype
  promote_dtype: PromoteDtypeFn

  def __init__(
      self,
      cond_features: int,
      num_features: int,
      *,
      norm: str = "layer",
      epsilon: float = 1e-6,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      kernel_init: Initializer = initializers.zeros,
      bias_init: Initializer = initializers.zeros,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    self._init_projection(cond_features, num_features, 3, kernel_init=kernel_init,
                          bias_init=bias_init, param_dtype=param_dtype, rngs=rngs)
    self.norm = norm
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def __call__(self, x: ArrayLike, cond: ArrayLike, *,
               mask: ArrayLike | None = None) -> tuple[Array, Array]:
    """Returns ``(h, gate)``."""
    x, cond, params = self._params(x, cond)
    with module_errors(type(self).__name__):
      return cond_lib.adaln_zero(params, x, cond, norm=self.norm, eps=self.epsilon,
                                 mask=mask, dtype=self.dtype)


class ConditionalBatchNorm(nnx.Module):
  """Class-conditional batch norm (de Vries et al., 2017): one scale/bias row per class.

  ``mean``/``var`` (``nnx.BatchStat``, float32, shape ``(C,)``) as
  :class:`jaxnorm.nnx.BatchNorm`; ``scale``/``bias`` of shape
  ``(num_classes, C)``. ``model.train()``/``model.eval()`` switch the mode.
  See :func:`jaxnorm.conditional_batch_norm`.

  >>> import jax.numpy as jnp, jaxnorm.nnx as jn
  >>> from flax import nnx
  >>> cbn = jn.ConditionalBatchNorm(10, 3, rngs=nnx.Rngs(0))
  >>> cbn(jnp.ones((4, 3)), jnp.array([0, 1, 2, 3])).shape, cbn.scale.shape
  ((4, 3), (10, 3))
  """

  mean: nnx.BatchStat
  var: nnx.BatchStat
  scale: nnx.Param | None
  bias: nnx.Param | None
  num_classes: int
  num_features: int
  use_running_average: bool | None
  momentum: float
  epsilon: float
  dtype: Dtype | None
  param_dtype: Dtype
  use_bias: bool
  use_scale: bool
  axis_name: str | None
  promote_dtype: PromoteDtypeFn

  def __init__(
      self,
      num_classes: int,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Initializer = initializers.zeros,
      scale_init: Initializer = initializers.ones,
      axis_name: str | None = None,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    k = checks.check_positive_int("num_classes", num_classes)
    c = checks.check_positive_int("num_features", num_features)
    self.mean = nnx.BatchStat(jnp.zeros((c,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((c,), jnp.float32))
    self.scale = _param(scale_init, rngs, (k, c), param_dtype) if use_scale else nnx.data(None)
    self.bias = _param(bias_init, rngs, (k, c), param_dtype) if use_bias else nnx.data(None)
    self.num_classes = k
    self.num_features = c
    self.use_running_average = use_running_average
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.axis_name = axis_name
    self.promote_dtype = promote_dtype

  def __call__(self, x: ArrayLike, labels: ArrayLike,
               use_running_average: bool | None = None, *,
               mask: ArrayLike | None = None) -> Array:
    """Normalizes ``x`` (``(N, ..., C)``) with the rows ``labels`` (``(N,)``, int)."""
    name = type(self).__name__
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError(
          f"{name}: `use_running_average` is None both in the constructor and "
          "in the call; pass `use_running_average=True/False` to either, or "
          "use `model.train()` / `model.eval()`.")
    train = not use_running_average
    x, scale, bias = _promote(self, (x, _value(self.scale), _value(self.bias)))
    params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
    with module_errors(name):
      y, new = cond_lib.conditional_batch_norm(
          params, {"mean": self.mean[...], "var": self.var[...]}, x, labels,
          train=train, momentum=self.momentum, eps=self.epsilon,
          axis_name=self.axis_name, mask=mask, dtype=self.dtype)
    if train:
      self.mean[...] = jax.lax.stop_gradient(new["mean"])
      self.var[...] = jax.lax.stop_gradient(new["var"])
    return y

  def set_view(self, use_running_average: bool | None = None) -> None:
    """Used by ``nnx.view(model, use_running_average=...)``."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class AdaIN(nnx.Module):
  """Adaptive instance normalization (Huang & Belongie, 2017); no parameters.

  See :func:`jaxnorm.adain`.

  >>> import jax.numpy as jnp, jaxnorm.nnx as jn
  >>> jn.AdaIN()(jnp.ones((1, 4, 2)), jnp.ones((1, 3, 2))).shape
  (1, 4, 2)
  """

  epsilon: float

  def __init__(self, *, epsilon: float = 1e-5):
    self.epsilon = epsilon

  def __call__(self, content: ArrayLike, style: ArrayLike) -> Array:
    """Restyles ``content`` (``(N, spatial..., C)``) with ``style``'s statistics."""
    with module_errors(type(self).__name__):
      return cond_lib.adain(content, style, eps=self.epsilon)


class _Scale(nnx.Module):
  """Holds one QK-norm scale, at ``query_norm.scale`` / ``key_norm.scale``."""

  def __init__(self, scale: nnx.Param):
    self.scale = scale


class QKNorm(nnx.Module):
  """QK normalization (Dehghani et al., 2023) over ``head_dim``; see :func:`jaxnorm.qk_norm`.

  ``self.query_norm.scale`` and ``self.key_norm.scale`` of shape
  ``(head_dim,)`` (the layout of :func:`jaxnorm.qk_norm_init`). For
  ``flax.nnx.MultiHeadAttention`` use :class:`QKNormAttention` as its
  ``attention_fn``.

  >>> import jax.numpy as jnp, jaxnorm.nnx as jn
  >>> from flax import nnx
  >>> q, k = jn.QKNorm(4, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 2, 4)), jnp.ones((1, 5, 2, 4)))
  >>> q.shape, k.shape
  ((1, 3, 2, 4), (1, 5, 2, 4))
  """

  head_dim: int
  kind: str
  epsilon: float
  use_scale: bool
  dtype: Dtype | None
  param_dtype: Dtype
  promote_dtype: PromoteDtypeFn
  query_norm: _Scale
  key_norm: _Scale

  def __init__(
      self,
      head_dim: int,
      *,
      kind: str = "rms",
      epsilon: float = 1e-6,
      use_scale: bool = True,
      scale_init: Initializer = initializers.ones,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    d = checks.check_positive_int("head_dim", head_dim)
    qk_lib.check_kind(kind)
    if use_scale:
      self.query_norm = _Scale(_param(scale_init, rngs, (d,), param_dtype))
      self.key_norm = _Scale(_param(scale_init, rngs, (d,), param_dtype))
    else:
      # Without scales both are None (checked in __call__).
      self.query_norm = nnx.data(None)  # type: ignore[assignment]
      self.key_norm = nnx.data(None)  # type: ignore[assignment]
    self.head_dim = d
    self.kind = kind
    self.epsilon = epsilon
    self.use_scale = use_scale
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def __call__(self, query: ArrayLike, key: ArrayLike) -> tuple[Array, Array]:
    """Returns the normalized ``(query, key)``, ``(..., length, heads, head_dim)``."""
    with module_errors(type(self).__name__):
      checks.check_array("query", query, allow_complex=False)
      checks.check_array("key", key, allow_complex=False)
    scales = ((None, None) if self.query_norm is None else
              (self.query_norm.scale[...], self.key_norm.scale[...]))
    query, key, q_scale, k_scale = self.promote_dtype(
        (query, key) + scales, dtype=self.dtype)
    params = {} if q_scale is None else {"query_norm": {"scale": q_scale},
                                         "key_norm": {"scale": k_scale}}
    with module_errors(type(self).__name__):
      return qk_lib.qk_norm(params, query, key, kind=self.kind, eps=self.epsilon,
                            dtype=self.dtype)


class QKNormAttention(QKNorm):
  """An ``attention_fn`` with QK-norm for ``flax.nnx.MultiHeadAttention``.

  Normalizes the projected queries and keys as :class:`QKNorm` (whose
  arguments it takes) and calls ``attention_fn``
  (``flax.nnx.dot_product_attention`` by default) with everything else.
  Its scales become part of the attention module's state.

  >>> import jax.numpy as jnp, jaxnorm.nnx as jn
  >>> from flax import nnx
  >>> mha = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
  ...                              attention_fn=jn.QKNormAttention(4, rngs=nnx.Rngs(0)),
  ...                              rngs=nnx.Rngs(1))
  >>> mha(jnp.ones((1, 3, 8))).shape
  (1, 3, 8)
  """

  attention_fn: Callable[..., Array]

  def __init__(self, head_dim: int, *,
               attention_fn: Callable[..., Array] = nnx.dot_product_attention,
               **kwargs):
    super().__init__(head_dim, **kwargs)
    self.attention_fn = attention_fn

  def __call__(  # type: ignore[override]  # attention_fn's signature, by design
      self, query: ArrayLike, key: ArrayLike, value: ArrayLike, *args, **kwargs) -> Array:
    """``attention_fn(norm(query), norm(key), value, *args, **kwargs)``."""
    query, key = super().__call__(query, key)
    return self.attention_fn(query, key, value, *args, **kwargs)


class DyT(nnx.Module):
  """Dynamic Tanh (Zhu et al., 2025), a drop-in for ``nnx.LayerNorm``.

  ``y = scale * tanh(alpha * x) + bias``, elementwise with a learned scalar ``alpha``.

  ``self.alpha`` (scalar, ``alpha_init_value``), ``self.scale`` (ones) and
  ``self.bias`` (zeros) of shape ``num_features``; see :func:`jaxnorm.dyt`.

  >>> import jax.numpy as jnp, jaxnorm.nnx as jn
  >>> from flax import nnx
  >>> dyt = jn.DyT(3, rngs=nnx.Rngs(0))
  >>> float(dyt.alpha[...]), dyt(jnp.ones((2, 3))).shape
  (0.5, (2, 3))
  """

  alpha: nnx.Param
  scale: nnx.Param | None
  bias: nnx.Param | None
  num_features: int | tuple[int, ...]
  feature_axes: Any
  use_scale: bool
  use_bias: bool
  dtype: Dtype | None
  param_dtype: Dtype
  promote_dtype: PromoteDtypeFn

  def __init__(
      self,
      num_features: int | tuple[int, ...],
      *,
      alpha_init_value: float = 0.5,
      use_scale: bool = True,
      use_bias: bool = True,
      scale_init: Initializer = initializers.ones,
      bias_init: Initializer = initializers.zeros,
      feature_axes: Any = -1,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    shape = shape_tuple(type(self).__name__, num_features)
    self.alpha = nnx.Param(jnp.asarray(alpha_init_value, param_dtype))
    self.scale = _param(scale_init, rngs, shape, param_dtype) if use_scale else nnx.data(None)
    self.bias = _param(bias_init, rngs, shape, param_dtype) if use_bias else nnx.data(None)
    self.num_features = num_features
    self.feature_axes = feature_axes
    self.use_scale = use_scale
    self.use_bias = use_bias
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def __call__(self, x: ArrayLike, *, mask: ArrayLike | None = None) -> Array:
    """Applies DyT; ``mask`` is accepted for LayerNorm compatibility (DyT is element-wise)."""
    del mask
    x, alpha, scale, bias = _promote(
        self, (x, self.alpha[...], _value(self.scale), _value(self.bias)))
    params = {"alpha": alpha}
    params.update({k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None})
    with module_errors(type(self).__name__):
      return dyt_lib.dyt(params, x, axis=self.feature_axes, dtype=self.dtype)


class FilterResponseNorm(nnx.Module):
  """Filter response normalization + TLU (Singh & Krishnan, 2020); see :func:`jaxnorm.frn`.

  ``self.scale``, ``self.bias``, ``self.tau`` of shape ``(C,)`` and, with
  ``learn_epsilon``, a scalar ``self.eps`` (effective epsilon
  ``epsilon + |eps|``).

  >>> import jax.numpy as jnp, jaxnorm.nnx as jn
  >>> from flax import nnx
  >>> jn.FilterResponseNorm(3, rngs=nnx.Rngs(0))(jnp.ones((2, 4, 4, 3))).shape
  (2, 4, 4, 3)
  """

  scale: nnx.Param
  bias: nnx.Param
  tau: nnx.Param | None
  eps: nnx.Param | None
  num_features: int
  epsilon: float
  use_tlu: bool
  learn_epsilon: bool
  dtype: Dtype | None
  param_dtype: Dtype
  promote_dtype: PromoteDtypeFn

  def __init__(
      self,
      num_features: int,
      *,
      epsilon: float = 1e-6,
      use_tlu: bool = True,
      learn_epsilon: bool = False,
      eps_init: float = 1e-4,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      scale_init: Initializer = initializers.ones,
      bias_init: Initializer = initializers.zeros,
      tau_init: Initializer = initializers.zeros,
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    c = (checks.check_positive_int("num_features", num_features),)
    self.scale = _param(scale_init, rngs, c, param_dtype)
    self.bias = _param(bias_init, rngs, c, param_dtype)
    self.tau = _param(tau_init, rngs, c, param_dtype) if use_tlu else nnx.data(None)
    self.eps = (nnx.Param(jnp.asarray(eps_init, param_dtype)) if learn_epsilon
                else nnx.data(None))
    self.num_features = c[0]
    self.epsilon = epsilon
    self.use_tlu = use_tlu
    self.learn_epsilon = learn_epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.promote_dtype = promote_dtype

  def __call__(self, x: ArrayLike, *, mask: ArrayLike | None = None) -> Array:
    """Normalizes ``x`` of shape ``(N, spatial..., C)``."""
    values = _promote(self, (x, self.scale[...], self.bias[...], _value(self.tau),
                             _value(self.eps)))
    x = values[0]
    params = {k: v for k, v in zip(("scale", "bias", "tau", "eps"), values[1:], strict=True)
              if v is not None}
    with module_errors(type(self).__name__):
      return frn_lib.frn(params, x, eps=self.epsilon, mask=mask, dtype=self.dtype)


class WeightStandardization(nnx.Module):
  """(Scaled) weight standardization of a wrapped layer's parameters.

  Each parameter of ``layer_instance`` selected by ``variable_filter`` (the
  kernel by default) is used as :func:`jaxnorm.weight_standardization` of
  itself (Qiao et al., 2019) or, with ``scaled=True``,
  :func:`jaxnorm.scaled_weight_standardization` (Brock et al., 2021) with a
  learned gain of the output's shape in ``self.gains[path]`` (``nnx.Param``,
  ones). As :class:`jaxnorm.nnx.WeightNorm`, the standardized values are put
  in for the duration of the call only; the layer keeps the raw parameters.

  >>> import jax.numpy as jnp, jaxnorm.nnx as jn
  >>> from flax import nnx
  >>> m = jn.WeightStandardization(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), scaled=True,
  ...                              gamma="relu", rngs=nnx.Rngs(1))
  >>> m(jnp.ones((2, 3))).shape
  (2, 4)
  """

  layer_instance: nnx.Module
  scaled: bool
  gamma: float | str
  use_gain: bool
  epsilon: float
  feature_axes: Any
  param_dtype: Dtype
  variable_filter: Callable[..., bool]
  gains: dict | None

  def __init__(
      self,
      layer_instance: nnx.Module,
      *,
      scaled: bool = False,
      gamma: float | str = 1.0,
      use_gain: bool = True,
      epsilon: float | None = None,
      feature_axes: Any = -1,
      param_dtype: Dtype = jnp.float32,
      variable_filter: Any = nnx.PathContains("kernel"),
      rngs: nnx.Rngs,
  ):
    self.layer_instance = layer_instance
    self.scaled = scaled
    self.gamma = gamma
    self.use_gain = use_gain
    self.epsilon = (1e-4 if scaled else 1e-6) if epsilon is None else epsilon
    self.feature_axes = feature_axes
    self.param_dtype = param_dtype
    self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
    gains = None
    if scaled and use_gain:
      gains = {}
      for path, param in nnx.to_flat_state(nnx.state(layer_instance, nnx.Param)):
        if self.variable_filter(path, param):
          out = checks.normalize_axes("feature_axes", feature_axes, param.ndim)
          gains[path] = nnx.Param(jnp.ones(tuple(param.shape[a] for a in out),
                                           param_dtype))
    self.gains = nnx.data(gains)

  def _standardized(self):
    pairs = []
    for path, param in nnx.to_flat_state(nnx.state(self.layer_instance, nnx.Param)):
      if not self.variable_filter(path, param):
        continue
      value = param.get_value()
      with module_errors(type(self).__name__):
        if self.scaled:
          gain = None if self.gains is None else self.gains[path].get_value()
          new = ws_lib.scaled_weight_standardization(
              value, gain, axis=self.feature_axes, gamma=self.gamma, eps=self.epsilon)
        else:
          new = ws_lib.weight_standardization(value, axis=self.feature_axes,
                                              eps=self.epsilon)
      pairs.append((param, new))
    return pairs

  def __call__(self, *args, **kwargs):
    """Calls the wrapped layer with its selected parameters standardized."""
    with _swapped(self._standardized()):
      return self.layer_instance(*args, **kwargs)


class StdConv(nnx.Conv):
  """``nnx.Conv`` with a weight-standardized kernel (BiT's StdConv; Qiao et al., 2019).

  ``nnx.Conv``'s constructor (plus ``ws_epsilon``) and attributes: the stored
  ``self.kernel`` stays raw and is standardized over its fan-in for each call
  (:func:`jaxnorm.weight_standardization`).

  >>> import jax.numpy as jnp, jaxnorm.nnx as jn
  >>> from flax import nnx
  >>> jn.StdConv(2, 8, (3, 3), rngs=nnx.Rngs(0))(jnp.ones((1, 5, 5, 2))).shape
  (1, 5, 5, 8)
  """

  ws_epsilon: float

  def __init__(self, *args, ws_epsilon: float = 1e-6, **kwargs):
    super().__init__(*args, **kwargs)
    self.ws_epsilon = ws_epsilon

  def __call__(self, inputs: ArrayLike, *args, **kwargs) -> Array:
    """``nnx.Conv.__call__`` with the standardized kernel."""
    with module_errors(type(self).__name__):
      kernel = ws_lib.weight_standardization(self.kernel.get_value(), axis=-1,
                                             eps=self.ws_epsilon)
    with _swapped([(self.kernel, kernel)]):
      return super().__call__(cast(Array, inputs), *args, **kwargs)


# -- Precise batch statistics ---------------------------------------------------

BATCH_NORM_TYPES = (_JaxnormBatchNorm, _JaxnormBatchRenorm, nnx.BatchNorm)


@contextlib.contextmanager
def _hooked_batch_norms(hook):
  """Routes every BatchNorm call through ``hook(module, x, mask)`` in inference mode.

  The classes' ``__call__`` is replaced for the duration of the block (and
  restored after); not thread-safe.
  """
  saved = []
  for cls in BATCH_NORM_TYPES:
    original = cls.__call__

    def call(self, x, use_running_average=None, *, mask=None, _original=original):
      hook(self, x, mask)
      return _original(self, x, True, mask=mask)

    saved.append((cls, cls.__dict__.get("__call__")))
    cls.__call__ = call  # type: ignore[method-assign]
  try:
    yield
  finally:
    for cls, own_call in saved:
      if own_call is None:
        del cls.__call__
      else:
        cls.__call__ = own_call  # type: ignore[method-assign]


def _as_args(batch):
  return batch if isinstance(batch, tuple) else (batch,)


def precise_batch_stats(
    model: nnx.Module,
    batches: Iterable,
    *,
    unbiased: bool = False,
    **call_kwargs: Any,
) -> None:
  """Recomputes every BatchNorm's ``mean``/``var`` of an nnx model exactly, in place.

  As :func:`jaxnorm.linen.precise_batch_stats`: for each batch-norm layer
  (``jaxnorm.nnx.BatchNorm``, ``BatchRenorm``, ``flax.nnx.BatchNorm``) in the
  order the model calls them, the population mean and variance (biased, or
  unbiased) of its inputs over all ``batches``, every earlier layer already
  using its new statistics; independent of the batch sizes and order. The
  model runs as ``model(*batch, **call_kwargs)`` under ``jax.jit``, every
  batch norm in inference mode (put the rest in inference mode with
  ``model.eval()`` first). One pass per layer, each computing only what
  feeds that layer. A layer's ``mask=`` is honoured.

  Args:
    model: the nnx model; its BatchNorms' ``mean``/``var`` are overwritten.
    batches: an iterable of inputs (arrays or tuples of positional
      arguments), iterated once per layer (a one-shot iterator is read into a
      list first).
    unbiased: store the unbiased variance ``M2 / (n - 1)``.
    **call_kwargs: passed to the model's call.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm.nnx as jn
  >>> from flax import nnx
  >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), jn.BatchNorm(3, rngs=nnx.Rngs(0)))
  >>> data = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
  >>> jn.precise_batch_stats(model, [data[:3], data[3:]])
  >>> h = data @ np.asarray(model.layers[0].kernel[...]) + np.asarray(model.layers[0].bias[...])
  >>> bool(np.allclose(model.layers[1].mean[...], h.mean(0), atol=1e-6))
  True
  """
  if iter(batches) is batches:
    batches = list(batches)
  first = next(iter(batches), None)
  if first is None:
    raise ValueError("`batches` is empty; give at least one batch of inputs.")
  graphdef, state = nnx.split(model)

  def modules_by_path(m):
    return {path: mod for path, mod in nnx.iter_modules(m)
            if isinstance(mod, BATCH_NORM_TYPES)}

  if not modules_by_path(model):
    raise ValueError(
        f"`model` ({type(model).__name__}) has no BatchNorm layer to recompute.")
  order = []

  def discover(s, args):
    m = nnx.merge(graphdef, s)
    paths = {id(mod): path for path, mod in modules_by_path(m).items()}

    def hook(module, x, mask):
      path = paths[id(module)]
      if path not in order:
        order.append(path)

    with _hooked_batch_norms(hook):
      m(*args, **call_kwargs)

  jax.eval_shape(discover, state, _as_args(first))

  new_stats: dict[Any, Any] = {}
  for target in order:

    def capture(s, stats, args, target=target):
      m = nnx.merge(graphdef, s)
      mods = modules_by_path(m)
      for path, st in stats.items():
        mods[path].mean[...], mods[path].var[...] = st["mean"], st["var"]
      captured = []

      def hook(module, x, mask):
        if module is mods[target]:
          axes = canonical_axes(type(module).__name__, "axis",
                                module.axis, x.ndim)
          captured.append(precise_lib.batch_moments(x, axis=axes, mask=mask))

      with _hooked_batch_norms(hook):
        m(*args, **call_kwargs)
      return captured

    capture = jax.jit(capture)
    layer = modules_by_path(model)[target]
    old = {"mean": layer.mean[...], "var": layer.var[...]}
    acc = precise_lib.precise_stats_init(tuple(old["mean"].shape))
    for batch in batches:
      for moments in capture(state, new_stats, _as_args(batch)):
        acc = precise_lib.combine(acc, *moments)
    new_stats[target] = precise_lib.precise_stats_result(
        acc, unbiased=unbiased, fallback=old, dtype=old["mean"].dtype)
  mods = modules_by_path(model)
  for path, st in new_stats.items():
    mods[path].mean[...] = st["mean"]
    mods[path].var[...] = st["var"]
