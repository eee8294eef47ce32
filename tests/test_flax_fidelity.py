"""Drop-in fidelity: jaxnorm's modules behave as Flax's where Flax's users look.

One test per cause of issue 17: class identity (``isinstance``, ``nnx.view``
filters, ``nnx.view_info``), inputs Flax accepts and the core refuses
(degenerate results with a warning), Flax's error wording, nnx SpectralNorm's
in-place update, and the layering of ``jaxnorm.nnx``. References are Flax's
own modules or float64 NumPy.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import pathlib
import re
import subprocess
import sys
import warnings

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

NAMES = ("BatchNorm", "LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm",
         "WeightNorm", "SpectralNorm", "Dropout")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _full(msg: str) -> str:
  """A regex matching exactly ``msg``."""
  return "^" + re.escape(msg) + "$"


@contextlib.contextmanager
def _raises(error: type, msg: str):
  """Expects ``error`` whose text is exactly ``msg`` (JAX may add notes after
  it, which pytest's ``match`` would see)."""
  with pytest.raises(error) as info:
    yield
  assert str(info.value) == msg


@pytest.fixture(params=["eager", "jit"])
def call(request):
  """Calls ``f(module, x)`` eagerly or under ``nnx.jit`` (state updates kept)."""
  if request.param == "eager":
    return lambda f, *args: f(*args)
  return lambda f, *args: nnx.jit(f)(*args)


# ------------------------------------------------------------ class identity


@pytest.mark.parametrize("name", NAMES)
def test_classes_are_flax_subclasses(name):
  assert issubclass(getattr(jl, name), getattr(nn, name))
  assert issubclass(getattr(jn, name), getattr(nnx, name))
  assert isinstance(jn.BatchRenorm(2, rngs=nnx.Rngs(0)), nnx.BatchNorm)
  assert isinstance(jl.BatchRenorm(), nn.BatchNorm)


def test_linen_fields_are_flax_fields_plus_ours():
  extra = {"BatchNorm": ["virtual_batch_size"], "LayerNorm": ["zero_centered_scale"],
           "RMSNorm": ["zero_centered_scale"]}
  for name in NAMES:
    ours = [f.name for f in dataclasses.fields(getattr(jl, name))]
    theirs = [f.name for f in dataclasses.fields(getattr(nn, name))]
    assert [f for f in ours if f not in theirs] == extra.get(name, [])
    assert [f for f in ours if f in theirs] == theirs


class _Block(nnx.Module):

  def __init__(self, lib, rngs):
    self.linear = nnx.Linear(2, 3, rngs=rngs)
    self.bn = lib.BatchNorm(3, use_running_average=False, rngs=rngs)
    self.dropout = lib.Dropout(0.5, deterministic=False, rngs=rngs)


def test_nnx_view_with_type_filter():
  block = _Block(jn, nnx.Rngs(0))
  view = nnx.view(block, only=nnx.Dropout, deterministic=True)
  assert view.dropout.deterministic is True
  assert view.bn.use_running_average is False
  view = nnx.view(block, only=nnx.BatchNorm, use_running_average=True)
  assert view.bn.use_running_average is True
  assert view.dropout.deterministic is False
  view = nnx.view(block, deterministic=True, use_running_average=True)
  assert (view.dropout.deterministic, view.bn.use_running_average) == (True, True)
  assert view.linear.kernel is block.linear.kernel
  with _raises(ValueError, "Unused keys found in nnx.view: ['unknown']"):
    nnx.view(block, deterministic=True, unknown=1)


def test_nnx_view_info_equals_flax():
  ours = nnx.view_info(_Block(jn, nnx.Rngs(0)))
  theirs = nnx.view_info(_Block(nnx, nnx.Rngs(0)))
  assert ours == theirs
  assert "BatchNorm:\n  use_running_average: bool | None = None" in ours
  assert nnx.view_info(_Block(jn, nnx.Rngs(0)), only=nnx.Dropout).startswith(
      "Dropout:")


def test_linen_isinstance_finds_our_layers():

  class Model(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = jl.BatchNorm(use_running_average=True)(nn.Dense(3)(x))
      return jl.Dropout(0.5, deterministic=True)(x)

  x = jnp.ones((2, 4))
  variables = Model().init(jax.random.key(0), x)
  found = []

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__":  # what code walking a model sees
      found.append(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    Model().apply(variables, x)
  assert sum(isinstance(m, nn.BatchNorm) for m in found) == 1
  assert sum(isinstance(m, nn.Dropout) for m in found) == 1


# ------------------------------------------ inputs Flax accepts, core refuses

_ONE_PER_FEATURE = (
    "BatchNorm: train-mode batch statistics need more than one value per "
    "feature, but `x` of shape (1, 4) has one per feature, so each value is its "
    "own mean and the output is just `bias` (as in Flax). Use "
    "`use_running_average=True` (`model.eval()` in nnx) for single examples, a "
    "larger batch, or a per-example norm (LayerNorm, GroupNorm).")


def _rand(shape, seed=0, offset=0.0):
  return random_data.normal(jax.random.key(seed), shape) + offset


def _set_affine(module):
  module.scale[...] = _rand(module.scale.shape, 1)
  module.bias[...] = _rand(module.bias.shape, 2)


def test_nnx_batch_norm_one_value_per_feature_gives_flax_result(call):
  x = _rand((1, 4), offset=3.0)
  ours = jn.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
  theirs = nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
  _set_affine(ours)
  _set_affine(theirs)
  with pytest.warns(UserWarning, match=_full(_ONE_PER_FEATURE)):
    y = call(lambda m, x: m(x), ours, x)
  y_flax = theirs(x)
  chex.assert_trees_all_close(y, y_flax, ours.bias[...][None], atol=1e-6)
  chex.assert_trees_all_close(ours.mean[...], theirs.mean[...],
                              0.5 * np.asarray(x[0]), atol=1e-6)
  chex.assert_trees_all_close(ours.var[...], theirs.var[...], 0.5, atol=1e-6)


def test_nnx_batch_norm_inside_scan_on_batch_of_one():
  """nnx code runs models on one example inside nnx.scan (Flax's test_complex)."""
  bn = jn.BatchNorm(4, rngs=nnx.Rngs(0))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def steps(module, x):
    return module, module(x)

  with pytest.warns(UserWarning, match=_full(_ONE_PER_FEATURE)):
    _, ys = steps(bn, _rand((3, 1, 4)))
  chex.assert_trees_all_close(ys, jnp.zeros((3, 1, 4)))


def test_one_value_per_feature_warns_only_without_mask():
  bn = jn.BatchNorm(4, rngs=nnx.Rngs(0))
  x = _rand((1, 4))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    y = bn(x, mask=jnp.ones((1, 4), bool))   # the user chose the entries
    bn(_rand((2, 4)))                          # two values per feature
    bn(x, use_running_average=True)            # inference
  chex.assert_trees_all_close(y, jnp.zeros((1, 4)))


def test_linen_batch_norm_one_value_per_feature(call):
  x = _rand((1, 4), offset=3.0)
  init = jax.random.key(0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # init on one example stays silent
    v = jl.BatchNorm(use_running_average=False, bias_init=nn.initializers.normal(
        1.0)).init(init, x)
  v_flax = nn.BatchNorm(use_running_average=False, bias_init=nn.initializers
                        .normal(1.0)).init(init, x)
  chex.assert_trees_all_equal(v, v_flax)
  model = jl.BatchNorm(use_running_average=False, momentum=0.5)
  with pytest.warns(UserWarning, match=_full(_ONE_PER_FEATURE)):
    y, upd = call(lambda v, x: model.apply(v, x, mutable=["batch_stats"]), v, x)
  y_flax, upd_flax = nn.BatchNorm(use_running_average=False, momentum=0.5).apply(
      v, x, mutable=["batch_stats"])
  chex.assert_trees_all_close(y, y_flax, v["params"]["bias"][None], atol=1e-6)
  chex.assert_trees_all_close(upd, upd_flax, atol=1e-6)


_NO_SPATIAL = (
    "InstanceNorm: `x` of shape (3, 4) has no axis to normalize over besides "
    "the batch axis and the feature axes (1,), so each value is its own mean "
    "and the output is just `bias` (as in Flax). Give `x` a spatial axis, e.g. "
    "`x[:, None]`, or use LayerNorm/BatchNorm for (batch, features) inputs.")


# Pairs of layers that compute the same normalization (the pairs of Flax's
# NormalizationTest.test_normalization_equivalence): Flax's agree to the bit, and
# Flax's test compares them at 1e-7, so ours must take their statistics the same
# way too (a layer norm over the spatial axes once tried plain sums first and
# instance norm did not: 6e-7 apart on standard normal data).
_SAME_NORMALIZATION = [
    ("LayerNorm", {"feature_axes": (1, 2)}, "InstanceNorm", {"feature_axes": (1, 2)}),
    ("LayerNorm", {"reduction_axes": (1, 2), "feature_axes": -1}, "InstanceNorm",
     {"feature_axes": -1}),
    ("LayerNorm", {"reduction_axes": -2, "feature_axes": (1, 3)}, "InstanceNorm",
     {"feature_axes": (1, -1)}),
    ("LayerNorm", {"reduction_axes": (1, 2, 3)}, "GroupNorm", {"num_groups": 1}),
    ("InstanceNorm", {}, "GroupNorm", {"num_groups": None, "group_size": 1}),
]


@pytest.mark.parametrize("first,first_kw,second,second_kw", _SAME_NORMALIZATION)
@pytest.mark.parametrize("uniform_init", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_layers_computing_the_same_normalization_agree(first, first_kw, second, second_kw,
                                                      uniform_init, seed):
  # Centred data, as in Flax's test. With a large offset both layers are exact
  # (tests of each layer against float64) but may round differently: group norm
  # pools per-channel sums, layer norm sums all axes at once.
  x = _rand((2, 3, 4, 5), seed=seed)
  init = ({"bias_init": nn.initializers.uniform(), "scale_init": nn.initializers.uniform()}
          if uniform_init else {})
  a = getattr(jl, first)(**first_kw, **init)
  b = getattr(jl, second)(**second_kw, **init)
  va, vb = a.init(jax.random.key(1), x), b.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(va, vb)
  ya, yb = a.apply(va, x), b.apply(vb, x)
  np.testing.assert_allclose(ya, yb, rtol=1e-7, atol=1e-7)
  # Flax's pair (equal to the bit) as the check that the pair is one normalization.
  fa = getattr(nn, first)(**first_kw, **init)
  fb = getattr(nn, second)(**second_kw, **init)
  np.testing.assert_allclose(fa.apply(va, x), fb.apply(vb, x), rtol=1e-7, atol=1e-7)


def test_batch_norm_step_on_an_empty_batch_keeps_running_averages():
  """Flax's running averages become NaN (0/0) on an empty batch; jaxnorm's
  stay as they were (README, "Differences from Flax"), and the warning says
  so rather than calling it one value per feature."""
  x = jnp.zeros((0, 5))
  v = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones((2, 5)))
  y_flax, s_flax = nn.BatchNorm(use_running_average=False).apply(
      v, x, mutable=["batch_stats"])
  assert np.isnan(np.asarray(s_flax["batch_stats"]["mean"])).all()
  msg = ("BatchNorm: `x` of shape (0, 5) is an empty batch (no values per "
         "feature), so there are no batch statistics: the output is empty and "
         "the running averages are left unchanged (Flax would set them to "
         "NaN, 0/0).")
  with pytest.warns(UserWarning, match="an empty batch") as record:
    y, s = jl.BatchNorm(use_running_average=False).apply(
        v, x, mutable=["batch_stats"])
  assert [str(w.message) for w in record] == [msg]
  assert y.shape == y_flax.shape and y.dtype == y_flax.dtype
  np.testing.assert_array_equal(s["batch_stats"]["mean"], np.zeros(5))
  np.testing.assert_array_equal(s["batch_stats"]["var"], np.ones(5))
  m = jn.BatchNorm(5, rngs=nnx.Rngs(0))
  with pytest.warns(UserWarning, match="an empty batch") as record:
    assert m(x).shape == (0, 5)
  assert [str(w.message) for w in record] == [msg]
  np.testing.assert_array_equal(m.mean[...], np.zeros(5))
  np.testing.assert_array_equal(m.var[...], np.ones(5))


def test_batch_norm_mask_with_axis_name_weights_devices_by_selected_count():
  """README, "Differences from Flax": jaxnorm gives the masked statistics of
  the whole batch; Flax the unweighted mean of the per-device masked means."""
  x = np.asarray(_rand((2, 4, 3), offset=0.5)) * 2
  mask = np.ones((2, 4, 3), bool)
  mask[0, 1:] = False  # device 0 keeps 1 example, device 1 all 4
  v = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x[0])
  means = []
  for M in (jl, nn):
    m = M.BatchNorm(axis_name="d", use_running_average=False, momentum=0.0)
    f = lambda a, k, m=m: m.apply(v, a, mask=k, mutable=["batch_stats"])[1]
    means.append(jax.vmap(f, axis_name="d")(jnp.asarray(x), jnp.asarray(mask)))
  x64 = x.astype(np.float64)
  whole = np.array([x64[..., c][mask[..., c]].mean() for c in range(3)])
  per_device = np.mean([[x64[d, :, c][mask[d, :, c]].mean() for c in range(3)]
                        for d in range(2)], axis=0)
  np.testing.assert_allclose(means[0]["batch_stats"]["mean"][0], whole, atol=1e-6)
  np.testing.assert_allclose(means[1]["batch_stats"]["mean"][0], per_device, atol=1e-6)
  assert np.abs(whole - per_device).max() > 0.1


def test_instance_norm_on_rank_two_input_gives_flax_result(call):
  x = _rand((3, 4), offset=2.0)
  ours = jn.InstanceNorm(4, rngs=nnx.Rngs(0))
  theirs = nnx.InstanceNorm(4, rngs=nnx.Rngs(0))
  _set_affine(ours)
  _set_affine(theirs)
  with pytest.warns(UserWarning, match=_full(_NO_SPATIAL)):
    y = call(lambda m, x: m(x), ours, x)
  chex.assert_trees_all_close(y, theirs(x),
                              jnp.broadcast_to(ours.bias[...], (3, 4)),
                              atol=1e-6)
  v = nn.InstanceNorm(bias_init=nn.initializers.normal(1.0)).init(
      jax.random.key(0), x)
  with pytest.warns(UserWarning, match=_full(_NO_SPATIAL)):
    y = call(lambda v, x: jl.InstanceNorm().apply(v, x), v, x)
  chex.assert_trees_all_close(y, nn.InstanceNorm().apply(v, x), atol=1e-6)
  # Each value is its own group: a mask has nothing to select. Flax gives NaN
  # (0/0) at masked-out entries, ours gives bias there too, in linen and nnx.
  mask = jnp.array([True, False, True, False])
  with pytest.warns(UserWarning, match=_full(_NO_SPATIAL)):
    y_nnx = ours(x, mask=mask)
  with pytest.warns(UserWarning, match=_full(_NO_SPATIAL)):
    y_linen = jl.InstanceNorm().apply(v, x, mask=mask)
  chex.assert_trees_all_close(y_nnx, jnp.broadcast_to(ours.bias[...], (3, 4)),
                              atol=1e-6)
  chex.assert_trees_all_close(
      y_linen, jnp.broadcast_to(v["params"]["bias"], (3, 4)), atol=1e-6)
  assert np.isnan(np.asarray(theirs(x, mask=mask))[:, 1]).all()


def test_ghost_batch_norm_initialized_on_one_example():
  x1 = _rand((1, 3))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    v = jl.BatchNorm(use_running_average=False, virtual_batch_size=4).init(
        jax.random.key(0), x1)
  chex.assert_trees_all_equal(
      v, nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x1))
  # A training batch smaller than one chunk is one chunk, with a warning.
  x2 = _rand((2, 3), offset=1.0)
  msg = ("BatchNorm: `virtual_batch_size`=4 is larger than the batch, which has "
         "2 examples along axis 0; the batch is normalized as one chunk. Use a "
         "batch of at least `virtual_batch_size` examples for ghost batch norm.")
  ours = jn.BatchNorm(3, virtual_batch_size=4, rngs=nnx.Rngs(0))
  with pytest.warns(UserWarning, match=_full(msg)):
    y = ours(x2)
  x64 = np.asarray(x2, np.float64)
  chex.assert_trees_all_close(
      y, (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5), atol=1e-5)
  # Batches of whole chunks keep jaxnorm's ghost batches and its errors.
  with pytest.raises(ValueError, match="must divide the batch size"):
    ours(_rand((6, 3)))


def _variables(module):
  """Each variable's type, shape and dtype, by path."""
  return {path: (type(v).__name__, v.shape, v.dtype)
          for path, v in nnx.to_flat_state(nnx.state(module))}


# Zero features, as Flax builds and runs them: (name, args, kwargs, x shape).
_ZERO_FEATURES = [
    ("LayerNorm", (0,), {}, (4, 3, 0)),
    ("LayerNorm", (0,), {}, (4, 0, 3)),
    ("RMSNorm", (0,), {}, (4, 3, 0)),
    ("BatchNorm", (0,), {}, (4, 3, 0)),
    ("BatchNorm", (0,), {"use_running_average": True}, (4, 3, 0)),
    ("BatchNorm", (0,), {"axis": 1}, (4, 0, 3)),
    ("InstanceNorm", (0,), {}, (4, 3, 0)),
    ("GroupNorm", (0, None, 2), {}, (4, 3, 0)),
    ("GroupNorm", (0,), {}, (4, 3, 0)),
]


@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name,args,kwargs,shape", _ZERO_FEATURES)
def test_nnx_zero_features_build_and_run_as_in_flax(name, args, kwargs, shape,
                                                    x_dtype, call):
  ours = getattr(jn, name)(*args, **kwargs, rngs=nnx.Rngs(0))
  theirs = getattr(nnx, name)(*args, **kwargs, rngs=nnx.Rngs(0))
  assert _variables(ours) == _variables(theirs)
  for attr in ("num_features", "num_groups", "group_size"):
    assert getattr(ours, attr, None) == getattr(theirs, attr, None), attr
  x = jnp.zeros(shape, x_dtype)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a zero-size x is no mistake
    y = call(lambda m, x: m(x), ours, x)
  y_flax = call(lambda m, x: m(x), theirs, x)
  assert (y.shape, y.dtype) == (y_flax.shape, y_flax.dtype) == (shape, y_flax.dtype)
  assert _variables(ours) == _variables(theirs)


def _zero_features_msg(name, terms):
  them = "them" if " and " in terms else "it"
  return (f"{name}: `num_features`=0 makes {terms} empty, and Flax skips an empty "
          f"{terms.replace('`', '')}, so `x` of shape (4, 3, 2) is normalized "
          f"without {them} (as in Flax). Build the module with `num_features` "
          "equal to the size of `x` along the feature axes.")


@pytest.mark.parametrize("name,terms", [
    ("LayerNorm", "`scale` and `bias`"), ("RMSNorm", "`scale`"),
    ("InstanceNorm", "`scale` and `bias`")])
def test_nnx_zero_features_on_real_features_follow_flax_and_warn(name, terms):
  """Flax reads `if self.scale`: an empty Param is falsy, so a zero-feature
  module normalizes a non-empty x without scale or bias."""
  x = _rand((4, 3, 2), offset=1.0).astype(jnp.bfloat16)
  ours = getattr(jn, name)(0, rngs=nnx.Rngs(0))
  with pytest.warns(UserWarning, match=_full(_zero_features_msg(name, terms))):
    y = ours(x)
  y_flax = getattr(nnx, name)(0, rngs=nnx.Rngs(0))(x)
  assert y.dtype == y_flax.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_flax, np.float32),
                             atol=2e-2, rtol=2e-2)


def test_nnx_zero_features_errors_name_the_argument():
  x = _rand((4, 3, 2))
  # Flax fails to reshape 2 channels into 0 groups of 2 (TypeError).
  with _raises(ValueError, "GroupNorm: `x` has 2 channels (shape (4, 3, 2)) but the "
               "module was built for 0 (`num_features`: 0 groups of 2); build it "
               "with `num_features`=2."):
    jn.GroupNorm(0, None, 2, rngs=nnx.Rngs(0))(x)
  with pytest.raises(TypeError, match="cannot reshape"):
    nnx.GroupNorm(0, None, 2, rngs=nnx.Rngs(0))(x)
  # Flax: ZeroDivisionError.
  with pytest.raises(ValueError, match="`group_size` must be a positive int, got 0"):
    jn.GroupNorm(0, None, 0, rngs=nnx.Rngs(0))
  for name in ("LayerNorm", "RMSNorm", "BatchNorm", "InstanceNorm"):
    with _raises(ValueError, f"{name}: `num_features` must be non-negative, got -1."):
      getattr(jn, name)(-1, rngs=nnx.Rngs(0))


# ------------------------------------------------------- Flax's error wording


@pytest.mark.parametrize("feature_axes", [0, (0, 3), -4])
def test_instance_norm_batch_axis_error(feature_axes):
  x = _rand((2, 3, 4, 5))
  msg = ("InstanceNorm: The channel axes cannot include the leading dimension "
         "as this is assumed to be the batch axis. `feature_axes`="
         f"{feature_axes!r} names axis 0 of `x` (shape (2, 3, 4, 5)); instance "
         "norm normalizes each example on its own, over every axis but the "
         "first and `feature_axes`.")
  with _raises(ValueError, msg):
    jl.InstanceNorm(feature_axes=feature_axes).init(jax.random.key(0), x)
  with _raises(ValueError, msg):
    jn.InstanceNorm(5, feature_axes=feature_axes, rngs=nnx.Rngs(0))(x)


def test_dropout_errors_have_flax_wording():
  x = jnp.ones((2, 3))
  msg = ("`deterministic` is False, but no `rngs` argument was provided to "
         "Dropout as either a __call__ argument or class attribute. Pass "
         "`rngs=` to the constructor or the call, or make it deterministic.")
  with _raises(ValueError, msg):
    jn.Dropout(0.5)(x)
  msg = ("No `deterministic` argument was provided to Dropout. Pass "
         "`deterministic=True/False` to the constructor or the call, use "
         "`.train()` / `.eval()`, or `nnx.view(model, deterministic=True/False)`.")
  with _raises(ValueError, msg):
    jn.Dropout(0.5, deterministic=None)(x)
  msg = ("Dropout: rngs must be a Rngs, RngStream or None, but got <class "
         "'int'>. Pass e.g. `rngs=nnx.Rngs(dropout=0)`.")
  with _raises(TypeError, msg):
    jn.Dropout(0.5, rngs=3)
  msg = ("Dropout: `rate` is the probability of dropping a unit and must be in "
         "[0, 1], got 1.5.")
  with _raises(ValueError, msg):
    jn.Dropout(1.5)
  with _raises(ValueError, msg):
    jl.Dropout(1.5, deterministic=False).apply({}, x)


def test_group_norm_errors_have_flax_wording():
  msg = ("GroupNorm: Either `num_groups` or `group_size` should be specified. "
         "If `group_size` is to be specified, pass `num_groups=None` as "
         "argument to override the default `num_groups` value of 32. Got "
         "num_groups=32 and group_size=2.")
  with _raises(ValueError, msg):
    jn.GroupNorm(6, group_size=2, rngs=nnx.Rngs(0))
  with _raises(ValueError, msg):
    jl.GroupNorm(group_size=2).init(jax.random.key(0), jnp.ones((2, 6)))
  msg = ("GroupNorm: Number of channels (6) is not multiple of the group size "
         "(4). Pass `group_size=` a divisor of 6.")
  with _raises(ValueError, msg):
    jl.GroupNorm(num_groups=None, group_size=4).init(jax.random.key(0),
                                                     jnp.ones((2, 6)))
  with _raises(ValueError, msg.replace("channels", "features")):
    jn.GroupNorm(6, None, 4, rngs=nnx.Rngs(0))
  msg = ("GroupNorm: The reduction axes must include the final dimension as "
         "this is assumed to be the feature axis. Got `reduction_axes`=(1,) for "
         "`x` of shape (2, 3, 6).")
  with _raises(ValueError, msg):
    jl.GroupNorm(num_groups=2, reduction_axes=(1,)).init(jax.random.key(0),
                                                          jnp.ones((2, 3, 6)))


def test_spectral_norm_non_matrix_errors_have_flax_wording():
  x = jnp.ones((1, 2))
  msg = ("SpectralNorm: Input is 3D but error_on_non_matrix is True: the "
         "variable 'DenseGeneral_0/kernel' of the layer has shape (2, 3, 4); "
         "spectral normalization is defined on matrices. Set "
         "error_on_non_matrix=False to flatten it to (-1, out).")

  class Model(nn.Module):

    @nn.compact
    def __call__(self, x):
      return jl.SpectralNorm(nn.DenseGeneral((3, 4), use_bias=False),
                             error_on_non_matrix=True)(x, update_stats=False)

  with _raises(ValueError, msg):
    Model().init(jax.random.key(0), x)
  msg = ("SpectralNorm: Layer instance parameter is 3D but error_on_non_matrix "
         "is True: the parameter ('kernel',) has shape (2, 3, 4); spectral "
         "normalization is defined on matrices. Set error_on_non_matrix=False "
         "to flatten it to (-1, out).")
  with _raises(ValueError, msg):
    jn.SpectralNorm(nnx.LinearGeneral(2, (3, 4), use_bias=False,
                                      rngs=nnx.Rngs(0)),
                    error_on_non_matrix=True, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("lib", ["linen", "nnx"])
def test_errors_name_module_arguments(lib):
  x = jnp.ones((4, 3))
  cases = [("LayerNorm", {"epsilon": -1.0}, "`epsilon` must be > 0, got -1.0."),
           ("BatchNorm", {"momentum": 1.5}, "`momentum` must be in [0, 1], got 1.5."),
           ("RMSNorm", {"epsilon": 0.0}, "`epsilon` must be > 0, got 0.0.")]
  for name, kwargs, msg in cases:
    with _raises(ValueError, f"{name}: {msg}"):
      if lib == "linen":
        getattr(jl, name)(**kwargs, **(
            {"use_running_average": False} if name == "BatchNorm" else {})).init(
                jax.random.key(0), x)
      else:
        getattr(jn, name)(3, **kwargs, rngs=nnx.Rngs(0))(x)


# ------------------------------------------ where Flax's test reference is off


@pytest.mark.parametrize("name,shape,offset,axes", [
    ("LayerNorm", (2, 3, 4), 1e6, (-1,)),
    ("InstanceNorm", (2, 3, 4, 5), 1e4, (1, 2)),
])
def test_exact_where_a_float32_one_liner_is_not(name, shape, offset, axes):
  """Flax's test_layer_norm / test_instance_norm with use_fast_variance=False
  compare with a float32 one-liner; float64 is the reference here."""
  x = _rand(shape, offset=offset)
  y, _ = getattr(jl, name)(use_bias=False, use_scale=False,
                           epsilon=1e-5).init_with_output(jax.random.key(1), x)
  x64 = np.asarray(x, np.float64)
  ref = ((x64 - x64.mean(axes, keepdims=True))
         / np.sqrt(x64.var(axes, keepdims=True) + 1e-5))
  np.testing.assert_allclose(y, ref, atol=1e-6)
  one_liner = (x - x.mean(axes, keepdims=True)) * jax.lax.rsqrt(
      x.var(axes, keepdims=True) + 1e-5)
  assert np.abs(np.asarray(one_liner, np.float64) - ref).max() > 1e-4


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
def test_axis_errors_name_the_module_argument(name):
  x = jnp.ones((4, 3))
  msg = (f"{name}: `reduction_axes`=2 is out of range for an input with 2 "
         "dimensions; expected values in [-2, 1].")
  with _raises(ValueError, msg):
    getattr(jl, name)(reduction_axes=2).init(jax.random.key(0), x)
  with _raises(ValueError, msg):
    getattr(jn, name)(3, reduction_axes=2, rngs=nnx.Rngs(0))(x)


# ----------------------------------------- axis arguments as Flax reads them

# Flax's modules take an int or any iterable of ints and merge an axis named
# twice once negatives are made positive; the functional core refuses a
# duplicate (tests/test_checks.py).
_AXES_CASES = [  # name, constructor args, call args, nnx num_features
    ("LayerNorm", {"reduction_axes": (-1, 2)}, {}, 6),
    ("LayerNorm", {"feature_axes": (2, -1)}, {}, 6),
    ("LayerNorm", {"reduction_axes": np.array([1, 2]), "feature_axes": [-1]}, {}, 6),
    ("LayerNorm", {"reduction_axes": {1, 2}}, {}, 6),
    ("RMSNorm", {"reduction_axes": (1, -2, 2)}, {}, 6),
    ("BatchNorm", {"axis": (1, -2)}, {"use_running_average": True}, 3),
    ("BatchNorm", {"axis": np.array([1, 2])}, {"use_running_average": True}, 18),
    ("BatchNorm", {"axis": (-1, 2), "momentum": 0.5}, {"use_running_average": False}, 6),
    ("InstanceNorm", {"feature_axes": (-1, 2)}, {}, 6),
    ("GroupNorm", {"num_groups": 3, "reduction_axes": (1, -1, 2)}, {}, 6),
]


@pytest.mark.parametrize("name,kwargs,call_kw,_", _AXES_CASES)
def test_linen_axis_arguments_read_as_flax_reads_them(name, kwargs, call_kw, _):
  x = _rand((4, 3, 6), offset=0.5)
  ours, theirs = getattr(jl, name)(**kwargs), getattr(nn, name)(**kwargs)
  v = theirs.init(jax.random.key(0), x, **call_kw)
  chex.assert_trees_all_equal_shapes_and_dtypes(ours.init(jax.random.key(0), x, **call_kw), v)
  mutable = ["batch_stats"] if name == "BatchNorm" else False
  chex.assert_trees_all_close(ours.apply(v, x, mutable=mutable, **call_kw),
                              theirs.apply(v, x, mutable=mutable, **call_kw),
                              atol=2e-5)


@pytest.mark.parametrize("name,kwargs,call_kw,num_features", _AXES_CASES)
def test_nnx_axis_arguments_read_as_flax_reads_them(name, kwargs, call_kw,
                                                    num_features):
  x = _rand((4, 3, 6), offset=0.5)
  args = (num_features,)
  kwargs = {**kwargs, **call_kw}
  ours = getattr(jn, name)(*args, **kwargs, rngs=nnx.Rngs(0))
  theirs = getattr(nnx, name)(*args, **kwargs, rngs=nnx.Rngs(0))
  chex.assert_trees_all_close(ours(x), theirs(x), atol=2e-5)
  chex.assert_trees_all_close(nnx.state(ours), nnx.state(theirs), atol=2e-5)


@pytest.mark.parametrize("broadcast_dims", [(0, 0), (-1, 2), np.array([1]), {0, 2}])
def test_dropout_broadcast_dims_read_as_flax_reads_them(broadcast_dims):
  x = _rand((4, 3, 6))
  rngs = {"dropout": jax.random.key(3)}
  y = jl.Dropout(0.5, broadcast_dims=broadcast_dims).apply(
      {}, x, deterministic=False, rngs=rngs)
  y_flax = nn.Dropout(0.5, broadcast_dims=broadcast_dims).apply(
      {}, x, deterministic=False, rngs=rngs)
  chex.assert_trees_all_equal(y, y_flax)
  y = jn.Dropout(0.5, broadcast_dims=broadcast_dims, rngs=nnx.Rngs(dropout=3))(x)
  y_flax = nnx.Dropout(0.5, broadcast_dims=broadcast_dims,
                       rngs=nnx.Rngs(dropout=3))(x)
  chex.assert_trees_all_equal(y, y_flax)


def test_axis_argument_errors_are_prefixed_with_the_module():
  x = jnp.ones((4, 3, 6))
  msg = ("Dropout: `broadcast_dims`=(0, 3) is out of range for an input with 3 "
         "dimensions; expected values in [-3, 2].")
  with _raises(ValueError, msg):
    jl.Dropout(0.5, broadcast_dims=(0, 3)).apply(
        {}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  with _raises(ValueError, msg):
    jn.Dropout(0.5, broadcast_dims=(0, 3), rngs=nnx.Rngs(0))(x)
  msg = ("LayerNorm: `reduction_axes` must be an int or an iterable of ints, "
         "got (1, 2.0).")
  with _raises(TypeError, msg):
    jl.LayerNorm(reduction_axes=(1, 2.0)).init(jax.random.key(0), x)
  with _raises(TypeError, msg):
    jn.LayerNorm(6, reduction_axes=(1, 2.0), rngs=nnx.Rngs(0))(x)


# -------------------------------------------------- nnx SpectralNorm in place


def _l2n(a, eps=1e-12):
  return a / np.sqrt(np.sum(a * a) + eps)


def _spectral_reference(kernel, bias, u, xs, *, in_place):
  """float64 power iteration (Miyato et al. 2018, Alg. 1), one step a call.

  ``in_place``: the normalized kernel replaces the kernel after each call.
  Returns the outputs, the final kernel, ``u`` and ``sigma``.
  """
  w, u = np.asarray(kernel, np.float64), np.asarray(u, np.float64)
  ys = []
  for x in xs:
    v = _l2n(u @ w.T)
    u = _l2n(v @ w)
    sigma = float((v @ w @ u.T)[0, 0])
    w_sn = w / sigma
    ys.append(np.asarray(x, np.float64) @ w_sn + np.asarray(bias, np.float64))
    if in_place:
      w = w_sn
  return ys, w, u, sigma


@pytest.mark.parametrize("in_place", [True, False])
def test_nnx_spectral_norm_against_float64_power_iteration(in_place, call):
  xs = [_rand((2, 3), seed=s) for s in range(3)]
  module = jn.SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), in_place=in_place,
                           rngs=nnx.Rngs(1))
  kernel = module.layer_instance.kernel[...]
  u0 = module.batch_stats[("kernel", "u")][...]
  ys = [call(lambda m, x: m(x), module, x) for x in xs]
  ref_ys, ref_w, ref_u, ref_sigma = _spectral_reference(
      kernel, module.layer_instance.bias[...], u0, xs, in_place=in_place)
  for y, ref in zip(ys, ref_ys, strict=True):
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(module.layer_instance.kernel[...], ref_w,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(module.batch_stats[("kernel", "u")][...], ref_u,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(module.batch_stats[("kernel", "sigma")][...],
                             ref_sigma, rtol=1e-5)
  if in_place:  # the second call normalizes an already normalized kernel
    assert abs(ref_sigma - 1.0) < 0.2
  else:
    np.testing.assert_array_equal(module.layer_instance.kernel[...], kernel)


def test_nnx_spectral_norm_default_is_flax_in_place():
  """Two calls per step, as a GAN discriminator on real and fake data."""
  ours = jn.SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  theirs = nnx.SpectralNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
  assert ours.in_place is True

  def loss(model, a, b):
    return jnp.mean(model(a) ** 2) + jnp.mean(model(b))

  for step in range(2):
    a, b = _rand((4, 3), seed=step), _rand((4, 3), seed=10 + step)
    g_ours = nnx.grad(loss)(ours, a, b)
    g_theirs = nnx.grad(loss)(theirs, a, b)
    chex.assert_trees_all_close(nnx.state(g_ours, nnx.Param),
                                nnx.state(g_theirs, nnx.Param),
                                rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(nnx.state(ours), nnx.state(theirs), rtol=1e-5,
                              atol=1e-6)


@pytest.mark.parametrize("dtype,param_dtype", [
    (jnp.bfloat16, jnp.float32), (None, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16)])
def test_nnx_spectral_norm_in_place_keeps_the_stored_dtype(dtype, param_dtype, call):
  """Flax's in-place write casts to the layer's stored dtype: a float32 kernel
  stays float32 (its values rounded through `dtype`) under dtype=bfloat16."""
  def make(lib):
    return lib.SpectralNorm(nnx.Linear(6, 3, rngs=nnx.Rngs(0)), dtype=dtype,
                            param_dtype=param_dtype, rngs=nnx.Rngs(1))

  ours, theirs = make(jn), make(nnx)
  for seed in range(2):
    x = _rand((2, 6), seed=seed)
    y1 = call(lambda m, x: m(x), ours, x)
    y2 = call(lambda m, x: m(x), theirs, x)
    assert y1.dtype == y2.dtype
    np.testing.assert_allclose(y1, y2, rtol=1e-2, atol=1e-2)
    assert jax.tree.map(lambda a: a.dtype, nnx.state(ours)) == jax.tree.map(
        lambda a: a.dtype, nnx.state(theirs))
    assert ours.layer_instance.kernel[...].dtype == jnp.float32
  chex.assert_trees_all_close(nnx.state(ours), nnx.state(theirs), rtol=1e-2,
                              atol=1e-2)


# -------------------------------------------------------------- layering


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      names.add(node.module or "")
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def test_nnx_code_imports_no_linen():
  files = [ROOT / "jaxnorm" / "nnx.py"]
  files += [ROOT / "jaxnorm" / "_src" / f for f in (
      "nnx_norm.py", "nnx_wrappers.py", "module_common.py")]
  for path in files:
    bad = {n for n in _imports(path) if "linen" in n}
    assert not bad, (path.name, bad)
  out = subprocess.run(
      [sys.executable, "-c",
       "import sys, jaxnorm.nnx; print(sorted(m for m in sys.modules "
       "if m.startswith('jaxnorm') and 'linen' in m))"],
      capture_output=True, text=True, check=True, cwd=ROOT)
  assert out.stdout.strip() == "[]"


# ------------------------------------------------------------- type hints


def _annotations(cls) -> dict:
  merged = {}
  for klass in reversed(cls.__mro__):
    merged.update(getattr(klass, "__annotations__", {}))
  return merged


def _nnx_instances():
  r = nnx.Rngs(0)
  lin = lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  return [jn.BatchNorm(3, rngs=r), jn.BatchRenorm(3, rngs=r),
          jn.LayerNorm(3, rngs=r), jn.RMSNorm(3, rngs=r),
          jn.GroupNorm(4, 2, rngs=r), jn.InstanceNorm(3, rngs=r),
          jn.WeightNorm(lin(), rngs=r), jn.SpectralNorm(lin(), rngs=r),
          jn.Dropout(0.1, rngs=r)]


def test_every_public_module_field_has_a_type_hint():
  for name in NAMES + ("BatchRenorm",):
    cls = getattr(jl, name)
    hints = _annotations(cls)
    for field in dataclasses.fields(cls):
      assert field.name in hints, (name, field.name)
  for module in _nnx_instances():
    hints = _annotations(type(module))
    public = [k for k in vars(module) if not k.startswith("_")]
    assert public
    missing = [k for k in public if k not in hints]
    assert not missing, (type(module).__name__, missing)
