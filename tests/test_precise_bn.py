"""Tests of precise batch statistics: the accumulator and the linen / nnx drivers."""

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


def _data(n=23, f=3, seed=0):
  rng = np.random.default_rng(seed)
  return (5.0 + 3.0 * rng.standard_normal((n, f))).astype(np.float32)


def _split(x, sizes):
  out, i = [], 0
  for s in sizes:
    out.append(x[i:i + s])
    i += s
  assert i == len(x)
  return out


@pytest.mark.parametrize("unbiased", [False, True])
def test_accumulator_is_the_population_moments(unbiased):
  x = _data()
  for sizes in ([23], [5, 5, 5, 8], [1, 10, 2, 10]):
    acc = jaxnorm.precise_stats_init(3)
    batches = _split(x, sizes)
    for b in batches[::-1]:
      acc = jaxnorm.precise_stats_update(acc, b)
    s = jaxnorm.precise_stats_result(acc, unbiased=unbiased)
    mean, var = rm.population_moments(batches, unbiased=unbiased)
    chex.assert_trees_all_close((s["mean"], s["var"]), (mean, var), rtol=1e-6)
    assert s["mean"].dtype == jnp.float32


def test_accumulator_feature_axis_and_mask():
  x = np.moveaxis(_data(24).reshape(2, 4, 3, 3), -1, 1)     # NCHW-like, features on axis 1
  acc = jaxnorm.precise_stats_update(jaxnorm.precise_stats_init(3), x[:1], axis=1)
  acc = jaxnorm.precise_stats_update(acc, x[1:], axis=1)
  mean, var = rm.population_moments([x], axis=1)
  s = jaxnorm.precise_stats_result(acc)
  chex.assert_trees_all_close((s["mean"], s["var"]), (mean, var), rtol=1e-6)
  # Masked-out entries (NaN here) are left out; a feature with no entries
  # keeps the fallback state.
  y = _data(8)
  mask = np.ones_like(y, bool)
  mask[5:, 0] = False
  mask[:, 2] = False
  acc = jaxnorm.precise_stats_update(jaxnorm.precise_stats_init(3), np.where(mask, y, np.nan),
                                     mask=jnp.asarray(mask))
  s = jaxnorm.precise_stats_result(acc, fallback={"mean": np.full(3, 7.0), "var": np.full(3, 2.0)})
  chex.assert_trees_all_close(s["mean"], np.array([y[:5, 0].mean(), y[:, 1].mean(), 7.0]),
                              rtol=1e-6)
  chex.assert_trees_all_close(s["var"], np.array([y[:5, 0].var(), y[:, 1].var(), 2.0]),
                              rtol=1e-5)


class _LinenNet(nn.Module):
  """Dense -> jaxnorm BN -> relu -> Dense -> flax BN: both kinds of BatchNorm."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Dense(4)(x)
    h = jl.BatchNorm(use_running_average=not train, epsilon=1e-3)(h)
    h = nn.relu(h)
    h = nn.Dense(2)(h)
    return nn.BatchNorm(use_running_average=not train)(h)


def _reference_linen(params, x, unbiased=False):
  """Each BN's new statistics in float64, layer by layer with the new ones upstream."""
  d0, d1 = params["Dense_0"], params["Dense_1"]
  h1 = rm.f64(x) @ rm.f64(d0["kernel"]) + rm.f64(d0["bias"])
  # The second layer's inputs at inference: the first normalizes with the
  # statistics it now stores (unbiased ones when asked for).
  m1, v1 = rm.population_moments([h1], unbiased=unbiased)
  bn = params["BatchNorm_0"]
  a1 = np.maximum((h1 - m1) / np.sqrt(v1 + 1e-3) * rm.f64(bn["scale"]) + rm.f64(bn["bias"]), 0)
  h2 = a1 @ rm.f64(d1["kernel"]) + rm.f64(d1["bias"])
  return {"BatchNorm_0": (m1, v1),
          "BatchNorm_1": rm.population_moments([h2], unbiased=unbiased)}


def _perturbed(variables):
  # Non-trivial BN params and stale running statistics, as after training.
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  return jax.tree.unflatten(tree, [l + 0.3 * random_data.normal(k, l.shape)
                                   for l, k in zip(leaves, keys, strict=True)])


@pytest.mark.parametrize("unbiased", [False, True])
def test_linen_precise_batch_stats(unbiased):
  x = _data(23)
  model = _LinenNet()
  vs = _perturbed(model.init(jax.random.key(0), x))
  new = jl.precise_batch_stats(model, vs, _split(x, [8, 8, 7]), unbiased=unbiased)
  expected = _reference_linen(vs["params"], x, unbiased)
  for name, (mean, var) in expected.items():
    chex.assert_trees_all_close(new["batch_stats"][name]["mean"], mean, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(new["batch_stats"][name]["var"], var, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(new["params"], vs["params"])
  # Whatever the batch sizes and order (and a one-shot iterator of tuples).
  other = jl.precise_batch_stats(model, vs, iter([(b,) for b in _split(x, [1, 20, 2])[::-1]]),
                                 unbiased=unbiased)
  chex.assert_trees_all_close(other["batch_stats"], new["batch_stats"], rtol=1e-6, atol=1e-6)


def test_linen_precise_batch_stats_errors():
  model = _LinenNet()
  x = _data(4)
  vs = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=re.escape(
      "`batches` is empty; give at least one batch of inputs.") + "$"):
    jl.precise_batch_stats(model, vs, [])
  dense = nn.Dense(2)
  with pytest.raises(ValueError, match=re.escape(
      "`variables` has no 'batch_stats' collection, so `model` has no BatchNorm to "
      "recompute; its collections are ['params'].") + "$"):
    jl.precise_batch_stats(dense, dense.init(jax.random.key(0), x), [x])


class _NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.d0 = nnx.Linear(3, 4, rngs=rngs)
    self.bn0 = jn.BatchNorm(4, epsilon=1e-3, rngs=rngs)
    self.d1 = nnx.Linear(4, 2, rngs=rngs)
    self.bn1 = nnx.BatchNorm(2, rngs=rngs)

  def __call__(self, x):
    return self.bn1(self.d1(nnx.relu(self.bn0(self.d0(x)))))


def test_nnx_precise_batch_stats():
  x = _data(23)
  model = _NnxNet(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, _perturbed(state))
  model.eval()
  twin = nnx.merge(*nnx.split(model))
  jn.precise_batch_stats(model, _split(x, [8, 8, 7]))
  params = {"Dense_0": {"kernel": model.d0.kernel[...], "bias": model.d0.bias[...]},
            "Dense_1": {"kernel": model.d1.kernel[...], "bias": model.d1.bias[...]},
            "BatchNorm_0": {"scale": model.bn0.scale[...], "bias": model.bn0.bias[...]}}
  expected = _reference_linen(params, x)
  for bn, name in ((model.bn0, "BatchNorm_0"), (model.bn1, "BatchNorm_1")):
    chex.assert_trees_all_close((bn.mean[...], bn.var[...]), expected[name], rtol=1e-5,
                                atol=1e-5)
  jn.precise_batch_stats(twin, _split(x, [3, 20])[::-1])
  chex.assert_trees_all_close(nnx.state(twin, nnx.BatchStat), nnx.state(model, nnx.BatchStat),
                              rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=re.escape(
      "`model` (Linear) has no BatchNorm layer to recompute.") + "$"):
    jn.precise_batch_stats(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), [x])


def test_linen_feature_axis_and_mask_of_the_layer():
  # NCL input, features on axis 1, and a mask passed to the BatchNorm by the model.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
      return jl.BatchNorm(use_running_average=True, axis=1)(x, mask=mask)

  x = np.moveaxis(_data(30).reshape(5, 6, 3), -1, 1)          # (5, 3, 6)
  mask = np.broadcast_to(np.arange(6)[None, None, :] < 4, x.shape)
  model = Net()
  vs = model.init(jax.random.key(0), x, mask)
  new = jl.precise_batch_stats(model, vs, [(x[:2], mask[:2]), (x[2:], mask[2:])])
  kept = rm.f64(x)[:, :, :4]
  chex.assert_trees_all_close(new["batch_stats"]["BatchNorm_0"]["mean"], kept.mean((0, 2)),
                              rtol=1e-6)
  chex.assert_trees_all_close(new["batch_stats"]["BatchNorm_0"]["var"], kept.var((0, 2)),
                              rtol=1e-5)


# Data far from zero: a large mean with unit spread. The reference is the
# float64 mean and variance of the same float32 values, whatever the batching.
def _offset_batches(offset, sizes, f=8, seed=1):
  rng = np.random.default_rng(seed)
  return [(offset + rng.standard_normal((s, f))).astype(np.float32) for s in sizes]


def _f64_moments(batches):
  a = np.concatenate([np.asarray(b, np.float64) for b in batches])
  return a.mean(0), a.var(0)


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_accumulator_exact_at_large_offsets(offset):
  # Each batch's mean rounded to float32 (half an ulp of the offset, 4e-3 at
  # 1e5) must not reach the between-batch term of the variance.
  for sizes in ([16, 17, 18, 19, 20], [1, 2, 3, 64, 5], [90]):
    batches = _offset_batches(offset, sizes)
    acc = jaxnorm.precise_stats_init(8)
    for b in batches[::-1]:
      acc = jaxnorm.precise_stats_update(acc, b)
    s = jaxnorm.precise_stats_result(acc)
    mean, var = _f64_moments(batches)
    np.testing.assert_allclose(np.asarray(s["mean"], np.float64), mean, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(s["var"], np.float64), var, rtol=1e-6)


@pytest.mark.parametrize("offset", [1e3, 1e4, 1e5])
def test_accumulator_exact_at_large_offsets_masked(offset):
  batches = _offset_batches(offset, [20, 7, 33])
  rng = np.random.default_rng(2)
  masks = [rng.random(b.shape) > 0.4 for b in batches]
  acc = jaxnorm.precise_stats_init(8)
  for b, m in zip(batches, masks, strict=True):
    acc = jaxnorm.precise_stats_update(acc, np.where(m, b, np.nan), mask=jnp.asarray(m))
  s = jaxnorm.precise_stats_result(acc)
  for f in range(8):
    kept = np.concatenate([np.asarray(b, np.float64)[m[:, f], f]
                           for b, m in zip(batches, masks, strict=True)])
    np.testing.assert_allclose(float(s["mean"][f]), kept.mean(), rtol=1e-7)
    np.testing.assert_allclose(float(s["var"][f]), kept.var(), rtol=1e-6)


@pytest.mark.parametrize("offset", [1e3, 1e5])
def test_drivers_exact_at_large_offsets(offset):
  # The linen and nnx drivers take each batch's statistics the same way.
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jl.BatchNorm(use_running_average=True)(x)

  batches = _offset_batches(offset, [16, 17, 18, 19, 20])
  mean, var = _f64_moments(batches)
  model = Net()
  vs = model.init(jax.random.key(0), batches[0])
  st = jl.precise_batch_stats(model, vs, batches)["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(np.asarray(st["mean"], np.float64), mean, rtol=1e-7)
  np.testing.assert_allclose(np.asarray(st["var"], np.float64), var, rtol=1e-6)
  bn = jn.BatchNorm(8, rngs=nnx.Rngs(0))
  bn.eval()
  jn.precise_batch_stats(bn, batches)
  np.testing.assert_allclose(np.asarray(bn.mean[...], np.float64), mean, rtol=1e-7)
  np.testing.assert_allclose(np.asarray(bn.var[...], np.float64), var, rtol=1e-6)
