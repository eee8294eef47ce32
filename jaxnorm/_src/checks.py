"""Argument validation shared by every layer.

Every check runs at trace time, on shapes, dtypes and concrete values, so a bad
call fails before anything is compiled. Messages are full sentences that name
the argument, what was expected and what was given.

Hyperparameters (``eps``, ``momentum``, ``rate``, ``train``...) are checked by
value whenever the value is known at trace time: a Python number, a NumPy
scalar or 0-d array, or a concrete (non-traced) 0-d ``jax.Array`` such as
``jnp.float32(1e-5)`` closed over by a jitted function. A traced value is only
checked for its type and shape, since its value is unknown until run time.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import TypeGuard
from typing import overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jax.typing import DTypeLike

#: A Python scalar as returned by :func:`concrete_value`.
Scalar = bool | int | float | complex

#: The keys a batch-norm ``state`` may hold (``num_batches_tracked`` comes
#: from :func:`jaxnorm.interop.from_torch`).
BATCH_NORM_STATE_KEYS: tuple[str, ...] = ("mean", "var", "num_batches_tracked")


def is_traced(value: Any) -> bool:
  """Whether ``value`` is a tracer (its value is unknown at trace time)."""
  return isinstance(value, jax.core.Tracer)


def concrete_value(value: Any) -> Scalar | None:
  """The Python scalar behind a number known at trace time, else None.

  Args:
    value: a Python number, a NumPy scalar or 0-d array, or a 0-d
      ``jax.Array`` that is not a tracer.

  Returns:
    ``bool`` for booleans, ``int`` for integers, ``float`` for real floats and
    ``complex`` for complex numbers; None when ``value`` is traced or is not a
    scalar number at all (a string, a list, an array with dimensions...).
  """
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, np.generic):
    return _python_scalar(np.asarray(value))
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, numbers.Complex):
    return complex(value)
  if is_traced(value):
    return None
  if isinstance(value, (np.ndarray, jax.Array)) and value.ndim == 0:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      return None
    return _python_scalar(np.asarray(value))
  return None


def _python_scalar(a: np.ndarray) -> Scalar | None:
  kind = a.dtype.kind
  if kind == "b":
    return bool(a)
  if kind in "iu":
    return int(a)
  if kind == "f":
    return float(a)
  if kind == "c":
    return complex(a)
  return None


def is_concrete_number(value: Any) -> bool:
  """Whether ``value`` is a scalar number known at trace time."""
  return concrete_value(value) is not None


# The former private name, still used by some callers.
_is_concrete_number = is_concrete_number


def _describe(value: Any) -> str:
  """``value`` for an error message: its type, and its value when short."""
  if is_traced(value):
    return f"a traced value of dtype {value.dtype} and shape {tuple(value.shape)}"
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    if value.ndim == 0:
      return f"{format_value(value)} of dtype {value.dtype}"
    return f"an array of dtype {value.dtype} and shape {tuple(value.shape)}"
  return f"{type(value).__name__} {value!r}"


def format_value(value: Any) -> str:
  """A concrete scalar as the user wrote it (``0.1``, not ``0.10000000149``)."""
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return str(np.asarray(value)[()])
  return str(value)


def check_real_scalar(name: str, value: Any) -> float | None:
  """Checks that ``value`` is a real scalar; its value, or None when traced.

  Raises:
    TypeError: a bool, a complex number, a non-number or an array with
      dimensions.
  """
  dtype = getattr(value, "dtype", None)
  shape = getattr(value, "shape", None)
  if dtype is not None and shape is not None:  # NumPy or JAX, maybe traced
    ok = tuple(shape) == () and (jnp.issubdtype(dtype, jnp.integer)
                                 or jnp.issubdtype(dtype, jnp.floating))
  else:
    ok = (isinstance(value, numbers.Real)
          and not isinstance(value, (bool, np.bool_)))
  if not ok:
    raise TypeError(f"`{name}` must be a real number, got {_describe(value)}.")
  # A real number's concrete value is an int or a float (bools and complex are refused above).
  v = concrete_value(value)
  return float(v) if isinstance(v, (int, float)) else None


def check_eps(eps: ArrayLike, name: str = "eps") -> None:
  """``eps`` must be a real, finite number > 0 (checked when concrete).

  Raises:
    TypeError: ``eps`` is not a real scalar (a string, a bool, an array).
    ValueError: a concrete ``eps`` that is inf, NaN or <= 0.
  """
  v = check_real_scalar(name, eps)
  if v is None:
    return
  if not math.isfinite(v):
    raise ValueError(f"`{name}` must be a finite number > 0, got {format_value(eps)}.")
  if not v > 0.0:
    raise ValueError(f"`{name}` must be > 0, got {format_value(eps)}.")


def check_momentum(momentum: ArrayLike, name: str = "momentum") -> None:
  """``momentum`` must be a real number in [0, 1] (checked when concrete).

  Raises:
    TypeError: ``momentum`` is not a real scalar.
    ValueError: a concrete ``momentum`` outside [0, 1], or NaN.
  """
  v = check_real_scalar(name, momentum)
  if v is not None and not 0.0 <= v <= 1.0:
    raise ValueError(f"`{name}` must be in [0, 1], got {format_value(momentum)}.")


def check_at_least(name: str, value: ArrayLike, low: float) -> None:
  """A real ``value`` must be >= ``low`` (checked when concrete).

  For bounds such as ``r_max >= 1``, ``d_max >= 0`` or a weight norm's
  ``eps >= 0``; ``inf`` passes.

  Raises:
    TypeError: ``value`` is not a real scalar.
    ValueError: a concrete ``value`` below ``low``, or NaN.
  """
  v = check_real_scalar(name, value)
  if v is not None and not v >= low:
    raise ValueError(f"`{name}` must be >= {low}, got {format_value(value)}.")


def check_train(name: str, value: Any) -> bool:
  """``value`` must be a Python bool or a concrete boolean scalar.

  ``train`` picks which computation is traced (batch statistics or running
  averages, dropout or not), so it must be known at trace time.

  Returns:
    ``value`` as a Python bool.

  Raises:
    TypeError: a traced value (with how to make it static), or anything but a
      boolean (``"no"``, ``1``, None).
  """
  if is_traced(value):
    raise TypeError(
        f"`{name}` must be a Python bool known at trace time, because it "
        f"selects the code path, but it is {_describe(value)}; make it static, "
        f"for example with `jax.jit(f, static_argnames='{name}')`, or close "
        "over it."
    )
  dtype = getattr(value, "dtype", None)
  is_bool = isinstance(value, (bool, np.bool_)) or (
      dtype is not None and dtype == jnp.bool_ and np.ndim(value) == 0)
  if not is_bool:
    raise TypeError(f"`{name}` must be a Python bool, got {_describe(value)}.")
  return bool(concrete_value(value))


@overload
def check_float_dtype(name: str, dtype: None, *, allow_complex: bool = ...) -> None: ...
@overload
def check_float_dtype(name: str, dtype: DTypeLike, *, allow_complex: bool = ...) -> np.dtype: ...
@overload
def check_float_dtype(name: str, dtype: DTypeLike | None, *,
                      allow_complex: bool = ...) -> np.dtype | None: ...
def check_float_dtype(
    name: str, dtype: DTypeLike | None, *, allow_complex: bool = True
) -> np.dtype | None:
  """``dtype`` must be None or a floating-point (or complex) dtype.

  An integer or bool output dtype would round normalized values, which mostly
  lie in (-3, 3), to a handful of integers.

  Returns:
    ``jnp.dtype(dtype)``, or None for None.

  Raises:
    TypeError: an integer, bool or unknown dtype (complex too unless
      ``allow_complex``).
  """
  if dtype is None:
    return None
  kinds = "floating-point or complex" if allow_complex else "floating-point"
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    dt = None
  family = jnp.inexact if allow_complex else jnp.floating
  if dt is None or not jnp.issubdtype(dt, family):
    shown = repr(dtype) if dt is None else str(dt)
    raise TypeError(
        f"`{name}` must be None or a {kinds} dtype such as jnp.float32, got "
        f"{shown}; an integer or bool dtype would round the normalized "
        "values."
    )
  return dt


def check_array(name: str, x: Any, *, allow_complex: bool = True) -> None:
  """``x`` must be an array with a floating-point (or complex) dtype.

  Raises:
    TypeError: not an array (a list, a Python number), or an integer or bool
      dtype.
  """
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    raise TypeError(
        f"`{name}` must be an array, got an object of type {type(x).__name__}."
    )
  if allow_complex:
    ok = jnp.issubdtype(dtype, jnp.inexact)
  else:
    ok = jnp.issubdtype(dtype, jnp.floating)
  if not ok:
    kinds = "floating-point or complex" if allow_complex else "floating-point"
    raise TypeError(
        f"`{name}` must have a {kinds} dtype, got {dtype}; cast it first, "
        f"for example `{name}.astype(jnp.float32)`."
    )


def check_min_rank(name: str, x: jax.Array, min_ndim: int,
                   what: str | None = None) -> None:
  """``x`` must have at least ``min_ndim`` dimensions.

  ``what`` says what the dimensions are for; without it, a scalar given where
  one dimension is needed gets "... at least 1 dimension, got a scalar."

  Raises:
    ValueError: too few dimensions.
  """
  if x.ndim >= min_ndim:
    return
  if what is None:
    plural = "" if min_ndim == 1 else "s"
    got = "a scalar" if x.ndim == 0 else f"shape {tuple(x.shape)}"
    raise ValueError(
        f"`{name}` must have at least {min_ndim} dimension{plural}, got {got}."
    )
  raise ValueError(
      f"`{name}` must have at least {min_ndim} dimensions ({what}), got shape "
      f"{tuple(x.shape)} with {x.ndim}."
  )


def _is_int(value: Any) -> TypeGuard[numbers.Integral | np.integer]:
  """A Python or NumPy integer; bools are not integers here."""
  return (isinstance(value, (numbers.Integral, np.integer))
          and not isinstance(value, (bool, np.bool_)))


is_int = _is_int


def normalize_axes(name: str, axis: int | Sequence[int],
                   ndim: int) -> tuple[int, ...]:
  """Turns an int or a sequence of ints into sorted non-negative axes.

  Raises:
    TypeError: not an int or a sequence of ints (bools are rejected: ``True``
      is not axis 1).
    ValueError: an axis out of range, or the same axis twice.
  """
  axes: tuple[int, ...]
  if _is_int(axis):
    axes = (int(axis),)
  elif (isinstance(axis, Sequence) and not isinstance(axis, str)
        and all(_is_int(a) for a in axis)):
    axes = tuple(int(a) for a in axis)
  else:
    if isinstance(axis, (bool, np.bool_)) or (
        isinstance(axis, Sequence) and not isinstance(axis, str)
        and any(isinstance(a, (bool, np.bool_)) for a in axis)):
      hint = "; a bool is not an axis number"
    else:
      hint = ""
    raise TypeError(
        f"`{name}` must be an int or a sequence of ints, got {axis!r}{hint}."
    )
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"`{name}`={axis!r} is out of range for an input with {ndim} "
          f"dimensions; expected values in [{-ndim}, {ndim - 1}]."
      )
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"`{name}`={axis!r} names the same axis twice.")
  return tuple(sorted(out))


def check_mask(mask: Any, x: jax.Array, name: str = "mask") -> None:
  """``mask`` must be None or a boolean array that broadcasts to ``x``.

  Raises:
    TypeError: not a boolean array.
    ValueError: a shape that does not broadcast to ``x``'s.
  """
  if mask is None:
    return
  dtype = getattr(mask, "dtype", None)
  if dtype is None or dtype != jnp.bool_:
    raise TypeError(
        f"`{name}` must be a boolean array, got "
        f"{'dtype ' + str(dtype) if dtype is not None else type(mask).__name__}; "
        f"use for example `{name} = lengths_mask > 0`."
    )
  try:
    shape = jnp.broadcast_shapes(tuple(mask.shape), tuple(x.shape))
  except ValueError:
    shape = None
  if shape != tuple(x.shape):
    raise ValueError(
        f"`{name}` of shape {tuple(mask.shape)} does not broadcast to the shape "
        f"of `x`, {tuple(x.shape)}."
    )


def check_param_keys(params: Any, allowed: Collection[str]) -> None:
  """``params`` must be a dict whose keys are among ``allowed`` (any may be missing).

  Raises:
    TypeError: not a dict.
    ValueError: an unknown key.
  """
  if not isinstance(params, Mapping):
    raise TypeError(
        f"`params` must be a dict with keys among {sorted(allowed)}, got "
        f"{type(params).__name__}."
    )
  unknown = sorted(set(params) - set(allowed))
  if unknown:
    raise ValueError(
        f"`params` has unexpected keys {unknown}; expected keys among "
        f"{sorted(allowed)} (a missing key turns that term off)."
    )


def check_params(
    params: Mapping[str, Any] | None,
    expected_shape: tuple[int, ...],
    allowed: Sequence[str],
    where: str,
    *,
    hint: str = "pass `axis=` to choose the feature axis",
    subject: str = "`x`",
    allow_complex: bool = True,
) -> dict[str, jax.Array]:
  """Validates a params dict: known keys, float dtypes, the features' shape.

  ``where`` says where ``subject``'s features are (``"along axis -1"``) and
  ``hint`` how the caller's layer chooses them; all three go into the shape
  error.

  Returns:
    The dict without None values (``{}`` for ``None``). A missing key means
    that term is off.

  Raises:
    TypeError: not a dict, or a value that is not a float array.
    ValueError: an unknown key, or a shape other than ``expected_shape``.
  """
  if params is None:
    return {}
  check_param_keys(params, allowed)
  for key in allowed:
    if key in params and params[key] is not None:
      value = params[key]
      check_array(f"params['{key}']", value, allow_complex=allow_complex)
      if tuple(value.shape) != tuple(expected_shape):
        raise ValueError(
            f"{subject} has features of shape {tuple(expected_shape)} {where} but "
            f"`params['{key}']` has shape {tuple(value.shape)}; {hint}."
        )
  return {k: v for k, v in params.items() if v is not None}


def check_state_keys(state: Mapping[str, Any], allowed: Collection[str]) -> None:
  """``state`` may hold only the keys in ``allowed``.

  Raises:
    ValueError: unknown keys (listed, sorted), which would otherwise be passed
      through untouched.
  """
  unknown = sorted(set(state) - set(allowed))
  if unknown:
    raise ValueError(
        f"`state` has unexpected keys {unknown}; expected keys among "
        f"{sorted(allowed)}."
    )


def check_state(
    state: Mapping[str, Any],
    expected_shape: tuple[int, ...],
    where: str,
    *,
    allowed: Collection[str] = BATCH_NORM_STATE_KEYS,
    hint: str = "pass `axis=` to choose the feature axis",
    subject: str = "`x`",
    allow_complex: bool = True,
) -> None:
  """A batch-norm state: a dict with 'mean' and 'var' of the features' shape.

  ``where``, ``hint`` and ``subject`` are as in :func:`check_params`;
  ``allow_complex`` allows a complex mean (a complex batch norm's).

  Raises:
    TypeError: not a dict, or values that are not float arrays (complex
      allowed for the mean).
    ValueError: a missing or unknown key (``allowed``), or a wrong shape.
  """
  if not isinstance(state, Mapping):
    raise TypeError(
        "`state` must be a dict with keys 'mean' and 'var', got "
        f"{type(state).__name__}."
    )
  missing = [k for k in ("mean", "var") if k not in state]
  if missing:
    raise ValueError(
        f"`state` is missing {missing}; it must hold 'mean' and 'var' (build "
        f"it with `batch_norm_init`), got keys {sorted(state)}."
    )
  check_state_keys(state, allowed)
  for key in ("mean", "var"):
    value = state[key]
    check_array(f"state['{key}']", value, allow_complex=allow_complex and key == "mean")
    if tuple(value.shape) != tuple(expected_shape):
      raise ValueError(
          f"{subject} has features of shape {tuple(expected_shape)} {where} but "
          f"`state['{key}']` has shape {tuple(value.shape)}; {hint}."
      )


def check_positive_int(name: str, value: Any) -> int:
  """``value`` must be an int > 0 known at trace time (it sets a shape).

  NumPy integers and concrete 0-d integer arrays count as ints; bools,
  floats, strings and traced values do not.

  Returns:
    ``value`` as a Python int.

  Raises:
    TypeError: not an int.
    ValueError: an int <= 0.
  """
  v = concrete_value(value)
  if not isinstance(v, int) or isinstance(v, bool):
    hint = ("; it sets a shape, so it must be known at trace time"
            if is_traced(value) else "")
    raise TypeError(
        f"`{name}` must be a positive int, got {_describe(value)}{hint}.")
  if v <= 0:
    raise ValueError(f"`{name}` must be a positive int, got {v}.")
  return v


def feature_shape(name: str, num_features: Any, *,
                  allow_zero: bool = False) -> tuple[int, ...]:
  """The features' shape from an int or a tuple (or list) of ints.

  ``allow_zero`` accepts sizes of 0 (the Flax modules build zero-feature
  layers, as Flax does); the functional core keeps refusing them.

  Raises:
    TypeError: anything else: a string such as ``"4"``, a bool, a float.
    ValueError: a size <= 0 (< 0 with ``allow_zero``).
  """
  shape: tuple[int, ...]
  if _is_int(num_features):
    shape = (int(num_features),)
  elif (isinstance(num_features, (tuple, list))
        and all(_is_int(n) for n in num_features)):
    shape = tuple(int(n) for n in num_features)
  else:
    raise TypeError(
        f"`{name}` must be an int or a tuple of ints, got {num_features!r}."
    )
  if allow_zero and any(n < 0 for n in shape):
    raise ValueError(f"`{name}` must be non-negative, got {num_features!r}.")
  if not allow_zero and any(n <= 0 for n in shape):
    raise ValueError(f"`{name}` must be positive, got {num_features!r}.")
  return shape


def check_virtual_batch_size(
    value: Any,
    *,
    batch_size: int | None = None,
    batch_axis: int = 0,
    values_per_example: int = 1,
) -> int:
  """Ghost batch norm's chunk size: an int >= 2 that divides the batch.

  A chunk must hold more than one value per feature, or its variance is
  zero and every output is ``bias``. With ``values_per_example`` > 1 (the
  values each example adds per feature, e.g. ``H * W`` for images with
  channels as features) a chunk of one example is allowed.

  Args:
    value: the ``virtual_batch_size`` argument.
    batch_size: the length of the batch axis, to check divisibility (skipped
      when None).
    batch_axis: the batch axis, for the message.
    values_per_example: values per feature in one example.

  Returns:
    ``value`` as a Python int.

  Raises:
    TypeError: not an int.
    ValueError: <= 0, chunks with a single value per feature, or a size that
      does not divide ``batch_size``.
  """
  k = check_positive_int("virtual_batch_size", value)
  if k * values_per_example < 2:
    raise ValueError(
        f"`virtual_batch_size`={k} makes chunks of one example, and a chunk of "
        "one example has zero variance (a single value per feature); pass "
        "`virtual_batch_size` >= 2, or None to use the whole batch."
    )
  if batch_size is not None and batch_size % k:
    raise ValueError(
        f"`virtual_batch_size`={k} must divide the batch size, but `x` has "
        f"{batch_size} examples along axis {batch_axis}."
    )
  return k


def result_dtype(x: jax.Array, params: Mapping[str, jax.Array],
                 dtype: DTypeLike | None) -> np.dtype:
  """Flax's rule: the output follows `x`, `scale` and `bias` together.

  An explicit ``dtype`` wins; it must be a floating-point or complex dtype.
  """
  if dtype is not None:
    return check_float_dtype("dtype", dtype)
  args = [x] + [params[k] for k in ("scale", "bias") if k in params]
  return jnp.result_type(*[a.dtype for a in args])
