"""Tests of `jaxnorm.moments` and of the block statistics every layer uses (moments.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import random_data
from jax.test_util import check_grads

import jaxnorm
from jaxnorm._src import moments as moments_lib

import reference as ref


@pytest.mark.parametrize("shape,axis", [((6, 3), 0), ((6, 3), -1), ((2, 3, 4), (0, 2)),
                                        ((2, 3, 4), (0, 1, 2))])
def test_mean_and_biased_variance(run, shape, axis):
  x = 1.0 + 2.0 * random_data.normal(jax.random.key(0), shape)
  mean, var = run(jaxnorm.moments, x, axis=axis)
  axes = axis if isinstance(axis, tuple) else (axis,)
  mean_ref, var_ref = ref.mean_var(x, axes)
  chex.assert_trees_all_close((mean, var), (mean_ref, var_ref), atol=1e-5, rtol=1e-5)
  assert mean.dtype == var.dtype == jnp.float32


def test_keepdims():
  x = random_data.normal(jax.random.key(0), (2, 3, 4))
  mean, var = jaxnorm.moments(x, (0, 2), keepdims=True)
  chex.assert_shape((mean, var), (1, 3, 1))


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_offset_is_exact(offset):
  x = (offset + random_data.normal(jax.random.key(0), (1000, 2))).astype(jnp.float32)
  mean, var = jax.jit(lambda x: jaxnorm.moments(x, 0))(x)
  mean_ref, var_ref = ref.mean_var(x, 0)   # the same float32 values, in float64
  chex.assert_trees_all_close(var, var_ref, rtol=1e-4)
  chex.assert_trees_all_close(mean, mean_ref, rtol=1e-7)


def test_low_precision_inputs_give_float32_statistics():
  x = (3.0 + random_data.normal(jax.random.key(0), (64, 2))).astype(jnp.bfloat16)
  mean, var = jaxnorm.moments(x, 0)
  assert mean.dtype == var.dtype == jnp.float32
  chex.assert_trees_all_close((mean, var), ref.mean_var(x, 0), atol=1e-5, rtol=1e-5)


def test_float64_under_x64():
  with jax.enable_x64(True):
    x = random_data.normal(jax.random.key(0), (8, 2), jnp.float64) + 1e8
    mean, var = jaxnorm.moments(x, 0)
    assert mean.dtype == var.dtype == jnp.float64
    chex.assert_trees_all_close((mean, var), ref.mean_var(x, 0), atol=0, rtol=1e-12)


@pytest.mark.parametrize("mask_shape", [(8, 3), (8, 1)])
def test_mask_equals_statistics_of_selected_entries(run, mask_shape):
  x = 5.0 + random_data.normal(jax.random.key(0), (8, 3))
  mask = random_data.bernoulli(jax.random.key(1), 0.5, mask_shape).at[:2].set(True)
  mean, var = run(jaxnorm.moments, x, axis=0, mask=mask)
  chex.assert_trees_all_close((mean, var), ref.masked_channel_moments(x, mask),
                              atol=1e-5, rtol=1e-5)


def test_complex_mean_and_real_variance():
  k1, k2 = jax.random.split(jax.random.key(0))
  x = (3 - 4j) + random_data.normal(k1, (32, 2)) + 2j * random_data.normal(k2, (32, 2))
  mean, var = jaxnorm.moments(x, 0)
  assert jnp.iscomplexobj(mean) and not jnp.iscomplexobj(var)
  mean_ref, var_ref = ref.mean_var(x, 0)   # E|x|^2 - |E x|^2
  chex.assert_trees_all_close(mean, mean_ref, atol=1e-5)
  chex.assert_trees_all_close(var, var_ref, atol=1e-4, rtol=1e-5)


def test_constant_input():
  x = jnp.full((5, 2), 1e5)
  mean, var = jaxnorm.moments(x, 0)
  chex.assert_trees_all_equal((mean, var), (jnp.full(2, 1e5), jnp.zeros(2)))
  grads = jax.grad(lambda x: jnp.sum(jnp.sqrt(jaxnorm.moments(x, 0)[1] + 1e-5)))(x)
  chex.assert_tree_all_finite(grads)


def test_check_grads():
  # Second order (five times the compiles of first) once, with the mask.
  with jax.enable_x64(True):
    x = random_data.normal(jax.random.key(0), (5, 3), jnp.float64)
    check_grads(jax.jit(lambda x: jaxnorm.moments(x, 0)), (x,), order=1,
                modes=["fwd", "rev"])
    mask = jnp.array([True, False, True, True, False])[:, None]
    check_grads(jax.jit(lambda x: jaxnorm.moments(x, 0, mask=mask)), (x,), order=2,
                modes=["fwd", "rev"])


def test_block_moments_compose_to_the_textbook_formula():
  """Blocks in their own frames, merged, give the float64 statistics; RMS gives mean squares."""
  x = 1e4 + random_data.normal(jax.random.key(0), (64, 3))
  view = moments_lib.block_view(x.shape, (0,), 4)
  m = moments_lib.block_moments(x.reshape(view.shape), view)
  assert m.shift.shape == (4, 1, 3) and m.var.shape == (1, 1, 3)
  mean, var = ref.mean_var(x, 0)
  chex.assert_trees_all_close(m.mean[0, 0], mean, rtol=1e-7)
  chex.assert_trees_all_close(m.var[0, 0], var, rtol=1e-6)
  chex.assert_trees_all_close(m.num_values[0, 0], np.full(3, 64.0))
  view1 = moments_lib.block_view(x.shape, (1,), 1)
  rms = moments_lib.block_moments(x, view1, rms=True)
  assert rms.shift is None and rms.mean_off is None
  chex.assert_trees_all_close(rms.var[:, 0], (ref.f64(x) ** 2).mean(axis=1), rtol=1e-6)


def test_vmap_and_jit_agree():
  x = random_data.normal(jax.random.key(0), (4, 6, 3))
  mean, var = jax.jit(jax.vmap(lambda x: jaxnorm.moments(x, 0)))(x)
  for i in range(4):
    chex.assert_trees_all_close((mean[i], var[i]), ref.mean_var(x[i], 0), atol=1e-5)


# Exact on any data: the adversarial grid of the "one exact core" issue. Each
# column of `x` has its own offset (0 to 1e7); the float64 reference is taken on
# the same float32 values. Targets: variance relative error <= 1e-6, mean error
# <= 1e-6 standard deviations (beyond the float32 spacing of the mean itself),
# output error <= 1e-5 of the output's magnitude (at least 1).

OFFSETS = np.array([0.0, 1e3, 1e5, 1e7], np.float32)


def adversarial(kind, n, seed=0, cols=4):
  """float32 data of shape (n, cols): offsets per column (the first ``cols``
  of OFFSETS), plus one kind of trouble."""
  rng = np.random.default_rng(seed)
  if kind == "student_t2":
    z = rng.standard_t(2, (n, cols))
  else:
    z = rng.standard_normal((n, cols))
  x = (z + OFFSETS[:cols]).astype(np.float32)
  big = {"outlier_1e3_first": 1e3, "outlier_1e6_last": 1e6,
         "outlier_1e3_random": 1e3, "outlier_1e6_random": 1e6}.get(kind)
  if big is not None:
    pos = {"first": 0, "last": n - 1}.get(kind.rsplit("_", 1)[1], int(rng.integers(n)))
    x[pos] = OFFSETS[:cols] + np.float32(big)
  return x


KINDS = ("gaussian", "student_t2", "outlier_1e3_first", "outlier_1e6_last",
         "outlier_1e3_random", "outlier_1e6_random")


def assert_exact_stats(mean, var, x, mask=None, var_rtol=1e-6):
  x64 = ref.f64(x)
  if mask is not None:
    m64, v64 = ref.masked_channel_moments(x64, mask)
  else:
    m64, v64 = x64.mean(0), x64.var(0)
  mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
  np.testing.assert_array_less(np.abs(var - v64), var_rtol * v64 + 1e-30)
  spacing = np.spacing(np.abs(m64).astype(np.float32)).astype(np.float64)
  np.testing.assert_array_less(np.abs(mean - m64), 1e-6 * np.sqrt(v64) + spacing)


def assert_exact_output(y, y64):
  y, y64 = np.asarray(y, np.float64), np.asarray(y64, np.float64)
  np.testing.assert_array_less(np.abs(y - y64), 1e-5 * np.maximum(1.0, np.abs(y64)))


@pytest.mark.parametrize("n", [2, 3, 17, 1000, 2**16])
def test_moments_exact_on_adversarial_data(n):
  f = jax.jit(lambda x: jaxnorm.moments(x, 0))
  for kind in KINDS:
    x = adversarial(kind, n)
    assert_exact_stats(*f(x), x)


@pytest.mark.parametrize("n", [3, 1000, 2**16])
def test_moments_exact_with_nan_padding(n):
  f = jax.jit(lambda x, m: jaxnorm.moments(x, 0, mask=m))
  rng = np.random.default_rng(1)
  for kind in KINDS:
    x = adversarial(kind, n)
    mask = rng.random((n, 4)) < 0.7
    mask[:2] = True                       # at least two selected per column
    padded = np.where(mask, x, np.nan).astype(np.float32)
    assert_exact_stats(*f(padded, mask), x, mask)


@pytest.mark.parametrize("n", [17, 2**16])
def test_batch_norm_output_exact_on_adversarial_data(n):
  params, state = jaxnorm.batch_norm_init(4)
  f = jax.jit(lambda x: jaxnorm.batch_norm(params, state, x, train=True, momentum=0.0))
  for kind in KINDS:
    x = adversarial(kind, n)
    y, new = f(x)
    y64, _m64, _v64 = ref.batch_norm_train(x)
    assert_exact_output(y, y64)
    assert_exact_stats(new["mean"], new["var"], x)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2**20, 2**24])
def test_moments_exact_at_millions_of_values(n):
  f = jax.jit(lambda x: jaxnorm.moments(x, 0))
  for kind in ("gaussian", "outlier_1e3_first", "outlier_1e6_random", "student_t2"):
    x = adversarial(kind, n, cols=2 if n > 2**22 else 4)
    assert_exact_stats(*f(x), x)


# Plain sums where they are exact enough (moments._plain_or_shifted; layer and
# group norm forward passes ask for them): rows whose every one has
# mean^2 <= var take sums in frame 0, the others sums in a frame taken from
# the data. Both must meet the targets above, on either side of the
# threshold; the frame the statistics come back in tells which sums were taken.

# mean / std of every row: plain sums up to 1.
RATIOS = (0.0, 0.5, 0.99, 1.01, 3.0, 1e3)


def around_threshold(kind, n, ratio, seed=0):
  """float32 (n, 4) with mean = ratio * std in every column, std 1e-3 to 1e3;
  its transpose has the statistics of rows."""
  rng = np.random.default_rng(seed)
  z = rng.standard_t(3, (n, 4)) if kind == "student_t3" else rng.standard_normal((n, 4))
  if kind == "outlier":
    z[int(rng.integers(n))] = 40.0
  z = (z - z.mean(0)) / z.std(0)
  scale = np.array([1e-3, 1.0, 7.0, 1e3])
  return ((ratio + z) * scale).astype(np.float32)


def _frames(x):
  view = moments_lib.block_view(x.shape, (x.ndim - 1,), 1)
  return moments_lib.block_moments(jnp.asarray(x), view, plain_first=True)


def _frames_without_loop(x):
  # The plain-sums mechanism itself: where the compiled loop applies (float32
  # on one CPU device, cpu_sums.py) layer norm's statistics take it instead.
  view = moments_lib.block_view(x.shape, (x.ndim - 1,), 1)
  return moments_lib.block_moments(jnp.asarray(x), view, plain_first=True, compiled_sums=False)


def _plain(stats):
  return np.asarray(stats.shift) == 0


@pytest.mark.parametrize("n", [3, 1000, 2**16])
@pytest.mark.parametrize("kind", ["gaussian", "student_t3", "outlier"])
def test_moments_exact_on_both_sides_of_the_plain_sums_threshold(n, kind):
  f = jax.jit(_frames)
  for ratio in RATIOS:
    x = around_threshold(kind, n, ratio)
    stats = f(x.T)
    assert_exact_stats(stats.mean[:, 0], stats.var[:, 0], x)


def test_plain_sums_are_taken_for_centred_rows_only():
  f = jax.jit(_frames_without_loop)
  for ratio in RATIOS:
    x = around_threshold("gaussian", 1000, ratio).T
    assert np.all(_plain(f(x)) == (ratio <= 1.0)), ratio
  # One offset row is enough for frames from the data, for every row.
  x = around_threshold("gaussian", 1000, 0.0).T
  x[2] += 100.0
  assert not np.any(_plain(f(x)))
  # NaN and inf never pass (their statistics are NaN, as before).
  for bad in (np.nan, np.inf):
    x = around_threshold("gaussian", 1000, 0.0).T
    x[1, 5] = bad
    assert not np.any(_plain(f(x)))


def test_plain_sums_are_decided_once_for_a_vmapped_batch():
  centred = around_threshold("gaussian", 64, 0.0).T
  offset = around_threshold("gaussian", 64, 1e3, seed=1).T
  f = jax.jit(jax.vmap(_frames_without_loop))
  assert np.all(_plain(f(np.stack([centred, centred]))))
  mixed = f(np.stack([centred, offset]))
  assert not np.any(_plain(mixed))
  for i, x in enumerate((centred, offset)):
    assert_exact_stats(mixed.mean[i][:, 0], mixed.var[i][:, 0], x.T)
  # A per-example choice would make the `cond` a select running both branches.
  jaxpr = str(jax.make_jaxpr(jax.vmap(_frames_without_loop))(np.stack([centred, offset])))
  assert "cond[" in jaxpr


@pytest.mark.parametrize("ratio", [0.0, 0.99, 3.0])
def test_plain_sums_gradients_match_the_textbook_formula(ratio):
  x = jnp.asarray(around_threshold("gaussian", 16, ratio)[:, 1:3].T)
  def loss(f):
    return lambda x: jnp.sum(jnp.stack(f(x)) * jnp.array([[0.3], [-1.7]]))
  plain = lambda x: (lambda m: (m.mean[:, 0], m.var[:, 0]))(_frames(x))
  textbook = lambda x: (x.mean(-1), x.var(-1))
  chex.assert_trees_all_close(jax.grad(loss(plain))(x), jax.grad(loss(textbook))(x),
                              atol=1e-4, rtol=1e-4)


def test_zero_size_input_gives_an_empty_result():
  mean, var = jaxnorm.moments(jnp.zeros((0, 3)), 0)
  assert mean.shape == (3,) and var.shape == (3,)
  np.testing.assert_array_equal(np.asarray(var), 0.0)


# The second look: the frame is the median of three probed rows (first, middle,
# last), so outliers at two of them move it. "edges": the first and last rows;
# "periodic": every 32nd row (the first and the middle one). Without the second
# look the variance of a derivative program's statistics was off by 4e-5 to 5e-5
# on this data (the forward pass's compiled loops always took it).

@pytest.fixture
def looks_in_jax(monkeypatch):
  """The second look in JAX's operations (its ``lax.cond``, as on other
  backends) for arrays on one device: this suite runs on eight CPU devices,
  where a decision on the data could need a collective, so the look is left
  out (tests/test_cpu_sums.py has the compiled call)."""
  from jaxnorm._src import cpu_sums
  monkeypatch.setattr(cpu_sums, "_unpartitioned", lambda x: True)
  monkeypatch.setenv("JAXNORM_CPU_KERNEL", "0")


def probes_taken(kind, n, seed=0):
  x = adversarial("gaussian", n, seed)
  rows = [0, n - 1] if kind == "edges" else slice(0, n, 32)
  x[rows] += np.float32(1e4) * np.array([1.0, -3.0, 50.0, 1.0], np.float32)
  return x


@pytest.mark.parametrize("n", [64, 4096])
@pytest.mark.parametrize("kind", ["edges", "periodic"])
def test_second_look_when_outliers_take_the_probes(looks_in_jax, kind, n):
  x = probes_taken(kind, n)
  # The float32 sums' own rounding, with four outliers of 3e4 among 64
  # values, reaches 1.0e-6 of the variance (the frame is no longer the limit).
  assert_exact_stats(*jax.jit(lambda x: jaxnorm.moments(x, 0))(x), x, var_rtol=2e-6)
  # A training step's program: statistics and dx (closed form in float64).
  params, state = jaxnorm.batch_norm_init(4)
  dy = np.cos(np.arange(x.size, dtype=np.float32)).reshape(x.shape)

  def loss(x):
    y, new = jaxnorm.batch_norm(params, state, x, train=True, momentum=0.0)
    return jnp.sum(y * dy), new

  (_, new), dx = jax.jit(jax.value_and_grad(loss, has_aux=True))(x)
  assert_exact_stats(new["mean"], new["var"], x, var_rtol=2e-6)
  dx64 = ref.batch_norm_input_grad(x, dy)
  np.testing.assert_array_less(np.abs(np.asarray(dx, np.float64) - dx64),
                               np.broadcast_to(1e-5 * np.abs(dx64).max(axis=0), dx64.shape))
  # Layer norm over rows of the transposed data, forward and derivative.
  xt = np.ascontiguousarray(x.T)
  y64 = ref.layer_norm(xt, eps=1e-6)
  lp = jaxnorm.layer_norm_init(n)
  assert_exact_output(jax.jit(lambda x: jaxnorm.layer_norm(lp, x))(xt), y64)
  _, vjp = jax.vjp(lambda x: jaxnorm.layer_norm(lp, x), xt)
  assert np.all(np.isfinite(np.asarray(vjp(jnp.ones_like(xt))[0])))


def test_second_look_is_decided_once_for_a_vmapped_batch(looks_in_jax):
  """One example with outliers at its probes: every example exact, and the
  vmapped program keeps one ``cond`` (a per-example predicate would make it a
  select that sums twice for all)."""
  xs = np.stack([adversarial("gaussian", 256, 1), probes_taken("edges", 256),
                 adversarial("student_t2", 256, 2)])
  f = jax.jit(jax.vmap(lambda x: jaxnorm.moments(x, 0)))
  mean, var = f(xs)
  for i in range(3):
    assert_exact_stats(mean[i], var[i], xs[i])
  hlo = f.lower(xs).as_text()
  assert hlo.count("stablehlo.case") == 1 and "jaxnorm_refine_moments" not in hlo


def test_second_look_taken_on_many_devices_unless_per_example_and_partitioned():
  """Eight devices. Data whose type names no mesh (not sharded) take the
  second look, a ``lax.cond`` (the compiled loops are for one device), and
  get exact statistics: it was once left out there. Data sharded along the
  batch under ``jit`` take it after the blocks' gather (the decision travels
  with the statistics; tests/test_sharding.py counts the collectives), but
  per-example statistics there decide nothing on the data (their decision
  would be an all-reduce per call); inside ``shard_map`` each device decides
  for its own block (four columns)."""
  x = probes_taken("edges", 64)
  f = jax.jit(lambda x: jaxnorm.moments(x, 0))
  assert "stablehlo.case" in f.lower(x).as_text()
  assert_exact_stats(*f(x), x)
  mesh = jax.make_mesh((8,), ("b",))
  sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P("b")))
  assert "stablehlo.case" in f.lower(sharded).as_text()
  assert_exact_stats(*f(sharded), x)
  rows = jax.device_put(np.tile(x, (1, 32)), jax.NamedSharding(mesh, jax.P("b")))
  assert "stablehlo.case" not in jax.jit(lambda x: jaxnorm.moments(x, 1)).lower(rows).as_text()
  g = jax.shard_map(lambda x: jnp.stack(jaxnorm.moments(x, 0))[None], mesh=mesh,
                    in_specs=jax.P(None), out_specs=jax.P("b"))
  assert "stablehlo.case" in jax.jit(g).lower(x).as_text()
  for stats in np.asarray(jax.jit(g)(x)):
    assert_exact_stats(*stats, x)


def second_look_derivatives_close(x, rtol, stats=lambda x: jaxnorm.moments(x, 0)):
  """JVP and VJP of the mean and variance (``stats(x)``, over axis 0) through
  the second look against the float64 closed forms: d mean = <t>,
  d var = 2 <(x - mean)(t - <t>)>."""
  t = np.cos(np.arange(x.size)).reshape(x.shape).astype(x.dtype)
  x64, t64 = ref.f64(x), ref.f64(t)
  c64 = x64 - x64.mean(0)
  for i, want, grad in ((0, t64.mean(0), np.ones_like(x64) / len(x64)),
                        (1, 2 * (c64 * (t64 - t64.mean(0))).mean(0), 2 * c64 / len(x64))):
    f = jax.jit(lambda x, i=i: stats(x)[i])
    _, jv = jax.jvp(f, (jnp.asarray(x),), (jnp.asarray(t),))
    np.testing.assert_allclose(np.asarray(jv, np.float64), want, rtol=rtol,
                               atol=rtol * np.abs(want).max())
    g = jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x))))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g, np.float64), grad, rtol=0,
                               atol=rtol * np.abs(grad).max())


def test_second_look_gradients_match_the_textbook_formula(looks_in_jax):
  """The derivatives of the statistics through the second look (float64: the
  sums in JAX's operations; float32 in tests/test_cpu_sums.py's compiled call).
  Finite differences (``check_grads``) are not exact enough on this data."""
  with jax.enable_x64(True):
    second_look_derivatives_close(np.asarray(probes_taken("edges", 32), np.float64), 1e-10)
