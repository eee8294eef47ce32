"""Tests of filter response normalization + TLU (Singh & Krishnan 2020)."""

import re

import chex
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

C = 3


def _params(*, learn_eps=False):
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  p = {"scale": 1.0 + 0.5 * random_data.normal(k1, (C,)),
       "bias": random_data.normal(k2, (C,)),
       "tau": 0.3 * random_data.normal(k3, (C,))}
  if learn_eps:
    p["eps"] = jnp.asarray(-0.02)   # |eps| is used: a negative value is fine
  return p


def _x(shape, seed=0):
  return 0.5 + 2.0 * random_data.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("shape", [(2, 4, 4, C), (3, 5, C)])
@pytest.mark.parametrize("learn_eps", [False, True])
def test_matches_reference(run, shape, learn_eps):
  x = _x(shape)
  p = _params(learn_eps=learn_eps)
  z = run(jaxnorm.frn, p, x, eps=1e-6)
  eps = 1e-6 + (0.02 if learn_eps else 0.0)
  chex.assert_trees_all_close(z, rm.frn(x, p["scale"], p["bias"], p["tau"], eps=eps),
                              atol=1e-5, rtol=1e-5)


def test_dense_input_uses_each_value_alone():
  # With no spatial axes nu2 = x**2 (the paper's N = 1 case): the learned eps matters.
  x = _x((4, C))
  p = _params(learn_eps=True)
  chex.assert_trees_all_close(jaxnorm.frn(p, x),
                              rm.frn(x, p["scale"], p["bias"], p["tau"], eps=1e-6 + 0.02),
                              atol=1e-5)


def test_no_tlu_no_affine():
  x = _x((2, 3, C))
  chex.assert_trees_all_close(jaxnorm.frn({}, x), rm.frn(x), atol=1e-5)
  p = jaxnorm.frn_init(C, use_tlu=False)
  assert sorted(p) == ["bias", "scale"]
  assert float(jaxnorm.frn_init(C, learn_eps=True, eps_init=1e-3)["eps"]) == pytest.approx(1e-3)


def test_invariant_to_the_scale_of_each_example_and_channel():
  # FRN normalizes by each filter response's own RMS (Section 3): a positive
  # rescale per example and channel leaves the output unchanged (up to eps).
  x = _x((2, 4, 4, C))
  p = _params()
  c = jnp.array([10.0, 0.5])[:, None, None, None] * jnp.array([1.0, 100.0, 3.0])
  chex.assert_trees_all_close(jaxnorm.frn(p, c * x, eps=1e-10), jaxnorm.frn(p, x, eps=1e-10),
                              atol=1e-5)


def test_gradients_match_float64_reference():
  x = _x((2, 3, C))
  p = _params(learn_eps=True)
  g = random_data.normal(jax.random.key(3), x.shape)
  loss = lambda p, x: jnp.sum(jaxnorm.frn(p, x) * g)
  grads = jax.grad(loss, argnums=(0, 1))(p, x)

  def loss_ref(s, b, t, e, x):
    return np.sum(rm.frn(x, s, b, t, eps=1e-6 + abs(e)) * rm.f64(g))

  ref = rm.numeric_grad(loss_ref, p["scale"], p["bias"], p["tau"], p["eps"], x)
  ours = (grads[0]["scale"], grads[0]["bias"], grads[0]["tau"], grads[0]["eps"], grads[1])
  chex.assert_trees_all_close(ours, tuple(ref), atol=2e-4, rtol=2e-4)


def test_check_grads_float64():
  with jax.enable_x64(True):
    x = np.asarray(_x((2, 3, C)), np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), _params(learn_eps=True))
    p["tau"] = p["tau"] - 5.0   # away from the TLU's kink
    check_grads(jax.jit(jaxnorm.frn), (p, x), order=1, modes=["fwd", "rev"])


def test_mask_leaves_out_entries():
  x = _x((2, 5, C))
  mask = jnp.arange(5)[None, :, None] < 3
  p = _params()
  # NaN in the left-out entries reaches neither the statistics nor the kept outputs.
  z = jaxnorm.frn(p, jnp.where(mask, x, jnp.nan), mask=mask)
  chex.assert_trees_all_close(z[:, :3], rm.frn(x[:, :3], p["scale"], p["bias"], p["tau"]),
                              atol=1e-5)
  # Gradients of the kept outputs are those of the kept entries alone, NaN elsewhere.
  x_bad = jnp.where(mask, x, jnp.nan)
  gw = random_data.normal(jax.random.key(4), x.shape)
  g = jax.grad(lambda x: jnp.sum(jnp.where(mask, jaxnorm.frn(p, x, mask=mask) * gw, 0.0)))(x_bad)
  g_ref = jax.grad(lambda x: jnp.sum(jaxnorm.frn(p, x) * gw[:, :3]))(x[:, :3])
  chex.assert_trees_all_close(g[:, :3], g_ref, atol=1e-5)
  chex.assert_trees_all_equal(g[:, 3:], jnp.zeros_like(g[:, 3:]))


def test_vmap_and_dtype():
  x = _x((4, 3, C))
  p = _params()
  chex.assert_trees_all_close(jax.vmap(lambda v: jaxnorm.frn(p, v[None])[0])(x),
                              jaxnorm.frn(p, x), atol=1e-6)
  assert jaxnorm.frn(p, x.astype(jnp.bfloat16)).dtype == jnp.float32
  p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
  assert jaxnorm.frn(p16, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("call,err,msg", [
    (lambda x: jaxnorm.frn(jaxnorm.frn_init(4), x), ValueError,
     "`params['scale']` must have shape (3,), one value per channel of `x` (its last "
     "axis), got (4,)."),
    (lambda x: jaxnorm.frn({"eps": jnp.ones(3)}, x), ValueError,
     "`params['eps']` (the learned epsilon) must be a scalar, got shape (3,)."),
    (lambda x: jaxnorm.frn({"gamma": jnp.ones(3)}, x), ValueError,
     "`params` has unexpected keys ['gamma']; expected keys among ['bias', 'eps', "
     "'scale', 'tau'] (a missing key turns that term off)."),
    (lambda x: jaxnorm.frn({}, x[0, 0]), ValueError,
     "`x` must have at least 2 dimensions (batch first, channels last), got shape "
     "(3,) with 1."),
    (lambda x: jaxnorm.frn({}, x, eps=0.0), ValueError, "`eps` must be > 0, got 0.0."),
])
def test_bad_input(call, err, msg):
  with pytest.raises(err, match=re.escape(msg) + "$"):
    call(_x((2, 4, C)))


def test_linen_module():
  x = _x((2, 4, 4, C))
  m = jl.FilterResponseNorm(learn_epsilon=True)
  vs = m.init(jax.random.key(0), x)
  chex.assert_trees_all_equal(vs["params"], jaxnorm.frn_init(C, learn_eps=True))
  p = _params(learn_eps=True)
  chex.assert_trees_all_close(jax.jit(m.apply)({"params": p}, x),
                              rm.frn(x, p["scale"], p["bias"], p["tau"], eps=1e-6 + 0.02),
                              atol=1e-5)
  assert sorted(jl.FilterResponseNorm(use_tlu=False).init(
      jax.random.key(0), x)["params"]) == ["bias", "scale"]


def test_nnx_module():
  x = _x((2, 4, 4, C))
  m = jn.FilterResponseNorm(C, learn_epsilon=True, rngs=nnx.Rngs(0))
  p = _params(learn_eps=True)
  for k, v in p.items():
    getattr(m, k)[...] = v
  chex.assert_trees_all_close(nnx.jit(lambda m, x: m(x))(m, x),
                              rm.frn(x, p["scale"], p["bias"], p["tau"], eps=1e-6 + 0.02),
                              atol=1e-5)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
  assert set(grads) == {"scale", "bias", "tau", "eps"}
  assert jn.FilterResponseNorm(C, use_tlu=False, rngs=nnx.Rngs(0)).tau is None
