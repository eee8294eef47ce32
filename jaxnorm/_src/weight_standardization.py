"""Weight standardization (Qiao et al., 2019) and its scaled form (Brock et al., 2021).

Both reparametrize a kernel so that each output unit's incoming weights have
zero mean and a fixed variance: the kernel is standardized over its fan-in
(every axis but the output axis) before the layer uses it. Combined with group
norm (BiT's StdConv + GN) it trains at batch sizes where batch norm fails;
the scaled form keeps activations at unit variance without any activation
normalization (NF-ResNets, NFNets).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxnorm._src import checks
from jaxnorm._src.moments import centered_moments

# Brock et al. (2021a), Table 1 / Appendix D: the gain that restores unit
# variance after each nonlinearity applied to a unit Gaussian input,
# gamma = 1 / sqrt(Var[g(z)]), z ~ N(0, 1).
NONLINEARITY_GAINS = {
    "identity": 1.0,
    "relu": math.sqrt(2.0 / (1.0 - 1.0 / math.pi)),
    "gelu": 1.7015043497085571,
    "silu": 1.7881293296813965,
    "tanh": 1.5939117670059204,
    "sigmoid": 4.803835391998291,
}


def _setup(kernel, axis, eps):
  checks.check_array("kernel", kernel, allow_complex=False)
  checks.check_min_rank("kernel", kernel, 2, "fan-in axes and an output axis")
  out = checks.normalize_axes("axis", axis, kernel.ndim)
  fan_in_axes = tuple(a for a in range(kernel.ndim) if a not in out)
  checks.check_eps(eps)
  return out, fan_in_axes


def _standardized(kernel, fan_in_axes):
  # The core's moments: exact, float32 or wider, on the kernel's fan-in, and
  # `kernel - mean` as `(kernel - frame) - mean_off`, as the layers form it.
  # `kernel - float32(mean)` carried the mean's rounding into every output:
  # a kernel of 1e5 + randn (3x3x32x16) was off by 4e-3 (2.9e-5 at 1e3, 4.8e-4
  # at 1e4); it is now within 1e-6 of float64, its gradient too.
  return centered_moments(kernel, fan_in_axes)


def weight_standardization(
    kernel: ArrayLike, *, axis: int | tuple[int, ...] = -1, eps: float = 1e-6
) -> jax.Array:
  """Weight standardization (Qiao, Wang, Liu, Shen & Yuille, 2019, Eq. 5-6).

  For each output unit ``i`` (an index of ``axis``) with fan-in ``I`` (the
  product of the other axes)::

    W_hat[i] = (W[i] - mean(W[i])) / sqrt(var(W[i]) + eps)

  with the biased variance. A Dense kernel is ``(in, out)`` and a Conv kernel
  ``(kh, kw, in, out)``, both with ``axis=-1``.

  Args:
    kernel: rank >= 2, floating point.
    axis: the output axis or axes, kept; statistics run over the others.
    eps: added to the variance, > 0 (``1e-6``; BiT uses ``1e-10``).

  Returns:
    The standardized kernel, with the shape and dtype of ``kernel``.

  >>> import jax, jax.numpy as jnp, jaxnorm
  >>> w = 3.0 + jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
  >>> v = jaxnorm.weight_standardization(w)
  >>> bool(jnp.abs(v.mean((0, 1, 2))).max() < 1e-5)
  True
  >>> bool(jnp.abs(v.std((0, 1, 2)) - 1).max() < 1e-4)
  True
  """
  _, fan_in_axes = _setup(kernel, axis, eps)
  kernel = jnp.asarray(kernel)
  centered, var = _standardized(kernel, fan_in_axes)
  return (centered * jax.lax.rsqrt(var + eps)).astype(kernel.dtype)


def scaled_weight_standardization(
    kernel: ArrayLike,
    gain: ArrayLike | None = None,
    *,
    axis: int | tuple[int, ...] = -1,
    gamma: float | str = 1.0,
    eps: float = 1e-4,
) -> jax.Array:
  """Scaled weight standardization (Brock, De & Smith, 2021, Eq. 2).

  For each output unit ``i`` with fan-in ``N``::

    W_hat[i] = gain[i] * gamma * (W[i] - mean(W[i])) / sqrt(max(N * var(W[i]), eps))

  i.e. the paper's ``gamma * (W - mu) / (sigma * sqrt(N))``, with the
  ``max(., eps)`` of the authors' NFNets code guarding constant rows. With
  ``gamma`` the nonlinearity's gain, a layer followed by that nonlinearity
  maps unit-variance inputs to unit-variance outputs at initialization.

  Args:
    kernel: rank >= 2, floating point.
    gain: optional learned gain of the shape of ``kernel`` along ``axis``
      (``(out,)`` for Dense/Conv kernels), initialized to ones.
    axis: the output axis or axes.
    gamma: a number, or the name of a nonlinearity in
      ``NONLINEARITY_GAINS`` (``"relu"`` gives ``sqrt(2 / (1 - 1/pi))``).
    eps: lower bound of ``N * var``, > 0.

  Returns:
    The scaled standardized kernel, with the dtype of ``kernel`` (and ``gain``).

  >>> import jax, jax.numpy as jnp, jaxnorm
  >>> w = jax.random.normal(jax.random.key(0), (64, 32))
  >>> v = jaxnorm.scaled_weight_standardization(w)
  >>> x = jax.random.normal(jax.random.key(1), (4096, 64))
  >>> round(float((x @ v).var()), 1)                    # unit variance out
  1.0
  """
  out, fan_in_axes = _setup(kernel, axis, eps)
  kernel = jnp.asarray(kernel)
  if isinstance(gamma, str):
    if gamma not in NONLINEARITY_GAINS:
      raise ValueError(
          f"`gamma` must be a number or one of {sorted(NONLINEARITY_GAINS)}, "
          f"got {gamma!r}."
      )
    gamma = NONLINEARITY_GAINS[gamma]
  elif not isinstance(gamma, numbers.Real) or isinstance(gamma, bool):
    raise TypeError(
        f"`gamma` must be a number or the name of a nonlinearity, got {gamma!r}."
    )
  out_shape = tuple(kernel.shape[a] for a in out)
  out_dtype = kernel.dtype
  if gain is not None:
    checks.check_array("gain", gain, allow_complex=False)
    gain = jnp.asarray(gain)
    if tuple(gain.shape) != out_shape:
      raise ValueError(
          f"`gain` must have the shape of `kernel` along `axis`, {out_shape}, "
          f"got {tuple(gain.shape)}."
      )
    out_dtype = jnp.result_type(kernel.dtype, gain.dtype)
  fan_in = math.prod(kernel.shape[a] for a in fan_in_axes)
  centered, var = _standardized(kernel, fan_in_axes)
  scale = gamma * jax.lax.rsqrt(jnp.maximum(fan_in * var, eps))
  if gain is not None:
    bshape = tuple(kernel.shape[a] if a in out else 1 for a in range(kernel.ndim))
    scale = scale * gain.reshape(bshape).astype(scale.dtype)
  return (centered * scale).astype(out_dtype)
