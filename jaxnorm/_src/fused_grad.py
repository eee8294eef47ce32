"""The backward pass of layer, RMS and batch norm as one compiled call on XLA's
CPU backend, where their forward pass is one (float32, see
:func:`jaxnorm._src.normalize._compiled_forward`), and for layer and RMS norm
on bfloat16 rows in and out (whose forward pass stays in XLA).

:mod:`jaxnorm._src.normalize` differentiates a normalization with a
``custom_jvp`` whose tangent rule is the closed-form derivative; JAX
transposes that rule for reverse mode. Where the forward pass is a compiled
call, the rule's tangents (``dy`` and those of the mean and variance) are
instead one primitive of this module, :func:`tangent`. Its rules:

* **transpose** (reverse mode): :func:`backward`, one compiled loop
  (``_cpu_sums.c``). Rows (layer and RMS norm, ``jaxnorm_row_norm_grad``):
  per row the statistics' framed sums and the cotangent's two sums from one
  read of ``x`` and ``g``, then ``dx`` from the same row while it is in
  cache, and the parameters' gradients in per-thread accumulators. Columns
  (batch norm on channels-last data, ``jaxnorm_column_norm_grad``): each
  thread's four column sums, one merge, then ``dx`` of the rows the same
  thread has just read. XLA's transposed program, and Flax's backward pass,
  read ``x`` and ``g`` from memory two or three times and keep or recompute
  the statistics in between. The statistics' cotangents (a loss on the
  mean or variance) are two more terms of the same ``dx``.
* **lowering** (the tangents themselves, forward mode): the closed-form rule
  in JAX's operations (``reference``, given by the caller).
* **jvp** (higher orders): the JVP of ``reference``; the backward call's own
  JVP is that of the transposed reference, so every derivative beyond the
  first runs in JAX's operations.
* **vmap**: for rows, the mapped axis becomes more rows where only ``x``
  and its tangent (or the cotangents) are mapped and no parameter gradient
  is asked for; otherwise ``reference`` under ``vmap``.

On other backends the backward call lowers to the transposed reference
(``lax.platform_dependent``). Where JAX asks for the derivative with respect
to ``eps`` (rare), the transpose is the reference's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jax.extend import core
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir

from jaxnorm._src import cpu_sums

# Flags of the compiled backward calls (_cpu_sums.c).
_SCALE, _RMS, _DSCALE, _DBIAS, _STATS, _BF16 = 1, 4, 8, 16, 32, 64


def _unpack(operands, has_scale, has_bias):
  """``(x, eps, scale, tx, tscale, tbias, teps)`` with ``None`` for absent
  parameters, from the primitive's operand list."""
  it = iter(operands)
  x, eps = next(it), next(it)
  scale = next(it) if has_scale else None
  tx = next(it)
  tscale = next(it) if has_scale else None
  tbias = next(it) if has_bias else None
  return x, eps, scale, tx, tscale, tbias, next(it)


def _num_stats(shape, columns):
  """Statistics per call: one per row of ``(P, R)``, per column of ``(R, C)``."""
  return shape[1] if columns else shape[0]


tangent_p = core.Primitive("jaxnorm_norm_tangent")
tangent_p.multiple_results = True


def tangent(x, eps, scale, tx, tscale, tbias, teps, *, rms: bool, columns: bool, reference):
  """The tangents ``(dy, dmean, dvar)`` of layer norm (RMS norm, ``rms=True``)
  of the rows of ``x`` (``(P, R)``, float32 or bfloat16; ``dy`` in its
  dtype), or of batch norm of its columns (``columns=True``, ``x``
  ``(R, C)`` float32), at ``x``, ``eps`` (float32
  scalar) and ``scale`` (a float32 vector or ``None``), for the tangents
  ``tx``, ``tscale``, ``tbias`` (``None`` where the layer has no such
  parameter) and ``teps``. ``dmean`` and ``dvar`` have one value per row
  (columns). ``reference`` computes the same in JAX's operations, with the
  same arguments. Transposed, it is :func:`backward` (see the module
  docstring)."""
  operands = tuple(v for v in (x, eps, scale, tx, tscale, tbias, teps) if v is not None)
  # Inside shard_map every operand varies as the most varying one does, so
  # that the results' type is that of `x` and transposition sums the
  # cotangents of invariant operands over the devices (as for JAX's ops).
  varying = set().union(*(cpu_sums._varying(v) for v in operands))
  operands = tuple(cpu_sums.vary(v, varying) for v in operands)
  return tangent_p.bind(*operands, rms=rms, columns=columns, has_scale=scale is not None,
                        has_bias=tbias is not None, reference=reference)


def _tangent_in_jax(*operands, rms, columns, has_scale, has_bias, reference):
  del rms, columns
  return tuple(reference(*_unpack(operands, has_scale, has_bias)))


def _tangent_abstract_eval(*avals, rms, columns, has_scale, has_bias, reference):
  del rms, has_scale, has_bias, reference
  x = avals[0]
  f32 = jnp.dtype(jnp.float32)
  # One value per row (column), typed as `x` is inside shard_map.
  stats = x.update(shape=(_num_stats(x.shape, columns),), dtype=f32, weak_type=False,
                   sharding=x.sharding.update(spec=jax.sharding.PartitionSpec()))
  return [x.update(weak_type=False), stats, stats]


def _tangent_jvp(primals, tangents, **params):
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  return jax.jvp(functools.partial(_tangent_in_jax, **params), tuple(primals), tuple(tangents))


def _tangent_transpose(cts, *operands, rms, columns, has_scale, has_bias, reference):
  x, eps, scale, tx, tscale, tbias, teps = _unpack(operands, has_scale, has_bias)
  undefined = [ad.is_undefined_primal(v) for v in operands]
  if any(ad.is_undefined_primal(v) for v in (x, eps, scale)):
    raise ValueError("jaxnorm: the fused tangent is not linear in x, eps or scale")
  if all(type(ct) is ad.Zero for ct in cts):
    return [ad.Zero(v.aval) if u else None for v, u in zip(operands, undefined, strict=True)]
  cdy, cmean, cvar = cts
  stats = (type(cmean) is not ad.Zero) or (type(cvar) is not ad.Zero)
  n = _num_stats(x.shape, columns)
  # Symbolic zeros as arrays, varying (inside shard_map) as the results are.
  zeros = lambda shape, dtype: cpu_sums.vary(jnp.zeros(shape, dtype), cpu_sums._varying(x))
  cdy = zeros(x.shape, x.dtype) if type(cdy) is ad.Zero else cdy
  cmean = zeros((n,), jnp.float32) if type(cmean) is ad.Zero else cmean
  cvar = zeros((n,), jnp.float32) if type(cvar) is ad.Zero else cvar
  if ad.is_undefined_primal(teps):
    # The derivative with respect to eps: the reference, transposed.
    linear = [v.aval for v, u in zip(operands, undefined, strict=True) if u]

    def lin(*values):
      it = iter(values)
      full = [next(it) if u else v for v, u in zip(operands, undefined, strict=True)]
      return reference(*_unpack(full, has_scale, has_bias))

    out = iter(jax.linear_transpose(lin, *linear)((cdy, cmean, cvar)))
    return [next(out) if u else None for u in undefined]
  want = (ad.is_undefined_primal(tscale), ad.is_undefined_primal(tbias))
  dx, *grads = backward(x, cdy, eps, scale, (cmean, cvar) if stats else None, rms=rms,
                        columns=columns, want=want, reference=reference)
  grads = iter(grads)
  # In operand order: x, eps, scale, tx, tscale, tbias, teps (absent ones dropped).
  out = (None, None, None, dx if ad.is_undefined_primal(tx) else None,
         next(grads) if want[0] else None, next(grads) if want[1] else None, None)
  present = (True, True, has_scale, True, has_scale, has_bias, True)
  return [c for c, p in zip(out, present, strict=True) if p]


def _tangent_batch(args, dims, *, rms, columns, has_scale, has_bias, reference):
  params = dict(rms=rms, columns=columns, has_scale=has_scale, has_bias=has_bias,
                reference=reference)
  ix, itx = 0, 2 + has_scale          # where x and tx are among the operands
  x, tx = args[ix], args[itx]
  if not columns and all(d is None for i, d in enumerate(dims) if i not in (ix, itx)):
    # Only x and its tangent mapped: the mapped axis becomes more rows.
    size = x.shape[dims[ix]] if dims[ix] is not None else tx.shape[dims[itx]]

    def rows(v, d):
      v = jnp.broadcast_to(v, (size,) + v.shape) if d is None else jnp.moveaxis(v, d, 0)
      return v.reshape((-1, v.shape[-1]))

    full = list(args)
    full[ix], full[itx] = rows(x, dims[ix]), rows(tx, dims[itx])
    dy, dmean, dvar = tangent_p.bind(*full, **params)
    return ((dy.reshape((size, -1, dy.shape[-1])), dmean.reshape((size, -1)),
             dvar.reshape((size, -1))), (0, 0, 0))
  fn = functools.partial(_tangent_in_jax, **params)
  return jax.vmap(fn, in_axes=tuple(dims))(*args), (0, 0, 0)


tangent_p.def_impl(_tangent_in_jax)
tangent_p.def_abstract_eval(_tangent_abstract_eval)
ad.primitive_jvps[tangent_p] = _tangent_jvp
ad.primitive_transposes[tangent_p] = _tangent_transpose
batching.primitive_batchers[tangent_p] = _tangent_batch
mlir.register_lowering(tangent_p, mlir.lower_fun(_tangent_in_jax, multiple_results=True))


def _backward_in_jax(x, g, eps, scale, stats, *, columns, want, reference):
  """The reference's tangent rule transposed: ``(dx, [dscale], [dbias])``."""
  f32 = jnp.float32
  n = _num_stats(x.shape, columns)
  zero = jnp.zeros((), f32)
  # Inside shard_map the tangents, cotangents and results vary as `x` and
  # `g` do (as the compiled call's results are).
  varying = cpu_sums._varying(x) | cpu_sums._varying(g)
  like = lambda shape: cpu_sums.vary(jnp.zeros(shape, f32), varying)

  def lin(tx, tscale, tbias):
    return reference(x, eps, scale, tx, tscale, tbias, zero)

  param = (x.shape[-1],)
  primals = (like(x.shape).astype(x.dtype), like(param) if want[0] else None,
             like(param) if want[1] else None)
  if stats is None:
    stats = (jnp.zeros((n,), f32),) * 2
  cts = tuple(cpu_sums.vary(v, varying) for v in (g, *stats))
  dx, ds, db = jax.linear_transpose(lin, *primals)(cts)
  return (dx,) + ((ds,) if want[0] else ()) + ((db,) if want[1] else ())


def _backward_compiled(x, g, eps, scale, stats, *, rms, columns, want):
  a, b = x.shape
  flags = ((_SCALE if scale is not None else 0) | (_RMS if rms else 0)
           | (_DSCALE if want[0] else 0) | (_DBIAS if want[1] else 0)
           | (_STATS if stats is not None else 0)
           | (_BF16 if x.dtype == jnp.bfloat16 else 0))
  param = jax.ShapeDtypeStruct((b,), jnp.float32)
  results = (jax.ShapeDtypeStruct((a, b), x.dtype),) + (param,) * sum(want)
  g = g.astype(x.dtype)
  none = jnp.zeros((1,), jnp.float32)
  target = cpu_sums._COLUMNS_GRAD_TARGET if columns else cpu_sums._ROWS_GRAD_TARGET
  return cpu_sums._call_compiled(target, results, f"{a},{b},{flags}", x, g, eps.reshape(1),
                                 none if scale is None else scale, *(stats or ()))


def backward(x, g, eps, scale, stats, *, rms: bool, columns: bool, want: tuple[bool, bool],
             reference):
  """``(dx, [dscale], [dbias])`` of layer norm (RMS norm) of the rows of
  ``x`` (``(P, R)`` float32), or batch norm of its columns (``columns``),
  for the cotangent ``g`` of ``y`` and ``stats``, those of the mean and
  variance (two vectors, or ``None`` for none): the transpose of
  :func:`tangent`, as one compiled call on the CPU backend (the transposed
  ``reference`` elsewhere, under ``vmap`` where the rows cannot be folded,
  and in every derivative of it). ``want`` says which parameter gradients to
  return."""
  has_scale = scale is not None
  has_stats = stats is not None

  def unpack(operands):
    it = iter(operands[3:])
    scale = next(it) if has_scale else None
    return (*operands[:3], scale, tuple(it) if has_stats else None)

  def on_cpu(*operands):
    return tuple(_backward_compiled(*unpack(operands), rms=rms, columns=columns, want=want))

  def in_jax(*operands):
    return _backward_in_jax(*unpack(operands), columns=columns, want=want, reference=reference)

  @custom_vmap
  def call(*operands):
    return lax.platform_dependent(*operands, cpu=on_cpu, default=in_jax)

  @call.def_vmap
  def call_vmap(axis_size, in_batched, *operands):
    n_out = 1 + sum(want)
    per_row = [0, 1] + ([len(operands) - 2, len(operands) - 1] if has_stats else [])
    if not columns and not any(want) and not any(
        b for i, b in enumerate(in_batched) if i not in per_row):
      # x, g and the statistics' cotangents: the mapped axis becomes more rows.
      folded = list(operands)
      for i in per_row:
        v = operands[i] if in_batched[i] else jnp.broadcast_to(
            operands[i], (axis_size,) + operands[i].shape)
        folded[i] = v.reshape((-1,) + v.shape[2:])
      (dx,) = call(*folded)
      return (dx.reshape((axis_size, -1, dx.shape[-1])),), (True,)
    axes = tuple(0 if b else None for b in in_batched)
    return jax.vmap(in_jax, in_axes=axes)(*operands), (True,) * n_out

  @jax.custom_jvp
  def differentiable(*operands):
    return call(*operands)

  @differentiable.defjvp
  def differentiable_jvp(primals, tangents):
    return jax.jvp(in_jax, primals, tangents)

  return differentiable(x, g, eps, *((scale,) if has_scale else ()), *(stats or ()))
