"""Batch normalization, ghost batch norm and batch renormalization.

Batch norm (Ioffe & Szegedy, 2015, Algorithm 1): over a mini-batch ``B``,
``x_hat = (x - mu_B) / sqrt(var_B + eps)``, ``y = scale * x_hat + bias``, with
``mu_B`` and the biased ``var_B`` taken over every axis but the feature axis.
Inference uses running averages instead of the batch statistics:
``state <- momentum * state + (1 - momentum) * batch`` (Flax/Keras convention;
PyTorch's ``momentum=0.1`` is our ``0.9``, see :mod:`jaxnorm.interop`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._src import fused_norm
from jaxnorm._src import checks
from jaxnorm._src import moments as moments_lib


def batch_norm_init(
    num_features,
    *,
    dtype=jnp.float32,
    use_scale: bool = True,
    use_bias: bool = True,
    state_dtype=jnp.float32,
):
  """Returns ``(params, state)`` for :func:`batch_norm`.

  ``params = {"scale": ones, "bias": zeros}`` (each only if enabled) of shape
  ``num_features`` (an int, or a tuple for several feature axes) in ``dtype``;
  ``state = {"mean": zeros, "var": ones}`` in ``state_dtype`` (float32, as in
  Flax, whatever the parameters' dtype).

  >>> import jaxnorm
  >>> params, state = jaxnorm.batch_norm_init(3)
  >>> sorted(params), sorted(state), params["scale"].shape
  (['bias', 'scale'], ['mean', 'var'], (3,))
  """
  shape = _feature_shape_arg(num_features)
  params = affine_init(shape, dtype=dtype, use_scale=use_scale, use_bias=use_bias)
  state = {"mean": jnp.zeros(shape, state_dtype), "var": jnp.ones(shape, state_dtype)}
  return params, state


def affine_init(shape, *, dtype, use_scale, use_bias) -> dict:
  """``{"scale": ones, "bias": zeros}`` of ``shape``, each key only if used."""
  params = {}
  if use_scale:
    params["scale"] = jnp.ones(shape, dtype)
  if use_bias:
    params["bias"] = jnp.zeros(shape, dtype)
  return params


def _feature_shape_arg(num_features) -> tuple[int, ...]:
  if isinstance(num_features, int) and not isinstance(num_features, bool):
    shape = (num_features,)
  else:
    try:
      shape = tuple(int(n) for n in num_features)
    except TypeError:
      raise TypeError(
          "`num_features` must be an int or a tuple of ints, got "
          f"{num_features!r}."
      ) from None
  if any(n <= 0 for n in shape):
    raise ValueError(f"`num_features` must be positive, got {num_features!r}.")
  return shape


def _bn_setup(params, state, x, axis, eps, momentum, mask, where_name):
  checks.check_array("x", x)
  if x.ndim < 1:
    raise ValueError("`x` must have at least 1 dimension, got a scalar.")
  feature_axes = checks.normalize_axes("axis", axis, x.ndim)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  where = f"along axis {axis}"
  params = checks.check_params(params, feature_shape, ("scale", "bias"), where)
  checks.check_state(state, feature_shape, where)
  checks.check_eps(eps)
  checks.check_momentum(momentum)
  checks.check_mask(mask, x)
  bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
  return params, feature_axes, reduction_axes, feature_shape, bshape


def _reshape(v, bshape):
  return None if v is None else jnp.reshape(v, bshape)


def _update_state(state, batch_mean, batch_var, momentum, selected=None):
  """``momentum * state + (1 - momentum) * batch``, keeping the state's dtype.

  Features where ``selected`` (boolean, the features' shape) is False keep
  their state: a mask that leaves a feature no entries gives no statistics
  to average in.
  """
  new = dict(state)
  for key, batch in (("mean", batch_mean), ("var", batch_var)):
    old = state[key]
    dt = jnp.result_type(old.dtype, batch.dtype) if jnp.iscomplexobj(batch) else old.dtype
    updated = (momentum * old + (1 - momentum) * batch).astype(dt)
    new[key] = updated if selected is None else jnp.where(selected, updated, old.astype(dt))
  return new


def _any_selected(mask, x, reduction_axes, axis_name, axis_index_groups):
  """Per feature: whether the mask selects any entry (on any device); None
  without a mask."""
  if mask is None:
    return None
  count = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=reduction_axes, dtype=jnp.int32)
  if axis_name is not None:
    count = lax.psum(count, axis_name, axis_index_groups=axis_index_groups)
  return count > 0


def _ghost_split(x, mask, batch_axis, k):
  """Reshapes the batch axis ``N`` into ``(N // k, k)`` (chunks of k)."""
  n = x.shape[batch_axis]
  k = checks.check_positive_int("virtual_batch_size", k)
  if n % k:
    raise ValueError(
        f"`virtual_batch_size`={k} must divide the batch size, but `x` has "
        f"{n} examples along axis {batch_axis}."
    )
  shape = x.shape[:batch_axis] + (n // k, k) + x.shape[batch_axis + 1:]
  xg = x.reshape(shape)
  mg = None
  if mask is not None:
    mg = jnp.broadcast_to(mask, x.shape).reshape(shape)
  return xg, mg


def _batch_moments(x, mask, feature_axes, reduction_axes, virtual_batch_size,
                   axis_name, axis_index_groups):
  """Batch moments; with ghost batches, per-chunk moments on a reshaped x.

  Returns ``(moments, x_view, mask_view, unsplit, batch_mean, batch_var)``
  where ``x_view``/``mask_view`` are the arrays the moments broadcast against,
  ``unsplit`` maps a normalized ``x_view`` back to ``x``'s shape, and
  ``batch_mean``/``batch_var`` have the features' shape.
  """
  if virtual_batch_size is None:
    m = moments_lib.shifted_moments(
        x, reduction_axes, mask=mask, axis_name=axis_name,
        axis_index_groups=axis_index_groups)
    mean = jnp.squeeze(moments_lib.full_mean(m), reduction_axes)
    var = jnp.squeeze(m.var, reduction_axes)
    return m, x, mask, lambda y: y, mean, var, None
  batch_axis = reduction_axes[0]
  xg, mg = _ghost_split(x, mask, batch_axis, virtual_batch_size)
  # In the split view, the chunk axis sits at `batch_axis` and every axis after
  # it moves one place to the right.
  shift_up = lambda a: a if a < batch_axis else a + 1
  g_reduction = tuple(shift_up(a) for a in reduction_axes if a != batch_axis)
  g_reduction = tuple(sorted(g_reduction + (batch_axis + 1,)))
  m = moments_lib.shifted_moments(
      xg, g_reduction, mask=mg, axis_name=axis_name,
      axis_index_groups=axis_index_groups)
  chunk_mean = moments_lib.full_mean(m)
  # The running averages take the mean of the chunks' statistics.
  mean = jnp.squeeze(jnp.mean(chunk_mean, axis=batch_axis, keepdims=True), g_reduction + (batch_axis,))
  var = jnp.squeeze(jnp.mean(m.var, axis=batch_axis, keepdims=True), g_reduction + (batch_axis,))
  unsplit = lambda y: y.reshape(x.shape)
  return m, xg, mg, unsplit, mean, var, batch_axis


def values_per_feature(x, reduction_axes, virtual_batch_size=None) -> int:
  """How many values of ``x`` each feature's batch statistics see (per chunk
  with ghost batches), on this device."""
  count = math.prod(x.shape[a] for a in reduction_axes)
  if virtual_batch_size is not None:
    n = x.shape[reduction_axes[0]] if reduction_axes else 1
    count = count // max(n, 1) * virtual_batch_size
  return count


def _check_train_batch(x, reduction_axes, axis_name, mask, virtual_batch_size):
  count = values_per_feature(x, reduction_axes, virtual_batch_size)
  if count <= 1 and axis_name is None and mask is None:
    raise ValueError(
        "Train-mode batch norm needs more than one value per channel to "
        f"compute batch statistics, but `x` of shape {tuple(x.shape)} has "
        f"{count} per channel. Use `train=False`, a larger batch, or layer_norm."
    )


def batch_norm(
    params,
    state,
    x: jax.Array,
    *,
    train: bool,
    axis=-1,
    momentum=0.99,
    eps=1e-5,
    axis_name=None,
    axis_index_groups=None,
    mask: jax.Array | None = None,
    virtual_batch_size: int | None = None,
    dtype=None,
):
  """Batch normalization (Ioffe & Szegedy, 2015).

  ``y = (x - mean) / sqrt(var + eps) * scale + bias`` with, per feature,

  * ``train=True``: the batch's mean and biased variance over every axis but
    ``axis`` (and across the devices of ``axis_name``); the returned state is
    ``momentum * state + (1 - momentum) * batch``.
  * ``train=False``: ``state["mean"]`` and ``state["var"]``; the returned state
    is ``state`` itself.

  Args:
    params: ``{"scale": (C,), "bias": (C,)}``; a missing key turns that term
      off. ``C`` is ``x.shape[axis]`` (a tuple of sizes for several axes).
    state: ``{"mean": (C,), "var": (C,)}``, float32.
    x: input of any rank >= 1, floating point (or complex).
    train: use batch statistics and update the running averages.
    axis: the feature axis (int or tuple of ints); ``axis=1`` is NCHW.
    momentum: decay of the running averages, in [0, 1].
    eps: added to the variance, > 0.
    axis_name: mapped axis name (``shard_map``/``pmap``/``vmap``) to compute
      statistics over the global batch.
    axis_index_groups: subgroups of devices for ``axis_name``.
    mask: boolean, broadcastable to ``x``; ``False`` entries are left out of
      the statistics (and so of the running averages). A feature the mask
      leaves without entries (on every device) keeps its running averages.
    virtual_batch_size: ghost batch norm (Hoffer et al., 2017): normalize each
      chunk of this many examples of the batch axis (the first non-feature
      axis) with its own statistics; the running averages take the mean of
      the chunks' statistics.
    dtype: output dtype; by default that of ``x``, ``scale`` and ``bias``
      promoted together (as in Flax).

  Returns:
    ``(y, new_state)``.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> params, state = jaxnorm.batch_norm_init(2)
  >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
  >>> y, state = jaxnorm.batch_norm(params, state, x, train=True, momentum=0.9)
  >>> np.asarray(y, float).round(3).tolist()
  [[-1.0, -1.0], [1.0, 1.0]]
  >>> np.asarray(state["mean"], float).round(3).tolist(), np.asarray(state["var"], float).round(3).tolist()
  ([0.2, 2.0], [1.0, 10.9])
  """
  params, feature_axes, reduction_axes, _, bshape = _bn_setup(
      params, state, x, axis, eps, momentum, mask, "batch_norm")
  scale = _reshape(params.get("scale"), bshape)
  bias = _reshape(params.get("bias"), bshape)
  out_dtype = checks.result_dtype(x, params, dtype)

  if not train:
    m = moments_lib.Moments(
        shift=jnp.reshape(state["mean"], bshape).astype(moments_lib.stat_dtype(x.dtype)),
        mean=None,
        var=jnp.reshape(state["var"], bshape))
    y = moments_lib.normalize(x, m, eps=eps, scale=scale, bias=bias, dtype=out_dtype)
    return y, state

  if virtual_batch_size is not None:
    checks.check_positive_int("virtual_batch_size", virtual_batch_size)
  _check_train_batch(x, reduction_axes, axis_name, mask, virtual_batch_size)
  selected = _any_selected(mask, x, reduction_axes, axis_name, axis_index_groups)
  if virtual_batch_size is None and fused_norm.supported(x):
    # Same moments and normalize step, with a closed-form derivative.
    y, mean, var = fused_norm.normalize_with_batch_stats(
        x, scale, bias, axes=reduction_axes, eps=eps, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups, dtype=out_dtype)
    mean = jnp.squeeze(mean, reduction_axes)
    var = jnp.squeeze(var, reduction_axes)
    return y, _update_state(state, mean, var, momentum, selected)
  m, xv, _, unsplit, mean, var, chunk_axis = _batch_moments(
      x, mask, feature_axes, reduction_axes, virtual_batch_size, axis_name,
      axis_index_groups)
  if chunk_axis is not None:
    scale = None if scale is None else jnp.expand_dims(scale, chunk_axis)
    bias = None if bias is None else jnp.expand_dims(bias, chunk_axis)
  y = unsplit(moments_lib.normalize(xv, m, eps=eps, scale=scale, bias=bias,
                                    dtype=out_dtype))
  return y, _update_state(state, mean, var, momentum, selected)


def batch_renorm(
    params,
    state,
    x: jax.Array,
    *,
    train: bool,
    r_max=3.0,
    d_max=5.0,
    axis=-1,
    momentum=0.99,
    eps=1e-5,
    axis_name=None,
    axis_index_groups=None,
    mask: jax.Array | None = None,
    dtype=None,
):
  """Batch renormalization (Ioffe, 2017).

  In train mode, with batch statistics ``mu_B``, ``sigma_B = sqrt(var_B + eps)``
  and running ones ``mu``, ``sigma = sqrt(var + eps)``::

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = ((x - mu_B) / sigma_B * r + d) * scale + bias

  and the running averages are updated as in :func:`batch_norm` (the variance,
  not the standard deviation, is averaged). With ``r_max=1, d_max=0`` this is
  batch norm. ``r_max`` and ``d_max`` may be traced values, so a schedule can
  ramp them up during training. Inference mode is batch norm's.

  Arguments and returns are those of :func:`batch_norm`.
  """
  if not train:
    return batch_norm(params, state, x, train=False, axis=axis, momentum=momentum,
                      eps=eps, mask=mask, dtype=dtype)
  params, feature_axes, reduction_axes, _, bshape = _bn_setup(
      params, state, x, axis, eps, momentum, mask, "batch_renorm")
  for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
    if checks._is_concrete_number(value) and not float(value) >= low:
      raise ValueError(f"`{name}` must be >= {low}, got {value}.")
  _check_train_batch(x, reduction_axes, axis_name, mask, None)
  scale = _reshape(params.get("scale"), bshape)
  bias = _reshape(params.get("bias"), bshape)
  out_dtype = checks.result_dtype(x, params, dtype)

  m, _, _, _, mean, var, _ = _batch_moments(
      x, mask, feature_axes, reduction_axes, None, axis_name, axis_index_groups)
  real = jnp.finfo(moments_lib.stat_dtype(x.dtype)).dtype
  sigma_b = jnp.sqrt(var.astype(real) + eps)
  sigma = jnp.sqrt(state["var"].astype(real) + eps)
  r_max = jnp.asarray(r_max, real)
  d_max = jnp.asarray(d_max, real)
  r = lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / r_max, r_max))
  d = lax.stop_gradient(jnp.clip((mean - state["mean"]) / sigma, -d_max, d_max))
  y = moments_lib.normalize(x, m, eps=eps, scale=scale, bias=bias, dtype=out_dtype,
                            r=jnp.reshape(r, bshape), d=jnp.reshape(d, bshape))
  selected = _any_selected(mask, x, reduction_axes, axis_name, axis_index_groups)
  return y, _update_state(state, mean, var, momentum, selected)
