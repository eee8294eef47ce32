"""Tests of `jaxnorm.layer_norm` (Ba et al. 2016) and `jaxnorm.rms_norm` (Zhang & Sennrich 2019)."""

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


def _params(key, shape, *, rms=False):
  k1, k2 = jax.random.split(key)
  params = {"scale": 1.0 + 0.5 * random_data.normal(k1, shape)}
  if not rms:
    params["bias"] = random_data.normal(k2, shape)
  return params


def _x(shape, seed=0, offset=2.0):
  return offset + 3.0 * random_data.normal(jax.random.key(seed), shape)


# (shape, axis): 2D (N, C), 4D channels last, 4D channels at axis 1 (NCHW), and
# several axes at once (the (H, W, C) of each example).
LAYOUTS = [((4, 6), -1), ((2, 3, 2, 6), -1), ((2, 6, 3, 2), 1), ((2, 3, 2, 6), (1, 2, 3))]


def _axes(axis):
  return (axis,) if isinstance(axis, int) else axis


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_layer_norm_matches_reference(run, shape, axis):
  x = _x(shape)
  fshape = tuple(shape[a] for a in _axes(axis))
  params = _params(jax.random.key(1), fshape)
  y = run(jaxnorm.layer_norm, params, x, axis=axis, eps=1e-6)
  chex.assert_shape(y, shape)
  assert y.dtype == jnp.float32
  y_ref = ref.layer_norm(x, params["scale"], params["bias"], axes=_axes(axis), eps=1e-6)
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_rms_norm_matches_reference(run, shape, axis):
  x = _x(shape)
  fshape = tuple(shape[a] for a in _axes(axis))
  params = _params(jax.random.key(1), fshape, rms=True)
  y = run(jaxnorm.rms_norm, params, x, axis=axis, eps=1e-6)
  chex.assert_shape(y, shape)
  y_ref = ref.rms_norm(x, params["scale"], axes=_axes(axis), eps=1e-6)
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_rms_norm_does_not_center():
  # RMS norm of x + c is not RMS norm of x (unlike layer norm): no mean is taken.
  x = _x((3, 5), offset=0.0)
  params = jaxnorm.rms_norm_init(5)
  y = jaxnorm.rms_norm(params, x + 4.0)
  chex.assert_trees_all_close(y, ref.rms_norm(x + 4.0), atol=1e-5)
  assert np.max(np.abs(np.asarray(y) - ref.layer_norm(x + 4.0))) > 0.1


def test_feature_axes_differ_from_reduction_axes():
  # As flax.linen.LayerNorm(reduction_axes=(1, 2), feature_axes=-1).
  x = _x((2, 3, 4))
  params = _params(jax.random.key(1), (4,))
  y = jaxnorm.layer_norm(params, x, axis=(1, 2), feature_axes=-1)
  y_ref = ref.layer_norm(x, axes=(1, 2)) * ref.f64(params["scale"]) + ref.f64(params["bias"])
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_init_and_missing_keys(run):
  params = jaxnorm.layer_norm_init((3, 4), use_bias=False)
  chex.assert_trees_all_equal(params, {"scale": jnp.ones((3, 4))})
  chex.assert_trees_all_equal(jaxnorm.rms_norm_init(4, dtype=jnp.bfloat16),
                              {"scale": jnp.ones(4, jnp.bfloat16)})
  x = _x((2, 4))
  y = run(jaxnorm.layer_norm, {}, x)
  chex.assert_trees_all_close(y, ref.layer_norm(x), atol=1e-5)
  y = run(jaxnorm.layer_norm, {"bias": jnp.arange(4.0)}, x)
  chex.assert_trees_all_close(y, ref.layer_norm(x, bias=np.arange(4.0)), atol=1e-5)


# Gradients.


# First order here; second order, with a mask, in test_normalize.py (it costs
# five times the compiles, so once per layer family).
@pytest.mark.parametrize("fn,shape,axis", [("layer_norm", (3, 4), -1),
                                           ("layer_norm", (2, 3, 2, 2), 1),
                                           ("rms_norm", (2, 3, 2, 2), 1)])
def test_check_grads(fn, shape, axis):
  with jax.enable_x64(True):
    x = _x(shape).astype(jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          _params(jax.random.key(1), (shape[axis],), rms=fn == "rms_norm"))
    f = jax.jit(lambda x, p: getattr(jaxnorm, fn)(p, x, axis=axis))
    check_grads(f, (x, params), order=1, modes=["fwd", "rev"])


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
def test_constant_input_gives_finite_values_and_gradients(run, fn):
  x = jnp.full((3, 4), 5.0)
  params = {"scale": jnp.ones(4)} if fn == "rms_norm" else jaxnorm.layer_norm_init(4)
  loss = lambda x, p: jnp.sum(getattr(jaxnorm, fn)(p, x) ** 2)
  value, grads = run(jax.value_and_grad(loss, argnums=(0, 1)), x, params)
  chex.assert_tree_all_finite((value, grads))
  if fn == "layer_norm":
    chex.assert_trees_all_close(jaxnorm.layer_norm(params, x), jnp.zeros((3, 4)))
  zero = jnp.zeros((3, 4))
  chex.assert_tree_all_finite(jax.grad(loss, argnums=(0, 1))(zero, params))


# Transformations.


def test_vmap_over_independent_models():
  models = 3
  x = _x((models, 4, 5))
  params = jax.vmap(lambda k: _params(k, (5,)))(jax.random.split(jax.random.key(2), models))
  ys = jax.jit(jax.vmap(lambda p, x: jaxnorm.layer_norm(p, x)))(params, x)
  for i in range(models):
    chex.assert_trees_all_close(
        ys[i], ref.layer_norm(x[i], params["scale"][i], params["bias"][i]),
        atol=1e-5, rtol=1e-5)


def test_scan_and_no_retracing():
  params = _params(jax.random.key(1), (4,))
  xs = _x((5, 3, 4))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(carry, x):
    y = jaxnorm.layer_norm(params, x + carry)
    return jnp.mean(y), y

  _, ys = lax.scan(step, jnp.float32(0.0), xs)
  carry = jnp.float32(0.0)
  for t in range(5):
    y_ref = ref.layer_norm(xs[t] + carry, params["scale"], params["bias"])
    carry, y = step(carry, xs[t])
    chex.assert_trees_all_close(ys[t], y_ref, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)


# Masks.


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
def test_mask_statistics_are_those_of_selected_entries(run, fn):
  x = _x((4, 6))
  mask = jnp.asarray(np.array([[1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 1, 1],
                               [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]], bool))
  y = run(getattr(jaxnorm, fn), {}, x, mask=mask)
  for i in range(4):
    sel = np.asarray(mask[i])
    xi = ref.f64(x[i])
    if fn == "layer_norm":
      mu, var = xi[sel].mean(), xi[sel].var()
      expected = (xi - mu) / np.sqrt(var + 1e-6)
    else:
      expected = xi / np.sqrt((xi[sel] ** 2).mean() + 1e-6)
    chex.assert_trees_all_close(y[i], expected, atol=1e-5, rtol=1e-5)
    # And on the selected entries, it is the layer applied to those entries alone.
    alone = getattr(jaxnorm, fn)({}, x[i][sel])
    chex.assert_trees_all_close(y[i][sel], alone, atol=1e-5, rtol=1e-5)


# Numerics and dtypes.


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_offset_float32(offset):
  x = (offset + random_data.normal(jax.random.key(0), (8, 64))).astype(jnp.float32)
  params = jaxnorm.layer_norm_init(64)
  y = jax.jit(lambda p, x: jaxnorm.layer_norm(p, x, eps=1e-6))(params, x)
  assert np.max(np.abs(np.asarray(y, np.float64) - ref.layer_norm(x, eps=1e-6))) <= 1e-4


def test_bfloat16_input_uses_float32_statistics():
  x = (100.0 + random_data.normal(jax.random.key(0), (4, 32))).astype(jnp.bfloat16)
  y = jaxnorm.layer_norm(jaxnorm.layer_norm_init(32, dtype=jnp.bfloat16), x)
  assert y.dtype == jnp.bfloat16
  # bf16 spacing at 100 is 0.5, so the upcast values are far from 100 + randn; the
  # reference on those same values must still be matched to bf16 output precision.
  chex.assert_trees_all_close(np.asarray(y, np.float64), ref.layer_norm(x), atol=2e-2)


@pytest.mark.parametrize("fn", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("x_dtype,param_dtype,dtype,expected", [
    (jnp.float16, jnp.float32, None, jnp.float32),
    (jnp.bfloat16, jnp.bfloat16, None, jnp.bfloat16),
    (jnp.float16, jnp.float32, jnp.float16, jnp.float16),
    (jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16),
])
def test_output_dtype(fn, x_dtype, param_dtype, dtype, expected):
  init = jaxnorm.rms_norm_init if fn == "rms_norm" else jaxnorm.layer_norm_init
  x = random_data.normal(jax.random.key(0), (2, 4)).astype(x_dtype)
  y = getattr(jaxnorm, fn)(init(4, dtype=param_dtype), x, dtype=dtype)
  assert y.dtype == expected


def test_complex_layer_norm():
  k1, k2 = jax.random.split(jax.random.key(0))
  x = random_data.normal(k1, (3, 8)) + 1j * random_data.normal(k2, (3, 8)) + (2 - 1j)
  y = jaxnorm.layer_norm({}, x)
  mu, var = ref.mean_var(x, -1)
  expected = (ref.f64(x) - mu[:, None]) / np.sqrt(var[:, None] + 1e-6)
  chex.assert_trees_all_close(y, expected, atol=1e-5)


# Zero-centered scale (Gemma's RMSNorm, Transformer Engine's zero_centered_gamma):
# the stored scale s starts at 0 and is applied as 1 + s.

@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_zero_centered_scale_is_the_plain_form_after_adding_one(run, kind):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((4, 6)) * 3 + 5, jnp.float32)
  s = jnp.asarray(rng.standard_normal(6), jnp.float32)
  if kind == "layer":
    init = jaxnorm.layer_norm_init(6, zero_centered_scale=True)
    assert not np.any(np.asarray(init["scale"])) and not np.any(np.asarray(init["bias"]))
    y = run(lambda p, x: jaxnorm.layer_norm(p, x, zero_centered_scale=True),
            {"scale": s, "bias": init["bias"]}, x)
    want = ref.layer_norm(x, 1.0 + ref.f64(s), None)
  else:
    init = jaxnorm.rms_norm_init(6, zero_centered_scale=True)
    assert not np.any(np.asarray(init["scale"]))
    y = run(lambda p, x: jaxnorm.rms_norm(p, x, zero_centered_scale=True), {"scale": s}, x)
    want = ref.rms_norm(x, 1.0 + ref.f64(s))
  np.testing.assert_allclose(np.asarray(y), want, atol=2e-5)
  g = jax.grad(lambda s: jnp.sum(jaxnorm.layer_norm({"scale": s}, x, zero_centered_scale=True)))(s)
  np.testing.assert_allclose(np.asarray(g), ref.layer_norm(x).sum(0), atol=1e-4)


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_zero_centered_modules_equal_flax_with_one_added(kind):
  import flax.linen as nn
  from flax import nnx

  import jaxnorm.linen as jl
  import jaxnorm.nnx as jn
  x = random_data.normal(jax.random.key(0), (3, 5)) * 2 + 1
  ours = getattr(jl, kind)(zero_centered_scale=True)
  v = ours.init(jax.random.key(1), x)
  assert not np.any(np.asarray(v["params"]["scale"]))
  s = random_data.normal(jax.random.key(2), (5,))
  v = {"params": {**v["params"], "scale": s}}
  theirs = getattr(nn, kind)()
  want = theirs.apply({"params": {**v["params"], "scale": 1.0 + s}}, x)
  np.testing.assert_allclose(np.asarray(ours.apply(v, x)), np.asarray(want), atol=1e-6)
  m = getattr(jn, kind)(5, zero_centered_scale=True, rngs=nnx.Rngs(0))
  assert not np.any(np.asarray(m.scale[...]))
  m.scale[...] = s
  np.testing.assert_allclose(np.asarray(m(x)), np.asarray(want), atol=1e-6)


# Forward passes: rows whose mean^2 <= var take plain sums, the others sums in
# a frame from the data (moments._plain_or_shifted); every row of a call takes
# the same. The derivative's program always takes a frame from the data.
@pytest.mark.parametrize("ratio", [0.0, 0.99, 1.01, 1e3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_and_input_gradient_exact_on_both_sides_of_the_plain_sums_threshold(ratio, dtype):
  rng = np.random.default_rng(3)
  z = rng.standard_normal((6, 256))
  z = (z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True)
  x = jnp.asarray(((ratio + z) * np.array([[1e-2], [1], [3], [10], [1e2], [1e3]])), dtype)
  params = _params(jax.random.key(1), (256,))
  dy = jnp.asarray(rng.standard_normal((6, 256)), dtype)
  f = lambda x: jaxnorm.layer_norm(params, x)
  y = jax.jit(f)(x)
  y_vjp, vjp = jax.vjp(f, x)
  (dx,) = jax.jit(vjp)(dy.astype(y.dtype))
  x64, dy64 = ref.f64(x), ref.f64(dy)
  y64 = ref.layer_norm(x64, params["scale"], params["bias"])
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for out in (y, y_vjp):
    np.testing.assert_allclose(np.asarray(out, np.float64), y64, atol=tol * 10, rtol=tol)
  # d/dx of (x - mu) rstd: rstd (g - <g> - xhat <g xhat>), g = scale * dy.
  mu = x64.mean(1, keepdims=True)
  rstd = 1 / np.sqrt(x64.var(1, keepdims=True) + 1e-6)
  xhat = (x64 - mu) * rstd
  g = dy64 * ref.f64(params["scale"])
  dx64 = rstd * (g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True))
  np.testing.assert_allclose(np.asarray(dx, np.float64), dx64,
                             atol=tol * 10 * np.abs(dx64).max(), rtol=tol)
