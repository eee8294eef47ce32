"""Folding an inference-mode batch norm into the Dense or Conv layer before it.

At inference, batch norm is a per-channel affine map of its input ``z``::

  BN(z) = (z - mean) / sqrt(var + eps) * scale + bias_bn = z * s + t
  s = scale / sqrt(var + eps),   t = bias_bn - mean * s

and a Dense or Conv layer is linear in its kernel, with the output channels on
the kernel's last axis: ``z = conv(x, W) + b``. So
``BN(conv(x, W) + b) = conv(x, W * s) + (b * s + t)``: one layer, no
normalization, the same outputs (Ioffe & Szegedy, 2015, Sec. 3.2, use the same
observation to fold the inference transform into the layer; Jacob et al., 2018,
Sec. 3.2, fold it before quantization).
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxnorm._src import checks
from jaxnorm._src import layer_setup


def fold_batch_norm(
    kernel: jax.Array,
    bias: jax.Array | None,
    params: Mapping[str, jax.Array] | None,
    state: Mapping[str, jax.Array],
    *,
    eps: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
  """Folds an inference-mode batch norm into the preceding Dense/Conv layer.

  Returns ``(kernel', bias')`` such that, for every input ``x``,
  ``layer(x; kernel', bias')`` equals
  ``batch_norm(params, state, layer(x; kernel, bias), train=False, eps=eps)``
  (up to rounding)::

    s = params["scale"] / sqrt(state["var"] + eps)        # (C,)
    kernel' = kernel * s                                  # scales the last axis
    bias'   = (bias - state["mean"]) * s + params["bias"]

  Args:
    kernel: the layer's kernel with the output features on the last axis:
      ``(in, C)`` for ``Dense``, ``(H, W, in, C)`` (or any rank) for ``Conv``.
    bias: the layer's bias, ``(C,)``, or ``None`` for a layer without one.
    params: the batch norm's ``{"scale": (C,), "bias": (C,)}``; a missing key
      (or ``None``) means that term is off.
    state: the batch norm's ``{"mean": (C,), "var": (C,)}`` running averages.
    eps: the batch norm's ``eps`` (``flax.linen.BatchNorm``'s ``epsilon``;
      PyTorch's ``eps``), > 0.

  Returns:
    ``(kernel', bias')``; ``kernel'`` has ``kernel``'s shape and dtype, and
    ``bias'`` has shape ``(C,)`` and the dtype of the bias (or of the kernel
    when ``bias`` is ``None``). The folded layer always needs a bias.

  >>> import jax.numpy as jnp, numpy as np, jaxnorm
  >>> params = {"scale": jnp.array([2.0]), "bias": jnp.array([1.0])}
  >>> state = {"mean": jnp.array([3.0]), "var": jnp.array([4.0 - 1e-5])}
  >>> k, b = jaxnorm.fold_batch_norm(jnp.array([[5.0]]), None, params, state)
  >>> np.asarray(k).round(4).tolist(), np.asarray(b).round(4).tolist()
  ([[5.0]], [-2.0])
  """
  checks.check_array("kernel", kernel, allow_complex=False)
  if kernel.ndim < 1:
    raise ValueError(
        "`kernel` must have at least 1 dimension (output features last), got a "
        "scalar."
    )
  channels = kernel.shape[-1]
  if bias is not None:
    checks.check_array("bias", bias, allow_complex=False)
    if tuple(bias.shape) != (channels,):
      raise ValueError(
          f"`bias` must have shape ({channels},) to match the {channels} output "
          f"features on the last axis of `kernel` of shape "
          f"{tuple(kernel.shape)}, got shape {tuple(bias.shape)}."
      )
  params = layer_setup.batch_norm_variables(
      params, state, (channels,),
      subject=f"`kernel` of shape {tuple(kernel.shape)}",
      where="on its last axis (the layer's output features)",
      hint="the batch norm must act on this layer's output", allow_complex=False)
  checks.check_eps(eps)

  real = jnp.promote_types(kernel.dtype, jnp.float32)
  s = jax.lax.rsqrt(state["var"].astype(real) + eps)
  if "scale" in params:
    s = s * params["scale"].astype(real)
  new_bias = -state["mean"].astype(real) * s
  if bias is not None:
    new_bias = new_bias + bias.astype(real) * s
  if "bias" in params:
    new_bias = new_bias + params["bias"].astype(real)
  new_kernel = (kernel.astype(real) * s).astype(kernel.dtype)
  bias_dtype = kernel.dtype if bias is None else bias.dtype
  return new_kernel, new_bias.astype(bias_dtype)


def _path(name: str, path) -> tuple[str, ...]:
  if isinstance(path, str):
    parts = tuple(p for p in path.split("/") if p)
  elif isinstance(path, Sequence) and all(isinstance(p, str) for p in path):
    parts = tuple(path)
  else:
    parts = ()
  if not parts:
    raise TypeError(
        f"{name} must be a module path: a string such as 'Conv_0' or "
        f"'block/Conv_0', or a tuple of strings, got {path!r}."
    )
  return parts


def _pairs(pairs) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
  if isinstance(pairs, Mapping):
    items = list(pairs.items())
  elif isinstance(pairs, Sequence) and not isinstance(pairs, str) and all(
      isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2
      for p in pairs):
    items = list(pairs)
  else:
    raise TypeError(
        "`pairs` must be a dict {layer_path: bn_path} or a sequence of "
        f"(layer_path, bn_path) pairs, got {pairs!r}."
    )
  return [(_path("A layer path in `pairs`", a), _path("A batch norm path in `pairs`", b))
          for a, b in items]


def _copy(tree):
  """Plain nested dicts (FrozenDicts too), leaves shared."""
  if isinstance(tree, Mapping):
    return {k: _copy(v) for k, v in tree.items()}
  return tree


def _get(tree: Mapping, path: tuple[str, ...], collection: str, role: str) -> Any:
  node = tree
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(
          f"The {role} '{'/'.join(path)}' of `pairs` is not in "
          f"`variables['{collection}']`: no '{key}' at "
          f"'{'/'.join(path[:i]) or '<root>'}'"
          + (f", which holds {sorted(node)}." if isinstance(node, Mapping) else ".")
      )
    node = node[key]
  return node


def _pop(tree: dict, path: tuple[str, ...]) -> None:
  """Deletes ``path`` and then every parent dict it leaves empty."""
  parents = [tree]
  for key in path[:-1]:
    parents.append(parents[-1][key])
  del parents[-1][path[-1]]
  for parent, key in zip(reversed(parents[:-1]), reversed(path[:-1]), strict=True):
    if parent[key]:
      break
    del parent[key]


def fold_batch_norm_tree(
    variables: Mapping[str, Any],
    pairs: Any,
    *,
    eps: float = 1e-5,
) -> dict[str, Any]:
  """Folds every listed batch norm of a ``flax.linen`` model into its layer.

  ``variables`` is what ``model.init`` returns:
  ``{"params": {...}, "batch_stats": {...}}``, with each Dense/Conv under its
  module path in ``params`` (``kernel`` and optionally ``bias``) and each
  batch norm in ``params`` (``scale``/``bias``, either optional) and
  ``batch_stats`` (``mean``/``var``), the names ``flax.linen.BatchNorm`` and
  ``jaxnorm.linen.BatchNorm`` both use.

  ``pairs`` names which batch norm follows which layer, as a dict
  ``{layer_path: bn_path}`` or a sequence of ``(layer_path, bn_path)``
  pairs. A path is a string with ``/`` between nested module names
  (``"Conv_0"``, ``"ResBlock_1/Conv_0"``) or a tuple of names. The batch norm
  must act directly on the layer's output (nothing in between) and be used in
  inference mode with the given ``eps``.

  Returns new variables (the input is not modified) for the model *without*
  those batch norms: each layer's ``kernel`` and ``bias`` are replaced by the
  folded ones (a ``bias`` is added where the layer had none), and the batch
  norms' entries are removed from every collection (a collection, or a
  module, left empty is dropped). Change the model definition to match:
  delete each folded ``BatchNorm`` call and build its layer with
  ``use_bias=True``, e.g. ``nn.Conv(32, (3, 3), use_bias=False)`` followed by
  ``nn.BatchNorm(use_running_average=True)`` becomes
  ``nn.Conv(32, (3, 3), use_bias=True)``. Flax numbers automatic names per
  module type (``Conv_0``, ``Conv_1``, ``BatchNorm_0``), so deleting the batch
  norms leaves the other modules' names, and so the variables, in place.

  Raises:
    KeyError: a path is not in the tree.
    ValueError: a batch norm is listed twice, or shapes do not match (see
      :func:`fold_batch_norm`).
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError(
        "`variables` must be a flax variables dict with a 'params' collection "
        "(what `model.init` returns), got "
        + (f"keys {sorted(variables)}." if isinstance(variables, Mapping)
           else f"{type(variables).__name__}.")
    )
  if "batch_stats" not in variables:
    raise ValueError(
        "`variables` has no 'batch_stats' collection, so there are no running "
        f"averages to fold; got collections {sorted(variables)}."
    )
  items = _pairs(pairs)
  seen = set()
  for _, bn in items:
    if bn in seen:
      raise ValueError(
          f"The batch norm '{'/'.join(bn)}' appears twice in `pairs`; each "
          "batch norm follows exactly one layer."
      )
    seen.add(bn)

  out = _copy(variables)
  for layer, bn in items:
    layer_vars = _get(out["params"], layer, "params", "layer")
    stats = _get(out["batch_stats"], bn, "batch_stats", "batch norm")
    try:
      bn_params = _get(out["params"], bn, "params", "batch norm")
    except KeyError:  # use_scale=False and use_bias=False: no params at all.
      bn_params = {}
    # `out` is plain nested dicts (_copy), so the layer's entry can be updated in place.
    if not isinstance(layer_vars, dict) or "kernel" not in layer_vars:
      raise KeyError(
          f"The layer '{'/'.join(layer)}' of `pairs` has no 'kernel' in "
          "`variables['params']`; expected a Dense or Conv module."
      )
    kernel, bias = fold_batch_norm(
        layer_vars["kernel"], layer_vars.get("bias"), dict(bn_params),
        {"mean": stats["mean"], "var": stats["var"]}, eps=eps)
    layer_vars["kernel"] = kernel
    layer_vars["bias"] = bias
    for collection in list(out):
      try:
        _get(out[collection], bn, collection, "batch norm")
      except KeyError:
        continue
      _pop(out[collection], bn)
      if not out[collection] and collection != "params":
        del out[collection]
  return out
