"""Both framed sums of a statistic in one read of ``x``, and layer, RMS and
batch norm's forward passes as single compiled calls, on XLA's CPU backend.

Exact statistics take ``sum(x - f)`` and ``sum((x - f)^2)`` with ``f`` a frame
from the data (:mod:`jaxnorm._src.moments`). XLA's CPU reductions (YNNPACK
fusions) take Flax's plain pair ``sum(x), sum(x * x)`` at memory speed, but a
broadcast frame subtracted inside them costs 1.4-1.7x that pair for the
column sums of batch norm (``benchmarks/run.py --reductions``), and no
formulation in JAX's operations closed that gap (the README lists the ones
measured). This module runs both framed sums as one loop, compiled C
(``_cpu_sums.c``, built at install), called as an XLA custom call: column
sums for batch and instance norm, row sums for layer norm (whose forward pass
then needs no plain sums first: the loop is exact on any data and faster
than Flax's plain pair).

It is used where all of these hold (:func:`usable`); everywhere else the
statistics take the sums in JAX's operations, with the same values up to
rounding:

* the compiled library was built (it is optional: an install without a C
  compiler has the same package without it), and the environment variable
  ``JAXNORM_CPU_KERNEL`` is not ``0`` (read when a function is traced);
* ``x`` is float32, or bfloat16 for column sums (read as it is: the loop
  converts each value in registers), with no mask and no pooled channels
  (group norm);
* the reduced axes are contiguous: ``x`` is ``(P, R, C)`` with sums over
  ``R``, and either ``C >= 16`` (batch and instance norm on channels-last
  data: column sums) or ``C == 1`` (layer norm: row sums);
* nothing can partition ``x``: one device, or inside ``shard_map``. A custom
  call is not split by XLA's partitioner, which would gather ``x`` first.

Column sums run in forward passes only; the derivative's program keeps XLA's
sums for them (``compiled_sums`` in :mod:`jaxnorm._src.normalize`), which made
the ResNet-18 training step faster (README, Benchmark). Row sums run in both.

**Fused rows.** Layer and RMS norm's forward pass on float32 rows is one
loop of its own (:func:`row_norm`, ``jaxnorm_row_norm`` in ``_cpu_sums.c``):
each row's two framed sums, then its output from the same row while it is in
cache, so ``x`` is read once and ``y`` written once, where XLA's program
(and Flax's) read ``x`` twice. :mod:`jaxnorm._src.normalize` calls it from
the primal side of its ``custom_jvp`` (the derivative's program keeps the
closed-form tangent rule in JAX's operations), where the parameters are the
same for every row.

**Fused columns.** Batch norm's training forward pass on channels-last
float32 data is one call too (:func:`column_norm`, ``jaxnorm_column_norm``):
each thread takes the column sums of its rows, the calling thread merges
them, and each thread then writes the output of its own rows, which its
core has just read (in cache where they fit). Opt-in
(``JAXNORM_CPU_COLUMN_FWD=1``, :func:`forward_enabled`): its output cannot
fuse with the ReLU that follows a batch norm in a network, and with one
after it the layer took 1.2-1.7x Flax's time against 0.8-1.1 with the
column sums below and XLA's output step. Where turned on, used where the
column sums are, for one slab (every axis but the channels reduced) without
pooled channels, ghost blocks, renorm or a device axis.

**Fused backward passes.** Where the fused forward pass applies, the
derivative is one compiled call too (:mod:`jaxnorm._src.fused_grad`):
``jaxnorm_row_norm_grad`` for layer and RMS norm, and, opt-in
(:func:`grad_enabled`), ``jaxnorm_column_norm_grad`` for batch norm.

**The second look.** Statistics whose sums ran elsewhere (XLA's in derivative
programs; this module's plain sums) take the fused calls' check on their
frame in one call of their own (:func:`refine_moments`,
``jaxnorm_refine_moments``): it reads only the sums, and ``x`` only where
some frame is far from its mean.

On another backend (``lax.platform_dependent``) the same function lowers to
the two sums in JAX's operations. It is differentiable (``custom_jvp``, the
tangents in JAX's operations) and batches under ``vmap`` by folding the mapped
axis into ``P``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import math
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

_extension: Any
try:
  _extension = importlib.import_module("jaxnorm._src._cpu_sums")
except ImportError:  # built without a C compiler: the sums stay in JAX
  _extension = None

_TARGET = "jaxnorm_framed_column_sums"
_ROWS_TARGET = "jaxnorm_row_norm"
_COLUMNS_TARGET = "jaxnorm_column_norm"
_ROWS_GRAD_TARGET = "jaxnorm_row_norm_grad"
_COLUMNS_GRAD_TARGET = "jaxnorm_column_norm_grad"
_REFINE_TARGET = "jaxnorm_refine_moments"
# Between 1 and this many kept values per slab the compiled loop runs one
# column at a time (scalar code); XLA's own sums are faster there. With one
# (row statistics, layer norm) it runs along the rows.
_MIN_COLUMNS = 16


_state = {"registered": False, "failed": False}


def _registered() -> bool:
  """Registers the loop with XLA once; whether it is there to call."""
  if _extension is None or _state["failed"]:
    return False
  if not _state["registered"]:
    try:
      library = ctypes.CDLL(_extension.__file__)
      # XLA's original custom-call interface (api_version 0): no XLA headers
      # at build time. A JAX that no longer takes it leaves the sums in JAX.
      for name in (_TARGET, _ROWS_TARGET, _COLUMNS_TARGET, _ROWS_GRAD_TARGET,
                   _COLUMNS_GRAD_TARGET, _REFINE_TARGET):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                    platform="cpu", api_version=0)
    except Exception as e:  # any failure means: do without the loop
      _state["failed"] = True
      warnings.warn(f"jaxnorm: the compiled sums could not be registered ({e}); "
                    "statistics use JAX's sums", RuntimeWarning, stacklevel=2)
      return False
    _state["registered"] = True
  return True


def built() -> bool:
  """Whether the compiled library is installed (whatever the environment says)."""
  return _extension is not None


def enabled() -> bool:
  """Built, and not turned off with ``JAXNORM_CPU_KERNEL=0``."""
  return os.environ.get("JAXNORM_CPU_KERNEL", "1") != "0" and _registered()


def _unpartitioned(x) -> bool:
  """Inside ``shard_map`` (every mesh axis in the type of ``x`` Manual: each
  device sums its own shard), or no mesh in its type and one device. Under
  Explicit or Auto mesh axes, even of one device, a custom call's results
  would lack the sharding in the types JAX checks."""
  try:
    mesh = jax.typeof(x).sharding.mesh
    if mesh.axis_names:
      return all(kind == jax.sharding.AxisType.Manual for kind in mesh.axis_types)
  except (AttributeError, TypeError):
    pass
  return jax.device_count() == 1


def unpartitioned(x) -> bool:
  """Whether nothing can partition ``x`` (see :func:`_unpartitioned`)."""
  return _unpartitioned(x)


def layout(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int] | None:
  """``(P, R, C)`` when summing ``axes`` of ``shape`` is summing the middle
  axis of ``x.reshape(P, R, C)`` with ``C >= 16`` or ``C == 1``; ``None``
  otherwise."""
  if not axes:
    return None
  lo, hi = min(axes), max(axes)
  if sorted(axes) != list(range(lo, hi + 1)):
    return None
  p, r, c = (math.prod(shape[:lo]), math.prod(shape[lo:hi + 1]), math.prod(shape[hi + 1:]))
  if (c < _MIN_COLUMNS and c != 1) or p * r == 0:
    return None
  return p, r, c


def usable(x, axes: tuple[int, ...], refine: bool = False) -> bool:
  """Whether :func:`framed_sums` (``refine``: :func:`refine_moments`) runs the
  compiled loop for ``x`` (see the module docstring)."""
  shape = layout(x.shape, axes)
  if shape is None:
    return False
  # bfloat16 rows stay with XLA's sums: layer norm's bf16 forward pass, already
  # 0.55-0.9x Flax's time with plain sums first, took 0.8-1.4x with the loop
  # (the columns of batch norm gained: 1.05 -> 0.87, 0.89 -> 0.73, 0.56 ->
  # 0.43 at the sweep's three shapes; in-process A/B, 21 rounds).
  #
  # The second look (refine_moments) takes bfloat16 rows too: unless its
  # check fires it reads only the statistics, where a `lax.cond` in JAX's
  # operations made LN fwd bf16 256x768 0.79-0.81 -> 0.93-0.97x Flax's time
  # (in-process A/B, 41 rounds).
  dtypes = (jnp.float32, jnp.bfloat16) if shape[2] > 1 or refine else (jnp.float32,)
  return x.dtype in dtypes and enabled() and _unpartitioned(x)


def _sums_in_jax(x, f):
  d = x.astype(jnp.float32) - f[:, None, :]
  return jnp.sum(d, axis=1), jnp.sum(d * d, axis=1)


def _varying(a) -> set:
  """The manual (shard_map) axes ``a`` varies over."""
  aval = jax.typeof(a)
  manual = getattr(aval, "manual_axis_type", None)
  return set(getattr(aval, "vma", None) or getattr(manual, "varying", None) or ())


def vary(v, axes):
  """``v`` varying over the manual (shard_map) ``axes`` as well."""
  missing = tuple(sorted(set(axes) - _varying(v)))
  return lax.pcast(v, missing, to="varying") if missing else v


def _call_compiled(target, results, config, *operands):
  """One call of a compiled target (``config``: its opaque string)."""
  if not _registered():
    raise RuntimeError("jaxnorm's compiled loops are not built (see cpu_sums.usable)")
  call = jax.ffi.ffi_call(target, results, custom_call_api_version=3,
                          legacy_backend_config=config)
  outs = tuple(call(*operands))
  # Inside shard_map the results vary over the devices as the operands do; a
  # custom call's results are typed as not varying.
  varying = tuple(sorted(set().union(*(_varying(a) for a in operands))))
  if varying:
    outs = tuple(lax.pcast(v, varying, to="varying") for v in outs)
  return outs


def _sums_compiled(x, f):
  p, r, c = x.shape
  out = jax.ShapeDtypeStruct((p, c), jnp.float32)
  kind = 1 if x.dtype == jnp.bfloat16 else 0
  return _call_compiled(_TARGET, (out, out), f"{p},{r},{c},{kind}", x, f)


@custom_vmap
def _sums(x, f):
  return lax.platform_dependent(x, f, cpu=_sums_compiled, default=_sums_in_jax)


@_sums.def_vmap
def _sums_vmap(axis_size, in_batched, x, f):
  # The mapped axis becomes part of P (it is leading: custom_vmap moves it).
  x_batched, f_batched = in_batched
  if not x_batched:
    x = jnp.broadcast_to(x, (axis_size,) + x.shape)
  if not f_batched:
    f = jnp.broadcast_to(f, (axis_size,) + f.shape)
  s1, s2 = _sums(x.reshape((-1,) + x.shape[2:]), f.reshape((-1,) + f.shape[2:]))
  shape = (axis_size,) + f.shape[1:]
  return (s1.reshape(shape), s2.reshape(shape)), (True, True)


@jax.custom_jvp
def _framed_sums(x, f):
  return _sums(x, f)


@_framed_sums.defjvp
def _framed_sums_jvp(primals, tangents):
  x, f = primals
  tx, tf = tangents
  s1, s2 = _framed_sums(x, f)
  d = x.astype(jnp.float32) - f[:, None, :]
  td = tx.astype(jnp.float32) - tf[:, None, :]
  return (s1, s2), (jnp.sum(td, axis=1), 2 * jnp.sum(d * td, axis=1))


def framed_sums(x, frame, axes: tuple[int, ...]):
  """``(sum(x - frame), sum((x - frame)^2))`` over ``axes`` (keepdims), in
  float32, with the compiled loop; only where :func:`usable` says so.
  ``frame`` (float32) has the shape of the sums."""
  shape = layout(x.shape, axes)
  if shape is None:
    raise ValueError(f"no (P, R, C) view of x {x.shape} sums axes {axes} (see cpu_sums.layout)")
  p, r, c = shape
  s1, s2 = _framed_sums(x.reshape(p, r, c), frame.reshape(p, c))
  return s1.reshape(frame.shape), s2.reshape(frame.shape)


def _refine_compiled(x, f, s1, s2):
  p, r, c = x.shape
  out = jax.ShapeDtypeStruct((p, c), jnp.float32)
  kind = 1 if x.dtype == jnp.bfloat16 else 0
  # Rows as (P, R): a bfloat16 (P, R, 1) operand was copied first (XLA).
  x = x.reshape(p, r) if c == 1 else x
  return _call_compiled(_REFINE_TARGET, (out, out, out), f"{p},{r},{c},{kind}", x, f, s1, s2)


def _refine(in_jax, x, f, s1, s2):
  """The compiled call on CPU, ``in_jax`` elsewhere; under ``vmap`` the mapped
  axis becomes part of P, as in :func:`_sums_vmap` (one decision for all)."""
  def default(x, f, s1, s2):
    keep = lambda v: v.reshape(v.shape[0], 1, v.shape[1])
    return tuple(v.reshape(s1.shape) for v in in_jax(x, keep(f), keep(s1), keep(s2)))

  @custom_vmap
  def call(x, f, s1, s2):
    return lax.platform_dependent(x, f, s1, s2, cpu=_refine_compiled, default=default)

  @call.def_vmap
  def call_vmap(axis_size, in_batched, x, f, s1, s2):
    def fold(v, batched):
      v = v if batched else jnp.broadcast_to(v, (axis_size,) + v.shape)
      return v.reshape((-1,) + v.shape[2:])
    outs = _refine(in_jax, *(fold(v, b) for v, b in zip((x, f, s1, s2), in_batched, strict=True)))
    shape = (axis_size,) + (s1.shape[1:] if in_batched[2] else s1.shape)
    return tuple(v.reshape(shape) for v in outs), (True, True, True)

  return call(x, f, s1, s2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _refined(in_jax, n, x, f, s1, s2):
  return _refine(in_jax, x, f, s1, s2)


@_refined.defjvp
def _refined_jvp(in_jax, n, primals, tangents):
  # The frame takes no derivative; the mean offset and the sum of squared
  # deviations are m = s1 / n and q = s2 - s1^2 / n whatever the frame, with
  # fewer digits lost: their derivatives are those of these formulas.
  s1 = primals[2]
  _, _, t1, t2 = tangents
  g, m, q = _refined(in_jax, n, *primals)
  return (g, m, q), (jnp.zeros_like(g), t1 / n, jnp.where(q > 0, t2 - 2 * (s1 / n) * t1, 0))


def refine_moments(x, frame, s1, s2, axes: tuple[int, ...], *, in_jax):
  """The statistics of :func:`moments.block_moments` from its framed sums
  ``s1 = sum(x - frame)`` and ``s2 = sum((x - frame)^2)`` over ``axes``
  (float32, keepdims), as one compiled call (``jaxnorm_refine_moments``):
  ``(g, m, q)``, a frame, the mean offset from it and the sum of squared
  deviations, with the second look of the loops (``REFRAME``): ``g`` is
  ``frame``, unless it is far from the mean for some feature
  (``m^2 > 15 q / n``), where the sums are taken again in the frame
  ``g = frame + m``. Otherwise the call reads the statistics only.
  ``in_jax(x, frame, s1, s2)`` (on the ``(P, R, C)`` view, statistics
  ``(P, 1, C)``) is the same in JAX's operations, for other backends. Only
  where ``usable(x, axes, refine=True)``."""
  shape = layout(x.shape, axes)
  if shape is None:
    raise ValueError(f"no (P, R, C) view of x {x.shape} sums axes {axes} (see cpu_sums.layout)")
  p, r, c = shape
  flat = lambda v: v.reshape(p, c)
  outs = _refined(in_jax, r, x.reshape(p, r, c), flat(frame), flat(s1), flat(s2))
  return tuple(v.reshape(s1.shape) for v in outs)


# Flags of the fused row normalization (_cpu_sums.c).
_ROW_SCALE, _ROW_BIAS, _ROW_RMS = 1, 2, 4


def rows_usable(x, axes: tuple[int, ...], bf16: bool = False) -> bool:
  """Whether :func:`row_norm` runs the compiled loop for ``x`` normalized over
  ``axes``: float32, the reduced axes trailing, and :func:`usable`'s
  conditions. With ``bf16`` (the compiled backward pass,
  :mod:`jaxnorm._src.fused_grad`, which reads and writes bfloat16 rows),
  bfloat16 ``x`` too.

  bfloat16 rows (read and written as bfloat16, rounded to nearest even in
  the loop) were tried and left out: LN fwd bf16 moved by -0.12 to +0.04x
  Flax's time over the sweep's four row shapes, but RMS fwd bf16 8192x1024
  went from 0.98 to 1.37-1.39 (in-process A/B, 21 rounds, two runs); XLA's
  bf16 programs already run near memory speed there."""
  shape = layout(x.shape, axes)
  dtypes = (jnp.float32, jnp.bfloat16) if bf16 else (jnp.float32,)
  return (shape is not None and shape[2] == 1 and x.dtype in dtypes and enabled()
          and _unpartitioned(x))


def forward_enabled(rows: bool) -> bool:
  """Whether a forward pass outside a derivative takes the fused call
  (:func:`row_norm`, :func:`column_norm`) where it applies.

  A custom call's output cannot fuse with what consumes it: an elementwise
  op after the layer (ReLU after batch norm, a modulation after layer norm)
  is then a loop of its own, one more write and read of the activations,
  where XLA's output step takes the op into its own loop. Measured against
  the statistics' compiled sums followed by XLA's output step (in-process
  A/B, 21 rounds, times against Flax's; the case of
  ``benchmarks/run.py --sweep``'s "BN train fwd+ReLU" rows):

  * Columns (batch norm): BN train fwd then ReLU took 1.19-1.68x Flax's
    time with the fused call, 0.83-1.11 without (8x8x8x64 to 64x32x32x128);
    alone, the two are within noise of each other except at 8x8x8x64 (0.37
    against 0.85). A ResNet-18 forward pass in training mode (no gradient)
    took 1.04-1.10x against 0.97-1.04. Off unless
    ``JAXNORM_CPU_COLUMN_FWD=1``.
  * Rows (layer and RMS norm): alone 0.53-0.76x Flax's time with the call,
    0.78-1.05 without; with a ReLU after it 1.04-1.20 against 0.94-1.05.
    The usual consumer of a layer norm is a matrix product, which does not
    fuse with it either way, so the call stays on; ``JAXNORM_CPU_ROW_FWD=0``
    turns it off (for layer norms followed by an elementwise modulation).
  """
  if rows:
    return os.environ.get("JAXNORM_CPU_ROW_FWD", "1") != "0"
  return os.environ.get("JAXNORM_CPU_COLUMN_FWD", "0") == "1"


def grad_enabled(rows: bool) -> bool:
  """Whether the derivative takes the compiled backward pass
  (:mod:`jaxnorm._src.fused_grad`) where the fused forward pass applies.

  Rows (layer and RMS norm): yes, unless ``JAXNORM_CPU_ROW_GRAD=0``.
  Columns (batch norm): only with ``JAXNORM_CPU_COLUMN_GRAD=1``. Alone,
  BN fwd+bwd f32 takes 0.60-0.64x Flax's time with it against 0.89-0.97
  without (the sweep's three shapes; in-process A/B, 21 rounds), but the
  ResNet-18 training step of ``benchmarks/run.py --models`` took 1.06x
  Flax's time with it against 0.98 without (batch 8, in-process A/B, 21
  steps; 1.08 and 1.13 against 0.94 in two variants; batch 32: 1.07 against
  0.91). A call that does nothing, in its place, still made the
  step slower (1.03 against 0.96): XLA's program around a custom call in
  the backward pass of a convolutional network is slower, whatever the call
  does (my reading; the loop itself took 14 ms of the 326 ms step)."""
  if rows:
    return os.environ.get("JAXNORM_CPU_ROW_GRAD", "1") != "0"
  return os.environ.get("JAXNORM_CPU_COLUMN_GRAD", "0") == "1"


def _affine_operands(eps, scale, bias, flags=0):
  """The operands eps, scale, bias of a fused call (one float where a
  parameter is absent) and the flags that say which are there."""
  none = jnp.zeros((1,), jnp.float32)
  flags |= (_ROW_SCALE if scale is not None else 0) | (_ROW_BIAS if bias is not None else 0)
  return (eps.reshape(1), none if scale is None else scale,
          none if bias is None else bias), flags


def _fused_call(compiled, in_jax, args, scale, bias, fold_rows: bool):
  """``compiled(*args, scale, bias)`` on the CPU backend and
  ``in_jax(*args, scale, bias)`` on others, as a ``custom_vmap`` function.
  Under ``vmap``, with ``fold_rows`` and only ``args[0]`` (``x``) batched,
  the mapped axis becomes more rows of ``x``; otherwise ``in_jax`` runs
  under ``vmap``."""
  params = tuple(v for v in (scale, bias) if v is not None)
  n = len(args)

  def unpack(rest):
    it = iter(rest[n:])
    return (*rest[:n], next(it) if scale is not None else None,
            next(it) if bias is not None else None)

  def on_cpu(*operands):
    return compiled(*unpack(operands))

  def reference(*operands):
    return tuple(in_jax(*unpack(operands)))

  @custom_vmap
  def call(*operands):
    return lax.platform_dependent(*operands, cpu=on_cpu, default=reference)

  @call.def_vmap
  def call_vmap(axis_size, in_batched, *operands):
    if fold_rows and not any(in_batched[1:]):
      x = operands[0]
      if not in_batched[0]:
        x = jnp.broadcast_to(x, (axis_size,) + x.shape)
      y, mean, var = call(x.reshape((-1, x.shape[-1])), *operands[1:])
      return ((y.reshape(x.shape), mean.reshape(x.shape[:2]), var.reshape(x.shape[:2])),
              (True, True, True))
    axes = tuple(0 if b else None for b in in_batched)
    return jax.vmap(reference, in_axes=axes)(*operands), (True, True, True)

  return call(*args, *params)


def _row_norm_compiled(x, eps, scale, bias, *, rms):
  p, r = x.shape
  operands, flags = _affine_operands(eps, scale, bias, _ROW_RMS if rms else 0)
  stats = jax.ShapeDtypeStruct((p,), jnp.float32)
  return _call_compiled(_ROWS_TARGET, (jax.ShapeDtypeStruct((p, r), jnp.float32), stats, stats),
                        f"{p},{r},{flags}", x, *operands)


def row_norm(x, eps, scale, bias, *, rms: bool, in_jax):
  """Layer norm (or RMS norm, ``rms=True``) of each row of ``x`` (``(P, R)``,
  float32), statistics and output in one compiled loop: ``(y, mean, var)``
  with ``y`` ``(P, R)`` and the statistics ``(P,)``, in float32. ``eps`` is a
  float32 scalar, ``scale`` and ``bias`` ``(R,)`` float32 or ``None``;
  ``in_jax(x, eps, scale, bias)`` computes the same in JAX's operations (other
  backends, and parameters batched under ``vmap``; with shared parameters the
  mapped axis becomes more rows). Only where :func:`rows_usable` says so; not
  differentiable (layers call it from the primal side of their
  ``custom_jvp``)."""
  compiled = lambda x, eps, scale, bias: _row_norm_compiled(x, eps, scale, bias, rms=rms)
  return _fused_call(compiled, in_jax, (x, eps), scale, bias, fold_rows=True)


def _column_norm_compiled(x, f, eps, scale, bias):
  r, c = x.shape
  operands, flags = _affine_operands(eps, scale, bias)
  stats = jax.ShapeDtypeStruct((c,), jnp.float32)
  return _call_compiled(_COLUMNS_TARGET, (jax.ShapeDtypeStruct((r, c), jnp.float32), stats, stats),
                        f"{r},{c},{flags}", x, f, *operands)


def column_norm(x, frame, eps, scale, bias, *, in_jax):
  """Batch norm's training forward pass on ``x`` of shape ``(R, C)``
  (float32, statistics over ``R``), statistics and output in one compiled
  call: ``(y, mean, var)``, the statistics ``(C,)`` in float32. ``frame``
  ``(C,)`` is the statistics' frame (float32), ``eps`` a float32 scalar,
  ``scale`` and ``bias`` ``(C,)`` float32 or ``None``;
  ``in_jax(x, frame, eps, scale, bias)`` computes the same in JAX's
  operations (other backends, and under ``vmap``, where each example has its
  own statistics). Only where :func:`usable` says so for the column sums;
  not differentiable (called from the primal side of a ``custom_jvp``)."""
  return _fused_call(_column_norm_compiled, in_jax, (x, frame, eps), scale, bias,
                     fold_rows=False)
