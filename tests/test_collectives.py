"""Tests of the collective counter (tests/collectives.py) on programs whose collectives are known.

Each program issues one explicit collective under `jax.shard_map` on the eight
CPU devices of conftest, so the expected kind, bytes and groups follow from
the shapes by hand. Async `-start`/`-done` pairs (GPU/TPU only) are checked on
hand-written HLO text in the form those backends print.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from collectives import Collective
from collectives import collectives
from collectives import compiled_text
from collectives import count
from collectives import total_bytes
from collectives import unconditional
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ALL8 = ((0, 1, 2, 3, 4, 5, 6, 7),)


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.fail(f"needs 8 devices, got {jax.device_count()}; check conftest's XLA_FLAGS")
  return jax.make_mesh((8,), ("b",))


def _put(mesh, x, spec):
  return jax.device_put(x, NamedSharding(mesh, spec))


def _smap(mesh, f, in_specs, out_specs):
  return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def test_psum_is_one_all_reduce_of_the_shard(mesh):
  x = _put(mesh, jnp.ones((16, 3)), P("b"))
  f = _smap(mesh, lambda x: jax.lax.psum(x, "b"), P("b"), P())
  (c,) = collectives(compiled_text(f, x))
  assert c.kind == "all-reduce"
  assert c.nbytes == 2 * 3 * 4                 # one device's f32[2, 3]
  assert c.shapes == (("f32", (2, 3)),)
  assert c.groups == ALL8 and c.group_size == 8
  assert count(f, x) == 1 and total_bytes(f, x) == 24
  assert count(f, x, kind="all-gather") == 0


def test_psum_of_two_dtypes_counts_each_array(mesh):
  # f32 and s32 cannot share one reduction: two all-reduces, 24 + 32 bytes.
  x = _put(mesh, jnp.ones((16, 3)), P("b"))
  i = _put(mesh, jnp.ones((16, 4), jnp.int32), P("b"))
  f = _smap(mesh, lambda x, i: jax.lax.psum((x, i), "b"), (P("b"), P("b")), P())
  assert count(f, x, i) == 2
  assert total_bytes(f, x, i) == 2 * 3 * 4 + 2 * 4 * 4


def test_all_gather_bytes_are_the_gathered_array(mesh):
  x = _put(mesh, jnp.ones((16, 3)), P("b"))
  f = _smap(mesh, lambda x: jax.lax.all_gather(x, "b", tiled=True), P("b"), P())
  (c,) = collectives(compiled_text(f, x))
  assert (c.kind, c.nbytes, c.groups) == ("all-gather", 16 * 3 * 4, ALL8)
  assert count(f, x, kind=None) == 1


def test_reduce_scatter_bytes_are_one_shard(mesh):
  x = _put(mesh, jnp.ones((16, 3)), P())
  f = _smap(mesh, lambda x: jax.lax.psum_scatter(x, "b", tiled=True), P(), P("b"))
  (c,) = collectives(compiled_text(f, x))
  assert (c.kind, c.nbytes, c.groups) == ("reduce-scatter", 2 * 3 * 4, ALL8)


def test_collective_permute_keeps_its_pairs(mesh):
  x = _put(mesh, jnp.ones((16, 3)), P("b"))
  pairs = [(i, (i + 1) % 8) for i in range(8)]
  f = _smap(mesh, lambda x: jax.lax.ppermute(x, "b", pairs), P("b"), P("b"))
  (c,) = collectives(compiled_text(f, x))
  assert (c.kind, c.nbytes) == ("collective-permute", 2 * 3 * 4)
  assert c.groups == tuple(pairs) and c.group_size is None


def test_all_to_all_tuple_result_counts_once(mesh):
  # XLA's CPU backend splits the local f32[8, 3] into 8 slices: a tuple of eight f32[1, 3].
  x = _put(mesh, jnp.ones((64, 3)), P("b"))
  f = _smap(mesh, lambda x: jax.lax.all_to_all(x, "b", 0, 0, tiled=True), P("b"), P("b"))
  assert count(f, x, kind="all-to-all") == 1
  assert total_bytes(f, x, kind="all-to-all") == 8 * 3 * 4
  assert count(f, x, kind=None) == 1


def test_sub_axis_groups_on_a_two_d_mesh():
  mesh2 = jax.make_mesh((2, 4), ("d", "m"))
  x = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh2, P("d", "m")))
  f = jax.shard_map(lambda x: jax.lax.psum(x, "m"), mesh=mesh2, in_specs=P("d", "m"),
                    out_specs=P("d"), check_vma=False)
  (c,) = collectives(compiled_text(f, x))
  # Devices (d, m) are numbered d * 4 + m: summing over m groups each row of the mesh.
  assert c.kind == "all-reduce" and c.nbytes == 4 * 2 * 4
  assert sorted(c.groups) == [(0, 1, 2, 3), (4, 5, 6, 7)] and c.group_size == 4


def test_sharded_jit_sum_inserts_one_all_reduce(mesh):
  # No explicit collective: the SPMD partitioner adds the cross-device sum itself.
  x = _put(mesh, jnp.ones((16, 3)), P("b"))
  f = lambda x: jnp.sum(x, axis=0)
  assert count(f, x) == 1
  assert total_bytes(f, x) == 3 * 4


def test_unsharded_program_has_no_collectives():
  assert count(lambda x: jnp.sum(x * 2.0), jnp.ones((16, 3)), kind=None) == 0


def test_collectives_in_a_branch_of_a_cond_are_marked(mesh):
  # The sum in the taken-only-sometimes branch is an all-reduce of its own; the one
  # the predicate needs runs every time.
  x = _put(mesh, jnp.ones((16, 3)), P("b"))
  f = lambda x: jax.lax.cond(jnp.sum(x) > 0, lambda: jnp.sum(x * x, axis=0),
                             lambda: jnp.zeros(3))
  found = collectives(compiled_text(f, x))
  assert sorted((c.conditional, c.kind) for c in found) == [
      (False, "all-reduce"), (True, "all-reduce")]
  assert [c.conditional for c in unconditional(found)] == [False]


# Hand-written text in the form GPU backends print (async pairs, tuple all-reduce,
# an async wrapper calling a reduce-scatter, iota replica groups). A backslash at
# the end of a line continues that HLO line on the next.
_ASYNC_HLO = """\
HloModule m, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%wrapped_reduce_scatter (p: f32[8]) -> f32[2] {
  %p = f32[8]{0} parameter(0)
  ROOT %rs = f32[2]{0} reduce-scatter(f32[8]{0} %p), channel_id=4, replica_groups=[1,4]<=[4], \
dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[8], y: bf16[6]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %y = bf16[6]{0} parameter(1)
  %all-reduce-start = f32[8]{0} all-reduce-start(f32[8]{0} %x), channel_id=1, \
replica_groups={{0,1},{2,3}}, to_apply=%add
  %all-reduce-done = f32[8]{0} all-reduce-done(f32[8]{0} %all-reduce-start)
  %all-gather-start = (f32[8]{0}, f32[32]{0}) all-gather-start(f32[8]{0} %all-reduce-done), \
channel_id=2, replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}
  %all-gather-done = f32[32]{0} all-gather-done((f32[8]{0}, f32[32]{0}) %all-gather-start)
  %ar2 = (f32[8]{0}, bf16[6]{0}) all-reduce(f32[8]{0} %x, bf16[6]{0} %y), channel_id=3, \
replica_groups={}, to_apply=%add
  %rs-start = ((f32[8]{0}), f32[2]{0}) async-start(f32[8]{0} %x), calls=%wrapped_reduce_scatter
  %rs-done = f32[2]{0} async-done(((f32[8]{0}), f32[2]{0}) %rs-start)
  %cp-start = (f32[2]{0}, f32[2]{0}, u32[], u32[]) collective-permute-start(f32[2]{0} %rs-done), \
channel_id=5, source_target_pairs={{0,1},{1,0}}
  ROOT %cp-done = f32[2]{0} collective-permute-done((f32[2]{0}, f32[2]{0}, u32[], \
u32[]) %cp-start)
}
"""


def test_async_pairs_tuples_and_wrapped_collectives_from_text():
  found = collectives(_ASYNC_HLO)
  assert [c.kind for c in found] == [
      "reduce-scatter", "all-reduce", "all-gather", "all-reduce", "collective-permute"]
  rs, ar, ag, ar2, cp = found
  assert rs == Collective("reduce-scatter", "rs", 8, (("f32", (2,)),), ((0, 1, 2, 3),))
  # The -done's shape, the -start's groups.
  assert (ar.name, ar.nbytes, ar.groups) == ("all-reduce-done", 32, ((0, 1), (2, 3)))
  assert (ag.nbytes, ag.groups) == (128, ((0, 2), (1, 3)))
  # One combined all-reduce of f32[8] and bf16[6]; empty groups mean every device.
  assert (ar2.nbytes, ar2.groups, ar2.group_size) == (32 + 12, (), None)
  assert (cp.nbytes, cp.groups) == (8, ((0, 1), (1, 0)))


_BRANCH_HLO = """\
HloModule m, num_partitions=2

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%wrapped (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %inner = f32[4]{0} all-reduce(f32[4]{0} %p), channel_id=2, replica_groups={}, to_apply=%add
}

%taken (t: f32[4]) -> f32[4] {
  %t = f32[4]{0} parameter(0)
  %start = ((f32[4]{0}), f32[4]{0}) async-start(f32[4]{0} %t), calls=%wrapped
  ROOT %done = f32[4]{0} async-done(((f32[4]{0}), f32[4]{0}) %start)
}

%kept (k: f32[4]) -> f32[4] {
  ROOT %k = f32[4]{0} parameter(0)
}

ENTRY %main (x: f32[4], c: pred[]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %c = pred[] parameter(1)
  %outer = f32[4]{0} all-reduce(f32[4]{0} %x), channel_id=1, replica_groups={}, to_apply=%add
  ROOT %cond = f32[4]{0} conditional(pred[] %c, f32[4]{0} %outer, f32[4]{0} %outer), \
true_computation=%taken, false_computation=%kept
}
"""


def test_branch_collectives_from_text_through_called_computations():
  found = collectives(_BRANCH_HLO)
  assert [(c.name, c.conditional) for c in found] == [("inner", True), ("outer", False)]
  assert [c.name for c in unconditional(found)] == ["outer"]


def test_unknown_kind_is_rejected():
  msg = ("`kind` must be one of ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', "
         "'collective-permute', 'collective-broadcast', 'ragged-all-to-all') or None, "
         "got 'allreduce'.")
  with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
    count(lambda x: x, jnp.ones(3), kind="allreduce")


@pytest.mark.parametrize("over, groups", [
    (0, [(0, 4), (1, 5), (2, 6), (3, 7)]),        # across the data axis
    (1, [(0, 1, 2, 3), (4, 5, 6, 7)]),            # across the model axis
])
def test_mesh_form_groups_from_sharded_jit(over, groups):
  # A sharded jit on an Auto mesh prints groups as mesh['axis_0'=2,'axis_1'=4] {'axis_k'}.
  mesh2 = jax.make_mesh((2, 4), ("d", "m"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  x = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh2, P("d", "m")))
  (c,) = collectives(compiled_text(lambda x: jnp.sum(x, axis=over), x))
  assert c.kind == "all-reduce" and sorted(c.groups) == groups


def test_mesh_form_groups_with_permuted_device_ids():
  line = ("  %ar = f32[4]{0} all-reduce(%p), channel_id=1, replica_groups=mesh['axis_0'=4,"
          "'axis_1'=2], device_ids=([2,2,2]T(0,2,1)) {'axis_0'}, to_apply=%add")
  (c,) = collectives(line)
  # Devices at mesh[i, j] are arange(8).reshape(2, 2, 2).transpose(0, 2, 1).reshape(4, 2)[i, j].
  assert sorted(c.groups) == [(0, 1, 4, 5), (2, 3, 6, 7)]
  unknown = line.replace("{'axis_0'}", "{'axis_0':(1)2}")
  assert collectives(unknown)[0].groups is None
