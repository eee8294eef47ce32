"""Cross-device statistics on eight CPU devices (conftest sets XLA_FLAGS).

Each test shards an input eight ways with `jax.shard_map` and compares to the
single-device result on the whole array.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_data
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm

import reference as ref

N_DEV = 8


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < N_DEV:
    pytest.fail(f"needs {N_DEV} devices, got {jax.device_count()}; check conftest's XLA_FLAGS")
  return jax.make_mesh((N_DEV,), ("b",))


def _put(mesh, x, spec):
  return jax.device_put(x, NamedSharding(mesh, spec))


def _data(shape, seed=0):
  k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
  c = shape[-1]
  x = 3.0 + 2.0 * random_data.normal(k0, shape)
  params = {"scale": 1.0 + random_data.uniform(k1, (c,)), "bias": random_data.normal(k2, (c,))}
  return x, params, {"mean": jnp.zeros(c), "var": jnp.ones(c)}


def _sharded_bn(mesh, with_mask):
  def f(params, state, x, mask):
    return jaxnorm.batch_norm(params, state, x, train=True, momentum=0.9,
                              axis_name="b", mask=mask if with_mask else None)

  return jax.jit(jax.shard_map(
      f, mesh=mesh, in_specs=(P(), P(), P("b"), P("b")), out_specs=(P("b"), P())))


@pytest.mark.parametrize("shape", [(16, 3), (8, 2, 2, 3)])
def test_batch_norm_over_devices_equals_whole_batch(mesh, shape):
  x, params, state = _data(shape)
  mask = jnp.ones(shape[:1] + (1,) * (len(shape) - 1), bool)
  y, new_state = _sharded_bn(mesh, False)(params, state, _put(mesh, x, P("b")),
                                          _put(mesh, mask, P("b")))
  y_one, state_one = jax.jit(lambda p, s, x: jaxnorm.batch_norm(
      p, s, x, train=True, momentum=0.9))(params, state, x)
  chex.assert_trees_all_close(y, y_one, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(new_state, state_one, atol=1e-6, rtol=1e-6)
  # And both equal Algorithm 1 on the whole batch.
  y_ref, mu, var = ref.batch_norm_train(x, params["scale"], params["bias"])
  chex.assert_trees_all_close(y, y_ref, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(new_state, dict(zip(
      ("mean", "var"), ref.running_average(0.0, 1.0, mu, var, 0.9), strict=True)),
      atol=1e-5, rtol=1e-5)


def test_batch_norm_over_devices_with_mask(mesh):
  # Uneven counts per device: device 0 keeps 2 of its 2 rows, device 1 none, ...
  x, params, state = _data((16, 3), seed=1)
  keep = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0], bool)
  mask = jnp.asarray(keep)[:, None]
  y, new_state = _sharded_bn(mesh, True)(params, state, _put(mesh, x, P("b")),
                                         _put(mesh, mask, P("b")))
  y_one, state_one = jaxnorm.batch_norm(params, state, x, train=True, momentum=0.9,
                                        mask=mask)
  chex.assert_trees_all_close(y, y_one, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(new_state, state_one, atol=1e-6, rtol=1e-6)
  # Statistics are those of the kept rows alone.
  _, state_kept = jaxnorm.batch_norm(params, state, x[keep], train=True, momentum=0.9)
  chex.assert_trees_all_close(new_state, state_kept, atol=1e-6, rtol=1e-6)


def test_batch_norm_gradients_over_devices_equal_whole_batch(mesh):
  x, params, state = _data((16, 3), seed=2)
  dy = random_data.normal(jax.random.key(9), x.shape)

  def loss_sharded(params, x, dy):
    def local(params, state, x, dy):
      y, _ = jaxnorm.batch_norm(params, state, x, train=True, axis_name="b")
      return jax.lax.psum(jnp.sum(y * dy), "b")
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("b"), P("b")),
                         out_specs=P())(params, state, x, dy)

  def loss_one(params, x, dy):
    return jnp.sum(jaxnorm.batch_norm(params, state, x, train=True)[0] * dy)

  g = jax.jit(jax.grad(loss_sharded, argnums=(0, 1)))(
      params, _put(mesh, x, P("b")), _put(mesh, dy, P("b")))
  g_one = jax.jit(jax.grad(loss_one, argnums=(0, 1)))(params, x, dy)
  chex.assert_trees_all_close(g, g_one, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(g[1], ref.batch_norm_input_grad(x, dy, params["scale"]),
                              atol=1e-5, rtol=1e-4)


def test_layer_norm_with_features_sharded_across_devices(mesh):
  # Tensor parallelism: the feature axis is split 8 ways and `axis_name` makes
  # each shard use the statistics of the whole feature vector.
  x = 3.0 + 2.0 * random_data.normal(jax.random.key(3), (4, 16))
  params = {"scale": 1.0 + random_data.uniform(jax.random.key(4), (16,)),
            "bias": random_data.normal(jax.random.key(5), (16,))}
  f = jax.jit(jax.shard_map(
      lambda p, x: jaxnorm.layer_norm(p, x, axis_name="b"), mesh=mesh,
      in_specs=(P("b"), P(None, "b")), out_specs=P(None, "b")))
  y = f(_put(mesh, params, P("b")), _put(mesh, x, P(None, "b")))
  chex.assert_trees_all_close(y, jaxnorm.layer_norm(params, x), atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(y, ref.layer_norm(x, params["scale"], params["bias"]),
                              atol=1e-5, rtol=1e-5)


def test_batch_norm_inference_under_shard_map_needs_no_collective(mesh):
  x, params, _ = _data((16, 3), seed=4)
  state = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([0.5, 1.0, 2.0])}
  f = jax.jit(jax.shard_map(
      lambda p, s, x: jaxnorm.batch_norm(p, s, x, train=False, axis_name="b"), mesh=mesh,
      in_specs=(P(), P(), P("b")), out_specs=(P("b"), P())))
  y, new_state = f(params, state, _put(mesh, x, P("b")))
  chex.assert_trees_all_close(y, ref.batch_norm_infer(x, state["mean"], state["var"],
                                                      params["scale"], params["bias"]),
                              atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_equal(new_state, state)


def test_statistics_exact_on_eight_devices_with_outliers_and_offsets(mesh):
  """Per-device offsets 1e5 apart, an outlier at device 0's first sample, NaN padding."""
  rng = np.random.default_rng(7)
  n_local = 64
  x = rng.standard_normal((N_DEV, n_local, 4))
  x += 1e5 * np.arange(N_DEV)[:, None, None]          # each device its own mean
  x[0, 0] = 1e3                                       # outlier where a shift would sit
  x[3] = rng.standard_t(2, (n_local, 4)) + 7e4       # heavy tails on one device
  x = x.reshape(N_DEV * n_local, 4).astype(np.float32)
  mask = rng.random(x.shape) < 0.8
  mask[:2] = True
  mask[5 * n_local:6 * n_local, 1] = False            # device 5 selects nothing in column 1
  params, state = jaxnorm.batch_norm_init(4)

  def f(x, mask):
    y, new = jaxnorm.batch_norm(params, state, x, train=True, momentum=0.0, axis_name="b",
                                mask=mask)
    return y, new["mean"], new["var"]

  run = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("b"), P("b")),
                              out_specs=(P("b"), P(), P())))
  padded = np.where(mask, x, np.nan).astype(np.float32)
  y, mean, var = run(_put(mesh, padded, P("b")), _put(mesh, mask, P("b")))
  m64, v64 = ref.masked_channel_moments(x, mask)
  np.testing.assert_array_less(np.abs(np.asarray(var, np.float64) - v64), 1e-6 * v64)
  np.testing.assert_array_less(np.abs(np.asarray(mean, np.float64) - m64),
                               1e-6 * np.sqrt(v64) + np.spacing(np.float32(np.abs(m64))))
  y64 = (ref.f64(x) - m64) / np.sqrt(v64 + 1e-5)
  sel = mask
  err = np.abs(np.asarray(y, np.float64) - y64)[sel]
  np.testing.assert_array_less(err, 1e-5 * np.maximum(1.0, np.abs(y64[sel])))


@pytest.mark.parametrize("k", [2, 8])
def test_ghost_batch_norm_with_axis_name_equals_one_device_with_the_same_chunks(mesh, k):
  """Chunks are formed within each device's batch: layout-invariant results."""
  x, params, state = _data((N_DEV * 8, 2, 3), seed=3)
  x = x + 1e4 * (jnp.arange(N_DEV * 8) // 8)[:, None, None]    # per-device offsets
  mask = jnp.asarray(np.random.default_rng(8).random((N_DEV * 8, 1, 1)) < 0.7)
  mask = mask.at[16:24].set(False)                    # device 2's chunks are all empty

  def ghost(x, mask, axis_name=None):
    return jaxnorm.batch_norm(params, state, x, train=True, virtual_batch_size=k, mask=mask,
                              axis_name=axis_name, momentum=0.5)

  sharded = jax.jit(jax.shard_map(lambda x, m: ghost(x, m, "b"), mesh=mesh,
                                  in_specs=(P("b"), P("b")), out_specs=(P("b"), P())))
  y, new = sharded(_put(mesh, x, P("b")), _put(mesh, mask, P("b")))
  y1, new1 = jax.jit(ghost)(x, mask)
  sel = np.broadcast_to(np.asarray(mask), x.shape)
  np.testing.assert_allclose(np.asarray(y)[sel], np.asarray(y1)[sel], atol=2e-5)
  chex.assert_trees_all_close(new, new1, rtol=1e-5)
  # And against float64: the mean of the non-empty chunks' statistics.
  xs = ref.f64(x).reshape(-1, k, 2, 3)
  ms = np.broadcast_to(np.asarray(mask), x.shape).reshape(-1, k, 2, 3)
  means, vars_ = [], []
  for c in range(xs.shape[0]):
    if ms[c].any():
      vals = xs[c][ms[c]].reshape(-1, 3)
      means.append(vals.mean(0))
      vars_.append(vals.var(0))
  np.testing.assert_allclose(np.asarray(new["mean"]), 0.5 * np.mean(means, 0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new["var"]), 0.5 + 0.5 * np.mean(vars_, 0), rtol=1e-5)


def test_ghost_batch_norm_with_axis_name_rejects_chunks_across_devices(mesh):
  x, params, state = _data((N_DEV * 4, 3))
  f = jax.shard_map(lambda x: jaxnorm.batch_norm(params, state, x, train=True,
                                                 virtual_batch_size=8, axis_name="b"),
                    mesh=mesh, in_specs=P("b"), out_specs=(P("b"), P()))
  message = ("`virtual_batch_size`=8 must divide the batch size on each device, but `x` has "
             "4 examples along axis 0 on this device. Chunks are formed within each device's "
             "batch, so that the result equals one device on the gathered batch.")
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    jax.jit(f)(_put(mesh, x, P("b")))
