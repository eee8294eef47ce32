"""Sharded `jit` on eight CPU devices: every layer equals its unsharded self, and pays little
communication.

Part 1 shards the inputs the ways users shard them (the batch over devices:
data parallel; the features: tensor parallel; both on a 2-D data x model mesh;
the parameters too: FSDP-style) and checks that values and gradients under
`jax.grad` equal the same function on one device. `jit` alone partitions the
program (XLA's SPMD partitioner inserts the collectives); no `axis_name` needed.

Part 2 reads the compiled programs (tests/collectives.py) and pins what each
layer call costs: no all-gather of an activation-sized array, all-reduce bytes of
the order of the per-feature (or per-example) statistics, and no more
collectives (all-reduces or others) than flax.linen's module for the same layer and sharding.
Collectives inside a branch of a `lax.cond` (the second look at batch statistics, taken
only when outliers sit at a block's probed places) are counted apart: they run only then.
"""

from __future__ import annotations

import contextlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from collectives import collectives
from collectives import compiled_text
from collectives import unconditional
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm
import jaxnorm.linen as jl
import jaxnorm.nnx as jx

import reference as ref

N_DEV = 8


def _mesh(shape, names, kind=AxisType.Auto):
  if jax.device_count() < N_DEV:
    pytest.fail(f"needs {N_DEV} devices, got {jax.device_count()}; check conftest's XLA_FLAGS")
  return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


@pytest.fixture(scope="module")
def mesh1():
  return _mesh((N_DEV,), ("d",))


@pytest.fixture(scope="module")
def mesh2():
  return _mesh((2, 4), ("d", "m"))


def _put(mesh, tree, spec):
  return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec)), tree)


def _data(shape, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  c = shape[-1]
  x = 3.0 + 2.0 * jax.random.normal(keys[0], shape)
  w = jax.random.normal(keys[1], shape)
  params = {"scale": 1.0 + jax.random.uniform(keys[2], (c,)),
            "bias": jax.random.normal(keys[3], (c,))}
  return x, w, params


# Each layer as f(params, x) -> (y, aux) in train mode where it has one.
STATE = lambda c: {"mean": jnp.full((c,), 0.5), "var": jnp.full((c,), 2.0)}
LAYERS = {
    "batch_norm": lambda p, x: jaxnorm.batch_norm(p, STATE(x.shape[-1]), x, train=True,
                                                  momentum=0.9),
    "ghost_batch_norm": lambda p, x: jaxnorm.batch_norm(
        p, STATE(x.shape[-1]), x, train=True, momentum=0.9, virtual_batch_size=4),
    "batch_renorm": lambda p, x: jaxnorm.batch_renorm(p, STATE(x.shape[-1]), x, train=True,
                                                      momentum=0.9, r_max=1.5, d_max=0.5),
    "batch_norm_infer": lambda p, x: jaxnorm.batch_norm(p, STATE(x.shape[-1]), x, train=False),
    "layer_norm": lambda p, x: (jaxnorm.layer_norm(p, x), None),
    "rms_norm": lambda p, x: (jaxnorm.rms_norm({"scale": p["scale"]}, x), None),
    "group_norm": lambda p, x: (jaxnorm.group_norm(p, x, num_groups=2), None),
    "instance_norm": lambda p, x: (jaxnorm.instance_norm(p, x), None),
}
PER_EXAMPLE = ("layer_norm", "rms_norm", "group_norm", "instance_norm")


def _value_and_grads(layer):
  """x, params -> (y, aux, dL/dx, dL/dparams) for L = sum(y * w)."""
  def f(params, x, w):
    def loss(params, x):
      y, aux = layer(params, x)
      return jnp.sum(y * w), (y, aux)
    (_, (y, aux)), (dp, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, aux, dx, dp
  return f


def _assert_sharded_equals_unsharded(layer, mesh, x, w, params, x_spec, p_spec, rtol=2e-5):
  f = jax.jit(_value_and_grads(layer))
  sharded = f(_put(mesh, params, p_spec), _put(mesh, x, x_spec), _put(mesh, w, x_spec))
  one = f(*jax.device_put((params, x, w), jax.devices()[0]))
  # The output stays split like the input: nothing was gathered onto one device.
  assert sharded[0].sharding.is_equivalent_to(NamedSharding(mesh, x_spec), x.ndim)
  chex.assert_trees_all_close(sharded, one, rtol=rtol, atol=rtol)


# Part 1: values and gradients.


@pytest.mark.parametrize("name", list(LAYERS))
def test_batch_sharded_equals_unsharded(mesh1, name):
  x, w, params = _data((32, 2, 4) if name in ("group_norm", "instance_norm") else (32, 4))
  _assert_sharded_equals_unsharded(LAYERS[name], mesh1, x, w, params, P("d"), P())


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_feature_sharded_equals_unsharded(mesh1, name):
  # Tensor parallel: each device holds 2 of the 16 features, and their parameters.
  x, w, params = _data((4, 16), seed=1)
  _assert_sharded_equals_unsharded(LAYERS[name], mesh1, x, w, params, P(None, "d"), P("d"))


@pytest.mark.parametrize("name", ["batch_norm", "layer_norm", "rms_norm"])
def test_data_by_model_mesh_equals_unsharded(mesh2, name):
  # Batch over "d" (2 ways), features over "m" (4 ways); params sharded over "m".
  x, w, params = _data((8, 8), seed=2)
  _assert_sharded_equals_unsharded(LAYERS[name], mesh2, x, w, params, P("d", "m"), P("m"))


@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_feature_sharded_layer_norm_is_exact_on_adversarial_rows(mesh1, offset):
  # Under sharded jit each device normalizes its 16 features of a row in its own frame
  # (the median of its first, middle and last values); the frames then meet in the merge.
  # Outliers on those probes, shards at levels 1e3 apart and a large offset must cost no
  # precision: values and input gradients against the float64 formulas.
  rows, feats = 8, 16 * N_DEV
  keys = jax.random.split(jax.random.key(7), 3)
  x = np.asarray(jax.random.normal(keys[0], (rows, feats)), np.float64)
  per = feats // N_DEV
  shard_probes = np.concatenate([d * per + np.array([0, per // 2, per - 1]) for d in range(N_DEV)])
  x[0, shard_probes[::3]] = 1e6                        # every shard's first probe
  x[1, shard_probes[1::3]] = -1e3                      # every shard's middle probe
  x[2, [0, feats // 2, feats - 1]] = 1e3               # the row's own first/middle/last
  x[3] += 1e3 * (np.arange(feats) // per % 2)          # shards alternate between two levels
  x = (x + offset).astype(np.float32)
  w = np.asarray(jax.random.normal(keys[1], (rows, feats)), np.float32)
  params = {"scale": 1.0 + jax.random.uniform(keys[2], (feats,)), "bias": jnp.zeros(feats)}

  def f(p, x, w):
    return jax.value_and_grad(lambda x: jnp.sum(jaxnorm.layer_norm(p, x) * w))(x)

  spec = P(None, "d")
  (_, dx), y = (jax.jit(f)(_put(mesh1, params, P("d")), _put(mesh1, x, spec), _put(mesh1, w, spec)),
                jax.jit(lambda p, x: jaxnorm.layer_norm(p, x))(
                    _put(mesh1, params, P("d")), _put(mesh1, x, spec)))
  scale = np.asarray(params["scale"], np.float64)
  np.testing.assert_allclose(np.asarray(y, np.float64), ref.layer_norm(x, scale), rtol=0, atol=2e-5)
  # Layer norm's rows are batch norm's features once transposed; the scale goes into dy.
  want = ref.batch_norm_input_grad(x.T, (w * scale).T, axis=1, eps=1e-6).T
  row_size = np.max(np.abs(want), axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(dx, np.float64) / row_size, want / row_size, rtol=0,
                             atol=1e-5)


@pytest.mark.parametrize("kind", ["mask", "complex"])
def test_feature_sharded_layer_norm_with_mask_or_complex_input(mesh1, kind):
  # The per-block numbers cross devices packed in one array: with a mask the counts go
  # with them; complex input packs complex frames and means with real variances.
  rows, feats = 4, 16 * N_DEV
  keys = jax.random.split(jax.random.key(8), 3)
  x = 1e3 + np.asarray(jax.random.normal(keys[0], (rows, feats)), np.float64)
  sel = np.ones((rows, feats), bool)
  if kind == "complex":
    x = (x + 1j * np.asarray(jax.random.normal(keys[1], (rows, feats)))).astype(np.complex64)
  else:
    x = x.astype(np.float32)
    sel = np.array(jax.random.uniform(keys[2], (rows, feats)) > 0.4)
    sel[0, 16:] = False                                # row 0: only the first shard selects
  params = {"scale": jnp.ones(feats), "bias": jnp.zeros(feats)}
  mask = None if kind == "complex" else _put(mesh1, sel, P(None, "d"))
  y = jax.jit(lambda p, x, m: jaxnorm.layer_norm(p, x, mask=m))(
      _put(mesh1, params, P("d")), _put(mesh1, x, P(None, "d")), mask)
  # Ba et al.'s statistics over the selected features, in complex128 (E|x - E x|^2).
  x64 = x.astype(np.complex128)
  mu = np.sum(np.where(sel, x64, 0), axis=1, keepdims=True) / sel.sum(1, keepdims=True)
  var = np.sum(np.where(sel, np.abs(x64 - mu) ** 2, 0), axis=1, keepdims=True) / sel.sum(
      1, keepdims=True)
  want = (x64 - mu) / np.sqrt(var + 1e-6)
  got = np.asarray(y).astype(np.complex128)
  np.testing.assert_allclose(got[sel], want[sel], rtol=0, atol=2e-5)
  # Masked-out entries are normalized too, as in Flax. Where a whole shard of a row is masked
  # out, its block has no frame of its own and x - mean rounds at x's magnitude (1e3).
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["batch_norm", "group_norm"])
def test_fsdp_sharded_params_equal_unsharded(mesh1, name):
  # FSDP-style: the batch and the parameters both split over the one data axis.
  x, w, params = _data((16, 2, 16) if name == "group_norm" else (16, 16), seed=3)
  _assert_sharded_equals_unsharded(LAYERS[name], mesh1, x, w, params, P("d"), P("d"))


def test_linen_module_under_sharded_jit_equals_unsharded(mesh2):
  x, w, params = _data((8, 8), seed=4)
  bn = jl.BatchNorm(use_running_average=False, momentum=0.9)
  stats = bn.init(jax.random.key(0), x)["batch_stats"]

  def layer(p, x):
    y, upd = bn.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
    return y, upd["batch_stats"]

  _assert_sharded_equals_unsharded(layer, mesh2, x, w, params, P("d", "m"), P("m"))


def test_nnx_module_under_sharded_jit_equals_unsharded(mesh2):
  x, w, params = _data((8, 8), seed=6)
  graphdef, _, stats = nnx.split(jx.BatchNorm(8, momentum=0.9, rngs=nnx.Rngs(0)), nnx.Param, ...)

  def layer(p, x):
    module = nnx.merge(graphdef, nnx.State(p), stats, copy=True)
    return module(x), nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

  _assert_sharded_equals_unsharded(layer, mesh2, x, w, params, P("d", "m"), P("m"))


@pytest.mark.parametrize("name", ["batch_norm", "layer_norm"])
def test_explicit_mesh_axes_equal_unsharded(name):
  # jax.make_mesh's default axis type is Explicit: shardings are part of the types,
  # and every op must say how its result is sharded. The layers must still work.
  mesh = _mesh((N_DEV,), ("d",), AxisType.Explicit)
  x, w, params = _data((32, 4), seed=5)
  f = jax.jit(_value_and_grads(LAYERS[name]))
  one = f(*jax.device_put((params, x, w), jax.devices()[0]))
  with jax.set_mesh(mesh):
    sharded = f(_put(mesh, params, P()), _put(mesh, x, P("d")), _put(mesh, w, P("d")))
  chex.assert_trees_all_close(sharded, one, rtol=2e-5, atol=2e-5)


def test_moments_gradient_on_explicit_mesh_axes():
  # The merge's derivative took the first block's frame with a gather, which raised a
  # ShardingTypeError along an Explicit batch axis; the value is the textbook derivative of the
  # variance, 2 (x - mean) / n, whatever the mesh.
  mesh = _mesh((N_DEV,), ("d",), AxisType.Explicit)
  x, _, _ = _data((64, 8), seed=7)
  c = np.linspace(-1.0, 2.0, 8)
  f = jax.jit(jax.grad(lambda x: jnp.sum(c.astype(np.float32) * jaxnorm.moments(x, 0)[1])))
  with jax.set_mesh(mesh):
    g = f(_put(mesh, x, P("d")))
  x64 = np.asarray(x, np.float64)
  want = c * 2 * (x64 - x64.mean(0)) / len(x64)
  np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=0, atol=1e-6)


def _bn_values_and_input_grad(params, state):
  """x, w -> (batch mean, batch var, y, dL/dx) of a training batch norm, L = sum(tanh(y) w)."""
  def bn(x):
    y, new = jaxnorm.batch_norm(params, state, x, train=True, momentum=0.0)
    return y, new

  def f(x, w):
    (y, new), vjp = jax.vjp(bn, x)
    dy = (1 - jnp.tanh(y) ** 2) * w
    (dx,) = vjp((dy, jax.tree.map(jnp.zeros_like, new)))
    return new["mean"], new["var"], y, dx
  return f


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("rows", [(0, 256), (0, 511), (1536, 1792)],
                         ids=["block0-first-middle", "block0-first-last", "block3-first-middle"])
def test_batch_statistics_take_the_second_look_under_sharded_jit(kind, rows):
  # 4096 rows over 8 devices: 8 blocks of 512 rows, each in the frame of the median of its
  # first, middle and last rows (moments.probe_frame). Outliers at two of those places put
  # one block's frame 1e4 from its mean, which costs its one-pass sums precision; the
  # second look sums that block again at its mean. Under sharded jit it was not taken
  # (deciding needs every block's test): the variance was off by 7e-5, the input gradient
  # by 4e-5 of its size. Now the tests travel with the statistics in their one gather.
  mesh = _mesh((N_DEV,), ("d",), kind)
  n, c = 4096, 4
  rng = np.random.default_rng(11)
  x = 1e3 + rng.standard_normal((n, c))
  x[list(rows)] = 1e3 + 1e4
  x = x.astype(np.float32)
  w = rng.standard_normal((n, c)).astype(np.float32)
  params, state = jaxnorm.batch_norm_init(c)
  bn = jax.jit(_bn_values_and_input_grad(params, state))
  stats = jax.jit(lambda x: jaxnorm.moments(x, 0))
  with jax.set_mesh(mesh) if kind == AxisType.Explicit else contextlib.nullcontext():
    xs, ws = _put(mesh, x, P("d")), _put(mesh, w, P("d"))
    mean, var, y, dx = bn(xs, ws)
    got_stats = stats(xs)
  x64 = np.asarray(x, np.float64)
  m64, v64 = x64.mean(0), x64.var(0)
  y64 = (x64 - m64) / np.sqrt(v64 + 1e-5)
  dx64 = ref.batch_norm_input_grad(x, (1 - np.tanh(y64) ** 2) * w)
  for mu, v in ((mean, var), got_stats):
    np.testing.assert_array_less(np.abs(np.asarray(v, np.float64) - v64), 1e-6 * v64)
    np.testing.assert_array_less(np.abs(np.asarray(mu, np.float64) - m64),
                                 1e-6 * np.sqrt(v64) + np.spacing(np.float32(m64)))
  # The output keeps the probed frame (x - frame is rounded at 1e4, as on one device with
  # outliers at its probes): measured 4e-6 and 2e-6 of the gradient's size (before: 1.6e-3
  # and 4e-5).
  err = np.abs(np.asarray(y, np.float64) - y64)
  np.testing.assert_array_less(err, 1e-5 * np.maximum(1.0, np.abs(y64)))
  np.testing.assert_allclose(np.asarray(dx, np.float64) / np.max(np.abs(dx64), 0),
                             dx64 / np.max(np.abs(dx64), 0), rtol=0, atol=5e-6)


# Part 2: communication, read from the compiled programs.


def _costs(fn, *args):
  """All-reduces (count, bytes) and the other collectives every call runs, and the
  collectives inside a branch of a conditional (run only when it is taken)."""
  found = collectives(compiled_text(fn, *args))
  always = unconditional(found)
  reduces = [c for c in always if c.kind == "all-reduce"]
  others = [c for c in always if c.kind != "all-reduce"]
  branch = [c for c in found if c.conditional]
  return len(reduces), sum(c.nbytes for c in reduces), others, branch


def _forward(layer):
  return lambda p, x, w: layer(p, x)


# Per device 256 x 64 floats = 64 KiB of activations: far more than any statistics,
# even gathered from all 8 devices (8 x 3 x 64 floats = 6 KiB).
BATCH, FEATURES = 2048, 64
STAT_BYTES = FEATURES * 4            # one float32 statistic per feature


@pytest.mark.parametrize("name", ["batch_norm", "ghost_batch_norm", "batch_renorm"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
def test_batch_statistics_cost_statistics_sized_collectives(mesh1, name, grad):
  x, w, params = _data((BATCH, FEATURES))
  fn = (_value_and_grads if grad else _forward)(LAYERS[name])
  args = (_put(mesh1, params, P()), _put(mesh1, x, P("d")), _put(mesh1, w, P("d")))
  count, nbytes, others, branch = _costs(fn, *args)
  # A gather may bring every device's few statistics per feature (N_DEV x 4 floats),
  # never the activations (a shard is 256 x 64 floats, 8 times more), in the second
  # look's branch neither.
  too_big = [c for c in others + branch if c.nbytes > N_DEV * 4 * STAT_BYTES]
  assert not too_big, too_big
  # All-reduces: a few floats per feature each way (mean, variance, a count; the
  # backward's two sums and the parameter gradients).
  per_feature = 4 * (2 if grad else 1)
  assert nbytes <= per_feature * STAT_BYTES + 64, (count, nbytes)


@pytest.mark.parametrize("kind", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
def test_second_look_costs_no_collective_unless_taken(kind, grad):
  # Batch split: every call gathers the per-block statistics once (frame, mean offset, sum
  # of squared deviations, with the second look's test in the sign bit of the last: the same
  # bytes as without the look), and the
  # backward pass all-reduces its sums once. The second look's branch gathers the blocks'
  # statistics again, and runs only where some block's probed frame is far from its mean;
  # it sums each block on its own device (no gather of x: the size check above).
  mesh = _mesh((N_DEV,), ("d",), kind)
  x, w, params = _data((BATCH, FEATURES))
  fn = (_value_and_grads if grad else _forward)(LAYERS["batch_norm"])
  with jax.set_mesh(mesh) if kind == AxisType.Explicit else contextlib.nullcontext():
    args = (_put(mesh, params, P()), _put(mesh, x, P("d")), _put(mesh, w, P("d")))
    count, _, others, branch = _costs(fn, *args)
  gathered = lambda k: [("all-gather", (("f32", (N_DEV, 1, FEATURES, k)),))]
  assert [(c.kind, c.shapes) for c in others] == gathered(3)
  assert count == (1 if grad else 0)
  assert [(c.kind, c.shapes) for c in branch] == gathered(3)


def test_second_look_with_features_split_costs_one_boolean_all_reduce(mesh1):
  # Under Auto mesh axes tracing cannot tell whether the partitioner splits the batch or the
  # features (tensor parallel); where it splits the features, the one decision for the call
  # takes an all-reduce of one boolean (moments._merged_look_allowed). Its branch needs nothing
  # more: each device holds every block of its features.
  x, w, params = _data((BATCH, FEATURES))
  args = (_put(mesh1, params, P("d")), _put(mesh1, x, P(None, "d")), _put(mesh1, w, P(None, "d")))
  count, nbytes, others, branch = _costs(_forward(LAYERS["batch_norm"]), *args)
  assert (count, nbytes, others, branch) == (1, 1, [], [])


@pytest.mark.parametrize("name", PER_EXAMPLE + ("batch_norm_infer",))
def test_per_example_statistics_need_no_communication_when_the_batch_is_split(mesh1, name):
  # Each example's output and input gradient depend on that example alone.
  x, w, params = _data((BATCH, 2, 4) if name in ("group_norm", "instance_norm") else
                       (BATCH, FEATURES))
  layer = LAYERS[name]
  fn = lambda p, x, w: jax.grad(lambda x: jnp.sum(layer(p, x)[0] * w))(x)
  args = (_put(mesh1, params, P()), _put(mesh1, x, P("d")), _put(mesh1, w, P("d")))
  assert collectives(compiled_text(fn, *args)) == []


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_feature_sharded_norm_reduces_per_example_statistics_only(mesh1, name):
  x, w, params = _data((BATCH // 8, FEATURES * 8))
  args = (_put(mesh1, params, P("d")), _put(mesh1, x, P(None, "d")), _put(mesh1, w, P(None, "d")))
  count, nbytes, others, branch = _costs(_forward(LAYERS[name]), *args)
  assert not branch, branch
  rows = x.shape[0]
  # Per example a few statistics: all-reduced, or gathered from the 8 devices.
  too_big = [c for c in others if c.nbytes > N_DEV * 4 * rows * 4]
  assert not too_big, too_big
  assert 0 < nbytes + sum(c.nbytes for c in others) and nbytes <= 4 * rows * 4 + 64, (count, nbytes)


# No more all-reduces than flax.linen's own module for the same layer and sharding, and no
# more collectives of any kind either (each one is a synchronization: latency on a cluster),
# under shard_map, where the layer's own code gathers the statistics, and under sharded jit,
# where the partitioner does.


def _linen_bn_apply(module):
  def fn(p, x, w):
    variables = {"params": p,
                 "batch_stats": {"mean": jnp.zeros(x.shape[-1]), "var": jnp.ones(x.shape[-1])}}
    return module.apply(variables, x, mutable=["batch_stats"])
  return fn


def _loss_grad(fn):
  """(p, x, w) -> ((dL/dp, dL/dx), new state) for L = sum(y * w), fn -> (y, new state)."""
  def g(p, x, w):
    def loss(p, x):
      y, aux = fn(p, x, w)                   # one call, as a training step makes it
      return jnp.sum(y * w), aux
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(p, x)
  return g


def _smap(mesh, fn, grad):
  # As a data-parallel step is written: per-device batch in, parameter gradients summed,
  # running averages the same on every device.
  out_specs = ((P(), P("d")), P()) if grad else (P("d"), P())
  return jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=out_specs)


# A training call: the output and the new running averages.
BN_PAIRS = {
    "jaxnorm.batch_norm": lambda axis_name: (
        lambda p, x, w: jaxnorm.batch_norm(p, STATE(x.shape[-1]), x, train=True,
                                           axis_name=axis_name)),
    "jaxnorm.linen.BatchNorm": lambda axis_name: (
        lambda p, x, w: _linen_bn_apply(jl.BatchNorm(use_running_average=False,
                                                     axis_name=axis_name))(p, x, w)),
}


@pytest.mark.parametrize("impl", list(BN_PAIRS))
@pytest.mark.parametrize("route", ["sharded_jit", "shard_map"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
def test_batch_norm_collectives_at_most_flax(mesh1, impl, route, grad):
  x, w, params = _data((BATCH, FEATURES))
  axis_name = "d" if route == "shard_map" else None
  ours = BN_PAIRS[impl](axis_name)
  theirs = _linen_bn_apply(nn.BatchNorm(use_running_average=False, axis_name=axis_name))
  if grad:
    ours, theirs = _loss_grad(ours), _loss_grad(theirs)
  if route == "shard_map":
    ours, theirs = _smap(mesh1, ours, grad), _smap(mesh1, theirs, grad)
  args = (_put(mesh1, params, P()), _put(mesh1, x, P("d")), _put(mesh1, w, P("d")))
  # Every call's collectives; the second look's branch (sharded jit) runs only when a
  # block's probed frame is far from its mean (test_second_look_costs_no_collective...).
  ar_ours, _, others_ours, _ = _costs(ours, *args)
  ar_flax, _, others_flax, _ = _costs(theirs, *args)
  assert 1 <= ar_flax
  assert ar_ours <= ar_flax, f"{impl}: {ar_ours} all-reduces, flax.linen.BatchNorm {ar_flax}"
  n_ours, n_flax = ar_ours + len(others_ours), ar_flax + len(others_flax)
  assert n_ours <= n_flax, f"{impl}: {n_ours} collectives, flax.linen.BatchNorm {n_flax}"


FEATURE_SHARDED_PAIRS = {
    "layer_norm": (lambda p, x, w: (jaxnorm.layer_norm(p, x), {}),
                   lambda p, x, w: (nn.LayerNorm().apply({"params": p}, x), {})),
    "rms_norm": (lambda p, x, w: (jaxnorm.rms_norm({"scale": p["scale"]}, x), {}),
                 lambda p, x, w: (nn.RMSNorm().apply({"params": {"scale": p["scale"]}}, x), {})),
}


@pytest.mark.parametrize("name, grad", [
    ("layer_norm", False),
    ("layer_norm", True),
    ("rms_norm", False),
    ("rms_norm", True),
])
def test_feature_sharded_norm_all_reduces_at_most_flax(mesh1, name, grad):
  x, w, params = _data((BATCH // 8, FEATURES * 8))
  ours, theirs = FEATURE_SHARDED_PAIRS[name]
  if grad:
    ours, theirs = _loss_grad(ours), _loss_grad(theirs)
  args = (_put(mesh1, params, P("d")), _put(mesh1, x, P(None, "d")), _put(mesh1, w, P(None, "d")))
  ar_ours, _, others_ours, branch = _costs(ours, *args)
  ar_flax, _, others_flax, _ = _costs(theirs, *args)
  assert not branch, branch
  assert 1 <= ar_flax
  assert ar_ours <= ar_flax, f"jaxnorm.{name}: {ar_ours} all-reduces, flax.linen {ar_flax}"
  n_ours, n_flax = ar_ours + len(others_ours), ar_flax + len(others_flax)
  assert n_ours <= n_flax, f"jaxnorm.{name}: {n_ours} collectives, flax.linen {n_flax}"
