"""The setup every layer shares: feature shape, parameter and state checks,
scale and bias broadcast against ``x``.

Layers (and :mod:`jaxnorm._src.fold`) import this module, never each other's
private helpers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxnorm._src import checks


def feature_shape(num_features) -> tuple[int, ...]:
  """``num_features`` (an int, or a tuple of ints) as a shape tuple."""
  return checks.feature_shape("num_features", num_features)


def affine_init(shape: tuple[int, ...], *, dtype, use_scale: bool = True,
                use_bias: bool = True, zero_centered_scale: bool = False) -> dict:
  """``{"scale": ones, "bias": zeros}`` of ``shape``, each key only if used.

  With ``zero_centered_scale`` the scale starts at zeros (it is applied as
  ``1 + scale``).
  """
  checks.check_float_dtype("dtype", dtype)
  params = {}
  if use_scale:
    params["scale"] = (jnp.zeros if zero_centered_scale else jnp.ones)(shape, dtype)
  if use_bias:
    params["bias"] = jnp.zeros(shape, dtype)
  return params


class Setup(NamedTuple):
  """A checked call: the reduction axes, the parameters broadcast against
  ``x`` (``None`` when off) and the output dtype."""

  x: jax.Array
  feature_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  feature_shape: tuple[int, ...]
  bshape: tuple[int, ...]
  scale: jax.Array | None
  bias: jax.Array | None
  out_dtype: jnp.dtype


def setup(
    params,
    x,
    *,
    feature_axes: tuple[int, ...],
    reduction_axes: tuple[int, ...],
    allowed: Sequence[str],
    where: str,
    eps,
    mask,
    dtype,
    zero_centered_scale: bool = False,
    hint: str = "pass `axis=` to choose the feature axis",
) -> Setup:
  """Checks ``params``, ``eps``, ``mask`` and ``dtype`` against ``x`` (already
  checked) and broadcasts the parameters to ``x``'s rank. ``where`` and
  ``hint`` are as in :func:`checks.check_params`."""
  checks.check_eps(eps)
  checks.check_mask(mask, x)
  checks.check_float_dtype("dtype", dtype)
  fshape = tuple(x.shape[a] for a in feature_axes)
  params = checks.check_params(params, fshape, allowed, where, hint=hint)
  bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
  scale = params.get("scale")
  bias = params.get("bias")
  scale = None if scale is None else jnp.reshape(scale, bshape)
  if scale is not None and zero_centered_scale:
    scale = 1 + scale
  bias = None if bias is None else jnp.reshape(bias, bshape)
  return Setup(x, tuple(feature_axes), tuple(reduction_axes), fshape, bshape,
               scale, bias, checks.result_dtype(x, params, dtype))


def batch_norm_variables(
    params,
    state,
    feature_shape: tuple[int, ...],
    *,
    where: str,
    hint: str,
    subject: str,
    allow_complex: bool = True,
    state_keys: Sequence[str] = ("mean", "var"),
) -> dict[str, jax.Array]:
  """Checks a batch norm's ``params`` and running averages ``state`` against
  ``feature_shape`` outside a layer call (:mod:`jaxnorm._src.fold`): the same
  checks, and messages, as :func:`setup` and the batch norm's state check.

  Returns:
    ``params`` without ``None`` values (``{}`` for ``None``).
  """
  params = checks.check_params(params, feature_shape, ("scale", "bias"), where,
                               hint=hint, subject=subject,
                               allow_complex=allow_complex)
  checks.check_state(state, feature_shape, where, allowed=state_keys, hint=hint,
                     subject=subject, allow_complex=allow_complex)
  return params


def input_array(x, *, min_ndim: int = 1, what: str = "") -> jax.Array:
  """``x`` checked (floating point or complex) and as a JAX array."""
  checks.check_array("x", x)
  x = jnp.asarray(x)
  if min_ndim == 1 and x.ndim < 1:
    raise ValueError("`x` must have at least 1 dimension, got a scalar.")
  if min_ndim > 1:
    checks.check_min_rank("x", x, min_ndim, what)
  return x


def empty_output(s: Setup) -> jax.Array:
  """The output for a zero-size ``x``: an empty array, as NumPy gives."""
  return jnp.zeros(s.x.shape, s.out_dtype)
