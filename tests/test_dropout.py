"""Tests of inverted dropout (jaxnorm/_src/dropout.py)."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm

KEY = jax.random.key(0)


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


def test_matches_explicit_bernoulli_mask():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 5)), jnp.float32)
  mask = jax.random.bernoulli(KEY, 0.7, (8, 5))
  expected = np.where(np.asarray(mask), np.asarray(x) / 0.7, 0.0)
  np.testing.assert_allclose(jaxnorm.dropout(KEY, x, 0.3), expected, rtol=1e-6)


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
  mask = np.asarray(jaxnorm.dropout(KEY, x, 0.25)) != 0
  np.testing.assert_allclose(grad, mask / 0.75, rtol=1e-6)


def test_vmap_with_per_example_keys():
  keys = jax.random.split(KEY, 4)
  x = jnp.ones((4, 100))
  y = jax.jit(jax.vmap(lambda k, x: jaxnorm.dropout(k, x, 0.5)))(keys, x)
  for i in range(4):
    chex.assert_trees_all_equal(y[i], jaxnorm.dropout(keys[i], x[i], 0.5))


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_rate_out_of_range_is_an_error(rate):
  msg = ("`rate` is the probability of dropping a unit and must be in [0, 1) "
         "(rate 1 drops everything; the Dropout modules accept it and return "
         f"zeros), got {rate}.")
  with pytest.raises(ValueError, match=re.escape(msg)):
    jaxnorm.dropout(KEY, jnp.ones(3), rate)
  with pytest.raises(ValueError, match=re.escape(msg)):
    jax.jit(lambda x: jaxnorm.dropout(KEY, x, rate))(jnp.ones(3))


def test_other_bad_arguments():
  msg = ("`key` is None but `train=True`; pass a PRNG key such as "
         "`jax.random.key(0)`.")
  with pytest.raises(ValueError, match=re.escape(msg)):
    jaxnorm.dropout(None, jnp.ones(3), 0.5)
  msg = ("`broadcast_dims`=(3,) is out of range for an input with 2 dimensions; "
         "expected values in [-2, 1].")
  with pytest.raises(ValueError, match=re.escape(msg)):
    jaxnorm.dropout(KEY, jnp.ones((2, 3)), 0.5, broadcast_dims=(3,))
  # train=False needs no key.
  chex.assert_trees_all_equal(jaxnorm.dropout(None, jnp.ones(3), 0.5, train=False),
                              jnp.ones(3))
