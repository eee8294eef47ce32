"""Tests for batch renormalization and ghost batch norm (jaxnorm/_src/batch_norm.py).

References are float64 NumPy formulas written from the papers:
Ioffe, "Batch Renormalization", 2017 (Algorithm 1), and Hoffer et al., "Train
longer, generalize better", 2017 (ghost batch norm).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm

import reference as ref

TOL = dict(atol=1e-5, rtol=1e-5)


# --- float64 references -------------------------------------------------------


def _axes(x, axis):
  axis = axis % x.ndim
  red = tuple(a for a in range(x.ndim) if a != axis)
  shape = tuple(x.shape[a] if a == axis else 1 for a in range(x.ndim))
  return red, shape


def renorm_ref(params, state, x, *, r_max, d_max, axis=-1, momentum=0.99, eps=1e-5):
  """Ioffe (2017), Algorithm 1, train mode, in float64.

  Returns y, new_state, and (r, d, x_hat, sigma_B) for the gradient reference.
  The running variance is averaged (not the standard deviation, as in the
  paper's Algorithm 1), as documented in `jaxnorm.batch_renorm`.
  """
  x = np.asarray(x, np.float64)
  red, shape = _axes(x, axis)
  f64 = lambda v: np.asarray(v, np.float64).reshape(shape)
  mu_b = x.mean(axis=red, keepdims=True)
  var_b = ((x - mu_b) ** 2).mean(axis=red, keepdims=True)
  sigma_b = np.sqrt(var_b + eps)
  mu, sigma = f64(state["mean"]), np.sqrt(f64(state["var"]) + eps)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
  x_hat = (x - mu_b) / sigma_b
  y = (x_hat * r + d) * f64(params["scale"]) + f64(params["bias"])
  new_state = {
      "mean": momentum * f64(state["mean"]).ravel() + (1 - momentum) * mu_b.ravel(),
      "var": momentum * f64(state["var"]).ravel() + (1 - momentum) * var_b.ravel(),
  }
  return y, new_state, (r, d, x_hat, sigma_b)


def renorm_grad_ref(params, state, x, g, *, r_max, d_max, axis=-1, eps=1e-5):
  """Gradients of sum(g * y) with r and d held constant (Ioffe 2017, Sec. 3).

  dL/dx_hat = g * scale * r, then the batch-norm backward through mu_B and
  sigma_B: dL/dx = (gh - mean(gh) - x_hat * mean(gh * x_hat)) / sigma_B.
  """
  red, shape = _axes(np.asarray(x), axis)
  _, _, (r, d, x_hat, sigma_b) = renorm_ref(params, state, x, r_max=r_max,
                                            d_max=d_max, axis=axis, eps=eps)
  g = np.asarray(g, np.float64)
  gh = g * np.asarray(params["scale"], np.float64).reshape(shape) * r
  dx = (gh - gh.mean(axis=red, keepdims=True)
        - x_hat * (gh * x_hat).mean(axis=red, keepdims=True)) / sigma_b
  dscale = (g * (x_hat * r + d)).sum(axis=red)
  dbias = g.sum(axis=red)
  return dx, dscale, dbias


def _frozen_renorm_loss(x, params, state, g, r, d, *, axis, eps):
  """sum(g * y) in float64 with r and d frozen, for finite differences."""
  red, shape = _axes(x, axis)
  mu_b = x.mean(axis=red, keepdims=True)
  sigma_b = np.sqrt(((x - mu_b) ** 2).mean(axis=red, keepdims=True) + eps)
  y = ((x - mu_b) / sigma_b * r + d) * np.reshape(params["scale"], shape) + np.reshape(
      params["bias"], shape)
  return float((g * y).sum())


def _bn_ref(params, x, *, axis=-1, eps=1e-5):
  """Train-mode batch norm (tests/reference.py): y and the biased batch statistics."""
  y, mu, var = ref.batch_norm_train(x, params["scale"], params["bias"], axis=axis, eps=eps)
  return y, mu.ravel(), var.ravel()


# --- fixtures -----------------------------------------------------------------


def _case(shape, axis, seed=0):
  """x, params and a running state far from the batch's statistics.

  Per channel, the running variance is var_B / [0.05, 0.5, 1, 2, 30] (so
  r = sigma_B / sigma is about [0.22, 0.71, 1, 1.4, 5.5]: clipped at both ends
  by r_max=3) and the running mean puts (mu_B - mu) / sigma at about
  [-8, -1, 0, 2, 7] (clipped at both ends by d_max=5).
  """
  rng = np.random.default_rng(seed)
  c = shape[axis]
  assert c == 5
  _, bshape = _axes(np.empty(shape), axis)
  x = (rng.normal(size=shape) * rng.uniform(0.5, 2, c).reshape(bshape)
       + rng.normal(size=c).reshape(bshape) * 3).astype(np.float32)
  _, mu_b, var_b = _bn_ref({"scale": np.ones(c), "bias": np.zeros(c)}, x, axis=axis)
  var = var_b / np.array([0.05, 0.5, 1.0, 2.0, 30.0])
  mean = mu_b - np.array([-8.0, -1.0, 0.0, 2.0, 7.0]) * np.sqrt(var)
  params = {"scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=c), jnp.float32)}
  state = {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}
  return jnp.asarray(x), params, state


CASES = [((8, 5), -1), ((4, 3, 5), -1), ((3, 5, 2, 2), 1)]


# --- batch renorm ---------------------------------------------------------------


@pytest.mark.parametrize("shape,axis", CASES)
def test_batch_renorm_with_r_max_1_d_max_0_is_batch_norm(run, shape, axis):
  x, params, state = _case(shape, axis)
  y, new_state = run(jaxnorm.batch_renorm, params, state, x, train=True, r_max=1.0,
                     d_max=0.0, axis=axis, momentum=0.9)
  y_bn, bn_state = run(jaxnorm.batch_norm, params, state, x, train=True, axis=axis,
                       momentum=0.9)
  chex.assert_trees_all_close((y, new_state), (y_bn, bn_state), **TOL)
  grad = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, state, x)[0])),
                                    argnums=(0, 1)))(params, x)
  renorm = functools.partial(jaxnorm.batch_renorm, train=True, r_max=1.0, d_max=0.0,
                             axis=axis)
  bn = functools.partial(jaxnorm.batch_norm, train=True, axis=axis)
  chex.assert_trees_all_close(grad(renorm), grad(bn), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape,axis", CASES)
def test_batch_renorm_matches_ioffe_2017(run, shape, axis):
  x, params, state = _case(shape, axis)
  y, new_state = run(jaxnorm.batch_renorm, params, state, x, train=True, r_max=3.0,
                     d_max=5.0, axis=axis, momentum=0.9)
  y_ref, state_ref, (r, d, _, _) = renorm_ref(params, state, x, r_max=3.0, d_max=5.0,
                                              axis=axis, momentum=0.9)
  # The fixture clips r and d at both ends and leaves them free in between.
  np.testing.assert_allclose(r.ravel()[[0, 4]], [1 / 3.0, 3.0])
  np.testing.assert_allclose(d.ravel()[[0, 4]], [-5.0, 5.0])
  assert 1 / 3 < r.ravel()[1] < 3 and -5 < d.ravel()[3] < 5
  np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-5)
  chex.assert_trees_all_close(new_state, state_ref, **TOL)
  # Renorm's output really differs from batch norm's here.
  y_bn, _, _ = _bn_ref(params, x, axis=axis)
  assert np.abs(y_ref - y_bn).max() > 1.0


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_batch_renorm_exact_at_large_offsets_with_the_running_mean_caught_up(offset):
  # Training's steady state: the running mean near the batch mean, both near a large offset.
  # `d` came from the float32-rounded batch mean (half an ulp of 1e5 is 0.004 of the unit
  # spread here), which reached the output: 3.7e-3 at 1e5.
  rng = np.random.default_rng(0)
  x = (offset + rng.standard_normal((256, 8))).astype(np.float32)
  state = {"mean": jnp.full(8, offset, jnp.float32), "var": jnp.ones(8, jnp.float32)}
  params = {"scale": jnp.asarray(rng.uniform(0.5, 2.0, 8), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=8), jnp.float32)}
  y, _ = jax.jit(functools.partial(jaxnorm.batch_renorm, train=True, r_max=3.0,
                                   d_max=5.0))(params, state, x)
  y_ref = renorm_ref(params, state, x, r_max=3.0, d_max=5.0)[0]
  np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shape,axis", CASES)
def test_batch_renorm_gradients_treat_r_and_d_as_constants(shape, axis):
  x, params, state = _case(shape, axis, seed=1)
  g = np.random.default_rng(2).normal(size=shape)
  kwargs = dict(r_max=3.0, d_max=5.0, axis=axis)

  def loss(params, state, x):
    y, _ = jaxnorm.batch_renorm(params, state, x, train=True, **kwargs)
    return jnp.sum(y * g)

  dparams, dstate, dx = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, state, x)
  dx_ref, dscale_ref, dbias_ref = renorm_grad_ref(params, state, x, g, **kwargs)

  # The closed form agrees with finite differences of the float64 reference.
  _, _, (r, d, _, _) = renorm_ref(params, state, x, **kwargs)
  p64 = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  x64 = np.asarray(x, np.float64)
  h = 1e-6
  for index in [(0,) * x.ndim, tuple(s - 1 for s in x.shape)]:
    e = np.zeros_like(x64)
    e[index] = h
    fd = (_frozen_renorm_loss(x64 + e, p64, state, g, r, d, axis=axis, eps=1e-5)
          - _frozen_renorm_loss(x64 - e, p64, state, g, r, d, axis=axis, eps=1e-5)) / (2 * h)
    np.testing.assert_allclose(dx_ref[index], fd, rtol=1e-6, atol=1e-8)

  np.testing.assert_allclose(dx, dx_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(dparams["scale"], dscale_ref, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(dparams["bias"], dbias_ref, atol=1e-4, rtol=1e-4)
  # r and d are stop_gradient-ed: nothing flows into the running statistics.
  chex.assert_trees_all_equal(dstate, jax.tree.map(jnp.zeros_like, state))


def test_batch_renorm_r_max_and_d_max_may_be_traced():
  x, params, state = _case((8, 5), -1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, x, r_max, d_max):
    return jaxnorm.batch_renorm(params, state, x, train=True, r_max=r_max, d_max=d_max)

  for r_max, d_max in [(1.0, 0.0), (1.5, 0.5), (3.0, 5.0)]:
    y, new_state = step(state, x, r_max, d_max)
    y_ref, state_ref, _ = renorm_ref(params, state, x, r_max=r_max, d_max=d_max)
    np.testing.assert_allclose(y, y_ref, atol=1e-4, rtol=1e-5)
    chex.assert_trees_all_close(new_state, state_ref, **TOL)


@pytest.mark.parametrize("shape,axis", CASES)
def test_batch_renorm_inference_is_batch_norm_inference(run, shape, axis):
  x, params, state = _case(shape, axis)
  y, new_state = run(jaxnorm.batch_renorm, params, state, x, train=False, axis=axis)
  y_bn, _ = run(jaxnorm.batch_norm, params, state, x, train=False, axis=axis)
  chex.assert_trees_all_equal(y, y_bn)
  chex.assert_trees_all_equal(new_state, state)
  _, bshape = _axes(np.asarray(x), axis)
  f64 = lambda v: np.asarray(v, np.float64).reshape(bshape)
  expected = ((np.asarray(x, np.float64) - f64(state["mean"])) / np.sqrt(
      f64(state["var"]) + 1e-5) * f64(params["scale"]) + f64(params["bias"]))
  np.testing.assert_allclose(y, expected, atol=1e-4, rtol=1e-5)


def test_batch_renorm_errors():
  x, params, state = _case((8, 5), -1)
  for kwargs, message in [(dict(r_max=0.5), "`r_max` must be >= 1.0, got 0.5."),
                          (dict(d_max=-1.0), "`d_max` must be >= 0.0, got -1.0.")]:
    with pytest.raises(ValueError) as err:
      jaxnorm.batch_renorm(params, state, x, train=True, **kwargs)
    assert str(err.value) == message


# --- ghost batch norm -----------------------------------------------------------


@pytest.mark.parametrize("shape,axis", CASES)
def test_ghost_batch_norm_with_one_chunk_is_batch_norm(run, shape, axis):
  x, params, state = _case(shape, axis)
  n = shape[0]
  y, new_state = run(jaxnorm.batch_norm, params, state, x, train=True, axis=axis,
                     virtual_batch_size=n, momentum=0.9)
  y_bn, bn_state = run(jaxnorm.batch_norm, params, state, x, train=True, axis=axis,
                       momentum=0.9)
  chex.assert_trees_all_close((y, new_state), (y_bn, bn_state), **TOL)


@pytest.mark.parametrize("shape,axis,k", [((8, 5), -1, 2), ((8, 5), -1, 4),
                                          ((6, 3, 5), -1, 3), ((6, 5, 2, 2), 1, 2),
                                          ((4, 5, 3), 1, 1)])
def test_ghost_batch_norm_normalizes_each_chunk_on_its_own(run, shape, axis, k):
  x, params, state = _case(shape, axis)
  y, new_state = run(jaxnorm.batch_norm, params, state, x, train=True, axis=axis,
                     virtual_batch_size=k, momentum=0.9)
  chunks = [_bn_ref(params, x[i:i + k], axis=axis) for i in range(0, shape[0], k)]
  np.testing.assert_allclose(y, np.concatenate([c[0] for c in chunks]), atol=1e-4,
                             rtol=1e-5)
  expected_state = {
      "mean": 0.9 * np.asarray(state["mean"], np.float64)
      + 0.1 * np.mean([c[1] for c in chunks], axis=0),
      "var": 0.9 * np.asarray(state["var"], np.float64)
      + 0.1 * np.mean([c[2] for c in chunks], axis=0),
  }
  chex.assert_trees_all_close(new_state, expected_state, **TOL)
  # The same as jaxnorm's own batch norm applied to each chunk.
  for i in range(0, shape[0], k):
    y_chunk, _ = jaxnorm.batch_norm(params, state, x[i:i + k], train=True, axis=axis)
    np.testing.assert_allclose(y[i:i + k], y_chunk, **TOL)


def test_ghost_batch_norm_gradients_stay_within_a_chunk():
  x, params, state = _case((8, 5), -1)

  def first_chunk_output(x):
    y, _ = jaxnorm.batch_norm(params, state, x, train=True, virtual_batch_size=4)
    return jnp.sum(jnp.sin(y[:4]))

  dx = jax.jit(jax.grad(first_chunk_output))(x)
  assert np.abs(np.asarray(dx[:4])).max() > 1e-3
  chex.assert_trees_all_equal(dx[4:], jnp.zeros_like(x[4:]))


def test_ghost_batch_norm_rejects_a_size_that_does_not_divide_the_batch():
  x, params, state = _case((6, 5, 2), 1)
  with pytest.raises(ValueError) as err:
    jaxnorm.batch_norm(params, state, x, train=True, axis=1, virtual_batch_size=4)
  assert str(err.value) == (
      "`virtual_batch_size`=4 must divide the batch size, but `x` has 6 examples "
      "along axis 0."
  )


def test_ghost_batch_norm_rejects_a_non_positive_size():
  x, params, state = _case((6, 5, 2), 1)
  with pytest.raises(ValueError) as err:
    jaxnorm.batch_norm(params, state, x, train=True, axis=1, virtual_batch_size=0)
  assert str(err.value) == "`virtual_batch_size` must be a positive int, got 0."
