"""Normalization with batch statistics and a closed-form derivative (``jax.custom_jvp``).

Autodiff of ``moments -> normalize`` differentiates every step of the moments
(the shift, the two one-pass sums, the variance formula) and XLA keeps several
full-size intermediates for the backward pass. The derivative of a
normalization layer has a short closed form; this module gives it as the
*tangent* rule of a ``jax.custom_jvp``. The rule is linear in the tangents, so
JAX transposes it for reverse mode, and the backward pass reads ``x`` and
``dy`` once each for two per-group sums and once more for ``dx``. Forward mode
(``jax.jvp``, ``jacfwd``) and higher orders work as for any JAX function.

With the mask ``m`` (all ones without one), ``<v> = sum(m * v) / sum(m)`` over
the reduction axes (and the devices of ``axis_name``),
``rstd = 1 / sqrt(var + eps)``, ``xhat = (x - mean) * rstd`` and
``y = g * xhat + b``, the tangents (``dx``, ``dg``, ``db``, ``deps``) map to::

  a     = <dx>                      (0 for RMS statistics)
  c     = <xhat * dx>
  dxhat = rstd * (dx - a - xhat * c) - rstd**2 / 2 * xhat * deps
  dy    = g * dxhat + dg * xhat + db
  dmean = a,   dvar = 2 * c / rstd

For RMS norm, ``mean`` is 0 and ``var`` is the mean square; the same lines
hold with ``a = 0``. Transposed, these are Ioffe & Szegedy's backward pass
(``dx = g * rstd * (dy - <dy> - xhat * <dy * xhat>)`` without a mask).
Masked-out entries still get an output normalized with the statistics, so
their ``dy`` runs through the first term; only the statistics' derivatives
carry the mask.

Numerics are those of the forward pass: it *is*
:func:`moments.shifted_moments` followed by :func:`moments.normalize`, and
``xhat`` is recomputed in the same shifted coordinates,
``((x - shift) - mean_d) * rstd``, in float32 for low-precision inputs.
Complex inputs are not handled here: callers use plain autodiff for them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._src import moments as moments_lib


def supported(x) -> bool:
  """Whether :func:`normalize_with_batch_stats` handles ``x`` (real floating point)."""
  return jnp.issubdtype(x.dtype, jnp.floating)


def normalize_with_batch_stats(x, scale, bias, *, axes, eps, mask=None,
                               axis_name=None, axis_index_groups=None,
                               dtype=None, rms=False, pool=1):
  """``(y, mean, var)``: ``x`` normalized with its own statistics over ``axes``.

  Args:
    x: real floating-point input.
    scale, bias: ``None`` or arrays broadcastable against ``x``.
    axes: reduction axes (non-negative ints).
    eps: added to the variance (Python number or scalar array).
    mask: optional boolean array broadcastable to ``x``: entries left out of
      the statistics.
    axis_name, axis_index_groups: statistics across a mapped axis.
    dtype: output dtype (default ``x.dtype``).
    rms: RMS statistics (no centering): ``mean`` is 0, ``var`` the mean square.
    pool: pool the statistics over groups of this many consecutive channels
      of the last axis (group norm; see :func:`moments.shifted_moments`).

  Returns:
    ``y`` and the mean and (biased) variance with ``keepdims`` shapes, in
    ``stat_dtype(x.dtype)``; all three differentiable in both modes.
  """
  groups = None if axis_index_groups is None else tuple(
      tuple(int(i) for i in g) for g in axis_index_groups)
  # Static and hashable: (axes, axis_name, groups, output dtype, rms, pool).
  config = (tuple(axes), axis_name, groups,
            jnp.dtype(x.dtype if dtype is None else dtype), bool(rms), int(pool))
  real = jnp.finfo(moments_lib.stat_dtype(x.dtype)).dtype
  return _norm(config, x, scale, bias, mask, jnp.asarray(eps, real))


def normalize_over(x, axes, *, scale, bias, eps, mask, axis_name,
                   axis_index_groups, dtype, rms=False, pool=1):
  """Normalizes ``x`` with its own statistics over ``axes``; returns ``y``.

  ``pool`` pools the statistics over groups of channels of the last axis
  (group norm, see :func:`moments.shifted_moments`).

  Real inputs take the closed-form derivative of this module; complex ones
  the same moments and normalize step under plain autodiff.
  """
  if supported(x):
    return normalize_with_batch_stats(
        x, scale, bias, axes=axes, eps=eps, mask=mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups, dtype=dtype, rms=rms, pool=pool)[0]
  m = moments_lib.shifted_moments(x, axes, mask=mask, axis_name=axis_name,
                                  axis_index_groups=axis_index_groups, rms=rms,
                                  pool=pool)
  return moments_lib.normalize(x, m, eps=eps, scale=scale, bias=bias, dtype=dtype)


def _moments(config, x, mask):
  axes, axis_name, groups, _, rms, pool = config
  return moments_lib.shifted_moments(x, axes, mask=mask, axis_name=axis_name,
                                     axis_index_groups=groups, rms=rms, pool=pool)


def _outputs(config, x, scale, bias, m, eps):
  y = moments_lib.normalize(x, m, eps=eps, scale=scale, bias=bias, dtype=config[3])
  return y, moments_lib.full_mean(m), m.var


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _norm(config, x, scale, bias, mask, eps):
  return _outputs(config, x, scale, bias, _moments(config, x, mask), eps)


@_norm.defjvp
def _norm_jvp(config, primals, tangents):
  axes, axis_name, groups, _, rms, pool = config
  x, scale, bias, mask, eps = primals
  tx, tscale, tbias, _, teps = tangents
  m = _moments(config, x, mask)
  out = _outputs(config, x, scale, bias, m, eps)

  sdt = moments_lib.stat_dtype(x.dtype)
  rstd = lax.rsqrt(m.var + eps)
  xs = x.astype(sdt)
  dx = tx.astype(sdt)
  # xhat = (d - mean_d) * rstd with d = x - shift (d = x for RMS statistics).
  # Full-size terms are written with `d` alone and the per-group `mean_d` and
  # `rstd` are applied to small arrays: the transposed program then sums
  # `dy` and `dy * d` straight from `x` and `dy`, with no broadcast of a
  # per-group value written out at full size. `d` has two bitwise-equal
  # spellings (`x + (-shift)` is `x - shift`) so the statistics' term and the
  # output term do not share one full-size `d` that XLA would keep alive.
  if rms:
    d_stats = d_out = xs
    mean_d = None
  else:
    d_stats = xs - m.shift
    d_out = xs + (-m.shift)
    mean_d = m.mean

  def stat_mean(*values):
    # The forward pass's reduction (masked, pooled, across devices), applied
    # to tangents.
    return moments_lib.stat_mean(values, like=x, axes=axes, mask=mask, pool=pool,
                                 axis_name=axis_name, axis_index_groups=groups)

  if rms:
    (e,) = stat_mean(d_stats * dx)
    a = None
    c = rstd * e
  else:
    a, e = stat_mean(dx, d_stats * dx)
    # <xhat * dx> = rstd * (<d * dx> - mean_d * <dx>): no cancellation, as
    # `d` and `mean_d` are both of the data's spread.
    c = rstd * (e - mean_d * a)

  # dy = g * (rstd * (dx - a - xhat * c) - rstd**2 / 2 * xhat * deps)
  #      + dg * xhat + db.
  # Per-group factors multiply the small means, not full-size arrays, so the
  # transpose sums `dy` and `dy * d` once each and scales the sums. A scale
  # that is constant over the reduction axes (batch norm) joins those
  # factors; one that varies along them (layer norm) stays elementwise.
  g = None if scale is None else scale.astype(sdt)
  g_const = g is not None and all(g.shape[i] == 1 for i in axes)
  k = g * rstd if g_const else rstd
  xhat_coef = -k * c - (0.5 * k * rstd) * teps
  if g_const:
    xhat_coef = xhat_coef + tscale.astype(sdt)
  # xhat * coef = d * (rstd * coef) - mean_d * rstd * coef.
  d_coef = rstd * xhat_coef
  offset = None if a is None else -k * a - mean_d * d_coef
  inner = k * dx + d_out * d_coef
  if offset is not None:
    inner = inner + offset
  dy = inner
  if g is not None and not g_const:
    xhat = d_out * rstd if rms else (d_out - mean_d) * rstd
    dy = g * inner + tscale.astype(sdt) * xhat
  if bias is not None:
    dy = dy + tbias.astype(sdt)
  dmean = jnp.zeros_like(m.var) if rms else a
  dvar = 2.0 * c / rstd
  return out, (dy.astype(out[0].dtype), dmean.astype(out[1].dtype),
               dvar.astype(out[2].dtype))
