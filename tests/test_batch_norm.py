"""Tests of `jaxnorm.batch_norm` against Ioffe & Szegedy (2015) in float64 NumPy.

Ghost batch norm and batch renorm are tested in test_batch_renorm.py.
"""

import operator
import re

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

# (shape, feature axis): 2D (N, C), 4D NHWC and 4D NCHW.
LAYOUTS = [((8, 3), -1), ((4, 2, 2, 3), -1), ((4, 3, 2, 2), 1)]


def _random_params(key, c, dtype=jnp.float32):
  k1, k2 = jax.random.split(key)
  return {"scale": (1.0 + 0.5 * random_data.normal(k1, (c,))).astype(dtype),
          "bias": random_data.normal(k2, (c,)).astype(dtype)}


def _random_state(key, c):
  k1, k2 = jax.random.split(key)
  return {"mean": random_data.normal(k1, (c,)),
          "var": random_data.uniform(k2, (c,), minval=0.5, maxval=2.0)}


def _data(shape, axis, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  c = shape[axis]
  x = 2.0 + 3.0 * random_data.normal(keys[0], shape)
  return x, _random_params(keys[1], c), _random_state(keys[2], c)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_train_matches_algorithm_1(run, shape, axis):
  x, params, state = _data(shape, axis)
  y, new_state = run(jaxnorm.batch_norm, params, state, x, train=True, axis=axis,
                     momentum=0.9, eps=1e-5)
  y_ref, mu, var = ref.batch_norm_train(x, params["scale"], params["bias"], axis=axis,
                                        eps=1e-5)
  mean_ref, var_ref = ref.running_average(state["mean"], state["var"], mu, var, 0.9)
  chex.assert_shape(y, shape)
  assert y.dtype == jnp.float32
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(new_state, {"mean": mean_ref, "var": var_ref},
                              atol=1e-5, rtol=1e-5)
  assert new_state["mean"].dtype == new_state["var"].dtype == jnp.float32


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_inference_uses_running_stats_and_keeps_state(run, shape, axis):
  x, params, state = _data(shape, axis, seed=1)
  y, new_state = run(jaxnorm.batch_norm, params, state, x, train=False, axis=axis)
  y_ref = ref.batch_norm_infer(x, state["mean"], state["var"], params["scale"],
                               params["bias"], axis=axis, eps=1e-5)
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_equal(new_state, state)


def test_inference_returns_the_state_object():
  x, params, state = _data((8, 3), -1)
  _, new_state = jaxnorm.batch_norm(params, state, x, train=False)
  assert new_state is state


@pytest.mark.parametrize("shape", [(8, 3), (4, 2, 2, 3)])
def test_running_averages_over_several_steps(run, shape):
  # The d2l.ai example: momentum 0.9, eps 1e-5, running stats from (0, 1).
  params, state = jaxnorm.batch_norm_init(3)
  mean_ref, var_ref = np.zeros(3), np.ones(3)
  for step in range(4):
    x = step + (1.0 + step) * random_data.normal(jax.random.key(step), shape)
    y, state = run(jaxnorm.batch_norm, params, state, x, train=True, momentum=0.9,
                   eps=1e-5)
    y_ref, mu, var = ref.batch_norm_train(x, eps=1e-5)
    mean_ref, var_ref = ref.running_average(mean_ref, var_ref, mu, var, 0.9)
    chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(state, {"mean": mean_ref, "var": var_ref},
                                atol=1e-5, rtol=1e-5)
  # Inference then uses exactly those running averages.
  x = random_data.normal(jax.random.key(9), shape)
  y, same = run(jaxnorm.batch_norm, params, state, x, train=False, eps=1e-5)
  chex.assert_trees_all_close(y, ref.batch_norm_infer(x, mean_ref, var_ref, eps=1e-5),
                              atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_equal(same, state)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_limits(momentum):
  x, params, state = _data((8, 3), -1)
  _, new_state = jaxnorm.batch_norm(params, state, x, train=True, momentum=momentum)
  _, mu, var = ref.batch_norm_train(x)
  expected = state if momentum == 1.0 else {"mean": mu, "var": var}
  chex.assert_trees_all_close(new_state, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_scale,use_bias", [(False, True), (True, False), (False, False)])
def test_missing_param_keys_turn_terms_off(run, use_scale, use_bias):
  params, state = jaxnorm.batch_norm_init(3, use_scale=use_scale, use_bias=use_bias)
  assert ("scale" in params) == use_scale and ("bias" in params) == use_bias
  x, full, _ = _data((8, 3), -1)
  params = {k: full[k] for k in params}
  y, _ = run(jaxnorm.batch_norm, params, state, x, train=True)
  y_ref, _, _ = ref.batch_norm_train(x, params.get("scale"), params.get("bias"))
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_init_matches_flax_defaults():
  params, state = jaxnorm.batch_norm_init(5, dtype=jnp.bfloat16)
  chex.assert_trees_all_equal(params, {"scale": jnp.ones(5, jnp.bfloat16),
                                       "bias": jnp.zeros(5, jnp.bfloat16)})
  chex.assert_trees_all_equal(state, {"mean": jnp.zeros(5), "var": jnp.ones(5)})
  assert state["mean"].dtype == jnp.float32 and params["scale"].dtype == jnp.bfloat16


# Gradients.


# Train-mode batch norm has a closed-form derivative (`jax.custom_jvp`, see
# _src/normalize.py); inference mode is plain autodiff. Both are checked in
# forward and reverse mode to first order here; the closed form to second
# order, with a mask, in test_normalize.py (second order costs five times the
# compiles of first order, so once per layer family).
@pytest.mark.parametrize("shape,axis,train,masked", [
    ((6, 3), -1, True, False),
    ((3, 3, 2, 2), 1, True, False),
    ((6, 3), -1, True, True),
    ((6, 3), -1, False, False),
])
def test_check_grads(shape, axis, train, masked):
  with jax.enable_x64(True):
    x, params, state = _data(shape, axis)
    x = x.astype(jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    state = jax.tree.map(lambda a: a.astype(jnp.float64), state)
    mask = jnp.arange(shape[0])[:, None] % 3 != 1 if masked else None

    @jax.jit
    def f(x, params):
      y, new_state = jaxnorm.batch_norm(params, state, x, train=train, axis=axis,
                                        mask=mask)
      return y, new_state

    check_grads(f, (x, params), order=1, modes=["fwd", "rev"])


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_input_gradient_is_closed_form_backward(shape, axis):
  with jax.enable_x64(True):
    x, params, state = _data(shape, axis)
    x = x.astype(jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    dy = random_data.normal(jax.random.key(5), shape, jnp.float64)
    _, vjp = jax.vjp(jax.jit(
        lambda x: jaxnorm.batch_norm(params, state, x, train=True, axis=axis)[0]), x)
    (dx,) = vjp(dy)
    expected = ref.batch_norm_input_grad(x, dy, params["scale"], axis=axis)
    chex.assert_trees_all_close(dx, expected, atol=1e-10, rtol=1e-8)


def test_input_gradient_closed_form_float32_jit():
  x, params, state = _data((4, 2, 2, 3), -1)
  dy = random_data.normal(jax.random.key(5), x.shape)
  grad = jax.jit(jax.grad(
      lambda x: jnp.vdot(dy, jaxnorm.batch_norm(params, state, x, train=True)[0])))
  chex.assert_trees_all_close(grad(x), ref.batch_norm_input_grad(x, dy, params["scale"]),
                              atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_constant_input_gives_finite_values_and_gradients(run, dtype):
  x = jnp.full((6, 3), 7.0, dtype)
  params, state = jaxnorm.batch_norm_init(3)

  def loss(x, params):
    y, new_state = jaxnorm.batch_norm(params, state, x, train=True)
    return jnp.sum(y.astype(jnp.float32) ** 2), (y, new_state)

  (value, (y, new_state)), grads = run(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), x, params)
  chex.assert_tree_all_finite((value, y, new_state, grads))
  # x - mean is exactly zero, so y is the bias and the batch variance is zero.
  chex.assert_trees_all_close(y.astype(jnp.float32), jnp.zeros((6, 3)))
  chex.assert_trees_all_close(new_state["var"], jnp.full(3, 0.99))


# Transformations: jit, vmap over independent models, scan, no retracing.


def test_vmap_over_independent_models():
  models, shape = 4, (8, 3)
  keys = jax.random.split(jax.random.key(3), models)
  xs, params, states = jax.vmap(lambda k: _data_from_key(k, shape))(keys)
  f = jax.vmap(lambda p, s, x: jaxnorm.batch_norm(p, s, x, train=True, momentum=0.9))
  ys, new_states = jax.jit(f)(params, states, xs)
  for i in range(models):
    y_ref, mu, var = ref.batch_norm_train(xs[i], params["scale"][i], params["bias"][i])
    mean_ref, var_ref = ref.running_average(states["mean"][i], states["var"][i], mu,
                                            var, 0.9)
    chex.assert_trees_all_close(ys[i], y_ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(operator.itemgetter(i), new_states),
                                {"mean": mean_ref, "var": var_ref}, atol=1e-5, rtol=1e-5)


def _data_from_key(key, shape):
  k0, k1, k2 = jax.random.split(key, 3)
  c = shape[-1]
  return 1.0 + 2.0 * random_data.normal(k0, shape), _random_params(k1, c), _random_state(k2, c)


def test_scan_matches_python_loop_and_reference():
  steps, shape = 5, (4, 2, 2, 3)
  params, state0 = jaxnorm.batch_norm_init(3)
  xs = 3.0 + random_data.normal(jax.random.key(4), (steps,) + shape)

  def step(state, x):
    y, state = jaxnorm.batch_norm(params, state, x, train=True, momentum=0.9)
    return state, y

  final, ys = jax.jit(lambda s, xs: lax.scan(step, s, xs))(state0, xs)
  state, mean_ref, var_ref = state0, np.zeros(3), np.ones(3)
  for t in range(steps):
    state, y = step(state, xs[t])
    chex.assert_trees_all_close(ys[t], y, atol=1e-6, rtol=1e-6)
    y_ref, mu, var = ref.batch_norm_train(xs[t])
    mean_ref, var_ref = ref.running_average(mean_ref, var_ref, mu, var, 0.9)
    chex.assert_trees_all_close(ys[t], y_ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(final, state, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_close(final, {"mean": mean_ref, "var": var_ref},
                              atol=1e-5, rtol=1e-5)


def test_no_retracing_across_steps():
  params, state = jaxnorm.batch_norm_init(3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(params, state, x):
    y, state = jaxnorm.batch_norm(params, state, x, train=True)
    return jnp.mean(y ** 2), state

  for t in range(4):
    x = random_data.normal(jax.random.key(t), (8, 3))
    _, state = train_step(params, state, x)
  chex.assert_tree_all_finite(state)


# Masks.


@pytest.mark.parametrize("shape", [(8, 3), (4, 2, 2, 3)])
def test_mask_statistics_are_those_of_selected_entries(run, shape):
  x, params, state = _data(shape, -1, seed=2)
  mask = random_data.bernoulli(jax.random.key(7), 0.6, shape)
  y, new_state = run(jaxnorm.batch_norm, params, state, x, train=True, mask=mask,
                     momentum=0.9)
  mu, var = ref.masked_channel_moments(x, mask)
  mean_ref, var_ref = ref.running_average(state["mean"], state["var"], mu, var, 0.9)
  chex.assert_trees_all_close(new_state, {"mean": mean_ref, "var": var_ref},
                              atol=1e-5, rtol=1e-5)
  # Every entry (masked or not) is normalized with the selected entries' stats.
  y_ref = ref.batch_norm_infer(x, mu, var, params["scale"], params["bias"])
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_mask_of_whole_examples_equals_batch_norm_of_those_examples(run):
  x, params, state = _data((8, 3), -1, seed=3)
  keep = np.array([1, 0, 1, 1, 0, 0, 1, 1], bool)
  y, new_state = run(jaxnorm.batch_norm, params, state, x, train=True,
                     mask=jnp.asarray(keep)[:, None])
  y_sub, state_sub = run(jaxnorm.batch_norm, params, state, x[keep], train=True)
  chex.assert_trees_all_close(y[keep], y_sub, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(new_state, state_sub, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fn", ["batch_norm", "batch_renorm"])
def test_feature_without_selected_entries_keeps_its_running_averages(run, fn):
  x, params, state = _data((8, 3), -1, seed=4)
  state = {"mean": jnp.asarray([0.5, -1.0, 2.0]), "var": jnp.asarray([2.0, 3.0, 0.5])}
  mask = jnp.ones((8, 3), bool).at[:, 1].set(False)   # feature 1: no entries
  f = lambda p, s, x: getattr(jaxnorm, fn)(p, s, x, train=True, mask=mask, momentum=0.9)
  y, new_state = run(f, params, state, x)
  xn = np.asarray(x, np.float64)
  for c in (0, 2):
    np.testing.assert_allclose(new_state["mean"][c], 0.9 * state["mean"][c] + 0.1 * xn[:, c].mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(new_state["var"][c], 0.9 * state["var"][c] + 0.1 * xn[:, c].var(),
                               rtol=1e-5)
  assert float(new_state["mean"][1]) == -1.0 and float(new_state["var"][1]) == 3.0
  g = jax.grad(lambda x: jnp.sum(f(params, state, x)[0] ** 2))(x)
  assert np.all(np.isfinite(np.asarray(g))) and np.all(np.isfinite(np.asarray(y)))


# Numerics and dtypes.


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("shape", [(64, 4), (8, 4, 4, 4)])
def test_large_offset_float32(offset, shape):
  x = (offset + random_data.normal(jax.random.key(0), shape)).astype(jnp.float32)
  params, state = jaxnorm.batch_norm_init(4)
  y, new_state = jax.jit(lambda p, s, x: jaxnorm.batch_norm(
      p, s, x, train=True, momentum=0.0))(params, state, x)
  y_ref, mu, var = ref.batch_norm_train(x)   # float64 on the same float32 values
  assert np.max(np.abs(np.asarray(y, np.float64) - y_ref)) <= 1e-4
  chex.assert_trees_all_close(new_state["var"], var, rtol=1e-3)
  chex.assert_trees_all_close(new_state["mean"], mu, rtol=1e-6)


def test_bfloat16_input_keeps_float32_statistics(run):
  x = (5.0 + random_data.normal(jax.random.key(1), (16, 4))).astype(jnp.bfloat16)
  params, state = jaxnorm.batch_norm_init(4, dtype=jnp.bfloat16)
  y, new_state = run(jaxnorm.batch_norm, params, state, x, train=True, momentum=0.9)
  assert y.dtype == jnp.bfloat16
  assert new_state["mean"].dtype == new_state["var"].dtype == jnp.float32
  y_ref, mu, var = ref.batch_norm_train(x)   # the bf16 values, upcast
  mean_ref, var_ref = ref.running_average(0.0, 1.0, mu, var, 0.9)
  chex.assert_trees_all_close(new_state, {"mean": mean_ref, "var": var_ref},
                              atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(np.asarray(y, np.float64), y_ref, atol=2e-2)


@pytest.mark.parametrize("x_dtype,param_dtype,dtype,expected", [
    (jnp.float16, jnp.float32, None, jnp.float32),      # Flax's promotion rule
    (jnp.bfloat16, jnp.bfloat16, None, jnp.bfloat16),
    (jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16),
    (jnp.float16, jnp.float32, jnp.float16, jnp.float16),  # explicit dtype wins
])
@pytest.mark.parametrize("train", [True, False])
def test_output_dtype(x_dtype, param_dtype, dtype, expected, train):
  params, state = jaxnorm.batch_norm_init(3, dtype=param_dtype)
  x = random_data.normal(jax.random.key(0), (8, 3)).astype(x_dtype)
  y, new_state = jaxnorm.batch_norm(params, state, x, train=train, dtype=dtype)
  assert y.dtype == expected
  assert new_state["mean"].dtype == jnp.float32


def test_complex_input():
  k1, k2 = jax.random.split(jax.random.key(0))
  x = (1 + 2j) + random_data.normal(k1, (16, 3)) + 1j * random_data.normal(k2, (16, 3))
  _, state = jaxnorm.batch_norm_init(3)
  y, new_state = jaxnorm.batch_norm({}, state, x, train=True, momentum=0.0)
  mu, var = ref.mean_var(x, 0)
  chex.assert_trees_all_close(new_state["mean"], mu, atol=1e-5)
  chex.assert_trees_all_close(new_state["var"], var, atol=1e-5)
  assert not jnp.iscomplexobj(new_state["var"])
  chex.assert_trees_all_close(y, (ref.f64(x) - mu) / np.sqrt(var + 1e-5), atol=1e-5)


def test_ghost_chunk_without_selected_entries_adds_nothing_to_running_averages():
  """An empty chunk (whole, or for one feature) is left out of the chunks' mean."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((8, 3)) * 2 + 1, jnp.float32)
  mask = np.ones((8, 3), bool)
  mask[4:, :] = False           # chunk 2 empty for every feature
  mask[0:4, 0] = False          # and chunk 1 empty for feature 0 alone
  params, state = jaxnorm.batch_norm_init(3)
  state = {"mean": jnp.full(3, 5.0), "var": jnp.full(3, 7.0)}
  _, new = jaxnorm.batch_norm(params, state, x, train=True, virtual_batch_size=4,
                              mask=jnp.asarray(mask), momentum=0.5)
  x64 = ref.f64(x)
  mu1, var1 = x64[:4].mean(0), x64[:4].var(0)
  want_mean = np.where([False, True, True], 0.5 * 5.0 + 0.5 * mu1, 5.0)
  want_var = np.where([False, True, True], 0.5 * 7.0 + 0.5 * var1, 7.0)
  np.testing.assert_allclose(np.asarray(new["mean"]), want_mean, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new["var"]), want_var, rtol=1e-6)


def test_ghost_chunks_each_get_their_own_statistics_and_closed_form_gradient():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((12, 2, 3)) + 1e4, jnp.float32)
  params = {"scale": jnp.asarray([1.0, 2.0, 3.0]), "bias": jnp.asarray([0.0, 1.0, -1.0])}
  _, state = jaxnorm.batch_norm_init(3)
  ct = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  f = lambda p, x: jaxnorm.batch_norm(p, state, x, train=True, virtual_batch_size=4)[0]
  y = jax.jit(f)(params, x)
  for i in range(0, 12, 4):
    y_ref, _, _ = ref.batch_norm_train(x[i:i + 4], params["scale"], params["bias"])
    np.testing.assert_allclose(np.asarray(y[i:i + 4]), y_ref, atol=2e-5)
  got = jax.grad(lambda p, x: jnp.sum(f(p, x) * ct), (0, 1))(params, x)
  x64 = ref.f64(x) - 1e4
  for i in range(0, 12, 4):
    dx = ref.batch_norm_input_grad(x64[i:i + 4], ref.f64(ct)[i:i + 4], params["scale"])
    np.testing.assert_allclose(np.asarray(got[1][i:i + 4]), dx, atol=1e-4)


def test_unknown_state_keys_are_rejected():
  params, state = jaxnorm.batch_norm_init(3)
  with pytest.raises(ValueError, match="^" + re.escape(
      "`state` has unexpected keys ['count']; expected keys among ['mean', "
      "'num_batches_tracked', 'var'].") + "$"):
    jaxnorm.batch_norm(params, {**state, "count": jnp.zeros(3)}, jnp.ones((4, 3)), train=True)


@pytest.mark.parametrize("train", [True, False])
def test_zero_size_batch_gives_empty_output_and_keeps_state(train):
  params, state = jaxnorm.batch_norm_init(3)
  y, new = jaxnorm.batch_norm(params, state, jnp.zeros((0, 3)), train=train)
  assert y.shape == (0, 3) and y.dtype == jnp.float32
  assert new is state


def test_batch_renorm_rejects_complex_input():
  params, state = jaxnorm.batch_norm_init(3)
  with pytest.raises(TypeError, match=r"^`x` must be real for batch_renorm, got dtype complex64"):
    jaxnorm.batch_renorm(params, state, jnp.ones((4, 3), jnp.complex64), train=True)
