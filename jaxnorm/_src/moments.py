"""The one place statistics are computed, and the one normalize step.

Every layer is ``moments -> normalize -> affine``; this module holds the first
two.

Numerics. The textbook one-pass variance ``E[x^2] - E[x]^2`` cancels
catastrophically when ``|mean| >> std`` (float32 inputs ``1e5 + randn`` lose
every digit). The two-pass formula is exact but reads ``x`` twice. We use the
*shifted-data* algorithm: pick a per-group ``shift`` from the data itself (one
sample, ``stop_gradient``-ed), and compute the one-pass moments of
``d = x - shift``. Because ``shift`` is within a few standard deviations of
the mean, ``d`` is small and exact (Sterbenz), and
``var = E[d^2] - E[d]^2`` has no cancellation. The normalize step then works in
the same shifted coordinates, ``((x - shift) - E[d]) * rsqrt(var + eps)``, so a
float32 mean near ``1e5`` (whose spacing is ``~8e-3``) is never subtracted
from ``x``. The shift cancels exactly in the math, so values and gradients are
those of the textbook formula.

Two layouts get their own form. When the reduced axes are the trailing ones
(layer norm), XLA runs the whole layer as one loop over rows held in cache,
so the variance is taken in a second pass over the row,
``E[(d - E[d])^2]``, which has no cancellation at all. Group norm pools
per-channel sums over each group's channels (``pool``), which keeps ``x`` in
its own layout and sums in two stages.

Statistics are accumulated in float32 for low-precision inputs (float64 under
x64 for float64 inputs). Complex inputs get a complex mean and the real
variance ``E|x|^2 - |E x|^2``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._src import checks


class Moments(NamedTuple):
  """Statistics in shifted coordinates, all with ``keepdims`` shapes.

  The mean of ``x`` is ``shift + mean``; ``var`` is real.
  For RMS statistics, ``shift`` and ``mean`` are ``None`` and ``var`` holds
  the mean square.
  """

  shift: jax.Array | None
  mean: jax.Array | None
  var: jax.Array


def stat_dtype(dtype):
  """float32 for half/single precision, float64 for float64 (complex alike)."""
  return jnp.promote_types(dtype, jnp.float32)


def _abs2(z):
  if jnp.iscomplexobj(z):
    return lax.real(z) ** 2 + lax.imag(z) ** 2
  return z * z


def _first_sample(x, axes):
  index = tuple(slice(0, 1) if a in axes else slice(None) for a in range(x.ndim))
  return x[index]


def pool_channels(v, pool: int):
  """Sums ``v`` over groups of ``pool`` consecutive entries of its last axis,
  each group's sum repeated over its entries (the identity for ``pool=1``).

  This is how group norm pools per-channel sums into per-group statistics
  without leaving the ``(..., C)`` layout. The map is symmetric, so it is its
  own transpose. It is a product with the block-diagonal matrix of ones
  (exact: it adds zeros), not a reshape-and-sum: XLA fuses a small reduction
  into the full-size loop that consumes it, which then writes its other
  operands out at full size (measured on CPU: 32 MiB of temporaries for the
  benchmark's group norm backward pass); a dot stays on its own.
  """
  if pool == 1:
    return v
  c = v.shape[-1]
  member = (jnp.arange(c)[:, None] // pool == jnp.arange(c // pool)[None, :])
  member = member.astype(v.dtype)                       # (C, G)
  sums = jnp.matmul(v, member, precision=lax.Precision.HIGHEST)
  return jnp.matmul(sums, member.T, precision=lax.Precision.HIGHEST)


def stat_mean(values, *, like, axes, mask=None, pool=1, axis_name=None,
              axis_index_groups=None):
  """Means of each of ``values`` over ``axes``, channel groups and devices.

  ``values`` are arrays of ``like``'s shape, in the statistics dtype; the
  means have ``keepdims`` shapes. Masked-out entries are left out and the
  count is that of the selected entries (at least 1); across ``axis_name``
  the mean is of the whole mapped batch.
  """
  collective = dict(axis_name=axis_name, axis_index_groups=axis_index_groups)
  if mask is None:
    n = math.prod(like.shape[a] for a in axes) * pool
    sums = tuple(pool_channels(jnp.sum(v, axis=axes, keepdims=True), pool)
                 for v in values)
    if axis_name is not None:
      sums = lax.psum(sums, **collective)
      n = n * lax.psum(1, **collective)
    return tuple(s * (1.0 / n) for s in sums)
  real_dt = jnp.finfo(values[0].dtype).dtype
  zero = jnp.zeros((), values[0].dtype)
  sums = tuple(pool_channels(jnp.sum(jnp.where(mask, v, zero), axis=axes,
                                     keepdims=True), pool)
               for v in values)
  count = pool_channels(jnp.sum(jnp.broadcast_to(mask, like.shape), axis=axes,
                                keepdims=True, dtype=real_dt), pool)
  if axis_name is not None:
    sums, count = lax.psum((sums, count), **collective)
  inv = 1.0 / jnp.maximum(count, 1)
  return tuple(s * inv for s in sums)


def shifted_moments(
    x: jax.Array,
    axes: tuple[int, ...],
    *,
    mask: jax.Array | None = None,
    axis_name=None,
    axis_index_groups=None,
    rms: bool = False,
    pool: int = 1,
) -> Moments:
  """Mean and variance of ``x`` over ``axes`` (non-negative ints), keepdims.

  Args:
    x: the input; statistics are taken in ``stat_dtype(x.dtype)``.
    axes: the reduction axes.
    mask: optional boolean array broadcastable to ``x``; entries that are
      ``False`` do not contribute.
    axis_name: if given, statistics are averaged over this mapped axis
      (``shard_map``/``pmap``/``vmap``), weighted by each member's count.
    axis_index_groups: passed to the collectives.
    rms: compute the mean square only (RMS norm).
    pool: also pool the statistics over groups of this many consecutive
      channels of the last axis, which must not be in ``axes`` (group norm);
      every channel of a group gets the group's statistics.
  """
  sdt = stat_dtype(x.dtype)
  xs = x.astype(sdt)
  collective = dict(axis_name=axis_name, axis_index_groups=axis_index_groups)
  real_dt = jnp.finfo(sdt).dtype

  def reduce_mean(*values):
    return stat_mean(values, like=x, axes=axes, mask=mask, pool=pool,
                     **collective)

  if rms:
    (ms,) = reduce_mean(_abs2(xs))
    return Moments(None, None, ms.astype(real_dt))

  if mask is None:
    # The first sample, sliced from `x` behind a barrier (an identity): a
    # slice sharing its operand with the main loop makes XLA write the
    # float32 copy of a low-precision `x` out at full size.
    shift = _first_sample(lax.optimization_barrier(x), axes).astype(sdt)
    if pool > 1:
      # The group's first channel, for every channel of the group.
      c = shift.shape[-1]
      grouped = shift.shape[:-1] + (c // pool, pool)
      shift = jnp.broadcast_to(shift.reshape(grouped)[..., :1], grouped).reshape(shift.shape)
    if axis_name is not None:
      # Every member must normalize in the same coordinates.
      shift = lax.pmean(shift, **collective)
  else:
    (shift,) = reduce_mean(xs)
  shift = lax.stop_gradient(shift)

  if (mask is None and axis_name is None and pool == 1 and axes
      and _trailing(axes, x.ndim)):
    # Rows of contiguous memory (layer norm): XLA fuses the whole layer into
    # one loop over rows, each row in cache, so a second pass over the row is
    # nearly free. Two passes in shifted coordinates: no E[d^2] - E[d]^2
    # cancellation at all, and one shared `d` (measured on CPU: 12% faster
    # than the one-pass form below for (8192, 1024), and 3x more accurate at
    # offset 0).
    d = xs - shift
    (mean,) = reduce_mean(d)
    (var,) = reduce_mean(_abs2(d - mean))
    return Moments(shift, mean, var.astype(real_dt))

  # Performance (XLA on CPU), values unchanged: `x + (-shift)` is bitwise
  # `x - shift`, and the barrier is an identity on the small `shift`. They
  # keep the two reductions and the normalize step from sharing one
  # broadcast/subtraction, which XLA would otherwise write out as a full-size
  # temporary; instead each fuses its own subtraction and reads `x` directly
  # (measured: BN forward 1.5x -> 0.9x of Flax's time).
  mean, mean_sq = reduce_mean(xs - shift, _abs2(xs + (-shift)))
  var = jnp.maximum(mean_sq.astype(real_dt) - _abs2(mean).astype(real_dt), 0)
  return Moments(lax.optimization_barrier(shift), mean, var)


def _trailing(axes, ndim) -> bool:
  """Whether `axes` are the last `len(axes)` axes (contiguous rows)."""
  return tuple(sorted(axes)) == tuple(range(ndim - len(axes), ndim))


def full_mean(m: Moments) -> jax.Array:
  """The mean of ``x`` itself (``shift + mean``)."""
  if m.shift is None:
    return jnp.zeros_like(m.var)
  return m.shift + m.mean


def normalize(
    x: jax.Array,
    m: Moments,
    *,
    eps,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    dtype=None,
    r: jax.Array | None = None,
    d: jax.Array | None = None,
) -> jax.Array:
  """``((x - shift) - mean) * rsqrt(var + eps) [* r + d] [* scale] [+ bias]``.

  ``scale``, ``bias``, ``r`` and ``d`` must already broadcast against ``x``
  (as must the moments). ``r``/``d`` are the batch-renorm corrections.
  The arithmetic is in ``stat_dtype``; the result is cast to ``dtype``
  (default ``x.dtype``).
  """
  sdt = stat_dtype(x.dtype)
  y = x.astype(sdt)
  if m.shift is not None:
    y = y - m.shift
  if m.mean is not None:
    y = y - m.mean
  mul = lax.rsqrt(m.var + eps).astype(jnp.finfo(sdt).dtype)
  add = None
  if r is not None:
    mul = mul * r
  if d is not None:
    add = d
  if scale is not None:
    mul = mul * scale.astype(sdt)
    if add is not None:
      add = add * scale.astype(sdt)
  if bias is not None:
    add = bias.astype(sdt) if add is None else add + bias.astype(sdt)
  y = y * mul
  if add is not None:
    y = y + add
  return y.astype(x.dtype if dtype is None else dtype)


def moments(
    x: jax.Array,
    axis,
    *,
    mask: jax.Array | None = None,
    axis_name=None,
    axis_index_groups=None,
    keepdims: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Mean and (biased) variance of ``x`` over ``axis``, exact and in float32.

  This is the statistic every jaxnorm layer uses: computed on data shifted by
  one of its own samples, so inputs with a large mean (``1e5 + randn`` in
  float32) keep full precision, in one pass over ``x`` in memory.

  Args:
    x: floating-point or complex array.
    axis: int or sequence of ints to reduce over.
    mask: optional boolean array broadcastable to ``x``; ``False`` entries are
      left out of the statistics.
    axis_name: average the statistics over this mapped axis too.
    axis_index_groups: groups for the cross-device average.
    keepdims: keep the reduced axes with size 1.

  Returns:
    ``(mean, var)`` in ``float32`` (or wider); ``var`` is real.

  >>> import jax.numpy as jnp, jaxnorm
  >>> mean, var = jaxnorm.moments(jnp.array([[1.0, 2.0], [3.0, 6.0]]), 0)
  >>> mean.tolist(), var.tolist()
  ([2.0, 4.0], [1.0, 4.0])
  """
  checks.check_array("x", x)
  axes = checks.normalize_axes("axis", axis, x.ndim)
  checks.check_mask(mask, x)
  m = shifted_moments(x, axes, mask=mask, axis_name=axis_name,
                      axis_index_groups=axis_index_groups)
  mean, var = full_mean(m), m.var
  if not keepdims:
    mean = jnp.squeeze(mean, axes)
    var = jnp.squeeze(var, axes)
  return mean, var
