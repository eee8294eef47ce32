"""Tests of DyT (Zhu et al. 2025): `jaxnorm.dyt`, `jaxnorm.linen.DyT`, `jaxnorm.nnx.DyT`."""

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

import jaxnorm
import jaxnorm.linen as jl
import jaxnorm.nnx as jn


def _params(shape, alpha=0.7):
  k1, k2 = jax.random.split(jax.random.key(1))
  return {"alpha": jnp.asarray(alpha, jnp.float32),
          "scale": 1.0 + 0.5 * random_data.normal(k1, shape),
          "bias": random_data.normal(k2, shape)}


def _x(shape, seed=0):
  return 2.0 * random_data.normal(jax.random.key(seed), shape)


def test_init():
  p = jaxnorm.dyt_init((2, 3), alpha=0.25, use_bias=False)
  chex.assert_trees_all_equal(p, {"alpha": jnp.asarray(0.25), "scale": jnp.ones((2, 3))})
  assert float(jaxnorm.dyt_init(4)["alpha"]) == 0.5


@pytest.mark.parametrize("shape,axis", [((4, 5), -1), ((2, 5, 3), 1), ((2, 3, 5), (1, 2))])
def test_matches_reference(run, shape, axis):
  x = _x(shape)
  axes = (axis,) if isinstance(axis, int) else axis
  fshape = tuple(shape[a] for a in axes)
  p = _params(fshape)
  y = run(jaxnorm.dyt, p, x, axis=axis)
  bshape = tuple(shape[a] if a in [b % len(shape) for b in axes] else 1
                 for a in range(len(shape)))
  y_ref = rm.dyt(x, p["alpha"], np.reshape(p["scale"], bshape), np.reshape(p["bias"], bshape))
  chex.assert_shape(y, shape)
  chex.assert_trees_all_close(y, y_ref, atol=1e-6, rtol=1e-6)


def test_gradients_match_float64_reference():
  x = _x((3, 4))
  p = _params((4,))
  g = random_data.normal(jax.random.key(5), (3, 4))
  grads = jax.grad(lambda p, x: jnp.sum(jaxnorm.dyt(p, x) * g), argnums=(0, 1))(p, x)
  ref = rm.numeric_grad(lambda a, s, b, x: np.sum(rm.dyt(x, a, s, b) * rm.f64(g)),
                        p["alpha"], p["scale"], p["bias"], x)
  chex.assert_trees_all_close(
      (grads[0]["alpha"], grads[0]["scale"], grads[0]["bias"], grads[1]), tuple(ref),
      atol=1e-4, rtol=1e-4)


def test_missing_terms_and_dtypes():
  x = _x((2, 3)).astype(jnp.bfloat16)
  y = jaxnorm.dyt({"alpha": jnp.asarray(1.0)}, x)
  assert y.dtype == jnp.bfloat16   # alpha does not promote the output
  chex.assert_trees_all_close(y, rm.dyt(x, 1.0), atol=1e-2)
  assert jaxnorm.dyt(jaxnorm.dyt_init(3), x).dtype == jnp.float32   # Flax's rule
  assert jaxnorm.dyt(jaxnorm.dyt_init(3), x, dtype=jnp.float16).dtype == jnp.float16


def test_vmap_is_elementwise():
  x = _x((5, 2, 3))
  p = _params((3,))
  chex.assert_trees_all_close(jax.vmap(lambda v: jaxnorm.dyt(p, v))(x), jaxnorm.dyt(p, x))


@pytest.mark.parametrize("call,err,msg", [
    (lambda: jaxnorm.dyt({"scale": jnp.ones(3)}, jnp.ones((2, 3))), ValueError,
     "`params` must be a dict with an 'alpha' entry (build it with `dyt_init`), "
     "got {'scale': Array([1., 1., 1.], dtype=float32)}."),
    (lambda: jaxnorm.dyt({"alpha": jnp.ones(2)}, jnp.ones((2, 3))), ValueError,
     "`params['alpha']` must be a scalar, got shape (2,)."),
    (lambda: jaxnorm.dyt(jaxnorm.dyt_init(4), jnp.ones((2, 3))), ValueError,
     "`x` has features of shape (3,) along axis -1 but `params['scale']` has shape "
     "(4,); pass `axis=` to choose the feature axis."),
    (lambda: jaxnorm.dyt(jaxnorm.dyt_init(3), jnp.ones((2, 3), jnp.int32)), TypeError,
     "`x` must have a floating-point dtype, got int32; cast it first, for example "
     "`x.astype(jnp.float32)`."),
    (lambda: jaxnorm.dyt_init(3, alpha="big"), TypeError,
     "`alpha` must be a real number, got 'big'."),
])
def test_bad_input(call, err, msg):
  with pytest.raises(err, match=re.escape(msg) + "$"):
    call()


def test_linen_module_is_a_layer_norm_drop_in():
  x = _x((2, 4, 3))
  model = jl.DyT(alpha_init_value=0.3)
  variables = model.init(jax.random.key(0), x)
  ln_vars = nn.LayerNorm().init(jax.random.key(0), x)
  # The same scale/bias names and shapes as LayerNorm, plus alpha.
  assert jax.tree.map(jnp.shape, variables["params"]) == {
      **jax.tree.map(jnp.shape, ln_vars["params"]), "alpha": ()}
  assert float(variables["params"]["alpha"]) == pytest.approx(0.3)
  p = _params((3,), alpha=0.3)
  y = model.apply({"params": p}, x)
  chex.assert_trees_all_close(y, rm.dyt(x, p["alpha"], p["scale"], p["bias"]), atol=1e-6)
  y16 = jl.DyT(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16).init_with_output(
      jax.random.key(0), x)[0]
  assert y16.dtype == jnp.bfloat16


def test_nnx_module():
  x = _x((2, 4, 3))
  m = jn.DyT(3, rngs=nnx.Rngs(0))
  assert float(m.alpha[...]) == 0.5
  p = _params((3,), alpha=0.9)
  m.alpha[...], m.scale[...], m.bias[...] = p["alpha"], p["scale"], p["bias"]
  y = nnx.jit(lambda m, x: m(x))(m, x)
  chex.assert_trees_all_close(y, rm.dyt(x, p["alpha"], p["scale"], p["bias"]), atol=1e-6)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
  assert set(grads) == {"alpha", "scale", "bias"}
  assert jn.DyT(3, use_bias=False, rngs=nnx.Rngs(0)).bias is None
