"""Counts the collectives of a compiled program, for tests that pin communication.

A collective is what a device waits on: each one is latency on a real cluster
and its bytes cross the interconnect. We read them from the optimized HLO that
XLA actually runs, ``jax.jit(f).lower(*args).compile().as_text()``, not from the
jaxpr: XLA's SPMD partitioner inserts the collectives of a sharded ``jit`` and
its combiner passes merge or split them, so only the compiled text says what a
step costs.

What is parsed, per HLO instruction (in every computation, so a collective that
an async wrapper ``calls=`` is still seen, once):

* ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all``,
  ``collective-permute`` (plus ``collective-broadcast``, ``ragged-all-to-all``);
* their asynchronous pairs ``X-start`` / ``X-done`` (GPU and TPU backends emit
  these) count once, as the ``-done`` with its result shape and the ``-start``'s
  replica groups;
* tuple-shaped results (a combined all-reduce of several arrays, XLA's
  ``all-to-all`` of slices) count once with the bytes of all their elements.

A collective inside a loop body (``while``, e.g. from ``lax.scan``) is counted
once, as written, not once per iteration. A collective inside a branch of a
``conditional`` (``lax.cond``; in that branch's computation or one it calls)
is counted too, marked ``conditional``: it runs only when that branch is
taken (:func:`unconditional` leaves those out).

Example::

  >>> count(lambda x: jnp.sum(x), x_sharded, kind="all-reduce")   # doctest: +SKIP
  1
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "collective-broadcast", "ragged-all-to-all")

# Bytes per element of HLO primitive types (sub-byte types count as fractions).
_ITEMSIZE = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0,
}

# Longest opcodes first, so "all-reduce-start" is not read as "all-reduce".
_OPCODES = sorted(
    [k + suffix for k in KINDS for suffix in ("-start", "-done", "")], key=len, reverse=True)
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s"
    r"(?P<op>" + "|".join(map(re.escape, _OPCODES)) + r")\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]")
_EXPLICIT_GROUPS = re.compile(
    r"(?:replica_groups|source_target_pairs)=\{((?:\{[0-9,\s]*\},?\s*)*)\}")
_IOTA_GROUPS = re.compile(
    r"replica_groups=\[(?P<shape>[0-9,]+)\]<=\[(?P<dims>[0-9,]+)\](?:T\((?P<perm>[0-9,]+)\))?")
# Shardy's mesh form: mesh['a'=2,'b'=4] {'b'}, optionally with
# `, device_ids=([dims]T(perm))` when devices are not numbered in mesh order.
_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[(?P<mesh>[^\]]*)\]"
    r"(?:,\s*device_ids=\(\[(?P<dims>[0-9,]+)\](?:T\((?P<perm>[0-9,]+)\))?\))?"
    r"\s*\{(?P<over>[^}]*)\}")
_OPERAND_NAME = re.compile(r"%([\w.\-]+)")
# A computation's first line: `[ENTRY] %name (params) -> result {`.
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(")
# Computations an instruction runs: fusions, async wrappers, reductions, loops, branches.
_CALLED = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCH_LIST = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRUE_FALSE = re.compile(r"\b(?:true_computation|false_computation)=%?([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program.

  Attributes:
    kind: the collective without an async suffix, one of ``KINDS``.
    name: the HLO instruction name (of the ``-done`` for an async pair).
    nbytes: total bytes of its result, summed over the elements of a tuple
      result. For an all-gather this is the gathered array, for a
      reduce-scatter one device's shard.
    shapes: the result's arrays as ``(dtype, dims)`` pairs.
    groups: the replica groups as tuples of device ids (``()`` when the HLO
      leaves them empty, meaning all devices; ``None`` for a form this parser
      does not know); for a collective-permute, the ``(source, target)`` pairs.
    conditional: inside a branch of a ``conditional`` (directly or in a
      computation the branch calls): it runs only when that branch is taken.
  """

  kind: str
  name: str
  nbytes: int
  shapes: tuple[tuple[str, tuple[int, ...]], ...]
  groups: tuple[tuple[int, ...], ...] | None
  conditional: bool = False

  @property
  def group_size(self) -> int | None:
    """Devices per replica group (``None`` when the HLO leaves the groups empty)."""
    if self.kind == "collective-permute" or not self.groups:
      return None
    return len(self.groups[0])


def _shapes(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
  out = []
  for dtype, dims in _ARRAY.findall(text):
    if dtype.startswith("f8") or dtype.startswith("f4") or dtype in _ITEMSIZE:
      out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return tuple(out)


def _nbytes(shapes: tuple[tuple[str, tuple[int, ...]], ...]) -> int:
  total = 0.0
  for dtype, dims in shapes:
    itemsize = _ITEMSIZE.get(dtype, 1 if dtype.startswith("f8") else 0.5)
    total += itemsize * math.prod(dims)
  return math.ceil(total)


def _iota(dims: str, perm: str | None) -> np.ndarray:
  ids = np.arange(math.prod(int(v) for v in dims.split(","))).reshape(
      [int(v) for v in dims.split(",")])
  return ids.transpose([int(v) for v in perm.split(",")]) if perm else ids


def _mesh_groups(m: re.Match) -> tuple[tuple[int, ...], ...] | None:
  axes = re.findall(r"'([^']+)'=([0-9]+)", m.group("mesh"))
  if not re.fullmatch(r"\s*'[^']+'(?:\s*,\s*'[^']+')*\s*", m.group("over")):
    return None                                   # sub-axes or another unknown form
  over = re.findall(r"'([^']+)'", m.group("over"))
  names = [name for name, _ in axes]
  if not axes or any(name not in names for name in over):
    return None
  sizes = [int(size) for _, size in axes]
  ids = (_iota(m.group("dims"), m.group("perm")) if m.group("dims")
         else np.arange(math.prod(sizes))).reshape(sizes)
  # Devices in one group differ only in the coordinates of the reduced axes.
  moved = [names.index(name) for name in over]
  kept = [i for i in range(len(names)) if i not in moved]
  ids = ids.transpose(kept + moved).reshape(-1, math.prod(sizes[i] for i in moved))
  return tuple(tuple(int(v) for v in row) for row in ids)


def _groups(attrs: str) -> tuple[tuple[int, ...], ...] | None:
  explicit = _EXPLICIT_GROUPS.search(attrs)
  if explicit:
    return tuple(tuple(int(v) for v in g.split(",") if v.strip())
                 for g in re.findall(r"\{([0-9,\s]*)\}", explicit.group(1)))
  iota = _IOTA_GROUPS.search(attrs)
  if iota:
    # Iota form [G,S]<=[d0,d1,...]T(perm): arange over dims, transposed, reshaped to G x S.
    ids = _iota(iota.group("dims"), iota.group("perm"))
    shape = [int(v) for v in iota.group("shape").split(",")]
    return tuple(tuple(int(v) for v in row) for row in ids.reshape(shape))
  mesh = _MESH_GROUPS.search(attrs)
  if mesh:
    return _mesh_groups(mesh)
  if "replica_groups=" in attrs and "replica_groups={}" not in attrs:
    return None
  return ()


def collectives(compiled_hlo_text: str) -> list[Collective]:
  """Parses the collectives of an optimized HLO module's text, in program order.

  Args:
    compiled_hlo_text: ``jax.jit(f).lower(*args).compile().as_text()``.

  Returns:
    One :class:`Collective` per collective; an async ``-start``/``-done`` pair
    is one entry.
  """
  starts: dict[str, re.Match] = {}
  found = []
  where: list[str] = []                    # the computation of each entry of `found`
  calls: dict[str, set[str]] = {}          # computation -> computations it runs
  branches: set[str] = set()               # branches of conditionals
  current = ""
  for line in compiled_hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head is not None and line.rstrip().endswith("{") and " = " not in line.split("(")[0]:
      current = head.group("name")
      continue
    calls.setdefault(current, set()).update(_CALLED.findall(line))
    if " conditional(" in line:
      for group in _BRANCH_LIST.findall(line):
        branches.update(name.strip().lstrip("%") for name in group.split(",") if name.strip())
      branches.update(_TRUE_FALSE.findall(line))
    m = _INSTRUCTION.match(line)
    if m is None:
      continue
    op = m.group("op")
    if op.endswith("-start"):
      starts[m.group("name")] = m
      continue
    # Operands, then attributes: `rest` holds both (operands may carry their
    # own tuple shapes, so they are not split off by parentheses).
    attrs = m.group("rest")
    if op.endswith("-done"):
      operand = _OPERAND_NAME.search(attrs)
      start = starts.get(operand.group(1)) if operand else None
      attrs = start.group("rest") if start is not None else attrs
      op = op[:-len("-done")]
    shapes = _shapes(m.group("shape"))
    found.append(Collective(kind=op, name=m.group("name"), nbytes=_nbytes(shapes),
                            shapes=shapes, groups=_groups(attrs)))
    where.append(current)
  # Computations that run only inside a branch: the branches and all they call.
  in_branch, todo = set(), list(branches)
  while todo:
    name = todo.pop()
    if name not in in_branch:
      in_branch.add(name)
      todo.extend(calls.get(name, ()))
  return [dataclasses.replace(c, conditional=True) if w in in_branch else c
          for c, w in zip(found, where, strict=True)]


def unconditional(found: list[Collective]) -> list[Collective]:
  """The collectives every run executes: ``found`` without those inside a
  branch of a conditional (``lax.cond``)."""
  return [c for c in found if not c.conditional]


def compiled_text(fn: Callable[..., Any], *args: Any) -> str:
  """The optimized HLO of ``jax.jit(fn)`` for ``args`` (shardings taken from the arrays)."""
  return jax.jit(fn).lower(*args).compile().as_text()


def _select(fn, args, kind):
  if kind is not None and kind not in KINDS:
    raise ValueError(f"`kind` must be one of {KINDS} or None, got {kind!r}.")
  found = collectives(compiled_text(fn, *args))
  return [c for c in found if kind is None or c.kind == kind]


def count(fn: Callable[..., Any], *args: Any, kind: str | None = "all-reduce") -> int:
  """Number of collectives of ``kind`` (``None``: all kinds) in ``jax.jit(fn)`` on ``args``."""
  return len(_select(fn, args, kind))


def total_bytes(fn: Callable[..., Any], *args: Any, kind: str | None = "all-reduce") -> int:
  """Total result bytes of the collectives of ``kind`` (``None``: all) in ``jax.jit(fn)``."""
  return sum(c.nbytes for c in _select(fn, args, kind))


# Run as a script (`python tests/collectives.py` from the repository root), this prints the
# per-layer table of README's "Scaling out": the collectives of one call of each layer on 8
# simulated CPU devices, jaxnorm beside flax.linen.


def _table() -> str:
  import flax.linen as nn
  import jax.numpy as jnp
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxnorm

  mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
  put = lambda t, s: jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, s)), t)
  state = lambda c: {"mean": jnp.zeros(c), "var": jnp.ones(c)}

  def summary(found):
    kinds: dict[str, list[int]] = {}
    for c in found:
      k = kinds.setdefault(c.kind, [0, 0])
      k[0] += 1
      k[1] += c.nbytes
    return ", ".join(f"{n} {kind} ({b:,} B)" for kind, (n, b) in kinds.items())

  def describe(fn, args):
    # Every call's collectives, then those of a conditional's branch (the second look).
    found = collectives(compiled_text(fn, *args))
    always = summary(unconditional(found)) or "none"
    branch = summary([c for c in found if c.conditional])
    return always + (f"; if taken, {branch}" if branch else "")

  def row(name, ours, theirs, x, p_spec, x_spec, mapped=False):
    params = {"scale": jnp.ones(x.shape[-1]), "bias": jnp.zeros(x.shape[-1])}
    args = (put(params, p_spec), put(x, x_spec), put(jnp.ones_like(x), x_spec))
    cells = []
    for grad in (False, True):
      for f in (ours, theirs):
        if f is None:
          cells.append("")
          continue
        # Forward: the output and the new running averages; backward: the gradients
        # (and the new running averages) of sum(y * w).
        if grad:
          def g(p, x, w, f=f):
            def loss(p, x):
              y, aux = f(p, x)               # one call, as a training step makes it
              return jnp.sum(y * w), aux
            return jax.grad(loss, argnums=(0, 1), has_aux=True)(p, x)
        else:
          g = lambda p, x, w, f=f: f(p, x)
        if mapped:
          g = jax.shard_map(g, mesh=mesh, in_specs=(p_spec, x_spec, x_spec),
                            out_specs=((p_spec, x_spec), P()) if grad else (x_spec, P()))
        cells.append(describe(g, args))
    return f"| {name} | " + " | ".join(cells) + " |"

  b, c = 2048, 64
  x, img, wide = jnp.ones((b, c)), jnp.ones((b, 2, 2, 16)), jnp.ones((b // 8, c * 8))
  # Each layer as f(params, x) -> (y, new running averages or {}).
  flax_bn = lambda an: (lambda p, x: nn.BatchNorm(use_running_average=False, axis_name=an).apply(
      {"params": p, "batch_stats": state(x.shape[-1])}, x, mutable=["batch_stats"]))
  flax_ln = lambda an: (lambda p, x: (nn.LayerNorm(axis_name=an).apply({"params": p}, x), {}))
  bn = lambda **kw: (lambda p, x: jaxnorm.batch_norm(p, state(x.shape[-1]), x, train=True, **kw))
  rows, cols = P("d"), P(None, "d")
  lines = [
      "| layer call | jaxnorm forward | flax.linen forward | jaxnorm forward + backward "
      "| flax.linen forward + backward |",
      "|---|---|---|---|---|",
      row("`batch_norm`, batch split, sharded `jit`", bn(), flax_bn(None), x, P(), rows),
      row("`batch_norm`, batch split, `shard_map` + `axis_name`", bn(axis_name="d"), flax_bn("d"),
          x, P(), rows, mapped=True),
      row("ghost `batch_norm` (k=32), batch split, sharded `jit`", bn(virtual_batch_size=32), None,
          x, P(), rows),
      row("ghost `batch_norm` (k=32), `shard_map` + `axis_name`",
          bn(virtual_batch_size=32, axis_name="d"), None, x, P(), rows, mapped=True),
      row("`batch_renorm`, batch split, sharded `jit`",
          lambda p, x: jaxnorm.batch_renorm(p, state(c), x, train=True), None, x, P(), rows),
      row("`batch_norm`, features split, sharded `jit`", bn(), flax_bn(None), wide, rows, cols),
      row("`batch_norm` inference, batch split",
          lambda p, x: jaxnorm.batch_norm(p, state(c), x, train=False), None, x, P(), rows),
      row("`layer_norm`, batch split", lambda p, x: (jaxnorm.layer_norm(p, x), {}),
          flax_ln(None), x, P(), rows),
      row("`group_norm` (4 groups), batch split",
          lambda p, x: (jaxnorm.group_norm(p, x, num_groups=4), {}),
          lambda p, x: (nn.GroupNorm(num_groups=4).apply({"params": p}, x), {}), img, P(), rows),
      row("`layer_norm`, features split, sharded `jit`",
          lambda p, x: (jaxnorm.layer_norm(p, x), {}), flax_ln(None), wide, rows, cols),
      row("`layer_norm`, features split, `shard_map` + `axis_name`",
          lambda p, x: (jaxnorm.layer_norm(p, x, axis_name="d"), {}), flax_ln("d"), wide, rows,
          cols, mapped=True),
      row("`rms_norm`, features split, sharded `jit`",
          lambda p, x: (jaxnorm.rms_norm({"scale": p["scale"]}, x), {}),
          lambda p, x: (nn.RMSNorm().apply({"params": {"scale": p["scale"]}}, x), {}), wide, rows,
          cols),
  ]
  return "\n".join(lines)


if __name__ == "__main__":
  import os

  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
  print(_table())
