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
import random_data
from flax import nnx

import jaxnorm.linen as jl
import jaxnorm.nnx as jn

X_DENSE = random_data.normal(jax.random.key(10), (8, 5))
X_CONV = random_data.normal(jax.random.key(11), (2, 5, 5, 3))


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


def _dtypes(tree):
  return jax.tree.map(lambda a: jnp.asarray(a).dtype, tree)


@pytest.mark.parametrize("layer_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("init_update", [True, False])
def test_linen_spectral_norm_param_dtype_stats_like_flax(layer_dtype, init_update):
  """`param_dtype` is u/sigma's dtype at creation; Flax's update stores the
  power iteration's result, promoted with the kernel's dtype."""
  make = lambda M: M.SpectralNorm(nn.Dense(4, param_dtype=layer_dtype),
                                  param_dtype=jnp.bfloat16)
  ours, theirs = make(jl), make(nn)
  v_ours = ours.init(jax.random.key(0), X_DENSE, update_stats=init_update)
  v = theirs.init(jax.random.key(0), X_DENSE, update_stats=init_update)
  assert _dtypes(v_ours) == _dtypes(v)
  chex.assert_trees_all_close(v_ours, v, rtol=1e-2, atol=1e-2)
  for update in (True, False, True):
    out_ours = ours.apply(v, X_DENSE, update_stats=update, mutable=["batch_stats"])
    out = theirs.apply(v, X_DENSE, update_stats=update, mutable=["batch_stats"])
    assert _dtypes(out_ours) == _dtypes(out)
    chex.assert_trees_all_close(out_ours, out, rtol=2e-2, atol=2e-2)
    v = {**v, **out[1]}


@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_linen_spectral_norm_is_flax_bit_for_bit(param_dtype, scale):
  """The power iteration's products are scaled by a power of two (against
  overflow at extreme magnitudes), which is exact: for ordinary kernels
  (max|W| ~ 0.5 and ~ 50, scaled by 2**-1 and 2**-6; float32, or bfloat16
  kernel, u and sigma, where XLA keeps W / sigma in float32 for the layer's
  matmul) one step gives Flax's outputs, stored u and sigma, and gradients
  bit for bit, eagerly and under jit. (With more steps Flax's unrolled loop
  and jaxnorm's `fori_loop` compile differently: an ulp or two apart, before
  the scaling as after.)"""
  x = random_data.normal(jax.random.key(12), (4, 64))
  init = lambda key, shape, dtype: scale * nn.initializers.lecun_normal()(key, shape, dtype)
  out = []
  for lib in (jl, nn):
    module = lib.SpectralNorm(nn.Dense(16, kernel_init=init, param_dtype=param_dtype),
                              param_dtype=param_dtype)
    v = module.init(jax.random.key(0), x, update_stats=True)
    step = jax.jit(lambda v, x, m=module: m.apply(v, x, update_stats=True,
                                                  mutable=["batch_stats"]))
    grad = jax.jit(jax.grad(lambda p, m=module, v=v: jnp.sum(m.apply(
        {**v, "params": p}, x, update_stats=False) ** 2)))
    out.append((v, step(v, x), grad(v["params"])))
  chex.assert_trees_all_equal(out[0], out[1])


def test_linen_spectral_norm_error_on_non_matrix():
  module = jl.SpectralNorm(nn.Conv(4, (3, 3)), error_on_non_matrix=True)
  msg = ("SpectralNorm: Input is 4D but error_on_non_matrix is True: the "
         "variable 'layer_instance/kernel' of the layer has shape (3, 3, 3, 4); "
         "spectral normalization is defined on matrices. Set "
         "error_on_non_matrix=False to flatten it to (-1, out).")
  with pytest.raises(ValueError) as info:
    module.init(jax.random.key(0), X_CONV, update_stats=True)
  assert str(info.value) == msg


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
  # Both wrote the normalized kernel into the layer (in_place=True).
  chex.assert_trees_all_close(ours.layer_instance.kernel.get_value(),
                              theirs.layer_instance.kernel.get_value(),
                              rtol=1e-6, atol=1e-7)
  assert not np.allclose(ours.layer_instance.kernel.get_value(), kernel)
  # Eval leaves the statistics alone; without in_place it is deterministic.
  ours.in_place = False
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
  msg = ("Dropout: `rate` is the probability of dropping a unit and must be in "
         "[0, 1], got -0.5.")
  with pytest.raises(ValueError, match=re.escape(msg) + "$"):
    jn.Dropout(-0.5)
  # The wording of the missing-rngs and missing-deterministic errors is
  # tested in test_flax_fidelity.py.


def test_nnx_weight_norm_promote_dtype_stored_not_called_like_flax():
  calls = []

  def promote(args, *, dtype=None):  # would turn the output float16
    calls.append(dtype)
    return nnx.nn.dtypes.promote_dtype(args, dtype=jnp.float16)

  ours = jn.WeightNorm(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), promote_dtype=promote,
                       rngs=nnx.Rngs(1))
  theirs = nnx.WeightNorm(nnx.Linear(5, 4, rngs=nnx.Rngs(0)),
                          promote_dtype=promote, rngs=nnx.Rngs(1))
  assert ours.promote_dtype is promote
  y_ours, y = ours(X_DENSE), theirs(X_DENSE)
  # Flax 0.12's nnx.WeightNorm keeps promote_dtype but never calls it.
  assert calls == []
  assert y_ours.dtype == y.dtype == jnp.float32
  chex.assert_trees_all_close(y_ours, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_nnx_weight_norm_bfloat16_like_flax(dtype, layer_dtype):
  # The scales stay float32: Flax makes them float32 whatever `param_dtype`.
  def make(cls):
    layer = nnx.Linear(5, 4, param_dtype=layer_dtype, rngs=nnx.Rngs(0))
    return cls(layer, dtype=dtype, rngs=nnx.Rngs(1))

  x = X_DENSE.astype(jnp.bfloat16)
  y_ours, y = make(jn.WeightNorm)(x), make(nnx.WeightNorm)(x)
  assert y_ours.dtype == y.dtype
  np.testing.assert_allclose(np.asarray(y_ours, np.float32),
                             np.asarray(y, np.float32), rtol=2e-2, atol=2e-2)


# nnx.vmap ensembles and nnx.scan stacks: each member or layer is checked
# against Flax's module with that member's variables, run by hand.


def _ensemble(make, size=3, rngs=None):
  """`size` independent modules, stacked by nnx.vmap over split keys."""
  @nnx.split_rngs(splits=size)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def build(rngs):
    return make(rngs)

  return build(nnx.Rngs(0) if rngs is None else rngs)


def _member(stack, i):
  """Member `i` of a stacked module, as a standalone module."""
  graphdef, state = nnx.split(stack)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def _stacked_stats(members):
  """The members' BatchStats, stacked like those of an nnx.vmap ensemble."""
  return jax.tree.map(lambda *a: jnp.stack(a),
                      *[nnx.state(m, nnx.BatchStat) for m in members])


def _weight_norm(lib):
  return lambda rngs: lib.WeightNorm(nnx.Linear(4, 4, rngs=rngs), rngs=rngs)


def _spectral_norm(lib):
  return lambda rngs: lib.SpectralNorm(nnx.Linear(4, 4, rngs=rngs), n_steps=2,
                                       rngs=rngs)


def _set_scales(ours, theirs):
  """Distinct, non-trivial WeightNorm scales in both stacks."""
  scales = jnp.linspace(0.5, 2.0, 12).reshape(3, 4)
  ours.scales[("kernel",)].set_value(scales)
  theirs.scales[("kernel",)] = scales


X_SMALL = random_data.normal(jax.random.key(12), (6, 4))


@pytest.mark.parametrize("wrapper", [_weight_norm, _spectral_norm])
def test_nnx_wrapper_vmap_ensemble(wrapper):
  ours, theirs = _ensemble(wrapper(jn)), _ensemble(wrapper(nnx))
  if wrapper is _weight_norm:
    _set_scales(ours, theirs)
  kernels = ours.layer_instance.kernel.get_value()
  assert kernels.shape == (3, 4, 4) and not np.allclose(kernels[0], kernels[1])
  chex.assert_trees_all_equal(nnx.state(ours, nnx.Param)["layer_instance"],
                              nnx.state(theirs, nnx.Param)["layer_instance"])
  members = [_member(theirs, i) for i in range(3)]
  xs = jnp.stack([X_SMALL, 2 * X_SMALL + 1, -X_SMALL])
  ys = nnx.vmap(lambda m, x: m(x), in_axes=(0, 0), out_axes=0)(ours, xs)
  expected = jnp.stack([m(x) for m, x in zip(members, xs, strict=True)])
  chex.assert_trees_all_close(ys, expected, rtol=1e-6, atol=1e-6)
  # SpectralNorm's u and sigma moved per member, as Flax's did.
  chex.assert_trees_all_close(nnx.state(ours, nnx.BatchStat),
                              _stacked_stats(members),
                              rtol=1e-6, atol=1e-7)
  if wrapper is _weight_norm:  # ours keeps v as the kernel
    chex.assert_trees_all_equal(ours.layer_instance.kernel.get_value(), kernels)
  else:  # SpectralNorm wrote W / sigma into each member's kernel, as Flax's
    chex.assert_trees_all_close(
        ours.layer_instance.kernel.get_value(),
        jnp.stack([m.layer_instance.kernel.get_value() for m in members]),
        rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wrapper", [_weight_norm, _spectral_norm])
def test_nnx_wrapper_scan_over_layers(wrapper):
  ours, theirs = _ensemble(wrapper(jn)), _ensemble(wrapper(nnx))
  if wrapper is _weight_norm:
    _set_scales(ours, theirs)

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def forward(x, layer):
    return jnp.tanh(layer(x))

  y = forward(X_SMALL, ours)
  members = [_member(theirs, i) for i in range(3)]
  expected = X_SMALL
  for layer in members:
    expected = jnp.tanh(layer(expected))
  chex.assert_trees_all_close(y, expected, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(nnx.state(ours, nnx.BatchStat),
                              _stacked_stats(members),
                              rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("in_place", [True, False])
def test_nnx_spectral_norm_scan_over_time_steps(in_place):
  ours = jn.SpectralNorm(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), in_place=in_place,
                         rngs=nnx.Rngs(1))
  theirs = nnx.SpectralNorm(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  seq = random_data.normal(jax.random.key(13), (5, 6, 4))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def run(module, x):
    return module, module(x)

  _, ys = run(ours, seq)
  kernel = theirs.layer_instance.kernel.get_value()
  for t in range(5):
    if not in_place:  # Flax overwrites the kernel; put W back first
      theirs.layer_instance.kernel.set_value(kernel)
    chex.assert_trees_all_close(ys[t], theirs(seq[t]), rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(nnx.state(ours, nnx.BatchStat),
                              nnx.state(theirs, nnx.BatchStat),
                              rtol=1e-6, atol=1e-7)


def test_nnx_dropout_vmap_ensemble():
  make = lambda lib: lambda rngs: lib.Dropout(0.5, rngs=rngs)
  ours = _ensemble(make(jn), rngs=nnx.Rngs(dropout=5))
  theirs = _ensemble(make(nnx), rngs=nnx.Rngs(dropout=5))
  members = [_member(theirs, i) for i in range(3)]
  apply = nnx.vmap(lambda m, x: m(x), in_axes=(0, None), out_axes=0)
  for _ in range(2):  # each member's stream advances
    ys = apply(ours, X_CONV)
    chex.assert_trees_all_equal(ys, jnp.stack([m(X_CONV) for m in members]))
    assert not np.array_equal(ys[0] == 0, ys[1] == 0)  # independent masks


def test_nnx_dropout_scan_over_time_steps():
  ours = jn.Dropout(0.3, rngs=nnx.Rngs(dropout=7))
  theirs = nnx.Dropout(0.3, rngs=nnx.Rngs(dropout=7))
  seq = random_data.normal(jax.random.key(14), (4, 6, 5))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def run(module, x):
    return module, module(x)

  _, ys = run(ours, seq)
  chex.assert_trees_all_equal(ys, jnp.stack([theirs(x) for x in seq]))
  assert not np.array_equal(ys[0] == 0, ys[1] == 0)
  # The stream was carried through the steps: the next call matches too.
  chex.assert_trees_all_equal(ours(seq[0]), theirs(seq[0]))
  # And over layers: a stack of Dropouts, one key each.
  make = lambda lib: lambda rngs: lib.Dropout(0.3, rngs=rngs)
  stack = _ensemble(make(jn), rngs=nnx.Rngs(dropout=8))
  ref = _ensemble(make(nnx), rngs=nnx.Rngs(dropout=8))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def forward(x, layer):
    return layer(x) + 1.0

  expected = seq[0]
  for i in range(3):
    expected = _member(ref, i)(expected) + 1.0
  chex.assert_trees_all_close(forward(seq[0], stack), expected, rtol=1e-6,
                              atol=1e-6)
