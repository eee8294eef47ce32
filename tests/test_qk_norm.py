"""Tests of QK-norm (Dehghani et al. 2023): `jaxnorm.qk_norm` and the QKNorm modules."""

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

B, LQ, LK, H, D = 2, 3, 5, 2, 4


def _qk(seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = 1.5 + 3.0 * random_data.normal(kq, (B, LQ, H, D))
  k = -2.0 + 10.0 * random_data.normal(kk, (B, LK, H, D))
  v = random_data.normal(kv, (B, LK, H, D))
  return q, k, v


def _params():
  k1, k2 = jax.random.split(jax.random.key(7))
  return {"query_norm": {"scale": 1.0 + 0.3 * random_data.normal(k1, (D,))},
          "key_norm": {"scale": 1.0 + 0.3 * random_data.normal(k2, (D,))}}


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_matches_reference(run, kind):
  q, k, _ = _qk()
  p = _params()
  qn, kn = run(jaxnorm.qk_norm, p, q, k, kind=kind)
  rq, rk = rm.qk_norm(q, k, p["query_norm"]["scale"], p["key_norm"]["scale"], kind=kind)
  chex.assert_trees_all_close((qn, kn), (rq, rk), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_inside_dot_product_attention(kind):
  # QK-norm then softmax(q k^T / sqrt(D)) v, against the float64 formula.
  q, k, v = _qk()
  p = _params()

  @jax.jit
  def attend(p, q, k, v):
    qn, kn = jaxnorm.qk_norm(p, q, k, kind=kind)
    return nnx.dot_product_attention(qn, kn, v)

  out = attend(p, q, k, v)
  rq, rk = rm.qk_norm(q, k, p["query_norm"]["scale"], p["key_norm"]["scale"], kind=kind)
  chex.assert_trees_all_close(out, rm.attention(rq, rk, v), atol=1e-5, rtol=1e-5)


def test_gradients_match_float64_reference():
  q, k, v = _qk()
  q, k, v = q[:1, :2], k[:1, :2], v[:1, :2]
  p = _params()

  def loss(sq, sk, q, k):
    qn, kn = jaxnorm.qk_norm({"query_norm": {"scale": sq}, "key_norm": {"scale": sk}},
                             q, k, kind="layer")
    return jnp.sum(jax.nn.dot_product_attention(qn, kn, v) ** 2)

  def loss_ref(sq, sk, q, k):
    qn, kn = rm.qk_norm(q, k, sq, sk, kind="layer")
    return np.sum(rm.attention(qn, kn, v) ** 2)

  args = (p["query_norm"]["scale"], p["key_norm"]["scale"], q, k)
  grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
  chex.assert_trees_all_close(grads, tuple(rm.numeric_grad(loss_ref, *args)),
                              atol=2e-4, rtol=2e-4)


def test_logits_stay_bounded():
  # The point of QK-norm: scaling q and k up leaves the attention unchanged.
  q, k, v = _qk()
  p = jaxnorm.qk_norm_init(D)
  a = jax.nn.dot_product_attention(*jaxnorm.qk_norm(p, q, k), v)
  b = jax.nn.dot_product_attention(*jaxnorm.qk_norm(p, 1e3 * q, 1e3 * k), v)
  chex.assert_trees_all_close(a, b, atol=1e-5)


def test_vmap_over_heads():
  q, k, _ = _qk()
  p = _params()
  f = lambda q, k: jaxnorm.qk_norm(p, q, k)
  chex.assert_trees_all_close(jax.vmap(f, in_axes=2, out_axes=2)(q, k), f(q, k))


def test_init_none_and_dtype():
  chex.assert_trees_all_equal(jaxnorm.qk_norm_init(3, dtype=jnp.bfloat16),
                              {"query_norm": {"scale": jnp.ones(3, jnp.bfloat16)},
                               "key_norm": {"scale": jnp.ones(3, jnp.bfloat16)}})
  q, k, _ = _qk()
  qn, kn = jaxnorm.qk_norm(None, q.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
  assert qn.dtype == kn.dtype == jnp.bfloat16
  chex.assert_trees_all_close((qn, kn), rm.qk_norm(q, k), atol=3e-2)


@pytest.mark.parametrize("call,err,msg", [
    (lambda q, k: jaxnorm.qk_norm(None, q, k, kind="batch"), ValueError,
     "`kind` must be 'rms' or 'layer', got 'batch'."),
    (lambda q, k: jaxnorm.qk_norm(None, q, k[..., :3]), ValueError,
     "`query` and `key` must have the same head_dim (last axis), got 4 and 3."),
    (lambda q, k: jaxnorm.qk_norm({"query": {}}, q, k), ValueError,
     "`params` has unexpected keys ['query']; expected keys among ['key_norm', "
     "'query_norm'] (build it with `qk_norm_init`)."),
    (lambda q, k: jaxnorm.qk_norm(jaxnorm.qk_norm_init(8), q, k), ValueError,
     "`params['query_norm']['scale']` must have shape (4,), the head_dim of `query` "
     "and `key`, got (8,)."),
    (lambda q, k: jaxnorm.qk_norm(None, q.astype(jnp.int32), k), TypeError,
     "`query` must have a floating-point dtype, got int32; cast it first, for "
     "example `query.astype(jnp.float32)`."),
    (lambda q, k: jaxnorm.qk_norm_init(0), ValueError,
     "`head_dim` must be a positive int, got 0."),
])
def test_bad_input(call, err, msg):
  q, k, _ = _qk()
  with pytest.raises(err, match=re.escape(msg) + "$"):
    call(q, k)


def test_linen_qk_norm_module():
  q, k, _ = _qk()
  m = jl.QKNorm(kind="layer")
  vs = m.init(jax.random.key(0), q, k)
  chex.assert_trees_all_equal(vs["params"], jaxnorm.qk_norm_init(D))
  p = _params()
  out = m.apply({"params": p}, q, k)
  chex.assert_trees_all_close(
      out, rm.qk_norm(q, k, p["query_norm"]["scale"], p["key_norm"]["scale"], kind="layer"),
      atol=1e-5)


def test_linen_multi_head_attention_with_qk_norm_attention():
  # Used as attention_fn, the layer-norm kind reproduces Flax's own normalize_qk=True.
  x = random_data.normal(jax.random.key(0), (2, 3, 8))
  ours = nn.MultiHeadDotProductAttention(
      num_heads=2, qkv_features=8,
      attention_fn=jl.QKNormAttention(kind="layer", epsilon=1e-6))
  flax_qk = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, normalize_qk=True)
  vs = ours.init(jax.random.key(1), x)
  fvs = flax_qk.init(jax.random.key(1), x)
  scales = vs["params"]["attention_fn"]
  assert jax.tree.map(jnp.shape, scales) == {"query_norm": {"scale": (4,)},
                                             "key_norm": {"scale": (4,)}}
  # Same projections; move a non-trivial scale into both.
  sq = 1.0 + 0.2 * jnp.arange(4.0)
  params = dict(vs["params"])
  params["attention_fn"] = {"query_norm": {"scale": sq}, "key_norm": {"scale": sq[::-1]}}
  fparams = {k: v for k, v in params.items() if k != "attention_fn"}
  fparams["query_ln"] = {"scale": sq}
  fparams["key_ln"] = {"scale": sq[::-1]}
  chex.assert_trees_all_equal_shapes(fparams, dict(fvs["params"]))
  chex.assert_trees_all_close(ours.apply({"params": params}, x),
                              flax_qk.apply({"params": fparams}, x), atol=1e-5)


def test_nnx_qk_norm_and_multi_head_attention():
  q, k, _ = _qk()
  m = jn.QKNorm(D, kind="rms", rngs=nnx.Rngs(0))
  p = _params()
  m.query_norm.scale[...] = p["query_norm"]["scale"]
  m.key_norm.scale[...] = p["key_norm"]["scale"]
  out = nnx.jit(lambda m, q, k: m(q, k))(m, q, k)
  chex.assert_trees_all_close(
      out, rm.qk_norm(q, k, p["query_norm"]["scale"], p["key_norm"]["scale"]), atol=1e-5)
  # As attention_fn of nnx.MultiHeadAttention, the layer kind matches normalize_qk=True.
  x = random_data.normal(jax.random.key(0), (2, 3, 8))
  ours = nnx.MultiHeadAttention(
      num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(1),
      attention_fn=jn.QKNormAttention(4, kind="layer", rngs=nnx.Rngs(2)))
  theirs = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
                                  normalize_qk=True, rngs=nnx.Rngs(1))
  for name in ("query", "key", "value", "out"):   # the same projections in both
    getattr(ours, name).kernel[...] = getattr(theirs, name).kernel[...]
    getattr(ours, name).bias[...] = getattr(theirs, name).bias[...]
  sq = 1.0 + 0.2 * jnp.arange(4.0)
  ours.attention_fn.query_norm.scale[...] = sq
  theirs.query_ln.scale[...] = sq
  chex.assert_trees_all_close(ours(x), theirs(x), atol=1e-5)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(ours)
  assert grads["attention_fn"]["query_norm"]["scale"].shape == (4,)
