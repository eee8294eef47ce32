"""Batch norm in train mode with a closed-form backward pass (``jax.custom_vjp``).

Autodiff of ``moments -> normalize`` builds the backward pass out of the
transposes of every forward op and materializes several full-size
intermediates. The closed form needs two per-channel sums and one elementwise
pass. With ``xhat = (x - mu) * rstd`` (``rstd = 1 / sqrt(var + eps)``),
``y = g * xhat + b``, the mask ``m`` (all ones without one), ``N = sum(m)``
(over the reduction axes and the devices of ``axis_name``) and output
cotangents ``dy``, ``dmu``, ``dvar`` (the last two for the returned batch
statistics, zero when only the state uses them)::

  S1 = sum(g * dy)          S2 = sum(g * dy * xhat)       over *every* entry
  dx = g * rstd * dy + m / N * (dmu - rstd * S1 + (2 * dvar / rstd - rstd * S2) * xhat)
  dg = sum(dy * xhat)       db = sum(dy)                  this device's entries only

The sums run over every entry, masked ones included, because a masked-out
entry still gets an output normalized with the batch statistics; only the
statistics' own derivatives carry the mask. ``S1``, ``S2``, ``dmu`` and ``dvar``
are summed over ``axis_name`` (every device's loss depends on the shared
statistics); ``dg`` and ``db`` are not, as with autodiff, where each device's
parameter gradient is its own (the caller averages gradients across devices,
or shard_map's replication rules sum them).

Numerics are those of the forward pass: the forward *is*
:func:`moments.shifted_moments` followed by :func:`moments.normalize`, and the
backward recomputes ``xhat`` in the same shifted coordinates,
``((x - shift) - mean_d) * rstd``, accumulating in float32 for low-precision
inputs.

Only reverse mode is defined (``jax.custom_vjp``); forward-mode
(``jax.jvp``/``jacfwd``) through train-mode batch norm raises. Complex inputs
and batch renorm do not come here: they use plain autodiff.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._src import moments as moments_lib


def supported(x) -> bool:
  """Whether :func:`batch_norm_train` handles ``x`` (real floating point)."""
  return jnp.issubdtype(x.dtype, jnp.floating)


def batch_norm_train(x, scale, bias, *, axes, eps, mask=None, axis_name=None,
                     axis_index_groups=None, dtype=None):
  """Train-mode batch norm: ``(y, mean, var)``, mean and var with keepdims.

  Args:
    x: real floating-point input.
    scale, bias: ``None`` or arrays broadcastable against ``x`` (size 1 on
      ``axes``).
    axes: reduction axes (non-negative ints).
    eps: added to the variance (Python number or scalar array).
    mask: optional boolean array broadcastable to ``x``.
    axis_name, axis_index_groups: statistics across devices.
    dtype: output dtype (default ``x.dtype``).

  Returns:
    ``y`` and the batch mean and biased variance in ``stat_dtype``; all three
    are differentiable (reverse mode).
  """
  groups = None if axis_index_groups is None else tuple(
      tuple(int(i) for i in g) for g in axis_index_groups)
  config = (tuple(axes), axis_name, groups,
            jnp.dtype(x.dtype if dtype is None else dtype))
  real = jnp.finfo(moments_lib.stat_dtype(x.dtype)).dtype
  # Under shard_map, inputs replicated across devices (params, eps) are made
  # device-varying like `x` *outside* the custom_vjp: their cotangents from
  # the backward pass are per-device, and the transpose of that cast sums
  # them, exactly as autodiff of the plain formula does.
  vary = lambda v: _vary_like(v, x)
  return _bn(config, x, vary(scale), vary(bias), mask, vary(jnp.asarray(eps, real)))


def _vma(v):
  """The mesh axes `v` varies over inside shard_map (empty elsewhere)."""
  aval = jax.typeof(v)
  mat = getattr(aval, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", None) or ())


def _vary_like(v, x):
  if v is None:
    return None
  missing = tuple(sorted(_vma(x) - _vma(v), key=str))
  return lax.pcast(v, missing, to="varying") if missing else v


def _forward(config, x, scale, bias, mask, eps):
  axes, axis_name, groups, dtype = config
  m = moments_lib.shifted_moments(x, axes, mask=mask, axis_name=axis_name,
                                  axis_index_groups=groups)
  y = moments_lib.normalize(x, m, eps=eps, scale=scale, bias=bias, dtype=dtype)
  return (y, moments_lib.full_mean(m), m.var), m


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bn(config, x, scale, bias, mask, eps):
  return _forward(config, x, scale, bias, mask, eps)[0]


def _bn_fwd(config, x, scale, bias, mask, eps):
  out, m = _forward(config, x, scale, bias, mask, eps)
  return out, (x, scale, bias, mask, eps, m.shift, m.mean, m.var)


def _bn_bwd(config, res, cotangents):
  axes, axis_name, groups, _ = config
  x, scale, bias, mask, eps, shift, mean_d, var = res
  gy, gmean, gvar = cotangents
  sdt = moments_lib.stat_dtype(x.dtype)
  xs = x.astype(sdt)
  dy = gy.astype(sdt)
  rstd = lax.rsqrt(var + eps)
  xhat = ((xs - shift) - mean_d) * rstd

  sum_dy = jnp.sum(dy, axis=axes, keepdims=True)
  # sum(dy * xhat) = rstd * (sum(dy * (x - shift)) - mean_d * sum(dy)): no
  # cancellation, as (x - shift) and mean_d are both of the data's spread.
  # `x + (-shift)` (bitwise `x - shift`) keeps XLA from sharing one full-size
  # `x - shift` between this reduction and `dx` (see moments.py).
  sum_dy_d = jnp.sum(dy * (xs + (-shift)), axis=axes, keepdims=True)
  sum_dy_xhat = rstd * (sum_dy_d - mean_d * sum_dy)
  g = None if scale is None else scale.astype(sdt)
  s1 = sum_dy if g is None else g * sum_dy
  s2 = sum_dy_xhat if g is None else g * sum_dy_xhat

  gmean = gmean.astype(sdt)
  gvar = gvar.astype(var.dtype)
  n_local = math.prod(x.shape[a] for a in axes)
  if mask is None:
    count = jnp.asarray(n_local, var.dtype)
    if axis_name is not None:
      count = count * lax.psum(1, axis_name, axis_index_groups=groups)
  else:
    count = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=axes, keepdims=True,
                    dtype=var.dtype)
  if axis_name is not None:
    to_sum = [s1, s2] + ([] if mask is None else [count])
    # Cotangents of the statistics are summed over the devices that share
    # them, unless shard_map already typed them as replicated (then they are
    # the total).
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    sum_stats = not _vma(gmean) or any(n in _vma(gmean) for n in names)
    if sum_stats:
      to_sum += [gmean, gvar]
    summed = lax.psum(tuple(to_sum), axis_name, axis_index_groups=groups)
    s1, s2 = summed[:2]
    if mask is not None:
      count = summed[2]
    if sum_stats:
      gmean, gvar = summed[-2:]
  gmean_t, gvar_t = gmean, gvar
  inv_n = 1.0 / jnp.maximum(count, 1)

  a = rstd if g is None else g * rstd
  b = (gmean_t - rstd * s1) * inv_n
  c = (2.0 * gvar_t / rstd - rstd * s2) * inv_n
  stat_term = b + c * xhat
  if mask is not None:
    stat_term = jnp.where(mask, stat_term, jnp.zeros((), sdt))
  dx = (a * dy + stat_term).astype(x.dtype)

  dscale = None if scale is None else _like(sum_dy_xhat, scale)
  dbias = None if bias is None else _like(sum_dy, bias)
  # d/d eps of the loss: through rstd only (the statistics do not use eps).
  deps = jnp.sum(-0.5 * rstd * rstd * (sum_dy_xhat if g is None else g * sum_dy_xhat))
  deps = deps.astype(eps.dtype)
  return dx, dscale, dbias, None, deps


def _like(value, ref):
  return jnp.reshape(value, ref.shape).astype(ref.dtype)


_bn.defvjp(_bn_fwd, _bn_bwd)
