"""Tests of inverted dropout (jaxnorm/_src/dropout.py).

Expected masks come from `jax.random.bernoulli` with the documented key usage,
from `flax.linen.Dropout`, or from statistical properties; never from
`jaxnorm.dropout` itself.
"""

from __future__ import annotations

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm

KEY = jax.random.key(0)

# Errors raised while tracing under `jax.jit` carry JAX's note on traceback
# filtering (PEP 678), which `match=` also sees; nothing else may follow.
_JAX_NOTE = (r"(\n-{20}\nFor simplicity, JAX has removed its internal frames from "
             r"the traceback of the following exception\. Set "
             r"JAX_TRACEBACK_FILTERING=off to include these\.)?")


def full_message(message: str) -> str:
  """`message` from the start, then at most JAX's note (added under jit);
  append "$" for a full-text `match=`."""
  return "^" + re.escape(message) + _JAX_NOTE


def expected_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float,
                  broadcast_dims: tuple[int, ...] = ()) -> np.ndarray:
  """The documented mask: Bernoulli(keep_prob) of `shape` with 1 along
  `broadcast_dims`, broadcast to `shape`."""
  mask_shape = tuple(1 if d in broadcast_dims else n for d, n in enumerate(shape))
  mask = np.asarray(jax.random.bernoulli(key, keep_prob, mask_shape))
  return np.broadcast_to(mask, shape)


def test_inference_returns_x(run):
  x = jnp.arange(12.0).reshape(3, 4)
  y = run(jaxnorm.dropout, KEY, x, 0.5, train=False)
  chex.assert_trees_all_equal(y, x)


def test_rate_zero_is_identity(run):
  x = jnp.arange(12.0).reshape(3, 4)
  chex.assert_trees_all_equal(run(jaxnorm.dropout, KEY, x, 0.0), x)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_kept_fraction_and_scaling(rate, run):
  n = 20000
  x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, size=(n,)),
                  jnp.float32)
  y = np.asarray(run(jaxnorm.dropout, jax.random.key(1), x, rate))
  kept = y != 0
  # Binomial(n, 1 - rate): within 5 standard deviations.
  p = 1 - rate
  assert abs(kept.sum() - n * p) < 5 * np.sqrt(n * p * rate)
  # Kept values are x / (1 - rate); dropped ones are exactly 0.
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / p, rtol=1e-6)
  # So the mean is preserved: E[y] = x within the sampling error of the mean.
  ratio = y / np.asarray(x)  # Bernoulli(p) / p, variance rate / p
  assert abs(ratio.mean() - 1.0) < 5 * np.sqrt(rate / p / n)


def test_same_key_same_mask_and_other_key_differs():
  x = jnp.ones((64, 8))
  a = jaxnorm.dropout(KEY, x, 0.5)
  b = jax.jit(lambda k, x: jaxnorm.dropout(k, x, 0.5))(KEY, x)
  chex.assert_trees_all_equal(a, b)
  c = jaxnorm.dropout(jax.random.key(1), x, 0.5)
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_broadcast_dims_drop_whole_channels(run):
  x = jnp.ones((4, 5, 6, 16))  # N, H, W, C
  y = np.asarray(run(jaxnorm.dropout, KEY, x, 0.5, broadcast_dims=(1, 2)))
  # Each (sample, channel) is either dropped or kept everywhere in H, W.
  per_channel = y.reshape(4, 30, 16)
  assert (per_channel == per_channel[:, :1, :]).all()
  assert set(np.unique(y).tolist()) == {0.0, 2.0}
  # Negative axes work the same way.
  z = np.asarray(run(jaxnorm.dropout, KEY, x, 0.5, broadcast_dims=(-3, -2)))
  np.testing.assert_array_equal(y, z)


def test_matches_explicit_bernoulli_mask(run):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 5)), jnp.float32)
  mask = expected_mask(KEY, (8, 5), 0.7)
  expected = np.where(mask, np.asarray(x) / np.float32(0.7), 0.0)
  np.testing.assert_allclose(run(jaxnorm.dropout, KEY, x, 0.3), expected, rtol=1e-6)


def test_broadcast_dims_match_explicit_bernoulli_mask(run):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 3, 4, 8)), jnp.float32)
  mask = expected_mask(KEY, (2, 3, 4, 8), 0.5, (1, 2))
  expected = np.where(mask, np.asarray(x) * 2, 0.0)
  y = run(jaxnorm.dropout, KEY, x, 0.5, broadcast_dims=(1, 2))
  np.testing.assert_allclose(y, expected, rtol=1e-6)


@pytest.mark.parametrize("rate, broadcast_dims", [(0.3, ()), (0.5, (0,)), (0.8, (1, 2))])
def test_equals_flax_linen_dropout(rate, broadcast_dims):
  x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 4, 5, 6)), jnp.float32)
  expected = nn.Dropout(rate, broadcast_dims=broadcast_dims).apply(
      {}, x, deterministic=False, rng=KEY)
  y = jaxnorm.dropout(KEY, x, rate, broadcast_dims=broadcast_dims)
  chex.assert_trees_all_equal(y, expected)


def test_dtype_preserved():
  x = jnp.ones((16,), jnp.bfloat16)
  chex.assert_type(jaxnorm.dropout(KEY, x, 0.5), jnp.bfloat16)
  traced = jax.jit(lambda r: jaxnorm.dropout(KEY, x, r))(0.5)
  chex.assert_type(traced, jnp.bfloat16)


def test_traced_rate_one_gives_zeros_and_finite_grads():
  x = jnp.ones((8,))
  f = jax.jit(lambda x, r: jnp.sum(jaxnorm.dropout(KEY, x, r)))
  np.testing.assert_array_equal(f(x, 1.0), 0.0)
  grad = jax.grad(f)(x, 1.0)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(grad, 0.0)


def test_gradient_is_mask_over_keep_prob():
  x = jnp.ones((32,))
  grad = jax.grad(lambda x: jnp.sum(jaxnorm.dropout(KEY, x, 0.25)))(x)
  mask = expected_mask(KEY, (32,), 0.75)
  assert 0 < mask.sum() < 32  # both branches are exercised
  np.testing.assert_allclose(grad, mask / np.float32(0.75), rtol=1e-6)


def test_vmap_with_per_example_keys():
  keys = jax.random.split(KEY, 4)
  x = jnp.ones((4, 100))
  y = np.asarray(jax.jit(jax.vmap(lambda k, x: jaxnorm.dropout(k, x, 0.5)))(keys, x))
  expected = np.stack([expected_mask(keys[i], (100,), 0.5) * 2.0 for i in range(4)])
  np.testing.assert_array_equal(y, expected)
  # Each example has its own mask.
  assert len({row.tobytes() for row in expected}) == 4


@pytest.mark.parametrize("rate, shown", [
    (-0.1, "-0.1"), (1.0, "1.0"), (1.5, "1.5"), (float("nan"), "nan"),
    (jnp.float32(1.0), "1.0"), (np.float64(-0.5), "-0.5"), (jnp.float32(2.5), "2.5")])
def test_rate_out_of_range_is_an_error(rate, shown):
  msg = ("`rate` is the probability of dropping a unit and must be in [0, 1) "
         "(rate 1 drops everything; the Dropout modules accept it and return "
         f"zeros), got {shown}.")
  with pytest.raises(ValueError, match=full_message(msg) + "$"):
    jaxnorm.dropout(KEY, jnp.ones(3), rate)
  # Under jit with `x` traced, a closed-over (concrete) rate is still checked.
  with pytest.raises(ValueError, match=full_message(msg) + "$"):
    jax.jit(lambda x: jaxnorm.dropout(KEY, x, rate))(jnp.ones(3))


def test_concrete_jax_rate_zero_is_identity():
  x = jnp.arange(4.0)
  # No key is needed: a concrete rate of 0 is known to keep everything.
  chex.assert_trees_all_equal(jaxnorm.dropout(None, x, jnp.float32(0.0)), x)


def test_concrete_jax_rate_matches_python_rate():
  x = jnp.ones((64,))
  expected = expected_mask(KEY, (64,), 0.75) / np.float32(0.75)
  np.testing.assert_array_equal(jaxnorm.dropout(KEY, x, jnp.float32(0.25)), expected)


@pytest.mark.parametrize("x, message", [
    (jnp.ones(3, jnp.int32), "`x` must have a floating-point or complex dtype, got "
     "int32; cast it first, for example `x.astype(jnp.float32)`."),
    (jnp.ones(3, bool), "`x` must have a floating-point or complex dtype, got bool; "
     "cast it first, for example `x.astype(jnp.float32)`."),
    (np.ones(3, np.int64), "`x` must have a floating-point or complex dtype, got "
     "int64; cast it first, for example `x.astype(jnp.float32)`."),
    ([1.0, 2.0], "`x` must be an array, got an object of type list."),
])
def test_non_float_x_is_an_error(x, message):
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    jaxnorm.dropout(KEY, x, 0.5)
  # Also at inference, where `x` would be returned unchanged.
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    jaxnorm.dropout(KEY, x, 0.5, train=False)


def test_integer_x_is_an_error_under_jit():
  message = ("`x` must have a floating-point or complex dtype, got int32; cast it "
             "first, for example `x.astype(jnp.float32)`.")
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    jax.jit(lambda x: jaxnorm.dropout(KEY, x, 0.5))(jnp.ones(3, jnp.int32))


@pytest.mark.parametrize("rate, message", [
    ("0.5", "`rate` must be a real number, got str '0.5'."),
    (None, "`rate` must be a real number, got NoneType None."),
    (jnp.full(3, 0.5), "`rate` must be a real number, got an array of dtype float32 "
     "and shape (3,)."),
])
def test_non_numeric_rate_is_an_error(rate, message):
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    jaxnorm.dropout(KEY, jnp.ones(3), rate)


@pytest.mark.parametrize("train, message", [
    ("no", "`train` must be a Python bool, got str 'no'."),
    (0, "`train` must be a Python bool, got int 0."),
    (None, "`train` must be a Python bool, got NoneType None."),
])
def test_train_must_be_a_bool(train, message):
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    jaxnorm.dropout(KEY, jnp.ones(3), 0.5, train=train)


def test_traced_train_is_a_clear_error():
  message = ("`train` must be a Python bool known at trace time, because it selects "
             "the code path, but it is a traced value of dtype bool and shape (); "
             "make it static, for example with `jax.jit(f, "
             "static_argnames='train')`, or close over it.")
  f = jax.jit(lambda x, train: jaxnorm.dropout(KEY, x, 0.5, train=train))
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    f(jnp.ones(3), True)


def test_concrete_boolean_train_is_accepted():
  x = jnp.ones(8)
  chex.assert_trees_all_equal(jaxnorm.dropout(KEY, x, 0.5, train=np.bool_(False)), x)
  y = jaxnorm.dropout(KEY, x, 0.5, train=jnp.array(True))
  np.testing.assert_array_equal(y, expected_mask(KEY, (8,), 0.5) * 2.0)


def test_other_bad_arguments():
  msg = ("`key` is None but `train=True`; pass a PRNG key such as "
         "`jax.random.key(0)`.")
  with pytest.raises(ValueError, match=full_message(msg) + "$"):
    jaxnorm.dropout(None, jnp.ones(3), 0.5)
  msg = ("`broadcast_dims`=(3,) is out of range for an input with 2 dimensions; "
         "expected values in [-2, 1].")
  with pytest.raises(ValueError, match=full_message(msg) + "$"):
    jaxnorm.dropout(KEY, jnp.ones((2, 3)), 0.5, broadcast_dims=(3,))
  msg = ("`broadcast_dims` must be an int or a sequence of ints, got (True,); a bool "
         "is not an axis number.")
  with pytest.raises(TypeError, match=full_message(msg) + "$"):
    jaxnorm.dropout(KEY, jnp.ones((2, 3)), 0.5, broadcast_dims=(True,))
  # train=False needs no key.
  chex.assert_trees_all_equal(jaxnorm.dropout(None, jnp.ones(3), 0.5, train=False),
                              jnp.ones(3))
