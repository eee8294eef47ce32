"""``flax.nnx`` WeightNorm, SpectralNorm and Dropout: thin shells over the core.

Each subclasses its ``flax.nnx`` namesake (``isinstance``, ``nnx.view`` with
``only=nnx.Dropout``, ``nnx.view_info`` and ``.train()``/``.eval()`` treat it
as Flax's) with the constructor arguments and defaults of ``flax.nnx`` 0.12;
the math is :func:`jaxnorm.weight_norm`, :func:`jaxnorm.spectral_norm` and
:func:`jaxnorm.dropout`.

Flax's ``nnx.WeightNorm`` and ``nnx.SpectralNorm`` overwrite the wrapped
layer's parameters with the normalized values on every call, so after a call
the layer's kernel is no longer the one it had (and the next call normalizes
an already normalized kernel). :class:`SpectralNorm` does the same by default
(``in_place=True``), since that changes what a model computes after its first
call: the stored ``sigma`` and the losses of a model calling the layer more
than once per step follow Flax's only this way. ``in_place=False`` puts the
normalized values in for the duration of the call and restores the originals,
so the layer keeps the paper's parametrization (``W / sigma(W)`` of a fixed
``W``) and repeated calls agree. :class:`WeightNorm` always restores: weight
normalization of an already normalized kernel gives the same kernel, so its
outputs equal Flax's either way, and the kernel stays ``v`` as in the paper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes
from flax.typing import Dtype
from flax.typing import Initializer
from flax.typing import PromoteDtypeFn

import jaxnorm
from jaxnorm._src import checks
from jaxnorm._src import module_common as common

Array = jax.Array


def _feature_axes(module_name, feature_axes, ndim):
  """Flax's reading of ``feature_axes`` (None: no feature axes)."""
  if feature_axes is None or (isinstance(feature_axes, tuple) and not feature_axes):
    return ()
  return common.canonical_axes(module_name, "feature_axes", feature_axes, ndim)


@contextlib.contextmanager
def _swapped(pairs: list) -> Iterator[None]:
  """Sets each Variable to a new value for the duration of the block."""
  originals = [(var, var.get_value()) for var, _ in pairs]
  try:
    for var, value in pairs:
      var.set_value(value)
    yield
  finally:
    for var, value in originals:
      var.set_value(value)


class WeightNorm(nnx.WeightNorm):
  """L2 weight normalization of a wrapped layer (Salimans & Kingma 2016).

  Each parameter ``v`` of ``layer_instance`` selected by ``variable_filter``
  is used as ``scale * v / sqrt(||v||^2 + epsilon)``, with the norm over every
  axis but ``feature_axes`` (:func:`jaxnorm.weight_norm`). ``self.scales``
  maps each selected parameter's path to its scale (shape of ``v`` along
  ``feature_axes``; ``scale_init`` gives ones, in ``param_dtype``, where Flax
  0.12 ignores ``param_dtype`` and makes them float32). Unlike Flax, where the
  scales are plain arrays that ``nnx.grad``/``nnx.Optimizer`` (filter
  ``nnx.Param``) never train, ours are ``nnx.Param`` so they are learned, as
  in the paper. :meth:`data_init` sets the scale and bias from a batch. The
  wrapped layer keeps ``v`` as its kernel (Flax's writes ``g v / ||v||``
  there; the outputs agree, since normalizing that again gives itself).

  ``promote_dtype`` is accepted and stored as ``self.promote_dtype`` but not
  called, as in Flax 0.12 (whose ``nnx.WeightNorm`` never calls it): the
  normalized parameters have the dtype of ``v`` and its scale promoted
  together, or ``dtype`` when given.

  Attributes:
    layer_instance: the wrapped module.
    feature_axes: the axes kept by the norm (``()`` for none).
    use_scale, epsilon, dtype, param_dtype, promote_dtype: the constructor's
      arguments.
    variable_filter: predicate ``(path, variable) -> bool`` of the normalized
      parameters.
    scales: ``{path: nnx.Param}``, or None without ``use_scale``.
  """

  layer_instance: nnx.Module
  feature_axes: int | Sequence[int]
  use_scale: bool
  epsilon: float
  dtype: Dtype | None
  param_dtype: Dtype
  variable_filter: Callable[..., bool]
  promote_dtype: PromoteDtypeFn
  scales: dict | None

  def __init__(
      self,
      layer_instance: nnx.Module,
      *,
      feature_axes: int | Sequence[int] | None = -1,
      use_scale: bool = True,
      scale_init: Initializer = nnx.initializers.ones,
      epsilon: float = 1e-12,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      variable_filter: Any = nnx.PathContains("kernel"),
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
          feature = _feature_axes(type(self).__name__, self.feature_axes, param.ndim)
          shape = tuple(param.shape[a] for a in feature)
          scales[path] = nnx.Param(
              scale_init(rngs["params"](), shape, param_dtype))
    self.scales = nnx.data(scales)

  def _normalized(self) -> list:
    pairs = []
    scales = self.scales or {}
    for path, param in nnx.to_flat_state(nnx.state(self.layer_instance)):
      if not self.variable_filter(path, param):
        continue
      value = param.get_value()
      feature = _feature_axes(type(self).__name__, self.feature_axes, value.ndim)
      wn = {"v": value}
      if self.use_scale:
        if path not in scales:
          raise RuntimeError(
              f"WeightNorm: Could not find the scale corresponding to the "
              f"param {path} in scales dict. Parameters of the layer_instance "
              "should not change! The scales were made at construction for "
              f"{sorted(scales)}.")
        wn["g"] = scales[path].get_value()
      pairs.append((param, jaxnorm.weight_norm(
          wn, axis=feature if feature else None, eps=self.epsilon,
          dtype=self.dtype)))
    return pairs

  def __call__(self, x: Array, *args: Any, **kwargs: Any) -> Any:
    """Calls the wrapped layer with its selected parameters weight-normalized."""
    with _swapped(self._normalized()):
      return self.layer_instance(x, *args, **kwargs)

  def data_init(self, x: Array, *args: Any, eps: float = 1e-6, **kwargs: Any) -> Any:
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
    kernel = getattr(layer, "kernel", None)
    bias = getattr(layer, "bias", None)
    scales = self.scales or {}
    paths = list(scales)
    if (not self.use_scale or self.feature_axes not in (-1, (-1,))
        or not isinstance(kernel, nnx.Variable)
        or not isinstance(bias, nnx.Variable) or bias.get_value() is None
        or paths != [("kernel",)]):
      raise ValueError(
          "`data_init` needs a WeightNorm with use_scale=True, feature_axes=-1 "
          "and only the kernel normalized, around a layer with a bias; got "
          f"use_scale={self.use_scale}, feature_axes={self.feature_axes!r}, "
          f"normalized parameters {paths}.")
    with _swapped([(bias, jnp.zeros_like(bias.get_value()))]):
      t = self(x, *args, **kwargs)
    scale = scales[("kernel",)]
    new_wn, new_bias = jaxnorm.weight_norm_data_init(
        {"v": kernel.get_value(), "g": scale.get_value()}, t, eps=eps)
    scale.set_value(new_wn["g"].astype(scale.get_value().dtype))
    bias.set_value(new_bias.astype(bias.get_value().dtype))
    return self(x, *args, **kwargs)


class SpectralNorm(nnx.SpectralNorm):
  """Spectral normalization of a wrapped layer (Miyato et al. 2018).

  Every parameter of ``layer_instance`` with two or more dimensions is divided
  by its largest singular value, estimated by ``n_steps`` of power iteration
  from the stored ``u`` (:func:`jaxnorm.spectral_norm`, kernels flattened to
  ``(-1, out)``): ``v = l2n(u W^T)``, ``u = l2n(v W)``,
  ``sigma = v W u^T``, ``W_sn = W / sigma``. ``self.batch_stats`` maps
  ``path + ("u",)`` and ``path + ("sigma",)`` to ``nnx.BatchStat`` s, as in
  Flax (``u`` of shape ``(1, out)`` drawn from ``normal(stddev=0.01)``,
  ``sigma`` 1). ``update_stats`` (call argument, or the constructor's;
  ``.train()``/``.eval()`` switch it) says whether they are written.

  ``in_place`` (default True, Flax's behaviour) writes ``W_sn`` into the
  wrapped layer's parameter, so the next call starts from the normalized
  kernel (its sigma is then close to 1) and an optimizer updates ``W_sn``.
  With ``in_place=False`` the layer keeps ``W`` (restored after the call):
  every call normalizes the same ``W``, as in the paper, and the stored
  ``sigma`` is ``sigma(W)``. A model that calls the layer once per step
  trains the same either way up to that reparametrization; one that calls it
  twice per step (a GAN discriminator on real and fake data) sees different
  ``sigma`` and losses. Either way the layer sees ``W_sn`` in its
  parameter's stored dtype (Flax's in-place write casts it so): ``dtype``
  is the computation's, and never changes the layer's variables.

  Attributes:
    layer_instance: the wrapped module.
    n_steps, epsilon, dtype, param_dtype, error_on_non_matrix: the
      constructor's arguments.
    use_running_average: ``not update_stats`` (what ``.train()``/``.eval()``
      set, as in Flax).
    in_place: write the normalized parameters into the layer.
    batch_stats: ``{path + ("u",): nnx.BatchStat, path + ("sigma",): ...}``.
  """

  layer_instance: nnx.Module
  n_steps: int
  epsilon: float
  dtype: Dtype | None
  param_dtype: Dtype
  error_on_non_matrix: bool
  use_running_average: bool
  in_place: bool
  batch_stats: dict

  def __init__(
      self,
      layer_instance: nnx.Module,
      *,
      n_steps: int = 1,
      epsilon: float = 1e-12,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      error_on_non_matrix: bool = False,
      update_stats: bool = True,
      rngs: nnx.Rngs,
      in_place: bool = True,
  ):
    self.layer_instance = layer_instance
    self.n_steps = n_steps
    self.epsilon = epsilon
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.error_on_non_matrix = error_on_non_matrix
    # `.train()` / `.eval()` set this attribute (update_stats is its negation).
    self.use_running_average = not update_stats
    self.in_place = in_place
    stats = {}
    for path, param in nnx.to_flat_state(nnx.state(layer_instance, nnx.Param)):
      if not self._applies(path, param):
        continue
      key = rngs.params()
      u = jax.random.normal(key, (1, param.shape[-1]), param_dtype) * 0.01
      stats[path + ("u",)] = nnx.BatchStat(u)
      stats[path + ("sigma",)] = nnx.BatchStat(jnp.ones((), param_dtype))
    self.batch_stats = nnx.data(stats)

  def _applies(self, path: tuple, param: Any) -> bool:
    if param.ndim <= 1 or self.n_steps < 1:
      return False
    if param.ndim > 2 and self.error_on_non_matrix:
      raise ValueError(
          f"SpectralNorm: Layer instance parameter is {param.ndim}D but "
          f"error_on_non_matrix is True: the parameter {path} has shape "
          f"{tuple(param.shape)}; spectral normalization is defined on "
          "matrices. Set error_on_non_matrix=False to flatten it to "
          "(-1, out).")
    return True

  def _stat(self, path: tuple, which: str) -> nnx.BatchStat:
    var = self.batch_stats.get(path + (which,))
    if var is None:
      raise RuntimeError(
          f"SpectralNorm: Could not find the path for {which} batch stat "
          f"corresponding to the param {path} in the batch stats dict. "
          "Parameters of the layer_instance should not change! The batch "
          f"stats were made at construction for {sorted(self.batch_stats)}.")
    return var

  def __call__(self, x: Array, update_stats: bool | None = None) -> Any:
    """Calls the wrapped layer with spectrally normalized parameters."""
    if update_stats is None:
      update_stats = not self.use_running_average
    with common.module_errors(type(self).__name__):
      checks.check_eps(self.epsilon, name="epsilon")
    pairs = []
    for path, param in nnx.to_flat_state(
        nnx.state(self.layer_instance, nnx.Param)):
      if not self._applies(path, param):
        continue
      u_var, sigma_var = self._stat(path, "u"), self._stat(path, "sigma")
      value = param.get_value()
      out = value.shape[-1]
      state = {"u": u_var.get_value().reshape(out),
               "sigma": sigma_var.get_value()}
      with common.module_errors(type(self).__name__):
        w_sn, new_state = jaxnorm.spectral_norm(
            value, state, n_steps=self.n_steps, train=True, eps=self.epsilon,
            dtype=self.dtype)
      if update_stats:
        u_var.set_value(new_state["u"].reshape(1, out))
        sigma_var.set_value(new_state["sigma"])
      # The layer gets W_sn in the parameter's stored dtype, as Flax's
      # in-place write does: `dtype` sets the computation's precision (a
      # float32 kernel under dtype=bfloat16 holds bfloat16-rounded values),
      # not the variable's dtype, which a jitted step or optimizer state
      # relies on.
      pairs.append((param, w_sn.astype(value.dtype)))
    if self.in_place:
      for param, w_sn in pairs:
        param.set_value(w_sn)
      return self.layer_instance(x)
    with _swapped(pairs):
      return self.layer_instance(x)


class Dropout(nnx.Dropout):
  """Inverted dropout, drop-in for ``flax.nnx.Dropout``.

  Keeps each unit with probability ``1 - rate`` and scales it by
  ``1 / (1 - rate)`` (:func:`jaxnorm.dropout`); the mask equals Flax's for the
  same key. Like Flax, ``rate=1.0`` returns zeros (with finite, zero
  gradients); unlike Flax, a rate outside ``[0, 1]`` is an error at
  construction. ``.train()``/``.eval()`` and ``nnx.view(model,
  deterministic=...)`` switch ``deterministic``.

  Attributes:
    rate: the probability of dropping a unit (not the keep rate).
    broadcast_dims: axes that share the same mask.
    deterministic: if True, return the input unchanged.
    rng_collection: the stream drawn from when ``rngs`` is an ``nnx.Rngs``.
    rngs: a forked ``nnx.RngStream``, or None.
  """

  rate: float
  broadcast_dims: Sequence[int]
  deterministic: bool | None
  rng_collection: str
  rngs: nnx.RngStream | None

  def __init__(
      self,
      rate: float,
      *,
      broadcast_dims: Sequence[int] = (),
      deterministic: bool | None = False,
      rng_collection: str = "dropout",
      rngs: nnx.Rngs | nnx.RngStream | None = None,
  ):
    common.check_dropout_rate(type(self).__name__, rate)
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
          f"Dropout: rngs must be a Rngs, RngStream or None, but got "
          f"{type(rngs)}. Pass e.g. `rngs=nnx.Rngs(dropout=0)`.")

  def __call__(self, inputs: Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | nnx.RngStream | Array | None = None) -> Array:
    """Applies dropout; ``rngs`` (Rngs, RngStream or key) overrides the stored one."""
    if deterministic is None:
      deterministic = self.deterministic
    if deterministic is None:
      raise ValueError(
          "No `deterministic` argument was provided to Dropout. Pass "
          "`deterministic=True/False` to the constructor or the call, use "
          "`.train()` / `.eval()`, or "
          "`nnx.view(model, deterministic=True/False)`.")
    if deterministic or self.rate == 0.0:
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    if rngs is None:
      rngs = self.rngs
    if rngs is None:
      raise ValueError(
          "`deterministic` is False, but no `rngs` argument was provided to "
          "Dropout as either a __call__ argument or class attribute. Pass "
          "`rngs=` to the constructor or the call, or make it deterministic.")
    if isinstance(rngs, nnx.Rngs):
      key = rngs[self.rng_collection]()
    elif isinstance(rngs, nnx.RngStream):
      key = rngs()
    elif isinstance(rngs, jax.Array):
      key = rngs
    else:
      raise TypeError(
          f"Dropout: rngs must be a Rngs, RngStream or jax.Array, but got "
          f"{type(rngs)}. Pass e.g. `rngs=nnx.Rngs(dropout=0)` or a key.")
    return common.dropout(type(self).__name__, key, inputs, self.rate,
                          self.broadcast_dims)
