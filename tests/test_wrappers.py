"""Parity of the WeightNorm, SpectralNorm and Dropout modules with Flax's.

Same inputs, variables and keys; Flax's own modules are the reference
(jaxnorm/_src/linen_wrappers.py, jaxnorm/_src/nnx_wrappers.py).
"""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnorm.linen as jl
import jaxnorm.nnx as jn

X_DENSE = jax.random.normal(jax.random.key(10), (8, 5))
X_CONV = jax.random.normal(jax.random.key(11), (2, 5, 5, 3))


def _layers():
  return [
      (lambda: nn.Dense(4), X_DENSE),
      (lambda: nn.Conv(4, (3, 3)), X_CONV),
  ]


# ---------------------------------------------------------------- linen


@pytest.mark.parametrize("layer,kwargs", [
    (0, {}), (1, {}), (0, {"variable_filter": None}), (1, {"feature_axes": None}),
    (0, {"use_scale": False}),
])
def test_linen_weight_norm_parity(layer, kwargs):
  make, x = _layers()[layer]
  ours, theirs = jl.WeightNorm(make(), **kwargs), nn.WeightNorm(make(), **kwargs)
  v_ours = ours.init(jax.random.key(0), x)
  v_theirs = theirs.init(jax.random.key(0), x)
  chex.assert_trees_all_equal(v_ours, v_theirs)
  # Non-trivial scales so the scale is exercised.
  v = jax.tree.map(lambda a: a * 1.5 + 0.1, v_theirs)
  chex.assert_trees_all_close(ours.apply(v, x), theirs.apply(v, x), rtol=1e-6,
                              atol=1e-6)
  grad = lambda m: jax.grad(lambda v: jnp.sum(m.apply(v, x) ** 2))(v)
  chex.assert_trees_all_close(grad(ours), grad(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,x", _layers())
def test_linen_weight_norm_data_init(make, x):
  module = jl.WeightNorm(make())
  variables = module.init(jax.random.key(0), x)
  new = jl.weight_norm_data_init(module, variables, x, eps=1e-12)
  y = np.asarray(module.apply(new, x), np.float64).reshape(-1, 4)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(0), 1.0, atol=1e-5)
  # The kernel (v) is unchanged; only the scale and the bias moved.
  chex.assert_trees_all_equal(new["params"]["layer_instance"]["kernel"],
                              variables["params"]["layer_instance"]["kernel"])


def test_linen_weight_norm_data_init_errors():
  module = jl.WeightNorm(nn.Dense(4, use_bias=False))
  variables = module.init(jax.random.key(0), X_DENSE)
  msg = ("`weight_norm_data_init` needs the wrapped layer 'layer_instance' to "
         "have a 'bias' (a Dense or Conv with use_bias=True); its variables are "
         "['kernel'].")
  with pytest.raises(ValueError, match=re.escape(msg)):
    jl.weight_norm_data_init(module, variables, X_DENSE)
  module = jl.WeightNorm(nn.Dense(4), variable_filter=None)
  variables = module.init(jax.random.key(0), X_DENSE)
  msg = ("`weight_norm_data_init` needs a WeightNorm that scales one kernel only, "
         "but `variables['params']` has the scales ['layer_instance/bias/scale', "
         "'layer_instance/kernel/scale'].")
  with pytest.raises(ValueError, match=re.escape(msg)):
    jl.weight_norm_data_init(module, variables, X_DENSE)


@pytest.mark.parametrize("make,x", _layers())
@pytest.mark.parametrize("n_steps", [1, 3])
def test_linen_spectral_norm_parity(make, x, n_steps):
  ours = jl.SpectralNorm(make(), n_steps=n_steps)
  theirs = nn.SpectralNorm(make(), n_steps=n_steps)
  v_ours = ours.init(jax.random.key(0), x, update_stats=True)
  v = theirs.init(jax.random.key(0), x, update_stats=True)
  chex.assert_trees_all_close(v_ours, v, rtol=1e-6, atol=0)
  for _ in range(3):  # training steps carry u and sigma along
    y_ours, s_ours = ours.apply(v, x, update_stats=True, mutable=["batch_stats"])
    y, s = theirs.apply(v, x, update_stats=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(y_ours, y, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(s_ours, s, rtol=1e-6, atol=1e-7)
    v = {**v, **s}
  # Evaluation: same output, nothing written.
  y_ours, s_ours = ours.apply(v, x, update_stats=False, mutable=["batch_stats"])
  y, _ = theirs.apply(v, x, update_stats=False, mutable=["batch_stats"])
  chex.assert_trees_all_close(y_ours, y, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_equal(s_ours["batch_stats"], v["batch_stats"])
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply(
      {**v, "params": p}, x, update_stats=False) ** 2))(v["params"])
  chex.assert_trees_all_close(grad(ours), grad(theirs), rtol=1e-5, atol=1e-5)


def test_linen_spectral_norm_error_on_non_matrix():
  module = jl.SpectralNorm(nn.Conv(4, (3, 3)), error_on_non_matrix=True)
  msg = ("Spectral normalization is defined on matrices but a variable of the "
         "layer has 4 dimensions (shape (3, 3, 3, 4)) and error_on_non_matrix is "
         "True; set error_on_non_matrix=False to flatten it to (-1, out).")
  with pytest.raises(ValueError, match=re.escape(msg)):
    module.init(jax.random.key(0), X_CONV, update_stats=True)


@pytest.mark.parametrize("rate,broadcast_dims", [
    (0.0, ()), (0.3, ()), (0.5, (1,)), (1.0, ()),
])
def test_linen_dropout_parity(rate, broadcast_dims):
  x = X_CONV
  kwargs = dict(rate=rate, broadcast_dims=broadcast_dims)
  rngs = {"dropout": jax.random.key(3)}
  y = nn.Dropout(**kwargs).apply({}, x, deterministic=False, rngs=rngs)
  y_ours = jl.Dropout(**kwargs).apply({}, x, deterministic=False, rngs=rngs)
  chex.assert_trees_all_equal(y_ours, y)
  y_ours = jax.jit(lambda x: jl.Dropout(**kwargs).apply(
      {}, x, deterministic=False, rngs=rngs))(x)
  chex.assert_trees_all_equal(y_ours, y)
  # An explicit rng and deterministic mode.
  y = nn.Dropout(**kwargs).apply({}, x, False, jax.random.key(4))
  chex.assert_trees_all_equal(
      jl.Dropout(**kwargs).apply({}, x, False, jax.random.key(4)), y)
  chex.assert_trees_all_equal(
      jl.Dropout(**kwargs, deterministic=True).apply({}, x), x)


def test_linen_dropout_rate_one_has_finite_zero_grads():
  grad = jax.grad(lambda x: jnp.sum(jl.Dropout(1.0).apply(
      {}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})))(X_DENSE)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(grad, 0.0)


def test_linen_dropout_bad_rate():
  msg = ("`rate` is the probability of dropping a unit and must be in [0, 1], "
         "got 1.5.")
  with pytest.raises(ValueError, match=re.escape(msg)):
    jl.Dropout(1.5).apply({}, X_DENSE, deterministic=False,
                          rngs={"dropout": jax.random.key(0)})


def test_linen_modules_under_vmap():
  """nn.vmap over a leading axis, with per-example dropout keys."""
  xs = jnp.stack([X_DENSE, 2 * X_DENSE])

  def apply(module_cls, x):
    return module_cls.apply({}, x, deterministic=False,
                            rngs={"dropout": jax.random.key(5)})

  ys = jax.vmap(lambda x: apply(jl.Dropout(0.5), x))(xs)
  ys_flax = jax.vmap(lambda x: apply(nn.Dropout(0.5), x))(xs)
  chex.assert_trees_all_equal(ys, ys_flax)
  module = jl.WeightNorm(nn.Dense(4))
  v = module.init(jax.random.key(0), X_DENSE)
  out = jax.jit(jax.vmap(lambda x: module.apply(v, x)))(xs)
  chex.assert_trees_all_close(out[1], module.apply(v, xs[1]), rtol=1e-6,
                              atol=1e-6)


# ---------------------------------------------------------------- nnx


def _nnx_layers():
  return [
      (lambda r: nnx.Linear(5, 4, rngs=r), X_DENSE),
      (lambda r: nnx.Conv(3, 4, (3, 3), rngs=r), X_CONV),
  ]


@pytest.mark.parametrize("make,x", _nnx_layers())
def test_nnx_weight_norm_parity(make, x):
  ours = jn.WeightNorm(make(nnx.Rngs(0)), rngs=nnx.Rngs(1))
  theirs = nnx.WeightNorm(make(nnx.Rngs(0)), rngs=nnx.Rngs(1))
  scale = jnp.linspace(0.5, 2.0, 4)
  ours.scales[("kernel",)].set_value(scale)
  theirs.scales[("kernel",)] = scale
  kernel = ours.layer_instance.kernel.get_value()
  chex.assert_trees_all_equal(kernel, theirs.layer_instance.kernel.get_value())
  # Gradients wrt the layer's parameters (Flax's scales are not nnx.Params).
  g_ours = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(ours)
  g_theirs = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(theirs)
  chex.assert_trees_all_close(nnx.state(g_ours)["layer_instance"],
                              nnx.state(g_theirs)["layer_instance"],
                              rtol=1e-5, atol=1e-5)
  y_ours = ours(x)
  y = theirs(x)  # Flax overwrites the layer's kernel with the normalized one
  chex.assert_trees_all_close(y_ours, y, rtol=1e-6, atol=1e-6)
  # Ours keeps the direction v as the layer's kernel, and the scale is trained.
  chex.assert_trees_all_equal(ours.layer_instance.kernel.get_value(), kernel)
  assert isinstance(ours.scales[("kernel",)], nnx.Param)
  assert float(jnp.abs(g_ours.scales[("kernel",)].get_value()).sum()) > 0
  y_jit = nnx.jit(lambda m, x: m(x))(ours, x)
  chex.assert_trees_all_close(y_jit, y_ours, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_equal(ours.layer_instance.kernel.get_value(), kernel)


@pytest.mark.parametrize("make,x", _nnx_layers())
def test_nnx_weight_norm_data_init(make, x):
  module = jn.WeightNorm(make(nnx.Rngs(0)), rngs=nnx.Rngs(1))
  y = np.asarray(module.data_init(x, eps=1e-12), np.float64).reshape(-1, 4)
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(0), 1.0, atol=1e-5)
  np.testing.assert_allclose(module(x), y.reshape(module(x).shape), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("make,x", _nnx_layers())
def test_nnx_spectral_norm_parity(make, x):
  ours = jn.SpectralNorm(make(nnx.Rngs(0)), n_steps=2, rngs=nnx.Rngs(1))
  theirs = nnx.SpectralNorm(make(nnx.Rngs(0)), n_steps=2, rngs=nnx.Rngs(1))
  chex.assert_trees_all_equal(nnx.state(ours, nnx.BatchStat),
                              nnx.state(theirs, nnx.BatchStat))
  kernel = ours.layer_instance.kernel.get_value()
  y = theirs(x)  # update_stats=True by default
  y_ours = ours(x)
  chex.assert_trees_all_close(y_ours, y, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(nnx.state(ours, nnx.BatchStat),
                              nnx.state(theirs, nnx.BatchStat), rtol=1e-6,
                              atol=1e-7)
  chex.assert_trees_all_equal(ours.layer_instance.kernel.get_value(), kernel)
  # Eval leaves the statistics alone and is deterministic.
  ours.eval()
  before = nnx.state(ours, nnx.BatchStat)
  a, b = ours(x), ours(x)
  chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(nnx.state(ours, nnx.BatchStat), before)
  ours.train()
  graphdef, state = nnx.split(ours)
  y_jit, new_state = jax.jit(
      lambda s, x: (lambda m: (m(x), nnx.state(m)))(nnx.merge(graphdef, s)))(
          state, x)
  chex.assert_shape(y_jit, y.shape)
  assert not np.allclose(new_state["batch_stats"][("kernel", "u")].get_value(),
                         before["batch_stats"][("kernel", "u")].get_value())


@pytest.mark.parametrize("rate,broadcast_dims", [
    (0.0, ()), (0.3, ()), (0.5, (1, 2)), (1.0, ()),
])
def test_nnx_dropout_parity(rate, broadcast_dims):
  ours = jn.Dropout(rate, broadcast_dims=broadcast_dims, rngs=nnx.Rngs(dropout=7))
  theirs = nnx.Dropout(rate, broadcast_dims=broadcast_dims,
                       rngs=nnx.Rngs(dropout=7))
  for _ in range(2):  # the stream advances identically
    chex.assert_trees_all_equal(ours(X_CONV), theirs(X_CONV))
  key = jax.random.key(8)
  chex.assert_trees_all_equal(ours(X_CONV, rngs=key), theirs(X_CONV, rngs=key))
  ours.eval()
  chex.assert_trees_all_equal(ours(X_CONV), X_CONV)
  ours.train()
  assert ours.deterministic is False


def test_nnx_dropout_rate_one_gives_zeros_and_finite_grads():
  module = jn.Dropout(1.0, rngs=nnx.Rngs(0))
  chex.assert_trees_all_equal(module(X_DENSE), jnp.zeros_like(X_DENSE))
  grad = jax.grad(lambda x: jnp.sum(module(x)))(X_DENSE)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(grad, 0.0)


def test_nnx_dropout_errors():
  msg = ("`rate` is the probability of dropping a unit and must be in [0, 1], "
         "got -0.5.")
  with pytest.raises(ValueError, match=re.escape(msg)):
    jn.Dropout(-0.5)
  msg = ("`deterministic` is False but Dropout has no `rngs`: pass `rngs=` to "
         "the constructor or the call.")
  with pytest.raises(ValueError, match=re.escape(msg)):
    jn.Dropout(0.5)(X_DENSE)
  msg = ("No `deterministic` argument was given to Dropout: pass "
         "`deterministic=True/False` to the constructor or the call, or use "
         "`.train()` / `.eval()`.")
  with pytest.raises(ValueError, match=re.escape(msg)):
    jn.Dropout(0.5, deterministic=None)(X_DENSE)
