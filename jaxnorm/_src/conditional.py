"""Conditional and adaptive normalization: FiLM, adaLN-Zero, class-conditional batch norm, AdaIN.

In each, a normalization without learned affine parameters is followed by a
scale and shift computed from a condition instead of fixed per feature:

* FiLM (Perez et al., 2018): ``y = norm(x) * (1 + gamma(c)) + beta(c)``, the
  ``gamma, beta`` a linear projection of a condition vector ``c``;
* adaLN-Zero (Peebles & Xie, 2023, DiT): the same with a layer norm, plus a
  gate ``alpha(c)`` on the residual branch, all from a zero-initialized
  projection, so each block starts as the identity;
* class-conditional batch norm (de Vries et al., 2017; Miyato & Koyama,
  2018): batch norm with one ``scale``/``bias`` row per class;
* AdaIN (Huang & Belongie, 2017): instance norm of the content features,
  rescaled to the style features' per-channel mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from jaxnorm._src import checks
from jaxnorm._src.batch_norm import batch_norm
from jaxnorm._src.batch_norm import batch_norm_init
from jaxnorm._src.group_norm import group_norm
from jaxnorm._src.group_norm import instance_norm
from jaxnorm._src.layer_norm import layer_norm
from jaxnorm._src.layer_norm import rms_norm
from jaxnorm._src.moments import moments

NORMS = ("layer", "rms", "group", "instance", None)


# -- The shared pieces: the parameter-free normalization and the projection --


def normalize(
    x: jax.Array,
    norm: str | None,
    *,
    eps: float,
    num_groups: int | None = 32,
    mask: ArrayLike | None = None,
) -> jax.Array:
  """``x`` normalized without affine parameters by ``norm``, channels last.

  ``"layer"``/``"rms"`` over the last axis, ``"group"`` over the spatial axes
  and ``num_groups`` channel groups, ``"instance"`` over the spatial axes;
  ``None`` returns ``x``.
  """
  if norm == "layer":
    return layer_norm({}, x, eps=eps, mask=mask)
  if norm == "rms":
    return rms_norm({}, x, eps=eps, mask=mask)
  if norm == "group":
    return group_norm({}, x, num_groups=num_groups, eps=eps, mask=mask)
  if norm == "instance":
    return instance_norm({}, x, eps=eps, mask=mask)
  if norm is None:
    checks.check_array("x", x, allow_complex=False)
    return x
  raise ValueError(
      f"`norm` must be one of 'layer', 'rms', 'group', 'instance' or None, got "
      f"{norm!r}."
  )


def projection_init(
    cond_features: int,
    out_features: int,
    *,
    key: jax.Array | None = None,
    dtype: DTypeLike = jnp.float32,
) -> dict[str, jax.Array]:
  """``{"kernel": (D, out), "bias": (out,)}``: zeros, or a LeCun-normal kernel with ``key``."""
  d = checks.check_positive_int("cond_features", cond_features)
  out = checks.check_positive_int("num_features", out_features)
  if key is None:
    kernel = jnp.zeros((d, out), dtype)
  else:
    kernel = jax.nn.initializers.lecun_normal()(key, (d, out), dtype)
  return {"kernel": kernel, "bias": jnp.zeros((out,), dtype)}


def _project(params, x, cond, parts: int) -> list[jax.Array]:
  """``cond @ kernel + bias`` split into ``parts`` arrays that broadcast against ``x``.

  ``cond`` has shape ``x.shape[:k] + (D,)`` for some ``0 <= k < x.ndim`` (per
  example, or per example and position); the projections get singleton axes
  for the axes of ``x`` between ``k`` and the channels.
  """
  checks.check_array("cond", cond, allow_complex=False)
  if not isinstance(params, Mapping) or sorted(params) != ["bias", "kernel"]:
    raise ValueError(
        "`params` must be a dict with the keys 'kernel' and 'bias' (the "
        f"projection of the condition), got {params!r}."
    )
  kernel, bias = params["kernel"], params["bias"]
  checks.check_array("params['kernel']", kernel, allow_complex=False)
  checks.check_array("params['bias']", bias, allow_complex=False)
  x, cond = jnp.asarray(x), jnp.asarray(cond)
  kernel, bias = jnp.asarray(kernel), jnp.asarray(bias)
  c = x.shape[-1]
  if cond.ndim < 1 or cond.ndim > x.ndim or cond.shape[:-1] != x.shape[:cond.ndim - 1]:
    raise ValueError(
        f"`cond` must have shape x.shape[:k] + (cond_features,) for some k < "
        f"{x.ndim}, e.g. ({x.shape[0] if x.ndim else 1}, D) per example; got "
        f"{tuple(cond.shape)} for `x` of shape {tuple(x.shape)}."
    )
  want = (cond.shape[-1], parts * c)
  if tuple(kernel.shape) != want or tuple(bias.shape) != want[1:]:
    raise ValueError(
        f"`params['kernel']` and `params['bias']` must have shapes {want} and "
        f"{want[1:]} for `cond` with {cond.shape[-1]} features and {parts} x "
        f"{c} outputs, got {tuple(kernel.shape)} and {tuple(bias.shape)}."
    )
  compute = jnp.promote_types(jnp.result_type(cond, kernel, bias), jnp.float32)
  p = jnp.dot(cond.astype(compute), kernel.astype(compute)) + bias.astype(compute)
  p = p.reshape(cond.shape[:-1] + (1,) * (x.ndim - cond.ndim) + (parts * c,))
  return jnp.split(p, parts, axis=-1)


def modulate(x: ArrayLike, shift: ArrayLike, scale: ArrayLike) -> jax.Array:
  """``x * (1 + scale) + shift``: DiT's ``modulate``, the ``1 +`` making zero the identity."""
  return cast(jax.Array, x * (1 + scale) + shift)


def _out_dtype(x, params, dtype):
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.result_type(x.dtype, *[v.dtype for v in params.values()])


# -- FiLM --------------------------------------------------------------------


def film_init(
    cond_features: int,
    num_features: int,
    *,
    key: jax.Array | None = None,
    dtype: DTypeLike = jnp.float32,
) -> dict[str, jax.Array]:
  """Returns the FiLM projection ``{"kernel": (D, 2C), "bias": (2C,)}``.

  Zeros by default, so the layer starts as the plain normalization; with
  ``key``, a LeCun-normal kernel. Columns ``[:C]`` give ``gamma`` (the scale),
  ``[C:]`` give ``beta`` (the shift).

  >>> import jaxnorm
  >>> {k: v.shape for k, v in jaxnorm.film_init(5, 3).items()}
  {'kernel': (5, 6), 'bias': (6,)}
  """
  c = checks.check_positive_int("num_features", num_features)
  return projection_init(cond_features, 2 * c, key=key, dtype=dtype)


def film(
    params: Mapping[str, ArrayLike],
    x: ArrayLike,
    cond: ArrayLike,
    *,
    norm: str | None = "layer",
    eps: float = 1e-6,
    num_groups: int | None = 32,
    mask: ArrayLike | None = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
  """Feature-wise linear modulation (Perez et al., 2018) of a normalized input.

  ``[gamma, beta] = cond @ kernel + bias`` and
  ``y = norm(x) * (1 + gamma) + beta``, per channel (the last axis of ``x``),
  where ``norm`` has no affine parameters of its own. The ``1 +`` (as in
  the paper's Appendix on initialization) makes a zero projection the plain
  normalization.

  Args:
    params: ``{"kernel": (D, 2C), "bias": (2C,)}`` from :func:`film_init`.
    x: ``(N, ..., C)``, channels last.
    cond: ``(N, D)`` per example (or ``x.shape[:k] + (D,)``, e.g. per token).
    norm: ``"layer"`` (over the channels), ``"rms"``, ``"group"`` (with
      ``num_groups``), ``"instance"``, or ``None`` for plain FiLM of ``x``.
    eps: the normalization's epsilon.
    num_groups: groups for ``norm="group"``.
    mask: boolean, broadcastable to ``x``: entries left out of the statistics.
    dtype: output dtype (default: ``x`` and ``params`` promoted).

  Returns:
    ``y`` with the shape of ``x``.

  >>> import jax, jax.numpy as jnp, jaxnorm
  >>> x, c = jnp.ones((2, 4, 3)), jnp.ones((2, 5))
  >>> jaxnorm.film(jaxnorm.film_init(5, 3, key=jax.random.key(0)), x, c).shape
  (2, 4, 3)
  """
  checks.check_array("x", x, allow_complex=False)
  x = jnp.asarray(x)
  checks.check_min_rank("x", x, 1, "channels last")
  gamma, beta = _project(params, x, cond, 2)
  x_hat = normalize(x, norm, eps=eps, num_groups=num_groups, mask=mask)
  return modulate(x_hat.astype(gamma.dtype), beta, gamma).astype(
      _out_dtype(x, params, dtype))


# -- adaLN-Zero ----------------------------------------------------------------


def adaln_zero_init(
    cond_features: int, num_features: int, *, dtype: DTypeLike = jnp.float32
) -> dict[str, jax.Array]:
  """Returns the adaLN-Zero projection, all zeros: ``{"kernel": (D, 3C), "bias": (3C,)}``.

  Columns ``[:C]``, ``[C:2C]``, ``[2C:]`` give DiT's ``shift``, ``scale`` and
  ``gate``.

  >>> import jaxnorm
  >>> p = jaxnorm.adaln_zero_init(5, 3)
  >>> p["kernel"].shape, float(abs(p["kernel"]).max())
  ((5, 9), 0.0)
  """
  c = checks.check_positive_int("num_features", num_features)
  return projection_init(cond_features, 3 * c, dtype=dtype)


def adaln_zero(
    params: Mapping[str, ArrayLike],
    x: ArrayLike,
    cond: ArrayLike,
    *,
    norm: str = "layer",
    eps: float = 1e-6,
    mask: ArrayLike | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Adaptive layer norm with a zero-initialized gate (Peebles & Xie, 2023, DiT, Section 3.2).

  ``[shift, scale, gate] = cond @ kernel + bias``,
  ``h = LN(x) * (1 + scale) + shift`` (LN without affine parameters), and the
  block's residual update is ``x + gate * f(h)`` for the block's function
  ``f`` (attention or MLP). With the zero projection of
  :func:`adaln_zero_init`, ``gate = 0`` and the block is the identity.

  Args:
    params: ``{"kernel": (D, 3C), "bias": (3C,)}``.
    x: ``(N, ..., C)``, e.g. ``(N, tokens, C)``.
    cond: ``(N, D)`` (e.g. timestep plus class embedding), or ``x.shape[:k] + (D,)``.
    norm: ``"layer"`` (DiT) or ``"rms"``.
    eps: the norm's epsilon (DiT: 1e-6).
    mask: boolean, broadcastable to ``x``: entries left out of the statistics.
    dtype: output dtype (default: ``x`` and ``params`` promoted).

  Returns:
    ``(h, gate)``: ``h`` with the shape of ``x`` and ``gate`` broadcastable
    to it.

  >>> import jax.numpy as jnp, jaxnorm
  >>> x, c = jnp.arange(6.0).reshape(1, 2, 3), jnp.ones((1, 4))
  >>> h, gate = jaxnorm.adaln_zero(jaxnorm.adaln_zero_init(4, 3), x, c)
  >>> bool(jnp.all(x + gate * jnp.tanh(h) == x))      # identity at init
  True
  """
  if norm not in ("layer", "rms"):
    raise ValueError(f"`norm` must be 'layer' or 'rms', got {norm!r}.")
  checks.check_array("x", x, allow_complex=False)
  x = jnp.asarray(x)
  checks.check_min_rank("x", x, 1, "channels last")
  shift, scale, gate = _project(params, x, cond, 3)
  x_hat = normalize(x, norm, eps=eps, mask=mask)
  out = _out_dtype(x, params, dtype)
  return (modulate(x_hat.astype(scale.dtype), shift, scale).astype(out),
          gate.astype(out))


# -- Class-conditional batch norm ------------------------------------------------


def conditional_batch_norm_init(
    num_classes: int, num_features: int, *, dtype: DTypeLike = jnp.float32
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Returns ``(params, state)``: ``scale`` ones and ``bias`` zeros of shape ``(K, C)``,
  and batch norm's ``{"mean": zeros(C), "var": ones(C)}`` (float32).

  >>> import jaxnorm
  >>> p, s = jaxnorm.conditional_batch_norm_init(10, 4)
  >>> p["scale"].shape, s["mean"].shape
  ((10, 4), (4,))
  """
  k = checks.check_positive_int("num_classes", num_classes)
  c = checks.check_positive_int("num_features", num_features)
  _, state = batch_norm_init(c)
  return {"scale": jnp.ones((k, c), dtype), "bias": jnp.zeros((k, c), dtype)}, state


def conditional_batch_norm(
    params: Mapping[str, ArrayLike],
    state: Mapping[str, jax.Array],
    x: ArrayLike,
    labels: ArrayLike,
    *,
    train: bool,
    momentum: float = 0.99,
    eps: float = 1e-5,
    axis_name: str | None = None,
    mask: ArrayLike | None = None,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, Mapping[str, jax.Array]]:
  """Class-conditional batch norm (de Vries et al., 2017; Miyato & Koyama, 2018).

  ``y[n] = (x[n] - mean) / sqrt(var + eps) * scale[labels[n]] + bias[labels[n]]``:
  batch norm's statistics and running averages (shared by all classes, see
  :func:`jaxnorm.batch_norm`), with one row of ``scale`` and ``bias`` per
  class.

  Args:
    params: ``{"scale": (K, C), "bias": (K, C)}``; a missing key turns it off.
    state: ``{"mean": (C,), "var": (C,)}``.
    x: ``(N, ..., C)``, channels last.
    labels: integer class of each example, shape ``(N,)``, in ``[0, K)``
      (out-of-range labels are clamped, as JAX's indexing does).
    train, momentum, eps, axis_name, mask: as in :func:`jaxnorm.batch_norm`.
    dtype: output dtype (default: ``x`` and ``params`` promoted).

  Returns:
    ``(y, new_state)``.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> params, state = jaxnorm.conditional_batch_norm_init(2, 1)
  >>> params["bias"] = jnp.array([[0.0], [10.0]])
  >>> x, labels = jnp.array([[1.0], [3.0]]), jnp.array([0, 1])
  >>> y, _ = jaxnorm.conditional_batch_norm(params, state, x, labels, train=True)
  >>> np.asarray(y, float).round(3).ravel().tolist()
  [-1.0, 11.0]
  """
  checks.check_array("x", x, allow_complex=False)
  x = jnp.asarray(x)
  checks.check_min_rank("x", x, 2, "batch first, channels last")
  checks.check_param_keys(params, ("scale", "bias"))
  dtype_l = getattr(labels, "dtype", None)
  if dtype_l is None or not jnp.issubdtype(dtype_l, jnp.integer):
    raise TypeError(
        "`labels` must be an integer array of class indices, got "
        f"{'dtype ' + str(dtype_l) if dtype_l is not None else type(labels).__name__}."
    )
  labels = jnp.asarray(labels)
  if tuple(labels.shape) != (x.shape[0],):
    raise ValueError(
        f"`labels` must have shape ({x.shape[0]},), one class per example of "
        f"`x`, got {tuple(labels.shape)}."
    )
  c = x.shape[-1]
  params = {k: v for k, v in params.items() if v is not None}
  arrays: dict[str, jax.Array] = {}
  for key, value in params.items():
    checks.check_array(f"params['{key}']", value, allow_complex=False)
    value = jnp.asarray(value)
    arrays[key] = value
    if value.ndim != 2 or value.shape[1] != c:
      raise ValueError(
          f"`params['{key}']` must have shape (num_classes, {c}), one row per "
          f"class and one column per channel of `x` (its last axis), got "
          f"{tuple(value.shape)}."
      )
  if len({v.shape[0] for v in arrays.values()}) > 1:
    raise ValueError(
        "`params['scale']` and `params['bias']` must have one row per class "
        f"each, got {arrays['scale'].shape[0]} and {arrays['bias'].shape[0]} rows."
    )
  x_hat, new_state = batch_norm({}, state, x, train=train, axis=-1,
                                momentum=momentum, eps=eps, axis_name=axis_name,
                                mask=mask)
  bshape = (x.shape[0],) + (1,) * (x.ndim - 2) + (c,)
  out = _out_dtype(x, arrays, dtype)
  y = x_hat.astype(jnp.promote_types(out, jnp.float32))
  if "scale" in arrays:
    y = y * arrays["scale"][labels].reshape(bshape)
  if "bias" in arrays:
    y = y + arrays["bias"][labels].reshape(bshape)
  return y.astype(out), new_state


# -- AdaIN ----------------------------------------------------------------------


def adain(
    content: ArrayLike, style: ArrayLike, *, eps: float = 1e-5
) -> jax.Array:
  """Adaptive instance normalization (Huang & Belongie, 2017, Eq. 8).

  ``AdaIN(x, y) = sigma(y) * (x - mu(x)) / sigma(x) + mu(y)``, with ``mu`` and
  ``sigma = sqrt(var + eps)`` (biased variance) per example and channel over
  the spatial axes, so the output has the style's channel statistics.

  Args:
    content: ``(N, spatial..., C)``, channels last.
    style: ``(N, spatial'..., C)``: the same ``N``, ``C`` and rank; its spatial
      sizes may differ.
    eps: added to both variances, > 0.

  Returns:
    The restyled content, with the shape and dtype of ``content``.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> x = jnp.array([[[0.0], [2.0]]])            # mean 1, std 1
  >>> s = jnp.array([[[10.0], [20.0], [30.0]]])  # mean 20
  >>> np.asarray(jaxnorm.adain(x, s, eps=1e-12), float).round(3).ravel().tolist()
  [11.835, 28.165]
  """
  checks.check_array("content", content, allow_complex=False)
  checks.check_array("style", style, allow_complex=False)
  content, style = jnp.asarray(content), jnp.asarray(style)
  checks.check_min_rank("content", content, 3,
                        "batch, at least one spatial axis, channels")
  if (style.ndim != content.ndim or style.shape[0] != content.shape[0]
      or style.shape[-1] != content.shape[-1]):
    raise ValueError(
        "`style` must have the rank, batch size (first axis) and channels "
        f"(last axis) of `content`, {tuple(content.shape)}, got "
        f"{tuple(style.shape)}."
    )
  checks.check_eps(eps)
  spatial = tuple(range(1, content.ndim - 1))
  mean_s, var_s = moments(style, spatial, keepdims=True)
  x_hat = instance_norm({}, content, eps=eps)
  y = x_hat.astype(mean_s.dtype) * jnp.sqrt(var_s + eps) + mean_s
  return y.astype(content.dtype)

