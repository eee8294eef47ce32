"""Argument validation shared by every layer.

Every check runs at trace time (on shapes, dtypes and Python numbers), so a bad
call fails before anything is compiled. Messages are full sentences that name
the argument, what was expected and what was given.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete_number(value) -> bool:
  if isinstance(value, numbers.Number):
    return True
  if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0:
    return True
  return False


def check_array(name: str, x, *, allow_complex: bool = True) -> None:
  """`x` must be a floating-point (or complex) array."""
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


def check_min_rank(name: str, x, min_ndim: int, what: str) -> None:
  if x.ndim < min_ndim:
    raise ValueError(
        f"`{name}` must have at least {min_ndim} dimensions ({what}), got shape "
        f"{tuple(x.shape)} with {x.ndim}."
    )


def check_eps(eps, name: str = "eps") -> None:
  if _is_concrete_number(eps):
    if not (float(np.real(eps)) > 0.0):
      raise ValueError(f"`{name}` must be > 0, got {eps}.")


def check_momentum(momentum, name: str = "momentum") -> None:
  if _is_concrete_number(momentum):
    m = float(momentum)
    if not (0.0 <= m <= 1.0):
      raise ValueError(f"`{name}` must be in [0, 1], got {momentum}.")


def normalize_axes(name: str, axis, ndim: int) -> tuple[int, ...]:
  """Turns an int or a sequence of ints into sorted non-negative axes."""
  if isinstance(axis, (numbers.Integral, np.integer)):
    axes = (int(axis),)
  elif isinstance(axis, Sequence) and all(
      isinstance(a, (numbers.Integral, np.integer)) for a in axis
  ):
    axes = tuple(int(a) for a in axis)
  else:
    raise TypeError(f"`{name}` must be an int or a sequence of ints, got {axis!r}.")
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


def check_mask(mask, x, name: str = "mask") -> None:
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


def check_params(
    params, expected_shape: tuple[int, ...], allowed: Sequence[str], where: str
) -> dict:
  """Validates a params dict: known keys, float dtypes, the features' shape.

  Returns the dict (``{}`` for ``None``). A missing key means that term is off.
  """
  if params is None:
    return {}
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
  for key in allowed:
    if key in params and params[key] is not None:
      value = params[key]
      check_array(f"params['{key}']", value)
      if tuple(value.shape) != tuple(expected_shape):
        raise ValueError(
            f"`x` has features of shape {tuple(expected_shape)} {where} but "
            f"`params['{key}']` has shape {tuple(value.shape)}; pass `axis=` to "
            f"choose the feature axis."
        )
  return {k: v for k, v in params.items() if v is not None}


def check_state(state, expected_shape: tuple[int, ...], where: str) -> None:
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
  for key in ("mean", "var"):
    value = state[key]
    check_array(f"state['{key}']", value, allow_complex=(key == "mean"))
    if tuple(value.shape) != tuple(expected_shape):
      raise ValueError(
          f"`x` has features of shape {tuple(expected_shape)} {where} but "
          f"`state['{key}']` has shape {tuple(value.shape)}; pass `axis=` to "
          f"choose the feature axis."
      )


def check_positive_int(name: str, value) -> int:
  if not isinstance(value, (numbers.Integral, np.integer)) or isinstance(value, bool):
    raise TypeError(f"`{name}` must be a positive int, got {value!r}.")
  if value <= 0:
    raise ValueError(f"`{name}` must be a positive int, got {value}.")
  return int(value)


def result_dtype(x, params: Mapping, dtype):
  """Flax's rule: the output follows `x`, `scale` and `bias` together."""
  if dtype is not None:
    return jnp.dtype(dtype)
  args = [x] + [params[k] for k in ("scale", "bias") if k in params]
  return jnp.result_type(*[a.dtype for a in args])


def tree_is_concrete(tree) -> bool:
  return all(not isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))
