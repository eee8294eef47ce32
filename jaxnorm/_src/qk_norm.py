"""QK normalization (Dehghani et al., 2023, "Scaling Vision Transformers to 22 Billion Parameters").

Queries and keys are normalized over ``head_dim``, per head and position,
before their dot product, which keeps the attention logits bounded and lets
large models train at high learning rates. ViT-22B uses a layer norm without
bias; many language models (OLMo 2, Gemma 3, Qwen 3) use an RMS norm.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
from jax.typing import DTypeLike

from jaxnorm._src import checks
from jaxnorm._src.layer_norm import layer_norm
from jaxnorm._src.layer_norm import rms_norm

KINDS = ("rms", "layer")


def check_kind(kind: object) -> str:
  """``kind`` must be ``"rms"`` or ``"layer"``."""
  if kind not in KINDS:
    raise ValueError(f"`kind` must be 'rms' or 'layer', got {kind!r}.")
  return kind


def qk_norm_init(
    head_dim: int, *, kind: str = "rms", dtype: DTypeLike = jnp.float32
) -> dict[str, dict[str, jax.Array]]:
  """Returns ``{"query_norm": {"scale": ones}, "key_norm": {"scale": ones}}``.

  One ``scale`` of shape ``(head_dim,)`` for the queries and one for the keys,
  shared by all heads (as ViT-22B's and Flax's ``normalize_qk``). Neither
  ``kind`` has a bias: a bias on the keys adds the same value to every logit
  of a query and cancels in the softmax.

  >>> import jaxnorm
  >>> p = jaxnorm.qk_norm_init(8)
  >>> {k: v["scale"].shape for k, v in p.items()}
  {'query_norm': (8,), 'key_norm': (8,)}
  """
  check_kind(kind)
  head_dim = checks.check_positive_int("head_dim", head_dim)
  return {name: {"scale": jnp.ones((head_dim,), dtype)}
          for name in ("query_norm", "key_norm")}


def qk_norm(
    params: Mapping[str, Mapping[str, ArrayLike]] | None,
    query: ArrayLike,
    key: ArrayLike,
    *,
    kind: str = "rms",
    eps: float = 1e-6,
    dtype: DTypeLike | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Normalizes queries and keys over their last axis, ``head_dim`` (Dehghani et al., 2023).

  For each batch element, position and head, with ``D = head_dim``:

  * ``kind="rms"``:   ``q_hat = q / sqrt(mean(q**2) + eps) * scale_q``;
  * ``kind="layer"``: ``q_hat = (q - mean(q)) / sqrt(var(q) + eps) * scale_q``;

  and the same for ``k`` with ``scale_k``. The logits are then
  ``q_hat . k_hat / sqrt(D)`` as usual, so pass the results to
  ``jax.nn.dot_product_attention`` or ``flax.nnx.dot_product_attention``.

  Args:
    params: ``{"query_norm": {"scale": (D,)}, "key_norm": {"scale": (D,)}}``
      from :func:`qk_norm_init`; ``None`` or a missing entry turns that scale
      off.
    query: ``(..., q_length, num_heads, D)``, Flax's attention layout (any
      leading axes; only the last is reduced).
    key: ``(..., kv_length, num_heads, D)``.
    kind: ``"rms"`` or ``"layer"`` statistics.
    eps: added to the mean square or variance, > 0.
    dtype: output dtype (default: the input and its scale promoted).

  Returns:
    ``(query_hat, key_hat)`` with the shapes of ``query`` and ``key``.

  >>> import jax, jax.numpy as jnp, jaxnorm
  >>> q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))   # (B, L, H, D)
  >>> k = 100.0 * jax.random.normal(jax.random.key(1), (2, 7, 4, 8))
  >>> qn, kn = jaxnorm.qk_norm(jaxnorm.qk_norm_init(8), q, k)
  >>> out = jax.nn.dot_product_attention(qn, kn, kn)
  >>> out.shape, bool(jnp.abs(jnp.mean(kn**2, -1) - 1).max() < 1e-3)
  ((2, 5, 4, 8), True)
  """
  check_kind(kind)
  checks.check_array("query", query, allow_complex=False)
  checks.check_array("key", key, allow_complex=False)
  query, key = jnp.asarray(query), jnp.asarray(key)
  if query.ndim < 1 or key.ndim < 1:
    raise ValueError(
        "`query` and `key` must have at least 1 dimension (head_dim last), "
        f"got shapes {tuple(query.shape)} and {tuple(key.shape)}."
    )
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(
        f"`query` and `key` must have the same head_dim (last axis), got "
        f"{query.shape[-1]} and {key.shape[-1]}."
    )
  if params is None:
    params = {}
  if not isinstance(params, Mapping):
    raise TypeError(
        "`params` must be a dict with keys among ['key_norm', 'query_norm'], "
        f"got {type(params).__name__}."
    )
  unknown = sorted(set(params) - {"query_norm", "key_norm"})
  if unknown:
    raise ValueError(
        f"`params` has unexpected keys {unknown}; expected keys among "
        "['key_norm', 'query_norm'] (build it with `qk_norm_init`)."
    )
  norm = rms_norm if kind == "rms" else layer_norm
  out = []
  for name, x in (("query_norm", query), ("key_norm", key)):
    p = _check_sub_params(params.get(name), name, x.shape[-1])
    out.append(norm(p, x, axis=-1, eps=eps, dtype=dtype))
  return out[0], out[1]


def _check_sub_params(p, name: str, head_dim: int) -> dict:
  if p is None:
    return {}
  if not isinstance(p, Mapping) or set(p) - {"scale"}:
    raise ValueError(
        f"`params['{name}']` must be a dict with the key 'scale' only, got "
        f"{p!r}."
    )
  scale = p.get("scale")
  if scale is None:
    return {}
  checks.check_array(f"params['{name}']['scale']", scale, allow_complex=False)
  if tuple(scale.shape) != (head_dim,):
    raise ValueError(
        f"`params['{name}']['scale']` must have shape ({head_dim},), the "
        f"head_dim of `query` and `key`, got {tuple(scale.shape)}."
    )
  return {"scale": scale}
