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
