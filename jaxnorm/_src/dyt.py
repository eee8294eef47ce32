"""Dynamic Tanh (Zhu, Chen, He, LeCun & Liu, 2025, "Transformers without Normalization").

DyT replaces a layer norm by an element-wise squashing with a learned
temperature: no statistics, no reduction, the same computation for every
example, position and batch size.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from jaxnorm._src import checks
from jaxnorm._src.layer_norm import layer_norm_init


def dyt_init(
    num_features: int | tuple[int, ...],
    *,
    alpha: float = 0.5,
    dtype: DTypeLike = jnp.float32,
    use_scale: bool = True,
    use_bias: bool = True,
) -> dict[str, jax.Array]:
  """Returns ``{"alpha": alpha, "scale": ones, "bias": zeros}`` for :func:`dyt`.

  ``alpha`` is a scalar (the paper's default 0.5; its Table 11 lowers it for
  wider or deeper models); ``scale`` and ``bias`` have shape ``num_features``
  (an int, or a tuple for several feature axes), each only if enabled.

  >>> import jaxnorm
  >>> p = jaxnorm.dyt_init(3)
  >>> sorted(p), float(p["alpha"]), p["scale"].shape
  (['alpha', 'bias', 'scale'], 0.5, (3,))
  """
  if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
    raise TypeError(f"`alpha` must be a real number, got {alpha!r}.")
  params = {"alpha": jnp.asarray(alpha, dtype)}
  params.update(layer_norm_init(num_features, dtype=dtype, use_scale=use_scale,
                                use_bias=use_bias))
  return params


def dyt(
    params: dict[str, ArrayLike],
    x: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    dtype: DTypeLike | None = None,
) -> jax.Array:
  """Dynamic Tanh (Zhu et al., 2025, Algorithm 1): ``y = scale * tanh(alpha * x) + bias``.

  ``alpha`` is a learned scalar; ``scale`` and ``bias`` run along ``axis``
  (the features, as a layer norm's parameters do). Element-wise: no statistics
  over any axis, so any batch size, masking or padding leaves the other
  entries unchanged. Low-precision inputs are computed in float32.

  Args:
    params: ``{"alpha": (), "scale": x.shape[axis], "bias": x.shape[axis]}``;
      ``alpha`` is required, a missing ``scale``/``bias`` turns it off.
    x: input of rank >= 1, floating point.
    axis: the feature axis or axes of ``scale`` and ``bias``.
    dtype: output dtype (default: ``x``, ``scale`` and ``bias`` promoted).

  Returns:
    ``y`` with the shape of ``x``.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> y = jaxnorm.dyt(jaxnorm.dyt_init(2), jnp.array([[0.0, 4.0]]))
  >>> np.asarray(y, float).round(4).tolist()
  [[0.0, 0.964]]
  """
  checks.check_array("x", x, allow_complex=False)
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError("`x` must have at least 1 dimension, got a scalar.")
  if not isinstance(params, Mapping) or "alpha" not in params:
    raise ValueError(
        "`params` must be a dict with an 'alpha' entry (build it with "
        f"`dyt_init`), got {params!r}."
    )
  alpha = params["alpha"]
  checks.check_array("params['alpha']", alpha, allow_complex=False)
  alpha = jnp.asarray(alpha)
  if jnp.ndim(alpha) != 0:
    raise ValueError(
        f"`params['alpha']` must be a scalar, got shape {tuple(jnp.shape(alpha))}."
    )
  features = checks.normalize_axes("axis", axis, x.ndim)
  fshape = tuple(x.shape[a] for a in features)
  affine = checks.check_params(
      {k: v for k, v in params.items() if k != "alpha"}, fshape,
      ("scale", "bias"), f"along axis {axis}")
  out_dtype = checks.result_dtype(x, affine, dtype)
  bshape = tuple(x.shape[a] if a in features else 1 for a in range(x.ndim))
  compute = jnp.promote_types(jnp.result_type(x.dtype, out_dtype), jnp.float32)
  y = jnp.tanh(alpha.astype(compute) * x.astype(compute))
  if "scale" in affine:
    y = y * affine["scale"].reshape(bshape).astype(compute)
  if "bias" in affine:
    y = y + affine["bias"].reshape(bshape).astype(compute)
  return y.astype(out_dtype)
