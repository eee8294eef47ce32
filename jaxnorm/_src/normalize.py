"""The one entry that normalizes ``x`` with its own statistics, its closed-form
derivative, the normalize step with given statistics, and the running-average
update.

Every layer with batch statistics (batch norm plain, ghost and renorm, layer,
RMS, group and instance norm, PyTorch's batch norm) calls
:func:`normalize_batch`; inference-mode batch norm calls
:func:`normalize_with`. Statistics come from :mod:`jaxnorm._src.moments`.

**Closed-form derivative.** For real inputs :func:`normalize_batch` is a
``jax.custom_jvp`` whose tangent rule is the derivative of a normalization
layer in closed form. The rule is linear in the tangents, so JAX transposes it
for reverse mode; forward mode, ``jacfwd`` and higher orders work as for any
JAX function. With the mask ``m`` (all ones without one) and
``<v> = sum(m * v) / sum(m)`` over the reduction axes (each block for ghost
batch norm; all devices of ``axis_name``), ``rstd = 1 / sqrt(var + eps)``,
``xhat = (x - mean) * rstd`` and ``y = g * (R * xhat + D) + b`` (``R = 1``,
``D = 0`` except in batch renorm, where both are constants), the tangents
(``dx``, ``dg``, ``db``, ``deps``) map to::

  a     = <dx>                      (0 for RMS statistics)
  c     = rstd * <(x - mean) * dx>
  dxhat = rstd * (dx - a - xhat * c) - rstd**2 / 2 * xhat * deps
  dy    = g * R * dxhat + dg * (R * xhat + D) + db
  dmean = a,   dvar = 2 * c / rstd

Transposed, these are Ioffe & Szegedy's backward pass
(``dx = g * rstd * (dy - <dy> - xhat * <dy * xhat>)`` without a mask). The
backward pass reads ``x`` and ``dy`` once for two per-block sums and once more
for ``dx``, and needs one all-reduce under ``axis_name`` (the psum of those
sums), as Flax's does. On XLA's CPU backend, layer and RMS norm on float32
rows (where the forward pass is one compiled call) and on bfloat16 rows in
and out take the tangents as one
primitive instead, whose transpose is one compiled backward pass
(:mod:`jaxnorm._src.fused_grad`); the rule above is its forward mode, its
higher derivatives and its fallback.

**Masks.** Masked-out entries take no part in the statistics. Their outputs
are ``x`` normalized with the statistics, as in Flax, with the same exact
derivatives (a loss on them differentiates as in Flax). NaN or inf padding
reaches nothing: the statistics' sums read selected entries only, and every
full-size term of the tangent rule reads ``x`` through ``jnp.where`` (a
non-finite masked-out entry counts as 0 there, never multiplied by a mask), so
its output is NaN or inf but no gradient is.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxnorm._src import cpu_sums
from jaxnorm._src import fused_grad
from jaxnorm._src import moments as mom_lib


class Config(NamedTuple):
  """Static description of one normalization (hashable)."""

  view: mom_lib.View               # x in blocks (reduction axes, block axis)
  ghost: bool                      # each block keeps its own statistics
  pool: int                        # channels pooled per group (group norm)
  rms: bool                        # mean squares, no centering
  axis_name: object                # mapped axis of the statistics
  groups: tuple | None             # axis_index_groups, as tuples
  out_dtype: object                # output dtype
  plain_first: bool = False        # forward: try plain sums first (moments.py)


class Batch(NamedTuple):
  """What :func:`normalize_batch` returns.

  ``mean`` and ``var`` have the features' shape (one entry per block and
  feature for ghost batch norm, blocks first); ``num_values`` is the number of
  selected values behind them (all devices).
  """

  y: jax.Array
  mean: jax.Array
  var: jax.Array
  num_values: jax.Array


def normalize_batch(
    x: jax.Array,
    *,
    axes: tuple[int, ...],
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    eps=1e-5,
    mask: jax.Array | None = None,
    axis_name=None,
    axis_index_groups=None,
    dtype=None,
    rms: bool = False,
    pool: int = 1,
    blocks: int | None = None,
    ghost: bool = False,
    renorm: tuple | None = None,
    plain_first: bool = False,
) -> Batch:
  """Normalizes ``x`` with its own statistics over ``axes``.

  Args:
    x: floating-point or complex input.
    axes: reduction axes (sorted non-negative ints).
    scale, bias: ``None`` or arrays broadcastable against ``x``.
    eps: added to the variance.
    mask: boolean, broadcastable to ``x``: entries left out.
    axis_name, axis_index_groups: statistics across a mapped axis.
    dtype: output dtype (default ``x.dtype``).
    rms: RMS statistics (no centering).
    pool: pool the statistics over groups of this many consecutive channels
      of the last axis (group norm).
    blocks: blocks along ``axes[0]`` (default: :func:`moments.blocks_for`).
    ghost: each block is normalized with its own statistics.
    renorm: ``(running_mean, running_var, r_max, d_max)`` for batch renorm,
      the running statistics broadcastable against ``x``.
    plain_first: forward passes try plain sums first (statistics across
      features: layer and group norm; see :func:`moments._plain_or_shifted`).

  Returns:
    :class:`Batch`; the statistics are in ``stat_dtype(x.dtype)``.
  """
  if blocks is None:
    blocks = mom_lib.blocks_for(x, axes)
  groups = None if axis_index_groups is None else tuple(
      tuple(int(i) for i in g) for g in axis_index_groups)
  view = mom_lib.block_view(tuple(x.shape), tuple(axes), int(blocks))
  config = Config(view, bool(ghost), int(pool), bool(rms), axis_name, groups,
                  jnp.dtype(x.dtype if dtype is None else dtype), bool(plain_first))
  xv = x.reshape(view.shape)
  mv = None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(view.shape)
  expand = lambda v: None if v is None else _to_view(v, x.shape, view)
  scale_v, bias_v = expand(scale), expand(bias)
  renorm_v = None
  if renorm is not None:
    run_mean, run_var, r_max, d_max = renorm
    renorm_v = (expand(run_mean), expand(run_var), r_max, d_max)
  real = mom_lib.real_dtype(x.dtype)
  eps = jnp.asarray(eps, real)
  if jnp.issubdtype(x.dtype, jnp.floating):
    y, mean, var, count = _fused(config, xv, scale_v, bias_v, mv, eps, renorm_v)
  else:
    y, mean, var, count = _forward_jit(config, xv, scale_v, bias_v, mv, eps, renorm_v)
  stats_shape = tuple(d for a, d in enumerate(x.shape) if a not in axes)
  return Batch(y.reshape(x.shape), *(_from_view(v, config, stats_shape)
                                     for v in (mean, var, count)))


def _to_view(v, shape, view):
  """An array of ``x``'s rank, broadcastable to ``shape``, in the block view."""
  a0 = view.block_axis
  if a0 is None:
    return v
  split = (1, 1) if v.shape[a0] == 1 else (view.shape[a0], view.shape[a0 + 1])
  return jnp.reshape(v, v.shape[:a0] + split + v.shape[a0 + 1:])


def _from_view(v, config, stats_shape):
  """Drops the reduction axes; ghost statistics keep the block axis first."""
  view = config.view
  if config.ghost and view.block_axis is None:        # a single chunk
    return mom_lib.first_block(v, view).reshape((1,) + stats_shape)
  if config.ghost:
    # Every reduction axis of the view comes after the block axis, so moving
    # the block axis to the front leaves their positions unchanged.
    v = jnp.squeeze(jnp.moveaxis(v, view.block_axis, 0), view.axes)
    return v.reshape((view.shape[view.block_axis],) + stats_shape)
  return mom_lib.first_block(v, view).reshape(stats_shape)


def _moments(config, xv, mask, frame_copies=True, compiled_sums=True):
  return mom_lib.block_moments(
      xv, config.view, mask=mask, pool=config.pool, rms=config.rms,
      merge_blocks=not config.ghost, axis_name=config.axis_name,
      axis_index_groups=config.groups, plain_first=config.plain_first,
      frame_copies=frame_copies, compiled_sums=compiled_sums)


def _renorm_factors(m, renorm, eps):
  """Batch renorm's ``r`` and ``d`` (constants for differentiation)."""
  run_mean, run_var, r_max, d_max = renorm
  real = m.var.dtype
  sigma_b = jnp.sqrt(m.var + eps)
  sigma = jnp.sqrt(run_var.astype(real) + eps)
  r_max = jnp.asarray(r_max, real)
  d_max = jnp.asarray(d_max, real)
  r = jnp.clip(sigma_b / sigma, 1 / r_max, r_max)
  # `mean - running mean` from the frame: `(shift - running) + mean_off` is
  # exact where the rounded mean is not (ulp(1e5) / 2 = 0.004 of a unit
  # spread reached `d`, and the output, at an offset of 1e5 once the running
  # mean had caught up with the batch's).
  if m.shift is None:
    from_running = m.mean - run_mean
  else:
    from_running = (m.shift - run_mean.astype(m.shift.dtype)) + m.mean_off
  d = jnp.clip(from_running / sigma, -d_max, d_max)
  return lax.stop_gradient(r), lax.stop_gradient(d)


def _centered(xs, m):
  """``x - mean`` in each block's frame; ``x`` itself for RMS statistics."""
  if m.shift is None:
    return xs
  # `x + (-shift)` is bitwise `x - shift`; the two spellings keep XLA from
  # sharing one full-size `x - shift` between the statistics and the output
  # (measured: BN forward 1.5x -> 0.9x of Flax's time).
  return (xs + (-m.shift)) - m.mean_off


def _outputs(config, xv, scale, bias, m, eps, renorm):
  sdt = mom_lib.stat_dtype(xv.dtype)
  rstd = lax.rsqrt(m.var + eps)
  mul, add = rstd, None
  if renorm is not None:
    r, d = _renorm_factors(m, renorm, eps)
    mul, add = rstd * r, d
  if scale is not None:
    s = scale.astype(sdt)
    mul = mul * s
    add = None if add is None else add * s
  if bias is not None:
    b = bias.astype(sdt)
    add = b if add is None else add + b
  if xv.dtype != sdt:
    # Low precision: the output converts `x` on its own, as each statistic's
    # sum does (moments.block_moments); a conversion shared with them is
    # written out at full size in float32 (LN fwd 8192x1024 bf16: 4.6x -> 1.7x
    # Flax's CPU time).
    xv = lax.optimization_barrier(xv)
  y = _centered(xv.astype(sdt), m) * mul
  if add is not None:
    y = y + add
  return (y.astype(config.out_dtype), m.mean, m.var, m.num_values.astype(m.var.dtype))


def _forward(config, xv, scale, bias, mask, eps, renorm):
  compiled = _compiled_forward(config, xv, scale, bias, mask, eps, renorm)
  if compiled is not None:
    return compiled
  return _outputs(config, xv, scale, bias, _moments(config, xv, mask), eps, renorm)


def _compiled_forward(config, xv, scale, bias, mask, eps, renorm):
  """The forward pass as one compiled call on XLA's CPU backend, where one
  applies (``None`` elsewhere): float32 in and out, no mask, no renorm, no
  ghost blocks or pooled channels, one block, statistics on this device, and
  parameters the same for every row (rows) or every value of a channel
  (columns).

  * Rows (layer and RMS norm over trailing axes, :func:`cpu_sums.row_norm`):
    each row's statistics and output from one read of ``x``, where this
    program (and Flax's) reads it twice.
  * Columns (batch norm on channels-last data, one slab, >= 16 channels,
    :func:`cpu_sums.column_norm`): each thread's column sums, one merge, then
    the output of the same rows by the same thread, whose second read of
    ``x`` comes from that core's cache where the rows fit there.

  Each is used where :func:`cpu_sums.forward_enabled` says so: rows by
  default, columns only with ``JAXNORM_CPU_COLUMN_FWD=1``, as a custom
  call's output cannot fuse with an elementwise op after the layer (the
  ReLU after a batch norm; measured there).

  Alone, measured against the statistics' compiled sums followed by XLA's
  output step (in-process A/B, 21-31 rounds, times against Flax's): LN fwd f32
  2048x1024 0.94 -> 0.69, 8192x1024 0.80 -> 0.56; RMS fwd f32 0.96-1.02 ->
  0.73-0.81 at the sweep's three larger row shapes; BN train fwd f32
  8x8x8x64 0.85 -> 0.65, 16x16x16x128 1.18-1.23 -> 0.90-0.95, unchanged at
  32x16x16x128 and 64x32x32x128.
  """
  plan = _fused_plan(config, xv, scale, bias, mask, renorm)
  if plan is None:
    return None
  view = config.view
  p, r, c = plan.shape
  rows = plan.rows
  scale_f, bias_f = plan.flat(scale), plan.flat(bias)

  def in_jax(x2, *rest):
    # The same layer in JAX's operations on the 2-D view (other backends,
    # and under vmap: any number of rows).
    eps, scale_f, bias_f = rest[-3:]
    cfg = config._replace(view=mom_lib.View(tuple(x2.shape), (1,) if rows else (0,), None))
    two_d = lambda v: None if v is None else v[None]
    y, mean, var, _ = _outputs(cfg, x2, two_d(scale_f), two_d(bias_f),
                               _moments(cfg, x2, None, compiled_sums=False), eps, None)
    return y, mean.reshape(-1), var.reshape(-1)

  eps = eps.astype(jnp.float32)
  if rows:
    y, mean, var = cpu_sums.row_norm(xv.reshape(p, r), eps, scale_f, bias_f, rms=config.rms,
                                     in_jax=in_jax)
  else:
    frame = lax.stop_gradient(mom_lib.probe_frame(xv, view.axes)).reshape(c)
    y, mean, var = cpu_sums.column_norm(xv.reshape(r, c), frame, eps, scale_f, bias_f,
                                        in_jax=in_jax)
  stats_shape = tuple(1 if a in view.axes else d for a, d in enumerate(xv.shape))
  count = jnp.full(stats_shape, r, jnp.float32)
  return y.reshape(xv.shape), mean.reshape(stats_shape), var.reshape(stats_shape), count


class _Plan(NamedTuple):
  """Where one compiled call applies (:func:`_fused_plan`)."""

  rows: bool                       # layer / RMS norm rows (else batch norm columns)
  shape: tuple[int, int, int]      # x as (P, R, C) (cpu_sums.layout)
  x_shape: tuple[int, ...]
  keep: int                        # parameters vary along x's axes from here on

  def flat(self, v):
    """A parameter (or its tangent) as a float32 vector, one value per
    position of ``x_shape[keep:]``; raises :class:`_PerRowParameter` where
    it varies over the rows."""
    if v is None:
      return None
    ndim, keep = len(self.x_shape), self.keep
    v = v.reshape((1,) * (ndim - v.ndim) + v.shape)
    if any(d != 1 for d in v.shape[:keep]) or not jnp.issubdtype(v.dtype, jnp.floating):
      raise _PerRowParameter
    return jnp.broadcast_to(v.astype(jnp.float32),
                            (1,) * keep + self.x_shape[keep:]).reshape(-1)


def _fused_plan(config, xv, scale, bias, mask, renorm, backward=False):
  """The compiled calls' conditions (:func:`_compiled_forward`; with
  ``backward``, :func:`_compiled_jvp`'s, which also takes bfloat16 rows in
  and out): a :class:`_Plan`, or ``None`` where they do not hold."""
  view = config.view
  bf16_rows = (backward and xv.dtype == jnp.bfloat16 and config.out_dtype == jnp.bfloat16
               and xv.ndim - 1 in view.axes)
  if (mask is not None or renorm is not None or config.ghost or config.pool != 1
      or config.axis_name is not None or view.block_axis is not None
      or not (bf16_rows or (xv.dtype == jnp.float32 and config.out_dtype == jnp.float32))):
    return None
  shape = cpu_sums.layout(xv.shape, view.axes)
  if shape is None:
    return None
  p, _, c = shape
  rows = c == 1
  if not (cpu_sums.rows_usable(xv, view.axes, bf16=bf16_rows) if rows else
          p == 1 and not config.rms and cpu_sums.usable(xv, view.axes)):
    return None
  if not backward and not cpu_sums.forward_enabled(rows):
    return None
  keep = min(view.axes) if rows else xv.ndim - 1
  plan = _Plan(rows, shape, tuple(xv.shape), keep)
  try:
    plan.flat(scale)
    plan.flat(bias)
  except _PerRowParameter:
    return None
  return plan


class _PerRowParameter(Exception):
  """A scale or bias that varies where the compiled forward pass needs it
  constant (:func:`_compiled_forward` does not apply)."""


# The forward pass and its rule each go through `jax.jit`: inside a jitted
# program the call is inlined (the same HLO); an eager call compiles the layer
# once per signature instead of dispatching, and compiling, each of its ~100
# operations one by one (measured: an eager value_and_grad of group_norm took
# 8 s before); and layers of one signature share one trace. The `jit` sits
# inside the `custom_jvp`, not around it: around it, a derivative traced the
# forward pass (with its plain-or-shifted `cond`) as well as the rule, whose
# forward pass is the one compiled. With that trace stubbed out, lowering a
# training step took 0.93 -> 0.75 s for the UNet block of
# `benchmarks/run.py --models` and 1.57 -> 1.27 s for ResNet-18 (median of 5
# alternating lowerings); the UNet step's compile time against Flax's
# (lowering and XLA, 5 alternating compiles) went from 1.19 to 0.93-1.02.
@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fused(config, xv, scale, bias, mask, eps, renorm):
  return _forward_jit(config, xv, scale, bias, mask, eps, renorm)


@_fused.defjvp
def _fused_jvp(config, primals, tangents):
  return _fused_jvp_jit(config, primals, tangents)


def _fused_jvp_traced(config, primals, tangents):
  compiled = _compiled_jvp(config, primals, tangents)
  return compiled if compiled is not None else _jvp_in_jax(config, primals, tangents)


_fused_jvp_jit = jax.jit(_fused_jvp_traced, static_argnums=0)


def _compiled_jvp(config, primals, tangents):
  """Where :func:`_compiled_forward` applies (and, for batch norm's columns,
  with ``JAXNORM_CPU_COLUMN_GRAD=1``, see :func:`cpu_sums.grad_enabled`):
  the primal outputs from the compiled forward pass, and the tangents
  ``dy``, ``dmean`` and ``dvar`` as one primitive
  (:func:`fused_grad.tangent`), which JAX transposes to one compiled
  backward pass (:func:`fused_grad.backward`): per row, one read of ``x``
  and ``dy`` from memory where JAX's transposed rule, and Flax's backward
  pass, make two or three. The closed-form rule (:func:`_jvp_in_jax`, on
  the 2-D view) is that primitive's forward-mode value, its higher
  derivatives and its fallback. ``None`` elsewhere.

  Measured against :func:`_jvp_in_jax` (times against Flax's, in-process
  A/B with ``JAXNORM_CPU_ROW_GRAD=0/1``, 21 rounds): LN fwd+bwd dx f32
  0.79-0.96 -> 0.26-0.48 over the sweep's four row shapes, with parameter
  gradients 0.37-0.95 -> 0.18-0.47; RMS 0.55-0.94 -> 0.37-0.60 and
  0.40-0.70 -> 0.21-0.49; bfloat16 rows (all 16 of the sweep's) 0.46-0.87
  -> 0.18-0.77. The transformer training steps of
  ``benchmarks/run.py --models``: 0.96 -> 0.98 (LayerNorm) and 0.97 -> 0.97
  (RMSNorm), within the noise.
  """
  xv, scale, bias, mask, eps, renorm = primals
  tx, tscale, tbias, _, teps, _ = tangents
  plan = _fused_plan(config, xv, scale, bias, mask, renorm, backward=True)
  if plan is None or not cpu_sums.grad_enabled(plan.rows):
    return None
  # The forward pass through `_fused` itself: its compiled call is not
  # differentiable, and a derivative of this rule (second order) takes
  # `_fused`'s rule again.
  out = _fused(config, *primals)
  y, mean, var, cnt = out
  p, r, c = plan.shape
  # Rows: (P, R), statistics over R; columns: (R, C), over R.
  view = (p, r) if plan.rows else (r, c)
  cfg = config._replace(view=mom_lib.View(view, (1,) if plan.rows else (0,), None))
  f32 = jnp.float32
  dy, dmean, dvar = fused_grad.tangent(
      xv.reshape(view), eps.astype(f32), plan.flat(scale), tx.reshape(view).astype(xv.dtype),
      None if scale is None else plan.flat(tscale), None if bias is None else plan.flat(tbias),
      teps.astype(f32), rms=config.rms, columns=not plan.rows,
      reference=functools.partial(_tangent_in_jax, cfg))
  return out, (dy.reshape(xv.shape).astype(y.dtype), dmean.reshape(mean.shape).astype(mean.dtype),
               dvar.reshape(var.shape).astype(var.dtype), jnp.zeros_like(cnt))


def _tangent_in_jax(cfg, x, eps, scale, tx, tscale, tbias, teps):
  """The closed-form tangents ``(dy, dmean, dvar)`` of ``x`` in its 2-D view
  ``cfg`` (rows or columns; the statistics' as vectors), parameters as
  vectors or ``None``: fused_grad's reference."""
  two_d = lambda v: None if v is None else v[None]
  _, (dy, dmean, dvar, _) = _jvp_in_jax(cfg, (x, two_d(scale), None, None, eps, None),
                                        (tx, two_d(tscale), two_d(tbias), None, teps, None))
  return dy, dmean.reshape(-1), dvar.reshape(-1)


def _jvp_in_jax(config, primals, tangents):
  xv, scale, bias, mask, eps, renorm = primals
  tx, tscale, tbias, _, teps, _ = tangents
  # A frame from the data, without trying plain sums first (forward passes
  # do, moments._plain_or_shifted): the `lax.cond` compiles both ways of
  # summing, which made a layer or group norm's fwd+bwd program compile 35%
  # longer (XLA: 216 -> 317 ms for a group norm) and the model benchmarks'
  # training steps 0.97 -> 1.02-1.18x Flax's compile time, for 0-0.1 of
  # Flax's step time.
  sdt = mom_lib.stat_dtype(xv.dtype)
  # Full precision with per-feature statistics over leading axes (batch,
  # instance and group norm on channels-last data): one shared frame, not the
  # three copies the forward pass and the other layers use (here and in
  # `shifts` below). In isolation the copies are a little faster (BN fwd+bwd
  # 32x16x16x128 / 64x32x32x128: 0.91 / 0.88x Flax's time with them, 0.95 /
  # 0.95 without; 8x8x8x64: 1.03 against 0.92), but a training step is
  # slower with them: the ResNet-18 step of `benchmarks/run.py --models` took
  # 1.01-1.08x Flax's time with them and 0.89-0.98 without (eight runs each,
  # alternating, 21 rounds; batch 32: 0.96-0.98 -> 0.87-0.93). Without the
  # copies each batch norm of the compiled step writes `x - frame` out once
  # (one more full-size loop fusion) and its sums read that array as it is,
  # the kind of sum XLA's YNNPACK reductions are fast at (moments.py,
  # `_plain_or_shifted`); my reading, not proven, is that this wins at the
  # step's cache-sized arrays. The step's temporary memory goes from 31 to
  # 45 MiB, Flax's amount. Layer norm (rows) keeps the copies: without,
  # LN fwd+bwd dx 8192x1024 takes 1.9x Flax's time; low precision too (BN
  # fwd+bwd bf16 64x32x32x128: 0.63 -> 0.92).
  shared_frame = xv.dtype == sdt and xv.ndim - 1 not in config.view.axes
  # The compiled sums (cpu_sums) take row statistics here (layer norm), not
  # column statistics. Columns: in the ResNet-18 step the loop made the step
  # slower (0.94-0.96 -> 1.03x Flax's time, two runs each,
  # `JAXNORM_CPU_KERNEL=0/1`), where XLA's own sums of the shared
  # `x - frame` below run on both cores and the loop, at those sizes (0.5M
  # values), on one. Rows: LN fwd+bwd dx 8192x1024 1.12 -> 0.96x Flax's
  # time, 4x128x4096 0.90 -> 0.76, the other f32 LN fwd+bwd rows of the
  # sweep -0.08 to +0.02 (in-process A/B, 21 rounds).
  #
  # bfloat16 columns take the loop too: it reads `x` as it is, where XLA's
  # sums convert it inside each fusion. BN fwd+bwd bf16 8x8x8x64 0.97-0.99
  # -> 0.91-0.96x Flax's time, 16x16x16x64 0.75-0.88 -> 0.72-0.79,
  # 32x16x16x128 0.71 -> 0.65, 64x32x32x128 0.74 -> 0.75 (in-process A/B,
  # 21-31 rounds).
  rows = xv.ndim - 1 in config.view.axes
  m = _moments(config._replace(plain_first=False), xv, mask, frame_copies=not shared_frame,
               compiled_sums=rows or xv.dtype == jnp.bfloat16)
  out = _outputs(config, xv, scale, bias, m, eps, renorm)
  axes = config.view.axes
  block_axis = config.view.block_axis
  zero = jnp.zeros((), sdt)

  xs = xv.astype(sdt)
  dx = tx.astype(sdt)
  # d = x - frame per block (x for RMS); x - mean = d - mean_off. Three
  # copies of the frame (see moments.block_moments): one per full-size use
  # (the tangent sums, the tangent's `d` term, `xhat`), so that no `x - frame`
  # shared by a reduction and another consumer is written out at full size.
  # Low precision: each use converts `x` on its own, as in the forward pass
  # (a shared float32 conversion is written out at full size).
  xs3 = ((xs,) * 3 if xv.dtype == sdt else
         tuple(v.astype(sdt) for v in lax.optimization_barrier((xv,) * 3)))
  if m.shift is None:
    d_sel, d, d_hat = xs3
  else:
    shifts = (m.shift,) * 3 if shared_frame else lax.optimization_barrier((m.shift,) * 3)
    d_sel, d, d_hat = (v - sh for v, sh in zip(xs3, shifts, strict=True))
  if mask is not None:
    # The statistics' sums read selected entries only; the output term reads
    # every finite entry (a masked-out output is the same formula), and 0 for
    # non-finite padding, whose output is NaN or inf and whose derivative
    # must not reach anything else.
    dx_sel = jnp.where(mask, dx, zero)
    d_sel = jnp.where(mask, d_sel, zero)
    finite = mask | jnp.isfinite(d)
    d = jnp.where(finite, d, zero)
    d_hat = jnp.where(finite, d_hat, zero)
  else:
    dx_sel = dx

  def block_sums(*values):
    return tuple(mom_lib.pool_channels(jnp.sum(v, axis=axes, keepdims=True), config.pool)
                 for v in values)

  def total(v):
    # Per-block sums -> the statistics' sums (blocks merged, all devices).
    if block_axis is not None and not config.ghost:
      v = jnp.sum(v, axis=block_axis, keepdims=True)
    return v

  count = m.num_values.astype(m.var.dtype)
  inv_n = 1.0 / jnp.maximum(count, 1)
  rstd = lax.rsqrt(m.var + eps)
  sums: tuple[jax.Array, ...]
  if config.rms:
    (e,) = block_sums(d_sel * dx_sel)
    sums = (total(e),)
    if config.axis_name is not None:
      sums = lax.psum(sums, config.axis_name, axis_index_groups=config.groups)
    a = None
    c = rstd * sums[0] * inv_n
    off = None
  else:
    ab, eb = block_sums(dx_sel, d_sel * dx_sel)
    # <(x - mean) dx> = <d dx> - mean_off <dx>, per block before merging.
    sums = (total(ab), total(eb - m.mean_off * ab))
    if config.axis_name is not None:
      sums = lax.psum(sums, config.axis_name, axis_index_groups=config.groups)
    a = sums[0] * inv_n
    c = rstd * sums[1] * inv_n
    off = m.mean_off

  R, D = (None, None) if renorm is None else _renorm_factors(m, renorm, eps)
  g = None if scale is None else scale.astype(sdt)
  G = g if R is None else (R if g is None else g * R)
  # dxhat = rstd dx - rstd h d + (off rstd h - rstd a), h = rstd c + rstd^2 deps / 2.
  h = rstd * c + 0.5 * rstd * rstd * teps
  g_const = G is None or all(G.shape[i] == 1 for i in axes)
  if g_const:
    # Per-feature factors multiply the small per-block arrays; the full-size
    # terms are `dx` and `d` alone, so the transposed program sums `dy` and
    # `dy * d` straight from the inputs.
    k = rstd if G is None else G * rstd
    d_coef = -k * h
    const = -k * a if a is not None else 0.0
    if off is not None:
      const = const + k * h * off
    if tscale is not None:
      ts = tscale.astype(sdt)
      gain = ts if R is None else ts * R
      d_coef = d_coef + gain * rstd
      const = const + (0.0 if off is None else -gain * rstd * off)
      if D is not None:
        const = const + ts * D
    dy = k * dx + d * d_coef + const
  else:
    # The scale varies along the reduced axes (layer norm): the same
    # per-block factors inside, `G` outside, so the transposed program's
    # sums read `G * dy` and `d` with no per-block array broadcast to full
    # size (each would be written out: measured 3 full-size temporaries in
    # layer norm's backward pass with `xhat` written out, against Flax's 1).
    # For RMS norm with the features split over devices, those sums then do
    # not wait for the forward's statistics, and XLA all-reduces them together
    # with the forward's sum of squares (one all-reduce in all, as Flax).
    # `xhat` (for the scale's gradient, a column sum) gets its own copies of
    # the per-row `off` and `rstd`: shared with the other full-size uses,
    # their broadcasts were written out at full size (LN fwd+bwd returning
    # y, dx and the parameter gradients: 0.84x -> 0.67x Flax's CPU time,
    # geometric mean over the sweep's 16 rows).
    off_h, rstd_h = lax.optimization_barrier((off, rstd))
    xhat = (d_hat if off is None else d_hat - off_h) * rstd_h
    if mask is not None:
      # A finite masked-out entry can still overflow `xhat` (3e38 with
      # rstd > 1.2): its inf, times a zero cotangent, made the scale's
      # gradient NaN.
      xhat = jnp.where(mask | jnp.isfinite(xhat), xhat, zero)
    if off is None:
      # RMS statistics.
      v, rstd_x = None, rstd
    else:
      # Layer norm: `x - mean` in full size, `(d - off)`, so that `h` is
      # used once. XLA then fuses the transposed program's two row sums and
      # `dx` into one YNNPACK fusion at large row counts, as it does Flax's
      # backward pass (one read of `x` and `dy` for all three; with
      # `d * (-rstd h) + rstd h off`, three fusions read `dy` three times).
      # `rstd` gets its own copy: shared with `y` and `xhat`, its broadcast
      # was written out at full size (bf16 fwd+bwd with parameter
      # gradients). Measured (wall time against Flax, interleaved, f32 /
      # bf16): LN fwd+bwd dx 8192x1024 1.17 -> 1.03 / 1.03 -> 0.41,
      # 16384x1024 1.21 -> 1.05 / 1.03 -> 0.63, 8192x512 1.23 -> 1.13 /
      # 1.00 -> 0.79; the rows with parameter gradients, and the rows of
      # 256-2048 (XLA keeps three fusions there), move by -0.12 to +0.07.
      d = d - lax.optimization_barrier(off)
      v = None if a is None else -rstd * a
      rstd_x = lax.optimization_barrier(rstd)
    if xv.dtype == sdt:
      # Full precision: each full-size use of the transposed program (the
      # two sums and `dx`) multiplies the cotangent by its own copy of `G`;
      # one shared `G * dy` was written out at full size (LN/RMS fwd+bwd:
      # 0.90x -> 0.78x Flax's CPU time over the sweep's 16 f32 rows, LN dx at
      # 8192x1024 2.1x -> 1.3x). With low-precision `dy`, which each use
      # would convert again, the shared product is faster (measured).
      Ga, Gb, Gc = lax.optimization_barrier((G, G, G))
      dy = Ga * (rstd_x * dx) + Gb * (d * (-rstd * h))
      if v is not None:
        dy = dy + Gc * v
    else:
      inner = rstd_x * dx + d * (-rstd * h)
      dy = G * (inner if v is None else inner + v)
    if tscale is not None:
      ts = tscale.astype(sdt)
      dy = dy + ts * (xhat if R is None else R * xhat + D)
  if tbias is not None:
    dy = dy + tbias.astype(sdt)
  y, mean, var, cnt = out
  dmean = jnp.zeros_like(mean) if a is None else jnp.broadcast_to(a, mean.shape).astype(mean.dtype)
  dvar = jnp.broadcast_to(2.0 * c / rstd, var.shape).astype(var.dtype)
  return out, (dy.astype(y.dtype), dmean, dvar, jnp.zeros_like(cnt))


_forward_jit = jax.jit(_forward, static_argnums=0)


def normalize_with(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    *,
    eps,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    dtype=None,
) -> jax.Array:
  """``(x - mean) * rsqrt(var + eps) * scale + bias`` with given statistics
  (all broadcastable against ``x``), in ``stat_dtype``.

  With a mask, non-finite masked-out entries give NaN or inf outputs that are
  constant for differentiation, so they reach no gradient.
  """
  sdt = mom_lib.stat_dtype(x.dtype)
  out_dtype = x.dtype if dtype is None else dtype
  mul = lax.rsqrt(var.astype(mom_lib.real_dtype(x.dtype)) + eps)
  add = None
  if scale is not None:
    mul = mul * scale.astype(sdt)
  if bias is not None:
    add = bias.astype(sdt)

  def apply(v, mean, mul, add):
    y = (v.astype(sdt) - mean.astype(sdt)) * mul
    return (y if add is None else y + add).astype(out_dtype)

  if mask is None:
    return apply(x, mean, mul, add)
  # Non-finite padding: its output is NaN or inf as computed, but constant
  # for differentiation; everything else differentiates through a copy of
  # `x` in which that padding is 0, so no NaN reaches a gradient.
  finite = mask | jnp.isfinite(x)
  safe = jnp.where(finite, x, jnp.zeros((), x.dtype))
  return jnp.where(finite, apply(safe, mean, mul, add),
                   lax.stop_gradient(apply(x, mean, mul, add)))


def update_running(
    state,
    mean: jax.Array,
    var: jax.Array,
    *,
    momentum,
    count: jax.Array | None = None,
    selected: jax.Array | None = None,
    unbiased: bool = False,
    cumulative: bool = False,
):
  """The running-average update of batch norm, Flax's and PyTorch's.

  ``state[k] <- (1 - f) * state[k] + f * batch[k]`` for ``mean`` and ``var``,
  keeping the state's dtype, with

  * Flax/Keras: ``f = 1 - momentum`` (``momentum`` is the decay);
  * PyTorch: ``f = momentum`` (the new batch's weight; pass ``1 - torch's``
    to keep one convention here: callers pass ``momentum`` as the decay),
    ``unbiased=True`` multiplies the batch variance by ``n / (n - 1)``
    (``count``; 1 when ``n <= 1``), and ``cumulative=True`` (PyTorch's
    ``momentum=None``) uses ``f = 1 / num_batches_tracked`` after the
    increment. ``num_batches_tracked``, when in ``state``, is incremented.

  Features where ``selected`` (boolean, the features' shape) is False keep
  their state: a mask that leaves a feature no entries gives no statistics.
  """
  new = dict(state)
  if unbiased:
    n = jnp.asarray(count, var.dtype)
    var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1), 1)
  tracked = state.get("num_batches_tracked")
  if tracked is not None:
    new["num_batches_tracked"] = tracked + 1
  seen = jnp.asarray(0 if tracked is None else tracked) + 1
  for key, batch in (("mean", mean), ("var", var)):
    if key not in state:
      continue
    old = state[key]
    dt = jnp.result_type(old.dtype, batch.dtype) if jnp.iscomplexobj(batch) else old.dtype
    # The cumulative weight in the state's own precision (float64 state: a
    # float32 1/3 moved the running mean of values near 1e4 by 3e-4).
    weight = 1 / seen.astype(jnp.finfo(dt).dtype) if cumulative else 1 - momentum
    updated = ((1 - weight) * old + weight * batch).astype(dt)
    new[key] = updated if selected is None else jnp.where(selected, updated, old.astype(dt))
  return new
