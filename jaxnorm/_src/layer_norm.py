"""Layer normalization (Ba et al., 2016) and RMS normalization (Zhang & Sennrich, 2019).

Both normalize each example over its own features, so they need no batch and
carry no state: the same computation in training and at inference, with batch
size 1, and at every step of a recurrent network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnorm._src import checks
from jaxnorm._src import layer_setup
from jaxnorm._src import moments as mom_lib
from jaxnorm._src import normalize as norm_lib


def layer_norm_init(num_features, *, dtype=jnp.float32, use_scale: bool = True,
                    use_bias: bool = True,
                    zero_centered_scale: bool = False) -> dict[str, jax.Array]:
  """Returns ``{"scale": ones, "bias": zeros}`` of shape ``num_features``.

  ``num_features`` is an int, or a tuple: the shape of ``x`` along the feature
  axes (for instance ``(H, C)`` with ``axis=(-2, -1)``). With
  ``zero_centered_scale=True`` the scale starts at zeros and
  :func:`layer_norm` applies it as ``1 + scale`` (Gemma, Transformer Engine's
  ``zero_centered_gamma``): weight decay then pulls the scale toward 1.
  """
  return layer_setup.affine_init(layer_setup.feature_shape(num_features), dtype=dtype,
                                 use_scale=use_scale, use_bias=use_bias,
                                 zero_centered_scale=zero_centered_scale)


def rms_norm_init(num_features, *, dtype=jnp.float32,
                  zero_centered_scale: bool = False) -> dict[str, jax.Array]:
  """Returns ``{"scale": ones}`` of shape ``num_features`` (zeros with
  ``zero_centered_scale=True``, applied as ``1 + scale``)."""
  return layer_setup.affine_init(layer_setup.feature_shape(num_features), dtype=dtype,
                                 use_bias=False, zero_centered_scale=zero_centered_scale)


def _normalize(params, x, *, axis, feature_axes, eps, mask, axis_name,
               axis_index_groups, dtype, zero_centered_scale, rms):
  x = layer_setup.input_array(x)
  reduction = checks.normalize_axes("axis", axis, x.ndim)
  features = reduction if feature_axes is None else checks.normalize_axes(
      "feature_axes", feature_axes, x.ndim)
  where = f"along axis {axis if feature_axes is None else feature_axes}"
  s = layer_setup.setup(params, x, feature_axes=features, reduction_axes=reduction,
                        allowed=("scale",) if rms else ("scale", "bias"), where=where,
                        eps=eps, mask=mask, dtype=dtype,
                        zero_centered_scale=zero_centered_scale)
  if x.size == 0:
    return layer_setup.empty_output(s)
  # One block per row, so XLA keeps each row's statistics in one pass
  # (measured at 2048x1024: 8 blocks per row and their merge cost 1.55x the
  # time of one). A row split over devices by an Explicit mesh gets one block
  # per shard, whose frames are then local. On a mesh with Auto axes (sharded
  # `jit`) tracing cannot see whether the features are split, so a row gets
  # up to one block per device: split or not, each device's frames and sums
  # are then local, and only the per-block statistics cross devices (one
  # all-gather, no all-reduce; one frame per row would be broadcast from the
  # shard holding it, then two all-reduces). RMS statistics need no frame:
  # one block and one all-reduce, as Flax.
  blocks = mom_lib.blocks_for(x, reduction, max_blocks=1 if rms else None)
  # Plain sums first for statistics across the last axis (rows). Statistics
  # of single features along it (`axis=(1, 2)` on channels-last data) are
  # instance norm's, taken the same way: the two layers then agree to the
  # bit, as Flax's do (Flax's own NormalizationTest compares them at 1e-7).
  return norm_lib.normalize_batch(
      x, axes=reduction, scale=s.scale, bias=s.bias, eps=eps, mask=mask,
      axis_name=axis_name, axis_index_groups=axis_index_groups,
      dtype=s.out_dtype, rms=rms, blocks=blocks, plain_first=x.ndim - 1 in reduction).y


def layer_norm(
    params,
    x: jax.typing.ArrayLike,
    *,
    axis=-1,
    eps=1e-6,
    mask: jax.typing.ArrayLike | None = None,
    feature_axes=None,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    zero_centered_scale: bool = False,
) -> jax.Array:
  """Layer normalization (Ba, Kiros & Hinton, 2016).

  ``y = (x - mean) / sqrt(var + eps) * scale + bias``, with the mean and biased
  variance of each example over ``axis`` (by default the last axis).

  Args:
    params: ``{"scale", "bias"}`` of shape ``x.shape`` along the feature axes;
      a missing key turns that term off.
    x: input of rank >= 1.
    axis: reduction axis or axes.
    eps: added to the variance, > 0.
    mask: boolean, broadcastable to ``x``: entries left out of the statistics.
    feature_axes: axes the parameters run along (default: ``axis``), as
      ``feature_axes`` of ``flax.linen.LayerNorm``.
    axis_name: also average the statistics over this mapped axis (for
      features sharded across devices).
    axis_index_groups: groups for ``axis_name``.
    dtype: output dtype (default: ``x``, ``scale`` and ``bias`` promoted).
    zero_centered_scale: apply the scale as ``1 + scale`` (params from
      ``layer_norm_init(..., zero_centered_scale=True)``).

  The statistics are exact (see :mod:`jaxnorm._src.moments`); with
  ``axis_name`` they need one all-gather of four numbers per row.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> params = jaxnorm.layer_norm_init(4)
  >>> y = jaxnorm.layer_norm(params, jnp.array([[1.0, 2.0, 3.0, 4.0]]))
  >>> np.asarray(y, float).round(3).tolist()
  [[-1.342, -0.447, 0.447, 1.342]]
  """
  return _normalize(params, x, axis=axis, feature_axes=feature_axes, eps=eps,
                    mask=mask, axis_name=axis_name,
                    axis_index_groups=axis_index_groups, dtype=dtype,
                    zero_centered_scale=zero_centered_scale, rms=False)


def rms_norm(
    params,
    x: jax.typing.ArrayLike,
    *,
    axis=-1,
    eps=1e-6,
    mask: jax.typing.ArrayLike | None = None,
    feature_axes=None,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    zero_centered_scale: bool = False,
) -> jax.Array:
  """RMS normalization (Zhang & Sennrich, 2019).

  ``y = x / sqrt(mean(x**2) + eps) * scale``, the mean square over ``axis``;
  no centering and no bias. Arguments as in :func:`layer_norm`; ``params``
  holds ``"scale"`` only.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> y = jaxnorm.rms_norm(jaxnorm.rms_norm_init(2), jnp.array([[3.0, 4.0]]))
  >>> np.asarray(y, float).round(3).tolist()
  [[0.849, 1.131]]
  """
  return _normalize(params, x, axis=axis, feature_axes=feature_axes, eps=eps,
                    mask=mask, axis_name=axis_name,
                    axis_index_groups=axis_index_groups, dtype=dtype,
                    zero_centered_scale=zero_centered_scale, rms=True)
