"""Tests for jaxnorm.interop: parity with PyTorch's own modules."""

import functools
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm import interop

# The parity tests compare against PyTorch's own modules; without torch the whole file skips (the
# `test` extra installs torch, so CI runs it).
torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed; the interop parity tests need torch==2.13.0 "
    "(pip install -e '.[test]').")

TOL = dict(atol=1e-5, rtol=1e-5)


def _randomize(module, seed):
  """Random affine parameters and running statistics, as after training."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if name == "num_batches_tracked":
        tensor.fill_(3)
      elif name == "running_var":
        tensor.copy_(torch.rand(tensor.shape, generator=gen) * 2 + 0.5)
      else:
        tensor.copy_(torch.randn(tensor.shape, generator=gen))
  return module


def _assert_state_matches(state, module):
  sd = module.state_dict()
  np.testing.assert_allclose(state["mean"], sd["running_mean"].numpy(), **TOL)
  np.testing.assert_allclose(state["var"], sd["running_var"].numpy(), **TOL)
  assert int(state["num_batches_tracked"]) == int(sd["num_batches_tracked"])


# shape of x, torch module class
BN_CASES = [
    ((8, 5), torch.nn.BatchNorm1d),
    ((6, 5, 7), torch.nn.BatchNorm1d),
    ((4, 5, 3, 6), torch.nn.BatchNorm2d),
]


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape,cls", BN_CASES)
def test_torch_batch_norm_matches_pytorch_over_training_steps(mode, shape, cls, momentum):
  train_step = functools.partial(interop.torch_batch_norm, train=True, momentum=momentum,
                                 eps=1e-5)
  eval_step = functools.partial(interop.torch_batch_norm, train=False, momentum=momentum)
  if mode == "jit":  # compiled once, reused at every step
    train_step, eval_step = jax.jit(train_step), jax.jit(eval_step)
  module = _randomize(cls(shape[1], momentum=momentum, eps=1e-5), seed=0)
  params, state = interop.from_torch(module.state_dict())
  rng = np.random.default_rng(1)
  module.train()
  for _step in range(4):
    # A different mean and spread per channel and per step.
    x = (rng.normal(size=shape) * rng.uniform(0.5, 3) + rng.normal() * 2).astype(np.float32)
    expected = module(torch.from_numpy(x)).detach().numpy()
    y, state = train_step(params, state, jnp.asarray(x))
    np.testing.assert_allclose(y, expected, **TOL)
    _assert_state_matches(state, module)
  assert int(state["num_batches_tracked"]) == 3 + 4

  module.eval()
  x = rng.normal(size=shape).astype(np.float32)
  expected = module(torch.from_numpy(x)).detach().numpy()
  y, eval_state = eval_step(params, state, jnp.asarray(x))
  np.testing.assert_allclose(y, expected, **TOL)
  chex.assert_trees_all_equal(eval_state, state)
  # Inference is plain batch norm with the converted state, NCHW via axis=1.
  y_core, _ = jaxnorm.batch_norm(
      params, {"mean": state["mean"], "var": state["var"]}, jnp.asarray(x),
      train=False, axis=1, eps=1e-5)
  np.testing.assert_allclose(y_core, expected, **TOL)


def test_torch_batch_norm_running_var_is_unbiased_and_normalization_biased():
  # Worked by hand: channel values [0, 2]: mean 1, biased var 1, unbiased var 2.
  params, state = jaxnorm.batch_norm_init(1)
  x = jnp.array([[0.0], [2.0]])
  y, new_state = interop.torch_batch_norm(params, state, x, train=True, momentum=0.5,
                                          eps=1e-12)
  np.testing.assert_allclose(y[:, 0], [-1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(new_state["mean"], [0.5 * 0 + 0.5 * 1])
  np.testing.assert_allclose(new_state["var"], [0.5 * 1 + 0.5 * 2])
  assert int(new_state["num_batches_tracked"]) == 1


def test_torch_batch_norm_cumulative_average_is_the_mean_of_batches():
  params, state = jaxnorm.batch_norm_init(2)
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(5, 2)).astype(np.float32) * (i + 1) + i for i in range(3)]
  for x in xs:
    _, state = interop.torch_batch_norm(params, state, jnp.asarray(x), train=True,
                                        momentum=None, axis=-1)
  x64 = [x.astype(np.float64) for x in xs]
  np.testing.assert_allclose(state["mean"], np.mean([x.mean(0) for x in x64], 0), **TOL)
  np.testing.assert_allclose(state["var"], np.mean([x.var(0, ddof=1) for x in x64], 0),
                             **TOL)


def test_torch_batch_norm_cumulative_average_keeps_float64_precision():
  # The cumulative weight 1/k in the state's precision: with a float32 1/3 the running mean of
  # values near 1e4 was off by 3e-4 (3e-8 relative) in float64.
  with jax.enable_x64(True):
    params, state = jaxnorm.batch_norm_init(4, dtype=jnp.float64, state_dtype=jnp.float64)
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(6, 4)) + 1e4 + 3 * i for i in range(3)]
    for x in xs:
      _, state = interop.torch_batch_norm(params, state, jnp.asarray(x), train=True,
                                          momentum=None, axis=-1)
    assert state["mean"].dtype == jnp.float64
    np.testing.assert_allclose(state["mean"], np.mean([x.mean(0) for x in xs], 0),
                               rtol=1e-14, atol=0)
    np.testing.assert_allclose(state["var"], np.mean([x.var(0, ddof=1) for x in xs], 0),
                               rtol=1e-11, atol=0)


def test_torch_batch_norm_mask_counts_only_kept_entries():
  params, state = jaxnorm.batch_norm_init(3)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 3, 6)).astype(np.float32)
  mask = np.arange(6) < 4  # (L,) broadcasts over (N, C, L)
  y, new_state = interop.torch_batch_norm(params, state, jnp.asarray(x), train=True,
                                          mask=jnp.asarray(mask))
  kept = x[..., :4].astype(np.float64)
  n = 4 * 4
  mean = kept.mean(axis=(0, 2))
  var = kept.var(axis=(0, 2))
  np.testing.assert_allclose(new_state["mean"], 0.1 * mean, **TOL)
  np.testing.assert_allclose(new_state["var"], 0.9 + 0.1 * var * n / (n - 1), **TOL)
  expected = (x - mean[:, None]) / np.sqrt(var[:, None] + 1e-5)
  np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


def test_torch_batch_norm_without_running_stats_uses_batch_statistics():
  module = torch.nn.BatchNorm1d(3, track_running_stats=False, affine=False)
  params, state = interop.from_torch(module.state_dict())
  assert params == {} and state == {}
  x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  for train in (True, False):
    module.train(train)
    expected = module(torch.from_numpy(x)).numpy()
    y, new_state = interop.torch_batch_norm(params, state, jnp.asarray(x), train=train)
    np.testing.assert_allclose(y, expected, **TOL)
    assert new_state == {}


def test_torch_batch_norm_traces_once_under_jit():
  params, state = jaxnorm.batch_norm_init(3)
  state = dict(state, num_batches_tracked=jnp.asarray(0))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, x):
    return interop.torch_batch_norm(params, state, x, train=True, momentum=None)

  for i in range(3):
    _, state = step(state, jnp.full((2, 3), float(i)).at[0].set(-1.0))
  assert int(state["num_batches_tracked"]) == 3


def test_torch_batch_norm_rejects_bad_momentum():
  params, state = jaxnorm.batch_norm_init(3)
  with pytest.raises(ValueError) as err:
    interop.torch_batch_norm(params, state, jnp.ones((2, 3)), train=True, momentum=1.5)
  assert str(err.value) == "`momentum` must be in [0, 1], got 1.5."


@pytest.mark.parametrize("train", [True, False])
def test_torch_batch_norm_checks_a_partial_state(train):
  # Only one running average: the batch norm's own state check names the
  # missing one (it was a raw KeyError in train mode).
  with pytest.raises(ValueError) as err:
    interop.torch_batch_norm(None, {"mean": jnp.zeros(3)}, jnp.ones((4, 3)),
                             train=train, axis=-1)
  assert str(err.value) == (
      "`state` is missing ['var']; it must hold 'mean' and 'var' (build it with "
      "`batch_norm_init`), got keys ['mean']."
  )
  with pytest.raises(ValueError) as err:
    interop.torch_batch_norm(None, {"mean": jnp.zeros(2), "var": jnp.ones(2)},
                             jnp.ones((4, 3)), train=train, axis=-1)
  assert str(err.value) == (
      "`x` has features of shape (3,) along axis -1 but `state['mean']` has shape "
      "(2,); pass `axis=` to choose the feature axis."
  )


@pytest.mark.parametrize("make", [
    lambda: torch.nn.BatchNorm1d(4),
    lambda: torch.nn.BatchNorm2d(4, affine=False),
    lambda: torch.nn.LayerNorm((3, 4)),
    lambda: torch.nn.LayerNorm(4, bias=False),
    lambda: torch.nn.GroupNorm(2, 4),
    lambda: torch.nn.BatchNorm1d(4, dtype=torch.float64),
], ids=["bn1d", "bn2d-no-affine", "ln", "ln-no-bias", "gn", "bn-float64"])
def test_state_dict_round_trip_is_exact(make):
  module = _randomize(make(), seed=2)
  sd = module.state_dict()
  with jax.enable_x64(True):
    params, state = interop.from_torch(sd)
    back = interop.to_torch(params, state)
  assert sorted(back) == sorted(sd)
  for key, value in sd.items():
    assert back[key].dtype == value.numpy().dtype, key
    np.testing.assert_array_equal(back[key], value.numpy())
  fresh = make()
  fresh.load_state_dict({k: torch.tensor(v) for k, v in back.items()}, strict=True)
  for key, value in fresh.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), sd[key].numpy())


@pytest.mark.parametrize("make", [
    lambda: torch.nn.BatchNorm2d(4, dtype=torch.bfloat16),
    lambda: torch.nn.LayerNorm(4, dtype=torch.bfloat16),
    lambda: torch.nn.BatchNorm1d(4, dtype=torch.float16),
    lambda: torch.nn.GroupNorm(2, 4),
], ids=["bn-bfloat16", "ln-bfloat16", "bn-float16", "gn-float32"])
def test_low_precision_state_dicts_round_trip_bit_for_bit(make):
  # torch's bfloat16 has no NumPy dtype of its own: from_torch reads its bits as JAX's bfloat16,
  # and to_torch(..., tensors=True) writes them back as torch.bfloat16 (float16 as a check that
  # the other path keeps working).
  module = _randomize(make(), seed=4)
  sd = module.state_dict()
  params, state = interop.from_torch(sd)
  for ours, theirs in (("scale", "weight"), ("mean", "running_mean")):
    tree = params if ours == "scale" else state
    if theirs in sd:
      assert tree[ours].dtype == str(sd[theirs].dtype).removeprefix("torch."), ours
      np.testing.assert_array_equal(np.asarray(tree[ours], np.float32), sd[theirs].float().numpy())
  back = interop.to_torch(params, state, tensors=True)
  assert sorted(back) == sorted(sd)
  for key, value in sd.items():
    assert back[key].dtype == value.dtype, key
    assert torch.equal(back[key], value), key
  fresh = make()
  fresh.load_state_dict(back, strict=True)


def test_from_torch_accepts_numpy_arrays_and_a_prefix():
  model = torch.nn.Sequential(torch.nn.Linear(3, 4), _randomize(torch.nn.BatchNorm1d(4), 3))
  sd = model.state_dict()
  params, state = interop.from_torch({k: v.numpy() for k, v in sd.items()}, prefix="1.")
  np.testing.assert_array_equal(params["scale"], sd["1.weight"].numpy())
  np.testing.assert_array_equal(params["bias"], sd["1.bias"].numpy())
  np.testing.assert_array_equal(state["mean"], sd["1.running_mean"].numpy())
  np.testing.assert_array_equal(state["var"], sd["1.running_var"].numpy())
  assert int(state["num_batches_tracked"]) == 3
  assert sorted(params) == ["bias", "scale"]
  assert sorted(state) == ["mean", "num_batches_tracked", "var"]


def test_from_torch_layer_and_group_norm_have_empty_state():
  for module in (torch.nn.LayerNorm(4), torch.nn.GroupNorm(2, 4)):
    params, state = interop.from_torch(module.state_dict())
    assert state == {}
    assert sorted(params) == ["bias", "scale"]


def test_from_torch_errors():
  with pytest.raises(ValueError) as err:
    interop.from_torch({"weight": np.ones(2), "momentum": np.ones(())})
  assert str(err.value) == (
      "`state_dict` has keys ['momentum'] that are not those of a PyTorch "
      "normalization layer; expected keys among ['bias', 'num_batches_tracked', "
      "'running_mean', 'running_var', 'weight'] (pass `prefix=` to select one "
      "layer of a model's state dict)."
  )
  with pytest.raises(ValueError) as err:
    interop.from_torch({"0.weight": np.ones(2)}, prefix="1.")
  assert str(err.value) == (
      "`state_dict` has no keys starting with `prefix`='1.'; its keys are "
      "['0.weight']."
  )
  with pytest.raises(TypeError) as err:
    interop.from_torch({"weight": [1.0, 2.0]})
  assert str(err.value) == (
      "`state_dict['weight']` must be a torch tensor or a NumPy array, got list."
  )


def test_to_torch_of_fresh_jaxnorm_state_loads_strictly():
  params, state = jaxnorm.batch_norm_init(4)
  sd = interop.to_torch(params, state)
  assert sorted(sd) == ["bias", "num_batches_tracked", "running_mean", "running_var",
                        "weight"]
  assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"] == 0
  module = torch.nn.BatchNorm1d(4)
  module.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
  with pytest.raises(ValueError) as err:
    interop.to_torch(params, dict(state, running_mean=state["mean"]))
  assert str(err.value) == (
      "`state` has unexpected keys ['running_mean']; expected keys among "
      "['mean', 'num_batches_tracked', 'var']."
  )


@pytest.mark.parametrize("shape,normalized", [((3, 7), (7,)), ((2, 3, 4, 5), (4, 5))])
def test_layer_norm_matches_pytorch(run, shape, normalized):
  module = _randomize(torch.nn.LayerNorm(normalized, eps=1e-5), seed=4)
  params, state = interop.from_torch(module.state_dict())
  assert state == {}
  x = (np.random.default_rng(5).normal(size=shape) * 3 + 1).astype(np.float32)
  expected = module(torch.from_numpy(x)).detach().numpy()
  axis = tuple(range(-len(normalized), 0))
  y = run(jaxnorm.layer_norm, params, jnp.asarray(x), axis=axis, eps=1e-5)
  np.testing.assert_allclose(y, expected, **TOL)


@pytest.mark.parametrize("shape,groups", [((3, 6, 5, 4), 3), ((2, 8, 5), 2), ((2, 4, 3, 3), 4)])
def test_group_norm_matches_pytorch_after_nchw_to_nhwc(run, shape, groups):
  module = _randomize(torch.nn.GroupNorm(groups, shape[1], eps=1e-5), seed=6)
  params, _ = interop.from_torch(module.state_dict())
  x = (np.random.default_rng(7).normal(size=shape) * 2 - 1).astype(np.float32)
  expected = module(torch.from_numpy(x)).detach().numpy()
  y = run(jaxnorm.group_norm, params, interop.nchw_to_nhwc(jnp.asarray(x)),
          num_groups=groups, eps=1e-5)
  np.testing.assert_allclose(interop.nhwc_to_nchw(y), expected, **TOL)


def test_batch_norm_nhwc_matches_pytorch_nchw():
  module = _randomize(torch.nn.BatchNorm2d(3), seed=8).eval()
  params, state = interop.from_torch(module.state_dict())
  x = np.random.default_rng(9).normal(size=(2, 3, 4, 5)).astype(np.float32)
  expected = module(torch.from_numpy(x)).detach().numpy()
  y, _ = jaxnorm.batch_norm(params, {"mean": state["mean"], "var": state["var"]},
                            interop.nchw_to_nhwc(jnp.asarray(x)), train=False)
  np.testing.assert_allclose(interop.nhwc_to_nchw(y), expected, **TOL)


def test_importing_interop_does_not_import_torch():
  code = ("import sys, jaxnorm.interop, jaxnorm; jaxnorm.interop.to_torch("
          "*jaxnorm.batch_norm_init(2)); print('torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "False"


# from_torch: counts beyond int32 (issue 12). Keep this block last.

_BIG_COUNT = 2**31 + 5  # a BatchNorm trained for more than 2**31 steps


def test_from_torch_count_beyond_int32_without_x64_is_an_error():
  sd = torch.nn.BatchNorm1d(2).state_dict()
  sd["num_batches_tracked"].fill_(_BIG_COUNT)
  msg = ("`state_dict['bn.num_batches_tracked']` holds 2147483653, outside the int32 "
         "range [-2147483648, 2147483647] that JAX uses without 64-bit mode, where it "
         "would wrap around; enable it with `jax.config.update('jax_enable_x64', "
         "True)` to keep the value.")
  with pytest.raises(ValueError) as err:
    interop.from_torch({"bn." + k: v for k, v in sd.items()}, prefix="bn.")
  assert str(err.value) == msg
  # A negative count out of range too, and from NumPy.
  msg = msg.replace("bn.num_batches_tracked", "num_batches_tracked").replace(
      "holds 2147483653", f"holds {-_BIG_COUNT}")
  with pytest.raises(ValueError) as err:
    interop.from_torch({"num_batches_tracked": np.array(-_BIG_COUNT, np.int64)})
  assert str(err.value) == msg


def test_from_torch_count_within_int32_is_kept_without_x64():
  _, state = interop.from_torch({"num_batches_tracked": torch.tensor(2**31 - 1)})
  assert state["num_batches_tracked"].dtype == jnp.int32
  assert int(state["num_batches_tracked"]) == 2**31 - 1


def test_from_torch_count_beyond_int32_is_kept_with_x64():
  sd = torch.nn.BatchNorm1d(2).state_dict()
  sd["num_batches_tracked"].fill_(_BIG_COUNT)
  with jax.enable_x64(True):
    params, state = interop.from_torch(sd)
    assert state["num_batches_tracked"].dtype == jnp.int64
    assert int(state["num_batches_tracked"]) == _BIG_COUNT
    # And back to PyTorch unchanged.
    assert int(interop.to_torch(params, state)["num_batches_tracked"]) == _BIG_COUNT


# What PyTorch's normalization layers store: weight and bias of one shape, (C,) or LayerNorm's
# and RMSNorm's normalized_shape of any rank; running averages (C,). A Linear or Conv layer has
# the same keys with a weight of more dimensions than its bias, and is refused at conversion.
@pytest.mark.parametrize("make", [
    lambda: torch.nn.BatchNorm1d(4),
    lambda: torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    lambda: torch.nn.GroupNorm(2, 4),
    lambda: torch.nn.LayerNorm((3, 4)),
    lambda: torch.nn.LayerNorm((2, 3, 4), bias=False),
    lambda: torch.nn.RMSNorm((3, 4)),
    lambda: torch.nn.LayerNorm(()),
], ids=["bn", "in", "gn", "ln-2d", "ln-3d-no-bias", "rms-2d", "ln-0d"])
def test_from_torch_accepts_every_norm_layers_shapes(make):
  sd = _randomize(make(), seed=5).state_dict()
  params, state = interop.from_torch(sd)
  for ours, theirs in (("scale", "weight"), ("bias", "bias")):
    if theirs in sd:
      np.testing.assert_array_equal(params[ours], sd[theirs].numpy())
  if "running_mean" in sd:
    np.testing.assert_array_equal(state["mean"], sd["running_mean"].numpy())


@pytest.mark.parametrize("make,weight", [
    (lambda: torch.nn.Linear(3, 4), (4, 3)),
    (lambda: torch.nn.Linear(4, 4), (4, 4)),
    (lambda: torch.nn.Conv2d(3, 4, 3), (4, 3, 3, 3)),
    (lambda: torch.nn.Conv1d(1, 4, 1), (4, 1, 1)),
], ids=["linear", "linear-square", "conv2d", "conv1d-1x1"])
def test_from_torch_refuses_a_linear_or_conv_layer(make, weight):
  model = torch.nn.Sequential(make(), torch.nn.BatchNorm1d(4))
  with pytest.raises(ValueError) as err:
    interop.from_torch(model.state_dict(), prefix="0.")
  assert str(err.value) == (
      f"`state_dict['0.weight']` has shape {weight} but `state_dict['0.bias']` has shape "
      "(4,); a normalization layer's weight and bias have the same shape, one value per "
      "feature ((C,) for batch, instance and group norm, `normalized_shape` for LayerNorm), "
      "so this is another layer's (a Linear or Conv layer's weight has more dimensions than "
      "its bias; pass `prefix=` to select one layer of a model's state dict)."
  )
  # The norm layer next to it converts.
  params, _ = interop.from_torch(model.state_dict(), prefix="1.")
  assert params["scale"].shape == (4,)


def test_from_torch_refuses_running_averages_of_other_shapes():
  sd = {k: v.numpy() for k, v in torch.nn.BatchNorm1d(4).state_dict().items()}
  with pytest.raises(ValueError) as err:
    interop.from_torch({**sd, "running_var": np.ones(3, np.float32)})
  assert str(err.value) == (
      "The running averages of a normalization layer are 1-D, one value per channel, of one "
      "shape (C,) (batch and instance norm), but `state_dict['running_mean']` has shape (4,) "
      "and `state_dict['running_var']` has shape (3,)."
  )
  with pytest.raises(ValueError) as err:
    interop.from_torch({"running_mean": np.zeros((2, 2), np.float32)})
  assert str(err.value) == (
      "The running averages of a normalization layer are 1-D, one value per channel, of one "
      "shape (C,) (batch and instance norm), but `state_dict['running_mean']` has shape "
      "(2, 2)."
  )
  # A weight and bias of one shape, but not the running averages' (C,).
  with pytest.raises(ValueError) as err:
    interop.from_torch({**sd, "weight": np.ones((4, 4), np.float32),
                        "bias": np.ones((4, 4), np.float32)})
  assert str(err.value) == (
      "`state_dict['weight']` has shape (4, 4) but the running averages have shape (4,); "
      "batch and instance norm store their weight per channel, in the running averages' "
      "shape (C,), so this is another layer's (pass `prefix=` to select one layer of a "
      "model's state dict)."
  )
  with pytest.raises(ValueError) as err:
    interop.from_torch({"bias": np.ones(3, np.float32), "running_mean": sd["running_mean"],
                        "running_var": sd["running_var"]})
  assert str(err.value).startswith(
      "`state_dict['bias']` has shape (3,) but the running averages have shape (4,);")


def test_from_torch_accepts_a_weight_alone_of_any_rank():
  # LayerNorm((4, 3), bias=False) stores what Linear(3, 4, bias=False) does: accepted.
  sd = torch.nn.Linear(3, 4, bias=False).state_dict()
  params, state = interop.from_torch(sd)
  assert params["scale"].shape == (4, 3) and state == {}
