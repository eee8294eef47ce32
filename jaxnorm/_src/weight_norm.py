"""Weight normalization (with data-dependent init) and spectral normalization.

Both reparametrize a layer's weight rather than its activations:

* weight normalization (Salimans & Kingma 2016, arXiv:1602.07868) writes
  ``w = g * v / ||v||``, with the norm over every axis of ``v`` but the output
  (feature) axes, so the direction ``v`` and the length ``g`` of each output
  unit's weight vector are learned separately;
* spectral normalization (Miyato et al. 2018, arXiv:1802.05957) divides ``w``
  by an estimate ``sigma`` of its largest singular value, obtained by power
  iteration on ``w`` seen as a matrix (every axis but the last flattened into
  rows, as Flax does) with a persistent vector ``u``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike

from jaxnorm._src import checks
from jaxnorm._src import moments as moments_lib


def _feature_axes(axis, ndim: int) -> tuple[int, ...]:
  """`axis` (int, sequence or None) as sorted non-negative feature axes."""
  if axis is None:
    return ()
  return checks.normalize_axes("axis", axis, ndim)


def _check_wn(wn) -> None:
  if not isinstance(wn, Mapping) or "v" not in wn:
    raise TypeError(
        "`wn` must be a dict with key 'v' (and optionally 'g'), built with "
        f"`weight_norm_init`; got {type(wn).__name__}"
        + (f" with keys {sorted(wn)}." if isinstance(wn, Mapping) else ".")
    )
  unknown = sorted(set(wn) - {"v", "g"})
  if unknown:
    raise ValueError(
        f"`wn` has unexpected keys {unknown}; expected 'v' and optionally 'g'."
    )


def _unit_scale(v, reduction_axes, *, eps=0.0, dtype=None):
  """A power of two ``c`` per unit (keepdims) with ``max|v| * c`` in [1/2, 1).

  ``sum(v**2)`` in float32 overflows for entries from about 1e19 and loses
  everything below about 1e-23 (a weight of 1e20 or 1e-25 came out as ~0);
  ``sum((c v)**2)`` lies in [1/4, n) and ``c`` cancels from ``c v / ||c v||``.
  A power of two scales exactly, so where ``v`` needs no scaling the result is
  the unscaled one. ``c`` is 1 where ``v`` is all zeros (or not finite), and a
  constant for differentiation (``v / ||v||`` is the same for every ``c``).
  One more reduction over ``v`` (a weight, not an activation).

  With a (concrete) ``eps`` > 0 the maximum is taken as at least
  ``sqrt(eps)``, so ``eps c**2 <= 1``: where ``eps`` outweighs ``||v||**2``
  it is ``eps c**2``, not ``sum((c v)**2)``, that lies near 1 (without this
  ``eps c**2`` overflowed for ``v`` below about 5e-26 and ``v / sqrt(eps)``
  came out as 0). ``c`` is in ``dtype`` (default: float32 for half-precision
  ``v``, else ``v``'s dtype) and within its range.
  """
  dtype = moments_lib.stat_dtype(v.dtype) if dtype is None else jnp.dtype(dtype)
  m = lax.stop_gradient(jnp.max(jnp.abs(v), axis=reduction_axes, keepdims=True))
  # frexp in float32 at least: JAX's frexp of bfloat16 subnormals gives
  # exponent 0.
  m = m.astype(jnp.promote_types(moments_lib.stat_dtype(m.dtype), dtype))
  if eps:
    m = jnp.maximum(m, math.sqrt(eps))
  _, e = jnp.frexp(m)
  # Subnormal maxima are scaled by at most 2**125 (float32 and bfloat16;
  # 2**1021 float64, 2**13 float16), which keeps `c` and the squares finite;
  # `c * c` may still overflow for eps = 0, see `_inverse_norm`.
  top = jnp.finfo(dtype).maxexp - 3
  e = jnp.clip(e, -top, top)
  return jnp.ldexp(jnp.ones_like(m), -e).astype(dtype)


def _inverse_norm(v, reduction_axes, eps):
  """``(c v, c / sqrt(sum(v**2) + eps))`` over `reduction_axes`, keepdims, with
  ``c`` from :func:`_unit_scale`; the second is 0 where the sum is 0.

  ``c v * (c / ...)`` would round twice; the caller multiplies ``c v`` by
  ``1 / sqrt(sum((c v)**2) + eps c**2)``, the same number.
  """
  # In float32 for half-precision `v` (whose squares' sum overflows float16
  # from 65504 and whose exponents cannot hold `c`), else in `v`'s dtype.
  c = _unit_scale(v, reduction_axes, eps=eps)
  cv = v.astype(c.dtype) * c
  sq = jnp.sum(cv * cv, axis=reduction_axes, keepdims=True)
  if eps:
    # `eps c**2` <= 1 (`c` is scaled for it). Kept out for eps = 0, where
    # `c * c` may overflow (subnormal `v`) and 0 * inf would be NaN.
    sq = sq + eps * c * c
  positive = sq > 0
  # Double `where`: the unused branch sees 1, so gradients stay finite at v = 0.
  return cv, jnp.where(positive, lax.rsqrt(jnp.where(positive, sq, 1)), 0)


def weight_norm_init(w: jax.Array, *, axis: int | Sequence[int] = -1) -> dict[str, jax.Array]:
  """Splits a weight into direction and length: ``{"v": w, "g": ||w||}``.

  Args:
    w: a kernel, e.g. ``(in, out)`` for Dense or ``(H, W, in, out)`` for Conv.
    axis: the output (feature) axis or axes, kept by the norm; the norm runs
      over every other axis. ``None`` keeps no axis (one Frobenius norm).

  Returns:
    ``{"v": w, "g": g}`` with ``g`` of shape ``tuple(w.shape[a] for a in axis)``
    (``(out,)`` for the default), so ``weight_norm(weight_norm_init(w)) == w``.

  >>> import jax.numpy as jnp, jaxnorm
  >>> wn = jaxnorm.weight_norm_init(jnp.array([[3.0, 0.0], [4.0, 2.0]]))
  >>> wn["g"].tolist()
  [5.0, 2.0]
  """
  checks.check_array("w", w)
  feature = _feature_axes(axis, w.ndim)
  reduction = tuple(a for a in range(w.ndim) if a not in feature)
  # Scaled as in `weight_norm` (`_unit_scale`): no overflow or underflow of
  # the squares; dividing by a power of two is exact.
  c = _unit_scale(w, reduction)
  a = jnp.abs(w).astype(c.dtype) * c
  g = jnp.squeeze(jnp.sqrt(jnp.sum(a * a, axis=reduction, keepdims=True)) / c, reduction)
  return {"v": w, "g": g.astype(w.dtype)}


def weight_norm(wn: Mapping[str, jax.Array], *, axis: int | Sequence[int] | None = -1,
                eps: float = 0.0, dtype: DTypeLike | None = None) -> jax.Array:
  """Weight normalization: ``w = g * v / ||v||``.

  The norm is over every axis of ``v`` but ``axis`` (the output axes), so each
  output unit's weight vector has length ``g`` (Salimans & Kingma 2016, eq. 2).

  Args:
    wn: ``{"v": v, "g": g}``; ``v`` is any kernel, ``g`` has the shape of
      ``v`` along ``axis``. Without ``"g"`` the length is 1 (unit vectors).
    axis: int, sequence of ints, or ``None`` (no feature axis: one Frobenius
      norm, ``g`` a scalar).
    eps: added to ``||v||**2`` under the square root. With the default 0, a
      unit whose direction ``v`` is all zeros gets a zero weight and a zero
      (finite) gradient instead of NaN. Flax's ``WeightNorm`` uses 1e-12.
      The norm is taken of ``v`` scaled by a power of two to a maximum of
      about 1 (of about ``sqrt(eps)`` where ``v`` is smaller), so entries of
      any finite magnitude (1e-30 to 1e30 in float32) neither overflow nor
      underflow, and below ``sqrt(eps)`` ``w`` is ``g v / sqrt(eps)``.
    dtype: the output dtype; by default the promoted dtype of ``v`` and ``g``.

  Returns:
    ``w`` with the shape of ``v``.
  """
  _check_wn(wn)
  v = wn["v"]
  checks.check_array("wn['v']", v, allow_complex=False)
  checks.check_at_least("eps", eps, 0)
  feature = _feature_axes(axis, v.ndim)
  reduction = tuple(a for a in range(v.ndim) if a not in feature)
  feature_shape = tuple(v.shape[a] for a in feature)
  cv, inv = _inverse_norm(v, reduction, eps)
  w = cv * inv
  args = [v]
  g = wn.get("g")
  if g is not None:
    checks.check_array("wn['g']", g, allow_complex=False)
    if tuple(g.shape) != feature_shape:
      raise ValueError(
          f"`wn['g']` must have shape {feature_shape} (the shape of `wn['v']` "
          f"along `axis`={axis!r}), got {tuple(g.shape)}."
      )
    broadcast = [1] * v.ndim
    for a in feature:
      broadcast[a] = v.shape[a]
    w = w * g.reshape(broadcast)
    args.append(g)
  out_dtype = jnp.result_type(*args) if dtype is None else dtype
  return w.astype(out_dtype)


def weight_norm_data_init(wn: Mapping[str, jax.Array], t: jax.Array, *, eps: float = 1e-6
                          ) -> tuple[dict[str, jax.Array], jax.Array]:
  """Data-dependent init of weight normalization (Salimans & Kingma 2016, §3).

  Given ``t``, the layer's output on a batch computed with ``weight_norm(wn)``
  and no bias (features on the last axis), returns a new ``g`` and a bias so
  that each pre-activation has zero mean and unit variance on that batch:

      g_new = g / sqrt(var_t + eps),    bias = -mean_t / sqrt(var_t + eps),

  with the mean and (biased) variance over every axis of ``t`` but the last.

  Args:
    wn: ``{"v": v, "g": g}`` as used to compute ``t`` (``g`` may be absent: 1).
    t: the layer's outputs, shape ``(..., out)``.
    eps: added to the variance.

  Returns:
    ``(new_wn, bias)``: ``new_wn`` has the new ``"g"`` (shape ``(out,)``, as
    for ``axis=-1``) and ``bias`` has shape ``(out,)``.
  """
  _check_wn(wn)
  checks.check_array("t", t, allow_complex=False)
  checks.check_min_rank("t", t, 1, "features on the last axis")
  checks.check_eps(eps)
  features = t.shape[-1]
  g = wn.get("g")
  if g is None:
    g = jnp.ones((features,), wn["v"].dtype)
  if tuple(g.shape) != (features,):
    raise ValueError(
        f"`t` has {features} features on its last axis but `wn['g']` has shape "
        f"{tuple(g.shape)}; `t` must be the layer's output with the features "
        "last."
    )
  mean, var = moments_lib.moments(t, tuple(range(t.ndim - 1)))
  inv_std = lax.rsqrt(var + eps)
  new_wn = dict(wn)
  new_wn["g"] = (g * inv_std).astype(g.dtype)
  bias = (-mean * inv_std).astype(t.dtype)
  return new_wn, bias


def _l2_normalize(x, eps):
  """Flax's ``x * rsqrt(sum(x**2) + eps)`` over the last axis.

  ``spectral_norm`` passes ``c W u`` and ``eps c**2`` (the same result as
  ``W u`` and ``eps``), which keeps the sum of squares in range.
  """
  return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def spectral_norm_init(w: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
  """State of spectral normalization: a random unit vector ``u``, ``sigma`` 1.

  Args:
    w: the weight, at least 2-D; its last axis is the matrix's columns.
    key: a PRNG key.

  Returns:
    ``{"u": (w.shape[-1],), "sigma": ()}`` in float32 (float64 for float64 ``w``).
  """
  checks.check_array("w", w, allow_complex=False)
  checks.check_min_rank("w", w, 2, "a matrix, or a kernel whose last axis is "
                        "the output")
  dtype = moments_lib.stat_dtype(w.dtype)
  u = jax.random.normal(key, (w.shape[-1],), dtype)
  u = u / jnp.linalg.norm(u)
  return {"u": u, "sigma": jnp.ones((), dtype)}


def spectral_norm(
    w: jax.Array,
    state: Mapping[str, jax.Array],
    *,
    n_steps: int = 1,
    train: bool = True,
    eps: float = 1e-12,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
  """Spectral normalization: ``w / sigma(w)`` by power iteration.

  ``w`` is viewed as the matrix ``W`` of shape ``(prod(w.shape[:-1]),
  w.shape[-1])`` (Flax's reshape). Starting from ``u = state["u"]``, each of
  the ``n_steps`` steps does ``v = l2n(W u)``, ``u = l2n(W^T v)`` with
  ``l2n(x) = x / sqrt(||x||^2 + eps)``; then ``sigma = v^T W u`` with ``u`` and
  ``v`` under ``stop_gradient`` (Miyato et al. 2018, Algorithm 1). The result
  is ``w / sigma`` (``w`` itself where ``sigma == 0``).

  Args:
    w: the weight, at least 2-D.
    state: ``{"u": (w.shape[-1],), "sigma": ()}`` from ``spectral_norm_init``.
    n_steps: power-iteration steps per call (a positive int).
    train: if True, ``new_state`` holds the new ``u`` and ``sigma``. If False
      (Flax's ``update_stats=False``), the same steps start from the stored
      ``u`` (so the result is deterministic) and ``state`` is returned as is.
    eps: added to the squared norms in ``l2n``. For weights well below
      ``sqrt(eps)`` (1e-6 for the default) it outweighs ``||W u||**2``, and,
      as in Flax, ``u`` and ``v`` shrink each step and ``w / sigma`` is not
      normalized; pass a smaller ``eps`` for such weights.
    dtype: the output dtype; by default the promoted dtype of ``w`` and ``u``.

  The products with ``W`` are taken scaled by a power of two (``eps`` by its
  square), which changes neither ``u``, ``v`` nor the result, so weights
  from 1e-30 to 1e30 (float32) neither overflow nor underflow, gradients
  included.

  Returns:
    ``(w_sn, new_state)``; ``w_sn`` has the shape of ``w``.
  """
  checks.check_array("w", w, allow_complex=False)
  checks.check_min_rank("w", w, 2, "a matrix, or a kernel whose last axis is "
                        "the output")
  n_steps = checks.check_positive_int("n_steps", n_steps)
  checks.check_eps(eps)
  if not isinstance(state, Mapping) or "u" not in state:
    raise TypeError(
        "`state` must be a dict with keys 'u' and 'sigma' built with "
        f"`spectral_norm_init`, got {type(state).__name__}"
        + (f" with keys {sorted(state)}." if isinstance(state, Mapping) else ".")
    )
  u = state["u"]
  if tuple(u.shape) != (w.shape[-1],):
    raise ValueError(
        f"`state['u']` must have shape {(w.shape[-1],)} (the last axis of `w`), "
        f"got {tuple(u.shape)}."
    )
  matrix = w.reshape(-1, w.shape[-1])
  # Scaled by `c`, a power of two bringing max|W| into [1/2, 1)
  # (`_unit_scale`): unscaled, the sums of squares of `W u` overflowed for W
  # ~ 1e20 in float32 (u = v = 0, sigma = 0, W returned unnormalized) and
  # underflowed for W ~ 1e-20 (NaN), and the derivative of `W / sigma`, which
  # has `sigma**-2`, overflows or underflows long before `sigma` does. Each
  # product with W is multiplied by `c` and `eps` by `c**2`, which gives the
  # same `u` and `v` (x / sqrt(|x|**2 + eps) = c x / sqrt(|c x|**2 + eps c**2),
  # Flax's semantics), and `W / sigma` is `W / (c sigma) * c`. A power of two
  # scales exactly, so ordinary weights give the unscaled computation's
  # numbers bit for bit, gradients included (the products and the division
  # are left as they were, `c` applied to their results: scaling `W` itself
  # changed XLA's fusion and the gradients' rounding by up to an ulp; in half
  # precision it is `W c / (c sigma)`, see below).
  dtype_it = jnp.result_type(u, matrix)  # that of `W u`
  # The maximum of the matrix in that dtype: a reduction of the bfloat16 one
  # changed how XLA compiled the products (float32 `u`: up to 35 ulp).
  c = _unit_scale(matrix.astype(dtype_it), (0, 1), dtype=dtype_it)
  # (eps c) c: `c * c` overflows for W below about 1e-19, `eps c**2` only below
  # about 5e-26 (eps = 1e-12), where eps so outweighs ||W u||**2 that
  # u = v = 0 and W is returned as it is (sigma = 0, below).
  eps_scaled = eps * c * c

  def step(_, uv):
    v = _l2_normalize(jnp.matmul(uv[0], matrix.T) * c, eps_scaled)
    return _l2_normalize(jnp.matmul(v, matrix) * c, eps_scaled), v

  u, v = step(0, (u[None, :], None))
  if n_steps > 1:  # a loop, not unrolled: many steps compile in constant time
    u, v = lax.fori_loop(1, n_steps, step, (u, v))
  u = lax.stop_gradient(u)
  v = lax.stop_gradient(v)
  c = c[0, 0]
  sigma_scaled = jnp.matmul(jnp.matmul(v, matrix), u.T)[0, 0] * c
  divisor = jnp.where(sigma_scaled != 0, sigma_scaled, c)  # sigma = 0: W
  if jnp.finfo(dtype_it).bits > 16:
    # (`W / (c sigma)` is subnormal, which XLA's CPU backend flushes to 0,
    # for entries within a factor `c sigma` of the smallest normal number:
    # in float32 kernels of about 1e-34 and below.)
    w_sn = matrix / divisor * c
  else:
    # In half precision XLA keeps a division's float32 result for its
    # consumer (the layer's matmul); `* c` after it would round it first.
    w_sn = matrix * c / divisor
  w_sn = w_sn.reshape(w.shape)
  sigma = sigma_scaled / c
  out_dtype = jnp.result_type(w, u, sigma) if dtype is None else dtype
  w_sn = w_sn.astype(out_dtype)
  if not train:
    return w_sn, state
  new_state = dict(state)
  new_state["u"] = u[0].astype(state["u"].dtype)
  sigma_dtype = state["sigma"].dtype if "sigma" in state else sigma.dtype
  new_state["sigma"] = sigma.astype(sigma_dtype)
  return w_sn, new_state
