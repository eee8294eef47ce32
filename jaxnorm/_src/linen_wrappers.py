"""``flax.linen`` WeightNorm, SpectralNorm and Dropout: thin shells over the core.

Each subclasses its ``flax.linen`` namesake, so fields, defaults, variable
collections and names are Flax's and ``isinstance`` checks against Flax's
classes hold; only ``__call__`` is replaced, and the math is
:func:`jaxnorm.weight_norm`, :func:`jaxnorm.spectral_norm` and
:func:`jaxnorm.dropout`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict
from flax.core import unfreeze

import jaxnorm
from jaxnorm._src import module_common as common

Array = jax.Array


def _feature_axes(module_name, feature_axes, ndim):
  """Flax's reading of ``feature_axes`` (None: no feature axes)."""
  if feature_axes is None:
    return ()
  return common.canonical_axes(module_name, "feature_axes", feature_axes, ndim)


class WeightNorm(nn.WeightNorm):
  """L2 weight normalization of a wrapped layer (Salimans & Kingma 2016).

  Each selected variable ``v`` of ``layer_instance`` is replaced, before the
  layer runs, by ``scale * v / sqrt(||v||^2 + epsilon)`` with the norm over
  every axis but ``feature_axes`` (:func:`jaxnorm.weight_norm`). As in
  ``flax.linen.WeightNorm``, the scale is a parameter of this module named
  ``"<layer name>/<variable path>/scale"`` with the shape of ``v`` along
  ``feature_axes``, initialized by ``scale_init`` (ones: the layer starts with
  unit-norm kernels). Use :func:`weight_norm_data_init` to initialize the scale
  and the bias from a batch instead.

  Attributes:
    layer_instance: the wrapped module (e.g. ``nn.Dense(4)``, ``nn.Conv(...)``).
    epsilon: added to ``||v||^2``.
    dtype: result dtype of the normalized variables (default: promoted from
      the variable and the scale).
    param_dtype: dtype of the scale.
    use_scale: learn a scale (otherwise unit-norm weights).
    scale_init: initializer of the scale.
    feature_axes: the axes kept by the norm (int, tuple or None for none).
    variable_filter: normalize the variables whose path ("<layer>/kernel", ...)
      contains one of these strings; None or empty normalizes all.
  """

  @nn.compact
  def __call__(self, *args, **kwargs) -> Any:
    """Calls the wrapped layer with its selected variables weight-normalized."""

    def forward(layer):
      return layer(*args, **kwargs)

    return nn.map_variables(
        forward,
        trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(
            self._normalize, vs),
        init=self.is_initializing(),
    )(self.layer_instance)

  def _path(self, path):
    return (f"{self.layer_instance.name}/"
            + jax.tree_util.keystr(path[1:], simple=True, separator="/"))

  def _normalize(self, path, value):
    value = jnp.asarray(value)
    name = self._path(path)
    if self.variable_filter and not any(f in name for f in self.variable_filter):
      return value
    feature = _feature_axes(type(self).__name__, self.feature_axes, value.ndim)
    wn = {"v": value}
    if self.use_scale:
      shape = tuple(value.shape[a] for a in feature)
      wn["g"] = self.param(name + "/scale", self.scale_init, shape,
                           self.param_dtype)
    return jaxnorm.weight_norm(wn, axis=None if not feature else feature,
                              eps=self.epsilon, dtype=self.dtype)


def weight_norm_data_init(module: WeightNorm, variables: dict[str, Any] | FrozenDict,
                          *args: Any, eps: float = 1e-6, **kwargs: Any) -> dict[str, Any]:
  """Data-dependent init of a linen :class:`WeightNorm` around a Dense or Conv.

  Runs ``module`` on the batch ``args`` with the layer's bias set to zero,
  then sets the kernel's scale and the layer's bias with
  :func:`jaxnorm.weight_norm_data_init` so that the outputs on that batch have
  per-feature mean 0 and variance 1 (Salimans & Kingma 2016, §3).

  Requirements: ``module`` is the top-level module of ``variables`` (as after
  ``module.init``), wraps a layer with a ``kernel`` and a ``bias`` whose output
  features are on the last axis (``nn.Dense``, ``nn.Conv``), uses
  ``feature_axes=-1`` and ``use_scale=True``, and normalizes the kernel only.

  Returns:
    New variables (a dict); the other entries are unchanged.

  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxnorm.linen as jl
  >>> m = jl.WeightNorm(nn.Dense(3))
  >>> x = jax.random.normal(jax.random.key(0), (16, 5))
  >>> vs = jl.weight_norm_data_init(m, m.init(jax.random.key(1), x), x)
  >>> y = m.apply(vs, x)
  >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5))
  True
  """
  if not isinstance(module, WeightNorm):
    raise TypeError(
        "`module` must be a jaxnorm.linen.WeightNorm, got "
        f"{type(module).__name__}.")
  if not module.use_scale or module.feature_axes not in (-1, (-1,)):
    raise ValueError(
        "`weight_norm_data_init` needs `use_scale=True` and `feature_axes=-1`, "
        f"got use_scale={module.use_scale} and "
        f"feature_axes={module.feature_axes!r}.")
  variables = unfreeze(variables)
  params = variables["params"]
  scales = sorted(k for k in params if k.endswith("/scale"))
  kernel_scales = [k for k in scales if k.endswith("/kernel/scale")]
  if len(kernel_scales) != 1 or len(scales) != 1:
    raise ValueError(
        "`weight_norm_data_init` needs a WeightNorm that scales one kernel "
        f"only, but `variables['params']` has the scales {scales}.")
  scale_key = kernel_scales[0]
  layer_name = scale_key[:-len("/kernel/scale")]
  layer = params.get(layer_name)
  if not isinstance(layer, dict) or "bias" not in layer:
    raise ValueError(
        f"`weight_norm_data_init` needs the wrapped layer '{layer_name}' to "
        f"have a 'bias' (a Dense or Conv with use_bias=True); its variables are "
        f"{sorted(layer) if isinstance(layer, dict) else layer!r}.")
  zero_bias = jax.tree.map(lambda a: a, variables)
  zero_bias["params"][layer_name]["bias"] = jnp.zeros_like(layer["bias"])
  t = jnp.asarray(module.apply(zero_bias, *args, **kwargs))  # the wrapped layer's output
  new_wn, bias = jaxnorm.weight_norm_data_init(
      {"v": layer["kernel"], "g": params[scale_key]}, t, eps=eps)
  out = jax.tree.map(lambda a: a, variables)
  out["params"][scale_key] = new_wn["g"].astype(params[scale_key].dtype)
  out["params"][layer_name]["bias"] = bias.astype(layer["bias"].dtype)
  return out


class SpectralNorm(nn.SpectralNorm):
  """Spectral normalization of a wrapped layer (Miyato et al. 2018).

  Every variable of ``layer_instance`` with two or more dimensions is divided
  by its largest singular value, estimated by ``n_steps`` of power iteration
  (:func:`jaxnorm.spectral_norm`; kernels of higher rank are flattened to
  ``(-1, out)``). As in ``flax.linen.SpectralNorm``, the vector ``u`` (shape
  ``(1, out)``, standard normal at init) and ``sigma`` are stored in
  ``collection_name`` as ``"<layer name>/<path>/u"`` and ``".../sigma"``; they
  are written when ``update_stats=True`` (pass ``mutable=[collection_name]``).
  With ``update_stats=False`` the iteration still starts from the stored ``u``
  but nothing is written, so evaluation is deterministic. Scalars and vectors
  are left unchanged, as is everything when ``n_steps < 1``.

  Attributes:
    layer_instance: the wrapped module.
    n_steps: power-iteration steps per call.
    epsilon: added to squared norms in the power iteration.
    dtype: result dtype (default: promoted from the variable, ``u`` and sigma).
    param_dtype: dtype of ``u`` and ``sigma`` at init; as in Flax, an update
      (``update_stats=True``, ``init`` included) stores them in the dtype of
      ``u`` promoted with the variable's (float32 for a float32 kernel).
    error_on_non_matrix: raise for variables with more than two dimensions.
    collection_name: the collection holding ``u`` and ``sigma``.
  """

  @nn.compact
  def __call__(self, *args, update_stats: bool, **kwargs) -> Any:
    """Calls the wrapped layer with spectrally normalized variables."""

    def forward(layer):
      return layer(*args, **kwargs)

    return nn.map_variables(
        forward,
        trans_in_fn=lambda vs: jax.tree_util.tree_map_with_path(
            lambda p, v: self._normalize(p, v, update_stats), vs),
        init=self.is_initializing(),
        mutable=True,
    )(self.layer_instance)

  def _normalize(self, path, value, update_stats):
    value = jnp.asarray(value)
    if value.ndim <= 1 or self.n_steps < 1:
      return value
    base = f"{self.layer_instance.name}/" + "/".join(k.key for k in path[1:])
    if value.ndim > 2 and self.error_on_non_matrix:
      raise ValueError(
          f"SpectralNorm: Input is {value.ndim}D but error_on_non_matrix is "
          f"True: the variable '{base}' of the layer has shape "
          f"{tuple(value.shape)}; spectral normalization is defined on "
          "matrices. Set error_on_non_matrix=False to flatten it to "
          "(-1, out).")
    out = value.shape[-1]
    u_name, sigma_name = base + "/u", base + "/sigma"
    key = (None if self.has_variable(self.collection_name, u_name)
           else self.make_rng("params"))
    u_var = self.variable(self.collection_name, u_name, jax.random.normal, key,
                          (1, out), self.param_dtype)
    sigma_var = self.variable(self.collection_name, sigma_name, jnp.ones, (),
                              self.param_dtype)
    # Flax stores the power iteration's result, whose dtype is that of the
    # stored `u` promoted with the variable's (float32 `u`/`sigma` for a
    # float32 kernel under `param_dtype=bfloat16`); the core keeps the state's
    # dtype, so it gets the state in that dtype (an exact cast: the iteration
    # runs in it anyway).
    stat_dtype = jnp.promote_types(u_var.value.dtype, value.dtype)
    state = {"u": u_var.value.reshape(out).astype(stat_dtype),
             "sigma": sigma_var.value.astype(stat_dtype)}
    w_sn, new_state = jaxnorm.spectral_norm(
        value, state, n_steps=self.n_steps, train=True, eps=self.epsilon,
        dtype=self.dtype)
    if update_stats:
      u_var.value = new_state["u"].reshape(1, out)
      sigma_var.value = new_state["sigma"]
    return w_sn


class Dropout(nn.Dropout):
  """Inverted dropout, drop-in for ``flax.linen.Dropout``.

  Keeps each unit with probability ``1 - rate`` and scales it by
  ``1 / (1 - rate)`` (:func:`jaxnorm.dropout`); the mask equals Flax's for the
  same key. Like Flax, ``rate=1.0`` returns zeros (with zero gradients);
  unlike Flax, a rate outside ``[0, 1]`` is an error.

  Attributes:
    rate: the probability of dropping a unit (not the keep rate).
    broadcast_dims: axes that share the same mask.
    deterministic: if True, return the input unchanged; may instead be given
      at call time.
    rng_collection: the rng collection the key is drawn from.
  """

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool | None = None,
               rng: Array | None = None) -> Array:
    """Applies dropout; ``rng`` overrides ``make_rng(rng_collection)``."""
    deterministic = nn.merge_param("deterministic", self.deterministic,
                                   deterministic)
    common.check_dropout_rate(type(self).__name__, self.rate)
    if deterministic or self.rate == 0.0:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    if rng is None:
      rng = self.make_rng(self.rng_collection)
    return common.dropout(type(self).__name__, rng, inputs, self.rate,
                          self.broadcast_dims)
