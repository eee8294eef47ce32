"""Group normalization (Wu & He, 2018) and instance normalization (Ulyanov et al., 2016).

Channels last. Group norm splits the ``C`` channels into ``num_groups`` groups
and normalizes each example over its spatial axes and the channels of a group;
instance norm normalizes each example and channel over the spatial axes alone.
Neither depends on the batch, so both carry no state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxnorm._src import checks
from jaxnorm._src.fused_norm import normalize_over
from jaxnorm._src.layer_norm import layer_norm_init


def group_norm_init(num_features, *, dtype=jnp.float32, use_scale: bool = True,
                    use_bias: bool = True):
  """Returns ``{"scale": ones(C), "bias": zeros(C)}`` for group and instance norm."""
  return layer_norm_init(num_features, dtype=dtype, use_scale=use_scale,
                         use_bias=use_bias)


def _resolve_groups(num_groups, group_size, channels):
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        "Give exactly one of `num_groups` and `group_size`, got "
        f"num_groups={num_groups!r} and group_size={group_size!r}."
    )
  if num_groups is None:
    group_size = checks.check_positive_int("group_size", group_size)
    if channels % group_size:
      raise ValueError(
          f"`group_size`={group_size} must divide the number of channels, but "
          f"`x` has {channels} channels."
      )
    return channels // group_size
  num_groups = checks.check_positive_int("num_groups", num_groups)
  if channels % num_groups:
    raise ValueError(
        f"`num_groups`={num_groups} must divide the number of channels, but `x` "
        f"has {channels} channels; pass `num_groups=` a divisor of {channels} "
        "or `group_size=`."
    )
  return num_groups


def group_norm(
    params,
    x: jax.Array,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    eps=1e-6,
    mask: jax.Array | None = None,
    reduction_axes=None,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
):
  """Group normalization (Wu & He, 2018), channels last.

  ``x`` has shape ``(N, ..., C)``; the channels split into ``G = num_groups``
  groups of ``C // G`` (or groups of ``group_size``). Each example and group is
  normalized over its spatial axes and the group's channels:
  ``y = (x - mean) / sqrt(var + eps) * scale + bias`` with per-channel
  ``scale`` and ``bias`` of shape ``(C,)``.

  Args:
    params: ``{"scale": (C,), "bias": (C,)}``; a missing key turns it off.
    x: ``(N, ..., C)``, rank >= 2.
    num_groups: number of groups; must divide ``C``.
    group_size: alternatively, channels per group (then ``num_groups=None``).
    eps: added to the variance, > 0.
    mask: boolean, broadcastable to ``x``: entries left out of the statistics.
    reduction_axes: the axes statistics run over, which must include the last
      one (as in ``flax.linen.GroupNorm``); default: every axis but the first.
    axis_name: also average the statistics over this mapped axis.
    axis_index_groups: groups for ``axis_name``.
    dtype: output dtype (default: ``x``, ``scale`` and ``bias`` promoted).

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])
  >>> y = jaxnorm.group_norm(jaxnorm.group_norm_init(4), x, num_groups=2)
  >>> np.asarray(y, float).round(3).tolist()
  [[-1.0, 1.0, -1.0, 1.0]]
  """
  checks.check_array("x", x)
  if num_groups is not None and group_size is not None:
    # Flax's GroupNorm takes group_size only when num_groups is None.
    raise ValueError(
        "Give exactly one of `num_groups` and `group_size`, got "
        f"num_groups={num_groups!r} and group_size={group_size!r}; pass "
        "`num_groups=None` with `group_size`."
    )
  if reduction_axes is None:
    checks.check_min_rank("x", x, 2, "a batch axis first and channels last")
    reduction = tuple(range(1, x.ndim))
  else:
    reduction = checks.normalize_axes("reduction_axes", reduction_axes, x.ndim)
    if x.ndim - 1 not in reduction:
      raise ValueError(
          f"`reduction_axes`={reduction_axes!r} must include the last (channel) "
          "axis."
      )
  channels = x.shape[-1]
  groups = _resolve_groups(num_groups, group_size, channels)
  params = checks.check_params(params, (channels,), ("scale", "bias"),
                               "along the last axis")
  checks.check_eps(eps)
  checks.check_mask(mask, x)

  # Per-channel sums over the other reduction axes, pooled over each group's
  # channels, all in x's own (N, ..., C) layout: no grouped reshape of x, and
  # two-stage sums (more accurate than one long sum over the group).
  axes = tuple(a for a in reduction if a != x.ndim - 1)
  bshape = (1,) * (x.ndim - 1) + (channels,)
  scale = params.get("scale")
  bias = params.get("bias")
  return normalize_over(
      x, axes, eps=eps, mask=mask, pool=channels // groups,
      scale=None if scale is None else scale.reshape(bshape),
      bias=None if bias is None else bias.reshape(bshape),
      axis_name=axis_name, axis_index_groups=axis_index_groups,
      dtype=checks.result_dtype(x, params, dtype))


def instance_norm(
    params,
    x: jax.Array,
    *,
    eps=1e-6,
    mask: jax.Array | None = None,
    axis=-1,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
):
  """Instance normalization (Ulyanov, Vedaldi & Lempitsky, 2016).

  ``x`` has shape ``(N, spatial..., C)`` (channels on ``axis``, default last);
  each example and channel is normalized over the spatial axes (every axis
  but the first and the feature axes):
  ``y = (x - mean) / sqrt(var + eps) * scale + bias``.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> x = jnp.array([[[1.0], [3.0]]])          # (N=1, W=2, C=1)
  >>> np.asarray(jaxnorm.instance_norm(jaxnorm.group_norm_init(1), x), float).round(3).ravel().tolist()
  [-1.0, 1.0]
  """
  checks.check_array("x", x)
  checks.check_min_rank("x", x, 3, "batch, at least one spatial axis, channels")
  features = checks.normalize_axes("axis", axis, x.ndim)
  if 0 in features:
    raise ValueError("`axis` must not include axis 0, the batch axis.")
  reduction = tuple(a for a in range(1, x.ndim) if a not in features)
  feature_shape = tuple(x.shape[a] for a in features)
  params = checks.check_params(params, feature_shape, ("scale", "bias"),
                               f"along axis {axis}")
  checks.check_eps(eps)
  checks.check_mask(mask, x)
  bshape = tuple(x.shape[a] if a in features else 1 for a in range(x.ndim))
  scale = params.get("scale")
  bias = params.get("bias")
  return normalize_over(
      x, reduction, eps=eps, mask=mask,
      scale=None if scale is None else scale.reshape(bshape),
      bias=None if bias is None else bias.reshape(bshape),
      axis_name=axis_name, axis_index_groups=axis_index_groups,
      dtype=checks.result_dtype(x, params, dtype))
