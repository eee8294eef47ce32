"""Tests for fold_batch_norm and fold_batch_norm_tree."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm

TOL = dict(atol=1e-5, rtol=1e-5)


def _random_bn(seed, channels, *, use_scale=True, use_bias=True):
  """A batch norm with a random state, as after training."""
  rng = np.random.default_rng(seed)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  params = {}
  if use_scale:
    params["scale"] = f32(rng.uniform(-2.0, 2.0, channels))
  if use_bias:
    params["bias"] = f32(rng.normal(size=channels))
  state = {"mean": f32(rng.normal(size=channels)), "var": f32(rng.uniform(0.1, 3.0, channels))}
  return params, state


def _bn_np(z, params, state, eps):
  """Inference-mode batch norm in float64, from the formula."""
  z = np.asarray(z, np.float64)
  y = (z - np.asarray(state["mean"], np.float64)) / np.sqrt(
      np.asarray(state["var"], np.float64) + eps)
  if "scale" in params:
    y = y * np.asarray(params["scale"], np.float64)
  if "bias" in params:
    y = y + np.asarray(params["bias"], np.float64)
  return y


def _dense(x, kernel, bias):
  y = x @ kernel
  return y if bias is None else y + bias


def _conv(x, kernel, bias):
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y if bias is None else y + bias


@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (False, True),
                                                (True, False), (False, False)])
@pytest.mark.parametrize("layer_bias", [True, False])
@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_folded_layer_equals_layer_then_inference_batch_norm(layer, layer_bias, use_scale,
                                                             use_bias):
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  channels, eps = 6, 1e-3
  if layer == "dense":
    x, kernel, apply = normal(5, 4), normal(4, channels), _dense
  else:
    x, kernel, apply = normal(2, 5, 5, 3), normal(3, 3, 3, channels) * 0.3, _conv
  bias = normal(channels) if layer_bias else None
  params, state = _random_bn(1, channels, use_scale=use_scale, use_bias=use_bias)

  z = apply(x, kernel, bias)
  expected, _ = jaxnorm.batch_norm(params, state, z, train=False, eps=eps)
  np.testing.assert_allclose(expected, _bn_np(z, params, state, eps), **TOL)

  new_kernel, new_bias = jaxnorm.fold_batch_norm(kernel, bias, params, state, eps=eps)
  chex.assert_shape(new_kernel, kernel.shape)
  chex.assert_shape(new_bias, (channels,))
  chex.assert_type([new_kernel, new_bias], jnp.float32)
  np.testing.assert_allclose(apply(x, new_kernel, new_bias), expected, **TOL)


def test_fold_batch_norm_worked_example():
  # s = 2 / sqrt(4) = 1: kernel unchanged; bias = (1 - 3) * 1 + 0.5.
  params = {"scale": jnp.array([2.0]), "bias": jnp.array([0.5])}
  state = {"mean": jnp.array([3.0]), "var": jnp.array([4.0])}
  k, b = jaxnorm.fold_batch_norm(jnp.array([[5.0], [7.0]]), jnp.array([1.0]), params,
                                 state, eps=1e-12)
  np.testing.assert_allclose(k, [[5.0], [7.0]], rtol=1e-6)
  np.testing.assert_allclose(b, [-1.5], rtol=1e-6)


def test_fold_batch_norm_under_jit_and_keeps_dtypes(run):
  params, state = _random_bn(2, 4)
  kernel = jnp.ones((3, 4), jnp.bfloat16)
  k, b = run(jaxnorm.fold_batch_norm, kernel, None, params, state, eps=1e-5)
  chex.assert_type(k, jnp.bfloat16)
  chex.assert_type(b, jnp.bfloat16)
  s = params["scale"] / jnp.sqrt(state["var"] + 1e-5)
  np.testing.assert_allclose(np.asarray(k, np.float32), np.broadcast_to(s, (3, 4)),
                             rtol=1e-2)


def test_fold_batch_norm_errors():
  params, state = _random_bn(3, 4)
  cases = [
      ((jnp.ones((3, 5)), None, params, state),
       "`kernel` of shape (3, 5) has features of shape (5,) on its last axis (the "
       "layer's output features) but `params['scale']` has shape (4,); the batch "
       "norm must act on this layer's output."),
      ((jnp.ones((3, 4)), None, {"bias": params["bias"]}, dict(state, var=jnp.ones(5))),
       "`kernel` of shape (3, 4) has features of shape (4,) on its last axis (the "
       "layer's output features) but `state['var']` has shape (5,); the batch norm "
       "must act on this layer's output."),
      ((jnp.ones((2, 2, 3, 4)), jnp.ones(3), params, state),
       "`bias` must have shape (4,) to match the 4 output features on the last axis "
       "of `kernel` of shape (2, 2, 3, 4), got shape (3,)."),
      ((jnp.ones((3, 4)), None, params, {"mean": state["mean"]}),
       "`state` is missing ['var']; it must hold 'mean' and 'var' (build it with "
       "`batch_norm_init`), got keys ['mean']."),
      ((jnp.ones((3, 4)), None, dict(params, gamma=params["scale"]), state),
       "`params` has unexpected keys ['gamma']; expected keys among ['bias', "
       "'scale'] (a missing key turns that term off)."),
      ((jnp.ones(()), None, params, state),
       "`kernel` must have at least 1 dimension (output features last), got a scalar."),
  ]
  for args, message in cases:
    with pytest.raises(ValueError) as err:
      jaxnorm.fold_batch_norm(*args)
    assert str(err.value) == message
  with pytest.raises(ValueError) as err:
    jaxnorm.fold_batch_norm(jnp.ones((3, 4)), None, params, state, eps=0.0)
  assert str(err.value) == "`eps` must be > 0, got 0.0."
  with pytest.raises(TypeError) as err:
    jaxnorm.fold_batch_norm(jnp.ones((3, 4), jnp.int32), None, params, state)
  assert str(err.value) == (
      "`kernel` must have a floating-point dtype, got int32; cast it first, for "
      "example `kernel.astype(jnp.float32)`."
  )


# --- the tree helper on flax.linen models -----------------------------------


class Block(nn.Module):
  """Conv -> BN -> relu, the BN optionally removed (then the Conv has a bias)."""
  features: int
  bn: type | None

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (3, 3), use_bias=self.bn is None, name="conv")(x)
    if self.bn is not None:
      x = self.bn(use_running_average=True, name="norm")(x)
    return nn.relu(x)


class CNN(nn.Module):
  bn: type | None = nn.BatchNorm

  @nn.compact
  def __call__(self, x):
    folded = self.bn is None
    x = nn.Conv(4, (3, 3), use_bias=folded)(x)             # Conv_0
    if not folded:
      x = self.bn(use_running_average=True, use_scale=False)(x)   # BatchNorm_0
    x = nn.relu(x)
    x = Block(6, self.bn)(x)                               # Block_0/{conv,norm}
    x = nn.Conv(5, (3, 3), strides=2)(x)                   # Conv_1, keeps its bias
    if not folded:
      x = self.bn(use_running_average=True, epsilon=1e-3)(x)      # BatchNorm_1
    x = x.mean(axis=(1, 2))
    x = nn.Dense(8)(x)                                     # Dense_0
    if not folded:
      x = self.bn(use_running_average=True)(x)             # BatchNorm_2
    return nn.Dense(3)(nn.relu(x))                         # Dense_1, no BN after it


def _random_variables(model, x, seed):
  """Random variables of `model`'s shapes: kernels, biases, BN scales and states.

  Built from `jax.eval_shape(model.init, ...)` with NumPy: compiling the real
  initializers would cost far more than the test itself.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)

  def rand(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'var'" in name:
      value = rng.uniform(0.2, 2.0, leaf.shape)
    elif "'scale'" in name:
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif "'kernel'" in name:
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:  # mean, bias
      value = rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)
  return jax.tree_util.tree_map_with_path(rand, shapes)


PAIRS = {"Conv_0": "BatchNorm_0", "Block_0/conv": "Block_0/norm",
         "Conv_1": "BatchNorm_1", "Dense_0": "BatchNorm_2"}


def _bn_classes():
  classes = [nn.BatchNorm]
  if getattr(jaxnorm.linen, "BatchNorm", None) is not None:
    classes.append(jaxnorm.linen.BatchNorm)
  return classes


@pytest.mark.parametrize("bn", _bn_classes(), ids=lambda c: c.__module__)
def test_fold_batch_norm_tree_on_a_small_cnn(bn):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  model = CNN(bn)
  variables = _random_variables(model, x, 2)
  expected = jax.jit(model.apply)(variables, x)

  folded_pairs = dict(PAIRS)
  del folded_pairs["Conv_1"]
  # BatchNorm_1 uses epsilon=1e-3: fold it separately with its own eps.
  folded = jaxnorm.fold_batch_norm_tree(variables, folded_pairs, eps=1e-5)
  folded = jaxnorm.fold_batch_norm_tree(folded, [("Conv_1", "BatchNorm_1")], eps=1e-3)

  folded_model = CNN(None)
  reference_shapes = jax.eval_shape(folded_model.init, jax.random.key(0), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(folded, reference_shapes)
  assert sorted(folded) == ["params"]  # batch_stats emptied and dropped
  np.testing.assert_allclose(jax.jit(folded_model.apply)(folded, x), expected, **TOL)
  # The input is not modified.
  assert "BatchNorm_0" in variables["batch_stats"]
  assert "bias" not in variables["params"]["Conv_0"]


def test_fold_batch_norm_tree_accepts_tuple_paths_and_keeps_other_stats():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  variables = _random_variables(CNN(), x, 2)
  folded = jaxnorm.fold_batch_norm_tree(variables, [(("Block_0", "conv"), ("Block_0", "norm"))])
  assert "norm" not in folded["params"]["Block_0"]
  assert "Block_0" not in folded["batch_stats"]  # its only entry went away
  assert sorted(folded["batch_stats"]) == ["BatchNorm_0", "BatchNorm_1", "BatchNorm_2"]
  chex.assert_shape(folded["params"]["Block_0"]["conv"]["bias"], (6,))
  chex.assert_trees_all_equal(folded["params"]["Dense_1"], variables["params"]["Dense_1"])


def test_fold_batch_norm_tree_errors():
  x = jnp.ones((1, 8, 8, 3))
  variables = _random_variables(CNN(), x, 3)
  with pytest.raises(KeyError) as err:
    jaxnorm.fold_batch_norm_tree(variables, {"Conv_0": "Block_0/bn"})
  assert err.value.args[0] == (
      "The batch norm 'Block_0/bn' of `pairs` is not in `variables['batch_stats']`: "
      "no 'bn' at 'Block_0', which holds ['norm']."
  )
  with pytest.raises(KeyError) as err:
    jaxnorm.fold_batch_norm_tree(variables, {"Conv_9": "BatchNorm_0"})
  assert err.value.args[0] == (
      "The layer 'Conv_9' of `pairs` is not in `variables['params']`: no 'Conv_9' at "
      "'<root>', which holds ['BatchNorm_0', 'BatchNorm_1', 'BatchNorm_2', 'Block_0', "
      "'Conv_0', 'Conv_1', 'Dense_0', 'Dense_1']."
  )
  with pytest.raises(ValueError) as err:
    jaxnorm.fold_batch_norm_tree(variables, [("Conv_0", "BatchNorm_0"),
                                             ("Conv_1", "BatchNorm_0")])
  assert str(err.value) == (
      "The batch norm 'BatchNorm_0' appears twice in `pairs`; each batch norm "
      "follows exactly one layer."
  )
  with pytest.raises(ValueError) as err:  # Conv_0 has 4 channels, BatchNorm_1 has 5
    jaxnorm.fold_batch_norm_tree(variables, {"Conv_0": "BatchNorm_1"})
  assert str(err.value) == (
      "`kernel` of shape (3, 3, 3, 4) has features of shape (4,) on its last axis "
      "(the layer's output features) but `params['scale']` has shape (5,); the "
      "batch norm must act on this layer's output."
  )
  with pytest.raises(ValueError) as err:
    jaxnorm.fold_batch_norm_tree({"params": variables["params"]}, {"Conv_0": "BatchNorm_0"})
  assert str(err.value) == (
      "`variables` has no 'batch_stats' collection, so there are no running "
      "averages to fold; got collections ['params']."
  )
  with pytest.raises(TypeError) as err:
    jaxnorm.fold_batch_norm_tree(variables, "Conv_0")
  assert str(err.value) == (
      "`pairs` must be a dict {layer_path: bn_path} or a sequence of "
      "(layer_path, bn_path) pairs, got 'Conv_0'."
  )
