"""Batch normalization, ghost batch norm and batch renormalization.

Batch norm (Ioffe & Szegedy, 2015, Algorithm 1): over a mini-batch ``B``,
``x_hat = (x - mu_B) / sqrt(var_B + eps)``, ``y = scale * x_hat + bias``, with
``mu_B`` and the biased ``var_B`` taken over every axis but the feature axis.
Inference uses running averages instead of the batch statistics:
``state <- momentum * state + (1 - momentum) * batch`` (Flax/Keras convention;
PyTorch's ``momentum=0.1`` is our ``0.9``, see :mod:`jaxnorm.interop`).

Every train-mode variant (plain, ghost, renorm, PyTorch's) goes through
:func:`batch_statistics`, which calls the one core entry
:func:`jaxnorm._src.normalize.normalize_batch`; the running averages go
through :func:`jaxnorm._src.normalize.update_running`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from jaxnorm._src import checks
from jaxnorm._src import layer_setup
from jaxnorm._src import normalize as norm_lib


def batch_norm_init(
    num_features: int | Sequence[int],
    *,
    dtype: DTypeLike = jnp.float32,
    use_scale: bool = True,
    use_bias: bool = True,
    state_dtype: DTypeLike = jnp.float32,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
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
  shape = layer_setup.feature_shape(num_features)
  checks.check_float_dtype("state_dtype", state_dtype)
  params = layer_setup.affine_init(shape, dtype=dtype, use_scale=use_scale,
                                   use_bias=use_bias)
  state = {"mean": jnp.zeros(shape, state_dtype), "var": jnp.ones(shape, state_dtype)}
  return params, state


def setup_call(params, x, axis, eps, mask, dtype) -> layer_setup.Setup:
  """A batch norm call's checked setup, without running averages (as
  :func:`jaxnorm.interop.torch_batch_norm` may make it)."""
  x = layer_setup.input_array(x)
  feature_axes = checks.normalize_axes("axis", axis, x.ndim)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  return layer_setup.setup(params, x, feature_axes=feature_axes,
                           reduction_axes=reduction_axes, allowed=("scale", "bias"),
                           where=f"along axis {axis}", eps=eps, mask=mask, dtype=dtype)


def setup_with_state(params, state, x, axis, eps, mask, dtype) -> layer_setup.Setup:
  """:func:`setup_call`, and ``state`` checked against the features."""
  s = setup_call(params, x, axis, eps, mask, dtype)
  checks.check_state(state, s.feature_shape, f"along axis {axis}")
  return s


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


def _check_ghost(x, reduction_axes, virtual_batch_size, axis_name):
  if not reduction_axes:
    raise ValueError(
        "`virtual_batch_size` needs a batch axis, but `axis` leaves `x` of shape "
        f"{tuple(x.shape)} no axis to reduce over."
    )
  n = x.shape[reduction_axes[0]]
  # Divisibility: the shared check words it for one device; with `axis_name`
  # the message says that chunks stay within each device's batch.
  k = checks.check_virtual_batch_size(
      virtual_batch_size, batch_size=n if axis_name is None else None,
      batch_axis=reduction_axes[0],
      values_per_example=values_per_feature(x, reduction_axes[1:]))
  if n % k:
    raise ValueError(
        f"`virtual_batch_size`={k} must divide the batch size on each device, but "
        f"`x` has {n} examples along axis {reduction_axes[0]} on this device. Chunks "
        "are formed within each device's batch, so that the result equals one "
        "device on the gathered batch."
    )
  return k


class Statistics(NamedTuple):
  """Train-mode output and batch statistics, with the features' shape.

  ``selected`` (``None`` without a mask) is False for features the mask leaves
  without entries on every device; ``num_values`` is the number of values
  behind each feature's statistics (all devices). (Not ``count``: a tuple
  field of that name would hide ``tuple.count``.)
  """

  y: jax.Array
  mean: jax.Array
  var: jax.Array
  num_values: jax.Array
  selected: jax.Array | None


def batch_statistics(
    s: layer_setup.Setup,
    *,
    eps,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask=None,
    virtual_batch_size: int | None = None,
    renorm: tuple | None = None,
) -> Statistics:
  """Normalizes ``s.x`` with its batch statistics and returns them.

  Ghost batch norm (``virtual_batch_size``) normalizes each chunk of the batch
  axis with its own statistics and returns the mean over the non-empty chunks
  (of every device). Chunks never span devices: with ``axis_name`` they are
  formed within each device's batch, so the result equals one device on the
  gathered batch, and normalizing needs no communication.
  """
  x = s.x
  red = s.reduction_axes
  if virtual_batch_size is not None:
    k = _check_ghost(x, red, virtual_batch_size, axis_name)
  _check_train_batch(x, red, axis_name, mask, virtual_batch_size)
  if virtual_batch_size is None:
    out = norm_lib.normalize_batch(
        x, axes=red, scale=s.scale, bias=s.bias, eps=eps, mask=mask,
        axis_name=axis_name, axis_index_groups=axis_index_groups,
        dtype=s.out_dtype, renorm=renorm)
    selected = None if mask is None else out.num_values > 0
    return Statistics(out.y, out.mean, out.var, out.num_values, selected)

  out = norm_lib.normalize_batch(
      x, axes=red, scale=s.scale, bias=s.bias, eps=eps, mask=mask,
      dtype=s.out_dtype, blocks=x.shape[red[0]] // k, ghost=True)
  # Running averages: the mean of the non-empty chunks' statistics.
  nonempty = out.num_values > 0
  real = out.var.dtype
  sums = (jnp.sum(jnp.where(nonempty, out.mean, 0), axis=0),
          jnp.sum(jnp.where(nonempty, out.var, 0), axis=0),
          jnp.sum(nonempty, axis=0, dtype=real),
          jnp.sum(out.num_values, axis=0))
  if axis_name is not None:
    sums = lax.psum(sums, axis_name, axis_index_groups=axis_index_groups)
  mean_sum, var_sum, chunks, count = sums
  per = 1 / jnp.maximum(chunks, 1)
  selected = None if mask is None else chunks > 0
  return Statistics(out.y, mean_sum * per.astype(mean_sum.dtype), var_sum * per,
                    count, selected)


def batch_norm(
    params: Mapping[str, ArrayLike] | None,
    state: Mapping[str, jax.Array],
    x: ArrayLike,
    *,
    train: bool,
    axis: int | Sequence[int] = -1,
    momentum: float = 0.99,
    eps: float = 1e-5,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
    virtual_batch_size: int | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
  """Batch normalization (Ioffe & Szegedy, 2015).

  ``y = (x - mean) / sqrt(var + eps) * scale + bias`` with, per feature,

  * ``train=True``: the batch's mean and biased variance over every axis but
    ``axis`` (and across the devices of ``axis_name``); the returned state is
    ``momentum * state + (1 - momentum) * batch``.
  * ``train=False``: ``state["mean"]`` and ``state["var"]``; the returned state
    is ``state`` itself.

  The statistics are exact on any data (see :mod:`jaxnorm._src.moments`):
  float32 results within about 1e-7 (variance, relative) of float64 for large
  offsets, outliers and heavy tails. Under ``axis_name`` the forward pass needs
  one collective (an all-gather of four numbers per feature) and the backward
  pass one all-reduce.

  Args:
    params: ``{"scale": (C,), "bias": (C,)}``; a missing key turns that term
      off. ``C`` is ``x.shape[axis]`` (a tuple of sizes for several axes).
    state: ``{"mean": (C,), "var": (C,)}``, float32.
    x: input of any rank >= 1, floating point (or complex).
    train: use batch statistics and update the running averages; a Python
      bool (it selects the code path, so it cannot be traced).
    axis: the feature axis (int or tuple of ints); ``axis=1`` is NCHW.
    momentum: decay of the running averages, in [0, 1].
    eps: added to the variance, > 0.
    axis_name: mapped axis name (``shard_map``/``pmap``/``vmap``) to compute
      statistics over the global batch.
    axis_index_groups: subgroups of devices for ``axis_name``.
    mask: boolean, broadcastable to ``x``; ``False`` entries are left out of
      the statistics, of the running averages and of every derivative, even
      when they hold NaN or inf. A feature the mask leaves without entries (on
      every device) keeps its running averages.
    virtual_batch_size: ghost batch norm (Hoffer et al., 2017): normalize each
      chunk of this many examples of the batch axis (the first non-feature
      axis) with its own statistics; the running averages take the mean of the
      non-empty chunks' statistics. With ``axis_name`` the chunks are formed
      within each device's batch (it must divide it), so the result equals one
      device on the gathered batch.
    dtype: output dtype; by default that of ``x``, ``scale`` and ``bias``
      promoted together (as in Flax).

  Returns:
    ``(y, new_state)``. A zero-size ``x`` gives an empty ``y`` and ``state``.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> params, state = jaxnorm.batch_norm_init(2)
  >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
  >>> y, state = jaxnorm.batch_norm(params, state, x, train=True, momentum=0.9)
  >>> np.asarray(y, float).round(3).tolist()
  [[-1.0, -1.0], [1.0, 1.0]]
  >>> np.asarray(state["mean"], float).round(3).tolist()
  [0.2, 2.0]
  >>> np.asarray(state["var"], float).round(3).tolist()
  [1.0, 10.9]
  """
  train = checks.check_train("train", train)
  s = setup_with_state(params, state, x, axis, eps, mask, dtype)
  checks.check_momentum(momentum)
  if s.x.size == 0:
    return layer_setup.empty_output(s), state
  if not train:
    return _inference(s, state, eps, mask), state
  st = batch_statistics(s, eps=eps, axis_name=axis_name,
                        axis_index_groups=axis_index_groups, mask=mask,
                        virtual_batch_size=virtual_batch_size)
  return st.y, norm_lib.update_running(state, st.mean, st.var, momentum=momentum,
                                       selected=st.selected)


def _inference(s, state, eps, mask):
  return norm_lib.normalize_with(
      s.x, jnp.reshape(state["mean"], s.bshape), jnp.reshape(state["var"], s.bshape),
      eps=eps, scale=s.scale, bias=s.bias, mask=mask, dtype=s.out_dtype)


def batch_renorm(
    params: Mapping[str, ArrayLike] | None,
    state: Mapping[str, jax.Array],
    x: ArrayLike,
    *,
    train: bool,
    r_max: ArrayLike = 3.0,
    d_max: ArrayLike = 5.0,
    axis: int | Sequence[int] = -1,
    momentum: float = 0.99,
    eps: float = 1e-5,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    mask: ArrayLike | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
  """Batch renormalization (Ioffe, 2017).

  In train mode, with batch statistics ``mu_B``, ``sigma_B = sqrt(var_B + eps)``
  and running ones ``mu``, ``sigma = sqrt(var + eps)``::

    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    y = ((x - mu_B) / sigma_B * r + d) * scale + bias

  and the running averages are updated as in :func:`batch_norm` (the variance,
  not the standard deviation, is averaged). With ``r_max=1, d_max=0`` this is
  batch norm. ``r_max`` and ``d_max`` may be traced values, so a schedule can
  ramp them up during training. Inference mode is batch norm's. The batch
  statistics and the closed-form derivative are batch norm's (``r`` and ``d``
  are constants for differentiation). ``x`` must be real.

  Arguments and returns are those of :func:`batch_norm`.
  """
  train = checks.check_train("train", train)
  s = setup_with_state(params, state, x, axis, eps, mask, dtype)
  checks.check_momentum(momentum)
  if not jnp.issubdtype(s.x.dtype, jnp.floating):
    raise TypeError(
        f"`x` must be real for batch_renorm, got dtype {s.x.dtype}; the "
        "clipped corrections r and d are defined for real statistics. Use "
        "batch_norm for complex inputs."
    )
  for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
    checks.check_at_least(name, value, low)
  if s.x.size == 0:
    return layer_setup.empty_output(s), state
  if not train:
    return _inference(s, state, eps, mask), state
  renorm = (jnp.reshape(state["mean"], s.bshape), jnp.reshape(state["var"], s.bshape),
            r_max, d_max)
  st = batch_statistics(s, eps=eps, axis_name=axis_name,
                        axis_index_groups=axis_index_groups, mask=mask,
                        renorm=renorm)
  return st.y, norm_lib.update_running(state, st.mean, st.var, momentum=momentum,
                                       selected=st.selected)
