"""One process of the multi-process tests (tests/test_distributed.py launches two).

Usage: ``python _distributed_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``,
with ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` in the environment
(D local CPU devices per process). Every process runs the same program (as on
a real cluster): it joins JAX's distributed runtime on ``localhost:PORT`` with
gloo collectives, builds global arrays over a 1-D mesh of all devices (the
batch, or for layer norm's tensor-parallel case the features, split across the
processes), runs each layer both under ``jax.shard_map`` with ``axis_name`` and
as a sharded ``jax.jit``, and writes the gathered results to
``OUT_DIR/process_<id>.npz``. Process 0 also writes the inputs, so the test
computes its float64 reference from exactly what the layers saw.

The data are made with NumPy from fixed seeds, identical in every process; the
rows of process p hold an offset of ``1e5 * p``, so the per-process means
differ by 1e5.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import numpy as np

BATCH_PER_DEVICE = 4
FEATURES = 3
GHOST = 2          # virtual batch size: two chunks per device
OFFSET = 1e5       # per-process shift of the data
MOMENTUM = 0.9
RENORM = {"r_max": 1.5, "d_max": 0.5}
GN_GROUPS = 2
LN_FEATURES_PER_DEVICE = 3


def inputs(num_processes: int, devices_per_process: int) -> dict[str, np.ndarray]:
  """The global inputs, the same in every process (float32)."""
  n_dev = num_processes * devices_per_process
  n = BATCH_PER_DEVICE * n_dev
  rng = np.random.default_rng(0)
  process_of_row = np.repeat(np.arange(num_processes), n // num_processes)
  x = 3.0 + 2.0 * rng.standard_normal((n, FEATURES))
  x_offset = x + OFFSET * process_of_row[:, None]
  # The last process selects nothing; process 0 leaves out one of its rows.
  mask = process_of_row[:, None] == 0
  mask = np.broadcast_to(mask, (n, FEATURES)).copy()
  mask[1] = False
  mask[2, 0] = False
  # Padding as it arrives in practice: NaN and inf where the mask says nothing is there.
  x_padded = np.where(mask, x_offset, np.nan)
  x_padded[1, 1] = np.inf
  data = {
      "x": x, "x_offset": x_offset, "mask": mask, "x_padded": x_padded,
      "w": rng.standard_normal((n, FEATURES)),                # loss weights: L = sum(y * w)
      "scale": 1.0 + rng.uniform(size=FEATURES), "bias": rng.standard_normal(FEATURES),
      "state_mean": rng.standard_normal(FEATURES), "state_var": 0.5 + rng.uniform(size=FEATURES),
      # Group norm: (N, 2, 2, C=4) with two groups; layer norm over features sharded on devices.
      "x_img": 1.0 + rng.standard_normal((n, 2, 2, 4)) * np.array([1.0, 3.0, 0.5, 2.0]),
      "w_img": rng.standard_normal((n, 2, 2, 4)),
      "scale_img": 1.0 + rng.uniform(size=4), "bias_img": rng.standard_normal(4),
      "x_wide": 5.0 + rng.standard_normal((4, LN_FEATURES_PER_DEVICE * n_dev)),
      "w_wide": rng.standard_normal((4, LN_FEATURES_PER_DEVICE * n_dev)),
      "scale_wide": 1.0 + rng.uniform(size=LN_FEATURES_PER_DEVICE * n_dev),
      "bias_wide": rng.standard_normal(LN_FEATURES_PER_DEVICE * n_dev),
  }
  return {k: (v if v.dtype == bool else v.astype(np.float32)) for k, v in data.items()}


def run(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=num_processes,
                             process_id=process_id, initialization_timeout=120)
  import jax.numpy as jnp
  from flax import nnx
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxnorm
  import jaxnorm.linen as jl
  import jaxnorm.nnx as jx

  t0 = time.time()
  n_local = jax.local_device_count()
  data = inputs(num_processes, n_local)
  mesh = jax.make_mesh((jax.device_count(),), ("b",), axis_types=(AxisType.Auto,))

  def put(a, spec):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i: a[i])

  def fetch(tree):
    def one(a):
      if a.is_fully_replicated:
        return np.asarray(a.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.tree.map(one, tree)

  results = {}

  def record(name, tree):
    for path, leaf in jax.tree_util.tree_flatten_with_path(fetch(tree))[0]:
      names = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
      key = "/".join(n for n in names if n != "value")      # nnx Variables' inner field
      results[f"{name}/{key}"] = leaf

  @functools.partial(jax.jit, static_argnums=0)
  def loss_and_grads(apply, x, params, state, mask, w):
    """(y, new state, dL/dx, dL/dparams) of L = sum over selected entries of y * w.

    Every array is an argument: a jit may not close over global arrays.
    """
    def loss(x, params):
      y, new_state = apply(params, state, x, mask)
      picked = y * w if mask is None else jnp.where(mask, y * w, 0.0)
      return jnp.sum(picked), (y, new_state)
    (_, (y, new_state)), (dx, dp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        x, params)
    return {"y": y, "state": new_state, "dx": dx, "dparams": dp}

  def both(layer, specs, axis_name="b", **kw):
    """The layer as (shard_map with axis_name, plain function for sharded jit)."""
    x_spec, p_spec, s_spec, m_spec = specs
    def mapped(p, s, x, m):
      f = lambda p, s, x, m: layer(p, s, x, m, axis_name=axis_name, **kw)
      in_specs = (p_spec, s_spec, x_spec, None if m is None else m_spec)
      return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=(x_spec, P()))(p, s, x, m)
    plain = lambda p, s, x, m: layer(p, s, x, m, axis_name=None, **kw)
    return {"smap": mapped, "jit": plain}

  # Train-mode batch norm, ghost batch norm and batch renorm: the batch split over
  # every device of every process; statistics over the global batch.
  def bn(p, s, x, m, **kw):
    return jaxnorm.batch_norm(p, s, x, train=True, momentum=MOMENTUM, mask=m, **kw)

  def renorm(p, s, x, m, **kw):
    return jaxnorm.batch_renorm(p, s, x, train=True, momentum=MOMENTUM, mask=m, **RENORM, **kw)

  rows, rep = P("b"), P()
  batch_specs = (rows, rep, rep, rows)
  x, x_offset, w = put(data["x"], rows), put(data["x_offset"], rows), put(data["w"], rows)
  params = {"scale": put(data["scale"], rep), "bias": put(data["bias"], rep)}
  state = {"mean": put(np.zeros(FEATURES, np.float32), rep),
           "var": put(np.ones(FEATURES, np.float32), rep)}
  renorm_state = {"mean": put(data["state_mean"], rep), "var": put(data["state_var"], rep)}
  mask = put(data["mask"], rows)
  cases = {
      "bn": (both(bn, batch_specs), x_offset, params, state, None, w),
      "bn_mask": (both(bn, batch_specs), x_offset, params, state, mask, w),
      "bn_nan": (both(bn, batch_specs), put(data["x_padded"], rows), params, state, mask, w),
      "ghost": (both(bn, batch_specs, virtual_batch_size=GHOST), x, params, state, None, w),
      "renorm": (both(renorm, batch_specs), x, params, renorm_state, None, w),
  }

  # Group norm with the batch split (per-example statistics: no communication),
  # and layer norm with the features split over the devices (tensor parallel).
  def gn(p, s, x, m, axis_name):
    return jaxnorm.group_norm(p, x, num_groups=GN_GROUPS, mask=m), {}

  def ln(p, s, x, m, axis_name):
    return jaxnorm.layer_norm(p, x, mask=m, axis_name=axis_name), {}

  img_params = {"scale": put(data["scale_img"], rep), "bias": put(data["bias_img"], rep)}
  x_img, w_img = put(data["x_img"], rows), put(data["w_img"], rows)
  cols = P(None, "b")
  wide_params = {"scale": put(data["scale_wide"], rows), "bias": put(data["bias_wide"], rows)}
  x_wide, w_wide = put(data["x_wide"], cols), put(data["w_wide"], cols)
  cases["gn"] = (both(gn, (rows, rep, rep, rows), axis_name=None), x_img, img_params, {}, None,
                 w_img)
  cases["ln_cols"] = (both(ln, (cols, rows, rep, cols)), x_wide, wide_params, {}, None, w_wide)

  # The Flax modules, as a user writes them: linen apply with mutable batch_stats,
  # nnx split/merge; axis_name under shard_map, nothing extra under sharded jit.
  bn_linen = {how: jl.BatchNorm(use_running_average=False, momentum=MOMENTUM, axis_name=name)
              for how, name in (("smap", "b"), ("jit", None))}

  def linen(p, s, x, m, axis_name):
    module = bn_linen["smap" if axis_name else "jit"]
    y, upd = module.apply({"params": p, "batch_stats": s}, x, mutable=["batch_stats"])
    return y, upd["batch_stats"]

  model = jx.BatchNorm(FEATURES, momentum=MOMENTUM, axis_name="b", rngs=nnx.Rngs(0))
  graphdefs = {}
  for how, name in (("smap", "b"), ("jit", None)):
    model.axis_name = name
    graphdefs[how], p_nnx, s_nnx = nnx.split(model, nnx.Param, nnx.BatchStat)

  def nnx_bn(p, s, x, m, axis_name):
    module = nnx.merge(graphdefs["smap" if axis_name else "jit"], p, s, copy=True)
    return module(x), nnx.state(module, nnx.BatchStat)

  nnx.replace_by_pure_dict(p_nnx, {"scale": data["scale"], "bias": data["bias"]})
  p_nnx = jax.tree.map(lambda a: put(np.asarray(a), rep), p_nnx)
  s_nnx = jax.tree.map(lambda a: put(np.asarray(a), rep), s_nnx)
  cases["linen"] = (both(linen, batch_specs), x_offset, params, state, None, w)
  cases["nnx"] = (both(nnx_bn, batch_specs), x_offset, p_nnx, s_nnx, None, w)

  for name, (fns, *args) in cases.items():
    for how, apply in fns.items():
      record(f"{name}/{how}", loss_and_grads(apply, *args))

  if process_id == 0:
    results.update({f"in/{k}": v for k, v in data.items()})
  results["meta/seconds"] = np.float64(time.time() - t0)
  results["meta/devices"] = np.int64(jax.device_count())
  os.makedirs(out_dir, exist_ok=True)
  tmp = os.path.join(out_dir, f"process_{process_id}.tmp.npz")
  np.savez(tmp, **results)
  os.replace(tmp, os.path.join(out_dir, f"process_{process_id}.npz"))
  jax.distributed.shutdown()


if __name__ == "__main__":
  pid, nproc, port, out = sys.argv[1:5]
  run(int(pid), int(nproc), int(port), out)
