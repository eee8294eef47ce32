"""Dropout (Srivastava et al. 2014, JMLR 15), in its inverted form."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxnorm._src import checks


def check_rate(rate: ArrayLike, *, allow_one: bool = False) -> float | None:
  """``rate`` must be a real number in [0, 1) ([0, 1] when ``allow_one``).

  A concrete value (a Python or NumPy number, or a non-traced 0-d
  ``jax.Array``) is checked by value; a traced one only by type.

  Returns:
    The concrete rate as a Python float, or None when it is traced.

  Raises:
    TypeError: ``rate`` is not a real scalar.
    ValueError: a concrete ``rate`` outside the interval, or NaN.
  """
  r = checks.check_real_scalar("rate", rate)
  if r is None:
    return None
  ok = 0.0 <= r <= 1.0 if allow_one else 0.0 <= r < 1.0
  if not ok:
    interval = "[0, 1]" if allow_one else "[0, 1)"
    hint = (
        "" if allow_one else
        " (rate 1 drops everything; the Dropout modules accept it and return zeros)"
    )
    raise ValueError(
        f"`rate` is the probability of dropping a unit and must be in {interval}"
        f"{hint}, got {checks.format_value(rate)}."
    )
  return r


def keep_mask(key: jax.Array, shape: Sequence[int], keep_prob: ArrayLike,
              broadcast_dims: Sequence[int] = ()) -> jax.Array:
  """Bernoulli(keep_prob) mask of `shape`, shared along `broadcast_dims`."""
  mask_shape = list(shape)
  for dim in broadcast_dims:
    mask_shape[dim] = 1
  mask = jax.random.bernoulli(key, p=keep_prob, shape=tuple(mask_shape))
  return jnp.broadcast_to(mask, tuple(shape))


def dropout(
    key: jax.Array | None,
    x: jax.Array,
    rate: ArrayLike,
    *,
    train: bool = True,
    broadcast_dims: Sequence[int] = (),
) -> jax.Array:
  """Inverted dropout: ``y = x * m / (1 - rate)`` with ``m ~ Bernoulli(1 - rate)``.

  Each entry of ``x`` is kept with probability ``1 - rate`` and scaled by
  ``1 / (1 - rate)``, otherwise set to 0, so ``E[y] = x``; at inference
  (``train=False``) ``x`` is returned unchanged. The mask equals the one of
  ``flax.linen.Dropout`` for the same key.

  Args:
    key: a PRNG key (unused, may be None, when ``train=False`` or ``rate == 0``).
      The mask is ``jax.random.bernoulli(key, 1 - rate, shape)``, where
      ``shape`` is ``x.shape`` with 1 along ``broadcast_dims``.
    x: the input, a floating-point (or complex) array of any shape.
    rate: the probability of dropping each unit, in ``[0, 1)``. A concrete
      number outside that interval (a Python or NumPy number, or a 0-d
      ``jax.Array`` that is not traced) is an error at trace time; a traced
      rate is not checked (a traced rate of 1 gives zeros and zero gradients). The
      ``Dropout`` modules also accept ``rate=1.0`` (they return zeros, as Flax
      does); this function does not, since ``1 / (1 - rate)`` is undefined.
    train: apply dropout (True) or return ``x`` (False); a Python bool (or a
      concrete boolean scalar), since it picks the computation at trace time.
    broadcast_dims: axes along which the mask is shared, e.g. ``(1,)`` on
      ``(batch, time, features)`` drops the same features at every time step;
      ``(1, 2)`` on ``(N, H, W, C)`` drops whole channels (spatial dropout).

  Returns:
    An array of the shape and dtype of ``x``.

  Raises:
    TypeError: ``x`` that is not a floating-point array (integers would be
      truncated by the ``1 / (1 - rate)`` scaling), a non-numeric ``rate``, or
      a ``train`` that is not a static bool.
    ValueError: a concrete ``rate`` outside ``[0, 1)``, ``key=None`` in train
      mode, or ``broadcast_dims`` out of range.

  >>> import jax, jax.numpy as jnp, jaxnorm
  >>> y = jaxnorm.dropout(jax.random.key(0), jnp.ones(6), 0.5)
  >>> sorted(set(y.tolist())) in ([0.0, 2.0], [0.0], [2.0])
  True
  """
  checks.check_array("x", x)
  r = check_rate(rate)
  train = checks.check_train("train", train)
  dims = checks.normalize_axes("broadcast_dims", broadcast_dims, x.ndim)
  if not train or r == 0.0:
    return x
  if key is None:
    raise ValueError("`key` is None but `train=True`; pass a PRNG key such as "
                     "`jax.random.key(0)`.")
  keep_prob: float | jax.Array
  safe_keep: float | jax.Array
  if r is not None:
    keep_prob = safe_keep = 1.0 - r
  else:  # a traced rate
    keep_prob = 1.0 - jnp.asarray(rate)
    safe_keep = jnp.where(keep_prob > 0, keep_prob, 1.0)
  mask = keep_mask(key, x.shape, keep_prob, dims)
  kept = (x / safe_keep).astype(x.dtype)
  return lax.select(mask, kept, jnp.zeros_like(x))
