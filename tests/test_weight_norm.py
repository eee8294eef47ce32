"""Tests of weight normalization and its data-dependent init (jaxnorm/_src/weight_norm.py).

References are float64 NumPy formulas from Salimans & Kingma 2016
(arXiv:1602.07868): eq. 2 for w, eq. 4 for the gradients, §3 for the init.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxnorm

# Dense (in, out) and Conv (H, W, in, out) kernels.
SHAPES = [(5, 3), (2, 2, 2, 3)]


def _kernel(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _np_weight_norm(v, g):
  """Eq. 2 per output unit (last axis), float64."""
  v = np.asarray(v, np.float64)
  norm = np.sqrt((v.reshape(-1, v.shape[-1]) ** 2).sum(0))
  return v * (np.asarray(g, np.float64) / norm)


@pytest.mark.parametrize("shape", SHAPES)
def test_init_roundtrip_returns_w(shape, run):
  w = jnp.asarray(_kernel(shape))
  wn = jaxnorm.weight_norm_init(w)
  chex.assert_shape(wn["g"], (shape[-1],))
  np.testing.assert_array_equal(np.asarray(wn["v"]), np.asarray(w))
  out = run(jaxnorm.weight_norm, wn)
  chex.assert_trees_all_close(out, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_numpy_formula_and_norm_is_g(shape, run):
  v = _kernel(shape, 1)
  g = np.random.default_rng(2).uniform(0.5, 2.0, size=shape[-1]).astype(np.float32)
  out = run(jaxnorm.weight_norm, {"v": jnp.asarray(v), "g": jnp.asarray(g)})
  chex.assert_type(out, jnp.float32)
  np.testing.assert_allclose(out, _np_weight_norm(v, g), rtol=1e-5, atol=1e-6)
  norms = np.sqrt((np.asarray(out, np.float64).reshape(-1, shape[-1]) ** 2).sum(0))
  np.testing.assert_allclose(norms, g, rtol=1e-5)


def test_tuple_axis_and_none_axis():
  v = _kernel((4, 3, 2), 3)
  wn = jaxnorm.weight_norm_init(jnp.asarray(v), axis=(0, 2))
  chex.assert_shape(wn["g"], (4, 2))
  g = np.sqrt((v.astype(np.float64) ** 2).sum(1))
  np.testing.assert_allclose(wn["g"], g, rtol=1e-6)
  out = jaxnorm.weight_norm({"v": jnp.asarray(v), "g": jnp.full((4, 2), 2.0)},
                            axis=(0, 2))
  norms = np.sqrt((np.asarray(out, np.float64) ** 2).sum(1))
  np.testing.assert_allclose(norms, 2.0, rtol=1e-6)
  # axis=None: one Frobenius norm, scalar g.
  out = jaxnorm.weight_norm({"v": jnp.asarray(v), "g": jnp.asarray(3.0)}, axis=None)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out, np.float64)), 3.0,
                             rtol=1e-6)


def test_missing_g_gives_unit_norm():
  v = _kernel((5, 3), 4)
  out = jaxnorm.weight_norm({"v": jnp.asarray(v)})
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out, np.float64), axis=0),
                             1.0, rtol=1e-6)


def test_zero_direction_gives_zero_weight_and_finite_grads():
  v = jnp.asarray(_kernel((4, 3), 5)).at[:, 1].set(0.0)
  g = jnp.array([1.0, 2.0, 3.0])
  out = jaxnorm.weight_norm({"v": v, "g": g})
  np.testing.assert_array_equal(np.asarray(out[:, 1]), 0.0)
  grads = jax.jit(jax.grad(lambda wn: jnp.sum(jaxnorm.weight_norm(wn) ** 2)))(
      {"v": v, "g": g})
  chex.assert_tree_all_finite(grads)
  np.testing.assert_array_equal(np.asarray(grads["v"][:, 1]), 0.0)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_paper_formulas(shape):
  """grad_g = grad_w . v/||v||; grad_v = g/||v|| (I - w w^T/||w||^2) grad_w."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(6)
    v = rng.normal(size=shape)
    g = rng.uniform(0.5, 2.0, size=shape[-1])
    target = rng.normal(size=shape)  # loss = sum(target * w): grad_w = target

    def loss(wn):
      return jnp.sum(jnp.asarray(target) * jaxnorm.weight_norm(wn))

    grads = jax.jit(jax.grad(loss))({"v": jnp.asarray(v), "g": jnp.asarray(g)})
    vm = v.reshape(-1, shape[-1])
    gw = target.reshape(-1, shape[-1])
    norm = np.sqrt((vm ** 2).sum(0))
    w = vm * g / norm
    grad_g = (gw * vm).sum(0) / norm
    proj = (w * gw).sum(0) / (w ** 2).sum(0)
    grad_v = g / norm * (gw - w * proj)
    np.testing.assert_allclose(grads["g"], grad_g, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(grads["v"]).reshape(vm.shape), grad_v,
                               rtol=1e-10, atol=1e-12)


# Second order on the Dense kernel; the Conv kernel (the same formula after a
# reshape) to first order, a fifth of the compiles.
@pytest.mark.parametrize("shape,order", list(zip(SHAPES, (2, 1), strict=True)))
def test_check_grads(shape, order):
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    v = jnp.asarray(rng.normal(size=shape))
    g = jnp.asarray(rng.uniform(0.5, 2.0, size=shape[-1]))
    f = jax.jit(lambda v, g: jaxnorm.weight_norm({"v": v, "g": g}))
    check_grads(f, (v, g), order=order, modes=["fwd", "rev"])


def _dense(w, x):
  return x @ w


def _conv(w, x):
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape,layer,xshape", [
    ((5, 3), _dense, (64, 5)),
    ((3, 3, 2, 4), _conv, (4, 6, 6, 2)),
])
def test_data_init_gives_zero_mean_unit_variance(shape, layer, xshape, run):
  rng = np.random.default_rng(8)
  wn = jaxnorm.weight_norm_init(jnp.asarray(rng.normal(size=shape), jnp.float32))
  x = jnp.asarray(rng.normal(2.0, 3.0, size=xshape), jnp.float32)
  t = layer(jaxnorm.weight_norm(wn), x)
  new_wn, bias = run(jaxnorm.weight_norm_data_init, wn, t, eps=1e-12)
  chex.assert_shape(bias, (shape[-1],))
  y = np.asarray(layer(jaxnorm.weight_norm(new_wn), x) + bias, np.float64)
  y = y.reshape(-1, shape[-1])
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(0), 1.0, atol=1e-5)
  # The formulas of §3 in float64.
  t64 = np.asarray(t, np.float64).reshape(-1, shape[-1])
  np.testing.assert_allclose(new_wn["g"], np.asarray(wn["g"]) / t64.std(0),
                             rtol=1e-5)
  np.testing.assert_allclose(bias, -t64.mean(0) / t64.std(0), rtol=1e-4,
                             atol=1e-6)


def test_jit_and_vmap():
  ws = jnp.asarray(_kernel((4, 5, 3), 9))
  wns = jax.vmap(jaxnorm.weight_norm_init)(ws)
  out = jax.jit(jax.vmap(jaxnorm.weight_norm))(wns)
  chex.assert_trees_all_close(out, ws, rtol=1e-6, atol=1e-6)


def test_bad_arguments():
  v = jnp.ones((4, 3))
  msg = "`wn['g']` must have shape (3,) (the shape of `wn['v']` along `axis`=-1), got (4,)."
  with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
    jaxnorm.weight_norm({"v": v, "g": jnp.ones(4)})
  msg = ("`wn` must be a dict with key 'v' (and optionally 'g'), built with "
         "`weight_norm_init`; got dict with keys ['w'].")
  with pytest.raises(TypeError, match="^" + re.escape(msg) + "$"):
    jaxnorm.weight_norm({"w": v})
  msg = "`axis`=2 is out of range for an input with 2 dimensions; expected values in [-2, 1]."
  with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
    jaxnorm.weight_norm_init(v, axis=2)
  msg = ("`t` has 5 features on its last axis but `wn['g']` has shape (3,); `t` "
         "must be the layer's output with the features last.")
  with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
    jaxnorm.weight_norm_data_init(jaxnorm.weight_norm_init(v), jnp.ones((2, 5)))
  msg = "`eps` must be >= 0, got -1.0."
  with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
    jaxnorm.weight_norm({"v": v}, eps=-1.0)


# Kernels of extreme magnitude: ||v||**2 formed in float32 overflows for
# entries ~1e20 and underflows for ~1e-25 (w ~ 0 both ways). The references
# are float64 NumPy formulas on the same float32 values.
def _wn64(v, g, t):
  """w = g v / ||v|| (norm over axis 0), and d/d(v, g) of sum(w * t), float64."""
  v, g, t = (np.asarray(a, np.float64) for a in (v, g, t))
  norm = np.sqrt(np.sum(v * v, axis=0))
  u = v / norm
  dv = g / norm * (t - u * np.sum(u * t, axis=0))
  return g * u, dv, np.sum(u * t, axis=0)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-25, 1e-20, 1.0, 1e20, 1e30])
def test_extreme_magnitudes_match_float64(magnitude):
  rng = np.random.default_rng(0)
  v = (rng.standard_normal((64, 16)) * magnitude).astype(np.float32)
  g = rng.standard_normal(16).astype(np.float32)
  t = rng.standard_normal((64, 16)).astype(np.float32)
  w_ref, dv_ref, dg_ref = _wn64(v, g, t)
  wn = {"v": jnp.asarray(v), "g": jnp.asarray(g)}
  w = jaxnorm.weight_norm(wn)
  grads = jax.grad(lambda wn: jnp.sum(jaxnorm.weight_norm(wn) * t))(wn)
  np.testing.assert_allclose(np.asarray(w, np.float64), w_ref, rtol=0,
                             atol=2e-6 * np.abs(w_ref).max())
  np.testing.assert_allclose(np.asarray(grads["v"], np.float64), dv_ref, rtol=0,
                             atol=2e-6 * np.abs(dv_ref).max())
  np.testing.assert_allclose(np.asarray(grads["g"], np.float64), dg_ref, rtol=0,
                             atol=2e-6 * np.abs(dg_ref).max())
  # The init's length is the same norm: g = ||v||, and the roundtrip gives v.
  init = jaxnorm.weight_norm_init(jnp.asarray(v))
  np.testing.assert_allclose(np.asarray(init["g"], np.float64),
                             np.linalg.norm(v.astype(np.float64), axis=0), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jaxnorm.weight_norm(init), np.float64),
                             v.astype(np.float64), rtol=0, atol=2e-6 * np.abs(v).max())


@pytest.mark.parametrize("magnitude", [1e-25, 1e20])
def test_extreme_magnitudes_with_eps(magnitude):
  # Flax's eps=1e-12: w = g v / sqrt(||v||**2 + eps).
  rng = np.random.default_rng(1)
  v = (rng.standard_normal((32, 4)) * magnitude).astype(np.float32)
  v64 = v.astype(np.float64)
  w_ref = v64 / np.sqrt(np.sum(v64 * v64, axis=0) + 1e-12)
  w = jaxnorm.weight_norm({"v": jnp.asarray(v)}, eps=1e-12)
  np.testing.assert_allclose(np.asarray(w, np.float64), w_ref, rtol=2e-6,
                             atol=2e-6 * np.abs(w_ref).max())


@pytest.mark.parametrize("magnitude", [1e-20, 1e-26, 1e-30, 1e-33])
def test_tiny_kernels_with_eps_match_float64(magnitude):
  # Where eps outweighs ||v||**2, w ~ g v / sqrt(eps). With v scaled to a
  # maximum of 1, eps c**2 overflowed float32 for v below ~5e-26 (w = 0 and a
  # zero gradient); the scale now keeps eps c**2 <= 1.
  rng = np.random.default_rng(2)
  v = (rng.standard_normal((32, 4)) * magnitude).astype(np.float32)
  g = rng.standard_normal(4).astype(np.float32)
  t = rng.standard_normal((32, 4))
  v64, g64 = v.astype(np.float64), g.astype(np.float64)
  s = np.sqrt(np.sum(v64 * v64, axis=0) + 1e-12)
  w_ref = g64 * v64 / s
  dv_ref = g64 * (t / s - v64 * np.sum(v64 * t, axis=0) / s**3)
  wn = {"v": jnp.asarray(v), "g": jnp.asarray(g)}
  f = jax.jit(lambda wn: jaxnorm.weight_norm(wn, eps=1e-12))
  w = f(wn)
  dv = jax.jit(jax.grad(lambda wn: jnp.sum(f(wn) * t)))(wn)["v"]
  np.testing.assert_allclose(np.asarray(w, np.float64), w_ref, rtol=0,
                             atol=2e-6 * np.abs(w_ref).max())
  np.testing.assert_allclose(np.asarray(dv, np.float64), dv_ref, rtol=0,
                             atol=2e-6 * np.abs(dv_ref).max())
