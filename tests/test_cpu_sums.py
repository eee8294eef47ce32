"""The compiled framed column sums of the CPU backend (cpu_sums.py, _cpu_sums.c).

References are float64 NumPy sums of the same float32 values. This suite runs
on eight CPU devices (conftest), where the statistics leave the compiled loop
out (a custom call would make XLA's partitioner gather a sharded `x`); the
fixture `one_device` lets it in for arrays that live on one device, which is
what it sees in a one-device process (checked in a subprocess below).
"""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P
from test_moments import adversarial
from test_moments import assert_exact_stats
from test_moments import probes_taken
from test_moments import second_look_derivatives_close

import jaxnorm
from jaxnorm._src import cpu_sums
from jaxnorm._src import moments as moments_lib

import reference as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_device(monkeypatch):
  monkeypatch.setattr(cpu_sums, "_unpartitioned", lambda x: True)
  monkeypatch.delenv("JAXNORM_CPU_KERNEL", raising=False)


@pytest.fixture
def fused_columns(one_device, monkeypatch):
  """Batch norm's fused forward call, opt-in (cpu_sums.forward_enabled)."""
  monkeypatch.setenv("JAXNORM_CPU_COLUMN_FWD", "1")


def hard_data(shape, seed=0, offset=1e4):
  """Offset, heavy-tailed columns with an outlier: float32."""
  rng = np.random.default_rng(seed)
  x = offset + rng.standard_t(3, size=shape) * rng.uniform(0.5, 4, size=shape[-1])
  x.reshape(-1)[len(x.reshape(-1)) // 3] += 1e3
  return x.astype(np.float32)


def framed_ref(x, f):
  d = x.astype(np.float64) - f.astype(np.float64)[:, None, :]
  return d.sum(1), (d * d).sum(1), np.abs(d).sum(1)


def test_built_here():
  # CI installs with a C compiler; a missing library would quietly leave
  # every test below on JAX's sums.
  assert cpu_sums.built()


@pytest.mark.parametrize("p,r,c", [
    (1, 1, 16), (1, 15, 17), (1, 16, 31), (1, 17, 32), (3, 33, 33), (2, 100, 48),
    (1, 1000, 100), (5, 7, 1000),
    (1, 4096, 256),   # 2**20 values: rows split over threads
    (8, 512, 256),    # slabs split over threads
    # One kept value (row sums, layer norm): along the rows.
    (1, 1, 1), (3, 15, 1), (2, 16, 1), (5, 257, 1), (64, 768, 1),
    (1, 1 << 20, 1),   # one row split over threads
    (1024, 1024, 1),   # rows split over threads
])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sums_match_float64(p, r, c, dtype):
  x = jnp.asarray(hard_data((p, r, c), offset=1e4 if dtype == "float32" else 30.0), dtype)
  f = x[:, r // 2, :].astype(jnp.float32)
  s1, s2 = jax.jit(cpu_sums._framed_sums)(x, f)
  x, f = np.asarray(x.astype(jnp.float32)), np.asarray(f)
  assert "jaxnorm_framed_column_sums" in jax.jit(cpu_sums._framed_sums).lower(x, f).as_text()
  r1, r2, a1 = framed_ref(x, f)
  # A sum's rounding is relative to the sum of magnitudes.
  np.testing.assert_array_less(np.abs(np.asarray(s1, np.float64) - r1), 1e-6 * a1 + 1e-30)
  np.testing.assert_allclose(np.asarray(s2, np.float64), r2, rtol=1e-6)


def test_nan_and_inf_stay_in_their_column():
  x = hard_data((1, 40, 32))
  x[0, 5, 3] = np.nan
  x[0, 7, 20] = np.inf
  s1, s2 = cpu_sums._framed_sums(x, x[:, 0, :])
  s1, s2 = np.asarray(s1)[0], np.asarray(s2)[0]
  assert np.isnan(s1[3]) and np.isnan(s2[3])
  assert s1[20] == np.inf and s2[20] == np.inf
  others = np.setdiff1d(np.arange(32), [3, 20])
  assert np.all(np.isfinite(s1[others])) and np.all(np.isfinite(s2[others]))


def test_gradient_is_the_formula():
  x = hard_data((2, 30, 16), offset=3.0)
  f = x[:, 0, :] + 0.5
  rng = np.random.default_rng(1)
  w1, w2 = rng.standard_normal((2, 2, 16)).astype(np.float32)

  def loss(x, f):
    s1, s2 = cpu_sums._framed_sums(x, f)
    return jnp.sum(w1 * s1 + w2 * s2)

  gx, gf = jax.jit(jax.grad(loss, (0, 1)))(x, f)
  d = x.astype(np.float64) - f.astype(np.float64)[:, None, :]
  w1, w2 = w1.astype(np.float64), w2.astype(np.float64)
  want_gx = w1[:, None, :] + 2 * w2[:, None, :] * d
  want_gf = -30 * w1 - 2 * w2 * d.sum(1)
  np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gf, want_gf, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("f_batched", [True, False])
def test_vmap_folds_the_mapped_axis(f_batched):
  x = hard_data((4, 3, 20, 32))
  f = x[:, :, 0, :] if f_batched else x[0, :, 0, :]
  in_axes = (0, 0 if f_batched else None)
  s1, s2 = jax.jit(jax.vmap(cpu_sums._framed_sums, in_axes))(x, f)
  fb = f if f_batched else np.broadcast_to(f, (4,) + f.shape)
  for i in range(4):
    r1, r2, a1 = framed_ref(x[i], fb[i])
    np.testing.assert_array_less(np.abs(np.asarray(s1[i], np.float64) - r1), 1e-6 * a1)
    np.testing.assert_allclose(np.asarray(s2[i], np.float64), r2, rtol=1e-6)


def test_vmap_of_grad(one_device):
  x = hard_data((3, 2, 20, 16), offset=2.0)
  assert uses_kernel(jax.vmap(jax.grad(lambda x: jnp.sum(jaxnorm.moments(x, (0,))[1]))), x)

  def var_sum(x):
    return jnp.sum(jaxnorm.moments(x, (0,))[1])

  # d/dx of the biased variance over axis 0: 2 (x - mean) / n, per example.
  x64 = x.astype(np.float64)
  want = 2 * (x64 - x64.mean(axis=1, keepdims=True)) / x.shape[1]
  chex.assert_trees_all_close(jax.vmap(jax.grad(var_sum))(x), want, rtol=1e-5, atol=1e-6)


def test_layout():
  assert cpu_sums.layout((8, 4, 4, 64), (0, 1, 2)) == (1, 128, 64)
  assert cpu_sums.layout((8, 4, 4, 64), (1, 2)) == (8, 16, 64)    # instance norm
  assert cpu_sums.layout((8, 4, 4, 64), (0, 2)) is None           # not contiguous
  assert cpu_sums.layout((256, 768), (1,)) == (256, 768, 1)       # rows (layer norm)
  assert cpu_sums.layout((4, 8, 96), (1, 2)) == (4, 768, 1)
  assert cpu_sums.layout((8, 15), (0,)) is None                   # under 16 columns


def test_used_only_where_it_applies(one_device, monkeypatch):
  x = jnp.asarray(hard_data((8, 4, 4, 32)))
  assert cpu_sums.usable(x, (0, 1, 2))
  assert cpu_sums.usable(x.astype(jnp.bfloat16), (0, 1, 2))
  assert not cpu_sums.usable(x.astype(jnp.bfloat16), (3,))     # bf16 rows: XLA's sums
  assert cpu_sums.usable(x, (3,))
  assert not cpu_sums.usable(x.astype(jnp.float16), (0, 1, 2))
  assert not cpu_sums.usable(x, (0, 2))
  monkeypatch.setenv("JAXNORM_CPU_KERNEL", "0")
  assert not cpu_sums.usable(x, (0, 1, 2))


SUMS, ROWS, COLUMNS = "jaxnorm_framed_column_sums", "jaxnorm_row_norm", "jaxnorm_column_norm"


def uses_kernel(f, x, target=SUMS):
  return target in jax.jit(f).lower(x).as_text()


@pytest.mark.parametrize("offset", [0.0, 1e5])
@pytest.mark.parametrize("shape", [(16, 4, 4, 64), (7, 3, 5, 33), (64, 130)])
def test_batch_norm_matches_float64(one_device, shape, offset):
  x = hard_data(shape, offset=offset)
  c = shape[-1]
  params = {"scale": np.linspace(0.5, 2, c, dtype=np.float32),
            "bias": np.linspace(-1, 1, c, dtype=np.float32)}
  state = {"mean": jnp.zeros(c), "var": jnp.ones(c)}

  def f(x):
    return jaxnorm.batch_norm(params, state, x, train=True)

  # By default the forward pass takes the compiled sums and XLA's output step
  # (which fuses with what follows it); the fused call is opt-in (below). The
  # derivative's program keeps XLA's sums for float32 columns.
  assert uses_kernel(f, x, SUMS) and not uses_kernel(f, x, COLUMNS)
  y, new_state = jax.jit(f)(x)
  y_ref, mu, var = ref.batch_norm_train(x, params["scale"], params["bias"])
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=0)
  mu, std = mu.ravel(), np.sqrt(var.ravel())
  assert np.all(np.abs(new_state["mean"] - 0.01 * mu) <= 1e-6 * 0.01 * (np.abs(mu) + std))
  np.testing.assert_allclose(new_state["var"], 0.99 + 0.01 * var.ravel(), rtol=1e-6)
  # The derivative of a scalar loss against the float64 closed form.
  dy = np.cos(y_ref).astype(np.float32)
  gx = jax.jit(jax.grad(lambda x: jnp.sum(f(x)[0] * dy)))(x)
  gx_ref = ref.batch_norm_input_grad(x, dy, params["scale"])
  np.testing.assert_allclose(gx, gx_ref, atol=2e-4 * np.abs(gx_ref).max())


@pytest.mark.parametrize("offset", [0.0, 1e5])
@pytest.mark.parametrize("shape,axes", [((64, 768), (-1,)), ((4, 8, 96), (-2, -1)),
                                        ((7, 33), (-1,))])
def test_layer_norm_matches_float64(one_device, shape, axes, offset):
  x = hard_data(shape, offset=offset)
  feat = shape[axes[0]:]
  params = {"scale": np.linspace(0.5, 2, np.prod(feat), dtype=np.float32).reshape(feat),
            "bias": np.linspace(-1, 1, np.prod(feat), dtype=np.float32).reshape(feat)}
  f = lambda x: jaxnorm.layer_norm(params, x, axis=axes)
  # The forward pass is one fused loop (below), and so is its backward pass
  # (row_grad.py).
  assert uses_kernel(f, x, ROWS) and not uses_kernel(f, x)
  want = ref.layer_norm(x, params["scale"], params["bias"], axes=axes)
  np.testing.assert_allclose(jax.jit(f)(x), want, atol=2e-5)
  dy = np.cos(want).astype(np.float32)
  loss = lambda x: jnp.sum(f(x) * dy)
  assert uses_kernel(jax.grad(loss), x, ROW_GRAD)
  want_dx = row_vjp64(x, dy, params["scale"], tuple(a % x.ndim for a in axes), rms=False)[0]
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), want_dx,
                             atol=1e-4 * np.abs(want_dx).max())


@pytest.mark.parametrize("layer", ["batch_norm", "instance_norm"])
def test_bfloat16_is_read_as_it_is(one_device, layer):
  x = jnp.asarray(hard_data((32, 96), offset=20.0), jnp.bfloat16)
  if layer == "batch_norm":
    state = {"mean": jnp.zeros(96), "var": jnp.ones(96)}
    f = lambda x: jaxnorm.batch_norm(None, state, x, train=True)[0]
    want = ref.batch_norm_train(x)[0]
  else:
    x = x.reshape(2, 16, 96)
    f = lambda x: jaxnorm.instance_norm(None, x)
    want = ref.instance_norm(x)
  assert uses_kernel(f, x)
  # No float32 copy of x is written for the loop: the program's temporaries
  # stay below one (32 x 96 float32 = 12 KiB).
  temp = jax.jit(f).lower(x).compile().memory_analysis().temp_size_in_bytes
  assert temp < 32 * 96 * 4, temp
  y = jax.jit(f)(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=2e-2)


def test_bfloat16_columns_in_the_derivative(one_device):
  # The derivative's program takes bfloat16 column statistics with the loop
  # (float32 columns keep XLA's sums there).
  x = jnp.asarray(hard_data((64, 48), offset=20.0), jnp.bfloat16)
  state = {"mean": jnp.zeros(48), "var": jnp.ones(48)}
  dy = np.cos(np.arange(64 * 48, dtype=np.float32)).reshape(64, 48)
  loss = lambda x: jnp.sum(jaxnorm.batch_norm(None, state, x, train=True)[0] * dy)
  assert uses_kernel(jax.grad(loss), x)
  assert not uses_kernel(jax.grad(loss), x.astype(jnp.float32))
  gx = jax.jit(jax.grad(loss))(x)
  want = ref.batch_norm_input_grad(np.asarray(x, np.float32), dy)
  np.testing.assert_allclose(np.asarray(gx, np.float32), want, atol=2e-2 * np.abs(want).max())


def test_instance_norm_matches_float64(one_device):
  x = hard_data((3, 8, 8, 48), offset=1e5)
  f = lambda x: jaxnorm.instance_norm(None, x)
  assert uses_kernel(f, x)
  np.testing.assert_allclose(jax.jit(f)(x), ref.instance_norm(x), atol=2e-5)


def test_ghost_batch_norm_blocks(one_device):
  x = hard_data((32, 4, 48), offset=1e4)
  state = {"mean": jnp.zeros(48), "var": jnp.ones(48)}
  f = lambda x: jaxnorm.batch_norm(None, state, x, train=True, virtual_batch_size=8)[0]
  assert uses_kernel(f, x)
  want = np.concatenate([ref.batch_norm_train(x[i:i + 8])[0] for i in range(0, 32, 8)])
  np.testing.assert_allclose(jax.jit(f)(x), want, atol=2e-5)


# The second look of statistics summed in JAX's operations (moments.py,
# `_second_look`): one compiled call, `jaxnorm_refine_moments`, that sums
# again only where the probed frame is far from the mean. test_moments.py has
# the same checks for the `lax.cond` of other backends (this suite's eight
# devices leave the compiled calls out).
REFINE = "jaxnorm_refine_moments"


def wide(x, columns=32):
  return np.ascontiguousarray(np.tile(x, (1, columns // x.shape[1])))


@pytest.mark.parametrize("kind", ["edges", "periodic"])
def test_second_look_in_a_training_step(one_device, kind):
  x = wide(probes_taken(kind, 4096))
  params, state = jaxnorm.batch_norm_init(32)
  dy = np.cos(np.arange(x.size, dtype=np.float32)).reshape(x.shape)

  def loss(x):
    y, new = jaxnorm.batch_norm(params, state, x, train=True, momentum=0.0)
    return jnp.sum(y * dy), new

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  assert REFINE in step.lower(x).as_text()
  (_, new), dx = step(x)
  assert_exact_stats(new["mean"], new["var"], x)
  dx64 = ref.batch_norm_input_grad(x, dy)
  np.testing.assert_array_less(np.abs(np.asarray(dx, np.float64) - dx64),
                               np.broadcast_to(1e-5 * np.abs(dx64).max(axis=0), dx64.shape))


def test_second_look_after_the_compiled_sums(one_device):
  """Instance norm's forward pass takes its sums with the compiled loop
  (several slabs: not the fused call), then the same second look. Outliers
  at two of the three probed places (positions (0, 0) and (16, 0) of each
  32x32 image) and nowhere else: without the second look the output's error
  was 2.7e-5 of its magnitude, with it 2.2e-6."""
  x = np.stack([wide(adversarial("gaussian", 1024, seed)) for seed in range(3)])
  x = x.reshape(3, 32, 32, 32)
  x[:, [0, 16], 0] += np.float32(1e4)
  f = lambda x: jaxnorm.instance_norm(None, x)
  hlo = jax.jit(f).lower(x).as_text()
  assert SUMS in hlo and REFINE in hlo
  y64 = ref.instance_norm(x)
  np.testing.assert_array_less(np.abs(np.asarray(jax.jit(f)(x), np.float64) - y64),
                               5e-6 * np.maximum(1, np.abs(y64)))


def _median3_rows(x):
  r = x.shape[1]
  a, b, c = x[:, 0], x[:, r // 2], x[:, r - 1]
  return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))


@pytest.mark.parametrize("far", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("p,r,c", [(1, 4096, 32), (3, 200, 16), (64, 512, 1)])
def test_refine_matches_float64(one_device, p, r, c, dtype, far):
  """Columns (c >= 16) and rows (c == 1). With outliers at the probes of
  every other feature, all frames move to the means (one decision for the
  call); without, nothing changes. The compiled call and the `lax.cond` give
  the float64 statistics either way."""
  rng = np.random.default_rng(0)
  offset = 1e5 if dtype == "float32" else 100.0  # bfloat16 spacing there: 0.5
  x = (offset + rng.standard_normal((p, r, c)) * 3).astype(jnp.dtype(dtype))
  hit = (np.arange(p * c).reshape(p, c) % 2 == 0) & far
  for row in (0, r - 1):
    x[:, row] = np.where(hit, np.asarray(x[:, row], np.float64) + 100 * offset, x[:, row])
  x64 = np.asarray(x, np.float64)
  frame = _median3_rows(x64).astype(np.float32)
  d = x64 - frame[:, None]
  s1, s2 = d.sum(1).astype(np.float32), (d * d).sum(1).astype(np.float32)
  keep = lambda v: jnp.asarray(v)[:, None]
  mean64, var64 = x64.mean(1), x64.var(1)
  compiled = jax.jit(lambda x, f, a, b: cpu_sums.refine_moments(
      x, f, a, b, (1,), in_jax=moments_lib._second_look_in_jax))
  assert REFINE in compiled.lower(x, keep(frame), keep(s1), keep(s2)).as_text()
  in_jax = jax.jit(lambda x, f, a, b: moments_lib._second_look_in_jax(x, f, a, b, (1,)))
  for f in (compiled, in_jax):
    g, m, q = (np.asarray(v, np.float64)[:, 0] for v in f(x, keep(frame), keep(s1), keep(s2)))
    if far:
      assert np.all(np.abs(g - mean64) <= 0.1 * np.sqrt(var64))
    else:
      np.testing.assert_array_equal(g, frame)
    np.testing.assert_allclose(g + m, mean64, rtol=1e-7, atol=1e-6 * np.sqrt(var64).max())
    np.testing.assert_allclose(q / r, var64, rtol=2e-6)


def test_second_look_under_vmap(one_device):
  """Per-example batch norm (its forward call leaves `vmap` to JAX's
  operations): the examples fold into one call, one decision for all."""
  xs = np.stack([wide(probes_taken("edges", 256)),
                 wide(np.random.default_rng(3).standard_normal((256, 4)).astype(np.float32))])
  params, state = jaxnorm.batch_norm_init(32)

  def loss(x):
    y, new = jaxnorm.batch_norm(params, state, x, train=True, momentum=0.0)
    return jnp.sum(jnp.sin(y)), new

  step = jax.jit(jax.vmap(jax.value_and_grad(loss, has_aux=True)))
  assert REFINE in step.lower(xs).as_text()
  (_, new), _ = step(xs)
  for i in range(2):
    assert_exact_stats(new["mean"][i], new["var"][i], xs[i])


def test_refine_derivatives_match_the_textbook_formula(one_device):
  """The call's derivative rule: those of s1 / n and s2 - s1^2 / n."""
  x = wide(probes_taken("edges", 256))

  def stats(x):
    frame = lax.stop_gradient(x[:1])
    d = x - frame
    s1, s2 = jnp.sum(d, 0, keepdims=True), jnp.sum(d * d, 0, keepdims=True)
    g, m, q = cpu_sums.refine_moments(x, frame, s1, s2, (0,),
                                      in_jax=moments_lib._second_look_in_jax)
    return (g + m)[0], (q / len(x))[0]

  assert REFINE in jax.jit(stats).lower(x).as_text()
  second_look_derivatives_close(x, 2e-5, stats)


def test_left_out_on_a_partitioned_mesh_and_used_in_shard_map():
  # No fixture: eight devices, as the suite runs.
  x = jnp.asarray(hard_data((16, 4, 32)))
  state = {"mean": jnp.zeros(32), "var": jnp.ones(32)}
  mesh = jax.make_mesh((8,), ("b",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("b")))
  f = lambda x: jaxnorm.batch_norm(None, state, x, train=True)[0]
  assert not uses_kernel(f, sharded)

  def per_device(x):
    return jaxnorm.batch_norm(None, state, x, train=True, axis_name="b")[0]

  g = jax.shard_map(per_device, mesh=mesh, in_specs=P("b"), out_specs=P("b"))
  assert uses_kernel(g, sharded)
  np.testing.assert_allclose(jax.jit(g)(sharded), ref.batch_norm_train(x)[0], atol=2e-5)


def test_left_out_under_a_mesh_of_one_device(monkeypatch):
  # As on a one-device machine with `jax.set_mesh` and Explicit axes: the
  # types carry the sharding, which a custom call's results would lack.
  monkeypatch.setattr(jax, "device_count", lambda *args, **kwargs: 1)
  mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:1])
  x = hard_data((16, 4, 32))
  state = {"mean": jnp.zeros(32), "var": jnp.ones(32)}
  seen = []

  def f(x):
    seen.append(cpu_sums._unpartitioned(x))
    return jaxnorm.batch_norm(None, state, x, train=True)[0]

  with jax.set_mesh(mesh):
    y = jax.jit(f)(jax.device_put(x, jax.sharding.NamedSharding(mesh, P("d"))))
  assert seen == [False]
  np.testing.assert_allclose(y, ref.batch_norm_train(x)[0], atol=2e-5)


def test_one_device_process_uses_it_by_default():
  code = textwrap.dedent("""
      import jax, jax.numpy as jnp, jaxnorm
      assert jax.device_count() == 1
      x = jnp.ones((8, 4, 4, 32)) + jnp.arange(32.0)
      state = {"mean": jnp.zeros(32), "var": jnp.ones(32)}
      f = lambda x: jaxnorm.batch_norm(None, state, x, train=True)[0]
      print("jaxnorm_framed_column_sums" in jax.jit(f).lower(x).as_text())
  """)
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAXNORM_CPU_KERNEL", "JAXNORM_CPU_COLUMN_FWD")}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300, check=True)
  assert out.stdout.split()[-1] == "True"
  env["JAXNORM_CPU_KERNEL"] = "0"
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300, check=True)
  assert out.stdout.split()[-1] == "False"


def test_without_the_library_the_sums_stay_in_jax(one_device, monkeypatch):
  # An install without a C compiler: same results, no custom call.
  monkeypatch.setattr(cpu_sums, "_extension", None)
  x = hard_data((16, 4, 4, 32), offset=1e5)
  state = {"mean": jnp.zeros(32), "var": jnp.ones(32)}
  f = lambda x: jaxnorm.batch_norm(None, state, x, train=True)[0]
  assert not cpu_sums.usable(jnp.asarray(x), (0, 1, 2))
  assert not uses_kernel(f, x)
  np.testing.assert_allclose(jax.jit(f)(x), ref.batch_norm_train(x)[0], atol=2e-5)


# Layer and RMS norm's fused forward loop (cpu_sums.row_norm): statistics and
# output per row from one read of x.


def row_stats(x, axes, rms=False):
  """Float64 mean and variance (RMS: 0 and the mean square) over ``axes``."""
  x = x.astype(np.float64)
  if rms:
    return np.zeros(x.shape[:x.ndim - len(axes)]), (x * x).mean(axis=axes)
  return x.mean(axis=axes), x.var(axis=axes)


@pytest.mark.parametrize("shape,axes", [
    ((1, 1), (1,)), ((3, 2), (1,)), ((3, 15), (1,)), ((2, 16), (1,)), ((5, 257), (1,)),
    ((64, 768), (1,)), ((4, 8, 96), (1, 2)),
    ((300, 1024), (1,)),    # rows split over threads
    ((1, 1 << 18), (1,)),   # one long row
])
@pytest.mark.parametrize("offset", [0.0, 1e5])
@pytest.mark.parametrize("rms", [False, True])
def test_fused_rows_match_float64(one_device, shape, axes, offset, rms):
  from jaxnorm._src import normalize
  x = hard_data(shape, seed=sum(shape), offset=0.0 if rms else offset)
  feat = shape[axes[0]:]
  n = int(np.prod(feat))
  scale = np.linspace(0.5, 2, n, dtype=np.float32).reshape(feat)
  bias = None if rms else np.linspace(-1, 1, n, dtype=np.float32).reshape(feat)

  def f(x):
    out = normalize.normalize_batch(x, axes=axes, scale=scale, bias=bias, eps=1e-6, rms=rms,
                                    blocks=1)
    return out.y, out.mean, out.var

  assert uses_kernel(f, x, ROWS)
  y, mean, var = jax.jit(f)(x)
  mu, v = row_stats(x, axes, rms)
  want = (ref.rms_norm(x, scale, axes=axes) if rms
          else ref.layer_norm(x, scale, bias, axes=axes))
  np.testing.assert_allclose(y, want, atol=2e-5, rtol=0)
  # Mean within float32 rounding of its value (relative to the spread), variance to 1e-6.
  assert np.all(np.abs(np.asarray(mean, np.float64) - mu) <= 1e-6 * (np.abs(mu) + np.sqrt(v)))
  np.testing.assert_allclose(np.asarray(var, np.float64), v, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("layer", ["layer_norm", "batch_norm"])
def test_fused_forward_switches(one_device, monkeypatch, layer):
  # Which forward pass runs (cpu_sums.forward_enabled): layer norm's fused
  # call unless JAXNORM_CPU_ROW_FWD=0; batch norm's only with
  # JAXNORM_CPU_COLUMN_FWD=1 (else the compiled sums and XLA's output step,
  # which fuses with an elementwise op after it). Each way against float64,
  # with a ReLU after the layer. The variable is read when the layer is
  # traced: each setting takes a shape of its own, so no trace is reused.
  p = {"scale": np.linspace(0.5, 2, 64, dtype=np.float32),
       "bias": np.linspace(-1, 1, 64, dtype=np.float32)}
  if layer == "layer_norm":
    f = lambda x: jax.nn.relu(jaxnorm.layer_norm(p, x))
    fused, variable, default_on = ROWS, "JAXNORM_CPU_ROW_FWD", True
    want = lambda x: ref.layer_norm(x, p["scale"], p["bias"])
  else:
    state = {"mean": jnp.zeros(64), "var": jnp.ones(64)}
    f = lambda x: jax.nn.relu(jaxnorm.batch_norm(p, state, x, train=True)[0])
    fused, variable, default_on = COLUMNS, "JAXNORM_CPU_COLUMN_FWD", False
    want = lambda x: ref.batch_norm_train(x, p["scale"], p["bias"])[0]
  for rows, value, on in ((45, None, default_on), (46, "1", True), (47, "0", False)):
    if value is None:
      monkeypatch.delenv(variable, raising=False)
    else:
      monkeypatch.setenv(variable, value)
    x = hard_data((rows, 64), offset=1e5)
    assert uses_kernel(f, x, fused) == on, (variable, value)
    if not on and layer == "batch_norm":
      assert uses_kernel(f, x, SUMS)
    np.testing.assert_allclose(jax.jit(f)(x), np.maximum(want(x), 0), atol=2e-5, rtol=0)


@pytest.mark.parametrize("params", ["none", "scale", "bias", "both"])
@pytest.mark.parametrize("layer", ["layer_norm", "batch_norm"])
def test_fused_calls_each_parameter(fused_columns, layer, params):
  x = hard_data((40, 32), offset=3.0)
  p = {}
  if params in ("scale", "both"):
    p["scale"] = np.linspace(-1, 2, 32, dtype=np.float32)
  if params in ("bias", "both"):
    p["bias"] = np.linspace(3, -1, 32, dtype=np.float32)
  if layer == "layer_norm":
    f = lambda x: jaxnorm.layer_norm(p, x)
    target, want = ROWS, ref.layer_norm(x, p.get("scale"), p.get("bias"))
  else:
    state = {"mean": jnp.zeros(32), "var": jnp.ones(32)}
    f = lambda x: jaxnorm.batch_norm(p, state, x, train=True)[0]
    target, want = COLUMNS, ref.batch_norm_train(x, p.get("scale"), p.get("bias"))[0]
  assert uses_kernel(f, x, target)
  np.testing.assert_allclose(jax.jit(f)(x), want, atol=2e-5)


def test_fused_rows_nan_and_inf_stay_in_their_row():
  x = hard_data((4, 50), offset=2.0)
  x[1, 7] = np.nan
  x[2, 30] = np.inf
  loop = jax.jit(lambda x, eps: cpu_sums._row_norm_compiled(x, eps, None, None, rms=False))
  y, mean, var = loop(x, jnp.float32(1e-6))
  y, mean, var = np.asarray(y), np.asarray(mean), np.asarray(var)
  assert np.all(np.isnan(y[1])) and np.isnan(var[1])
  assert np.all(np.isnan(y[2])) and np.isnan(var[2])
  want = ref.layer_norm(x[[0, 3]])
  np.testing.assert_allclose(y[[0, 3]], want, atol=2e-5)


def test_fused_rows_vmap(one_device):
  x = hard_data((3, 10, 64), offset=1e3)
  scale = np.linspace(0.5, 2, 64, dtype=np.float32)
  # Shared parameters: the mapped axis becomes more rows of one loop.
  f = jax.vmap(lambda x: jaxnorm.layer_norm({"scale": scale}, x))
  assert uses_kernel(f, x, ROWS)
  np.testing.assert_allclose(jax.jit(f)(x), ref.layer_norm(x, scale), atol=2e-5)
  # Per-example parameters: JAX's operations, the same values.
  scales = np.stack([scale, scale[::-1], 2 * scale])
  g = jax.vmap(lambda s, x: jaxnorm.layer_norm({"scale": s}, x))
  y = jax.jit(g)(scales, x)
  for i in range(3):
    np.testing.assert_allclose(y[i], ref.layer_norm(x[i], scales[i]), atol=2e-5)
  assert "jaxnorm_row_norm" not in jax.jit(g).lower(scales, x).as_text()


def test_fused_rows_only_where_they_apply(one_device):
  x = hard_data((4, 6, 32), offset=5.0)
  assert uses_kernel(lambda x: jaxnorm.rms_norm({"scale": np.ones(32, np.float32)}, x), x, ROWS)
  # Instance norm on channels-first data: its scale varies over the rows.
  xc = hard_data((2, 8, 6, 5), offset=5.0)
  inorm = {"scale": np.linspace(0.5, 2, 8, dtype=np.float32), "bias": np.zeros(8, np.float32)}
  g = lambda x: jaxnorm.instance_norm(inorm, x, axis=1)
  assert not uses_kernel(g, xc, ROWS)
  np.testing.assert_allclose(jax.jit(g)(xc), ref.instance_norm(np.moveaxis(xc, 1, -1),
                                                              inorm["scale"], inorm["bias"])
                             .transpose(0, 3, 1, 2), atol=2e-5)
  # A mask, bfloat16, or a bfloat16 output: JAX's operations.
  mask = np.arange(32) < 20
  assert not uses_kernel(lambda x: jaxnorm.layer_norm({}, x, mask=mask), x, ROWS)
  assert not uses_kernel(lambda x: jaxnorm.layer_norm({}, x.astype(jnp.bfloat16)), x, ROWS)
  assert not uses_kernel(lambda x: jaxnorm.layer_norm({}, x, dtype=jnp.bfloat16), x, ROWS)


def test_fused_rows_left_out_on_a_partitioned_mesh_and_used_in_shard_map():
  x = jnp.asarray(hard_data((16, 48), offset=1e4))
  mesh = jax.make_mesh((8,), ("b",))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("b")))
  f = lambda x: jaxnorm.layer_norm({}, x)
  assert not uses_kernel(f, sharded, ROWS)
  g = jax.shard_map(f, mesh=mesh, in_specs=P("b"), out_specs=P("b"))
  assert uses_kernel(g, sharded, ROWS)
  np.testing.assert_allclose(jax.jit(g)(sharded), ref.layer_norm(x), atol=2e-5)


# Layer and RMS norm's compiled backward pass (row_grad.py): the tangent rule
# as one primitive whose transpose is one compiled loop.

ROW_GRAD, COLUMN_GRAD = "@jaxnorm_row_norm_grad(", "@jaxnorm_column_norm_grad("


def row_vjp64(x, g, scale, axes, rms, eps=1e-6):
  """Float64 backward pass of layer (RMS) norm over the trailing ``axes``:
  ``dx = r (gs - <gs> - xhat <gs xhat>)`` with ``gs = g * scale`` (no
  ``<gs>`` for RMS), ``dscale = sum g xhat``, ``dbias = sum g`` over rows."""
  x, g = x.astype(np.float64), g.astype(np.float64)
  feat = x.shape[axes[0]:]
  x2, g2 = x.reshape(-1, int(np.prod(feat))), g.reshape(-1, int(np.prod(feat)))
  mu = 0.0 if rms else x2.mean(1, keepdims=True)
  r = 1 / np.sqrt(((x2 - mu) ** 2).mean(1, keepdims=True) + eps)
  xhat = (x2 - mu) * r
  gs = g2 * (1.0 if scale is None else np.asarray(scale, np.float64).reshape(-1))
  inner = gs - xhat * (gs * xhat).mean(1, keepdims=True)
  if not rms:
    inner = inner - gs.mean(1, keepdims=True)
  return ((r * inner).reshape(x.shape), (g2 * xhat).sum(0).reshape(feat),
          g2.sum(0).reshape(feat))


def assert_close_rel(got, want, rtol, scale=0.0):
  """Within ``rtol`` of the largest of ``|want|`` and ``scale`` (the size of
  the terms that cancel in ``want``)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.max(np.abs(got - want))
  assert err <= rtol * max(np.max(np.abs(want)), scale), err


@pytest.mark.parametrize("shape,axes", [
    ((1, 1), (1,)), ((3, 15), (1,)), ((5, 257), (1,)), ((64, 768), (1,)), ((4, 8, 96), (1, 2)),
    ((300, 1024), (1,)),    # rows split over threads
    ((40, 1 << 13), (1,)),  # long rows over threads
])
@pytest.mark.parametrize("offset", [0.0, 1e5])
@pytest.mark.parametrize("rms", [False, True])
def test_row_backward_matches_float64(one_device, shape, axes, offset, rms):
  x = hard_data(shape, seed=sum(shape), offset=0.0 if rms else offset)
  g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
  feat = shape[axes[0]:]
  n = int(np.prod(feat))
  p = {"scale": np.linspace(0.5, 2, n, dtype=np.float32).reshape(feat)}
  if not rms:
    p["bias"] = np.linspace(-1, 1, n, dtype=np.float32).reshape(feat)
  layer = jaxnorm.rms_norm if rms else jaxnorm.layer_norm
  f = lambda p, x, g: jax.vjp(lambda p, x: layer(p, x, axis=axes), p, x)[1](g)
  assert ROW_GRAD in jax.jit(f).lower(p, x, g).as_text()
  dp, dx = jax.jit(f)(p, x, g)
  wdx, wds, wdb = row_vjp64(x, g, p["scale"], axes, rms)
  # dx's terms are of the size of rsqrt(var + eps) * g * scale.
  x64 = x.astype(np.float64).reshape(-1, n)
  var = x64.var(1) if not rms else (x64 ** 2).mean(1)
  terms = np.max(np.abs(g.reshape(-1, n) * p["scale"].reshape(-1))) / np.sqrt(var.min() + 1e-6)
  assert_close_rel(dx, wdx, 2e-6, terms)
  assert_close_rel(dp["scale"], wds, 2e-6)
  if not rms:
    assert_close_rel(dp["bias"], wdb, 2e-6)


@pytest.mark.parametrize("params,wrt", [
    ("none", "x"), ("scale", "x"), ("scale", "scale"), ("scale", "all"),
    ("both", "x"), ("both", "scale"), ("both", "bias"), ("both", "x+bias"), ("both", "all"),
])
def test_row_backward_each_parameter_and_gradient(one_device, params, wrt):
  x = hard_data((24, 40), offset=7.0)
  g = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)
  p = {}
  if params != "none":
    p["scale"] = np.linspace(-1, 2, 40, dtype=np.float32)
  if params == "both":
    p["bias"] = np.linspace(3, -1, 40, dtype=np.float32)
  names = [k for k in ("scale", "bias") if k in p and (k in wrt or wrt == "all")]
  want_x = wrt in ("x", "x+bias", "all")

  def f(x, diff):
    full = {**p, **diff}
    return jnp.sum(jaxnorm.layer_norm(full, x) * g)

  grad = jax.jit(jax.grad(f, argnums=(0, 1) if want_x else 1))
  diff = {k: p[k] for k in names}
  out = grad(x, diff)
  dx, dp = out if want_x else (None, out)
  wdx, wds, wdb = row_vjp64(x, g, p.get("scale"), (1,), rms=False)
  if want_x:
    assert_close_rel(dx, wdx, 2e-6)
  if "scale" in names:
    assert_close_rel(dp["scale"], wds, 2e-6)
  if "bias" in names:
    assert_close_rel(dp["bias"], wdb, 2e-6)
  assert ROW_GRAD in grad.lower(x, diff).as_text()


@pytest.mark.parametrize("shape", [(5, 257), (64, 768), (300, 1024)])
@pytest.mark.parametrize("rms", [False, True])
def test_row_backward_bfloat16(one_device, shape, rms):
  # bfloat16 rows in and out: read as they are, dx rounded to nearest even.
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 2, jnp.bfloat16)
  g = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  p = {"scale": np.linspace(0.5, 2, shape[-1], dtype=np.float32)}
  layer = jaxnorm.rms_norm if rms else jaxnorm.layer_norm
  f = lambda p, x, g: jax.vjp(lambda p, x: layer(p, x, dtype=jnp.bfloat16), p, x)[1](g)
  assert ROW_GRAD in jax.jit(f).lower(p, x, g).as_text()
  dp, dx = jax.jit(f)(p, x, g)
  assert dx.dtype == jnp.bfloat16
  x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
  wdx, wds, _ = row_vjp64(x64, g64, p["scale"], (1,), rms=rms)
  got = np.asarray(dx, np.float64)
  # Each value within half a bfloat16 ulp (at most 2^-8 relative) of the
  # exact one, plus float32 rounding.
  assert np.all(np.abs(got - wdx) <= 2.0 ** -8 * np.abs(wdx) + 1e-5 * np.abs(wdx).max())
  assert_close_rel(dp["scale"], wds, 2e-6)
  # NaN stays in its row.
  xn = x.at[1, 3].set(jnp.nan)
  dxn = np.asarray(jax.jit(f)(p, xn, g)[1], np.float32)
  assert np.all(np.isnan(dxn[1])) and np.all(np.isfinite(np.delete(dxn, 1, axis=0)))


def _plain_layer_norm(p, x):
  """Layer norm as the paper writes it, in jnp (JAX's autodiff differentiates it)."""
  mu = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
  return (x - mu) * lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]


def test_row_backward_forward_mode_and_higher_orders(one_device):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((16, 64)).astype(np.float32)
  t = rng.standard_normal(x.shape).astype(np.float32)
  g = rng.standard_normal(x.shape).astype(np.float32)
  p = {"scale": np.linspace(0.5, 2, 64, dtype=np.float32),
       "bias": np.linspace(-1, 1, 64, dtype=np.float32)}
  f = lambda x: jaxnorm.layer_norm(p, x)
  # Forward mode: the closed form, the same as the plain formula's JVP.
  jv = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,))[1])(x, t)
  np.testing.assert_allclose(jv, jax.jvp(lambda x: _plain_layer_norm(p, x), (x,), (t,))[1],
                             atol=2e-5)
  # Second order (reverse of reverse, forward of reverse) and jacfwd of grad.
  loss = lambda h: lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(h(x) * g))(x) ** 2)
  plain = lambda x: _plain_layer_norm(p, x)
  np.testing.assert_allclose(jax.jit(jax.grad(loss(f)))(x), jax.grad(loss(plain))(x),
                             rtol=2e-4, atol=2e-4)
  hv = lambda h: jax.jvp(jax.grad(lambda x: jnp.sum(h(x) * g)), (x,), (t,))[1]
  np.testing.assert_allclose(jax.jit(lambda: hv(f))(), hv(plain), rtol=2e-4, atol=2e-4)
  # The derivative with respect to eps (the reference's transpose).
  de = jax.grad(lambda e: jnp.sum(jaxnorm.layer_norm(p, x, eps=e) * g))(jnp.float32(0.5))
  mu = x.astype(np.float64).mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  want = np.sum(g * p["scale"] * (x - mu) * -0.5 * (var + 0.5) ** -1.5)
  np.testing.assert_allclose(de, want, rtol=1e-5)


def test_row_backward_under_vmap_and_remat(one_device):
  rng = np.random.default_rng(4)
  xb = rng.standard_normal((3, 10, 64)).astype(np.float32) + 50
  gb = rng.standard_normal(xb.shape).astype(np.float32)
  p = {"scale": np.linspace(0.5, 2, 64, dtype=np.float32)}
  f = lambda p, x: jaxnorm.layer_norm(p, x)
  want = [row_vjp64(xb[i], gb[i], p["scale"], (1,), rms=False) for i in range(3)]
  # vmap of a backward pass: the mapped axis becomes more rows (dx only) ...
  vdx = jax.jit(jax.vmap(lambda x, g: jax.vjp(lambda x: f(p, x), x)[1](g)[0]))
  assert ROW_GRAD in vdx.lower(xb, gb).as_text()
  # ... and per-example parameter gradients run in JAX's operations.
  vdp = jax.jit(jax.vmap(lambda x, g: jax.vjp(lambda p: f(p, x), p)[1](g)[0]["scale"]))
  # The backward pass of a vmapped layer, and under jax.checkpoint.
  gv = jax.jit(lambda x, g: jax.vjp(jax.vmap(lambda x: f(p, x)), x)[1](g)[0])
  assert ROW_GRAD in gv.lower(xb, gb).as_text()
  gr = jax.jit(lambda x, g: jax.vjp(jax.checkpoint(lambda x: f(p, x)), x)[1](g)[0])
  for i in range(3):
    assert_close_rel(vdx(xb, gb)[i], want[i][0], 2e-6)
    assert_close_rel(vdp(xb, gb)[i], want[i][1], 2e-6)
    assert_close_rel(gv(xb, gb)[i], want[i][0], 2e-6)
    assert_close_rel(gr(xb, gb)[i], want[i][0], 2e-6)


def test_row_backward_nan_stays_in_its_row(one_device):
  x = hard_data((4, 50), offset=2.0)
  x[1, 7] = np.nan
  g = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
  dx = jax.jit(jax.grad(lambda x: jnp.sum(jaxnorm.layer_norm({}, x) * g)))(x)
  dx = np.asarray(dx)
  assert np.all(np.isnan(dx[1]))
  assert_close_rel(dx[[0, 2, 3]], row_vjp64(x[[0, 2, 3]], g[[0, 2, 3]], None, (1,), False)[0],
                   2e-6)


def test_row_backward_switch_and_shard_map(one_device, monkeypatch):
  x = jnp.asarray(hard_data((16, 48), offset=1e4))
  g = jnp.asarray(np.random.default_rng(5).standard_normal((16, 48)), jnp.float32)
  p = {"scale": jnp.linspace(0.5, 2, 48), "bias": jnp.zeros(48)}
  f = lambda p, x, g: jax.vjp(lambda p, x: jaxnorm.layer_norm(p, x), p, x)[1](g)
  monkeypatch.setenv("JAXNORM_CPU_ROW_GRAD", "0")
  assert ROW_GRAD not in jax.jit(f).lower(p, x, g).as_text()
  monkeypatch.delenv("JAXNORM_CPU_ROW_GRAD")
  # Inside shard_map each device takes its rows; the invariant parameters'
  # gradients are summed over the devices.
  monkeypatch.undo()
  mesh = jax.make_mesh((8,), ("b",))
  rows = jax.sharding.NamedSharding(mesh, P("b"))
  x, g = jax.device_put(x, rows), jax.device_put(g, rows)
  sm = jax.shard_map(f, mesh=mesh, in_specs=(P(), P("b"), P("b")), out_specs=(P(), P("b")))
  assert ROW_GRAD in jax.jit(sm).lower(p, x, g).as_text()
  dp, dx = jax.jit(sm)(p, x, g)
  wdx, wds, wdb = row_vjp64(np.asarray(x), np.asarray(g), np.asarray(p["scale"]), (1,), False)
  assert_close_rel(dx, wdx, 2e-6)
  assert_close_rel(dp["scale"], wds, 2e-6)
  assert_close_rel(dp["bias"], wdb, 2e-6)
  # The derivative in eps there (the reference's transpose), summed over devices.
  de = jax.jit(jax.shard_map(
      jax.grad(lambda e, x, g: jnp.sum(jaxnorm.layer_norm(p, x, eps=e) * g)),
      mesh=mesh, in_specs=(P(), P("b"), P("b")), out_specs=P()))(jnp.float32(0.5), x, g)
  x64 = np.asarray(x, np.float64)
  c = x64 - x64.mean(-1, keepdims=True)
  var = (c ** 2).mean(-1, keepdims=True)
  want = np.sum(np.asarray(g) * np.asarray(p["scale"]) * c * -0.5 * (var + 0.5) ** -1.5)
  np.testing.assert_allclose(de, want, rtol=1e-5)


# Batch norm's fused training forward pass (cpu_sums.column_norm): column sums
# per thread, one merge, then each thread's output rows.


@pytest.mark.parametrize("shape", [
    (16, 16), (17, 33), (7, 3, 5, 33), (64, 130), (8, 8, 8, 64),
    (16, 16, 16, 64),   # rows split over threads
    (4096, 300),        # over threads, with a tail of 12 columns
])
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_fused_columns_match_float64(fused_columns, shape, offset):
  from jaxnorm._src import normalize
  x = hard_data(shape, seed=sum(shape), offset=offset)
  c = shape[-1]
  scale = np.linspace(0.5, 2, c, dtype=np.float32)
  bias = np.linspace(-1, 1, c, dtype=np.float32)
  axes = tuple(range(len(shape) - 1))

  def f(x):
    out = normalize.normalize_batch(x, axes=axes, scale=scale, bias=bias, eps=1e-5, blocks=1)
    return out.y, out.mean, out.var

  assert uses_kernel(f, x, COLUMNS)
  y, mean, var = jax.jit(f)(x)
  y_ref, mu, v = ref.batch_norm_train(x, scale, bias)
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=0)
  mu, v = mu.ravel(), v.ravel()
  assert np.all(np.abs(np.asarray(mean, np.float64) - mu) <= 1e-6 * (np.abs(mu) + np.sqrt(v)))
  np.testing.assert_allclose(np.asarray(var, np.float64), v, rtol=1e-6)


def test_fused_columns_nan_stays_in_its_column(fused_columns):
  x = hard_data((64, 32), offset=2.0)
  x[10, 4] = np.nan
  x[20, 9] = np.inf
  state = {"mean": jnp.zeros(32), "var": jnp.ones(32)}
  f = lambda x: jaxnorm.batch_norm(None, state, x, train=True)
  assert uses_kernel(f, x, COLUMNS)
  y, new = jax.jit(f)(x)
  y = np.asarray(y)
  assert np.all(np.isnan(y[:, 4])) and np.all(np.isnan(y[:, 9]))
  others = np.setdiff1d(np.arange(32), [4, 9])
  np.testing.assert_allclose(y[:, others], ref.batch_norm_train(x[:, others])[0], atol=2e-5)
  assert np.all(np.isfinite(np.asarray(new["var"])[others]))


def test_fused_columns_under_vmap_and_grad(fused_columns):
  x = hard_data((3, 40, 32), offset=1e3)
  state = {"mean": jnp.zeros(32), "var": jnp.ones(32)}
  f = lambda x: jaxnorm.batch_norm(None, state, x, train=True)[0]
  # Under vmap each example has its own statistics: JAX's operations.
  y = jax.jit(jax.vmap(f))(x)
  for i in range(3):
    np.testing.assert_allclose(y[i], ref.batch_norm_train(x[i])[0], atol=2e-5)
  # The derivative's program is the closed-form tangent rule in JAX's
  # operations (the compiled backward call is opt-in for columns).
  dy = np.cos(np.arange(40 * 32, dtype=np.float32)).reshape(40, 32)
  loss = lambda x: jnp.sum(f(x) * dy)
  assert not uses_kernel(jax.grad(loss), x[0], COLUMN_GRAD)
  want = ref.batch_norm_input_grad(x[0], dy)
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(x[0]), want, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("shape", [(16, 16), (17, 33), (8, 8, 8, 64),
                                   (16, 16, 16, 64),   # rows split over threads
                                   (4096, 300)])
@pytest.mark.parametrize("offset", [0.0, 1e5])
def test_column_backward_opt_in_matches_float64(one_device, monkeypatch, shape, offset):
  monkeypatch.setenv("JAXNORM_CPU_COLUMN_GRAD", "1")
  x = hard_data(shape, seed=sum(shape), offset=offset)
  g = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
  c = shape[-1]
  p = {"scale": np.linspace(0.5, 2, c, dtype=np.float32),
       "bias": np.linspace(-1, 1, c, dtype=np.float32)}
  state = {"mean": jnp.zeros(c), "var": jnp.ones(c)}
  f = lambda p, x, g: jax.vjp(
      lambda p, x: jaxnorm.batch_norm(p, state, x, train=True, eps=1e-6)[0], p, x)[1](g)
  assert COLUMN_GRAD in jax.jit(f).lower(p, x, g).as_text()
  dp, dx = jax.jit(f)(p, x, g)
  # Batch norm over the leading axes is layer norm of the transposed data.
  x2, g2 = x.reshape(-1, c).T, g.reshape(-1, c).T
  wdx = row_vjp64(x2, g2, None, (1,), rms=False)[0] * p["scale"][:, None]
  x64 = x2.astype(np.float64)
  xhat = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-6)
  terms = np.max(np.abs(g2 * p["scale"][:, None])) / np.sqrt(x64.var(1).min() + 1e-6)
  assert_close_rel(dx, wdx.T.reshape(shape), 2e-6, terms)
  assert_close_rel(dp["scale"], (g2 * xhat).sum(1), 2e-6)
  assert_close_rel(dp["bias"], g2.astype(np.float64).sum(1), 2e-6)


@pytest.mark.parametrize("layer", ["layer_norm", "rms_norm", "batch_norm"])
def test_backward_with_the_statistics_differentiated(one_device, monkeypatch, layer):
  # A loss on the mean and variance too: their cotangents are two more
  # terms of the compiled call's dx.
  from jaxnorm._src import normalize
  monkeypatch.setenv("JAXNORM_CPU_COLUMN_GRAD", "1")
  rng = np.random.default_rng(8)
  x = (rng.standard_normal((48, 40)) * 2 + 1e4 * (layer != "rms_norm")).astype(np.float32)
  g = rng.standard_normal(x.shape).astype(np.float32)
  axes = (0,) if layer == "batch_norm" else (1,)
  n = x.shape[axes[0]]
  a = rng.standard_normal(x.shape[1 - axes[0]]).astype(np.float32)
  b = rng.standard_normal(x.shape[1 - axes[0]]).astype(np.float32)
  rms = layer == "rms_norm"

  def loss(x):
    out = normalize.normalize_batch(x, axes=axes, scale=None, bias=None, eps=1e-6, rms=rms,
                                    blocks=1)
    return (jnp.sum(out.y * g) + jnp.sum(out.mean.reshape(-1) * a)
            + jnp.sum(out.var.reshape(-1) * b))

  grad = jax.jit(jax.grad(loss))
  assert (COLUMN_GRAD if layer == "batch_norm" else ROW_GRAD) in grad.lower(x).as_text()
  # Float64: rows of xt (columns of x for batch norm).
  xt, gt = (x.T, g.T) if layer == "batch_norm" else (x, g)
  wdx = row_vjp64(xt, gt, None, (1,), rms=rms)[0]
  x64 = xt.astype(np.float64)
  mu = 0.0 if rms else x64.mean(1, keepdims=True)
  wdx = wdx + (0.0 if rms else a[:, None] / n) + 2 * (x64 - mu) * b[:, None] / n
  got = np.asarray(grad(x))
  got = got.T if layer == "batch_norm" else got
  assert_close_rel(got, wdx, 2e-6, np.max(np.abs(gt)) / np.sqrt(x64.var(1).min()))


def test_fused_columns_concurrent_calls(fused_columns):
  # Two calls at once: one gets the helper threads, the other runs alone
  # (its jobs wait for each other, so it must not be split over threads it
  # does not have).
  import threading
  x = hard_data((16, 16, 16, 64), offset=5.0)
  state = {"mean": jnp.zeros(64), "var": jnp.ones(64)}
  f = jax.jit(lambda x: jaxnorm.batch_norm(None, state, x, train=True)[0])
  assert uses_kernel(f, x, COLUMNS)
  want = ref.batch_norm_train(x)[0]
  results, errors = [], []

  def work():
    try:
      for _ in range(20):
        results.append(np.asarray(f(x)))
    except Exception as e:  # reported below
      errors.append(e)

  threads = [threading.Thread(target=work) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not any(t.is_alive() for t in threads), "a call did not finish"
  assert not errors and len(results) == 60
  for r in results:
    np.testing.assert_allclose(r, want, atol=2e-5, rtol=0)


def test_split_calls_from_concurrent_threads(one_device):
  # Calls large enough to split their jobs over the helper threads, from
  # several Python threads at once and next to a thread that keeps a core
  # busy: one call holds the helpers and the others run alone, and a helper
  # may wake after the calling thread has taken its job (every thread claims
  # the jobs left). Each result against float64, every time.
  import threading
  xc = hard_data((4096, 256))                  # 2^20 values: column sums on two threads
  xr = hard_data((64, 4096), seed=1, offset=3.0)  # 2^18 values: rows on two threads
  g = np.random.default_rng(2).standard_normal(xr.shape).astype(np.float32)
  state = {"mean": jnp.zeros(256), "var": jnp.ones(256)}
  stats = jax.jit(lambda x: jaxnorm.batch_norm(None, state, x, train=True, momentum=0.0)[1])
  rows = jax.jit(lambda x: jaxnorm.layer_norm(None, x))
  rows_grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxnorm.layer_norm(None, x) * g)))
  assert uses_kernel(lambda x: stats(x), xc, SUMS) and uses_kernel(rows, xr, ROWS)
  assert ROW_GRAD in rows_grad.lower(xr).as_text()
  _, mu, var = ref.batch_norm_train(xc)
  want_rows = ref.layer_norm(xr)
  want_grad = row_vjp64(xr, g, None, (1,), False)[0]
  grad_terms = np.max(np.abs(g)) / np.sqrt(xr.astype(np.float64).var(1).min())
  calls = [(stats, xc), (rows, xr), (rows_grad, xr)]
  results, errors = [], []
  stop = threading.Event()

  def busy():
    y = jnp.ones((1024, 1024))
    while not stop.is_set():
      jax.block_until_ready(y @ y)

  def work(k):
    try:
      for i in range(12):
        fn, x = calls[(k + i) % 3]
        results.append(((k + i) % 3, jax.tree.map(np.asarray, fn(x))))
    except Exception as e:  # reported below
      errors.append(e)

  spinner = threading.Thread(target=busy)
  spinner.start()
  threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
  try:
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=120)
  finally:
    stop.set()
    spinner.join(timeout=60)
  assert not any(t.is_alive() for t in threads), "a call did not finish"
  assert not errors and len(results) == 36
  for kind, r in results:
    if kind == 0:
      np.testing.assert_allclose(r["mean"], mu.ravel(), rtol=1e-6, atol=1e-6 * np.sqrt(var.max()))
      np.testing.assert_allclose(r["var"], var.ravel(), rtol=1e-5)
    elif kind == 1:
      np.testing.assert_allclose(r, want_rows, atol=2e-5, rtol=0)
    else:
      assert_close_rel(r, want_grad, 2e-6, grad_terms)


@pytest.mark.parametrize("layer", ["layer_norm", "batch_norm"])
def test_fused_calls_outliers_at_the_probes(fused_columns, layer):
  # The frame is the median of the first, middle and last values; outliers at
  # all three put it far from the mean, and the compiled calls then sum again
  # in a frame at the mean (REFRAME in _cpu_sums.c).
  from jaxnorm._src import normalize
  rng = np.random.default_rng(3)
  if layer == "layer_norm":
    x = (1e5 + rng.standard_normal((8, 1024))).astype(np.float32)
    x[:, [0, 512, 1023]] = 1e5 + 1e4
    axes, target = (1,), ROWS
  else:
    x = (1e5 + rng.standard_normal((1024, 64))).astype(np.float32)
    x[[0, 512, 1023], :] = 1e5 + 1e4
    axes, target = (0,), COLUMNS

  def f(x):
    out = normalize.normalize_batch(x, axes=axes, eps=1e-5, blocks=1)
    return out.y, out.var

  assert uses_kernel(f, x, target)
  y, var = jax.jit(f)(x)
  x64 = x.astype(np.float64)
  mu, v = x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True)
  np.testing.assert_allclose(y, (x64 - mu) / np.sqrt(v + 1e-5), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(var, np.float64), v.ravel(), rtol=1e-6)
