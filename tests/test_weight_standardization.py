"""Tests of weight standardization (Qiao et al. 2019) and scaled WS (Brock et al. 2021)."""

import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_data
import reference_modern as rm
from flax import nnx
from jax.test_util import check_grads

import jaxnorm
import jaxnorm.linen as jl
import jaxnorm.nnx as jn


def _w(shape, seed=0):
  return 0.3 + random_data.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("shape", [(5, 4), (3, 3, 2, 4)])
def test_weight_standardization_matches_reference(run, shape):
  w = _w(shape)
  v = run(jaxnorm.weight_standardization, w)
  chex.assert_trees_all_close(v, rm.weight_standardization(w), atol=1e-5, rtol=1e-5)
  assert v.dtype == w.dtype


@pytest.mark.parametrize("gamma", [1.0, "relu", 2.5])
def test_scaled_weight_standardization_matches_reference(run, gamma):
  w = _w((3, 3, 2, 4))
  gain = 1.0 + 0.1 * jnp.arange(4.0)
  v = run(jaxnorm.scaled_weight_standardization, w, gain, gamma=gamma)
  g = math.sqrt(2.0 / (1.0 - 1.0 / math.pi)) if gamma == "relu" else gamma
  chex.assert_trees_all_close(v, rm.scaled_weight_standardization(w, gain, gamma=g),
                              atol=1e-5, rtol=1e-5)


def test_relu_gain_is_the_relu_variance():
  # gamma = 1/std(relu(z)), z ~ N(0, 1): Var = (1/2)(1 - 1/pi) (Brock et al. 2021a).
  z = np.random.default_rng(0).standard_normal(2_000_000)
  ratio = jaxnorm._src.weight_standardization.NONLINEARITY_GAINS["relu"] * np.maximum(z, 0).std()
  assert ratio == pytest.approx(1.0, abs=2e-3)


def test_other_output_axis_and_constant_rows():
  w = _w((4, 6))
  chex.assert_trees_all_close(jaxnorm.weight_standardization(w, axis=0),
                              rm.weight_standardization(w.T).T, atol=1e-5)
  # A constant row has zero variance: eps keeps the result finite (zero).
  v = jaxnorm.scaled_weight_standardization(jnp.ones((3, 2)))
  chex.assert_trees_all_equal(v, jnp.zeros((3, 2)))


def test_gradients_match_float64_reference():
  w = _w((3, 4))
  gain = 1.0 + 0.1 * jnp.arange(4.0)
  g = random_data.normal(jax.random.key(2), (3, 4))
  ours = jax.grad(lambda w, gain: jnp.sum(
      jaxnorm.scaled_weight_standardization(w, gain, gamma="relu") * g), argnums=(0, 1))(w, gain)
  relu = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
  ref = rm.numeric_grad(lambda w, gain: np.sum(
      rm.scaled_weight_standardization(w, gain, gamma=relu) * rm.f64(g)), w, gain)
  chex.assert_trees_all_close(ours, tuple(ref), atol=1e-4, rtol=1e-4)
  ours_ws = jax.grad(lambda w: jnp.sum(jaxnorm.weight_standardization(w) * g))(w)
  ref_ws = rm.numeric_grad(lambda w: np.sum(rm.weight_standardization(w) * rm.f64(g)), w)[0]
  chex.assert_trees_all_close(ours_ws, ref_ws, atol=1e-4, rtol=1e-4)


def test_check_grads_float64():
  with jax.enable_x64(True):
    w = np.asarray(_w((3, 2, 4)), np.float64)
    check_grads(jax.jit(jaxnorm.weight_standardization), (w,), order=2, modes=["fwd", "rev"])


def test_vmap_over_kernels():
  w = _w((5, 3, 4))
  chex.assert_trees_all_close(jax.vmap(jaxnorm.weight_standardization)(w),
                              np.stack([rm.weight_standardization(k) for k in w]), atol=1e-5)


@pytest.mark.parametrize("call,err,msg", [
    (lambda: jaxnorm.weight_standardization(jnp.ones(4)), ValueError,
     "`kernel` must have at least 2 dimensions (fan-in axes and an output axis), got "
     "shape (4,) with 1."),
    (lambda: jaxnorm.weight_standardization(jnp.ones((3, 4), jnp.int32)), TypeError,
     "`kernel` must have a floating-point dtype, got int32; cast it first, for example "
     "`kernel.astype(jnp.float32)`."),
    (lambda: jaxnorm.scaled_weight_standardization(jnp.ones((3, 4)), jnp.ones(3)), ValueError,
     "`gain` must have the shape of `kernel` along `axis`, (4,), got (3,)."),
    (lambda: jaxnorm.scaled_weight_standardization(jnp.ones((3, 4)), gamma="softplus"),
     ValueError, "`gamma` must be a number or one of ['gelu', 'identity', 'relu', "
     "'sigmoid', 'silu', 'tanh'], got 'softplus'."),
    (lambda: jaxnorm.weight_standardization(jnp.ones((3, 4)), axis=2), ValueError,
     "`axis`=2 is out of range for an input with 2 dimensions; expected values in "
     "[-2, 1]."),
    (lambda: jaxnorm.weight_standardization(jnp.ones((3, 4)), eps=-1.0), ValueError,
     "`eps` must be > 0, got -1.0."),
])
def test_bad_input(call, err, msg):
  with pytest.raises(err, match=re.escape(msg) + "$"):
    call()


def test_linen_std_conv_is_conv_on_the_standardized_kernel():
  x = random_data.normal(jax.random.key(0), (2, 6, 6, 3))
  conv = jl.StdConv(4, (3, 3))
  vs = conv.init(jax.random.key(1), x)
  flax_conv = nn.Conv(4, (3, 3))
  chex.assert_trees_all_equal_shapes(vs, flax_conv.init(jax.random.key(1), x))
  k = vs["params"]["kernel"]
  std = {"params": {"kernel": jnp.asarray(rm.weight_standardization(k), jnp.float32),
                    "bias": vs["params"]["bias"]}}
  chex.assert_trees_all_close(jax.jit(conv.apply)(vs, x), flax_conv.apply(std, x), atol=1e-4)
  g = jax.grad(lambda v: jnp.sum(conv.apply(v, x) ** 2))(vs)
  # Standardization removes the kernel's per-output mean: its gradient sums to 0.
  gk = np.asarray(g["params"]["kernel"], np.float64)
  assert np.abs(gk.sum((0, 1, 2))).max() < 1e-5 * np.abs(gk).sum()


@pytest.mark.parametrize("scaled", [False, True])
def test_linen_wrapper(scaled):
  x = random_data.normal(jax.random.key(0), (5, 3))
  m = jl.WeightStandardization(nn.Dense(4), scaled=scaled, gamma="relu")
  vs = m.init(jax.random.key(1), x)
  k = vs["params"]["layer_instance"]["kernel"]
  if scaled:
    gain = 1.0 + jnp.arange(4.0)
    vs = {"params": {**vs["params"], "layer_instance/kernel/gain": gain}}
    w = rm.scaled_weight_standardization(
        k, gain, gamma=math.sqrt(2.0 / (1.0 - 1.0 / math.pi)))
  else:
    assert sorted(vs["params"]) == ["layer_instance"]
    w = rm.weight_standardization(k)
  y = m.apply(vs, x)
  chex.assert_trees_all_close(y, rm.f64(x) @ w + rm.f64(vs["params"]["layer_instance"]["bias"]),
                              atol=1e-5)


def test_nnx_std_conv_and_wrapper():
  x = random_data.normal(jax.random.key(0), (2, 6, 6, 3))
  conv = jn.StdConv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  ref = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
  raw = conv.kernel[...]
  ref.kernel[...] = jnp.asarray(rm.weight_standardization(raw), jnp.float32)
  chex.assert_trees_all_close(nnx.jit(lambda m, x: m(x))(conv, x), ref(x), atol=1e-4)
  chex.assert_trees_all_equal(conv.kernel[...], raw)   # the stored kernel stays raw
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(conv)
  gk = np.asarray(grads["kernel"][...], np.float64)
  assert np.abs(gk.sum((0, 1, 2))).max() < 1e-5 * np.abs(gk).sum()

  xd = random_data.normal(jax.random.key(1), (5, 3))
  m = jn.WeightStandardization(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), scaled=True, gamma=2.0,
                               rngs=nnx.Rngs(1))
  (path, gain), = m.gains.items()
  gain[...] = 1.0 + jnp.arange(4.0)
  k = m.layer_instance.kernel[...]
  y = m(xd)
  chex.assert_trees_all_close(
      y, rm.f64(xd) @ rm.scaled_weight_standardization(k, gain[...], gamma=2.0), atol=1e-5)
  grads = nnx.grad(lambda m: jnp.sum(m(xd) ** 2))(m)
  assert grads["gains"][path][...].shape == (4,)


# Kernels far from zero: a large mean with unit spread. `kernel - mean` must be
# exact (not `kernel - float32(mean)`, off by half an ulp of the mean). The
# references are float64 NumPy formulas on the same float32 values.
def _offset_kernel(offset, shape=(3, 3, 32, 16), seed=1):
  return (offset + np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _ws64(w, g, eps):
  """WS output and d/dw sum(WS(w) * g), float64, fan-in all axes but the last."""
  w2 = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
  g2 = np.asarray(g, np.float64).reshape(w2.shape)
  c = w2 - w2.mean(0)
  r = 1 / np.sqrt((c * c).mean(0) + eps)
  dw = r * (g2 - g2.mean(0)) - r**3 * c * (g2 * c).mean(0)
  return (c * r).reshape(w.shape), dw.reshape(w.shape)


def _sws64(w, gain, g, gamma, eps):
  """Scaled WS output and d/d(w, gain) sum(SWS(w, gain) * g), float64."""
  w2 = np.asarray(w, np.float64).reshape(-1, w.shape[-1])
  g2 = np.asarray(g, np.float64).reshape(w2.shape)
  gain = np.asarray(gain, np.float64)
  c = w2 - w2.mean(0)
  ss = (c * c).sum(0)
  s = 1 / np.sqrt(np.maximum(ss, eps))
  assert np.all(ss > eps)
  y = gamma * gain * c * s
  dw = gamma * gain * (s * (g2 - g2.mean(0)) - s**3 * c * (g2 * c).sum(0))
  dgain = gamma * (g2 * c * s).sum(0)
  return y.reshape(w.shape), dw.reshape(w.shape), dgain


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_weight_standardization_exact_at_large_offsets(offset):
  w = _offset_kernel(offset)
  g = np.random.default_rng(2).standard_normal(w.shape).astype(np.float32)
  y_ref, dw_ref = _ws64(w, g, 1e-6)
  y = jaxnorm.weight_standardization(jnp.asarray(w))
  dw = jax.grad(lambda w: jnp.sum(jaxnorm.weight_standardization(w) * g))(jnp.asarray(w))
  # |y| <= 4: float32 rounding of the output is 2.4e-7.
  np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, atol=2e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(dw, np.float64), dw_ref,
                             atol=2e-6 * np.abs(dw_ref).max(), rtol=0)


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_scaled_weight_standardization_exact_at_large_offsets(offset):
  w = _offset_kernel(offset)
  rng = np.random.default_rng(3)
  g = rng.standard_normal(w.shape).astype(np.float32)
  gain = (1 + 0.1 * rng.standard_normal(w.shape[-1])).astype(np.float32)
  relu = math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
  y_ref, dw_ref, dgain_ref = _sws64(w, gain, g, relu, 1e-4)
  f = lambda w, gain: jaxnorm.scaled_weight_standardization(w, gain, gamma="relu")
  y = f(jnp.asarray(w), jnp.asarray(gain))
  dw, dgain = jax.grad(lambda w, gain: jnp.sum(f(w, gain) * g), argnums=(0, 1))(
      jnp.asarray(w), jnp.asarray(gain))
  np.testing.assert_allclose(np.asarray(y, np.float64), y_ref,
                             atol=2e-6 * np.abs(y_ref).max(), rtol=0)
  np.testing.assert_allclose(np.asarray(dw, np.float64), dw_ref,
                             atol=2e-6 * np.abs(dw_ref).max(), rtol=0)
  np.testing.assert_allclose(np.asarray(dgain, np.float64), dgain_ref,
                             atol=2e-6 * np.abs(dgain_ref).max(), rtol=0)
