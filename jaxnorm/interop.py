"""PyTorch conventions and state-dict conversion.

PyTorch and Flax store the same per-channel numbers under different names and
update the running averages with different rules:

=====================  ==========================  ==============================
                       ``torch.nn.BatchNorm*d``    ``jaxnorm.batch_norm``
=====================  ==========================  ==============================
scale / shift          ``weight`` / ``bias``       ``params["scale"]``/``["bias"]``
running averages       ``running_mean/var``        ``state["mean"]``/``["var"]``
update weight          ``momentum=0.1`` (new)      ``momentum=0.99`` (old)
running variance       unbiased, ``n/(n-1)``       biased
cumulative average     ``momentum=None``           --
feature axis           1 (NCHW, ``(N, C, L)``)     -1 (NHWC)
=====================  ==========================  ==============================

:func:`from_torch` and :func:`to_torch` convert state dicts (exactly, both
ways); :func:`torch_batch_norm` runs batch norm with PyTorch's update rule through
the same core as :func:`jaxnorm.batch_norm` (one statistics routine, one
running-average update). Because every parameter is per channel,
nothing needs transposing to move between NCHW and NHWC: pass ``axis=1`` to
:func:`jaxnorm.batch_norm` for NCHW inputs, or move the channels last with
:func:`nchw_to_nhwc` (needed for :func:`jaxnorm.group_norm` and
:func:`jaxnorm.instance_norm`, which are channels-last).

PyTorch's layer norm and group norm default to ``eps=1e-5`` where jaxnorm (like
Flax) uses ``1e-6``: pass ``eps=1e-5`` for the same outputs.

This module imports ``torch`` only inside the functions that receive torch
tensors, and never at import time; it works on NumPy arrays without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from jaxnorm._src import batch_norm as batch_norm_lib
from jaxnorm._src import checks
from jaxnorm._src import normalize

__all__ = (
    "from_torch",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "to_torch",
    "torch_batch_norm",
)

_PARAM_KEYS = {"weight": "scale", "bias": "bias"}
_STATE_KEYS = {"running_mean": "mean", "running_var": "var",
               "num_batches_tracked": "num_batches_tracked"}


def _to_numpy(name: str, value) -> np.ndarray:
  if isinstance(value, np.ndarray | np.generic | jax.Array):
    return np.asarray(value)
  module = type(value).__module__
  if module.startswith("torch"):
    import torch  # Lazily: only when given torch tensors.

    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.dtype == torch.bfloat16:
        # NumPy has no bfloat16 of torch's; the same bits as JAX's (ml_dtypes').
        return value.view(torch.int16).numpy().view(jnp.bfloat16)
      return value.numpy()
  raise TypeError(
      f"`state_dict['{name}']` must be a torch tensor or a NumPy array, got "
      f"{type(value).__name__}."
  )


def _check_shapes(hosts: Mapping[str, np.ndarray], prefix: str) -> None:
  """Refuses tensors whose shapes no PyTorch normalization layer stores.

  A norm layer's ``weight`` and ``bias`` are per feature and share a shape:
  ``(C,)`` for batch, instance and group norm, ``normalized_shape`` (of any
  rank) for ``LayerNorm`` and ``RMSNorm``; batch and instance norm's running
  averages are ``(C,)`` too. A ``Linear`` or ``Conv`` layer has the same keys
  ``weight`` and ``bias``, but a weight of more dimensions than its bias,
  which only a later shape check (far from the cause) would catch. What
  cannot be told apart is accepted: a weight alone of rank 2 or more (a
  ``LayerNorm((3, 4), bias=False)`` stores what ``Linear(4, 3, bias=False)``
  does).
  """
  def name(key):
    return f"`state_dict['{prefix + key}']`"

  weight, bias = hosts.get("weight"), hosts.get("bias")
  if weight is not None and bias is not None and weight.shape != bias.shape:
    raise ValueError(
        f"{name('weight')} has shape {weight.shape} but {name('bias')} has shape "
        f"{bias.shape}; a normalization layer's weight and bias have the same "
        "shape, one value per feature ((C,) for batch, instance and group norm, "
        "`normalized_shape` for LayerNorm), so this is another layer's (a Linear "
        "or Conv layer's weight has more dimensions than its bias; pass `prefix=` "
        "to select one layer of a model's state dict)."
    )
  running = {k: hosts[k] for k in ("running_mean", "running_var") if k in hosts}
  shapes = {a.shape for a in running.values()}
  if any(a.ndim != 1 for a in running.values()) or len(shapes) > 1:
    given = " and ".join(f"{name(k)} has shape {a.shape}" for k, a in running.items())
    raise ValueError(
        "The running averages of a normalization layer are 1-D, one value per "
        f"channel, of one shape (C,) (batch and instance norm), but {given}."
    )
  if running:
    (channels,) = shapes
    for key, value in (("weight", weight), ("bias", bias)):
      if value is not None and value.shape != channels:
        raise ValueError(
            f"{name(key)} has shape {value.shape} but the running averages have "
            f"shape {channels}; batch and instance norm store their {key} per "
            "channel, in the running averages' shape (C,), so this is another "
            "layer's (pass `prefix=` to select one layer of a model's state dict)."
        )


def from_torch(
    state_dict: Mapping[str, Any], *, prefix: str = ""
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Converts a PyTorch normalization layer's ``state_dict`` to ``(params, state)``.

  Accepts the state dicts of ``BatchNorm1d/2d/3d``, ``LayerNorm`` and
  ``GroupNorm`` (and ``InstanceNorm*d``, ``SyncBatchNorm``), with torch
  tensors or NumPy arrays as values:

  * ``weight -> params["scale"]``, ``bias -> params["bias"]`` (each present
    only if the module has it: ``affine=False``, ``bias=False``);
  * ``running_mean -> state["mean"]``, ``running_var -> state["var"]``,
    ``num_batches_tracked -> state["num_batches_tracked"]``.

  ``state`` is always a dict; for ``LayerNorm``, ``GroupNorm`` and batch norm
  with ``track_running_stats=False`` it is empty (``{}``). Values become JAX
  arrays of the same dtype (float64 ones need ``jax_enable_x64``, otherwise
  JAX stores them as float32, and ``num_batches_tracked`` becomes int32: a
  count beyond the int32 range is then an error rather than a wrapped
  value; with ``jax_enable_x64`` it is kept as int64).
  The running variance stays PyTorch's (unbiased-updated) running variance;
  both :func:`jaxnorm.batch_norm` and :func:`torch_batch_norm` use it as is
  at inference.

  The shapes are checked against what normalization layers store: ``weight``
  and ``bias`` of one shape (``(C,)``, or ``LayerNorm``'s and ``RMSNorm``'s
  ``normalized_shape``, of any rank), running averages 1-D and, where present,
  of that same shape ``(C,)``. So a ``Linear`` or ``Conv`` layer's state dict,
  whose keys are the same ``weight`` and ``bias``, is refused here; one
  without a bias cannot be told from a ``LayerNorm`` without one and is
  accepted.

  Args:
    state_dict: the module's ``state_dict()``, or a whole model's with
      ``prefix``.
    prefix: keep only the keys that start with this (e.g. ``"bn1."``) and
      strip it.

  Returns:
    ``(params, state)``.

  Raises:
    ValueError: a key that is not one of the above; shapes that are not a
      normalization layer's (a ``weight`` and ``bias`` of different shapes,
      running averages that are not 1-D of one shape, or a ``weight`` or
      ``bias`` of another shape than them); or an integer value beyond int32
      without ``jax_enable_x64``.
  """
  if not isinstance(state_dict, Mapping):
    raise TypeError(
        f"`state_dict` must be a mapping of names to tensors, got "
        f"{type(state_dict).__name__}."
    )
  items = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not items and prefix:
    raise ValueError(
        f"`state_dict` has no keys starting with `prefix`={prefix!r}; its keys "
        f"are {sorted(state_dict)}."
    )
  unknown = sorted(set(items) - set(_PARAM_KEYS) - set(_STATE_KEYS))
  if unknown:
    raise ValueError(
        f"`state_dict` has keys {unknown} that are not those of a PyTorch "
        f"normalization layer; expected keys among "
        f"{sorted(set(_PARAM_KEYS) | set(_STATE_KEYS))} (pass `prefix=` to "
        "select one layer of a model's state dict)."
    )
  hosts = {k: _to_numpy(prefix + k, v) for k, v in items.items()}
  _check_shapes(hosts, prefix)
  params, state = {}, {}
  for torch_key, host in hosts.items():
    # Without x64, JAX stores int64 as int32 and wraps larger counts around.
    stored = jax.dtypes.canonicalize_dtype(host.dtype)
    if host.dtype.kind in "iu" and stored != host.dtype and host.size:
      info = np.iinfo(stored)
      low, high = host.min(), host.max()
      if low < info.min or high > info.max:
        raise ValueError(
            f"`state_dict['{prefix + torch_key}']` holds "
            f"{high if high > info.max else low}, outside the {stored} range "
            f"[{info.min}, {info.max}] that JAX uses without 64-bit mode, where "
            "it would wrap around; enable it with "
            "`jax.config.update('jax_enable_x64', True)` to keep the value."
        )
    array = jnp.asarray(host)
    if torch_key in _PARAM_KEYS:
      params[_PARAM_KEYS[torch_key]] = array
    else:
      state[_STATE_KEYS[torch_key]] = array
  return params, state


def to_torch(params: Mapping[str, ArrayLike] | None,
             state: Mapping[str, ArrayLike] | None = None, *,
             tensors: bool = False) -> dict[str, Any]:
  """Converts ``(params, state)`` to a PyTorch state dict of NumPy arrays.

  The inverse of :func:`from_torch`: ``scale -> weight``, ``bias -> bias``,
  ``mean -> running_mean``, ``var -> running_var``,
  ``num_batches_tracked -> num_batches_tracked`` (int64, 0-d). A state with
  running averages but no ``num_batches_tracked`` (e.g. one made by
  :func:`jaxnorm.batch_norm_init`) gets ``num_batches_tracked = 0``, so the
  dict loads into a batch norm module with ``load_state_dict(strict=True)``.
  Load it with ``module.load_state_dict(to_torch(params, state, tensors=True))``,
  or from the NumPy arrays with ``{k: torch.from_numpy(v) for k, v in
  sd.items()}``.

  ``to_torch(*from_torch(sd))`` equals ``sd`` exactly (same keys, dtypes and
  values; float64 needs ``jax_enable_x64``).

  bfloat16 values come out as JAX's NumPy bfloat16 (``jnp.bfloat16``, from
  ``ml_dtypes``), which ``torch.from_numpy`` and ``torch.tensor`` do not
  accept; ``tensors=True`` converts them bit for bit.

  Args:
    params: ``{"scale", "bias"}`` (either may be absent), or ``None``.
    state: ``{"mean", "var", "num_batches_tracked"}`` (any may be absent), or
      ``None``.
    tensors: return CPU torch tensors instead of NumPy arrays (imports
      ``torch``).
  """
  params = {} if params is None else params
  state = {} if state is None else state
  for name, tree, known in (("params", params, ("scale", "bias")),
                            ("state", state, ("mean", "var", "num_batches_tracked"))):
    if not isinstance(tree, Mapping):
      raise TypeError(f"`{name}` must be a dict, got {type(tree).__name__}.")
    unknown = sorted(set(tree) - set(known))
    if unknown:
      raise ValueError(
          f"`{name}` has unexpected keys {unknown}; expected keys among "
          f"{sorted(known)}."
      )
  out = {}
  for ours, theirs in (("scale", "weight"), ("bias", "bias")):
    if params.get(ours) is not None:
      out[theirs] = np.asarray(params[ours])
  for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
    if state.get(ours) is not None:
      out[theirs] = np.asarray(state[ours])
  if "num_batches_tracked" in state:
    out["num_batches_tracked"] = np.asarray(state["num_batches_tracked"], np.int64)
  elif "running_mean" in out:
    out["num_batches_tracked"] = np.asarray(0, np.int64)
  return _as_tensors(out) if tensors else out


def _as_tensors(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
  import torch  # Lazily: only when asked for torch tensors.

  def tensor(a):
    if a.dtype == jnp.bfloat16:
      return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))  # A writable copy, as torch expects.
  return {k: tensor(v) for k, v in arrays.items()}


def nchw_to_nhwc(x: ArrayLike) -> jax.Array:
  """Moves the channel axis from 1 to last: ``(N, C, ...) -> (N, ..., C)``."""
  return jnp.moveaxis(x, 1, -1)


def nhwc_to_nchw(x: ArrayLike) -> jax.Array:
  """Moves the channel axis from last to 1: ``(N, ..., C) -> (N, C, ...)``."""
  return jnp.moveaxis(x, -1, 1)


def torch_batch_norm(
    params: Mapping[str, ArrayLike] | None,
    state: Mapping[str, jax.Array],
    x: ArrayLike,
    *,
    train: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int | Sequence[int] = 1,
    mask: ArrayLike | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
  """Batch norm with ``torch.nn.BatchNorm*d``'s conventions.

  ``y = (x - mean) / sqrt(var + eps) * scale + bias`` per channel, where

  * ``train=True``: ``mean`` and the *biased* ``var`` are the batch's (over
    every axis but ``axis``, computed by :func:`jaxnorm.batch_norm`), and the
    running averages are updated with the *unbiased* batch variance::

      f = momentum                 (or 1 / num_batches_tracked if momentum is None)
      num_batches_tracked += 1     (before f is computed)
      state["mean"] = (1 - f) * state["mean"] + f * batch_mean
      state["var"]  = (1 - f) * state["var"]  + f * batch_var * n / (n - 1)

    with ``n`` the number of values per channel (the mask's count if a mask
    is given; ``n/(n-1)`` is taken as 1 when ``n <= 1``).
  * ``train=False``: ``state["mean"]`` and ``state["var"]``; ``state`` is
    returned unchanged.

  A ``state`` without running averages (``{}``, as :func:`from_torch` gives
  for ``track_running_stats=False``) uses the batch statistics in both modes
  and stays empty, as PyTorch does.

  Note PyTorch's ``momentum`` is the weight of the *new* batch (0.1), where
  :func:`jaxnorm.batch_norm`'s is the weight of the old average (0.99):
  ``torch momentum m`` is ``jaxnorm momentum 1 - m`` (apart from the
  unbiased variance).

  Args:
    params: ``{"scale": (C,), "bias": (C,)}`` (``from_torch``'s params).
    state: ``{"mean", "var", "num_batches_tracked"}`` (``from_torch``'s state);
      a missing ``num_batches_tracked`` counts as 0.
    x: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ... with ``axis=1``.
    train: PyTorch's ``module.train()`` (batch statistics, update) or
      ``module.eval()``.
    momentum: in [0, 1], or ``None`` for the cumulative moving average.
    eps: added to the variance, > 0.
    axis: the channel axis, 1 as in PyTorch.
    mask: optional boolean array broadcastable to ``x``; masked-out entries
      do not contribute to the statistics (PyTorch has no such option).
    dtype: output dtype (default: that of ``x`` and the params).

  Returns:
    ``(y, new_state)``.
  """
  train = checks.check_train("train", train)
  if not isinstance(state, Mapping):
    raise TypeError(
        "`state` must be a dict with keys 'mean', 'var' and optionally "
        f"'num_batches_tracked' (or empty), got {type(state).__name__}."
    )
  keys = ("mean", "var", "num_batches_tracked")
  unknown = sorted(set(state) - set(keys))
  if unknown:
    raise ValueError(
        f"`state` has unexpected keys {unknown}; expected keys among "
        f"{sorted(keys)}."
    )
  if momentum is not None:
    checks.check_momentum(momentum)
  tracking = "mean" in state or "var" in state
  count = state.get("num_batches_tracked")
  if count is not None and not jnp.issubdtype(jnp.asarray(count).dtype, jnp.integer):
    raise TypeError(
        "`state['num_batches_tracked']` must be an integer array, got dtype "
        f"{jnp.asarray(count).dtype}."
    )
  if not train and tracking:
    return batch_norm_lib.batch_norm(params, state, x, train=False, axis=axis,
                                     eps=eps, mask=mask, dtype=dtype)
  # Running averages are checked (both keys, shapes, dtypes) with the layer's
  # own state check; without them there is nothing to check.
  x = jnp.asarray(x) if isinstance(x, np.ndarray) else x
  if tracking:
    stats_state = {k: state[k] for k in ("mean", "var") if k in state}
    s = batch_norm_lib.setup_with_state(params, stats_state, x, axis, eps, mask, dtype)
  else:
    s = batch_norm_lib.setup_call(params, x, axis, eps, mask, dtype)
  if s.x.size == 0:
    return jnp.zeros(s.x.shape, s.out_dtype), state
  st = batch_norm_lib.batch_statistics(s, eps=eps, mask=mask)
  if not tracking:
    return st.y, state
  # A missing num_batches_tracked counts as 0, and the new state has it.
  state = {"num_batches_tracked": jnp.zeros((), jnp.int32), **state}
  new_state = normalize.update_running(
      state, st.mean, st.var, momentum=None if momentum is None else 1 - momentum,
      count=st.num_values, selected=st.selected, unbiased=True,
      cumulative=momentum is None)
  return st.y, new_state

