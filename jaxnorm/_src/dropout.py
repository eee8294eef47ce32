"""Dropout (Srivastava et al. 2014, JMLR 15), in its inverted form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._src import checks


def check_rate(rate, *, allow_one: bool = False) -> None:
  """A concrete `rate` must be in [0, 1) ([0, 1] when `allow_one`)."""
  if not checks._is_concrete_number(rate):
    return
  r = float(rate)
  ok = 0.0 <= r <= 1.0 if allow_one else 0.0 <= r < 1.0
  if not ok:
    interval = "[0, 1]" if allow_one else "[0, 1)"
    hint = (
        "" if allow_one else
        " (rate 1 drops everything; the Dropout modules accept it and return zeros)"
    )
    raise ValueError(
        f"`rate` is the probability of dropping a unit and must be in {interval}"
        f"{hint}, got {rate}."
    )


def keep_mask(key, shape, keep_prob, broadcast_dims=()):
  """Bernoulli(keep_prob) mask of `shape`, shared along `broadcast_dims`."""
  mask_shape = list(shape)
  for dim in broadcast_dims:
    mask_shape[dim] = 1
  mask = jax.random.bernoulli(key, p=keep_prob, shape=tuple(mask_shape))
  return jnp.broadcast_to(mask, tuple(shape))


def dropout(key, x, rate, *, train: bool = True, broadcast_dims=()):
  """Inverted dropout: ``y = x * m / (1 - rate)`` with ``m ~ Bernoulli(1 - rate)``.

  Each entry of ``x`` is kept with probability ``1 - rate`` and scaled by
  ``1 / (1 - rate)``, otherwise set to 0, so ``E[y] = x``; at inference
  (``train=False``) ``x`` is returned unchanged. The mask equals the one of
  ``flax.linen.Dropout`` for the same key.

  Args:
    key: a PRNG key (unused, may be None, when ``train=False`` or ``rate == 0``).
    x: the input, any shape.
    rate: the probability of dropping each unit, in ``[0, 1)``. A Python
      number outside that interval is an error at trace time; a traced rate is
      not checked (a traced rate of 1 gives zeros and zero gradients). The
      ``Dropout`` modules also accept ``rate=1.0`` (they return zeros, as Flax
      does); this function does not, since ``1 / (1 - rate)`` is undefined.
    train: apply dropout (True) or return ``x`` (False).
    broadcast_dims: axes along which the mask is shared, e.g. ``(1,)`` on
      ``(batch, time, features)`` drops the same features at every time step;
      ``(1, 2)`` on ``(N, H, W, C)`` drops whole channels (spatial dropout).

  Returns:
    An array of the shape and dtype of ``x``.

  >>> import jax, jax.numpy as jnp, jaxnorm
  >>> y = jaxnorm.dropout(jax.random.key(0), jnp.ones(6), 0.5)
  >>> sorted(set(y.tolist())) in ([0.0, 2.0], [0.0], [2.0])
  True
  """
  check_rate(rate)
  if not isinstance(train, bool):
    raise TypeError(
        f"`train` must be a Python bool (it selects the computation at trace "
        f"time), got {type(train).__name__}."
    )
  dims = checks.normalize_axes("broadcast_dims", tuple(broadcast_dims), x.ndim)
  if not train:
    return x
  concrete = checks._is_concrete_number(rate)
  if concrete and float(rate) == 0.0:
    return x
  if key is None:
    raise ValueError("`key` is None but `train=True`; pass a PRNG key such as "
                     "`jax.random.key(0)`.")
  if concrete:
    keep_prob = 1.0 - float(rate)
    safe_keep = keep_prob
  else:
    keep_prob = 1.0 - rate
    safe_keep = jnp.where(keep_prob > 0, keep_prob, 1.0)
  mask = keep_mask(key, x.shape, keep_prob, dims)
  kept = (x / safe_keep).astype(x.dtype)
  return lax.select(mask, kept, jnp.zeros_like(x))
