"""Group normalization (Wu & He, 2018) and instance normalization (Ulyanov et al., 2016).

Channels last. Group norm splits the ``C`` channels into ``num_groups`` groups
and normalizes each example over its spatial axes and the channels of a group;
instance norm normalizes each example and channel over the spatial axes alone.
Neither depends on the batch, so both carry no state.
"""

from __future__ import annotations

from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from jaxnorm._src import checks
from jaxnorm._src import layer_setup
from jaxnorm._src import normalize as norm_lib


def group_norm_init(num_features: int | Sequence[int], *, dtype: DTypeLike = jnp.float32,
                    use_scale: bool = True, use_bias: bool = True) -> dict[str, jax.Array]:
  """Returns ``{"scale": ones(C), "bias": zeros(C)}`` for group and instance norm."""
  return layer_setup.affine_init(layer_setup.feature_shape(num_features), dtype=dtype,
                                 use_scale=use_scale, use_bias=use_bias)


def _normalize(s, axes, *, eps, mask, pool, axis_name, axis_index_groups):
  if s.x.size == 0:
    return layer_setup.empty_output(s)
  # One block per example: the frame of each (example, group) comes from its
  # own values (see moments.py).
  return norm_lib.normalize_batch(
      s.x, axes=axes, scale=s.scale, bias=s.bias, eps=eps, mask=mask, pool=pool,
      axis_name=axis_name, axis_index_groups=axis_index_groups,
      dtype=s.out_dtype, blocks=1, plain_first=pool > 1).y


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
    params: Mapping[str, ArrayLike] | None,
    x: ArrayLike,
    *,
    num_groups: int | None = 32,
    group_size: int | None = None,
    eps: float = 1e-6,
    mask: ArrayLike | None = None,
    reduction_axes: int | Sequence[int] | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
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
  x = layer_setup.input_array(x)
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
  s = layer_setup.setup(params, x, feature_axes=(x.ndim - 1,), reduction_axes=reduction,
                        allowed=("scale", "bias"), where="along the last axis",
                        hint=("group norm takes the channels last, so build `params` "
                              f"with `group_norm_init({channels})`, or move `x`'s "
                              "channels last (`jnp.moveaxis(x, 1, -1)` for NCHW)"),
                        eps=eps, mask=mask, dtype=dtype)
  # Per-channel sums over the other reduction axes, pooled over each group's
  # channels, all in x's own (N, ..., C) layout: no grouped reshape of x.
  axes = tuple(a for a in reduction if a != x.ndim - 1)
  return _normalize(s, axes, eps=eps, mask=mask, pool=channels // groups,
                    axis_name=axis_name, axis_index_groups=axis_index_groups)


def instance_norm(
    params: Mapping[str, ArrayLike] | None,
    x: ArrayLike,
    *,
    eps: float = 1e-6,
    mask: ArrayLike | None = None,
    axis: int | Sequence[int] = -1,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
  """Instance normalization (Ulyanov, Vedaldi & Lempitsky, 2016).

  ``x`` has shape ``(N, spatial..., C)`` (channels on ``axis``, default last);
  each example and channel is normalized over the spatial axes (every axis
  but the first and the feature axes):
  ``y = (x - mean) / sqrt(var + eps) * scale + bias``.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> x = jnp.array([[[1.0], [3.0]]])          # (N=1, W=2, C=1)
  >>> y = jaxnorm.instance_norm(jaxnorm.group_norm_init(1), x)
  >>> np.asarray(y, float).round(3).ravel().tolist()
  [-1.0, 1.0]
  """
  x = layer_setup.input_array(x, min_ndim=3,
                              what="batch, at least one spatial axis, channels")
  features = checks.normalize_axes("axis", axis, x.ndim)
  if 0 in features:
    raise ValueError("`axis` must not include axis 0, the batch axis.")
  reduction = tuple(a for a in range(1, x.ndim) if a not in features)
  s = layer_setup.setup(params, x, feature_axes=features, reduction_axes=reduction,
                        allowed=("scale", "bias"), where=f"along axis {axis}",
                        eps=eps, mask=mask, dtype=dtype)
  return _normalize(s, reduction, eps=eps, mask=mask, pool=1, axis_name=axis_name,
                    axis_index_groups=axis_index_groups)
