"""Layer normalization (Ba et al., 2016) and RMS normalization (Zhang & Sennrich, 2019).

Both normalize each example over its own features, so they need no batch and
carry no state: the same computation in training and at inference, with batch
size 1, and at every step of a recurrent network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnorm._src import checks
from jaxnorm._src import fused_norm
from jaxnorm._src.batch_norm import _feature_shape_arg, affine_init


def layer_norm_init(num_features, *, dtype=jnp.float32, use_scale: bool = True,
                    use_bias: bool = True):
  """Returns ``{"scale": ones, "bias": zeros}`` of shape ``num_features``.

  ``num_features`` is an int, or a tuple: the shape of ``x`` along the feature
  axes (for instance ``(H, C)`` with ``axis=(-2, -1)``).
  """
  return affine_init(_feature_shape_arg(num_features), dtype=dtype,
                     use_scale=use_scale, use_bias=use_bias)


def rms_norm_init(num_features, *, dtype=jnp.float32):
  """Returns ``{"scale": ones}`` of shape ``num_features``."""
  return {"scale": jnp.ones(_feature_shape_arg(num_features), dtype)}


def _setup(params, x, axis, feature_axes, eps, mask, allowed):
  checks.check_array("x", x)
  if x.ndim < 1:
    raise ValueError("`x` must have at least 1 dimension, got a scalar.")
  reduction = checks.normalize_axes("axis", axis, x.ndim)
  features = reduction if feature_axes is None else checks.normalize_axes(
      "feature_axes", feature_axes, x.ndim)
  feature_shape = tuple(x.shape[a] for a in features)
  where = f"along axis {axis if feature_axes is None else feature_axes}"
  params = checks.check_params(params, feature_shape, allowed, where)
  checks.check_eps(eps)
  checks.check_mask(mask, x)
  bshape = tuple(x.shape[a] if a in features else 1 for a in range(x.ndim))
  scale = params.get("scale")
  bias = params.get("bias")
  scale = None if scale is None else jnp.reshape(scale, bshape)
  bias = None if bias is None else jnp.reshape(bias, bshape)
  return params, reduction, scale, bias


def layer_norm(
    params,
    x: jax.Array,
    *,
    axis=-1,
    eps=1e-6,
    mask: jax.Array | None = None,
    feature_axes=None,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
):
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

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> params = jaxnorm.layer_norm_init(4)
  >>> y = jaxnorm.layer_norm(params, jnp.array([[1.0, 2.0, 3.0, 4.0]]))
  >>> np.asarray(y, float).round(3).tolist()
  [[-1.342, -0.447, 0.447, 1.342]]
  """
  params, reduction, scale, bias = _setup(
      params, x, axis, feature_axes, eps, mask, ("scale", "bias"))
  return fused_norm.normalize_over(
      x, reduction, scale=scale, bias=bias, eps=eps, mask=mask,
      axis_name=axis_name, axis_index_groups=axis_index_groups,
      dtype=checks.result_dtype(x, params, dtype))


def rms_norm(
    params,
    x: jax.Array,
    *,
    axis=-1,
    eps=1e-6,
    mask: jax.Array | None = None,
    feature_axes=None,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
):
  """RMS normalization (Zhang & Sennrich, 2019).

  ``y = x / sqrt(mean(x**2) + eps) * scale``, the mean square over ``axis``;
  no centering and no bias. Arguments as in :func:`layer_norm`; ``params``
  holds ``"scale"`` only.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> y = jaxnorm.rms_norm(jaxnorm.rms_norm_init(2), jnp.array([[3.0, 4.0]]))
  >>> np.asarray(y, float).round(3).tolist()
  [[0.849, 1.131]]
  """
  params, reduction, scale, _ = _setup(
      params, x, axis, feature_axes, eps, mask, ("scale",))
  return fused_norm.normalize_over(
      x, reduction, scale=scale, bias=None, eps=eps, mask=mask,
      axis_name=axis_name, axis_index_groups=axis_index_groups,
      dtype=checks.result_dtype(x, params, dtype), rms=True)
