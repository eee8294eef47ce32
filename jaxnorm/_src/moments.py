"""The one place statistics are computed: masked, exact on any data, cross-device.

Every layer is ``statistics -> normalize -> affine``. This module computes the
statistics; :mod:`jaxnorm._src.normalize` applies them, with the closed-form
derivative.

Algorithm, and why. Float32 statistics must be exact (variance relative error
~1e-7) on data with a large offset (``1e7 + randn``), outliers anywhere (a
``1e6`` on the first example), heavy tails, any count, with masks, and on any
number of devices, while reading ``x`` once, as Flax's fast variance does, and
communicating once, as Flax does.

* **Blocks, each in its own frame.** The first reduction axis (the batch axis
  of batch norm) is split into ``B`` blocks: one on a single device, one per
  device on a sharded mesh (:func:`device_blocks`; ghost batch norm's chunks
  are blocks too). In each block the data is shifted
  by a *frame* ``s_b`` taken from the block itself: the median of three of its
  values (first, middle and last along its longest reduction axis), or, with a
  mask or pooled channels (group norm), the block's (masked) mean, one more
  pass. One pass over the block then
  gives the count ``n_b``, the shifted mean ``m_b = <x - s_b>`` and the sum of
  squared deviations ``q_b = sum((x - s_b)^2) - n_b m_b^2``. The one-pass
  form loses a factor ``1 + (mean_b - s_b)^2 / var_b`` of precision
  (Chan, Golub & LeVeque, 1983); a median of three data values is within the
  spread of the bulk of the data, so that factor stays near 1 whatever the
  offset, and one outlier (even among the probes) cannot move the frame. The
  first-sample shift used before this rewrite lost 2% of the variance when that
  sample was a 1e3 outlier.
* **A second look at the frame.** Outliers at two of the three probed places
  do move it. Where ``(mean_b - s_b)^2 > 15 var_b`` for some feature, the sums
  are taken again in a frame at the mean (:func:`_second_look`; on CPU one
  compiled call that reads ``x`` only then). The full-size uses keep ``s_b``.
  Under a partitioned ``jit`` that decision would need every block's test:
  blocks merged along the batch send it with their statistics, in the
  merge's one gather, and decide after it (:func:`_merged_second_look`).
* **Plain sums where they are as exact.** Frame 0 is a frame too: it loses
  the factor ``1 + mean^2 / var``. For statistics across features (layer and
  group norm) on one device, in forward passes (the derivative's program keeps
  a frame from the data: compile time, see ``normalize._fused_jvp``), the two
  plain sums ``sum(x)`` and ``sum(x^2)``
  are taken first, as Flax's fast variance does, and kept when that factor
  is at most 2 for every feature (``mean^2 <= var``; a median-of-three frame
  often loses more on Gaussian data); otherwise the sums are taken again in a
  frame from the data (:func:`_plain_or_shifted`, one ``lax.cond`` for the
  whole call, under ``vmap`` too). Centred data then cost what Flax's do;
  offset data pay for both.
* **One read for both sums, on CPU.** XLA's CPU reductions slow down by half
  with a frame subtracted inside them. In forward passes of data with no
  mask, both framed sums run as one compiled loop
  (:mod:`jaxnorm._src.cpu_sums`, an XLA custom call) where it applies:
  column sums (batch and instance norm; float32 or bfloat16), row sums
  (layer norm, float32; it then takes no plain sums first). Its float32
  partial sums of 16 values go into float64 accumulators.
* **Blocks combine exactly.** Blocks (and devices) are merged with Chan et al.'s
  pairwise update, ``delta = mean_b - mean_a``,
  ``q = q_a + q_b + delta^2 n_a n_b / n``, where ``delta`` is taken as
  ``(s_b - s_a) + (m_b - m_a)`` so that no large mean is ever rounded. Any
  merge order is stable, so it runs as one ``lax.reduce`` with Chan's update as
  the reduction.
* **Communication.** Under ``axis_name`` each device reduces its own blocks,
  then one ``all_gather`` of the four per-feature numbers ``(n, s, m, q)``
  lets every device merge them identically: one collective, against Flax's one
  all-reduce (a psum of sums cannot be exact: sums in a common frame need that
  frame first, which is a second round). Under sharded ``jit`` the blocks align
  with the shards of the batch axis (``B`` is a power of two), so the partitioner
  keeps each block's pass local and gathers only the per-block statistics: no
  all-reduce at all, one small all-gather of the per-block numbers, packed in
  one array (``_merge_blocks``; with the second look's test for batch
  statistics). On Explicit mesh axes the same gather is a reshard. Layer norm
  there takes one block per device along the features, in case they are
  split. RMS statistics (mean squares) have no cancellation and use plain
  sums and one psum.
* **Summation.** Per-block sums are XLA's reductions in float32 (float64 for
  float64 input), which are tree-shaped on CPU: the sum of ``2**24`` squares
  was measured within 2e-9 of float64.

Statistics are float32 for half/single precision input (float64 for float64).
Complex inputs get a complex mean and the real variance ``E|x - E x|^2``.
Masked-out entries are replaced before any arithmetic (``jnp.where``), so NaN or
inf there never reach a statistic.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

from jaxnorm._src import checks
from jaxnorm._src import cpu_sums

# A block holds at least this many values per feature; more blocks than this
# are not made. Powers of two, so blocks align with the shards of up to
# `_MAX_BLOCKS` devices along the reduced axis. Merging blocks is a sequential
# loop whose rounding grows with their number: 32 blocks keep the variance of
# 2**22 values within 1.5e-7 of float64 (1024 blocks: 2.3e-6).
_MIN_BLOCK_VALUES = 16
_MAX_BLOCKS = 32


class Moments(NamedTuple):
  """Statistics in block-view shapes (see :func:`block_view`).

  ``x - mean == (x - shift) - mean_off`` per block; ``mean`` is the mean
  itself, ``var`` the (real) variance and ``num_values`` the number of selected
  values behind them (all devices), all three merged over the blocks (unless
  each block keeps its own, as in ghost batch norm). For RMS statistics
  ``shift`` and ``mean_off`` are ``None``, ``mean`` is 0 and ``var`` is the
  mean square.
  """

  shift: jax.Array | None
  mean_off: jax.Array | None
  mean: jax.Array
  var: jax.Array
  num_values: jax.Array


class View(NamedTuple):
  """How ``x`` is viewed in blocks: ``x.reshape(shape)``.

  ``axes`` are the reduction axes of the view (the block axis excluded);
  ``block_axis`` is where the block index sits, ``None`` without blocks.
  """

  shape: tuple[int, ...]
  axes: tuple[int, ...]
  block_axis: int | None


def stat_dtype(dtype) -> jnp.dtype:
  """float32 for half/single precision, float64 for float64 (complex alike)."""
  return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype) -> jnp.dtype:
  return jnp.finfo(stat_dtype(dtype)).dtype


def _abs2(z):
  if jnp.iscomplexobj(z):
    return lax.real(z) ** 2 + lax.imag(z) ** 2
  return z * z


def num_blocks(shape: tuple[int, ...], axes: tuple[int, ...],
               max_blocks: int = _MAX_BLOCKS) -> int:
  """Blocks for the first of ``axes``: the largest power of two that divides
  its size, at most ``max_blocks``, with at least ``_MIN_BLOCK_VALUES``
  values per block and feature."""
  if not axes:
    return 1
  n0 = shape[axes[0]]
  per_unit = math.prod(shape[a] for a in axes[1:])
  b = 1
  while (b * 2 <= max_blocks and n0 % (b * 2) == 0
         and (n0 // (b * 2)) * per_unit >= _MIN_BLOCK_VALUES):
    b *= 2
  return b


def _shards_along(x, axis: int) -> int:
  """Devices ``x`` is split over along ``axis``, where its type says so
  (meshes with Explicit axes); 1 otherwise."""
  try:
    sharding = jax.typeof(x).sharding
    entry = sharding.spec[axis] if axis < len(sharding.spec) else None
    if entry is None:
      return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(sharding.mesh.shape[n] for n in names)
  except (AttributeError, TypeError, KeyError):
    return 1


def blocks_for(x, axes: tuple[int, ...], max_blocks: int | None = None) -> int:
  """:func:`num_blocks` for ``x``, made a multiple of the shards of its first
  reduced axis when the type of ``x`` names them (Explicit mesh axes), so that
  every block lies on one device. ``max_blocks`` defaults to
  :func:`device_blocks`."""
  if max_blocks is None:
    max_blocks = device_blocks(x)
  blocks = num_blocks(x.shape, axes, max_blocks)
  if axes:
    shards = _shards_along(x, axes[0])
    if shards > 1 and blocks % shards and x.shape[axes[0]] % shards == 0:
      blocks = shards
  return blocks


# Sharded `jit` (meshes with Auto axes): the partitioner, not this code,
# decides the collectives. Two things keep them few: callers that may see
# their reduced axis split (layer norm's features) ask for one block per
# device, so that every frame and sum is local (see `auto_mesh_devices`), and
# the per-block statistics are gathered in one collective before they are
# merged (`_gather_blocks`; otherwise XLA gathers each operand of the merge's
# reduce on its own).


def _mesh_of(x, kind):
  """The mesh of ``x``'s type when it has several devices and every axis of
  the type ``kind``; ``None`` otherwise (one device, axes of another kind,
  an older JAX)."""
  try:
    mesh = jax.typeof(x).sharding.mesh
    if math.prod(mesh.axis_sizes) <= 1:
      return None
    if any(t != kind for t in mesh.axis_types):
      return None
    return mesh
  except (AttributeError, TypeError):
    return None


def _auto_mesh(x):
  """The mesh of ``x``'s type when it has several devices and only Auto axes
  (the partitioner's choice); ``None`` otherwise (one device, Explicit or
  manual axes, inside ``shard_map``, an older JAX)."""
  return _mesh_of(x, jax.sharding.AxisType.Auto)


def auto_mesh_devices(x) -> int:
  """Devices of the Auto-axes mesh ``x`` is placed on (1 without one).

  Tracing cannot tell which axes of ``x`` the partitioner will split on such
  a mesh, only that it may: the number of blocks that lets every device keep
  its blocks' frames and sums local if it splits the reduced axis.
  """
  mesh = _auto_mesh(x)
  return 1 if mesh is None else math.prod(mesh.axis_sizes)


def device_blocks(x) -> int:
  """The most blocks worth making for ``x``: 1 on one device, else the
  devices of its Auto-axes mesh (rounded down to a power of two, at most
  ``_MAX_BLOCKS``), so that the partitioner can keep every block on one device.

  Performance (XLA on CPU): with one block a statistic is a plain column or
  row sum of ``x - frame``, which XLA's CPU reductions run on every core at
  about the speed of ``sum(x)``. A reduction over the middle axis of the block
  view ``(B, n // B, C)`` with the blocks' frames subtracted runs on one core
  and ~3x slower per core (measured: 64x1024x128, 4.4 ms against 1.2 ms;
  batch norm train fwd at 64x32x32x128 went from 3.0x Flax's time with 32
  blocks to 1.05x with one).
  """
  devices = auto_mesh_devices(x)
  return min(1 << (devices.bit_length() - 1), _MAX_BLOCKS)


def _explicit_mesh(x):
  """The mesh of ``x``'s type when it has several devices and only Explicit
  axes (shardings in the types); ``None`` otherwise."""
  return _mesh_of(x, jax.sharding.AxisType.Explicit)


def _whole_along(v, axis: int, mesh):
  """``v`` made whole along ``axis`` (one all-gather where it is split), its
  other axes split as they were: on ``mesh``'s Auto axes a sharding
  constraint that leaves them to the partitioner, on its Explicit axes a
  reshard to the spec of ``v``'s type without ``axis``."""
  if all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types):
    spec = tuple(None if i == axis else jax.sharding.PartitionSpec.UNCONSTRAINED
                 for i in range(v.ndim))
    return lax.with_sharding_constraint(
        v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
  have = tuple(jax.typeof(v).sharding.spec)
  have = have + (None,) * (v.ndim - len(have))
  if have[axis] is None:
    return v
  spec = tuple(None if i == axis else e for i, e in enumerate(have))
  # With the mesh of the type (a bare PartitionSpec needs `jax.set_mesh`).
  return jax.sharding.reshard(
      v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))


def _gather_blocks(stats, axis: int, mesh, n_block, far=None):
  """``(n, s, m, q)`` made whole along the block ``axis`` in one collective
  on ``mesh``; the other axes stay as the partitioner has them. With
  ``n_block`` (the count of every block, a Python number: no mask) ``n`` is
  not sent but made again from it. ``far`` (booleans, broadcastable against
  the statistics: the second look's test, :func:`_merge_blocks`) travels in
  the sign bit of ``q`` (a sum of squares, never negative; ``-0.0`` keeps
  it), so the gather sends no more bytes for it, and is returned whole
  after the statistics."""
  n, s, m, q = stats
  if far is not None:
    q = jnp.where(far, -q, q)
  sent = (s, m, q) if n_block is not None else (n, s, m, q)
  parts = jnp.broadcast_arrays(*sent)
  dt = jnp.result_type(*parts)
  packed = _whole_along(jnp.stack([v.astype(dt) for v in parts], axis=-1), axis, mesh)
  back = lambda v, w: (lax.real(v) if jnp.iscomplexobj(v) and not jnp.iscomplexobj(w)
                       else v).astype(w.dtype)
  got = tuple(back(packed[..., i], w) for i, w in enumerate(sent))
  if n_block is not None:
    got = (jnp.full(got[0].shape, n_block, n.dtype),) + got
  if far is not None:
    got = got[:3] + (jnp.abs(got[3]), jnp.signbit(got[3]))
  return got


def _merge_blocks(stats, axis: int, like, n_block, far=None):
  """:func:`merge` along the block ``axis``; on an Auto-axes mesh first each
  group of blocks one device would hold (local wherever the partitioner splits
  the block axis evenly), then the groups, gathered in one collective; on an
  Explicit-axes mesh the blocks, gathered in one collective where the type
  of ``like`` says they are split.
  ``n_block``: every block's count when it is a constant, else ``None``.

  ``far`` (booleans per block and feature, or ``None``): the second look's
  test of each block's frame (:func:`_merged_second_look`). It travels with
  the statistics in their one gather, so that whether any block is far is
  then known on every device, without a collective of its own. Returns
  the merged statistics and, with ``far``, that decision (a boolean scalar;
  else ``None``)."""
  mesh = _auto_mesh(like)
  explicit = _explicit_mesh(like) if mesh is None else None
  if mesh is None and explicit is None:
    return merge(stats, axis), None if far is None else _any_over_batch(far)
  if mesh is not None:
    blocks = stats[1].shape[axis]
    devices = math.prod(mesh.axis_sizes)
    if blocks > devices and blocks % devices == 0:
      group = blocks // devices
      split = lambda v: v.reshape(v.shape[:axis] + (devices, group) + v.shape[axis + 1:])
      stats = merge(tuple(split(v) for v in jnp.broadcast_arrays(*stats)), axis + 1)
      stats = tuple(jnp.squeeze(v, axis + 1) for v in stats)
      n_block = None if n_block is None else n_block * group
      far = None if far is None else jnp.any(split(far), axis=axis + 1)
  got = _gather_blocks(stats, axis, mesh if mesh is not None else explicit, n_block, far)
  merged = merge(got[:4], axis)
  return merged, None if far is None else _any_over_batch(got[4])


def block_view(shape: tuple[int, ...], axes: tuple[int, ...], blocks: int) -> View:
  """Splits the first reduction axis into ``(blocks, size // blocks)``."""
  if blocks == 1 or not axes:
    return View(tuple(shape), tuple(axes), None)
  a0 = axes[0]
  vshape = shape[:a0] + (blocks, shape[a0] // blocks) + shape[a0 + 1:]
  vaxes = tuple(a + 1 if a >= a0 else a for a in axes)
  return View(tuple(vshape), vaxes, a0)


def pool_channels(v, pool: int):
  """Sums ``v`` over groups of ``pool`` consecutive entries of its last axis,
  each group's sum repeated over its entries (the identity for ``pool=1``),
  as products with a block-diagonal matrix of ones (a program constant).

  Group norm pools per-channel sums into per-group statistics this way, in
  the ``(..., C)`` layout: per-channel sums over the spatial axes are column
  sums, which XLA's CPU reductions run at copy speed, while a sum over a
  grouped view ``(N, H, W, G, C // G)`` reduces a short inner axis and runs
  ~8x slower (measured at 32x16x16x128: 4.4 ms against 0.5 ms for one sum).
  Products stay operations of their own (a reshape-and-sum was fused into
  the reduction that makes ``v``, slowing it 2x, and its transpose into the
  backward pass's full-size ``dx`` loop, 3x), and JAX transposes them into
  products again. Against the reshape-and-sum for the statistics: group
  norm fwd 0.05-0.15x of Flax's time faster, and its fwd+bwd compiles ~10%
  faster.
  """
  if pool == 1:
    return v
  c = v.shape[-1]
  member = jnp.asarray(np.arange(c)[:, None] // pool == np.arange(c // pool)[None, :],
                       v.dtype)                         # (C, G)
  sums = jnp.matmul(v, member, precision=lax.Precision.HIGHEST)
  return jnp.matmul(sums, member.T, precision=lax.Precision.HIGHEST)


def _median3(a, b, c):
  if jnp.iscomplexobj(a):
    re = _median3(lax.real(a), lax.real(b), lax.real(c))
    im = _median3(lax.imag(a), lax.imag(b), lax.imag(c))
    return lax.complex(re, im)
  return jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c))


def probe_frame(xv, axes):
  """Median of three values of each block: first, middle and last along the
  longest reduction axis, at index 0 of the others (keepdims)."""
  if not axes:
    return xv
  longest = max(axes, key=lambda a: xv.shape[a])
  n = xv.shape[longest]
  index = [slice(None)] * xv.ndim
  for a in axes:
    index[a] = slice(0, 1)
  probes = []
  for i in sorted({0, n // 2, n - 1}):
    index[longest] = slice(i, i + 1)
    probes.append(xv[tuple(index)])
  if len(probes) == 3:
    return _median3(*probes)
  if len(probes) == 2:
    return (probes[0] + probes[1]) * 0.5
  return probes[0]


# The second look (:func:`_second_look`): a frame this far from the mean,
# ``mean_off^2 > _REFRAME * var``, has cost the one-pass sums more than a
# factor 16 of precision. The compiled loops take the same threshold
# (``REFRAME`` in ``_cpu_sums.c``).
_REFRAME = 15.0


@custom_vmap
def _any_over_batch(p):
  """``jnp.any(p)``; under ``vmap``, over the mapped examples too (one
  decision for the whole call, as :func:`_all_over_batch`)."""
  return jnp.any(p)


@_any_over_batch.def_vmap
def _any_over_batch_vmap(axis_size, in_batched, p):
  del axis_size, in_batched
  return _any_over_batch(p), False


def _decided_locally(xv) -> bool:
  """Whether a decision on the data of ``xv`` (a ``lax.cond``) costs no
  collective: one device, or inside ``shard_map``/``pmap`` (each device
  decides for its own data); not where the partitioner may split ``x``."""
  try:
    mesh = jax.typeof(xv).sharding.mesh
    return all(size == 1 or kind == jax.sharding.AxisType.Manual
               for size, kind in zip(mesh.axis_sizes, mesh.axis_types, strict=True))
  except (AttributeError, TypeError):
    return True


def _second_look_allowed(xv) -> bool:
  """The second look is taken for real data wherever the decision costs no
  collective (:func:`_decided_locally`): one device, ``shard_map``/``pmap``,
  or data whose type has no partitioned mesh axis, whatever the number of
  devices. (It was once limited to where the compiled loops run: on a host of
  8 devices, plain unsharded data with outliers at two probes had batch
  norm's variance off by 7.6e-4.) Under a partitioned ``jit``, blocks merged
  along the batch take it after their gather instead
  (:func:`_merged_second_look`); a per-example statistic's decision would be
  an all-reduce across the batch in every call, which Flax's layer norm does
  not pay, and there the probed frame stands (:func:`_merged_look_allowed`).
  The ``lax.cond`` costs compile time where the compiled loops do not run
  (its branch's two sums)."""
  return not jnp.iscomplexobj(xv) and _decided_locally(xv)


def _second_look(xv, axes, frame, s1, s2):
  """``(ref, m, q)`` for :func:`block_moments` from its sums ``s1``, ``s2`` in
  the probed ``frame``: a frame, the mean offset from it and the sum of
  squared deviations (float32, keepdims). ``ref`` is ``frame`` unless that
  is far from the mean for some feature or block (``m^2 > _REFRAME * q /
  n``: outliers, or heavy tails, at the probed places), where the sums are
  taken again in ``ref = frame + m``, at the mean. On CPU, one compiled call
  that reads only the statistics unless it must sum again
  (:func:`cpu_sums.refine_moments`); elsewhere one ``lax.cond`` for the
  whole call. The full-size uses keep ``frame``: the output's ``x - mean``
  is ``(x - frame) - mean_off`` with ``mean_off = (ref - frame) + m``."""
  if cpu_sums.usable(xv, axes, refine=True):
    return cpu_sums.refine_moments(xv, frame, s1, s2, axes, in_jax=_second_look_in_jax_jit)
  return _second_look_in_jax(xv, frame, s1, s2, axes)


def _second_look_in_jax(xv, frame, s1, s2, axes=(1,)):
  """:func:`_second_look` in JAX's operations (one ``lax.cond``)."""
  n = math.prod(xv.shape[a] for a in axes)
  m, q = _deviations(s1, s2, n)
  far = _any_over_batch(_abs2(m) > _REFRAME * (q / n))
  return lax.cond(far, lambda: _sums_near(xv, frame + m, axes), lambda: (frame, m, q))


def _sums_near(xv, near, axes):
  """``(near, m, q)``: the sums of :func:`block_moments` taken again in the
  frame ``near`` (a frame at the mean), the second look's branch."""
  n = math.prod(xv.shape[a] for a in axes)
  near = lax.stop_gradient(near)
  sdt = stat_dtype(xv.dtype)
  xa, xb = _converted_twice(xv, sdt) if xv.dtype != sdt else (xv, xv)
  near_sum, near_sq, near = lax.optimization_barrier((near, near, near))
  s1 = _fusion_boundary(_sum(xa - near_sum, axes, 1))
  s2 = _fusion_boundary(_sum(_abs2(xb - near_sq), axes, 1))
  return (near, *_deviations(s1, s2, n))


def _merged_look_allowed(xv, view: View) -> bool:
  """Whether blocks merged under a partitioned ``jit`` take the second look
  after their gather (:func:`_merged_second_look`): where the one decision
  for the call needs no collective beyond that gather, i.e. where the
  statistics' other axes are not split across devices.

  On an Explicit-axes mesh the type of ``xv`` says so. On an Auto-axes mesh
  tracing cannot tell which axes the partitioner splits: the look is taken
  where the blocks run along the leading axis of ``x`` (batch norm, and
  :func:`moments` over it), whose statistics are per feature. Were the
  features split too (tensor-parallel batch norm), the decision would cost
  one all-reduce of a boolean across those devices. Layer and instance
  norm's statistics are per example, and examples are what data
  parallelism splits: their probed frames stand there (their decision
  would be an all-reduce across the batch in every call, which Flax's
  layer norm does not pay)."""
  if jnp.iscomplexobj(xv) or view.block_axis is None:
    return False
  if _auto_mesh(xv) is not None:
    return view.block_axis == 0
  if _explicit_mesh(xv) is not None:
    kept = (a for a in range(xv.ndim) if a != view.block_axis and a not in view.axes)
    return all(_shards_along(xv, a) == 1 for a in kept)
  return False


def _merged_second_look(xv, axes, frame, stats, axis: int, n_block):
  """:func:`_merge_blocks` of the blocks' ``stats`` in their probed frames
  ``frame``, with the second look taken after the merge's gather: a
  partitioned ``jit``'s form of :func:`_second_look`, which decides per
  device and would need a collective here.

  Each block's test (``m^2 > _REFRAME * q / n``, per feature) travels with
  its statistics in the gather the merge does anyway, so that every device
  then holds the same decision, with no collective of its own. Where some
  block's frame is far from its mean, every block (each on its own device)
  sums again in its frame ``frame + m`` and the blocks are merged again:
  that branch's gather runs only then. The common case pays for the test
  (in the sign bit of ``q`` in the gather: no more bytes) and a ``lax.cond``
  (compile time)."""
  count, _, m, q = stats
  far = _abs2(m) > _REFRAME * (q / n_block)
  merged, far_any = _merge_blocks(stats, axis, xv, n_block, far)

  def again():
    near, m_near, q_near = _sums_near(xv, frame + m, axes)
    return _merge_blocks((count, near, m_near, q_near), axis, xv, n_block)[0]

  return lax.cond(far_any, again, lambda: merged)


# The compiled call's fallback for other backends, traced once per signature:
# `lax.platform_dependent` traces it on CPU too (lowering only the CPU branch).
_second_look_in_jax_jit = jax.jit(_second_look_in_jax, static_argnums=4)


def _deviations(s1, s2, n):
  """The mean offset and the sum of squared deviations from the framed sums
  ``s1 = sum(x - f)`` and ``s2 = sum((x - f)^2)`` of ``n`` values."""
  m = s1 / n
  return m, jnp.maximum(s2 - n * _abs2(m), 0)


def _fusion_boundary(v):
  """``v`` unchanged (a reduce-precision to its own format), as an operation
  XLA's CPU reduction fusions do not take in.

  Performance: the two sums of :func:`block_moments` are independent, but XLA
  fuses the epilogue ``q = s2 - n m^2`` into the second sum's fusion, which
  then waits for the first (the two cannot run on two cores at once; measured
  in layer norm's backward at 8192x1024, and in batch norm before it used
  one block). An optimization barrier on the two sums did not stop it (the
  compiled program kept the dependency); this does, and costs a tiny loop
  over the per-feature sums.
  """
  if jnp.iscomplexobj(v):
    return v
  fi = jnp.finfo(v.dtype)
  return lax.reduce_precision(v, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def _one_rounding(v):
  """``v`` rounded to one bit less than its format: the same value in every
  loop that recomputes it.

  XLA fuses a small elementwise result (a frame ``sum / count``) into each
  loop that reads it and computes it there again. Where that result is a
  product feeding a subtraction (``x - sum * (1 / n)``, ``n`` a constant),
  LLVM contracts the pair into one fused multiply-add in some loops and not
  in others, and the copies differ by half an ulp (5e-4 at an offset of 1e4).
  A reduce-precision that is not a no-op is integer arithmetic on the bits: no
  product reaches a subtraction, and every copy rounds alike. One bit less
  moves a frame by at most ``2**-23`` of itself, which the shifted sums do not
  notice. (:func:`_fusion_boundary` keeps the full format: XLA removes it from
  the fused loops.)
  """
  if jnp.iscomplexobj(v):
    return lax.complex(_one_rounding(v.real), _one_rounding(v.imag))
  fi = jnp.finfo(v.dtype)
  return lax.reduce_precision(v, exponent_bits=fi.nexp, mantissa_bits=fi.nmant - 1)


def _sum(v, axes, pool):
  return pool_channels(jnp.sum(v, axis=axes, keepdims=True), pool)


# Chan et al.'s pairwise merge of (count, frame, mean - frame, sum of squared
# deviations). An empty side (count 0) leaves the other unchanged, so
# (0, 0, 0, 0) is the identity whatever the frames.
def _merge(a, b):
  na, sa, ma, qa = a
  nb, sb, mb, qb = b
  n = na + nb
  delta = (sb - sa) + (mb - ma)
  frac = nb / jnp.where(n > 0, n, 1)
  m = ma + delta * frac.astype(delta.dtype)
  q = qa + qb + _abs2(delta) * (na * frac)
  a_empty = na == 0
  b_empty = nb == 0
  pick = lambda u, v, w: jnp.where(a_empty, v, jnp.where(b_empty, u, w))
  return n, pick(sa, sb, sa), pick(ma, mb, m), pick(qa, qb, q)


def _merge_two_pass(stats, axis):
  """Differentiable form of the merge along ``axis`` (plain array ops): the
  frame of the first non-empty entry, then two passes over the small arrays."""
  n, s, m, q = stats
  first = jnp.argmax(n > 0, axis=axis, keepdims=True)
  # That entry's frame by a masked sum, not a gather: a gather along an axis
  # sharded with Explicit mesh axes needs an output sharding (its derivative
  # raised there), a sum is an all-reduce.
  at_first = lax.broadcasted_iota(first.dtype, n.shape, axis) == first
  r = jnp.sum(jnp.where(at_first, s, jnp.zeros((), s.dtype)), axis=axis, keepdims=True)
  delta = (s - r) + m
  total = jnp.sum(n, axis=axis, keepdims=True)
  safe = jnp.where(total > 0, total, 1)
  mean = jnp.sum(delta * n.astype(delta.dtype), axis=axis, keepdims=True) / safe
  dev = jnp.where(n > 0, _abs2(delta - mean), 0)
  q_total = jnp.sum(q, axis=axis, keepdims=True) + jnp.sum(n * dev, axis=axis, keepdims=True)
  return total, r, mean, q_total


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def merge(stats, axis: int):
  """Merges ``(n, s, m, q)`` along ``axis`` (kept with size 1).

  The values come from one ``lax.reduce`` with :func:`_merge`; derivatives
  from the same merge written with plain array ops.
  """
  n, s, m, q = stats
  if jnp.iscomplexobj(s):
    out = lax.reduce((n, s, m, q), tuple(jnp.zeros((), v.dtype) for v in stats), _merge,
                     (axis,))
  else:
    # Two complex operands carry the four real numbers: a sharded reduce is
    # partitioned into a local reduce and one all-gather per operand.
    packed = (lax.complex(n.astype(q.dtype), q), lax.complex(s, m))
    zero = jnp.zeros((), packed[0].dtype)

    def merge_packed(a, b):
      unpack = lambda nq, sm: (lax.real(nq), lax.real(sm), lax.imag(sm), lax.imag(nq))
      n, s, m, q = _merge(unpack(*a), unpack(*b))
      return lax.complex(n, q), lax.complex(s, m)

    nq, sm = lax.reduce(packed, (zero, zero), merge_packed, (axis,))
    out = (lax.real(nq).astype(n.dtype), lax.real(sm), lax.imag(sm), lax.imag(nq))
  return tuple(jnp.expand_dims(v, axis) for v in out)


@merge.defjvp
def _merge_jvp(axis, primals, tangents):
  out = merge(primals[0], axis)
  _, tout = jax.jvp(lambda st: _merge_two_pass(st, axis), primals, tangents)
  return out, tout


def _all_gather(x, axis_name, axis_index_groups):
  """``lax.all_gather``, typed as the same on every device where JAX can say so.

  ``shard_map`` checks that outputs declared replicated (``P()``: the running
  averages of a data-parallel step) are; the invariant form of the gather lets
  it infer that, as it does for Flax's ``pmean``.
  """
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  manual = getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ())
  if (axis_index_groups is None and _all_gather_invariant is not None
      and all(a in manual for a in names)):
    # Inside shard_map (vmap and pmap axes are not mesh axes).
    return _all_gather_invariant(x, axis_name)
  if len(names) > 1 and axis_index_groups is None:
    # One axis at a time (vmap's all_gather takes one name): the same set of
    # statistics, in the same order, on every device.
    for name in reversed(names):
      x = lax.all_gather(x, name)
    return jax.tree.map(lambda v: v.reshape((-1,) + v.shape[len(names):]), x)
  return lax.all_gather(x, axis_name, axis_index_groups=axis_index_groups)


_all_gather_invariant: Callable[..., Any] | None
try:
  from jax._src.lax.parallel import all_gather_invariant as _all_gather_invariant
except ImportError:  # an older or newer JAX without it: the plain gather.
  _all_gather_invariant = None


def _gather_merge(stats, axis_name, axis_index_groups):
  """Merges every device's ``(n, s, m, q)``: one all_gather, then the same
  merge on every device."""
  n, s, m, q = stats
  if not jnp.iscomplexobj(s):
    packed = jnp.stack([n.astype(s.dtype), s, m, q.astype(s.dtype)])
    everyone = _all_gather(packed, axis_name, axis_index_groups)
    parts = (everyone[:, 0].astype(n.dtype), everyone[:, 1], everyone[:, 2],
             everyone[:, 3].astype(q.dtype))
  else:
    parts = _all_gather((n, s, m, q), axis_name, axis_index_groups)
  merged = merge(parts, 0)
  return tuple(v[0] for v in merged)


def _counts(mask, xv, axes, pool, real):
  if mask is None:
    n = math.prod(xv.shape[a] for a in axes) * pool
    shape = tuple(1 if a in axes else d for a, d in enumerate(xv.shape))
    return jnp.full(shape, n, real)
  return _sum(jnp.broadcast_to(mask, xv.shape).astype(real), axes, pool)


# Plain sums, when the data allow them. The one-pass form in frame 0 loses a
# factor `1 + mean^2 / var` of precision (see the module docstring); where
# that factor is at most `_PLAIN_MAX_LOSS` for every feature, plain sums are
# as exact as the shifted ones (a median-of-three frame loses more than that
# on Gaussian data about one time in seven) and cost less. Factor 4 was tried
# and measured: variance errors up to 1.0e-6 against float64, above the 1e-6
# target (tests/test_moments.py); factor 2: 3.6e-7.
_PLAIN_MAX_LOSS = 2


@custom_vmap
def _all_over_batch(ok):
  """``jnp.all(ok)``; under ``vmap``, over the mapped examples too.

  The choice of sums is made once for a whole call: a per-example predicate
  would turn :func:`lax.cond` into a select that runs both branches.
  """
  return jnp.all(ok)


@_all_over_batch.def_vmap
def _all_over_batch_vmap(axis_size, in_batched, ok):
  del axis_size, in_batched
  return _all_over_batch(ok), False


def _plain_sums_allowed(xv, merge_over) -> bool:
  """Plain sums are tried on one device, or inside ``shard_map``/``pmap``
  (each device decides for its own data; the merge takes any frames); not
  where the partitioner may split ``x`` (the decision would cost a
  collective), nor for complex data."""
  if merge_over is not None or jnp.iscomplexobj(xv):
    return False
  return _decided_locally(xv)


def _converted_twice(xv, dtype):
  """Two conversions of low-precision ``xv``, one for each sum: one shared
  converted copy is written out at full size in float32 (LN fwd bf16 at
  2048x1024: 1.24x -> 0.75x Flax's CPU time)."""
  xa, xb = lax.optimization_barrier((xv, xv))
  return xa.astype(dtype), xb.astype(dtype)


def _plain_or_shifted(xv, xs, axes, mask, pool, n_sum, shifted):
  """``shifted``'s ``(frame, ref, m, q)`` (the frames, the mean offset and the
  sum of squared deviations): from the sums in frame 0 when they are exact enough for every
  feature (:data:`_PLAIN_MAX_LOSS`), else ``shifted()``, from the sums in a
  frame taken from the data (one decision for all features; ``lax.cond``).

  Performance (XLA on CPU): plain sums are the two reductions Flax's fast
  variance runs, with the square inside YNNPACK's kernel; a subtracted frame
  is not (2048x1024: ``sum(x)`` 217 us, ``sum(x - f)`` 315 us,
  ``sum((x - f)^2)`` 380 us; ``benchmarks/run.py --reductions`` times these
  sums at the sweep's shapes). Data far from centred pay for both.
  """
  sdt = xs.dtype
  xa, xb = _converted_twice(xv, sdt) if xv.dtype != sdt and mask is None else (xs, xs)
  p1 = _sum(xa, axes, pool)
  p2 = _sum(xb * xb, axes, pool)
  # n mean^2 <= (L - 1) q, with q = p2 - p1 mean; NaN, inf (and overflowed
  # squares) fail it. Rounding in p1 and p2 cannot make badly offset data
  # pass: it would have to cancel most of `p2`.
  loss = _PLAIN_MAX_LOSS
  slack = (loss - 1) * p2 - loss * p1 * (p1 / n_sum)
  ok = _all_over_batch((slack >= 0) & (slack < jnp.inf))
  # Otherwise, where the frame is the (masked or pooled) mean, it is this
  # one, with no pass of its own.
  mean_frame = None if mask is None and pool == 1 else lax.stop_gradient(p1 / n_sum)
  zero = jnp.zeros_like(p1)
  return lax.cond(ok, lambda: (zero, zero, *_deviations(p1, p2, n_sum)),
                  lambda: shifted(mean_frame))


def block_moments(xv, view: View, *, mask=None, pool: int = 1, rms: bool = False,
                  merge_blocks: bool = True, axis_name=None,
                  axis_index_groups=None, plain_first: bool = False,
                  frame_copies: bool = True, compiled_sums: bool = True) -> Moments:
  """Statistics of the block view ``xv`` (``x.reshape(view.shape)``).

  Args:
    xv: the input in its block view.
    view: from :func:`block_view`.
    mask: boolean, already in the block view (broadcastable); ``False``
      entries are left out.
    pool: also pool over groups of this many consecutive channels of the last
      axis (group norm); every channel of a group gets its group's statistics.
    rms: mean squares instead of mean and variance.
    merge_blocks: merge the blocks into one statistic (``False``: ghost batch
      norm, each block keeps its own).
    axis_name, axis_index_groups: merge across the devices of a mapped axis.
    plain_first: try plain sums first (:func:`_plain_or_shifted`), where
      :func:`_plain_sums_allowed` allows them and the compiled loop does not
      apply: statistics across features (layer and group norm). The
      statistics of single features (batch and instance norm) often have a
      large mean for some feature (57 of the 60 batch norm calls of the
      ResNet-18 benchmark step), and one such feature sends a call to the
      shifted sums after it has paid for the plain ones.
    frame_copies: give each full-size use of the frame its own copy (see
      ``shifted`` below); ``False``: one shared frame.
    compiled_sums: take the column or row sums with :mod:`cpu_sums`'s
      compiled loop where it applies (``False``: always in JAX's operations;
      derivative programs).
  """
  axes = view.axes
  sdt = stat_dtype(xv.dtype)
  real = real_dtype(xv.dtype)
  xs = xv.astype(sdt)
  if mask is not None:
    xs = jnp.where(mask, xs, jnp.zeros((), sdt))
  count = _counts(mask, xv, axes, pool, real)
  merge_over = view.block_axis if merge_blocks else None

  if rms:
    total = _sum(_abs2(xs), axes, pool)
    if merge_over is not None:
      total = jnp.sum(total, axis=merge_over, keepdims=True)
      count = jnp.sum(count, axis=merge_over, keepdims=True)
    if axis_name is not None:
      total, count = lax.psum((total, count), axis_name,
                              axis_index_groups=axis_index_groups)
    ms = total / jnp.maximum(count, 1)
    return Moments(None, None, jnp.zeros_like(ms), ms, count)

  # Float32 and bfloat16 data on the CPU backend (batch and instance norm's
  # column sums, layer norm's row sums): both sums in one read of `x`, below
  # the time of Flax's plain pair (see cpu_sums); exact in any data, so layer
  # norm needs no plain sums first.
  use_loop = compiled_sums and mask is None and pool == 1 and cpu_sums.usable(xv, axes)

  # The second look at statistics in a probed frame (`_second_look`).
  looks = mask is None and pool == 1 and _second_look_allowed(xv)
  # Blocks merged under a partitioned `jit`: the second look after the
  # merge's gather, decided from it (`_merged_second_look`).
  merged_look = (not looks and mask is None and pool == 1 and merge_over is not None
                 and _merged_look_allowed(xv, view))

  def shifted(frame=None):
    """``(frame, ref, m, q)``: a frame from the data for the full-size uses,
    the frame of the statistics (``frame``, unless the second look moved
    it), the mean offset from ``ref`` and the sum of squared deviations."""
    # `frame`: given when it is the mean, already summed (`_plain_or_shifted`).
    probed = frame is None and mask is None and pool == 1
    if probed:
      # Probes of `x` itself, converted after (a median commutes with the
      # conversion): slices of a converted `x` make it a shared full-size value.
      frame = probe_frame(xv, axes).astype(sdt)
    elif frame is None:
      # With a mask, or pooled over channels (group norm): the block's mean, one
      # more pass. A group's frame must be common to its channels; made from
      # probes (a median of the channels' medians), it is a small computation on
      # slices of `x` that XLA fuses into every full-size loop that uses it and
      # recomputes per element (measured: group norm fwd+bwd 4-5x Flax's time).
      # A reduction is never fused that way, and group norm's per-channel sums
      # are cheap column sums (fwd+bwd 0.5-0.6x Flax's).
      #
      # The frame must be one value in every loop that reads it. As
      # `sum / n`, an elementwise step after the sum, XLA recomputes it inside
      # each full-size fusion that uses it (as `sum * (1 / n)` where `n` is a
      # constant), and LLVM contracts `x - sum * (1 / n)` into one fused
      # multiply-add in some of them and not in others: with an offset of 1e4
      # the frames differed by up to half an ulp of 1e4 (5e-4), the statistics
      # taken in one and an output recomputed in another (a tanh after a
      # group norm, 4x6x6x16, had dx off by 3e-4 against float64; a masked
      # batch norm its output). Probed frames are data values, the same
      # everywhere.
      # - Pooled: the sums scaled before the pooling product, whose output
      #   the frame is, computed once.
      # - Masked: `_one_rounding(sum / count)`. The sum runs beside the count,
      #   where scaling inside it had to wait for the count (masked BN
      #   forward, 8x8x8x64: 1.35-1.53x Flax's time scaled inside; README,
      #   "What changed").
      if mask is None:
        frame = pool_channels(jnp.sum(xs, axis=axes, keepdims=True) * (1 / n_sum), pool)
      else:
        frame = _one_rounding(_sum(xs, axes, pool) / n_sum)
    frame = lax.stop_gradient(frame)
    if use_loop:
      s1, s2 = cpu_sums.framed_sums(xv, frame, axes)  # bfloat16 read as it is
      if probed and looks:
        return (frame, *_second_look(xv, axes, frame, s1, s2))
      return (frame, frame, *_deviations(s1, s2, n_sum))
    # Performance (XLA on CPU; values unchanged). Reductions run as YNNPACK
    # fusions, which take elementwise work and the broadcast of a small array,
    # but a broadcast shared by two reductions (the frame's, after CSE) cannot
    # be fused into both and is written out at full size, with the slices
    # that make the frame. Three identical copies of the frame out of one
    # barrier give each full-size consumer (the two sums here, the output
    # step) its own broadcast: one small fusion for the frame and no
    # full-size temporary (LN fwd 256x768: 1 full-size temporary -> 0).
    if frame_copies:
      frame_sum, frame_sq, frame = lax.optimization_barrier((frame, frame, frame))
    else:
      frame_sum = frame_sq = frame
    xa, xb = _converted_twice(xv, sdt) if xv.dtype != sdt and mask is None else (xs, xs)
    d = xa - frame_sum
    d_sq = xb - frame_sq
    if mask is not None:
      d = jnp.where(mask, d, jnp.zeros((), sdt))
      d_sq = jnp.where(mask, d_sq, jnp.zeros((), sdt))
    s1 = _fusion_boundary(_sum(d, axes, pool))
    s2 = _fusion_boundary(_sum(_abs2(d_sq), axes, pool))
    if probed and looks:
      return (frame, *_second_look(xv, axes, frame, s1, s2))
    return (frame, frame, *_deviations(s1, s2, n_sum))

  # Without a mask the count is a Python number: a constant array would be
  # broadcast by its own thunk.
  if mask is None:
    n_sum = math.prod(xv.shape[a] for a in axes) * pool
  else:
    n_sum = jnp.maximum(count, 1)
  if plain_first and not use_loop and _plain_sums_allowed(xv, merge_over):
    frame, ref, m, q = _plain_or_shifted(xv, xs, axes, mask, pool, n_sum, shifted)
  else:
    frame, ref, m, q = shifted()
  stats = (count, ref, m, q)
  if merge_over is not None and xv.shape[merge_over] > 1:
    if merged_look:
      stats = _merged_second_look(xv, axes, frame, stats, merge_over, n_sum)
    else:
      stats, _ = _merge_blocks(stats, merge_over, xv, n_sum if mask is None else None)
  if axis_name is not None:
    stats = _gather_merge(stats, axis_name, axis_index_groups)
  n, r, m, q = stats
  var = q / jnp.maximum(n, 1)
  # Each block's own frame stays its coordinate system: x - mean equals
  # (x - frame_b) - mean_off_b, with the small mean_off_b = (r - frame_b) + m.
  merged = merge_over is not None or axis_name is not None or looks
  mean_off = (r - frame) + m if merged else m
  return Moments(frame, mean_off, r + m, var.astype(real), n)


def moments(
    x: jax.typing.ArrayLike,
    axis,
    *,
    mask: jax.typing.ArrayLike | None = None,
    axis_name=None,
    axis_index_groups=None,
    keepdims: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Mean and (biased) variance of ``x`` over ``axis``, exact and in float32.

  This is the statistic every jaxnorm layer uses (see the module docstring
  for the algorithm): exact for inputs with a large mean (``1e7 + randn`` in
  float32), outliers anywhere and heavy tails, in one pass over ``x``.

  Args:
    x: floating-point or complex array.
    axis: int or sequence of ints to reduce over.
    mask: optional boolean array broadcastable to ``x``; ``False`` entries are
      left out of the statistics (their values, NaN included, are never read).
    axis_name: average the statistics over this mapped axis too (one
      all-gather of the per-feature statistics).
    axis_index_groups: groups for the cross-device average.
    keepdims: keep the reduced axes with size 1.

  Returns:
    ``(mean, var)`` in ``float32`` (or wider); ``var`` is real. With no
    selected entry the mean is 0 and the variance 0.

  >>> import jax.numpy as jnp, jaxnorm
  >>> mean, var = jaxnorm.moments(jnp.array([[1.0, 2.0], [3.0, 6.0]]), 0)
  >>> mean.tolist(), var.tolist()
  ([2.0, 4.0], [1.0, 4.0])
  """
  checks.check_array("x", x)
  x = jnp.asarray(x)
  axes = checks.normalize_axes("axis", axis, x.ndim)
  checks.check_mask(mask, x)
  if x.size == 0:
    shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    mean = jnp.zeros(shape, stat_dtype(x.dtype))
    var = jnp.zeros(shape, real_dtype(x.dtype))
  else:
    view = block_view(x.shape, axes, blocks_for(x, axes))
    xv = x.reshape(view.shape)
    mv = None if mask is None else jnp.broadcast_to(mask, x.shape).reshape(view.shape)
    mom = block_moments(xv, view, mask=mv, axis_name=axis_name,
                        axis_index_groups=axis_index_groups)
    mean, var = first_block(mom.mean, view), first_block(mom.var, view)
    shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
    mean, var = mean.reshape(shape), var.reshape(shape)
  if not keepdims:
    mean = jnp.squeeze(mean, axes)
    var = jnp.squeeze(var, axes)
  return mean, var


def centered_moments(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """``(x - mean, var)`` over ``axes`` (normalized), with ``var`` kept as ``keepdims``.

  ``x - mean`` is formed as the layers form it, ``(x - frame) - mean_off`` in
  each block's frame (:class:`Moments`), never as ``x - mean`` with ``mean``
  rounded to float32: that rounding, half an ulp of the mean (4e-3 at 1e5),
  would reach every output. Differentiable as :func:`moments` (the frame is a
  constant; ``mean_off`` carries the mean's derivative). Real or complex
  ``x``; the result is in :func:`stat_dtype`, ``var`` in :func:`real_dtype`.
  """
  sdt = stat_dtype(x.dtype)
  shape = tuple(1 if a in axes else d for a, d in enumerate(x.shape))
  if x.size == 0:
    return x.astype(sdt), jnp.zeros(shape, real_dtype(x.dtype))
  view = block_view(x.shape, axes, blocks_for(x, axes))
  xv = x.reshape(view.shape)
  mom = block_moments(xv, view)
  assert mom.shift is not None and mom.mean_off is not None  # not RMS statistics
  centered = (xv.astype(sdt) - mom.shift) - mom.mean_off
  return centered.reshape(x.shape), first_block(mom.var, view).reshape(shape)


def first_block(v, view: View):
  """A merged statistic without its (size-1 or repeated) block axis."""
  if view.block_axis is None or v.ndim != len(view.shape):
    return v
  return lax.index_in_dim(v, 0, view.block_axis, keepdims=False) if v.shape[view.block_axis] > 1 \
      else jnp.squeeze(v, view.block_axis)
