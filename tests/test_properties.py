"""Property tests (hypothesis) of the invariants every normalization layer has.

* The normalized output (no scale, no bias) has zero mean and unit variance
  over the reduction axes, when eps is small relative to the variance.
* Batch norm with batch statistics is invariant to a positive per-channel
  affine change of its input: BN(a * x + b) == BN(x) for a > 0.

Shapes are fixed per test (hypothesis draws the values), so each function
compiles once and the examples run fast.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxnorm

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
SHAPE = (6, 2, 4)   # (N, W, C)

# Values with a spread well above sqrt(eps) and a wide range of offsets/scales.
_base = hnp.arrays(np.float32, SHAPE, elements=st.floats(-1.0, 1.0, width=32))
_offset = st.floats(-1e3, 1e3, width=32)
_spread = st.floats(0.125, 128.0, width=32)


def _spread_out(base):
  # Add a fixed non-constant pattern so every reduction has variance >= ~0.1.
  ramp = np.linspace(-1.0, 1.0, base.size, dtype=np.float32).reshape(base.shape)
  return base + 2.0 * np.random.default_rng(0).permutation(ramp.ravel()).reshape(base.shape)


@jax.jit
def _all_layers(x):
  return {
      "batch_norm": (jaxnorm.batch_norm({}, jaxnorm.batch_norm_init(4)[1], x, train=True,
                                        eps=1e-12)[0], (0, 1)),
      "layer_norm": (jaxnorm.layer_norm({}, x, eps=1e-12), (2,)),
      "layer_norm_2axes": (jaxnorm.layer_norm({}, x, axis=(1, 2), eps=1e-12), (1, 2)),
      "group_norm": (jaxnorm.group_norm({}, x, num_groups=2, eps=1e-12), None),
      "instance_norm": (jaxnorm.instance_norm({}, x, eps=1e-12), (1,)),
  }


@SETTINGS
@given(_base, _offset, _spread)
def test_normalized_output_has_zero_mean_and_unit_variance(base, offset, spread):
  x = (offset + spread * _spread_out(base)).astype(np.float32)
  for name, (y, axes) in _all_layers(jnp.asarray(x)).items():
    y = np.asarray(y, np.float64)
    if axes is None:   # group norm: over (W, channels of the group)
      y = y.reshape(SHAPE[0], SHAPE[1], 2, 2).transpose(0, 2, 1, 3).reshape(SHAPE[0], 2, -1)
      axes = (2,)
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(y.var(axis=axes), 1.0, rtol=1e-3, err_msg=name)


@jax.jit
def _bn(x):
  return jaxnorm.batch_norm({}, jaxnorm.batch_norm_init(4)[1], x, train=True, eps=1e-12)[0]


@SETTINGS
@given(_base,
       hnp.arrays(np.float32, (4,), elements=st.floats(0.125, 8.0, width=32)),
       hnp.arrays(np.float32, (4,), elements=st.floats(-128.0, 128.0, width=32)))
def test_batch_norm_is_invariant_to_positive_per_channel_affine_maps(base, a, b):
  x = _spread_out(base)
  y = _bn(jnp.asarray(x))
  y_affine = _bn(jnp.asarray(a * x + b))
  chex.assert_trees_all_close(y_affine, y, atol=1e-3)


@SETTINGS
@given(_base, _offset)
def test_rms_norm_output_has_unit_mean_square(base, offset):
  x = jnp.asarray(offset + _spread_out(base))
  y = np.asarray(jax.jit(lambda x: jaxnorm.rms_norm({}, x, eps=1e-12))(x), np.float64)
  np.testing.assert_allclose((y ** 2).mean(axis=-1), 1.0, rtol=1e-4)
