"""``flax.nnx`` WeightNorm, SpectralNorm and Dropout: thin shells over the core.

Constructor arguments and defaults are those of ``flax.nnx`` 0.12; the math is
:func:`jaxnorm.weight_norm`, :func:`jaxnorm.spectral_norm` and
:func:`jaxnorm.dropout`.

One deliberate difference: Flax's ``nnx.WeightNorm`` and ``nnx.SpectralNorm``
overwrite the wrapped layer's parameters with the normalized values on every
call, so after a call the layer's kernel is no longer ``v`` (and a second call
normalizes an already normalized kernel). Ours put the normalized values in
for the duration of the call and restore the originals afterwards, so the
layer keeps the paper's parametrization and repeated calls agree. The outputs
of a call, and the gradients, are the same as Flax's for the same state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes
from flax.typing import PromoteDtypeFn

from jaxnorm._src import checks
from jaxnorm._src import dropout as dropout_lib
from jaxnorm._src import weight_norm as wn_lib


def _feature_axes(feature_axes, ndim):
  if feature_axes is None or feature_axes == ():
    return ()
  return checks.normalize_axes("feature_axes", feature_axes, ndim)


@contextlib.contextmanager
def _swapped(pairs):
  """Sets each Variable to a new value for the duration of the block."""
  originals = [(var, var.get_value()) for var, _ in pairs]
  try:
    for var, value in pairs:
      var.set_value(value)
    yield
  finally:
    for var, value in originals:
      var.set_value(value)


class WeightNorm(nnx.Module):
  """L2 weight normalization of a wrapped layer (Salimans & Kingma 2016).

  Each parameter ``v`` of ``layer_instance`` selected by ``variable_filter``
  is used as ``scale * v / sqrt(||v||^2 + epsilon)``, with the norm over every
  axis but ``feature_axes`` (:func:`jaxnorm.weight_norm`). ``self.scales``
  maps each selected parameter's path to its scale (shape of ``v`` along
  ``feature_axes``; ``scale_init`` gives ones, in ``param_dtype``, where Flax
  0.12 ignores ``param_dtype`` and makes them float32). Unlike Flax, where the
  scales are plain arrays that ``nnx.grad``/``nnx.Optimizer`` (filter
  ``nnx.Param``) never train, ours are ``nnx.Param`` so they are learned, as
  in the paper. :meth:`data_init` sets the scale and bias from a batch.

  ``promote_dtype`` is accepted and stored as ``self.promote_dtype`` but not
  called, as in Flax 0.12 (whose ``nnx.WeightNorm`` never calls it): the
  normalized parameters have the dtype of ``v`` and its scale promoted
  together, or ``dtype`` when given.
  """

  def __init__(
      self,
      layer_instance: nnx.Module,
      *,
      feature_axes=-1,
      use_scale: bool = True,
      scale_init=nnx.initializers.ones,
      epsilon: float = 1e-12,
      dtype=None,
      param_dtype=jnp.float32,
      variable_filter=nnx.PathContains("kernel"),
      promote_dtype: PromoteDtypeFn = flax_dtypes.promote_dtype,
      rngs: nnx.Rngs,
  ):
    self.layer_instance = layer_instance
    self.feature_axes = () if feature_axes is None else feature_axes
    self.use_scale = use_scale
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.variable_filter = nnx.filterlib.to_predicate(variable_filter)
    self.promote_dtype = promote_dtype
    scales = None
    if use_scale:
      scales = {}
      params = nnx.state(self.layer_instance, nnx.Param)
      for path, param in nnx.to_flat_state(params):
        if self.variable_filter(path, param):
          feature = _feature_axes(self.feature_axes, param.ndim)
          shape = tuple(param.shape[a] for a in feature)
          scales[path] = nnx.Param(
              scale_init(rngs["params"](), shape, param_dtype))
    self.scales = nnx.data(scales)

  def _normalized(self):
    pairs = []
    for path, param in nnx.to_flat_state(nnx.state(self.layer_instance)):
      if not self.variable_filter(path, param):
        continue
      value = param.get_value()
      feature = _feature_axes(self.feature_axes, value.ndim)
      wn = {"v": value}
      if self.use_scale:
        if path not in self.scales:
          raise RuntimeError(
              f"WeightNorm has no scale for the parameter {path}; the wrapped "
              "layer's parameters must not change after construction.")
        wn["g"] = self.scales[path].get_value()
      pairs.append((param, wn_lib.weight_norm(
          wn, axis=feature if feature else None, eps=self.epsilon,
          dtype=self.dtype)))
    return pairs

  def __call__(self, x, *args, **kwargs):
    """Calls the wrapped layer with its selected parameters weight-normalized."""
    with _swapped(self._normalized()):
      return self.layer_instance(x, *args, **kwargs)

  def data_init(self, x, *args, eps=1e-6, **kwargs):
    """Data-dependent init (Salimans & Kingma 2016, §3), in place.

    Runs the layer on the batch ``x`` with its bias at zero, then sets the
    kernel's scale and the layer's bias with
    :func:`jaxnorm.weight_norm_data_init` so that the outputs on ``x`` have
    per-feature mean 0 and variance 1. Needs a wrapped layer with ``kernel``
    and ``bias`` and output features last (``nnx.Linear``, ``nnx.Conv``),
    ``feature_axes=-1``, ``use_scale=True``, and the kernel as the only
    normalized parameter. Returns the normalized outputs.
    """
    layer = self.layer_instance
    bias = getattr(layer, "bias", None)
    paths = list(self.scales or {})
    if (not self.use_scale or self.feature_axes not in (-1, (-1,))
        or not isinstance(bias, nnx.Variable) or bias.get_value() is None
        or paths != [("kernel",)]):
      raise ValueError(
          "`data_init` needs a WeightNorm with use_scale=True, feature_axes=-1 "
          "and only the kernel normalized, around a layer with a bias; got "
          f"use_scale={self.use_scale}, feature_axes={self.feature_axes!r}, "
          f"normalized parameters {paths}.")
    with _swapped([(bias, jnp.zeros_like(bias.get_value()))]):
      t = self(x, *args, **kwargs)
    scale = self.scales[("kernel",)]
    new_wn, new_bias = wn_lib.weight_norm_data_init(
        {"v": layer.kernel.get_value(), "g": scale.get_value()}, t, eps=eps)
    scale.set_value(new_wn["g"].astype(scale.get_value().dtype))
    bias.set_value(new_bias.astype(bias.get_value().dtype))
    return self(x, *args, **kwargs)


class SpectralNorm(nnx.Module):
  """Spectral normalization of a wrapped layer (Miyato et al. 2018).

  Every parameter of ``layer_instance`` with two or more dimensions is divided
  by its largest singular value, estimated by ``n_steps`` of power iteration
  (:func:`jaxnorm.spectral_norm`, kernels flattened to ``(-1, out)``).
  ``self.batch_stats`` maps ``path + ("u",)`` and ``path + ("sigma",)`` to
  ``nnx.BatchStat`` s, as in Flax (``u`` of shape ``(1, out)`` drawn from
  ``normal(stddev=0.01)``, ``sigma`` 1). ``update_stats`` (call argument, or
  the constructor's; ``.train()``/``.eval()`` switch it) says whether they are
  written.
  """

  def __init__(
      self,
      layer_instance: nnx.Module,
      *,
      n_steps: int = 1,
      epsilon: float = 1e-12,
      dtype=None,
      param_dtype=jnp.float32,
      error_on_non_matrix: bool = False,
      update_stats: bool = True,
      rngs: nnx.Rngs,
  ):
    self.layer_instance = layer_instance
    self.n_steps = n_steps
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.error_on_non_matrix = error_on_non_matrix
    # `.train()` / `.eval()` set this attribute (update_stats is its negation).
    self.use_running_average = not update_stats
    stats = {}
    for path, param in nnx.to_flat_state(nnx.state(layer_instance, nnx.Param)):
      if not self._applies(param):
        continue
      key = rngs.params()
      u = jax.random.normal(key, (1, param.shape[-1]), param_dtype) * 0.01
      stats[path + ("u",)] = nnx.BatchStat(u)
      stats[path + ("sigma",)] = nnx.BatchStat(jnp.ones((), param_dtype))
    self.batch_stats = nnx.data(stats)

  def _applies(self, param) -> bool:
    if param.ndim <= 1 or self.n_steps < 1:
      return False
    if param.ndim > 2 and self.error_on_non_matrix:
      raise ValueError(
          f"Spectral normalization is defined on matrices but a parameter of "
          f"the layer has {param.ndim} dimensions (shape {tuple(param.shape)}) "
          "and error_on_non_matrix is True; set error_on_non_matrix=False to "
          "flatten it to (-1, out).")
    return True

  def __call__(self, x, update_stats: bool | None = None):
    """Calls the wrapped layer with spectrally normalized parameters."""
    if update_stats is None:
      update_stats = not self.use_running_average
    pairs = []
    for path, param in nnx.to_flat_state(
        nnx.state(self.layer_instance, nnx.Param)):
      if not self._applies(param):
        continue
      u_var = self.batch_stats.get(path + ("u",))
      sigma_var = self.batch_stats.get(path + ("sigma",))
      if u_var is None or sigma_var is None:
        raise RuntimeError(
            f"SpectralNorm has no u/sigma for the parameter {path}; the wrapped "
            "layer's parameters must not change after construction.")
      value = param.get_value()
      out = value.shape[-1]
      state = {"u": u_var.get_value().reshape(out),
               "sigma": sigma_var.get_value()}
      w_sn, new_state = wn_lib.spectral_norm(
          value, state, n_steps=self.n_steps, train=True, eps=self.epsilon,
          dtype=self.dtype)
      if update_stats:
        u_var.set_value(new_state["u"].reshape(1, out))
        sigma_var.set_value(new_state["sigma"])
      pairs.append((param, w_sn))
    with _swapped(pairs):
      return self.layer_instance(x)


class Dropout(nnx.Module):
  """Inverted dropout, drop-in for ``flax.nnx.Dropout``.

  Keeps each unit with probability ``1 - rate`` and scales it by
  ``1 / (1 - rate)`` (:func:`jaxnorm.dropout`); the mask equals Flax's for the
  same key. Like Flax, ``rate=1.0`` returns zeros (with finite, zero
  gradients); unlike Flax, a rate outside ``[0, 1]`` is an error at
  construction. ``.train()``/``.eval()`` switch ``deterministic``.
  """

  def __init__(
      self,
      rate: float,
      *,
      broadcast_dims: Sequence[int] = (),
      deterministic: bool | None = False,
      rng_collection: str = "dropout",
      rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    dropout_lib.check_rate(rate, allow_one=True)
    self.rate = rate
    self.broadcast_dims = broadcast_dims
    self.deterministic = deterministic
    self.rng_collection = rng_collection
    if isinstance(rngs, nnx.Rngs):
      self.rngs = rngs[rng_collection].fork()
    elif isinstance(rngs, nnx.RngStream):
      self.rngs = rngs.fork()
    elif rngs is None:
      self.rngs = nnx.data(None)
    else:
      raise TypeError(
          "`rngs` must be an nnx.Rngs, an nnx.RngStream or None, got "
          f"{type(rngs).__name__}.")

  def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
    """Applies dropout; ``rngs`` (Rngs, RngStream or key) overrides the stored one."""
    if deterministic is None:
      deterministic = self.deterministic
    if deterministic is None:
      raise ValueError(
          "No `deterministic` argument was given to Dropout: pass "
          "`deterministic=True/False` to the constructor or the call, or use "
          "`.train()` / `.eval()`.")
    if deterministic or self.rate == 0.0:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    if rngs is None:
      rngs = self.rngs
    if rngs is None:
      raise ValueError(
          "`deterministic` is False but Dropout has no `rngs`: pass `rngs=` to "
          "the constructor or the call.")
    if isinstance(rngs, nnx.Rngs):
      key = rngs[self.rng_collection]()
    elif isinstance(rngs, nnx.RngStream):
      key = rngs()
    elif isinstance(rngs, jax.Array):
      key = rngs
    else:
      raise TypeError(
          "`rngs` must be an nnx.Rngs, an nnx.RngStream or a key, got "
          f"{type(rngs).__name__}.")
    return dropout_lib.dropout(key, inputs, self.rate, train=True,
                               broadcast_dims=self.broadcast_dims)

  def set_view(self, deterministic: bool | None = None):
    """Used by ``nnx.view``: sets ``deterministic`` when given."""
    if deterministic is not None:
      self.deterministic = deterministic
