"""Reported failures of the incumbents' normalization layers, each working here.

Each test names the report it comes from. References are the same layer on
the full (unmapped) batch, or a float64 NumPy formula.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import random_data
from flax import nnx

import jaxnorm.linen as jl
import jaxnorm.nnx as jn


class _Step(nn.Module):
  bn: type

  @nn.compact
  def __call__(self, carry, x):
    y = self.bn(use_running_average=False, momentum=0.5)(nn.Dense(3)(x))
    return carry + y.sum(), y


class _Sequence(nn.Module):
  """nn.scan over time, batch_stats carried from step to step.

  nn.scan needs a carried collection to exist before the loop, which it does
  not during ``init`` (the structural cause of flax #2052). Because our
  BatchNorm never updates ``batch_stats`` while initializing, ``init`` may
  treat them as broadcast variables; ``apply`` carries them.
  """
  bn: type

  @nn.compact
  def __call__(self, carry, xs):
    init = self.is_initializing()
    scan = nn.scan(
        _Step,
        variable_broadcast=("params", "batch_stats") if init else "params",
        variable_carry=False if init else "batch_stats",
        split_rngs={"params": False}, in_axes=0, out_axes=0)
    return scan(self.bn, name="step")(carry, xs)


def test_batch_norm_inside_nn_scan_carrying_batch_stats():
  """flax #2052 / #2279: BatchNorm in nn.scan, batch_stats carried across steps."""
  xs = random_data.normal(jax.random.key(0), (4, 6, 2)) + 1.0
  model = _Sequence(jl.BatchNorm)
  v = model.init(jax.random.key(1), 0.0, xs)
  stats0 = v["batch_stats"]["step"]["BatchNorm_0"]
  np.testing.assert_array_equal(stats0["mean"], 0.0)
  np.testing.assert_array_equal(stats0["var"], 1.0)
  (_, ys), upd = jax.jit(
      lambda v, xs: model.apply(v, 0.0, xs, mutable=["batch_stats"]))(v, xs)
  # Reference: one step at a time in a Python loop, stats threaded by hand.
  step = _Step(jl.BatchNorm)
  params = v["params"]["step"]
  stats = v["batch_stats"]["step"]
  for t in range(4):
    (_, y), new = step.apply({"params": params, "batch_stats": stats}, 0.0,
                             xs[t], mutable=["batch_stats"])
    stats = new["batch_stats"]
    np.testing.assert_allclose(ys[t], y, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               upd["batch_stats"]["step"], stats)
  assert not np.allclose(stats["BatchNorm_0"]["mean"], 0.0)


def test_nested_nn_vmap_with_axis_names():
  """flax #3319: a per-example model under two nn.vmaps, BN over both axes."""

  class Inner(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return jl.BatchNorm(use_running_average=not train, axis_name=("i", "o"))(x)

  common = dict(variable_axes={"params": None, "batch_stats": None},
                split_rngs={"params": False}, in_axes=(0, None), out_axes=0)
  model = nn.vmap(nn.vmap(Inner, axis_name="i", **common), axis_name="o", **common)()
  x = random_data.normal(jax.random.key(0), (3, 5, 4)) * 2 + 1
  v = model.init(jax.random.key(1), x, True)
  y, upd = model.apply(v, x, True, mutable=["batch_stats"])
  full = jl.BatchNorm()
  y_ref, upd_ref = full.apply({"params": v["params"]["BatchNorm_0"],
                               "batch_stats": v["batch_stats"]["BatchNorm_0"]},
                              x.reshape(15, 4), use_running_average=False,
                              mutable=["batch_stats"])
  np.testing.assert_allclose(y.reshape(15, 4), y_ref, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["BatchNorm_0"]["var"],
                             upd_ref["batch_stats"]["var"], atol=1e-6)
  # Inference under the same nesting uses the running averages.
  y_eval = model.apply({**v, **upd}, x, False)
  np.testing.assert_allclose(
      y_eval.reshape(15, 4),
      full.apply({"params": v["params"]["BatchNorm_0"],
                  "batch_stats": upd["batch_stats"]["BatchNorm_0"]},
                 x.reshape(15, 4), use_running_average=True), atol=1e-5)


def test_nnx_vmap_over_batch_norm_in_train_mode():
  """flax #4760: nnx.vmap of a model holding a BatchNorm, called repeatedly in train mode."""

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(2, 5, rngs=rngs)
      self.bn = jn.BatchNorm(5, axis_name="v", rngs=rngs)

    def __call__(self, x):
      return self.bn(self.linear(x))

  model = Model(nnx.Rngs(0))
  data = random_data.normal(jax.random.key(0), (8, 4, 2)) + 1.0
  call = nnx.vmap(lambda m, x: m(x), in_axes=(None, 1), out_axes=1, axis_name="v")
  y1 = call(model, data)
  y2 = call(model, data)  # the second call is the one that failed
  # Reference: one BatchNorm on the full batch of 32 examples, twice.
  ref = Model(nnx.Rngs(0))
  ref.bn.axis_name = None
  r1 = ref(data.reshape(32, 2)).reshape(8, 4, 5)
  r2 = ref(data.reshape(32, 2)).reshape(8, 4, 5)
  np.testing.assert_allclose(y1, r1, atol=1e-5)
  np.testing.assert_allclose(y2, r2, atol=1e-5)
  np.testing.assert_allclose(model.bn.mean[...], ref.bn.mean[...], atol=1e-6)
  np.testing.assert_allclose(model.bn.var[...], ref.bn.var[...], atol=1e-6)


def _output_sum(module, variables, x):
  y, _ = module.apply(variables, x, mutable=["batch_stats"])
  return y.astype(jnp.float32).sum()


def test_bfloat16_inputs_give_no_nans():
  """haiku #396: bfloat16 batch norm returned NaNs (negative variance)."""
  # A large mean relative to the spread, the case where E[x^2] - E[x]^2 in
  # low precision goes negative.
  x = (300.0 + random_data.normal(jax.random.key(0), (64, 8))).astype(jnp.bfloat16)
  x64 = np.asarray(x, np.float64)
  ref = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
  for param_dtype in (jnp.float32, jnp.bfloat16):
    m = jl.BatchNorm(use_running_average=False, param_dtype=param_dtype,
                     dtype=jnp.bfloat16)
    v = m.init(jax.random.key(0), x)
    y, upd = jax.jit(functools.partial(m.apply, mutable=["batch_stats"]))(v, x)
    assert y.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(y, np.float32)))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=0.05)
    assert np.all(np.asarray(upd["batch_stats"]["var"]) > 0)
    grad = jax.grad(_output_sum, argnums=1)(m, v, x)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32)))
               for g in jax.tree.leaves(grad))
  ln = jn.LayerNorm(8, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = ln(x)
  assert y.dtype == jnp.bfloat16
  ref_ln = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref_ln, atol=0.05)


def test_inference_before_any_training_step():
  """equinox #955: inference mode on a freshly initialized model."""
  x = random_data.normal(jax.random.key(0), (4, 3)) * 3 + 2
  expected = np.asarray(x) / np.sqrt(1 + 1e-5)
  m = jl.BatchNorm(use_running_average=True)
  v = m.init(jax.random.key(0), x)
  np.testing.assert_allclose(jax.jit(m.apply)(v, x), expected, rtol=1e-6)
  bn = jn.BatchNorm(3, rngs=nnx.Rngs(0))
  bn.eval()
  np.testing.assert_allclose(nnx.jit(lambda b, x: b(x))(bn, x), expected, rtol=1e-6)
  # A single example is fine at inference (no batch statistics needed).
  np.testing.assert_allclose(bn(x[:1]), expected[:1], rtol=1e-6)


def test_nnx_group_norm_with_reduction_axes():
  """Found while writing these tests: flax.nnx.GroupNorm (0.12.8) broadcasts
  its group statistics along axis 1 instead of the channel axis, so
  ``reduction_axes`` that leave axis 1 out give wrong values; flax.linen's
  GroupNorm and ours agree with the float64 formula."""
  x = random_data.normal(jax.random.key(0), (2, 3, 3, 6)) * 2 + 1
  ours = jn.GroupNorm(6, 3, reduction_axes=(2, 3), rngs=nnx.Rngs(0))
  theirs = nnx.GroupNorm(6, 3, reduction_axes=(2, 3), rngs=nnx.Rngs(0))
  g = np.asarray(x, np.float64).reshape(2, 3, 3, 3, 2)
  ref = ((g - g.mean((2, 4), keepdims=True))
         / np.sqrt(g.var((2, 4), keepdims=True) + 1e-6)).reshape(x.shape)
  np.testing.assert_allclose(ours(x), ref, atol=1e-5)
  linen = nn.GroupNorm(num_groups=3, reduction_axes=(2, 3))
  np.testing.assert_allclose(linen.apply(linen.init(jax.random.key(0), x), x), ref,
                             atol=1e-5)
  assert np.max(np.abs(np.asarray(theirs(x)) - ref)) > 0.1
