"""Tests of the conditional norms: FiLM, adaLN-Zero, class-conditional batch norm, AdaIN."""

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

import reference as ref

N, D, C = 3, 5, 4


def _x(shape, seed=0):
  return 1.0 + 2.0 * random_data.normal(jax.random.key(seed), shape)


def _proj(parts, seed=1):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"kernel": 0.3 * random_data.normal(k1, (D, parts * C)),
          "bias": 0.2 * random_data.normal(k2, (parts * C,))}


# -- FiLM ------------------------------------------------------------------------


@pytest.mark.parametrize("norm,shape", [("layer", (N, 6, C)), ("rms", (N, C)),
                                        ("group", (N, 3, 3, C)), ("instance", (N, 5, C)),
                                        (None, (N, 2, C))])
def test_film_matches_reference(run, norm, shape):
  x, cond, p = _x(shape), _x((N, D), seed=2), _proj(2)
  y = run(jaxnorm.film, p, x, cond, norm=norm, num_groups=2)
  chex.assert_trees_all_close(
      y, rm.film(x, cond, p["kernel"], p["bias"], norm=norm, num_groups=2), atol=1e-5, rtol=1e-5)


def test_film_per_token_condition_and_zero_init():
  x, cond, p = _x((N, 6, C)), _x((N, 6, D), seed=2), _proj(2)
  chex.assert_trees_all_close(jaxnorm.film(p, x, cond),
                              rm.film(x, cond, p["kernel"], p["bias"]), atol=1e-5)
  # The zero projection of film_init is the plain layer norm.
  chex.assert_trees_all_close(jaxnorm.film(jaxnorm.film_init(D, C), x, cond),
                              ref.layer_norm(x), atol=1e-5)


def test_film_gradients_match_float64_reference():
  x, cond, p = _x((2, 3, C)), _x((2, D), seed=2), _proj(2)
  g = random_data.normal(jax.random.key(9), x.shape)
  ours = jax.grad(lambda k, b, x, c: jnp.sum(
      jaxnorm.film({"kernel": k, "bias": b}, x, c) * g), argnums=(0, 1, 2, 3))(
          p["kernel"], p["bias"], x, cond)
  refs = rm.numeric_grad(lambda k, b, x, c: np.sum(rm.film(x, c, k, b) * rm.f64(g)),
                         p["kernel"], p["bias"], x, cond)
  chex.assert_trees_all_close(ours, tuple(refs), atol=2e-4, rtol=2e-4)


# -- adaLN-Zero -------------------------------------------------------------------


def test_adaln_zero_matches_reference(run):
  x, cond, p = _x((N, 6, C)), _x((N, D), seed=2), _proj(3)
  h, gate = run(jaxnorm.adaln_zero, p, x, cond)
  h_ref, gate_ref = rm.adaln_zero(x, cond, p["kernel"], p["bias"])
  chex.assert_trees_all_close((h, gate), (h_ref, gate_ref), atol=1e-5, rtol=1e-5)
  chex.assert_shape(gate, (N, 1, C))


def test_adaln_zero_block_starts_as_identity_and_still_learns():
  x, cond = _x((N, 6, C)), _x((N, D), seed=2)
  p = jaxnorm.adaln_zero_init(D, C)
  w = random_data.normal(jax.random.key(3), (C, C))

  def block(p, x):
    h, gate = jaxnorm.adaln_zero(p, x, cond)
    return x + gate * jnp.tanh(h @ w)

  chex.assert_trees_all_equal(block(p, x), x)
  # The gate's columns get a gradient at zero init (so training moves off the
  # identity); shift and scale do not until the gate is non-zero.
  g = jax.grad(lambda p: jnp.sum(block(p, x) ** 2))(p)["kernel"]
  assert np.abs(np.asarray(g[:, 2 * C:])).max() > 1e-3
  chex.assert_trees_all_equal(g[:, :2 * C], jnp.zeros((D, 2 * C)))


def test_adaln_zero_gradients_match_float64_reference():
  x, cond, p = _x((2, 3, C)), _x((2, D), seed=2), _proj(3)
  gh, gg = random_data.normal(jax.random.key(9), x.shape), random_data.normal(
      jax.random.key(8), (2, 1, C))

  def loss(k, b, x):
    h, gate = jaxnorm.adaln_zero({"kernel": k, "bias": b}, x, cond)
    return jnp.sum(h * gh) + jnp.sum(gate * gg)

  def loss_ref(k, b, x):
    h, gate = rm.adaln_zero(x, cond, k, b)
    return np.sum(h * rm.f64(gh)) + np.sum(gate * rm.f64(gg))

  ours = jax.grad(loss, argnums=(0, 1, 2))(p["kernel"], p["bias"], x)
  refs = rm.numeric_grad(loss_ref, p["kernel"], p["bias"], x)
  chex.assert_trees_all_close(ours, tuple(refs), atol=2e-4, rtol=2e-4)


# -- Class-conditional batch norm ---------------------------------------------------


def _cbn_params(k=3):
  k1, k2 = jax.random.split(jax.random.key(4))
  return {"scale": 1.0 + 0.3 * random_data.normal(k1, (k, C)),
          "bias": random_data.normal(k2, (k, C))}


def test_conditional_batch_norm_train_and_inference(run):
  x, labels = _x((6, 2, C)), jnp.array([0, 2, 1, 1, 0, 2])
  params = _cbn_params()
  _, state = jaxnorm.conditional_batch_norm_init(3, C)
  y, new = run(jaxnorm.conditional_batch_norm, params, state, x, labels, train=True,
               momentum=0.9)
  y_ref, mu, var = rm.conditional_batch_norm_train(x, labels, params["scale"], params["bias"])
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(
      (new["mean"], new["var"]),
      tuple(ref.running_average(state["mean"], state["var"], mu, var, 0.9)), atol=1e-6)
  y_inf, same = run(jaxnorm.conditional_batch_norm, params, new, x, labels, train=False)
  chex.assert_trees_all_equal(same, new)
  x_hat = ref.batch_norm_infer(x, new["mean"], new["var"])
  chex.assert_trees_all_close(
      y_inf, np.asarray(params["scale"])[labels][:, None] * x_hat
      + np.asarray(params["bias"])[labels][:, None], atol=1e-5)


def test_conditional_batch_norm_gradients_and_vmap():
  x, labels = _x((4, C)), jnp.array([0, 2, 1, 1])
  params = _cbn_params()
  _, state = jaxnorm.conditional_batch_norm_init(3, C)
  g = random_data.normal(jax.random.key(9), x.shape)
  loss = lambda s, b, x: jnp.sum(jaxnorm.conditional_batch_norm(
      {"scale": s, "bias": b}, state, x, labels, train=True)[0] * g)
  loss_ref = lambda s, b, x: np.sum(
      rm.conditional_batch_norm_train(x, labels, s, b)[0] * rm.f64(g))
  ours = jax.grad(loss, argnums=(0, 1, 2))(params["scale"], params["bias"], x)
  refs = rm.numeric_grad(loss_ref, params["scale"], params["bias"], x)
  chex.assert_trees_all_close(ours, tuple(refs), atol=2e-4, rtol=2e-4)
  # Each row of scale/bias only gets the gradient of its own class.
  assert float(jnp.abs(ours[1][0] - g[labels == 0].sum(0)).max()) < 1e-5
  # vmap over independent batches: each its own statistics.
  xs = _x((2, 4, C), seed=5)
  ys = jax.vmap(lambda x: jaxnorm.conditional_batch_norm(params, state, x, labels,
                                                         train=True)[0])(xs)
  chex.assert_trees_all_close(ys[1], rm.conditional_batch_norm_train(
      xs[1], labels, params["scale"], params["bias"])[0], atol=1e-5)


# -- AdaIN -----------------------------------------------------------------------------


@pytest.mark.parametrize("style_shape", [(N, 4, 4, C), (N, 2, 6, C)])
def test_adain_matches_reference(run, style_shape):
  content, style = _x((N, 4, 4, C)), 5.0 + 3.0 * _x(style_shape, seed=3)
  y = run(jaxnorm.adain, content, style)
  chex.assert_trees_all_close(y, rm.adain(content, style), atol=1e-5, rtol=1e-5)
  # The output has the style's statistics (up to eps).
  chex.assert_trees_all_close(y.mean((1, 2)), style.mean((1, 2)), atol=1e-4)


def test_adain_gradients_match_float64_reference():
  content, style = _x((1, 3, 2)), _x((1, 4, 2), seed=3)
  g = random_data.normal(jax.random.key(9), content.shape)
  ours = jax.grad(lambda c, s: jnp.sum(jaxnorm.adain(c, s) * g), argnums=(0, 1))(content, style)
  refs = rm.numeric_grad(lambda c, s: np.sum(rm.adain(c, s) * rm.f64(g)), content, style)
  chex.assert_trees_all_close(ours, tuple(refs), atol=2e-4, rtol=2e-4)


# -- Bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("call,err,msg", [
    (lambda: jaxnorm.film(_proj(2), _x((N, C)), _x((2, D))), ValueError,
     "`cond` must have shape x.shape[:k] + (cond_features,) for some k < 2, e.g. "
     "(3, D) per example; got (2, 5) for `x` of shape (3, 4)."),
    (lambda: jaxnorm.film(_proj(3), _x((N, C)), _x((N, D))), ValueError,
     "`params['kernel']` and `params['bias']` must have shapes (5, 8) and (8,) for "
     "`cond` with 5 features and 2 x 4 outputs, got (5, 12) and (12,)."),
    (lambda: jaxnorm.film({"w": 1}, _x((N, C)), _x((N, D))), ValueError,
     "`params` must be a dict with the keys 'kernel' and 'bias' (the projection of "
     "the condition), got {'w': 1}."),
    (lambda: jaxnorm.film(_proj(2), _x((N, C)), _x((N, D)), norm="batch"), ValueError,
     "`norm` must be one of 'layer', 'rms', 'group', 'instance' or None, got 'batch'."),
    (lambda: jaxnorm.adaln_zero(_proj(3), _x((N, C)), _x((N, D)), norm="group"), ValueError,
     "`norm` must be 'layer' or 'rms', got 'group'."),
    (lambda: jaxnorm.conditional_batch_norm(
        _cbn_params(), jaxnorm.conditional_batch_norm_init(3, C)[1], _x((N, C)),
        jnp.array([0.0, 1.0, 2.0]), train=True), TypeError,
     "`labels` must be an integer array of class indices, got dtype float32."),
    (lambda: jaxnorm.conditional_batch_norm(
        _cbn_params(), jaxnorm.conditional_batch_norm_init(3, C)[1], _x((N, C)),
        jnp.array([0, 1]), train=True), ValueError,
     "`labels` must have shape (3,), one class per example of `x`, got (2,)."),
    (lambda: jaxnorm.conditional_batch_norm(
        {"scale": jnp.ones((3, 5))}, jaxnorm.conditional_batch_norm_init(3, C)[1],
        _x((N, C)), jnp.array([0, 1, 2]), train=True), ValueError,
     "`params['scale']` must have shape (num_classes, 4), one row per class and one "
     "column per channel of `x` (its last axis), got (3, 5)."),
    (lambda: jaxnorm.adain(_x((N, 4, C)), _x((N, 4, C + 1))), ValueError,
     "`style` must have the rank, batch size (first axis) and channels (last axis) of "
     "`content`, (3, 4, 4), got (3, 4, 5)."),
    (lambda: jaxnorm.adain(_x((N, C)), _x((N, C))), ValueError,
     "`content` must have at least 3 dimensions (batch, at least one spatial axis, "
     "channels), got shape (3, 4) with 2."),
    (lambda: jaxnorm.conditional_batch_norm(
        {"scale": jnp.ones((3, C)), "bias": jnp.ones((2, C))},
        jaxnorm.conditional_batch_norm_init(3, C)[1], _x((N, C)), jnp.array([0, 1, 2]),
        train=True), ValueError,
     "`params['scale']` and `params['bias']` must have one row per class each, got 3 "
     "and 2 rows."),
])
def test_bad_input(call, err, msg):
  with pytest.raises(err, match=re.escape(msg) + "$"):
    call()


# -- Modules -------------------------------------------------------------------------------


def test_linen_modules():
  x, cond = _x((N, 6, C)), _x((N, D), seed=2)
  film = jl.FiLM()
  vs = film.init(jax.random.key(0), x, cond)
  chex.assert_trees_all_equal(vs["params"], jaxnorm.film_init(D, C))
  p = _proj(2)
  chex.assert_trees_all_close(film.apply({"params": p}, x, cond),
                              rm.film(x, cond, p["kernel"], p["bias"]), atol=1e-5)
  ada = jl.AdaLNZero()
  p3 = _proj(3)
  h, gate = jax.jit(ada.apply)({"params": p3}, x, cond)
  chex.assert_trees_all_close((h, gate), rm.adaln_zero(x, cond, p3["kernel"], p3["bias"]),
                              atol=1e-5)
  adain = jl.AdaIN()
  xs = _x((N, 4, C), seed=4)
  assert adain.init(jax.random.key(0), xs, x) == {}
  chex.assert_trees_all_close(adain.apply({}, xs, x), rm.adain(xs, x), atol=1e-5)


def test_linen_conditional_batch_norm_keeps_batch_norm_state():
  x, labels = _x((6, C)), jnp.array([0, 2, 1, 1, 0, 2])
  m = jl.ConditionalBatchNorm(num_classes=3, momentum=0.9)
  vs = m.init(jax.random.key(0), x, labels, use_running_average=False)
  bn_vs = jl.BatchNorm().init(jax.random.key(0), x, use_running_average=False)
  chex.assert_trees_all_equal(vs["batch_stats"], bn_vs["batch_stats"])   # init: no update
  assert jax.tree.map(jnp.shape, vs["params"]) == {"scale": (3, C), "bias": (3, C)}
  params = _cbn_params()
  y, upd = m.apply({"params": params, "batch_stats": vs["batch_stats"]}, x, labels,
                   use_running_average=False, mutable=["batch_stats"])
  y_ref, mu, _var = rm.conditional_batch_norm_train(x, labels, params["scale"], params["bias"])
  chex.assert_trees_all_close(y, y_ref, atol=1e-5)
  chex.assert_trees_all_close(upd["batch_stats"]["mean"], 0.1 * mu, atol=1e-6)


def test_nnx_modules():
  x, cond = _x((N, 6, C)), _x((N, D), seed=2)
  film = jn.FiLM(D, C, norm="rms", rngs=nnx.Rngs(0))
  p = _proj(2)
  film.kernel[...], film.bias[...] = p["kernel"], p["bias"]
  chex.assert_trees_all_close(nnx.jit(lambda m, x, c: m(x, c))(film, x, cond),
                              rm.film(x, cond, p["kernel"], p["bias"], norm="rms"), atol=1e-5)
  ada = jn.AdaLNZero(D, C, rngs=nnx.Rngs(0))
  chex.assert_trees_all_equal(ada.kernel[...], jnp.zeros((D, 3 * C)))
  grads = nnx.grad(lambda m: jnp.sum(m(x, cond)[1]))(ada)
  assert float(jnp.abs(grads["kernel"][...]).max()) > 0
  labels = jnp.array([0, 2, 1])
  cbn = jn.ConditionalBatchNorm(3, C, momentum=0.9, rngs=nnx.Rngs(0))
  params = _cbn_params()
  cbn.scale[...], cbn.bias[...] = params["scale"], params["bias"]
  y = cbn(x, labels)
  y_ref, mu, _ = rm.conditional_batch_norm_train(x, labels, params["scale"], params["bias"])
  chex.assert_trees_all_close(y, y_ref, atol=1e-5)
  chex.assert_trees_all_close(cbn.mean[...], 0.1 * mu, atol=1e-6)
  cbn.eval()
  before = cbn.mean[...]
  cbn(x, labels)
  chex.assert_trees_all_equal(cbn.mean[...], before)
  xs = _x((N, 4, C), seed=4)
  chex.assert_trees_all_close(jn.AdaIN()(xs, x), rm.adain(xs, x), atol=1e-5)


def test_linen_film_in_a_model_is_trainable():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x, c):
      return nn.Dense(1)(jl.FiLM(kernel_init=nn.initializers.lecun_normal())(x, c))

  x, cond = _x((N, C)), _x((N, D), seed=2)
  vs = Model().init(jax.random.key(0), x, cond)
  g = jax.grad(lambda v: jnp.sum(Model().apply(v, x, cond) ** 2))(vs)
  assert float(jnp.abs(g["params"]["FiLM_0"]["kernel"]).max()) > 0
