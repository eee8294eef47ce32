"""Tests of group norm (Wu & He 2018) and instance norm (Ulyanov et al. 2016)."""

import operator

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_data
from jax import lax
from jax.test_util import check_grads

import jaxnorm

import reference as ref


def _params(key, c):
  k1, k2 = jax.random.split(key)
  return {"scale": 1.0 + 0.5 * random_data.normal(k1, (c,)),
          "bias": random_data.normal(k2, (c,))}


def _x(shape, seed=0):
  return 2.0 + 3.0 * random_data.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("shape,groups", [((3, 6), 2), ((2, 3, 2, 6), 3), ((2, 3, 2, 6), 1),
                                          ((2, 3, 2, 6), 6)])
def test_group_norm_matches_reference(run, shape, groups):
  x = _x(shape)
  params = _params(jax.random.key(1), shape[-1])
  y = run(jaxnorm.group_norm, params, x, num_groups=groups, eps=1e-6)
  chex.assert_shape(y, shape)
  assert y.dtype == jnp.float32
  y_ref = ref.group_norm(x, params["scale"], params["bias"], num_groups=groups, eps=1e-6)
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_group_size_is_the_other_way_to_say_num_groups(run):
  x = _x((2, 3, 2, 6))
  params = _params(jax.random.key(1), 6)
  y = run(jaxnorm.group_norm, params, x, num_groups=None, group_size=2)
  chex.assert_trees_all_close(y, ref.group_norm(x, params["scale"], params["bias"],
                                                num_groups=3), atol=1e-5, rtol=1e-5)


def test_one_group_is_layer_norm_over_every_axis_but_the_batch():
  x = _x((2, 3, 2, 4))
  y = jaxnorm.group_norm({}, x, num_groups=1)
  chex.assert_trees_all_close(y, ref.layer_norm(x, axes=(1, 2, 3)), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 3, 2, 4)])
def test_instance_norm_matches_reference(run, shape):
  x = _x(shape)
  params = _params(jax.random.key(1), shape[-1])
  y = run(jaxnorm.instance_norm, params, x, eps=1e-6)
  chex.assert_shape(y, shape)
  y_ref = ref.instance_norm(x, params["scale"], params["bias"], eps=1e-6)
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_instance_norm_channels_first(run):
  # NCHW with axis=1 is instance norm of the NHWC transpose.
  x = _x((2, 4, 3, 2))
  params = _params(jax.random.key(1), 4)
  y = run(jaxnorm.instance_norm, params, x, axis=1)
  y_ref = ref.instance_norm(np.moveaxis(np.asarray(x), 1, -1), params["scale"],
                            params["bias"])
  chex.assert_trees_all_close(y, np.moveaxis(y_ref, -1, 1), atol=1e-5, rtol=1e-5)


def test_instance_norm_is_group_norm_with_one_channel_per_group():
  x = _x((2, 3, 2, 4))
  params = _params(jax.random.key(1), 4)
  chex.assert_trees_all_close(jaxnorm.instance_norm(params, x),
                              jaxnorm.group_norm(params, x, num_groups=4), atol=1e-6)


# Gradients.


# First order here; second order, with a mask, in test_normalize.py (it costs
# five times the compiles, so once per layer family).
@pytest.mark.parametrize("fn", ["group_norm", "instance_norm"])
def test_check_grads(fn):
  with jax.enable_x64(True):
    x = _x((2, 2, 2, 4)).astype(jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), _params(jax.random.key(1), 4))
    kwargs = {"num_groups": 2} if fn == "group_norm" else {}
    f = jax.jit(lambda x, p: getattr(jaxnorm, fn)(p, x, **kwargs))
    check_grads(f, (x, params), order=1, modes=["fwd", "rev"])


@pytest.mark.parametrize("fn", ["group_norm", "instance_norm"])
def test_constant_input_gives_finite_values_and_gradients(run, fn):
  x = jnp.full((2, 3, 4), -3.0)
  params = jaxnorm.group_norm_init(4)
  kwargs = {"num_groups": 2} if fn == "group_norm" else {}
  loss = lambda x, p: jnp.sum(getattr(jaxnorm, fn)(p, x, **kwargs) ** 2)
  value, grads = run(jax.value_and_grad(loss, argnums=(0, 1)), x, params)
  chex.assert_tree_all_finite((value, grads))
  chex.assert_trees_all_close(value, jnp.float32(0.0))


# Transformations.


def test_vmap_and_scan_agree_with_reference():
  x = _x((3, 2, 2, 2, 4))   # 3 independent models or steps
  params = jax.vmap(lambda k: _params(k, 4))(jax.random.split(jax.random.key(2), 3))
  f = lambda p, x: jaxnorm.group_norm(p, x, num_groups=2)
  ys = jax.jit(jax.vmap(f))(params, x)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(carry, px):
    p, xt = px
    return carry, f(p, xt)

  _, ys_scan = lax.scan(step, 0, (params, x))
  for i in range(3):
    y_ref = ref.group_norm(x[i], params["scale"][i], params["bias"][i], num_groups=2)
    chex.assert_trees_all_close(ys[i], y_ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(ys_scan[i], y_ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(step(0, (jax.tree.map(operator.itemgetter(i), params), x[i]))[1],
                                y_ref, atol=1e-5, rtol=1e-5)


# Masks.


def test_group_norm_mask_statistics_are_those_of_selected_entries(run):
  x = _x((2, 5, 4))
  mask = random_data.bernoulli(jax.random.key(3), 0.6, (2, 5, 1))
  mask = mask.at[:, 0].set(True)
  y = run(jaxnorm.group_norm, {}, x, num_groups=2, mask=mask)
  xn, mn = ref.f64(x), np.broadcast_to(np.asarray(mask), x.shape)
  for n in range(2):
    for g in range(2):
      sl = (n, slice(None), slice(2 * g, 2 * g + 2))
      sel = xn[sl][mn[sl]]
      expected = (xn[sl] - sel.mean()) / np.sqrt(sel.var() + 1e-6)
      chex.assert_trees_all_close(y[sl], expected, atol=1e-5, rtol=1e-5)


def test_instance_norm_mask_equals_instance_norm_of_the_selected_positions(run):
  # A sequence mask (N, T, 1): per example, the valid time steps alone.
  x = _x((2, 6, 3))
  lengths = np.array([4, 2])
  mask = jnp.asarray(np.arange(6)[None, :, None] < lengths[:, None, None])
  y = run(jaxnorm.instance_norm, {}, x, mask=mask)
  for n in range(2):
    alone = ref.instance_norm(x[n:n + 1, :lengths[n]])
    chex.assert_trees_all_close(y[n, :lengths[n]], alone[0], atol=1e-5, rtol=1e-5)


# Numerics and dtypes.


@pytest.mark.parametrize("fn", ["group_norm", "instance_norm"])
@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_offset_float32(fn, offset):
  x = (offset + random_data.normal(jax.random.key(0), (2, 8, 8, 4))).astype(jnp.float32)
  if fn == "group_norm":
    y = jax.jit(lambda x: jaxnorm.group_norm({}, x, num_groups=2))(x)
    y_ref = ref.group_norm(x, num_groups=2)
  else:
    y = jax.jit(lambda x: jaxnorm.instance_norm({}, x))(x)
    y_ref = ref.instance_norm(x)
  assert np.max(np.abs(np.asarray(y, np.float64) - y_ref)) <= 1e-4


@pytest.mark.parametrize("x_dtype,param_dtype,dtype,expected", [
    (jnp.float16, jnp.float32, None, jnp.float32),
    (jnp.bfloat16, jnp.bfloat16, None, jnp.bfloat16),
    (jnp.float16, jnp.float32, jnp.float16, jnp.float16),
])
def test_output_dtype(x_dtype, param_dtype, dtype, expected):
  x = random_data.normal(jax.random.key(0), (2, 3, 4)).astype(x_dtype)
  params = jaxnorm.group_norm_init(4, dtype=param_dtype)
  assert jaxnorm.group_norm(params, x, num_groups=2, dtype=dtype).dtype == expected
  assert jaxnorm.instance_norm(params, x, dtype=dtype).dtype == expected


def test_bfloat16_group_norm_matches_reference_on_upcast_values():
  x = (50.0 + 4.0 * random_data.normal(jax.random.key(0), (2, 4, 4))).astype(jnp.bfloat16)
  y = jaxnorm.group_norm({}, x, num_groups=2)
  assert y.dtype == jnp.bfloat16
  chex.assert_trees_all_close(np.asarray(y, np.float64), ref.group_norm(x, num_groups=2),
                              atol=2e-2)
