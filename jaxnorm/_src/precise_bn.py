"""Precise batch-norm statistics: exact population moments over a dataset.

A batch-norm layer trained with ``momentum=0.99`` keeps exponential moving
averages of batch statistics taken while its weights were still changing, and
small or unrepresentative batches make them noisy (Wu & Johnson, 2021,
"Rethinking 'Batch' in BatchNorm", Section 3). Precise BN recomputes them once
training is done: the mean and variance of each layer's inputs over the whole
dataset, with the trained weights fixed.

This module is the arithmetic, free of any framework: per batch, the count,
mean and sum of squared deviations of each feature (computed on device with
:func:`jaxnorm.moments`, exact in float32 or wider); across batches, Chan,
Golub & LeVeque's (1979) pairwise update in float64 on the host, which is
exact whatever the batch sizes and order::

  n = n_a + n_b,   delta = mean_b - mean_a,
  mean = mean_a + delta * n_b / n,
  M2 = M2_a + M2_b + delta**2 * n_a * n_b / n,     var = M2 / n  (or / (n - 1)).

A batch's mean leaves the device as a frame and an offset from it, both
float32, and is only summed on the host, in float64: ``mean_b = frame_b +
mean_off_b``. A mean rounded to float32 on the device would be off by up to
half an ulp of itself (4e-3 at 1e5), and ``delta`` above with it: with unit
spread and 5 batches of 16-20 values, the variance was off by 2e-5 at an
offset of 1e3, 5e-4 at 1e4 and 2e-3 at 1e5; it is now within 1e-7 of float64.

:func:`jaxnorm.linen.precise_batch_stats` and
:func:`jaxnorm.nnx.precise_batch_stats` use it for every BatchNorm of a model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from jaxnorm._src import checks
from jaxnorm._src.moments import moments


def precise_stats_init(num_features: int | tuple[int, ...]) -> dict[str, np.ndarray]:
  """An empty accumulator: ``{"count", "mean", "m2"}``, float64 NumPy of shape ``num_features``.

  >>> import jaxnorm
  >>> sorted(jaxnorm.precise_stats_init(3))
  ['count', 'm2', 'mean']
  """
  if isinstance(num_features, int) and not isinstance(num_features, bool):
    shape: tuple[int, ...] = (checks.check_positive_int("num_features", num_features),)
  else:
    sizes = cast("tuple[int, ...]", num_features)
    shape = tuple(checks.check_positive_int("num_features", n) for n in sizes)
  return {k: np.zeros(shape, np.float64) for k in ("count", "mean", "m2")}


@functools.partial(jax.jit, static_argnames=("axis",))
def batch_moments(
    x: ArrayLike, *, axis: tuple[int, ...], mask: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per-feature ``(count, frame, mean_off, M2)`` of one batch over every axis but ``axis``.

  The batch's mean is ``frame + mean_off``, a sum left to the host (in
  float64, :func:`combine`): ``frame`` is :func:`jaxnorm.moments`'s mean
  rounded to float32 (or wider), ``mean_off`` the mean of ``x - frame`` (as
  small as that rounding, so exact to float32 of itself). ``M2`` is the count
  times :func:`jaxnorm.moments`'s variance, exact for large means, outliers and
  heavy tails. Masked-out entries are never read, so NaN or inf there reaches
  nothing. A feature without entries has count 0 and frame, offset and M2 0.
  """
  x = jnp.asarray(x)
  reduction = tuple(a for a in range(x.ndim) if a not in axis)
  dt = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(dt)
  m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
  count = jnp.sum(m, axis=reduction, dtype=dt)
  if not reduction:  # every axis a feature: each entry is its own batch of one
    frame = jnp.where(m, x, 0)
    return count, frame, jnp.zeros_like(frame), jnp.zeros_like(frame)
  frame, var = moments(x, reduction, mask=mask, keepdims=True)
  # `x - frame` is exact where `x` is near the mean (within a factor 2 of the
  # frame), and rounded relative to itself elsewhere: the residual of the
  # frame's rounding, taken in the frame.
  dev = jnp.where(m, x - frame, 0)
  mean_off = jnp.sum(dev, axis=reduction) / jnp.maximum(count, 1)
  return count, jnp.squeeze(frame, reduction), mean_off, count * jnp.squeeze(var, reduction)


def combine(acc: Mapping[str, np.ndarray], count, frame, mean_off, m2) -> dict[str, np.ndarray]:
  """Chan et al.'s update of ``acc`` with one batch's ``(count, frame, mean_off, M2)``, float64.

  The batch's mean ``frame + mean_off`` is formed here, in float64, where the
  sum of two float32 numbers is exact (see :func:`batch_moments`).
  """
  n_a, mean_a, m2_a = acc["count"], acc["mean"], acc["m2"]
  n_b, m2_b = np.asarray(count, np.float64), np.asarray(m2, np.float64)
  mean_b = np.asarray(frame, np.float64) + np.asarray(mean_off, np.float64)
  n = n_a + n_b
  safe = np.where(n > 0, n, 1.0)
  delta = mean_b - mean_a
  return {
      "count": n,
      "mean": np.where(n > 0, mean_a + delta * (n_b / safe), mean_a),
      "m2": m2_a + m2_b + np.square(delta) * (n_a * n_b / safe),
  }


def precise_stats_update(
    acc: Mapping[str, np.ndarray],
    x: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    mask: ArrayLike | None = None,
) -> dict[str, np.ndarray]:
  """Adds one batch of a batch-norm layer's inputs to the accumulator.

  Args:
    acc: from :func:`precise_stats_init` or a previous update.
    x: the inputs of the layer on one batch; features along ``axis``.
    axis: the feature axis or axes (as the layer's ``axis``).
    mask: boolean, broadcastable to ``x``: entries left out.

  Returns:
    The new accumulator (float64 NumPy; not a traceable function).
  """
  checks.check_array("x", x, allow_complex=False)
  x = jnp.asarray(x)
  axes = checks.normalize_axes("axis", axis, x.ndim)
  shape = tuple(x.shape[a] for a in axes)
  if tuple(acc["mean"].shape) != shape:
    raise ValueError(
        f"`x` has features of shape {shape} along axis {axis} but the "
        f"accumulator has shape {tuple(acc['mean'].shape)}."
    )
  checks.check_mask(mask, x)
  return combine(acc, *batch_moments(x, axis=axes, mask=mask))


def precise_stats_result(
    acc: Mapping[str, np.ndarray],
    *,
    unbiased: bool = False,
    fallback: Mapping[str, ArrayLike] | None = None,
    dtype: DTypeLike = jnp.float32,
) -> dict[str, jax.Array]:
  """The population ``{"mean", "var"}`` of everything added, as batch-norm ``state``.

  ``var = M2 / n`` (biased, as batch norm normalizes with), or ``M2 / (n - 1)``
  with ``unbiased``. A feature that received no entries takes its value from
  ``fallback`` (the old state) when given, else mean 0 and variance 1.

  >>> import numpy as np, jaxnorm
  >>> acc = jaxnorm.precise_stats_init(1)
  >>> for batch in ([1.0, 2.0], [3.0], [4.0, 5.0, 6.0]):       # any sizes, any order
  ...   acc = jaxnorm.precise_stats_update(acc, np.array(batch)[:, None])
  >>> s = jaxnorm.precise_stats_result(acc)
  >>> float(s["mean"][0]), round(float(s["var"][0]), 4)       # of 1..6
  (3.5, 2.9167)
  """
  n = acc["count"]
  if unbiased:
    var = acc["m2"] / np.where(n > 1, n - 1, 1.0)
    seen = n > 1
  else:
    var = acc["m2"] / np.where(n > 0, n, 1.0)
    seen = n > 0
  old_mean = np.zeros_like(n) if fallback is None else np.asarray(fallback["mean"], np.float64)
  old_var = np.ones_like(n) if fallback is None else np.asarray(fallback["var"], np.float64)
  return {"mean": jnp.asarray(np.where(seen, acc["mean"], old_mean), dtype),
          "var": jnp.asarray(np.where(seen, var, old_var), dtype)}
