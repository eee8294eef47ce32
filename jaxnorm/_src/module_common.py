"""What the linen and nnx modules share: argument checks, errors, degenerate inputs.

This file imports neither ``flax.linen`` nor ``flax.nnx``, so that
:mod:`jaxnorm.nnx` never loads jaxnorm's linen code (and the reverse).

The modules follow Flax on every input Flax accepts. Where the functional core
refuses an input on purpose (train-mode batch norm with one value per feature,
instance norm with no axis to reduce over), Flax returns a degenerate result:
each value is normalized with itself as the mean and a variance of 0, so the
output is ``bias``. The modules return the same, through the core (an all-true
``mask`` turns the core's "batch too small" check off without changing the
math; a singleton spatial axis gives instance norm an axis to reduce over),
and emit a :class:`UserWarning` at trace time saying why and what to use.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnorm._src import checks
from jaxnorm._src import dropout as dropout_lib

Array = jax.Array

# Flax's wording for the causes where it raises too; the module errors start
# with it and keep jaxnorm's detail after it.
FLAX_INSTANCE_NORM_BATCH_AXIS = (
    "The channel axes cannot include the leading dimension as this is assumed "
    "to be the batch axis.")
FLAX_GROUPS_BOTH = (
    "Either `num_groups` or `group_size` should be specified. If `group_size` "
    "is to be specified, pass `num_groups=None` as argument to override the "
    "default `num_groups` value of 32.")


@contextlib.contextmanager
def module_errors(module_name: str) -> Iterator[None]:
  """Prefixes the core's argument errors with the module's class name.

  A ``ValueError``/``TypeError`` raised inside keeps its type and reads
  ``"BatchNorm: `x` has ..."``; the original error is chained as the cause.
  The core's ``eps`` is the modules' ``epsilon``: the modules check
  ``epsilon`` themselves (:func:`check_hyperparameters`) before calling the
  core, so a message about ``eps`` cannot reach the user from here.
  """
  try:
    yield
  except (ValueError, TypeError) as err:
    msg = str(err)
    prefix = f"{module_name}: "
    # Only the core's plain errors are rewritten; subclasses (JAX's tracer
    # errors, Flax's scope errors) have their own constructors and pass as is.
    if type(err) not in (ValueError, TypeError) or msg.startswith(prefix):
      raise
    raise type(err)(prefix + msg) from err


def check_hyperparameters(module_name: str, *, epsilon: Any = None,
                          momentum: Any = None) -> None:
  """Checks the module's ``epsilon``/``momentum`` under their module names."""
  with module_errors(module_name):
    if epsilon is not None:
      checks.check_eps(epsilon, name="epsilon")
    if momentum is not None:
      checks.check_momentum(momentum, name="momentum")


def canonical_axes(module_name: str, arg_name: str, axes: Any,
                   ndim: int) -> tuple[int, ...]:
  """Flax's reading of a module's axis argument: sorted non-negative axes.

  Flax's modules take an int or any iterable of ints (a list, a tuple, a set,
  a NumPy array) and merge an axis named twice (``(-1, 2)`` on rank 3 is axis
  2). The modules do the same here and hand the core the resulting tuple; the
  core itself keeps refusing duplicates. A non-int entry or an axis out of
  range raises, prefixed with ``module_name`` and naming ``arg_name``.
  """
  given: Any = axes  # kept unnarrowed for the core's check
  with module_errors(module_name):
    if (not isinstance(axes, Iterable) or isinstance(axes, (str, bytes))
        or (isinstance(axes, np.ndarray) and axes.ndim == 0)):
      return checks.normalize_axes(arg_name, given, ndim)
    items = tuple(axes)
    if not all(checks.is_int(a) for a in items):
      hint = ("; a bool is not an axis number"
              if any(isinstance(a, (bool, np.bool_)) for a in items) else "")
      raise TypeError(
          f"`{arg_name}` must be an int or an iterable of ints, got "
          f"{axes!r}{hint}.")
    for a in items:
      if not -ndim <= a < ndim:
        raise ValueError(
            f"`{arg_name}`={axes!r} is out of range for an input with {ndim} "
            f"dimensions; expected values in [{-ndim}, {ndim - 1}].")
    return tuple(sorted({int(a) % ndim for a in items}))


def core_axes(given: Any, canonical: tuple[int, ...]) -> Any:
  """What to hand the core: the caller's axes where the core takes them as
  they are (so its messages show the caller's ``-1``), else ``canonical``."""
  if checks.is_int(given):
    return given
  if (isinstance(given, (tuple, list)) and len(given) == len(canonical)
      and all(checks.is_int(a) for a in given)):
    return given
  return canonical


def batch_axes(module_name: str, x: Any, axis: Any) -> tuple[tuple[int, ...], Any]:
  """A batch-norm module's ``axis``: ``(features, for_core)``, the canonical
  feature axes (:func:`canonical_axes`) and what to hand the core
  (:func:`core_axes`), read once per call."""
  features = canonical_axes(module_name, "axis", axis, x.ndim)
  return features, core_axes(axis, features)


def feature_shape_of(module_name: str, x: Any, axes: Any,
                     arg_name: str) -> tuple[int, ...]:
  """The shape of ``x`` along ``axes`` (read as Flax reads them), with the
  core's checks of ``x``."""
  with module_errors(module_name):
    checks.check_array("x", x)
    if x.ndim == 0:
      raise ValueError("`x` must have at least 1 dimension, got a scalar.")
  axes = canonical_axes(module_name, arg_name, axes, x.ndim)
  return tuple(x.shape[a] for a in axes)


def check_axes(module_name: str, x: Any,
               **axes: Any) -> tuple[tuple[int, ...], ...]:
  """The axis arguments (``reduction_axes``, ``feature_axes``) read as Flax
  reads them (:func:`canonical_axes`), in the order given, with errors under
  the module's names where the core would name its own (``axis``)."""
  with module_errors(module_name):
    checks.check_array("x", x)
  return tuple(canonical_axes(module_name, arg, value, x.ndim)
               for arg, value in axes.items())


def values_per_feature(x: Any, feature_axes: tuple[int, ...]) -> int:
  """How many entries of ``x`` each feature's batch statistics see
  (``feature_axes``: canonical, from :func:`canonical_axes`)."""
  return math.prod(x.shape[a] for a in range(x.ndim) if a not in feature_axes)


def degenerate_batch_mask(module_name: str, x: Any,
                          feature_axes: tuple[int, ...],
                          mask: Array | None, *, warn: bool) -> Array | None:
  """The mask a train-mode batch-norm call hands the core.

  With at most one value per feature and no ``mask``, Flax normalizes each
  value with itself (output: ``bias``; running mean: a step toward ``x``,
  running variance: toward 0). An all-true mask gives the core the same math
  without its "batch too small" error. An empty batch (no values per
  feature) has no statistics: the core leaves the running averages unchanged
  where Flax's become NaN, and the warning says so. ``warn`` says whether to
  emit the :class:`UserWarning` (Flax linen's ``init`` on one example is the
  usual way to build variables, and its output is not used, so it stays
  silent).
  """
  count = values_per_feature(x, feature_axes)
  if mask is not None or count > 1:
    return mask
  if warn and count == 0:
    warnings.warn(
        f"{module_name}: `x` of shape {tuple(x.shape)} is an empty batch (no "
        "values per feature), so there are no batch statistics: the output is "
        "empty and the running averages are left unchanged (Flax would set "
        "them to NaN, 0/0).", UserWarning, stacklevel=4)
  elif warn:
    warnings.warn(
        f"{module_name}: train-mode batch statistics need more than one value "
        f"per feature, but `x` of shape {tuple(x.shape)} has one per feature, "
        "so each value is its own mean and the output is just `bias` (as in "
        "Flax). Use `use_running_average=True` (`model.eval()` in nnx) for "
        "single examples, a larger batch, or a per-example norm (LayerNorm, "
        "GroupNorm).", UserWarning, stacklevel=4)
  return jnp.ones((), bool)


def chunk_size(module_name: str, x: Any, feature_axes: tuple[int, ...],
               virtual_batch_size: int | None, *, warn: bool) -> int | None:
  """The ghost-batch chunk size for ``x``: ``None`` (one chunk) when the batch
  has fewer examples than ``virtual_batch_size``.

  Flax has no ghost batches; a batch smaller than one chunk (``init`` on one
  example, a smoke test) is normalized as one chunk, as Flax's BatchNorm
  would, with a :class:`UserWarning` when ``warn``.
  """
  if virtual_batch_size is None or isinstance(virtual_batch_size, bool):
    return virtual_batch_size
  batch_axis = min((a for a in range(x.ndim) if a not in feature_axes),
                   default=None)
  if (batch_axis is None or not isinstance(virtual_batch_size, int)
      or x.shape[batch_axis] >= virtual_batch_size):
    return virtual_batch_size
  if warn:
    warnings.warn(
        f"{module_name}: `virtual_batch_size`={virtual_batch_size} is larger "
        f"than the batch, which has {x.shape[batch_axis]} examples along axis "
        f"{batch_axis}; the batch is normalized as one chunk. Use a batch of "
        "at least `virtual_batch_size` examples for ghost batch norm.",
        UserWarning, stacklevel=4)
  return None


def instance_norm_axes(module_name: str, x: Any,
                       feature_axes: Any) -> tuple[int, ...]:
  """The instance-norm feature axes of ``x``, with Flax's error for axis 0."""
  with module_errors(module_name):
    checks.check_array("x", x)
  axes = canonical_axes(module_name, "feature_axes", feature_axes, x.ndim)
  if 0 in axes:
    raise ValueError(
        f"{module_name}: {FLAX_INSTANCE_NORM_BATCH_AXIS} `feature_axes`="
        f"{feature_axes!r} names axis 0 of `x` (shape {tuple(x.shape)}); "
        "instance norm normalizes each example on its own, over every axis "
        "but the first and `feature_axes`.")
  return axes


def instance_norm_view(module_name: str, x: Any, feature_axes: tuple[int, ...],
                       mask: Array | None, *, warn: bool):
  """``(x, feature_axes, mask, undo)`` for the core's ``instance_norm``.

  When ``x`` has no axis to reduce over (rank 2, or every axis but the first
  is a feature axis), Flax normalizes each value with itself and returns
  ``bias``; a singleton spatial axis gives the core the same computation.
  ``undo`` maps the core's output back to the shape of ``x``.

  Each value is then its own statistics group, so a ``mask`` has nothing to
  select and is dropped: every entry gives ``bias`` (Flax gives NaN, 0/0, at
  masked-out entries; README, "Differences from Flax").
  """
  if any(a not in feature_axes for a in range(1, x.ndim)):
    return x, feature_axes, mask, lambda y: y
  if warn:
    warnings.warn(
        f"{module_name}: `x` of shape {tuple(x.shape)} has no axis to "
        "normalize over besides the batch axis and the feature axes "
        f"{feature_axes}, so each value is its own mean and the output is just "
        "`bias` (as in Flax). Give `x` a spatial axis, e.g. "
        "`x[:, None]`, or use LayerNorm/BatchNorm for (batch, features) "
        "inputs.", UserWarning, stacklevel=4)
  if mask is not None:
    with module_errors(module_name):
      checks.check_mask(mask, x)
  return (jnp.expand_dims(x, 1), tuple(a + 1 for a in feature_axes), None,
          lambda y: y[:, 0])


def resolve_groups(module_name: str, num_features: int, num_groups: int | None,
                   group_size: int | None, *, what: str = "features") -> int:
  """The number of groups, with Flax's errors (and jaxnorm's detail).

  ``what`` is the word Flax's message uses for the channels ("channels" in
  linen, "features" in nnx).
  """
  if (num_groups is None) == (group_size is None):
    raise ValueError(
        f"{module_name}: {FLAX_GROUPS_BOTH} Got num_groups={num_groups!r} and "
        f"group_size={group_size!r}.")
  if group_size is not None:
    with module_errors(module_name):
      group_size = checks.check_positive_int("group_size", group_size)
    if num_features % group_size:
      raise ValueError(
          f"{module_name}: Number of {what} ({num_features}) is not multiple "
          f"of the group size ({group_size}). Pass `group_size=` a divisor of "
          f"{num_features}.")
    return num_features // group_size
  with module_errors(module_name):
    num_groups = checks.check_positive_int("num_groups", num_groups)
  if num_features % num_groups:
    raise ValueError(
        f"{module_name}: Number of groups ({num_groups}) does not divide the "
        f"number of channels ({num_features}). Pass `num_groups=` a divisor of "
        f"{num_features}, or `group_size=` with `num_groups=None`.")
  return num_groups


def check_group_reduction_axes(module_name: str, x: Any,
                               reduction_axes: Any) -> tuple[int, ...] | None:
  """Group norm's ``reduction_axes`` read as Flax reads them (None stays
  None); it must include the channel axis (Flax's error when left out)."""
  if reduction_axes is None:
    return None
  axes = canonical_axes(module_name, "reduction_axes", reduction_axes, x.ndim)
  if x.ndim - 1 not in axes:
    raise ValueError(
        f"{module_name}: The reduction axes must include the final dimension as "
        f"this is assumed to be the feature axis. Got `reduction_axes`="
        f"{reduction_axes!r} for `x` of shape {tuple(x.shape)}.")
  return axes


def check_dropout_rate(module_name: str, rate: Any) -> None:
  """A concrete dropout ``rate`` must be in [0, 1] (1 gives zeros, as in Flax)."""
  with module_errors(module_name):
    r = checks.check_real_scalar("rate", rate)
  if r is not None and not 0.0 <= r <= 1.0:
    raise ValueError(
        f"{module_name}: `rate` is the probability of dropping a unit and must "
        f"be in [0, 1], got {rate}.")


def shape_tuple(module_name: str, num_features: int | Sequence[int], *,
                allow_zero: bool = False) -> tuple[int, ...]:
  """``num_features`` (an int or a tuple of ints) as a shape, checked as the
  core checks it; ``allow_zero`` accepts zero sizes, as Flax's modules do."""
  with module_errors(module_name):
    return checks.feature_shape("num_features", num_features,
                                allow_zero=allow_zero)


def dropout(module_name: str, key: Any, inputs: Any, rate: float,
            broadcast_dims: Any) -> Any:
  """The Dropout modules' training call: ``broadcast_dims`` read as Flax reads
  it (any iterable, an axis named twice counts once), errors prefixed with the
  module's name."""
  dims = canonical_axes(module_name, "broadcast_dims", broadcast_dims, jnp.ndim(inputs))
  with module_errors(module_name):
    return dropout_lib.dropout(key, inputs, rate, train=True, broadcast_dims=dims)
