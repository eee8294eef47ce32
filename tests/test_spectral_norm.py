"""Tests of spectral normalization (jaxnorm/_src/weight_norm.py).

Reference: the largest singular value from ``numpy.linalg.svd`` in float64 of
the kernel reshaped as Flax does, ``(-1, out)`` (Miyato et al. 2018).
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm

SHAPES = [(6, 4), (3, 3, 2, 5)]  # Dense (in, out), Conv (H, W, in, out)


def _kernel(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _sigma_max(w):
  w = np.asarray(w, np.float64)
  return np.linalg.svd(w.reshape(-1, w.shape[-1]), compute_uv=False)[0]


def test_init_state():
  state = jaxnorm.spectral_norm_init(_kernel((6, 4)), jax.random.key(0))
  chex.assert_shape(state["u"], (4,))
  chex.assert_shape(state["sigma"], ())
  np.testing.assert_allclose(np.linalg.norm(np.asarray(state["u"])), 1.0, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_converges_to_unit_spectral_norm(shape, run):
  w = _kernel(shape, 1)
  state = jaxnorm.spectral_norm_init(w, jax.random.key(1))
  w_sn, new_state = run(jaxnorm.spectral_norm, w, state, n_steps=50)
  np.testing.assert_allclose(_sigma_max(w_sn), 1.0, rtol=1e-4)
  np.testing.assert_allclose(new_state["sigma"], _sigma_max(w), rtol=1e-4)
  chex.assert_shape(w_sn, shape)
  # Repeated single steps converge too (the state carries u between calls).
  one_step = jax.jit(jaxnorm.spectral_norm)
  for _ in range(50):
    w_sn, state = one_step(w, state)
  np.testing.assert_allclose(_sigma_max(w_sn), 1.0, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_one_step_matches_numpy_power_iteration(shape):
  w = _kernel(shape, 2)
  state = jaxnorm.spectral_norm_init(w, jax.random.key(2))
  w_sn, new_state = jaxnorm.spectral_norm(w, state, n_steps=2)
  m = np.asarray(w, np.float64).reshape(-1, shape[-1])
  u = np.asarray(state["u"], np.float64)
  for _ in range(2):
    v = m @ u
    v /= np.linalg.norm(v)
    u = m.T @ v
    u /= np.linalg.norm(u)
  sigma = v @ m @ u
  np.testing.assert_allclose(new_state["u"], u, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state["sigma"], sigma, rtol=1e-5)
  np.testing.assert_allclose(w_sn, np.asarray(w, np.float64) / sigma, rtol=1e-5,
                             atol=1e-6)


def test_eval_leaves_state_unchanged_and_is_deterministic(run):
  w = _kernel((6, 4), 3)
  state = jaxnorm.spectral_norm_init(w, jax.random.key(3))
  w_eval, same = run(jaxnorm.spectral_norm, w, state, train=False)
  chex.assert_trees_all_equal(same, state)
  w_eval2, _ = run(jaxnorm.spectral_norm, w, state, train=False)
  chex.assert_trees_all_equal(w_eval, w_eval2)
  w_train, new_state = run(jaxnorm.spectral_norm, w, state, train=True)
  chex.assert_trees_all_close(w_eval, w_train)  # same computation, not stored
  assert not np.allclose(new_state["u"], state["u"])


def test_gradient_stops_through_u():
  """With u, v fixed, d sigma/dW = v u^T, so grad of sum(t * W/sigma) is known."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.normal(size=(5, 3)))
    t = rng.normal(size=(5, 3))
    state = jaxnorm.spectral_norm_init(w, jax.random.key(4))
    grad = jax.jit(jax.grad(
        lambda w: jnp.sum(t * jaxnorm.spectral_norm(w, state)[0])))(w)
    _, new = jaxnorm.spectral_norm(w, state)
    m = np.asarray(w)
    u = np.asarray(new["u"])
    v = m @ np.asarray(state["u"])
    v /= np.linalg.norm(v)
    sigma = v @ m @ u
    expected = t / sigma - (t * m).sum() / sigma ** 2 * np.outer(v, u)
    np.testing.assert_allclose(grad, expected, rtol=1e-8)


def test_jit_and_vmap():
  ws = _kernel((3, 6, 4), 5)
  states = jax.vmap(jaxnorm.spectral_norm_init)(ws, jax.random.split(jax.random.key(5), 3))
  w_sn, new = jax.jit(jax.vmap(lambda w, s: jaxnorm.spectral_norm(w, s, n_steps=30)))(
      ws, states)
  for i in range(3):
    np.testing.assert_allclose(_sigma_max(w_sn[i]), 1.0, rtol=1e-4)
    np.testing.assert_allclose(new["sigma"][i], _sigma_max(ws[i]), rtol=1e-4)


def test_bad_arguments():
  w = _kernel((6, 4))
  state = jaxnorm.spectral_norm_init(w, jax.random.key(0))
  msg = ("`w` must have at least 2 dimensions (a matrix, or a kernel whose last "
         "axis is the output), got shape (4,) with 1.")
  with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
    jaxnorm.spectral_norm(jnp.ones(4), state)
  msg = "`n_steps` must be a positive int, got 0."
  with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
    jaxnorm.spectral_norm(w, state, n_steps=0)
  msg = "`state['u']` must have shape (5,) (the last axis of `w`), got (4,)."
  with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
    jaxnorm.spectral_norm(jnp.ones((3, 5)), state)
  msg = ("`state` must be a dict with keys 'u' and 'sigma' built with "
         "`spectral_norm_init`, got dict with keys ['v'].")
  with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
    jaxnorm.spectral_norm(w, {"v": 1})


# Kernels of extreme magnitude in float32. Unscaled, ||W u||**2 overflowed for
# entries ~1e20 (u = v = 0, sigma = 0: W came back unnormalized) and
# underflowed for ~1e-20 (0 * rsqrt(0): NaN), and the derivative of W / sigma
# has sigma**-2. The references are float64 NumPy on the same float32 values.
def _spiked(shape, seed):
  """A kernel whose largest singular value is twice the next (fast
  convergence, so 50 steps reach the SVD's sigma)."""
  rng = np.random.default_rng(seed)
  m, n = int(np.prod(shape[:-1])), shape[-1]
  q1 = np.linalg.qr(rng.normal(size=(m, n)))[0]
  q2 = np.linalg.qr(rng.normal(size=(n, n)))[0]
  s = np.concatenate([[2.0], rng.uniform(0.1, 1.0, n - 1)])
  return ((q1 * s) @ q2.T).reshape(shape)


def _power_iteration64(w, u, n_steps, eps):
  """Flax's power iteration and the gradient of sum(t * W / sigma) for `t`
  with u and v fixed, t / sigma - sum(t * W) / sigma**2 v u^T, in float64."""
  m = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
  u = np.asarray(u, np.float64)
  l2n = lambda x: x / np.sqrt(x @ x + eps)
  for _ in range(n_steps):
    v = l2n(m @ u)
    u = l2n(m.T @ v)
  sigma = v @ m @ u
  grad = lambda t: t / sigma - np.sum(t * m) / sigma**2 * np.outer(v, u)
  return sigma, grad


@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e20, 1e30])
@pytest.mark.parametrize("shape", SHAPES)
def test_extreme_magnitudes_match_float64(shape, magnitude):
  w = jnp.asarray(_spiked(shape, 6) * magnitude, jnp.float32)
  t = np.random.default_rng(7).normal(size=shape)
  # Flax's eps outweighs ||W u||**2 for weights far below sqrt(eps) (u and v
  # then shrink, in float64 too), so it is scaled as the weight's square: the
  # same problem as magnitude 1 with eps 1e-12.
  eps = 1e-12 * min(magnitude, 1.0) ** 2
  state = jaxnorm.spectral_norm_init(w, jax.random.key(6))
  f = jax.jit(lambda w: jaxnorm.spectral_norm(w, state, n_steps=50, eps=eps))
  w_sn, new_state = f(w)
  grad = jax.jit(jax.grad(lambda w: jnp.sum(t * f(w)[0])))(w)
  for a in (w_sn, new_state["u"], new_state["sigma"], grad):
    assert np.isfinite(np.asarray(a)).all()
  svd_sigma = _sigma_max(w)
  sigma, grad_ref = _power_iteration64(w, state["u"], 50, eps)
  np.testing.assert_allclose(sigma, svd_sigma, rtol=1e-12)  # converged
  np.testing.assert_allclose(np.asarray(new_state["sigma"], np.float64), svd_sigma,
                             rtol=1e-5)
  np.testing.assert_allclose(_sigma_max(w_sn), 1.0, rtol=1e-5)
  w_ref = np.asarray(w, np.float64) / svd_sigma
  np.testing.assert_allclose(np.asarray(w_sn, np.float64), w_ref, rtol=0,
                             atol=1e-5 * np.abs(w_ref).max())
  g_ref = grad_ref(t.reshape(-1, shape[-1])).reshape(shape)
  np.testing.assert_allclose(np.asarray(grad, np.float64), g_ref, rtol=0,
                             atol=1e-5 * np.abs(g_ref).max())
