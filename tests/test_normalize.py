"""Tests of jaxnorm/_src/normalize.py: the one core entry and its closed-form derivative.

The gradients are checked against autodiff of the plain formula (a pure-jnp
two-pass reference written from the equations, float64 where it matters), with
masks, several feature axes, missing params, cotangents on the returned batch
statistics, across 8 devices (shard_map + psum), under vmap and jit, in
bfloat16, and at large input offsets.

The references run under `jax.jit`: run eagerly, each of their operations
compiles on its own, which made them a quarter of this file's time; the code
under test runs eagerly and jitted (the `run` fixture).
"""

import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jaxnorm

import reference as ref


def plain_bn(params, x, *, axis=-1, mask=None, eps=1e-5):
  """Two-pass batch norm from the equations (tests/reference.py, in jnp for autodiff)."""
  return ref.batch_norm_train(x, params.get("scale"), params.get("bias"), axis=axis,
                              eps=eps, mask=mask, xp=jnp)


def _params(c, rng, keys=("scale", "bias"), dtype=np.float32):
  shape = (c,) if isinstance(c, int) else c
  return {k: jnp.asarray(rng.standard_normal(shape) + (1.0 if k == "scale" else 0.0), dtype)
          for k in keys}


def _losses(ct, w_mean, w_var, **kw):
  """The same scalar loss through jaxnorm and through the plain formula."""
  def ours(params, x):
    state = {"mean": jnp.zeros_like(w_mean), "var": jnp.ones_like(w_var)}
    y, new = jaxnorm.batch_norm(params, state, x, train=True, momentum=0.5, **kw)
    # new_state = 0.5 * state + 0.5 * batch, so d/d batch = 0.5 * weight.
    return jnp.sum(y * ct) + jnp.sum(new["mean"] * w_mean) + jnp.sum(new["var"] * w_var)

  def ref(params, x):
    y, mu, var = plain_bn(params, x, **kw)
    return jnp.sum(y * ct) + 0.5 * jnp.sum(mu * w_mean) + 0.5 * jnp.sum(var * w_var)

  return ours, ref


def _close(a, b, rtol=2e-5, atol=2e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("axis,shape", [(-1, (8, 5, 6)), (1, (6, 4, 3, 3)), ((1, 2), (7, 3, 4))])
@pytest.mark.parametrize("keys", [("scale", "bias"), ()])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("stat_ct", [False, True])
def test_grads_match_autodiff_of_plain_formula(run, axis, shape, keys, use_mask, stat_ct):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape) * 2 + 3, jnp.float32)
  feat = (axis,) if isinstance(axis, int) else axis
  fshape = tuple(shape[a] for a in feat)
  params = _params(fshape, rng, keys)
  ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  w = (lambda: jnp.asarray(rng.standard_normal(fshape), jnp.float32)) if stat_ct else (
      lambda: jnp.zeros(fshape, jnp.float32))
  mask = None
  if use_mask:
    mask = jnp.asarray(rng.random(shape[:1] + (1,) * (len(shape) - 1)) > 0.3).at[0].set(True)
  ours, ref = _losses(ct, w(), w(), axis=axis, mask=mask)
  got = run(jax.grad(ours, (0, 1)), params, x)
  want = jax.jit(jax.grad(ref, (0, 1)))(params, x)
  _close(got, want)


def test_masked_entries_get_the_output_path_gradient():
  """A masked-out entry gets d y / d x = scale * rstd, nothing through the stats."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((10, 3)), jnp.float32)
  mask = jnp.arange(10)[:, None] < 7
  params = _params(3, rng)
  g = jax.grad(lambda x: jnp.sum(jaxnorm.batch_norm(
      params, jaxnorm.batch_norm_init(3)[1], x, train=True, mask=mask)[0][9]))(x)
  var = jnp.var(x[:7], axis=0)
  np.testing.assert_allclose(g[9], params["scale"] / jnp.sqrt(var + 1e-5), rtol=1e-5)
  np.testing.assert_allclose(g[7:9], 0.0)


def test_check_grads_float64_both_modes():
  # Batch norm's one second-order check (test_batch_norm.py checks first order).
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((6, 4)) + 5.0, jnp.float64)
    params = _params(4, rng, dtype=np.float64)
    state = {"mean": jnp.zeros(4, jnp.float64), "var": jnp.ones(4, jnp.float64)}
    mask = jnp.asarray([True, True, False, True, True, True])[:, None]

    @jax.jit  # one compile per derivative instead of one per operation
    def f(scale, bias, x):
      y, new = jaxnorm.batch_norm({"scale": scale, "bias": bias}, state, x, train=True,
                                  mask=mask)
      return y, new["mean"], new["var"]

    check_grads(f, (params["scale"], params["bias"], x), order=2, modes=["fwd", "rev"])


def test_forward_mode_matches_autodiff_of_plain_formula():
  """jax.jvp and jacfwd go through the custom tangent rule."""
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.standard_normal((7, 3)) + 4.0, jnp.float32)
  tx = jnp.asarray(rng.standard_normal((7, 3)), jnp.float32)
  params = _params(3, rng)
  tp = _params(3, rng)
  mask = jnp.asarray(rng.random((7, 1)) > 0.3).at[0].set(True)
  state = jaxnorm.batch_norm_init(3)[1]
  ours = lambda p, x: jaxnorm.batch_norm(p, state, x, train=True, mask=mask,
                                         momentum=0.0)
  ref = lambda p, x: plain_bn(p, x, mask=mask)
  _, got = jax.jvp(ours, (params, x), (tp, tx))
  _, (want_y, want_mu, want_var) = jax.jit(
      lambda p, x, tp, tx: jax.jvp(ref, (p, x), (tp, tx)))(params, x, tp, tx)
  _close(got, (want_y, {"mean": want_mu, "var": want_var}))
  _close(jax.jit(jax.jacfwd(lambda x: ours(params, x)[0]))(x),
         jax.jit(jax.jacrev(lambda x: ref(params, x)[0]))(x))


def test_eps_gradient():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((9, 2)), jnp.float32)
  params = _params(2, rng)
  ct = jnp.asarray(rng.standard_normal((9, 2)), jnp.float32)
  f = lambda eps: jnp.sum(jaxnorm.batch_norm(params, jaxnorm.batch_norm_init(2)[1], x,
                                             train=True, eps=eps)[0] * ct)
  g = lambda eps: jnp.sum(plain_bn(params, x, eps=eps)[0] * ct)
  np.testing.assert_allclose(jax.grad(f)(0.1), jax.jit(jax.grad(g))(0.1), rtol=1e-4)


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_gradient_exact_at_large_offsets(offset):
  """dx in float32 matches the float64 closed form despite |mean| >> std."""
  rng = np.random.default_rng(4)
  z = rng.standard_normal((512, 4))
  x32 = (offset + z).astype(np.float32)
  ct = rng.standard_normal((512, 4))
  params = {"scale": jnp.full((4,), 1.5, jnp.float32), "bias": jnp.zeros(4, jnp.float32)}
  g = jax.jit(jax.grad(lambda x: jnp.sum(jaxnorm.batch_norm(
      params, jaxnorm.batch_norm_init(4)[1], x, train=True)[0] * ct.astype(np.float32))))(
          jnp.asarray(x32))
  x = x32.astype(np.float64)
  xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
  want = 1.5 / np.sqrt(x.var(0) + 1e-5) * (
      ct - ct.mean(0) - xhat * (ct * xhat).mean(0))
  np.testing.assert_allclose(np.asarray(g, np.float64), want, atol=1e-5)


def test_bfloat16_accumulates_in_float32():
  rng = np.random.default_rng(5)
  x32 = jnp.asarray(rng.standard_normal((64, 8)) + 100.0, jnp.float32)
  x = x32.astype(jnp.bfloat16)
  params = _params(8, rng, dtype=jnp.bfloat16)
  ct = jnp.asarray(rng.standard_normal((64, 8)), jnp.bfloat16)
  ours, _ = _losses(ct, jnp.zeros(8), jnp.zeros(8))
  gp, gx = jax.jit(jax.grad(ours, (0, 1)))(params, x)
  assert gx.dtype == jnp.bfloat16 and gp["scale"].dtype == jnp.bfloat16
  # Reference: the plain formula in float32 on the same bfloat16 values.
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  _, ref = _losses(ct.astype(jnp.float32), jnp.zeros(8), jnp.zeros(8))
  wp, wx = jax.jit(jax.grad(ref, (0, 1)))(p32, x.astype(jnp.float32))
  _close((gp, gx), (wp, wx), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("use_mask", [False, True])
def test_shard_map_psum_matches_full_batch(use_mask):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  rng = np.random.default_rng(6)
  x = rng.standard_normal((32, 3, 5)).astype(np.float32) * 3 + 7
  ct = rng.standard_normal(x.shape).astype(np.float32)
  mask = rng.random((32, 1, 1)) > 0.25
  params = _params(5, rng)
  state = jaxnorm.batch_norm_init(5)[1]
  mesh = jax.make_mesh((8,), ("b",))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("b")))

  def body(params, x, ct, mask):
    def loss(params, x):
      y, new = jaxnorm.batch_norm(params, state, x, train=True, axis_name="b",
                                  mask=mask if use_mask else None)
      return jnp.sum(y * ct), new
    (_, new), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
    return grads, new

  grads, new = jax.jit(jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P("b"), P("b"), P("b")),
      out_specs=((P(), P("b")), P())))(params, put(x), put(ct), put(mask))
  m = jnp.asarray(mask) if use_mask else None
  want = jax.jit(jax.grad(lambda p, x: jnp.sum(plain_bn(p, x, mask=m)[0] * ct), (0, 1)))(
      params, x)
  _close(grads, want, rtol=1e-4, atol=1e-4)
  _, mu, var = jax.jit(lambda p, x: plain_bn(p, x, mask=m))(params, jnp.asarray(x))
  _close(new["mean"], 0.01 * mu, atol=1e-5)
  _close(new["var"], 0.99 + 0.01 * var, atol=1e-5)


def test_vmap_with_axis_name_matches_full_batch():
  """vmap over the batch axis with axis_name: per-example grads of a sum loss."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((12, 4)) + 2, jnp.float32)
  ct = jnp.asarray(rng.standard_normal((12, 4)), jnp.float32)
  params, state = jaxnorm.batch_norm_init(4)

  def per_example(xi, cti):
    return jax.grad(lambda xi: jnp.sum(jaxnorm.batch_norm(
        params, state, xi, train=True, axis_name="i")[0] * cti))(xi)

  # Inside vmap each example is a (1, 4) batch; statistics run across "i".
  got = jax.jit(jax.vmap(per_example, axis_name="i"))(x[:, None], ct[:, None])[:, 0]
  want = jax.jit(jax.grad(lambda x: jnp.sum(plain_bn(params, x)[0] * ct)))(x)
  _close(got, want)


def test_vmap_over_independent_batches(run):
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((3, 10, 4)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((3, 10, 4)), jnp.float32)
  params = _params(4, rng)
  state = jaxnorm.batch_norm_init(4)[1]
  f = lambda p, x, ct: jax.grad(lambda p, x: jnp.sum(jaxnorm.batch_norm(
      p, state, x, train=True)[0] * ct), (0, 1))(p, x)
  got = run(jax.vmap(f, (None, 0, 0)), params, x, ct)
  plain_grad = jax.jit(jax.grad(lambda p, x, c: jnp.sum(plain_bn(p, x)[0] * c), (0, 1)))
  for i in range(3):
    want = plain_grad(params, x[i], ct[i])
    _close(jax.tree.map(operator.itemgetter(i), got), want)


def test_fallbacks_still_differentiate():
  """Ghost batches take the closed form, complex inputs plain autodiff; jvp works in both."""
  rng = np.random.default_rng(9)
  params, state = jaxnorm.batch_norm_init(3)
  x = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
  ghost = lambda x: jaxnorm.batch_norm(params, state, x, train=True, virtual_batch_size=4)[0]
  # Jitted: eagerly each transform's operations compiled one by one (50 s on the
  # loaded test machine). Ghost batches run eagerly, forward and gradient, in
  # test_batch_renorm.py and test_batch_norm.py.
  jax.jit(lambda x, t: jax.jvp(ghost, (x,), (t,)))(x, jnp.ones_like(x))
  got = jax.jit(jax.grad(lambda x: jnp.sum(ghost(x) * x)))(x)
  want = jax.jit(jax.grad(lambda x: jnp.sum(jnp.concatenate(
      [plain_bn({}, x[:4])[0], plain_bn({}, x[4:])[0]]) * x)))(x)
  _close(got, want)
  xc = (x + 1j * x[::-1]).astype(jnp.complex64)
  g = jax.jit(jax.grad(
      lambda x: jnp.sum(jnp.abs(jaxnorm.batch_norm(params, state, x, train=True)[0]))))(xc)
  assert g.dtype == jnp.complex64 and np.all(np.isfinite(np.asarray(g)))


def test_no_retrace_and_no_full_size_temporaries():
  """The jitted fwd+bwd holds no temporaries beyond a few per-channel vectors."""
  x = jnp.ones((16, 8, 8, 32)) + jnp.arange(32.0)
  params, state = jaxnorm.batch_norm_init(32)

  def g(p, x, ct):
    (_y, _), vjp = jax.vjp(lambda p, x: jaxnorm.batch_norm(p, state, x, train=True), p, x)
    return vjp((ct, jax.tree.map(jnp.zeros_like, state)))

  compiled = jax.jit(g).lower(params, x, x).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < x.nbytes, temp


# Layer, RMS, group and instance norm take the same closed-form derivative
# (statistics over their own axes; group norm pools per-channel sums over each
# group's channels). Their derivatives, in both modes and with masks, are
# checked against autodiff of plain two-pass formulas written with jnp.


def _plain_stats_norm(x, scale, bias, mask, red, eps, rms=False):
  m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
  n = jnp.sum(m, red, keepdims=True).astype(x.dtype)
  if rms:
    y = x / jnp.sqrt(jnp.sum(jnp.where(m, x * x, 0), red, keepdims=True) / n + eps)
  else:
    mu = jnp.sum(jnp.where(m, x, 0), red, keepdims=True) / n
    var = jnp.sum(jnp.where(m, (x - mu) ** 2, 0), red, keepdims=True) / n
    y = (x - mu) / jnp.sqrt(var + eps)
  return _affine(y, scale, bias)


def _affine(y, scale, bias):
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


def plain_layer(name, params, x, mask=None, eps=1e-6, groups=2):
  """The layer `name` from its defining formula (two-pass, plain autodiff)."""
  scale, bias = params.get("scale"), params.get("bias")
  if name in ("layer_norm", "rms_norm"):
    return _plain_stats_norm(x, scale, bias, mask, (x.ndim - 1,), eps, rms=name == "rms_norm")
  if name == "instance_norm":
    return _plain_stats_norm(x, scale, bias, mask, tuple(range(1, x.ndim - 1)), eps)
  c = x.shape[-1]
  shape = x.shape[:-1] + (groups, c // groups)
  mg = None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(shape)
  y = _plain_stats_norm(x.reshape(shape), None, None, mg,
                        tuple(range(1, x.ndim - 1)) + (x.ndim,), eps).reshape(x.shape)
  return _affine(y, scale, bias)


def ours_layer(name, params, x, mask=None, eps=1e-6, groups=2):
  kw = dict(eps=eps, mask=mask)
  if name == "group_norm":
    kw["num_groups"] = groups
  return getattr(jaxnorm, name)(params, x, **kw)


_LAYERS = ["layer_norm", "rms_norm", "group_norm", "instance_norm"]


@pytest.mark.parametrize("name", _LAYERS)
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("keys", [("scale", "bias"), ()])
def test_layer_grads_and_jvp_match_plain_formula(run, name, use_mask, keys):
  rng = np.random.default_rng(11)
  shape = (3, 5, 4, 6)
  x = jnp.asarray(rng.standard_normal(shape) * 2 + 3, jnp.float32)
  ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  keys = tuple(k for k in keys if not (name == "rms_norm" and k == "bias"))
  params = _params(6, rng, keys)
  tangents = (_params(6, rng, keys), jnp.asarray(rng.standard_normal(shape), jnp.float32))
  mask = None
  if use_mask:
    # Sequence-style mask for LN/RMS (per feature), spatial mask otherwise.
    mshape = (3, 5, 4, 6) if name in ("layer_norm", "rms_norm") else (3, 5, 4, 1)
    mask = jnp.asarray(rng.random(mshape) > 0.3)
    mask = mask.at[..., 0].set(True) if mshape[-1] > 1 else mask.at[:, 0].set(True)
  ours = lambda p, x: ours_layer(name, p, x, mask)
  ref = lambda p, x: plain_layer(name, p, x, mask)
  got = run(jax.grad(lambda p, x: jnp.sum(ours(p, x) * ct), (0, 1)), params, x)
  want = jax.jit(jax.grad(lambda p, x: jnp.sum(ref(p, x) * ct), (0, 1)))(params, x)
  _close(got, want, rtol=1e-4, atol=1e-4)
  tangent = lambda f: lambda p, x, tp, tx: jax.jvp(f, (p, x), (tp, tx))[1]
  got_t = run(tangent(ours), params, x, *tangents)
  want_t = jax.jit(tangent(ref))(params, x, *tangents)
  _close(got_t, want_t, rtol=1e-4, atol=1e-4)


# The layers' one second-order check (test_layer_norm.py and test_group_norm.py
# check first order without a mask).
@pytest.mark.parametrize("name", _LAYERS)
def test_layer_check_grads_float64_with_mask(name):
  rng = np.random.default_rng(12)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((2, 3, 2, 4)) + 5.0, jnp.float64)
    keys = ("scale",) if name == "rms_norm" else ("scale", "bias")
    params = _params(4, rng, keys, dtype=np.float64)
    mask = jnp.asarray(rng.random((2, 3, 2, 1)) > 0.3).at[:, 0].set(True)
    f = jax.jit(lambda x, p: ours_layer(name, p, x, mask))
    check_grads(f, (x, params), order=2, modes=["fwd", "rev"])


def test_group_norm_gradient_exact_at_large_offset():
  """dx in float32 matches the float64 closed form at offset 1e5."""
  rng = np.random.default_rng(13)
  z = rng.standard_normal((2, 16, 16, 8))
  x32 = (1e5 + z).astype(np.float32)
  ct = rng.standard_normal(z.shape)
  g = jax.jit(jax.grad(lambda x: jnp.sum(jaxnorm.group_norm(
      {}, x, num_groups=2) * ct.astype(np.float32))))(jnp.asarray(x32))
  xg = x32.astype(np.float64).reshape(2, 16, 16, 2, 4)
  cg = ct.reshape(xg.shape)
  red = (1, 2, 4)
  xhat = (xg - xg.mean(red, keepdims=True)) / np.sqrt(xg.var(red, keepdims=True) + 1e-6)
  want = (cg - cg.mean(red, keepdims=True) - xhat * (cg * xhat).mean(red, keepdims=True))
  want = want / np.sqrt(xg.var(red, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(g, np.float64), want.reshape(z.shape), atol=2e-5)


@pytest.mark.parametrize("name,mask_kind", [
    ("group_norm", None), ("group_norm", "traced"), ("group_norm", "constant"),
    ("batch_norm", "traced"), ("batch_norm", "constant"), ("instance_norm", "constant"),
    ("layer_norm", "constant")])
def test_output_used_in_the_same_program_is_exact_at_large_offset(name, mask_kind):
  """A nonlinearity after the layer, in one jitted program with its gradient:
  the statistics and every output recomputed from ``x`` must use one frame.

  A frame computed as ``sum * (1 / n)`` was recomputed inside each fusion
  that read it, contracted into a fused multiply-add in some and not in
  others: with an offset of 1e4 the frames differed by 5e-4, so ``tanh(y)``
  (batch norm with a constant mask) or ``dx`` (group norm) was off by
  1e-4 to 1e-3 against float64 at shapes such as 4x6x6x16. A linear loss
  does not see it (its cotangent does not depend on ``y``).
  """
  rng = np.random.default_rng(16)
  shape = (4, 6, 6, 16) if name != "layer_norm" else (6, 5, 40)
  x32 = jnp.asarray(rng.standard_normal(shape) * 2 + 1e4, jnp.float32)
  w = rng.standard_normal(shape)
  mask = None
  if mask_kind is not None:
    mshape = shape if name == "layer_norm" else shape[:-1] + (1,)
    mask = np.asarray(rng.random(mshape) > 0.3)
    mask.reshape(-1)[0] = True
    if name == "layer_norm":
      mask[..., 0] = True
  groups = 4

  def ours(x, m):
    if name == "batch_norm":
      p, s = jaxnorm.batch_norm_init(shape[-1])
      return jaxnorm.batch_norm(p, s, x, train=True, mask=m)[0]
    return ours_layer(name, {}, x, m, groups=groups)

  def program(x, m):
    # A constant mask is closed over (XLA folds its counts); a traced one is an argument.
    m = mask if mask_kind == "constant" else m
    y = ours(x, m)
    keep = True if m is None else m
    loss = lambda x: jnp.sum(jnp.where(keep, jnp.tanh(ours(x, m)) * w.astype(np.float32), 0))
    return jnp.tanh(y), jax.grad(loss)(x)

  got_y, got_dx = jax.jit(program)(x32, None if mask is None else jnp.asarray(mask))
  with jax.enable_x64(True):
    x64 = jnp.asarray(x32, jnp.float64)

    def plain(x):
      if name == "batch_norm":
        return plain_bn({}, x, mask=mask)[0]
      return plain_layer(name, {}, x, None if mask is None else jnp.asarray(mask), groups=groups)

    keep = True if mask is None else mask
    want_y = np.asarray(jnp.tanh(plain(x64)))
    want_dx = np.asarray(jax.jit(jax.grad(
        lambda x: jnp.sum(jnp.where(keep, jnp.tanh(plain(x)) * w, 0))))(x64))
  selected = np.broadcast_to(True if mask is None else mask, shape)
  np.testing.assert_allclose(np.asarray(got_y, np.float64)[selected], want_y[selected],
                             atol=2e-6)
  np.testing.assert_allclose(np.asarray(got_dx, np.float64), want_dx,
                             atol=2e-6 * np.max(np.abs(want_dx)))


def test_layer_norm_axis_name_over_feature_shards_matches_whole_rows():
  """Features split over a vmapped axis: statistics and grads of whole rows."""
  rng = np.random.default_rng(14)
  x = jnp.asarray(rng.standard_normal((4, 12)) + 3, jnp.float32)
  ct = jnp.asarray(rng.standard_normal((4, 12)), jnp.float32)
  params = _params(12, rng)

  def split(a):
    if a.ndim == 1:
      return a.reshape(3, 4)
    return a.reshape(a.shape[:-1] + (3, 4)).swapaxes(0, -2)

  def loss(p, xs, cts):
    def shard(p, x, c):
      return jnp.sum(jaxnorm.layer_norm(p, x, axis_name="f") * c)
    return jnp.sum(jax.vmap(shard, axis_name="f")(p, xs, cts))

  ps = jax.tree.map(split, params)
  got_loss, (gp, gx) = jax.jit(jax.value_and_grad(loss, (0, 1)))(ps, split(x), split(ct))
  want_loss, (wp, wx) = jax.jit(jax.value_and_grad(
      lambda p, x: jnp.sum(plain_layer("layer_norm", p, x) * ct), (0, 1)))(params, x)
  _close(got_loss, want_loss, rtol=1e-5, atol=1e-4)
  _close(gx.swapaxes(0, 1).reshape(4, 12), wx)
  _close(jax.tree.map(lambda a: a.reshape(12), gp), wp)


def test_pool_channels_is_a_symmetric_group_sum():
  from jaxnorm._src import moments
  pool = moments.pool_channels
  rng = np.random.default_rng(15)
  v = jnp.asarray(rng.standard_normal((3, 1, 12)), jnp.float32)
  got = pool(v, 4)
  want = np.repeat(np.asarray(v).reshape(3, 1, 3, 4).sum(-1), 4, axis=-1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  u = jnp.asarray(rng.standard_normal((3, 1, 12)), jnp.float32)
  # <P v, u> == <v, P u>: its own transpose.
  np.testing.assert_allclose(jnp.vdot(pool(v, 4), u), jnp.vdot(v, pool(u, 4)), rtol=1e-5)
  assert pool(v, 1) is v


def test_group_norm_and_layer_norm_backward_keep_no_full_size_temporaries():
  """Compiled fwd+bwd memory: no full-size copies of x (CPU XLA)."""
  x = jnp.ones((4, 16, 16, 64)) + jnp.arange(64.0)
  gp = jaxnorm.group_norm_init(64)

  def gn(p, x, ct):
    y, vjp = jax.vjp(lambda p, x: jaxnorm.group_norm(p, x, num_groups=8), p, x)
    return y, vjp(ct)

  temp = jax.jit(gn).lower(gp, x, x).compile().memory_analysis().temp_size_in_bytes
  assert temp < x.nbytes // 4, temp
  # bfloat16 layer norm forward does not write a float32 copy of x.
  xb = jnp.ones((256, 512), jnp.bfloat16)
  lp = jaxnorm.layer_norm_init(512)
  compiled = jax.jit(jaxnorm.layer_norm).lower(lp, xb).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < xb.nbytes // 4


@pytest.mark.parametrize("use_mask", [False, True])
def test_group_norm_axis_name_over_spatial_shards_matches_whole_input(use_mask):
  """The spatial axis split over a vmapped axis: pooled group statistics and
  their gradients equal those of the whole input."""
  rng = np.random.default_rng(16)
  x = jnp.asarray(rng.standard_normal((2, 8, 6)) * 2 + 5, jnp.float32)
  ct = jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 8, 1)) > 0.3).at[:, 0].set(True) if use_mask else None
  params = _params(6, rng)
  split = lambda a: None if a is None else a.reshape(2, 4, 2, a.shape[-1]).swapaxes(0, 1)

  def loss(p, xs, cts, ms):
    def shard(x, c, m):
      return jnp.sum(jaxnorm.group_norm(p, x, num_groups=3, mask=m, axis_name="s") * c)
    return jnp.sum(jax.vmap(shard, axis_name="s")(xs, cts, ms))

  got_loss, (gp, gx) = jax.jit(jax.value_and_grad(loss, (0, 1)))(
      params, split(x), split(ct), split(mask))
  want_loss, (wp, wx) = jax.jit(jax.value_and_grad(
      lambda p, x: jnp.sum(plain_layer("group_norm", p, x, mask, groups=3) * ct), (0, 1)))(
          params, x)
  _close(got_loss, want_loss, rtol=1e-5, atol=1e-4)
  _close(gx.swapaxes(0, 1).reshape(2, 8, 6), wx, rtol=1e-4, atol=1e-4)
  _close(gp, wp, rtol=1e-4, atol=1e-4)


# NaN or inf in masked-out entries reach nothing: not the selected outputs, not
# the statistics, not any gradient. Each layer's loss ignores masked-out
# outputs (the usual masked loss); the gradients with NaN/inf padding must equal
# those with zero padding, and be finite.

def _masked_layers():
  rng = np.random.default_rng(3)
  bn_params, bn_state = jaxnorm.batch_norm_init(4)
  bn_params = _params(4, rng)
  ln_params = _params(4, rng)
  gn_params = _params(4, rng)

  def bn(train, **kw):
    def f(p, x, mask):
      y, new = jaxnorm.batch_norm(p, bn_state, x, train=train, mask=mask, **kw)
      return y, (new["mean"], new["var"])
    return f

  def renorm(p, x, mask):
    y, new = jaxnorm.batch_renorm(p, bn_state, x, train=True, mask=mask)
    return y, (new["mean"], new["var"])

  def torch_bn(p, x, mask):
    y, new = jaxnorm.interop.torch_batch_norm(
        p, {"mean": jnp.zeros(4), "var": jnp.ones(4)}, x, train=True, mask=mask, axis=-1)
    return y, (new["mean"], new["var"])

  def stateless(fn, **kw):
    return lambda p, x, mask: (fn(p, x, mask=mask, **kw), ())

  def moments(p, x, mask):
    mean, var = jaxnorm.moments(x, (0, 1, 2), mask=mask)
    return jnp.zeros_like(x), (mean * p["scale"], var * p["scale"])

  return {
      "batch_norm": (bn(True), bn_params),
      "batch_norm_inference": (bn(False), bn_params),
      "ghost_batch_norm": (bn(True, virtual_batch_size=2), bn_params),
      "batch_renorm": (renorm, bn_params),
      "torch_batch_norm": (torch_bn, bn_params),
      "layer_norm": (stateless(jaxnorm.layer_norm), ln_params),
      "rms_norm": (stateless(jaxnorm.rms_norm), {"scale": ln_params["scale"]}),
      "group_norm": (stateless(jaxnorm.group_norm, num_groups=2), gn_params),
      "instance_norm": (stateless(jaxnorm.instance_norm), gn_params),
      "moments": (moments, {"scale": ln_params["scale"]}),
  }


@pytest.mark.parametrize("name", sorted(_masked_layers()))
@pytest.mark.parametrize("pad", [np.nan, np.inf, 3e38, -3e38])
def test_nan_padding_reaches_no_value_statistic_or_gradient(name, pad):
  # 3e38 is finite, but its normalized value overflows to inf (a zero cotangent times that inf
  # made layer and RMS norm's scale gradient NaN).
  fn, params = _masked_layers()[name]
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((4, 3, 5, 4)) + 2.0, jnp.float32)
  mask = jnp.asarray(rng.random((4, 3, 5, 4)) < 0.6).at[:, 0, 0].set(True).at[:, :, 1].set(True)
  ct = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def loss(p, x):
    y, stats = fn(p, x, mask)
    return jnp.sum(jnp.where(mask, y, 0) * ct) + sum(jnp.sum(s) for s in stats), (y, stats)

  grad = jax.jit(jax.grad(loss, (0, 1), has_aux=True))
  (gp_pad, gx_pad), (y_pad, s_pad) = grad(params, jnp.where(mask, x, pad))
  (gp, gx), (y, s) = grad(params, jnp.where(mask, x, 0.0))
  sel = np.asarray(mask)
  np.testing.assert_array_equal(np.asarray(y_pad)[sel], np.asarray(y)[sel])
  for a, b in zip(jax.tree.leaves(s_pad), jax.tree.leaves(s), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(gp_pad), jax.tree.leaves(gp), strict=True):
    assert np.all(np.isfinite(np.asarray(a))), name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(gx_pad)[sel]))
  np.testing.assert_allclose(np.asarray(gx_pad)[sel], np.asarray(gx)[sel], rtol=1e-6, atol=1e-6)
