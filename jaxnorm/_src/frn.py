"""Filter response normalization with a thresholded linear unit (Singh & Krishnan, 2020).

"Filter Response Normalization Layer: Eliminating Batch Dependence in the
Training of Deep Neural Networks" (CVPR 2020). Each example and channel is
divided by the root mean square of its own responses over the spatial axes
(no centering, no batch), then an affine map and the TLU ``max(y, tau)``
replace the ReLU: the learned threshold ``tau`` gives back the shift that the
missing mean subtraction takes away.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from jaxnorm._src import checks
from jaxnorm._src.layer_norm import rms_norm

_KEYS = ("scale", "bias", "tau", "eps")


def frn_init(
    num_features: int,
    *,
    dtype: DTypeLike = jnp.float32,
    use_tlu: bool = True,
    learn_eps: bool = False,
    eps_init: float = 1e-4,
) -> dict[str, jax.Array]:
  """Returns ``{"scale": ones, "bias": zeros, "tau": zeros[, "eps": eps_init]}``.

  ``scale``, ``bias`` and ``tau`` have shape ``(C,)``; ``tau`` only with
  ``use_tlu``. With ``learn_eps`` a scalar ``"eps"`` is added (the paper's
  learned epsilon, Section 3.1, for inputs with few spatial positions), by
  default 1e-4: the effective epsilon is ``eps + |params["eps"]|``.

  >>> import jaxnorm
  >>> sorted(jaxnorm.frn_init(3, learn_eps=True))
  ['bias', 'eps', 'scale', 'tau']
  """
  c = checks.check_positive_int("num_features", num_features)
  params = {"scale": jnp.ones((c,), dtype), "bias": jnp.zeros((c,), dtype)}
  if use_tlu:
    params["tau"] = jnp.zeros((c,), dtype)
  if learn_eps:
    params["eps"] = jnp.asarray(eps_init, dtype)
  return params


def frn(
    params: Mapping[str, ArrayLike],
    x: ArrayLike,
    *,
    eps: float = 1e-6,
    mask: ArrayLike | None = None,
    dtype: DTypeLike | None = None,
) -> jax.Array:
  """Filter response normalization and TLU (Singh & Krishnan, 2020, Eq. 1-3).

  ``x`` has shape ``(N, spatial..., C)``. For each example and channel, over
  the ``S`` spatial positions::

    nu2   = mean(x**2)                               # Eq. 1
    x_hat = x / sqrt(nu2 + eps_total)                # Eq. 2
    y     = scale * x_hat + bias                     # Eq. 3
    z     = max(y, tau)                              # TLU, Eq. 4

  with ``eps_total = eps + |params["eps"]|`` when the epsilon is learned, else
  ``eps``. With no spatial axes (``x`` of shape ``(N, C)``) ``nu2 = x**2``,
  where the paper recommends the learned epsilon.

  Args:
    params: ``{"scale": (C,), "bias": (C,), "tau": (C,), "eps": ()}``; a
      missing key turns that term off (no ``"tau"``: no TLU).
    x: ``(N, ..., C)``, rank >= 2, floating point.
    eps: the fixed epsilon, > 0.
    mask: boolean, broadcastable to ``x``: entries left out of ``nu2``.
    dtype: output dtype (default: ``x`` and the parameters promoted).

  Returns:
    ``z`` with the shape of ``x``.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> x = jnp.array([[[3.0], [-4.0]]])                  # (N=1, W=2, C=1)
  >>> z = jaxnorm.frn(jaxnorm.frn_init(1), x)
  >>> np.asarray(z, float).round(3).ravel().tolist()    # TLU with tau = 0
  [0.849, 0.0]
  """
  checks.check_array("x", x, allow_complex=False)
  x = jnp.asarray(x)
  checks.check_min_rank("x", x, 2, "batch first, channels last")
  c = x.shape[-1]
  checks.check_param_keys(params, _KEYS)
  learned = params.get("eps")
  channel_params: dict[str, jax.Array] = {}
  for key, value in params.items():
    if key == "eps" or value is None:
      continue
    checks.check_array(f"params['{key}']", value, allow_complex=False)
    value = channel_params[key] = jnp.asarray(value)
    if tuple(value.shape) != (c,):
      raise ValueError(
          f"`params['{key}']` must have shape ({c},), one value per channel of "
          f"`x` (its last axis), got {tuple(value.shape)}."
      )
  if learned is not None:
    checks.check_array("params['eps']", learned, allow_complex=False)
    if jnp.ndim(learned) != 0:
      raise ValueError(
          "`params['eps']` (the learned epsilon) must be a scalar, got shape "
          f"{tuple(jnp.shape(learned))}."
      )
  checks.check_eps(eps)
  checks.check_mask(mask, x)
  # Flax's rule, extended to tau: the output follows x and its parameters.
  out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
      x.dtype, *[v.dtype for v in channel_params.values()])
  eps_total = eps if learned is None else eps + jnp.abs(learned)
  spatial = tuple(range(1, x.ndim - 1))
  scale = channel_params.get("scale")
  params_rms = {} if scale is None else {"scale": scale}
  # nu2 over the spatial axes; scale along the channels (Eq. 1-3).
  y = rms_norm(params_rms, x, axis=spatial, feature_axes=-1, eps=eps_total,
               mask=mask, dtype=jnp.promote_types(out_dtype, jnp.float32))
  if "bias" in channel_params:
    y = y + channel_params["bias"]
  if "tau" in channel_params:
    y = jnp.maximum(y, channel_params["tau"].astype(y.dtype))
  return y.astype(out_dtype)
