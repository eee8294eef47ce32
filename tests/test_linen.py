"""jaxnorm.linen against flax.linen: same variables, same outputs, same state."""

import operator

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import random_data
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm.linen as jl


def _jit_apply(module, variables, x, mutable=False, **kwargs):
  """`module.apply` under one `jax.jit` (faster than op-by-op here)."""
  mask = kwargs.pop("mask", None)
  f = lambda v, x, mask: module.apply(v, x, mutable=mutable, mask=mask, **kwargs)
  return jax.jit(f)(variables, x, mask)


def _rand_init(key, shape, dtype=jnp.float32):
  return (1.0 + 0.3 * random_data.normal(key, shape)).astype(dtype)


# (name, kwargs for both classes, input shape, mask shape or None)
CASES = [
    ("BatchNorm", {}, (6, 5), None),
    ("BatchNorm", {"axis": 1}, (4, 3, 5, 5), None),  # NCHW
    ("BatchNorm", {"axis": (1, 2)}, (4, 3, 2, 5), None),
    ("BatchNorm", {"use_scale": False}, (6, 5), None),
    ("BatchNorm", {"use_bias": False, "momentum": 0.9, "epsilon": 1e-3}, (6, 5), None),
    ("BatchNorm", {}, (8, 3, 5), (8, 3, 1)),
    ("BatchNorm", {"param_dtype": jnp.bfloat16}, (6, 5), None),
    ("BatchNorm", {"dtype": jnp.bfloat16}, (6, 5), None),
    ("LayerNorm", {}, (4, 3, 6), None),
    ("LayerNorm", {"reduction_axes": (1, 2), "feature_axes": -1}, (4, 3, 6), None),
    ("LayerNorm", {"reduction_axes": (1, 2), "feature_axes": (1, 2)}, (4, 3, 6), None),
    ("LayerNorm", {"use_bias": False, "use_scale": False}, (4, 6), None),
    ("LayerNorm", {}, (4, 3, 6), (4, 3, 6)),
    ("LayerNorm", {"param_dtype": jnp.bfloat16}, (4, 6), None),
    ("RMSNorm", {}, (4, 3, 6), None),
    ("RMSNorm", {"use_scale": False, "epsilon": 1e-3}, (4, 6), None),
    ("RMSNorm", {}, (4, 3, 6), (4, 3, 6)),
    ("GroupNorm", {"num_groups": 2}, (2, 3, 3, 6), None),
    ("GroupNorm", {"num_groups": None, "group_size": 3}, (2, 3, 3, 6), None),
    ("GroupNorm", {"num_groups": 3, "reduction_axes": (2, 3)}, (2, 3, 3, 6), None),
    ("GroupNorm", {"num_groups": 2, "use_bias": False}, (2, 4, 6), (2, 4, 6)),
    ("InstanceNorm", {}, (2, 3, 4, 5), None),
    ("InstanceNorm", {"feature_axes": 1}, (2, 5, 4, 3), None),
    ("InstanceNorm", {"use_scale": False}, (2, 6, 5), (2, 6, 5)),
]


def _tol(dtype):
  return 2e-2 if jnp.dtype(dtype).itemsize < 4 else 1e-5


def _shape_tree(variables):
  return jax.tree.map(lambda a: (a.shape, a.dtype), flax.core.unfreeze(variables))


def _inputs(shape, mask_shape, seed=0):
  kx, km = jax.random.split(jax.random.key(seed))
  x = 2.0 * random_data.normal(kx, shape) + 0.5
  mask = None
  if mask_shape is not None:
    mask = random_data.bernoulli(km, 0.7, mask_shape)
    mask = mask.at[(0,) * len(mask_shape)].set(True)
  return x, mask


@pytest.mark.parametrize("name,kwargs,shape,mask_shape", CASES)
def test_parity_with_flax(name, kwargs, shape, mask_shape):
  is_bn = name == "BatchNorm"
  init_kw = dict(kwargs)
  if "use_scale" in getattr(getattr(nn, name), "__dataclass_fields__", {}):
    init_kw["scale_init"] = _rand_init  # non-trivial scale, same for both
  ours, theirs = getattr(jl, name)(**init_kw), getattr(nn, name)(**init_kw)
  x, mask = _inputs(shape, mask_shape)
  call = {"mask": mask} if mask is not None else {}
  if is_bn:
    call["use_running_average"] = False
  v_ours, v_theirs = [
      jax.jit(lambda k, x, mask, m=m: m.init(k, x, **{**call, "mask": mask}))(
          jax.random.key(1), x, mask) for m in (ours, theirs)]
  assert _shape_tree(v_ours) == _shape_tree(v_theirs)
  np.testing.assert_allclose(
      *[np.asarray(jax.flatten_util.ravel_pytree(v)[0], np.float32)
        for v in (v_ours, v_theirs)])
  if is_bn:
    # Non-trivial running statistics, then train and inference steps.
    v_theirs = flax.core.unfreeze(v_theirs)
    fshape = v_theirs["batch_stats"]["mean"].shape
    v_theirs["batch_stats"] = {
        "mean": 0.3 * jnp.ones(fshape), "var": 2.0 * jnp.ones(fshape)}
    for train in (True, False):
      call["use_running_average"] = not train
      y1, s1 = _jit_apply(ours, v_theirs, x, mutable=["batch_stats"], **call)
      y2, s2 = _jit_apply(theirs, v_theirs, x, mutable=["batch_stats"], **call)
      assert y1.dtype == y2.dtype
      tol = _tol(y2.dtype)
      np.testing.assert_allclose(np.asarray(y1, np.float32),
                                 np.asarray(y2, np.float32), atol=tol, rtol=tol)
      for k in ("mean", "var"):
        assert s1["batch_stats"][k].dtype == jnp.float32
        np.testing.assert_allclose(s1["batch_stats"][k], s2["batch_stats"][k],
                                   atol=1e-5, rtol=1e-5)
  else:
    y1 = _jit_apply(ours, v_theirs, x, **call)
    y2 = _jit_apply(theirs, v_theirs, x, **call)
    assert y1.dtype == y2.dtype
    tol = _tol(y2.dtype)
    np.testing.assert_allclose(np.asarray(y1, np.float32),
                               np.asarray(y2, np.float32), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["BatchNorm", "LayerNorm", "GroupNorm"])
def test_output_dtype_follows_x_and_params(name):
  kw = {"num_groups": 2} if name == "GroupNorm" else {}
  call = {"use_running_average": False} if name == "BatchNorm" else {}
  x = random_data.normal(jax.random.key(0), (4, 3, 4)).astype(jnp.float16)
  for param_dtype, expected in ((jnp.float32, jnp.float32),
                                (jnp.float16, jnp.float16)):
    m = getattr(jl, name)(param_dtype=param_dtype, **kw)
    ref = getattr(nn, name)(param_dtype=param_dtype, **kw)
    v = m.init(jax.random.key(0), x, **call)
    y = m.apply(v, x, **call, mutable=["batch_stats"])
    y = y[0] if isinstance(y, tuple) else y
    y_ref = ref.apply(v, x, **call, mutable=["batch_stats"])
    y_ref = y_ref[0] if isinstance(y_ref, tuple) else y_ref
    assert y.dtype == expected == y_ref.dtype
    if name == "BatchNorm":
      assert v["batch_stats"]["mean"].dtype == jnp.float32


def test_batch_renorm_variables_and_limits():
  x, _ = _inputs((8, 5), None)
  m = jl.BatchRenorm(use_running_average=False)
  v = m.init(jax.random.key(0), x)
  assert _shape_tree(v) == _shape_tree(
      nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x))
  # r_max=1, d_max=0 is batch norm exactly.
  y1, s1 = jl.BatchRenorm(use_running_average=False, r_max=1.0, d_max=0.0).apply(
      v, x, mutable=["batch_stats"])
  y2, s2 = nn.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y1, y2, atol=1e-5)
  np.testing.assert_allclose(s1["batch_stats"]["var"], s2["batch_stats"]["var"], atol=1e-6)
  # With the defaults, x at 3x the running std is rescaled: r clipped at 3.
  y3, _ = m.apply(v, 10.0 * x, mutable=["batch_stats"])
  np.testing.assert_allclose(jnp.std(y3, axis=0), 3.0, rtol=1e-3)


def test_ghost_batch_norm_chunks():
  x, _ = _inputs((8, 3), None)
  m = jl.BatchNorm(use_running_average=False, virtual_batch_size=4)
  v = m.init(jax.random.key(0), x)
  y, _ = m.apply(v, x, mutable=["batch_stats"])
  ref = nn.BatchNorm(use_running_average=False)
  for i in (0, 4):
    y_ref, _ = ref.apply(v, x[i:i + 4], mutable=["batch_stats"])
    np.testing.assert_allclose(y[i:i + 4], y_ref, atol=1e-5)


def test_large_mean_is_exact_where_flax_is_not():
  x = 1e5 + random_data.normal(jax.random.key(0), (64, 8))
  x64 = np.asarray(x, np.float64)
  ref_bn = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
  v = jl.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  ours, s = jl.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
  theirs, _ = nn.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(ours, ref_bn, atol=1e-4)
  np.testing.assert_allclose(s["batch_stats"]["var"], 0.99 + 0.01 * x64.var(0), rtol=1e-4)
  assert np.max(np.abs(np.asarray(theirs) - ref_bn)) > 0.1

  xt = x.T  # (8, 64): layer norm over 64 features of mean 1e5
  xt64 = x64.T
  ref_ln = (xt64 - xt64.mean(-1, keepdims=True)) / np.sqrt(xt64.var(-1, keepdims=True) + 1e-6)
  v = jl.LayerNorm().init(jax.random.key(0), xt)
  np.testing.assert_allclose(jl.LayerNorm().apply(v, xt), ref_ln, atol=1e-4)
  assert np.max(np.abs(np.asarray(nn.LayerNorm().apply(v, xt)) - ref_ln)) > 0.1

  xg = xt.reshape(8, 8, 8)
  g64 = np.asarray(xg, np.float64).reshape(8, 8, 2, 4)
  ref_gn = ((g64 - g64.mean((1, 3), keepdims=True))
            / np.sqrt(g64.var((1, 3), keepdims=True) + 1e-6)).reshape(8, 8, 8)
  v = jl.GroupNorm(num_groups=2).init(jax.random.key(0), xg)
  np.testing.assert_allclose(jl.GroupNorm(num_groups=2).apply(v, xg), ref_gn, atol=1e-4)
  assert np.max(np.abs(np.asarray(nn.GroupNorm(num_groups=2).apply(v, xg)) - ref_gn)) > 0.1


def test_init_does_not_update_stats_nor_need_axis_name():
  x, _ = _inputs((6, 4), None)
  m = jl.BatchNorm(use_running_average=False, axis_name="batch")
  v = m.init(jax.random.key(0), x)  # no mapped axis "batch" here
  np.testing.assert_array_equal(v["batch_stats"]["mean"], jnp.zeros(4))
  np.testing.assert_array_equal(v["batch_stats"]["var"], jnp.ones(4))
  # One example in train mode is fine during init (as in flax).
  v1 = jl.BatchNorm(use_running_average=False).init(jax.random.key(0), x[:1])
  assert v1["params"]["scale"].shape == (4,)


def test_use_running_average_merge_semantics():
  x, _ = _inputs((6, 4), None)
  v = jl.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
  y_ctor = jl.BatchNorm(use_running_average=True).apply(v, x)
  y_call = jl.BatchNorm().apply(v, x, use_running_average=True)
  np.testing.assert_allclose(y_ctor, y_call)
  np.testing.assert_allclose(y_ctor, x / np.sqrt(1 + 1e-5), rtol=1e-6)
  with pytest.raises(ValueError, match="use_running_average"):
    jl.BatchNorm(use_running_average=True).apply(v, x, use_running_average=False)
  with pytest.raises(ValueError, match="use_running_average"):
    jl.BatchNorm().apply(v, x)


def test_mask_governs_running_averages():
  x, _ = _inputs((8, 3), None)
  mask = jnp.arange(8)[:, None] < 5
  m = jl.BatchNorm(use_running_average=False, momentum=0.0)
  v = m.init(jax.random.key(0), x)
  _, s = m.apply(v, x, mask=mask, mutable=["batch_stats"])
  np.testing.assert_allclose(s["batch_stats"]["mean"], x[:5].mean(0), atol=1e-6)
  np.testing.assert_allclose(s["batch_stats"]["var"], x[:5].var(0), atol=1e-5)


class _Net(nn.Module):
  """Dense -> BN -> LN -> GN, in the style of a user's model."""
  bn: type
  ln: type
  gn: type

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(8)(x)
    x = self.bn(use_running_average=not train, momentum=0.9)(x)
    x = self.ln()(nn.relu(x))
    x = self.gn(num_groups=2)(x)
    return nn.Dense(3)(x)


def test_checkpoint_round_trip_between_flax_and_jaxnorm():
  x, _ = _inputs((10, 5), None)
  flax_net = _Net(nn.BatchNorm, nn.LayerNorm, nn.GroupNorm)
  our_net = _Net(jl.BatchNorm, jl.LayerNorm, jl.GroupNorm)
  v = flax_net.init(jax.random.key(0), x, train=False)
  # A few training steps in flax give non-trivial batch_stats.
  for _ in range(2):
    _, upd = flax_net.apply(v, x, train=True, mutable=["batch_stats"])
    v = {**v, **upd}
  blob = flax.serialization.to_bytes(v)
  template = our_net.init(jax.random.key(7), x, train=False)
  restored = flax.serialization.from_bytes(template, blob)
  assert _shape_tree(restored) == _shape_tree(v)
  np.testing.assert_allclose(our_net.apply(restored, x, train=False),
                             flax_net.apply(v, x, train=False), atol=1e-5)
  y1, s1 = our_net.apply(restored, x, train=True, mutable=["batch_stats"])
  y2, s2 = flax_net.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y1, y2, atol=1e-5)
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5)
  jax.tree.map(chex_close, s1, s2)
  # And back: our variables load into the flax model.
  back = flax.serialization.from_bytes(
      flax_net.init(jax.random.key(3), x, train=False),
      flax.serialization.to_bytes({**restored, **s1}))
  np.testing.assert_allclose(flax_net.apply(back, x, train=False),
                             our_net.apply({**restored, **s1}, x, train=False),
                             atol=1e-5)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(32)(x)
    x = jl.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = jl.LayerNorm()(x)
    return nn.Dense(10)(x)


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(8, (3, 3))(x)
    x = jl.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = jl.GroupNorm(num_groups=4)(nn.Conv(8, (3, 3), strides=2)(x))
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


def _digits(n=256):
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images[:n] / 16.0).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(d.target[:n])


@pytest.mark.parametrize("model,reshape", [
    (_MLP(), lambda x: x.reshape(x.shape[0], -1)),
    (_CNN(), lambda x: x[..., None]),
])
def test_training_on_digits(model, reshape):
  images, labels = _digits()
  x = reshape(images)
  init = jax.jit(model.init, static_argnames="train")
  variables = init(jax.random.key(0), x[:2], train=False)
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(3e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, xb, yb):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, xb,
                                train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
      return loss, upd["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  losses = []
  for i in range(16):
    sl = slice((i % 4) * 64, (i % 4 + 1) * 64)
    params, stats, opt_state, loss = step(params, stats, opt_state, x[sl], labels[sl])
    losses.append(float(loss))
  assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
  assert not np.allclose(stats["BatchNorm_0"]["mean"], 0.0)
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  eval_logits = evaluate({"params": params, "batch_stats": stats}, x)
  assert np.mean(np.argmax(eval_logits, -1) == labels) > 0.7
  # Eval mode really uses the running statistics.
  fresh = init(jax.random.key(0), x[:2], train=False)["batch_stats"]
  other = evaluate({"params": params, "batch_stats": fresh}, x)
  assert not np.allclose(eval_logits, other, atol=1e-3)


def _mesh():
  return Mesh(np.array(jax.devices()[:8]), ("b",))


def test_axis_name_in_shard_map_equals_full_batch():
  x, _ = _inputs((16, 3, 4), None)
  m = jl.BatchNorm(use_running_average=False, axis_name="b")
  v = m.init(jax.random.key(0), x)
  mesh = _mesh()

  def f(xs):
    y, upd = m.apply(v, xs, mutable=["batch_stats"])
    return y, upd["batch_stats"]

  xs = jax.device_put(x, NamedSharding(mesh, P("b")))
  y, stats = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("b"),
                                   out_specs=(P("b"), P())))(xs)
  y_ref, upd = jl.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               stats, upd["batch_stats"])


def test_axis_name_in_pmap_equals_full_batch():
  x, _ = _inputs((8, 3, 4), None)
  m = jl.BatchNorm(use_running_average=False, axis_name="b")
  v = m.init(jax.random.key(0), x)
  y = jax.pmap(lambda xs: m.apply(v, xs, mutable=["batch_stats"])[0],
               axis_name="b")(x.reshape(8, 1, 3, 4))
  y_ref, _ = jl.BatchNorm(use_running_average=False).apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y.reshape(x.shape), y_ref, atol=1e-5)


def test_nn_vmap_ensemble():
  x, _ = _inputs((6, 4), None)
  Ens = nn.vmap(jl.BatchNorm, in_axes=0, out_axes=0,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True})
  xs = jnp.stack([x, 2 * x + 1, -x])
  m = Ens(use_running_average=False, scale_init=_rand_init)
  v = m.init(jax.random.key(0), xs)
  assert v["params"]["scale"].shape == (3, 4)
  y, upd = m.apply(v, xs, mutable=["batch_stats"])
  for i in range(3):
    vi = jax.tree.map(operator.itemgetter(i), v)
    yi, ui = jl.BatchNorm(use_running_average=False).apply(vi, xs[i], mutable=["batch_stats"])
    np.testing.assert_allclose(y[i], yi, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"][i], ui["batch_stats"]["var"], atol=1e-6)


def _msg(excinfo):
  return str(excinfo.value)


def test_errors_name_module_and_argument():
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError) as e:
    jl.BatchNorm(use_running_average=False, axis=2).init(jax.random.key(0), x)
  assert _msg(e) == ("BatchNorm: `axis`=2 is out of range for an input with 2 "
                     "dimensions; expected values in [-2, 1].")
  with pytest.raises(TypeError) as e:
    jl.LayerNorm().init(jax.random.key(0), jnp.ones((4, 3), jnp.int32))
  assert _msg(e).startswith("LayerNorm: `x` must have a floating-point or complex dtype, got int32")
  with pytest.raises(ValueError) as e:
    jl.GroupNorm(num_groups=4).init(jax.random.key(0), jnp.ones((2, 6)))
  assert _msg(e) == ("GroupNorm: Number of groups (4) does not divide the number "
                     "of channels (6). Pass `num_groups=` a divisor of 6, or "
                     "`group_size=` with `num_groups=None`.")
  v = jl.BatchNorm(use_running_average=True).init(jax.random.key(0), x)
  with pytest.raises(ValueError) as e:
    jl.BatchNorm(use_running_average=False).apply(v, x, mask=jnp.ones((5, 3), bool),
                                                  mutable=["batch_stats"])
  assert _msg(e) == ("BatchNorm: `mask` of shape (5, 3) does not broadcast to the "
                     "shape of `x`, (4, 3).")
  with pytest.raises(ValueError) as e:
    jl.BatchNorm(use_running_average=False, momentum=1.5).apply(
        v, x, mutable=["batch_stats"])
  assert _msg(e) == "BatchNorm: `momentum` must be in [0, 1], got 1.5."


@pytest.mark.parametrize("masked", [False, True])
def test_group_norm_on_a_lone_vector_normalizes_each_group(masked):
  """flax.linen.GroupNorm on x of shape (C,): each group of the vector is
  normalized on its own (flax.nnx's GroupNorm raises there)."""
  x = (jnp.arange(12.0) ** 1.5).astype(jnp.float32)
  mask = jnp.asarray(np.arange(12) % 4 != 1) if masked else None
  m = jl.GroupNorm(num_groups=3, scale_init=_rand_init, bias_init=_rand_init)
  v = nn.GroupNorm(num_groups=3, scale_init=_rand_init,
                   bias_init=_rand_init).init(jax.random.key(0), x)
  y = m.apply(v, x, mask=mask)
  np.testing.assert_allclose(y, nn.GroupNorm(num_groups=3).apply(v, x, mask=mask),
                             rtol=1e-5, atol=1e-5)
  g = np.asarray(x, np.float64).reshape(3, 4)
  sel = np.ones((3, 4), bool) if mask is None else np.asarray(mask).reshape(3, 4)
  mean = np.array([r[s].mean() for r, s in zip(g, sel, strict=True)])[:, None]
  var = np.array([r[s].var() for r, s in zip(g, sel, strict=True)])[:, None]
  ref = ((g - mean) / np.sqrt(var + 1e-6)).ravel()
  ref = ref * np.asarray(v["params"]["scale"], np.float64) + np.asarray(
      v["params"]["bias"], np.float64)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
