"""jaxnorm.nnx against flax.nnx: same attributes and state, same outputs."""

import contextlib
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import random_data
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxnorm.nnx as jn


def _rand_init(key, shape, dtype=jnp.float32):
  return (1.0 + 0.3 * random_data.normal(key, shape)).astype(dtype)


# (name, positional args, kwargs for both classes, input shape, mask shape)
CASES = [
    ("BatchNorm", (5,), {}, (6, 5), None),
    ("BatchNorm", (3,), {"axis": 1}, (4, 3, 5, 5), None),
    ("BatchNorm", (5,), {"use_scale": False, "momentum": 0.9}, (6, 5), None),
    ("BatchNorm", (5,), {}, (8, 3, 5), (8, 3, 1)),
    ("BatchNorm", (5,), {"param_dtype": jnp.bfloat16}, (6, 5), None),
    ("BatchNorm", (5,), {"use_running_average": True}, (6, 5), None),
    ("LayerNorm", (6,), {}, (4, 3, 6), None),
    ("LayerNorm", (6,), {"reduction_axes": (1, 2), "feature_axes": -1}, (4, 3, 6), None),
    ("LayerNorm", (6,), {"use_bias": False}, (4, 3, 6), (4, 3, 6)),
    ("RMSNorm", (6,), {}, (4, 3, 6), None),
    ("RMSNorm", (6,), {"use_scale": False}, (4, 6), None),
    ("GroupNorm", (6, 2), {}, (2, 3, 3, 6), None),
    ("GroupNorm", (6, None, 3), {}, (2, 3, 3, 6), None),
    ("InstanceNorm", (5,), {}, (2, 3, 4, 5), None),
    ("InstanceNorm", (6,), {"use_bias": False}, (2, 6, 6), (2, 6, 6)),
]


def _tol(dtype):
  return 2e-2 if jnp.dtype(dtype).itemsize < 4 else 1e-5


def _state_tree(module):
  return jax.tree.map(lambda a: (type(a).__name__ if isinstance(a, nnx.Variable)
                                 else None, a.shape, a.dtype),
                      nnx.state(module), is_leaf=lambda a: isinstance(a, jax.Array))


def _run(module, x, mask):
  """Calls the module under nnx.jit (state updates propagate)."""
  kw = {} if mask is None else {"mask": mask}
  return nnx.jit(lambda m, x: m(x, **kw))(module, x)


@pytest.mark.parametrize("name,args,kwargs,shape,mask_shape", CASES)
def test_parity_with_flax(name, args, kwargs, shape, mask_shape):
  kw = dict(kwargs, scale_init=_rand_init)
  if "use_scale" in kwargs and not kwargs["use_scale"]:
    kw.pop("scale_init")
  ours = getattr(jn, name)(*args, **kw, rngs=nnx.Rngs(1))
  theirs = getattr(nnx, name)(*args, **kw, rngs=nnx.Rngs(1))
  assert _state_tree(ours) == _state_tree(theirs)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(ours), nnx.state(theirs))
  for attr in ("scale", "bias", "mean", "var", "epsilon", "num_groups",
               "group_size", "use_running_average", "axis", "momentum"):
    assert hasattr(ours, attr) == hasattr(theirs, attr), attr
  kx, km = jax.random.split(jax.random.key(0))
  x = 2.0 * random_data.normal(kx, shape) + 0.5
  mask = None if mask_shape is None else random_data.bernoulli(km, 0.7, mask_shape)
  if name == "BatchNorm":
    for m in (ours, theirs):
      m.mean[...] = 0.3 * jnp.ones_like(m.mean[...])
      m.var[...] = 2.0 * jnp.ones_like(m.var[...])
  y1, y2 = _run(ours, x, mask), _run(theirs, x, mask)
  assert y1.dtype == y2.dtype
  tol = _tol(y2.dtype)
  np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y2, np.float32),
                             atol=tol, rtol=tol)
  if name == "BatchNorm":
    assert ours.mean[...].dtype == jnp.float32
    for k in ("mean", "var"):
      np.testing.assert_allclose(getattr(ours, k)[...], getattr(theirs, k)[...],
                                 atol=1e-5, rtol=1e-5)
    # And inference with the updated statistics.
    ours.eval()
    theirs.eval()
    np.testing.assert_allclose(_run(ours, x, None), _run(theirs, x, None),
                               atol=1e-5, rtol=1e-5)


def test_train_eval_and_view_switch_batch_norm():
  bn = jn.BatchNorm(3, rngs=nnx.Rngs(0))
  x = random_data.normal(jax.random.key(0), (8, 3)) * 2 + 1
  assert bn.use_running_average is False
  bn.eval()
  assert bn.use_running_average is True
  np.testing.assert_allclose(bn(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)
  np.testing.assert_array_equal(bn.mean[...], 0.0)  # untouched in eval
  train_view = nnx.view(bn, use_running_average=False)
  y = train_view(x)
  np.testing.assert_allclose(jnp.mean(y, 0), 0.0, atol=1e-5)
  assert not np.allclose(bn.mean[...], 0.0)  # the view shares the variables
  bn.train()
  assert bn.use_running_average is False
  # The call argument wins over the attribute.
  before = bn.mean[...]
  bn(x, use_running_average=True)
  np.testing.assert_array_equal(bn.mean[...], before)


def test_no_initializers_kept_graphs_equal():
  for cls, args in ((jn.BatchNorm, (4,)), (jn.LayerNorm, (4,)), (jn.GroupNorm, (4, 2)),
                    (jn.InstanceNorm, (4,))):
    a = cls(*args, scale_init=_rand_init, bias_init=nnx.initializers.normal(),
            rngs=nnx.Rngs(0))
    b = cls(*args, rngs=nnx.Rngs(0))
    assert nnx.graphdef(a) == nnx.graphdef(b)
  a = jn.RMSNorm(4, scale_init=_rand_init, rngs=nnx.Rngs(0))
  assert nnx.graphdef(a) == nnx.graphdef(jn.RMSNorm(4, rngs=nnx.Rngs(0)))


def test_batch_renorm_nnx():
  x = random_data.normal(jax.random.key(0), (8, 5))
  a = jn.BatchRenorm(5, r_max=1.0, d_max=0.0, rngs=nnx.Rngs(0))
  b = nnx.BatchNorm(5, rngs=nnx.Rngs(0))
  assert _state_tree(a) == _state_tree(b)
  np.testing.assert_allclose(a(x), b(x), atol=1e-5)
  np.testing.assert_allclose(a.var[...], b.var[...], atol=1e-6)


class _Model(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.bn = jn.BatchNorm(8, rngs=rngs)
    self.gn = jn.GroupNorm(8, 4, rngs=rngs)
    self.out = nnx.Linear(8 * 8 * 8, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = self.gn(x)
    return self.out(x.reshape(x.shape[0], -1))


def test_training_on_digits_with_nnx_optimizer():
  from sklearn.datasets import load_digits
  d = load_digits()
  x = jnp.asarray((d.images[:256] / 16.0)[..., None], jnp.float32)
  labels = jnp.asarray(d.target[:256])
  model = _Model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    def loss_fn(model):
      logits = model(xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  model.train()
  losses = []
  for i in range(16):
    sl = slice((i % 4) * 64, (i % 4 + 1) * 64)
    losses.append(float(step(model, optimizer, x[sl], labels[sl])))
  assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
  assert not np.allclose(model.bn.mean[...], 0.0)
  model.eval()
  evaluate = nnx.jit(lambda m, x: m(x))
  logits = evaluate(model, x)
  assert np.mean(np.argmax(logits, -1) == labels) > 0.7
  # Eval uses the running statistics: resetting them changes the output.
  model.bn.mean[...] = jnp.zeros(8)
  model.bn.var[...] = jnp.ones(8)
  assert not np.allclose(evaluate(model, x), logits, atol=1e-3)


def test_axis_name_in_shard_map_equals_full_batch():
  x = random_data.normal(jax.random.key(0), (16, 3, 4)) + 1
  bn = jn.BatchNorm(4, axis_name="b", rngs=nnx.Rngs(0))
  ref = jn.BatchNorm(4, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(bn)
  mesh = Mesh(np.array(jax.devices()[:8]), ("b",))

  def f(state, xs):
    m = nnx.merge(graphdef, state)
    y = m(xs)
    return y, nnx.state(m)

  xs = jax.device_put(x, NamedSharding(mesh, P("b")))
  y, new_state = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P("b")),
                                       out_specs=(P("b"), P())))(state, xs)
  np.testing.assert_allclose(y, ref(x), atol=1e-5)
  np.testing.assert_allclose(new_state["mean"][...], ref.mean[...], atol=1e-6)
  np.testing.assert_allclose(new_state["var"][...], ref.var[...], atol=1e-6)


def test_nnx_vmap_ensemble_and_scan():
  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return jn.BatchNorm(4, scale_init=_rand_init, rngs=rngs)

  ens = make(nnx.Rngs(0))
  assert ens.scale[...].shape == (3, 4)
  xs = random_data.normal(jax.random.key(1), (3, 6, 4)) * jnp.arange(1, 4)[:, None, None]
  y = nnx.vmap(lambda m, x: m(x), in_axes=(0, 0), out_axes=0)(ens, xs)
  for i in range(3):
    np.testing.assert_allclose(jnp.std(y[i] / ens.scale[...][i], 0), 1.0, rtol=1e-3)
    np.testing.assert_allclose(ens.var[...][i], 0.99 + 0.01 * jnp.var(xs[i], 0),
                               rtol=1e-5)

  # nnx.scan over the steps of a sequence, one BatchNorm carried.
  bn = jn.BatchNorm(4, rngs=nnx.Rngs(0))
  seq = random_data.normal(jax.random.key(2), (5, 6, 4)) + 2

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def run(bn, x):
    return bn, bn(x)

  _, ys = run(bn, seq)
  assert ys.shape == seq.shape
  expected = jnp.zeros(4)
  for t in range(5):
    expected = 0.99 * expected + 0.01 * seq[t].mean(0)
  np.testing.assert_allclose(bn.mean[...], expected, atol=1e-6)


def test_errors_name_module_and_argument():
  bn = jn.BatchNorm(3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError) as e:
    bn(jnp.ones((4, 5)))
  assert str(e.value) == (
      "BatchNorm: `x` has features of shape (5,) along axis -1 but "
      "`params['scale']` has shape (3,); pass `axis=` to choose the feature axis.")
  with pytest.raises(ValueError) as e:
    jn.GroupNorm(6, 4, rngs=nnx.Rngs(0))
  assert str(e.value) == (
      "GroupNorm: Number of groups (4) does not divide the number of channels "
      "(6). Pass `num_groups=` a divisor of 6, or `group_size=` with "
      "`num_groups=None`.")
  with pytest.raises(ValueError) as e:
    jn.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(jnp.ones((4, 3)))
  assert str(e.value) == (
      "No `use_running_average` argument was provided to BatchNorm. Pass "
      "`use_running_average=True/False` to the constructor or the call, use "
      "`model.train()` / `model.eval()`, or "
      "`nnx.view(model, use_running_average=True/False)`.")
  with pytest.raises(TypeError) as e:
    jn.LayerNorm(3, rngs=nnx.Rngs(0))(jnp.ones((2, 3)), mask=jnp.ones((2, 3)))
  assert str(e.value).startswith("LayerNorm: `mask` must be a boolean array, got dtype float32")


# ------------------------------------------- signatures, attributes, promote_dtype

# Constructor arguments of ours that Flax's namesake lacks (documented in the
# classes' docstrings), with their defaults.
_EXTRA_ARGS = {
    "BatchNorm": {"virtual_batch_size": None},
    "BatchRenorm": {"r_max": 3.0, "d_max": 5.0},
    "SpectralNorm": {"in_place": True},
    "LayerNorm": {"zero_centered_scale": False},
    "RMSNorm": {"zero_centered_scale": False},
}


@pytest.mark.parametrize("name", [
    "BatchNorm", "BatchRenorm", "LayerNorm", "RMSNorm", "GroupNorm",
    "InstanceNorm", "WeightNorm", "SpectralNorm", "Dropout"])
def test_signature_has_flax_arguments_and_defaults(name):
  flax_name = "BatchNorm" if name == "BatchRenorm" else name
  ours = inspect.signature(getattr(jn, name).__init__).parameters
  theirs = inspect.signature(getattr(nnx, flax_name).__init__).parameters
  # Flax's arguments first, in Flax's order, of the same kind and default.
  assert list(ours)[:len(theirs)] == list(theirs)
  for arg, param in theirs.items():
    assert ours[arg].kind == param.kind, arg
    default = ours[arg].default
    assert default is param.default or default == param.default, arg
  # Then ours, keyword-only; no **kwargs hiding the options.
  extra = {arg: p for arg, p in ours.items() if arg not in theirs}
  assert {arg: p.default for arg, p in extra.items()} == _EXTRA_ARGS.get(name, {})
  assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra.values())
  if "promote_dtype" in theirs:
    assert ours["promote_dtype"].default is nnx.nn.dtypes.promote_dtype


def test_batch_norm_misspelled_option_is_named():
  for cls in (jn.BatchNorm, jn.BatchRenorm):
    with pytest.raises(TypeError, match=re.escape(
        f"{cls.__name__}.__init__() got an unexpected keyword argument 'momentun'")):
      cls(3, momentun=0.9, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="virtual_batch_size"):
    jn.BatchRenorm(3, virtual_batch_size=2, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="r_max"):
    jn.BatchNorm(3, r_max=2.0, rngs=nnx.Rngs(0))


def _to_float16(args, *, dtype=None):
  """A custom promote_dtype: every array to float16 (or to `dtype`)."""
  target = jnp.float16 if dtype is None else dtype
  return tuple(None if a is None else jnp.asarray(a, target) for a in args)


class _RecordingPromote:
  """A promote_dtype that records each call's array dtypes and `dtype`."""

  def __init__(self):
    self.calls = []

  def __call__(self, args, *, dtype=None):
    self.calls.append(([None if a is None else (a.shape, a.dtype) for a in args],
                       dtype))
    return _to_float16(args, dtype=dtype)


def _stored_attributes(module):
  return {k: v for k, v in vars(module).items()
          if not k.startswith("_pytree__") and not isinstance(v, nnx.Variable)}


@pytest.mark.parametrize("name,args", [
    ("BatchNorm", (4,)), ("LayerNorm", (4,)), ("RMSNorm", (4,)),
    ("GroupNorm", (4, 2)), ("InstanceNorm", (4,))])
def test_stored_attributes_match_flax(name, args):
  kw = dict(epsilon=1e-3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
            promote_dtype=_to_float16, use_fast_variance=False)
  ours = getattr(jn, name)(*args, **kw, rngs=nnx.Rngs(0))
  theirs = getattr(nnx, name)(*args, **kw, rngs=nnx.Rngs(0))
  assert ours.promote_dtype is _to_float16
  assert _stored_attributes(ours) == {**_stored_attributes(theirs),
                                      **_EXTRA_ARGS.get(name, {})}


def _pair(name, args, kwargs):
  """Our module and Flax's, built alike; BatchRenorm(r_max=1, d_max=0) is
  checked against Flax's BatchNorm."""
  if name == "BatchRenorm":
    ours = jn.BatchRenorm(*args, r_max=1.0, d_max=0.0, **kwargs, rngs=nnx.Rngs(1))
    theirs = nnx.BatchNorm(*args, **kwargs, rngs=nnx.Rngs(1))
  else:
    ours = getattr(jn, name)(*args, **kwargs, rngs=nnx.Rngs(1))
    theirs = getattr(nnx, name)(*args, **kwargs, rngs=nnx.Rngs(1))
  if name in ("BatchNorm", "BatchRenorm"):  # non-trivial running averages
    for m in (ours, theirs):
      m.mean[...] = jnp.linspace(-0.5, 0.5, m.mean.shape[0])
      m.var[...] = jnp.linspace(0.5, 2.0, m.var.shape[0])
  return ours, theirs


# (name, positional args, kwargs for both classes, input shape)
DTYPE_CASES = [
    ("BatchNorm", (5,), {}, (6, 5)),
    ("BatchNorm", (5,), {"use_running_average": True}, (6, 5)),
    ("BatchRenorm", (5,), {}, (6, 5)),
    ("BatchRenorm", (5,), {"use_running_average": True}, (6, 5)),
    ("LayerNorm", (6,), {}, (4, 3, 6)),
    ("RMSNorm", (6,), {}, (4, 3, 6)),
    ("GroupNorm", (6, 2), {}, (2, 3, 3, 6)),
    ("InstanceNorm", (5,), {"use_bias": False}, (2, 3, 4, 5)),
]


def _check_like_flax(ours, theirs, y1, y2, dtype):
  assert y1.dtype == y2.dtype == dtype
  tol = _tol(dtype)
  np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y2, np.float32),
                             atol=tol, rtol=tol)
  if hasattr(theirs, "mean"):
    for k in ("mean", "var"):
      assert getattr(ours, k)[...].dtype == jnp.float32
      np.testing.assert_allclose(getattr(ours, k)[...], getattr(theirs, k)[...],
                                 atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("name,args,kwargs,shape", DTYPE_CASES)
def test_custom_promote_dtype_called_and_used_like_flax(name, args, kwargs, shape,
                                                         dtype):
  promote = _RecordingPromote()
  kw = dict(kwargs, dtype=dtype, scale_init=_rand_init, promote_dtype=promote)
  ours, theirs = _pair(name, args, kw)
  assert ours.promote_dtype is promote
  x = 2.0 * random_data.normal(jax.random.key(0), shape) + 0.5
  y1 = ours(x)
  y2 = theirs(x)
  # One call each, on the same arrays (x, [mean, var,] scale, bias) and dtype.
  assert len(promote.calls) == 2
  assert promote.calls[0] == promote.calls[1]
  # Its float16 result is what gets normalized: float16 out unless `dtype`.
  _check_like_flax(ours, theirs, y1, y2, jnp.float16 if dtype is None else dtype)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("name,args,kwargs,shape", DTYPE_CASES)
def test_bfloat16_inputs_match_flax(name, args, kwargs, shape, dtype, param_dtype):
  kw = dict(kwargs, dtype=dtype, param_dtype=param_dtype, scale_init=_rand_init)
  ours, theirs = _pair(name, args, kw)
  x = (2.0 * random_data.normal(jax.random.key(0), shape) + 0.5).astype(jnp.bfloat16)
  y1, y2 = _run(ours, x, None), _run(theirs, x, None)
  # x and the parameters promote together, with BatchNorm's float32 mean/var.
  stats = [jnp.float32] if hasattr(theirs, "mean") else []
  expected = dtype or jnp.result_type(x.dtype, param_dtype, *stats)
  _check_like_flax(ours, theirs, y1, y2, expected)


def test_batch_norm_promoted_statistics_used_at_inference_only():
  def shift_stats(args, *, dtype=None):
    x, mean, var, scale, bias = nnx.nn.dtypes.promote_dtype(args, dtype=dtype)
    return x, mean + 1.0, 4.0 * var, scale, bias

  x = random_data.normal(jax.random.key(0), (8, 3)) * 2 + 1
  for name in ("BatchNorm", "BatchRenorm"):
    ours, theirs = _pair(name, (3,), {"promote_dtype": shift_stats})
    mean0, var0 = np.asarray(ours.mean[...]), np.asarray(ours.var[...])
    # Training: batch statistics; the running averages move from the stored
    # values, not from the promoted ones.
    y1, y2 = ours(x), theirs(x)
    np.testing.assert_allclose(y1, y2, atol=1e-5, rtol=1e-5)
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(y1, (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5),
                               atol=1e-5)
    np.testing.assert_allclose(ours.mean[...], 0.99 * mean0 + 0.01 * xn.mean(0),
                               atol=1e-6)
    np.testing.assert_allclose(ours.var[...], 0.99 * var0 + 0.01 * xn.var(0),
                               rtol=1e-5)
    _check_like_flax(ours, theirs, y1, y2, jnp.float32)
    # Inference: the promoted (shifted) running averages normalize x.
    ours.eval()
    theirs.eval()
    mean, var = np.asarray(ours.mean[...]), np.asarray(ours.var[...])
    y1, y2 = ours(x), theirs(x)
    np.testing.assert_allclose(y1, y2, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(y1, (xn - (mean + 1.0)) / np.sqrt(4.0 * var + 1e-5),
                               atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: jn.BatchNorm(4, rngs=nnx.Rngs(0)),
    lambda: jn.LayerNorm(4, rngs=nnx.Rngs(0)),
    lambda: jn.RMSNorm(4, rngs=nnx.Rngs(0)),
    lambda: jn.GroupNorm(4, num_groups=2, rngs=nnx.Rngs(0)),
    lambda: jn.InstanceNorm(4, rngs=nnx.Rngs(0)),
])
def test_integer_input_is_refused_before_promotion(make):
  """Flax's promote_dtype would cast an integer x to float; we refuse it, as the core does."""
  module = make()
  with pytest.raises(TypeError, match=f"{type(module).__name__}: `x` must have a floating-point"):
    module(jnp.ones((2, 3, 4), jnp.int32))


@pytest.mark.parametrize("use_running_average", [True, False])
@pytest.mark.parametrize("x_dtype,param_dtype", [
    (jnp.complex64, jnp.float32), (jnp.complex64, jnp.complex64),
    (jnp.float32, jnp.complex64)])
def test_batch_norm_complex_promotion_matches_flax(x_dtype, param_dtype,
                                                   use_running_average):
  """Flax promotes (x, mean, var, scale, bias) together, so a complex x or
  complex parameters make the running averages complex at inference."""
  ours, theirs = _pair("BatchNorm", (5,), {"param_dtype": param_dtype,
                                           "use_running_average": use_running_average})
  kr, ki = jax.random.split(jax.random.key(0))
  x = 2.0 * random_data.normal(kr, (6, 5)) + 0.5
  if x_dtype == jnp.complex64:
    x = x + 1j * random_data.normal(ki, (6, 5))
  y1, y2 = ours(x), theirs(x)
  assert y1.dtype == y2.dtype == jnp.complex64
  np.testing.assert_allclose(y1, y2, atol=1e-5, rtol=1e-5)
  for k in ("mean", "var"):
    assert getattr(ours, k)[...].dtype == getattr(theirs, k)[...].dtype == jnp.float32
    np.testing.assert_allclose(getattr(ours, k)[...], getattr(theirs, k)[...],
                               atol=1e-6, rtol=1e-6)


# Flax's only form for several feature axes: an int num_features, the product
# of their sizes; Flax stores (num_features,) and reshapes at each call.
# (name, args, kwargs, x shape)
FLAT_FEATURE_CASES = [
    ("LayerNorm", (18,), {"reduction_axes": (1, 2), "feature_axes": (1, 2)}, (4, 3, 6)),
    ("LayerNorm", (15,), {"reduction_axes": (1, 2, 3), "feature_axes": (-1, 1)},
     (2, 3, 4, 5)),
    ("RMSNorm", (18,), {"reduction_axes": (1, 2), "feature_axes": (1, 2)}, (4, 3, 6)),
    ("InstanceNorm", (15,), {"feature_axes": (1, -1)}, (2, 3, 4, 5)),
    ("InstanceNorm", (18,), {"feature_axes": (1, 2)}, (4, 3, 6)),  # nothing to reduce
    ("BatchNorm", (18,), {"axis": (1, 2), "use_running_average": True}, (4, 3, 6)),
    ("BatchRenorm", (15,), {"axis": (1, 3), "use_running_average": True}, (2, 3, 4, 5)),
]


@pytest.mark.parametrize("name,args,kwargs,shape", FLAT_FEATURE_CASES)
def test_int_num_features_for_several_feature_axes_like_flax(name, args, kwargs, shape):
  kw = dict(kwargs, scale_init=_rand_init)
  if name != "RMSNorm":
    kw["bias_init"] = nnx.initializers.normal(0.5)
  ours, theirs = _pair(name, args, kw)
  assert _state_tree(ours) == _state_tree(theirs)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(ours), nnx.state(theirs))
  assert ours.scale.shape == args
  x = 2.0 * random_data.normal(jax.random.key(0), shape) + 0.5
  degenerate = name == "InstanceNorm" and len(shape) == 3
  expect = (pytest.warns(UserWarning, match="no axis to normalize over")
            if degenerate else contextlib.nullcontext())
  with expect:
    y1 = ours(x)
  with expect:
    y1_jit = _run(ours, x, None)
  y2 = theirs(x)
  assert y1.dtype == y2.dtype
  np.testing.assert_allclose(y1, y2, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(y1_jit, y2, atol=1e-5, rtol=1e-5)
  # Flax's state loads into ours and back.
  flax_state = jax.tree.map(lambda a: a * 1.5 - 0.25, nnx.state(theirs))
  nnx.update(theirs, flax_state)
  nnx.update(ours, flax_state)
  with expect:
    np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
  nnx.update(theirs, nnx.state(ours))
  assert _state_tree(ours) == _state_tree(theirs)


def test_tuple_num_features_is_flax_int_reshaped():
  x = 2.0 * random_data.normal(jax.random.key(0), (4, 3, 6)) + 0.5
  kw = {"reduction_axes": (1, 2), "feature_axes": (1, 2), "scale_init": _rand_init}
  ours = jn.LayerNorm((3, 6), **kw, rngs=nnx.Rngs(1))
  theirs = nnx.LayerNorm(18, **kw, rngs=nnx.Rngs(1))
  assert ours.scale.shape == (3, 6)
  theirs.scale[...] = ours.scale[...].reshape(18)
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_flat_num_features_errors_name_the_module_argument():
  x = random_data.normal(jax.random.key(0), (4, 3, 6))
  # Flax cannot train a flat BatchNorm over several axes either.
  with pytest.raises(ValueError, match="Incompatible shapes for broadcasting"):
    nnx.BatchNorm(18, axis=(1, 2), rngs=nnx.Rngs(0))(x)
  with pytest.raises(ValueError) as e:
    jn.BatchNorm(18, axis=(1, 2), rngs=nnx.Rngs(0))(x)
  assert str(e.value) == (
      "BatchNorm: `num_features`=18 stores the running averages flat, shape (18,), "
      "for the features of shape (3, 6) along `axis`=(1, 2): inference reshapes them, "
      "as Flax does, but training cannot update them (Flax fails to broadcast the "
      "batch statistics too). Pass `num_features`=(3, 6) to train (a flat state "
      "reshapes to it with `.reshape((3, 6))`).")
  # Sizes that do not match: Flax fails to reshape; ours names `feature_axes`
  # (and the caller's axes, not the ones of a rank-3 instance norm's view).
  with pytest.raises(TypeError, match="cannot reshape"):
    nnx.LayerNorm(20, reduction_axes=(1, 2), feature_axes=(1, 2), rngs=nnx.Rngs(0))(x)
  for module in (jn.LayerNorm(20, reduction_axes=(1, 2), feature_axes=(1, 2),
                              rngs=nnx.Rngs(0)),
                 jn.RMSNorm(20, reduction_axes=(1, 2), feature_axes=(1, 2),
                            rngs=nnx.Rngs(0)),
                 jn.InstanceNorm(20, feature_axes=(1, 2), rngs=nnx.Rngs(0))):
    with pytest.raises(ValueError) as e:
      module(x)
    assert str(e.value) == (
        f"{type(module).__name__}: `x` has features of shape (3, 6) along "
        "`feature_axes`=(1, 2) but `scale` has shape (20,); build the module with "
        "`num_features`=18 (or (3, 6)), or choose the feature axes with "
        "`feature_axes=`.")
  with pytest.raises(ValueError) as e:
    jn.LayerNorm(5, rngs=nnx.Rngs(0))(x)
  assert str(e.value) == (
      "LayerNorm: `x` has features of shape (6,) along `feature_axes`=-1 but "
      "`scale` has shape (5,); build the module with `num_features`=6, or choose "
      "the feature axes with `feature_axes=`.")
