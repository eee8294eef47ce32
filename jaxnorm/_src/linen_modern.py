"""``flax.linen`` modules of the modern normalizations: thin shells over the core.

FiLM, AdaLNZero, ConditionalBatchNorm, AdaIN (:mod:`jaxnorm._src.conditional`),
QKNorm and QKNormAttention (:mod:`jaxnorm._src.qk_norm`), DyT
(:mod:`jaxnorm._src.dyt`), WeightStandardization and StdConv
(:mod:`jaxnorm._src.weight_standardization`), FilterResponseNorm
(:mod:`jaxnorm._src.frn`), and :func:`precise_batch_stats`
(:mod:`jaxnorm._src.precise_bn`). Each module declares its variables with the
names of the functional ``params`` (so ``variables["params"]`` *is* the
functional ``params``), in ``param_dtype``, and calls the core with
``dtype=self.dtype``, as :mod:`jaxnorm.linen`'s other modules do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any
from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import unfreeze
from flax.typing import Dtype
from jax.nn import initializers
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src import conditional as cond_lib
from jaxnorm._src import dyt as dyt_lib
from jaxnorm._src import frn as frn_lib
from jaxnorm._src import precise_bn as precise_lib
from jaxnorm._src import qk_norm as qk_lib
from jaxnorm._src import weight_standardization as ws_lib
from jaxnorm._src.batch_norm import batch_norm
from jaxnorm._src.linen_norm import BatchNorm as _JaxnormBatchNorm
from jaxnorm._src.linen_norm import BatchRenorm as _JaxnormBatchRenorm
from jaxnorm._src.module_common import canonical_axes
from jaxnorm._src.module_common import degenerate_batch_mask
from jaxnorm._src.module_common import feature_shape_of
from jaxnorm._src.module_common import module_errors

Array = jax.Array
Initializer = Callable[..., Array]


def _cond_features(module, cond) -> int:
  with module_errors(type(module).__name__):
    checks.check_array("cond", cond, allow_complex=False)
    checks.check_min_rank("cond", cond, 1, "features last")
  return cond.shape[-1]


def _channels(module, x) -> int:
  return feature_shape_of(type(module).__name__, x, -1, "x")[0]


class FiLM(nn.Module):
  """FiLM of a normalized input (Perez et al., 2018): ``y = norm(x) * (1 + gamma(c)) + beta(c)``.

  ``[gamma, beta] = cond @ kernel + bias``; see :func:`jaxnorm.film`. The
  projection is zero-initialized by default, so the layer starts as its plain
  normalization. ``params = {"kernel": (D, 2C), "bias": (2C,)}``.

  >>> import jax, jax.numpy as jnp, jaxnorm.linen as jl
  >>> x, c = jnp.ones((2, 4, 3)), jnp.ones((2, 5))
  >>> variables = jl.FiLM().init(jax.random.key(0), x, c)
  >>> jax.tree.map(jnp.shape, variables["params"])
  {'bias': (6,), 'kernel': (5, 6)}

  Attributes:
    norm: ``"layer"``, ``"rms"``, ``"group"``, ``"instance"`` or ``None``.
    epsilon: the normalization's epsilon.
    num_groups: groups for ``norm="group"``.
    dtype: output dtype (default: ``x`` and the parameters promoted).
    param_dtype: dtype of the projection.
    kernel_init, bias_init: initializers of the projection (zeros).
  """

  norm: str | None = "layer"
  epsilon: float = 1e-6
  num_groups: int | None = 32
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = initializers.zeros
  bias_init: Initializer = initializers.zeros

  @nn.compact
  def __call__(self, x: ArrayLike, cond: ArrayLike, *,
               mask: ArrayLike | None = None) -> Array:
    """Modulates ``norm(x)`` (``(N, ..., C)``) by the condition ``cond`` (``(N, D)``)."""
    c, d = _channels(self, x), _cond_features(self, cond)
    params = {
        "kernel": self.param("kernel", self.kernel_init, (d, 2 * c), self.param_dtype),
        "bias": self.param("bias", self.bias_init, (2 * c,), self.param_dtype),
    }
    with module_errors(type(self).__name__):
      return cond_lib.film(params, x, cond, norm=self.norm, eps=self.epsilon,
                           num_groups=self.num_groups, mask=mask, dtype=self.dtype)


class AdaLNZero(nn.Module):
  """adaLN-Zero (Peebles & Xie, 2023, DiT): returns ``(h, gate)`` for ``x + gate * f(h)``.

  ``[shift, scale, gate] = cond @ kernel + bias`` (zero-initialized) and
  ``h = LN(x) * (1 + scale) + shift``; see :func:`jaxnorm.adaln_zero`. Use it
  around a block ``f``: ``h, gate = AdaLNZero()(x, c); x = x + gate * f(h)``,
  which is the identity at initialization.
  ``params = {"kernel": (D, 3C), "bias": (3C,)}``.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jl
  >>> class Block(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x, c):
  ...     h, gate = jl.AdaLNZero()(x, c)
  ...     return x + gate * nn.Dense(x.shape[-1])(h)
  >>> x, c = jnp.ones((2, 4, 3)), jnp.ones((2, 5))
  >>> y = Block().apply(Block().init(jax.random.key(0), x, c), x, c)
  >>> bool(jnp.all(y == x))
  True

  Attributes:
    norm: ``"layer"`` (DiT) or ``"rms"``.
    epsilon: the norm's epsilon.
    dtype, param_dtype: as in :class:`FiLM`.
    kernel_init, bias_init: initializers of the projection (zeros: the
      "Zero" of adaLN-Zero).
  """

  norm: str = "layer"
  epsilon: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = initializers.zeros
  bias_init: Initializer = initializers.zeros

  @nn.compact
  def __call__(self, x: ArrayLike, cond: ArrayLike, *,
               mask: ArrayLike | None = None) -> tuple[Array, Array]:
    """Returns ``(h, gate)`` for ``x`` (``(N, ..., C)``) and ``cond`` (``(N, D)``)."""
    c, d = _channels(self, x), _cond_features(self, cond)
    params = {
        "kernel": self.param("kernel", self.kernel_init, (d, 3 * c), self.param_dtype),
        "bias": self.param("bias", self.bias_init, (3 * c,), self.param_dtype),
    }
    with module_errors(type(self).__name__):
      return cond_lib.adaln_zero(params, x, cond, norm=self.norm, eps=self.epsilon,
                                 mask=mask, dtype=self.dtype)


class ConditionalBatchNorm(nn.Module):
  """Class-conditional batch norm (de Vries et al., 2017): one scale/bias row per class.

  Batch statistics and running averages as :class:`jaxnorm.linen.BatchNorm`
  (``batch_stats/{mean,var}`` of shape ``(C,)``, updated when ``batch_stats``
  is mutable and not initializing); ``params/{scale,bias}`` of shape
  ``(num_classes, C)``. Channels last. See
  :func:`jaxnorm.conditional_batch_norm`.

  Attributes:
    num_classes: number of classes ``K``.
    use_running_average, momentum, epsilon, dtype, param_dtype, use_bias,
      use_scale, bias_init, scale_init, axis_name: as in ``BatchNorm``.
  """

  num_classes: int
  use_running_average: bool | None = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: ArrayLike, labels: ArrayLike,
               use_running_average: bool | None = None, *,
               mask: ArrayLike | None = None) -> Array:
    """Normalizes ``x`` (``(N, ..., C)``) with the rows ``labels`` (``(N,)``, int)."""
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    c = _channels(self, x)
    shape = (self.num_classes, c)
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    params = {}
    if self.use_scale:
      params["scale"] = self.param("scale", self.scale_init, shape, self.param_dtype)
    if self.use_bias:
      params["bias"] = self.param("bias", self.bias_init, shape, self.param_dtype)
    train = not use_running_average
    initializing = self.is_initializing()
    if train:
      # One value per feature: Flax's result (the bias), with a warning
      # outside `init` (as BatchNorm).
      mask = degenerate_batch_mask(type(self).__name__, x, (jnp.ndim(x) - 1,),
                                   cast("Array | None", mask),
                                   warn=not initializing)
    with module_errors(type(self).__name__):
      y, new = cond_lib.conditional_batch_norm(
          params, {"mean": mean.value, "var": var.value}, x, labels, train=train,
          momentum=self.momentum, eps=self.epsilon,
          axis_name=None if initializing else self.axis_name, mask=mask,
          dtype=self.dtype)
    if train and not initializing:
      mean.value, var.value = new["mean"], new["var"]
    return y


class AdaIN(nn.Module):
  """Adaptive instance normalization (Huang & Belongie, 2017); no parameters.

  ``AdaIN(x, s) = sigma(s) * (x - mu(x)) / sigma(x) + mu(s)`` per example and
  channel over the spatial axes; see :func:`jaxnorm.adain`.
  """

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, content: ArrayLike, style: ArrayLike) -> Array:
    """Restyles ``content`` (``(N, spatial..., C)``) with ``style``'s statistics."""
    with module_errors(type(self).__name__):
      return cond_lib.adain(content, style, eps=self.epsilon)


def _qk_params(module, head_dim):
  def init(key, shape, dtype):
    return {"scale": module.scale_init(key, shape, dtype)}
  if not module.use_scale:
    return {}
  return {name: module.param(name, init, (head_dim,), module.param_dtype)
          for name in ("query_norm", "key_norm")}


def _head_dim(module, query):
  with module_errors(type(module).__name__):
    checks.check_array("query", query, allow_complex=False)
    checks.check_min_rank("query", query, 1, "head_dim last")
  return query.shape[-1]


class QKNorm(nn.Module):
  """QK normalization (Dehghani et al., 2023): ``(q, k) -> (norm(q), norm(k))`` over ``head_dim``.

  ``params = {"query_norm": {"scale": (D,)}, "key_norm": {"scale": (D,)}}``,
  the layout of :func:`jaxnorm.qk_norm_init`. To use it inside
  ``flax.linen.MultiHeadDotProductAttention``, pass :class:`QKNormAttention`
  as its ``attention_fn``.

  >>> import jax, jax.numpy as jnp, jaxnorm.linen as jl
  >>> q = k = jnp.ones((1, 3, 2, 4))           # (batch, length, heads, head_dim)
  >>> vs = jl.QKNorm().init(jax.random.key(0), q, k)
  >>> jax.tree.map(jnp.shape, vs["params"])
  {'key_norm': {'scale': (4,)}, 'query_norm': {'scale': (4,)}}

  Attributes:
    kind: ``"rms"`` or ``"layer"`` (ViT-22B's layer norm without bias).
    epsilon: added to the mean square or variance.
    use_scale: learn the scales.
    scale_init: their initializer.
    dtype, param_dtype: output and parameter dtypes.
  """

  kind: str = "rms"
  epsilon: float = 1e-6
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: ArrayLike, key: ArrayLike) -> tuple[Array, Array]:
    """Returns the normalized ``(query, key)``; ``(..., length, heads, head_dim)``."""
    params = _qk_params(self, _head_dim(self, query))
    with module_errors(type(self).__name__):
      return qk_lib.qk_norm(params, query, key, kind=self.kind, eps=self.epsilon,
                            dtype=self.dtype)


class QKNormAttention(nn.Module):
  """An ``attention_fn`` with QK-norm, for ``flax.linen.MultiHeadDotProductAttention``.

  Normalizes the projected queries and keys (as :class:`QKNorm`, same
  parameters) and then calls ``attention_fn`` (``flax.linen``'s
  ``dot_product_attention`` by default) with the other arguments. Its
  parameters live under the attention module's ``attention_fn`` scope.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jl
  >>> mha = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8,
  ...                                       attention_fn=jl.QKNormAttention())
  >>> x = jnp.ones((1, 3, 8))
  >>> vs = mha.init(jax.random.key(0), x)
  >>> jax.tree.map(jnp.shape, vs["params"]["attention_fn"])
  {'key_norm': {'scale': (4,)}, 'query_norm': {'scale': (4,)}}

  Attributes: those of :class:`QKNorm`, and ``attention_fn``.
  """

  kind: str = "rms"
  epsilon: float = 1e-6
  use_scale: bool = True
  scale_init: Initializer = initializers.ones
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  attention_fn: Callable[..., Array] = nn.dot_product_attention

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array,
               bias: Array | None = None, mask: Array | None = None,
               broadcast_dropout: bool = True, dropout_rng: Array | None = None,
               dropout_rate: float = 0.0, deterministic: bool = False,
               dtype: Any = None, precision: Any = None,
               module: nn.Module | None = None,
               force_fp32_for_softmax: bool = False) -> Array:
    """Flax's ``dot_product_attention`` arguments (Flax passes those it finds here)."""
    params = _qk_params(self, _head_dim(self, query))
    with module_errors(type(self).__name__):
      query, key = qk_lib.qk_norm(params, query, key, kind=self.kind,
                                  eps=self.epsilon, dtype=self.dtype)
    kwargs = dict(bias=bias, mask=mask, broadcast_dropout=broadcast_dropout,
                  dropout_rng=dropout_rng, dropout_rate=dropout_rate,
                  deterministic=deterministic, dtype=dtype, precision=precision)
    if module is not None:
      kwargs["module"] = module
    if force_fp32_for_softmax:
      kwargs["force_fp32_for_softmax"] = True
    return self.attention_fn(query, key, value, **kwargs)


class DyT(nn.Module):
  """Dynamic Tanh (Zhu et al., 2025), a drop-in for LayerNorm: ``scale * tanh(alpha * x) + bias``.

  ``params = {"alpha": (), "scale": (C,), "bias": (C,)}`` with ``alpha``
  initialized to ``alpha_init_value``; ``__call__(x)`` as ``LayerNorm``'s.
  See :func:`jaxnorm.dyt`.

  >>> import jax, jax.numpy as jnp, jaxnorm.linen as jl
  >>> vs = jl.DyT().init(jax.random.key(0), jnp.ones((2, 3)))
  >>> jax.tree.map(jnp.shape, vs["params"])
  {'alpha': (), 'bias': (3,), 'scale': (3,)}

  Attributes:
    alpha_init_value: initial ``alpha`` (0.5, the paper's default).
    use_scale, use_bias: learn ``scale`` / ``bias``.
    scale_init, bias_init: their initializers.
    feature_axes: the axes of ``scale`` and ``bias``.
    dtype, param_dtype: output and parameter dtypes.
  """

  alpha_init_value: float = 0.5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Initializer = initializers.ones
  bias_init: Initializer = initializers.zeros
  feature_axes: Any = -1
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: ArrayLike, *, mask: ArrayLike | None = None) -> Array:
    """Applies DyT; ``mask`` is accepted for LayerNorm compatibility (DyT is element-wise)."""
    fshape = feature_shape_of(type(self).__name__, x, self.feature_axes, "feature_axes")
    params: dict[str, ArrayLike] = {"alpha": self.param(
        "alpha", initializers.constant(self.alpha_init_value), (), self.param_dtype)}
    if self.use_scale:
      params["scale"] = self.param("scale", self.scale_init, fshape, self.param_dtype)
    if self.use_bias:
      params["bias"] = self.param("bias", self.bias_init, fshape, self.param_dtype)
    del mask
    with module_errors(type(self).__name__):
      return dyt_lib.dyt(params, x, axis=self.feature_axes, dtype=self.dtype)


class FilterResponseNorm(nn.Module):
  """Filter response normalization + TLU (Singh & Krishnan, 2020), channels last.

  ``z = max(scale * x / sqrt(mean_spatial(x**2) + eps) + bias, tau)``; see
  :func:`jaxnorm.frn`. ``params = {"scale", "bias", "tau"}`` of shape
  ``(C,)`` and, with ``learn_epsilon``, a scalar ``"eps"`` (the effective
  epsilon is ``epsilon + |eps|``).

  >>> import jax, jax.numpy as jnp, jaxnorm.linen as jl
  >>> m = jl.FilterResponseNorm(learn_epsilon=True)
  >>> vs = m.init(jax.random.key(0), jnp.ones((2, 4, 4, 3)))
  >>> jax.tree.map(jnp.shape, vs["params"])
  {'bias': (3,), 'eps': (), 'scale': (3,), 'tau': (3,)}

  Attributes:
    epsilon: the fixed epsilon.
    use_tlu: apply the TLU ``max(y, tau)`` (else the output is ``y``).
    learn_epsilon: add a learned epsilon, initialized to ``eps_init``.
    eps_init: initial learned epsilon (1e-4).
    dtype, param_dtype: output and parameter dtypes.
    scale_init, bias_init, tau_init: initializers (ones, zeros, zeros).
  """

  epsilon: float = 1e-6
  use_tlu: bool = True
  learn_epsilon: bool = False
  eps_init: float = 1e-4
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  scale_init: Initializer = initializers.ones
  bias_init: Initializer = initializers.zeros
  tau_init: Initializer = initializers.zeros

  @nn.compact
  def __call__(self, x: ArrayLike, *, mask: ArrayLike | None = None) -> Array:
    """Normalizes ``x`` of shape ``(N, spatial..., C)``."""
    c = (_channels(self, x),)
    params = {"scale": self.param("scale", self.scale_init, c, self.param_dtype),
              "bias": self.param("bias", self.bias_init, c, self.param_dtype)}
    if self.use_tlu:
      params["tau"] = self.param("tau", self.tau_init, c, self.param_dtype)
    if self.learn_epsilon:
      params["eps"] = self.param("eps", initializers.constant(self.eps_init), (),
                                 self.param_dtype)
    with module_errors(type(self).__name__):
      return frn_lib.frn(params, x, eps=self.epsilon, mask=mask, dtype=self.dtype)


class WeightStandardization(nn.Module):
  """(Scaled) weight standardization of a wrapped layer's kernel.

  Each selected variable of ``layer_instance`` (by default its ``kernel``) is
  replaced, before the layer runs, by :func:`jaxnorm.weight_standardization`
  (Qiao et al., 2019) or, with ``scaled=True``, by
  :func:`jaxnorm.scaled_weight_standardization` (Brock et al., 2021) with a
  learned gain of the output's shape, a parameter of this module named
  ``"<layer name>/<variable path>/gain"`` (ones), as ``WeightNorm`` names its
  scales.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jl
  >>> m = jl.WeightStandardization(nn.Dense(4), scaled=True, gamma="relu")
  >>> vs = m.init(jax.random.key(0), jnp.ones((2, 3)))
  >>> sorted(vs["params"])
  ['layer_instance', 'layer_instance/kernel/gain']

  Attributes:
    layer_instance: the wrapped module (e.g. ``nn.Dense``, ``nn.Conv``).
    scaled: scaled WS (NF-Nets) instead of plain WS.
    gamma: scaled WS's nonlinearity gain (a number or a name such as "relu").
    use_gain: learn the gain (scaled WS only).
    epsilon: WS's epsilon (default 1e-6; scaled WS's lower bound 1e-4).
    param_dtype: dtype of the gain.
    feature_axes: the output axes, kept.
    variable_filter: standardize the variables whose path contains one of
      these strings.
  """

  layer_instance: nn.Module
  scaled: bool = False
  gamma: float | str = 1.0
  use_gain: bool = True
  epsilon: float | None = None
  param_dtype: Dtype = jnp.float32
  feature_axes: Any = -1
  variable_filter: Iterable | None = dataclasses.field(
      default_factory=lambda: {"kernel"})

  @nn.compact
  def __call__(self, *args, **kwargs):
    """Calls the wrapped layer with its selected variables standardized."""

    def forward(layer):
      return layer(*args, **kwargs)

    return nn.map_variables(
        forward,
        trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(self._standardize, vs),
        init=self.is_initializing(),
    )(self.layer_instance)

  def _standardize(self, path, value):
    value = jnp.asarray(value)
    name = (cast(str, self.layer_instance.name) + "/"
            + jax.tree_util.keystr(path[1:], simple=True, separator="/"))
    if self.variable_filter and not any(f in name for f in self.variable_filter):
      return value
    with module_errors(type(self).__name__):
      if not self.scaled:
        eps = 1e-6 if self.epsilon is None else self.epsilon
        return ws_lib.weight_standardization(value, axis=self.feature_axes, eps=eps)
      gain = None
      if self.use_gain:
        out = checks.normalize_axes("feature_axes", self.feature_axes, value.ndim)
        gain = self.param(name + "/gain", initializers.ones,
                          tuple(value.shape[a] for a in out), self.param_dtype)
      eps = 1e-4 if self.epsilon is None else self.epsilon
      return ws_lib.scaled_weight_standardization(
          value, gain, axis=self.feature_axes, gamma=self.gamma, eps=eps)


class StdConv(nn.Conv):
  """``nn.Conv`` with a weight-standardized kernel (BiT's StdConv; Qiao et al., 2019).

  The same constructor and variables as ``flax.linen.Conv`` (``params/kernel``
  of shape ``(*kernel_size, in, out)``, ``params/bias``), plus ``ws_epsilon``;
  the stored kernel is standardized over its fan-in (every axis but the last)
  each time the layer runs (:func:`jaxnorm.weight_standardization`). Pair it
  with :class:`jaxnorm.linen.GroupNorm` for small batches.

  >>> import jax, jax.numpy as jnp, jaxnorm.linen as jl
  >>> conv = jl.StdConv(8, (3, 3))
  >>> vs = conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))
  >>> conv.apply(vs, jnp.ones((1, 5, 5, 2))).shape
  (1, 5, 5, 8)
  """

  ws_epsilon: float = 1e-6

  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    value = super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    if name == "kernel":
      with module_errors(type(self).__name__):
        value = ws_lib.weight_standardization(value, axis=-1, eps=self.ws_epsilon)
    return value


# -- Precise batch statistics -----------------------------------------------------

BATCH_NORM_TYPES = (_JaxnormBatchNorm, _JaxnormBatchRenorm, nn.BatchNorm)


def _is_batch_norm(context) -> bool:
  return (context.method_name == "__call__"
          and isinstance(context.module, BATCH_NORM_TYPES))


def _bn_call(args, kwargs):
  """The input and the mask of a BatchNorm call ``(x, use_running_average=None, *, mask=None)``."""
  return args[0], kwargs.get("mask")


def _as_args(batch):
  return batch if isinstance(batch, tuple) else (batch,)


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def precise_batch_stats(
    model: nn.Module,
    variables: Any,
    batches: Iterable,
    *,
    unbiased: bool = False,
    **apply_kwargs: Any,
) -> dict:
  """Recomputes every BatchNorm's ``batch_stats`` exactly over a dataset ("precise BN").

  For each batch-norm layer of ``model`` (``jaxnorm.linen.BatchNorm``,
  ``BatchRenorm`` or ``flax.linen.BatchNorm``), in the order the model calls
  them, the new ``mean``/``var`` are the population mean and variance (biased,
  or unbiased with ``unbiased=True``) of the layer's inputs over all
  ``batches``, with every earlier layer already using its new statistics: the
  inputs each layer sees at inference once the update is done. The result does
  not depend on how the data are split into batches nor on their order
  (per-batch moments on device, combined exactly in float64 on the host; see
  :mod:`jaxnorm._src.precise_bn`).

  The model runs with ``model.apply(variables, *batch, **apply_kwargs)``
  under ``jax.jit``; every batch-norm call is intercepted and computed in
  inference mode from the statistics (so ``apply_kwargs`` should put the rest
  of the model in inference mode, e.g. ``train=False``). Layer ``i``'s pass
  computes only what feeds layer ``i``, so the cost is that of one forward pass
  per layer over the depth up to it. A layer's mask (``mask=``) is honoured.
  Layers under ``nn.scan``/``nn.vmap`` lifts are not supported, and a layer
  called several times per pass gets the moments of all its calls, the later
  ones fed by earlier calls that still use its old statistics.

  Args:
    model: the linen module.
    variables: its variables, with ``batch_stats``.
    batches: an iterable of inputs, each an array or a tuple of positional
      arguments; iterated once per layer (a one-shot iterator is read into a
      list first).
    unbiased: store the unbiased variance ``M2 / (n - 1)``.
    **apply_kwargs: passed to ``model.apply``.

  Returns:
    New variables: ``variables`` with each layer's ``batch_stats`` replaced.

  >>> import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, jaxnorm.linen as jl
  >>> model = nn.Sequential([nn.Dense(3), jl.BatchNorm(use_running_average=True)])
  >>> data = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
  >>> vs = model.init(jax.random.key(0), data)
  >>> vs = jl.precise_batch_stats(model, vs, [data[:3], data[3:]])
  >>> h = data @ np.asarray(vs["params"]["layers_0"]["kernel"])
  >>> bool(np.allclose(vs["batch_stats"]["layers_1"]["var"], h.var(0), rtol=1e-5))
  True
  """
  if iter(batches) is batches:
    batches = list(batches)
  variables = unfreeze(variables)
  if "batch_stats" not in variables:
    raise ValueError(
        "`variables` has no 'batch_stats' collection, so `model` has no "
        f"BatchNorm to recompute; its collections are {sorted(variables)}.")
  first = next(iter(batches), None)
  if first is None:
    raise ValueError("`batches` is empty; give at least one batch of inputs.")
  layers = []   # the BatchNorms' paths, in call order

  def inference_bn(context, x, stats):
    module = context.module
    params = module.variables.get("params", {})
    path = module.path
    y, _ = batch_norm(dict(params), stats.get(path, module.variables["batch_stats"]),
                      x, train=False, axis=module.axis, eps=module.epsilon,
                      dtype=module.dtype)
    return y

  def discover(next_fun, args, kwargs, context):
    if not _is_batch_norm(context):
      return next_fun(*args, **kwargs)
    if context.module.path not in layers:
      layers.append(context.module.path)
    x, _ = _bn_call(args, kwargs)
    return inference_bn(context, x, {})

  def run(vs, args):
    return model.apply(vs, *args, **apply_kwargs)

  with nn.intercept_methods(discover):
    jax.eval_shape(run, variables, _as_args(first))

  new_stats: dict[Any, Any] = {}   # path -> {"mean", "var"}
  for target in layers:

    def capture(vs, stats, args, target=target):
      captured = []

      def interceptor(next_fun, a, kw, context):
        if not _is_batch_norm(context):
          return next_fun(*a, **kw)
        x, mask = _bn_call(a, kw)
        if context.module.path == target:
          axes = canonical_axes(type(context.module).__name__, "axis",
                                context.module.axis, x.ndim)
          captured.append(precise_lib.batch_moments(x, axis=axes, mask=mask))
        return inference_bn(context, x, stats)

      with nn.intercept_methods(interceptor):
        run(vs, args)
      return captured

    capture = jax.jit(capture)
    old = _get(variables["batch_stats"], target)
    acc = precise_lib.precise_stats_init(tuple(old["mean"].shape))
    for batch in batches:
      for moments in capture(variables, new_stats, _as_args(batch)):
        acc = precise_lib.combine(acc, *moments)
    new_stats[target] = precise_lib.precise_stats_result(
        acc, unbiased=unbiased, fallback=old, dtype=old["mean"].dtype)
  out = jax.tree.map(lambda a: a, variables)
  for path, stats in new_stats.items():
    node = _get(out["batch_stats"], path)
    node["mean"], node["var"] = stats["mean"], stats["var"]
  return out
