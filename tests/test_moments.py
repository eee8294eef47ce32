"""Tests of `jaxnorm.moments` and of the shared `shifted_moments`/`normalize` steps."""

import chex
import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

import jaxnorm
import reference as ref
from jaxnorm._src import moments as moments_lib


@pytest.mark.parametrize("shape,axis", [((6, 3), 0), ((6, 3), -1), ((2, 3, 4), (0, 2)),
                                        ((2, 3, 4), (0, 1, 2))])
def test_mean_and_biased_variance(run, shape, axis):
  x = 1.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)
  mean, var = run(jaxnorm.moments, x, axis=axis)
  axes = axis if isinstance(axis, tuple) else (axis,)
  mean_ref, var_ref = ref.mean_var(x, axes)
  chex.assert_trees_all_close((mean, var), (mean_ref, var_ref), atol=1e-5, rtol=1e-5)
  assert mean.dtype == var.dtype == jnp.float32


def test_keepdims():
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  mean, var = jaxnorm.moments(x, (0, 2), keepdims=True)
  chex.assert_shape((mean, var), (1, 3, 1))


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_offset_is_exact(offset):
  x = (offset + jax.random.normal(jax.random.key(0), (1000, 2))).astype(jnp.float32)
  mean, var = jax.jit(lambda x: jaxnorm.moments(x, 0))(x)
  mean_ref, var_ref = ref.mean_var(x, 0)   # the same float32 values, in float64
  chex.assert_trees_all_close(var, var_ref, rtol=1e-4)
  chex.assert_trees_all_close(mean, mean_ref, rtol=1e-7)


def test_low_precision_inputs_give_float32_statistics():
  x = (3.0 + jax.random.normal(jax.random.key(0), (64, 2))).astype(jnp.bfloat16)
  mean, var = jaxnorm.moments(x, 0)
  assert mean.dtype == var.dtype == jnp.float32
  chex.assert_trees_all_close((mean, var), ref.mean_var(x, 0), atol=1e-5, rtol=1e-5)


def test_float64_under_x64():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (8, 2), jnp.float64) + 1e8
    mean, var = jaxnorm.moments(x, 0)
    assert mean.dtype == var.dtype == jnp.float64
    chex.assert_trees_all_close((mean, var), ref.mean_var(x, 0), atol=0, rtol=1e-12)


@pytest.mark.parametrize("mask_shape", [(8, 3), (8, 1)])
def test_mask_equals_statistics_of_selected_entries(run, mask_shape):
  x = 5.0 + jax.random.normal(jax.random.key(0), (8, 3))
  mask = jax.random.bernoulli(jax.random.key(1), 0.5, mask_shape).at[:2].set(True)
  mean, var = run(jaxnorm.moments, x, axis=0, mask=mask)
  chex.assert_trees_all_close((mean, var), ref.masked_channel_moments(x, mask),
                              atol=1e-5, rtol=1e-5)


def test_complex_mean_and_real_variance():
  k1, k2 = jax.random.split(jax.random.key(0))
  x = (3 - 4j) + jax.random.normal(k1, (32, 2)) + 2j * jax.random.normal(k2, (32, 2))
  mean, var = jaxnorm.moments(x, 0)
  assert jnp.iscomplexobj(mean) and not jnp.iscomplexobj(var)
  mean_ref, var_ref = ref.mean_var(x, 0)   # E|x|^2 - |E x|^2
  chex.assert_trees_all_close(mean, mean_ref, atol=1e-5)
  chex.assert_trees_all_close(var, var_ref, atol=1e-4, rtol=1e-5)


def test_constant_input():
  x = jnp.full((5, 2), 1e5)
  mean, var = jaxnorm.moments(x, 0)
  chex.assert_trees_all_equal((mean, var), (jnp.full(2, 1e5), jnp.zeros(2)))
  grads = jax.grad(lambda x: jnp.sum(jnp.sqrt(jaxnorm.moments(x, 0)[1] + 1e-5)))(x)
  chex.assert_tree_all_finite(grads)


def test_check_grads():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (5, 3), jnp.float64)
    check_grads(jax.jit(lambda x: jaxnorm.moments(x, 0)), (x,), order=2,
                modes=["fwd", "rev"])
    mask = jnp.array([True, False, True, True, False])[:, None]
    check_grads(jax.jit(lambda x: jaxnorm.moments(x, 0, mask=mask)), (x,), order=2,
                modes=["fwd", "rev"])


def test_shifted_moments_and_normalize_compose_to_the_textbook_formula():
  x = 1e4 + jax.random.normal(jax.random.key(0), (16, 3))
  m = moments_lib.shifted_moments(x, (0,))
  chex.assert_trees_all_close(moments_lib.full_mean(m)[0], ref.mean_var(x, 0)[0], rtol=1e-7)
  y = moments_lib.normalize(x, m, eps=1e-5, scale=jnp.full((1, 3), 2.0),
                            bias=jnp.full((1, 3), -1.0))
  chex.assert_trees_all_close(y, 2.0 * ref.batch_norm_train(x)[0] - 1.0, atol=1e-4)
  rms = moments_lib.shifted_moments(x, (1,), rms=True)
  assert rms.shift is None and rms.mean is None
  chex.assert_trees_all_close(rms.var[:, 0], (ref.f64(x) ** 2).mean(axis=1), rtol=1e-6)


def test_vmap_and_jit_agree():
  x = jax.random.normal(jax.random.key(0), (4, 6, 3))
  mean, var = jax.jit(jax.vmap(lambda x: jaxnorm.moments(x, 0)))(x)
  for i in range(4):
    chex.assert_trees_all_close((mean[i], var[i]), ref.mean_var(x[i], 0), atol=1e-5)
