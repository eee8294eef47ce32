"""Test data equal to `jax.random`'s, bit for bit, with far fewer compiles.

XLA:CPU takes long to compile the threefry program for each new shape, longest
for rank > 2: on the loaded 2-core test machine `jax.random.normal(key,
(2, 3, 3, 6))` took 13 s to compile against 2 s for `(108,)`, where the
computation itself takes microseconds. With the partitionable threefry
(`jax_threefry_partitionable`, JAX's default), element i of a draw depends
only on the key and i, so a draw of shape `s` is the first `prod(s)` values of
any longer flat draw with the same key, reshaped. These helpers draw flat
vectors of a few lengths (powers of 4: one compile per length, dtype and
distribution) and cut them to shape. `tests/test_random_data.py` checks the
identity with `jax.random`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_MIN_LENGTH = 256


def _length(n: int) -> int:
  """The flat draw's length for n values: the next power of 4, at least 256."""
  length = _MIN_LENGTH
  while length < n:
    length *= 4
  return length


def _cut(flat: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  n = math.prod(shape)
  if isinstance(flat, jax.core.Tracer):  # drawn under jit or vmap: stay traced
    return flat[:n].reshape(shape)
  # Eagerly, cut in NumPy: a jnp slice would compile once per shape again.
  return jnp.asarray(np.asarray(flat)[:n].reshape(shape))


def _shape(shape) -> tuple[int, ...]:
  return tuple(shape) if np.ndim(shape) else (int(shape),)


def _check_partitionable():
  if not jax.config.jax_threefry_partitionable:
    raise RuntimeError("tests/random_data.py needs jax_threefry_partitionable=True "
                       "(JAX's default), under which a draw is a prefix of a longer one.")


def normal(key: jax.Array, shape=(), dtype=jnp.float32) -> jax.Array:
  """`jax.random.normal(key, shape, dtype)`, the same values."""
  _check_partitionable()
  shape = _shape(shape)
  return _cut(jax.random.normal(key, (_length(math.prod(shape)),), dtype), shape)


def uniform(key: jax.Array, shape=(), dtype=jnp.float32, minval=0.0,
            maxval=1.0) -> jax.Array:
  """`jax.random.uniform(key, shape, dtype, minval, maxval)`, the same values."""
  _check_partitionable()
  shape = _shape(shape)
  return _cut(jax.random.uniform(key, (_length(math.prod(shape)),), dtype, minval, maxval),
              shape)


def bernoulli(key: jax.Array, p=0.5, shape=()) -> jax.Array:
  """`jax.random.bernoulli(key, p, shape)` for a scalar `p`, the same values."""
  _check_partitionable()
  shape = _shape(shape)
  return _cut(jax.random.bernoulli(key, p, (_length(math.prod(shape)),)), shape)
