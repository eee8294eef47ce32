"""Data-parallel training with BatchNorm across several processes, on JAX's own runtime.

A small MLP or CNN with ``jaxnorm.linen.BatchNorm`` learns scikit-learn's digits. Every process runs
this same program (as on a cluster: one process per host): it joins ``jax.distributed``, builds a
mesh over the devices of all processes, and trains on a global batch split across them. BatchNorm's
``axis_name="data"`` makes its statistics those of the global batch, so the run equals one process
on one device with the same global batches, up to float32 rounding.

Launcher mode (no ``--process-id``) starts ``--num-processes`` local CPU processes itself, checks
that they end with bitwise-identical ``params`` and ``batch_stats``, then trains once more in a
single process on one device and compares:

  python examples/distributed.py --num-processes 2
  python examples/distributed.py --num-processes 4 --model cnn --local-devices 2

One process of a real multi-host job (run the same command on every host, ``i`` = 0..N-1):

  python examples/distributed.py --num-processes N --process-id i --coordinator HOST0:1234
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jaxnorm.linen as jl

import _common as common

AXIS = "data"


class MLP(nn.Module):
  """Flatten, 2 x [Dense (no bias) -> BatchNorm -> relu], Dense."""

  hidden: Sequence[int] = (128, 64)
  num_classes: int = 10
  axis_name: str | None = AXIS

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.Dense(width, use_bias=False)(x)
      x = jl.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """2 x [Conv 3x3 (no bias) -> BatchNorm -> relu], global average pool, Dense."""

  features: Sequence[int] = (16, 32)
  num_classes: int = 10
  axis_name: str | None = AXIS

  @nn.compact
  def __call__(self, x, train: bool):
    for f in self.features:
      x = nn.Conv(f, (3, 3), use_bias=False)(x)
      x = jl.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


MODELS = {"mlp": MLP, "cnn": CNN}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--num-processes", type=int, default=2, help="processes in the job")
  parser.add_argument("--process-id", type=int, default=None,
                      help="this process's index; omit to launch all processes locally")
  parser.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                      help="address of process 0 (launcher mode picks a free local port)")
  parser.add_argument("--local-devices", type=int, default=1,
                      help="launcher mode: simulated CPU devices per process")
  parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
  parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
  parser.add_argument("--steps", type=int, default=None,
                      help="SGD steps (default 200, 20 with --quick)")
  parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (momentum 0.9)")
  parser.add_argument("--seed", type=int, default=0, help="seed of initialization and batch order")
  parser.add_argument("--out", default="out/distributed",
                      help="directory for each process's result")
  parser.add_argument("--quick", action="store_true", help="a short run for smoke tests and CI")
  parser.add_argument("--timeout", type=float, default=600.0,
                      help="launcher mode: seconds before the processes are killed")
  return parser


# --------------------------------------------------------------------------------------------------
# Training: the same code for N processes and for one.
# --------------------------------------------------------------------------------------------------


def make_step(model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh):
  """One SGD step, data parallel: each device takes its slice of the global batch.

  Inside ``shard_map`` every device sees its own rows; BatchNorm's ``axis_name`` pools the
  statistics over all devices, and ``pmean`` of the loss makes the gradient that of the global
  batch's mean loss (the same on every device, so the parameters stay identical).
  """
  def local_step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return jax.lax.pmean(loss, AXIS), updates["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  rep, rows = P(), P(AXIS)
  return jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(rep, rep, rep, rows, rows),
                               out_specs=(rep, rep, rep, rep)))


def train(args: argparse.Namespace, mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """Trains from the seed on the global batches of the seed; returns the final variables
  (flattened to ``"params/..."`` and ``"batch_stats/..."`` NumPy arrays) and the test accuracy."""
  data = common.load_digits_dataset()
  model = MODELS[args.model](num_classes=data.num_classes)
  tx = optax.sgd(args.lr, momentum=0.9)
  n_dev = mesh.devices.size
  if args.batch_size % n_dev:
    raise ValueError(f"`--batch-size` {args.batch_size} must be a multiple of the {n_dev} devices.")

  def put(tree, spec):
    # Every process holds the whole (small) data set, so each builds its own shards of the
    # global array from it; with data that does not fit one host, use
    # jax.make_array_from_process_local_data with each process's rows instead.
    sharding = NamedSharding(mesh, spec)
    def shard(a: np.ndarray) -> jax.Array:
      host = np.asarray(a)
      return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])
    return jax.tree.map(shard, tree)

  # The same initial values in every process: init on the host, without axis_name.
  init_model = MODELS[args.model](num_classes=data.num_classes, axis_name=None)
  variables = jax.jit(init_model.init, static_argnames="train")(
      jax.random.key(args.seed), jnp.zeros((2, *data.x_train.shape[1:])), train=False)
  variables = jax.tree.map(np.asarray, variables)
  params, batch_stats = put(variables["params"], P()), put(variables["batch_stats"], P())
  opt_state = put(jax.tree.map(np.asarray, tx.init(variables["params"])), P())

  step = make_step(model, tx, mesh)
  rng = np.random.default_rng(args.seed)
  steps_done, losses = 0, []
  while steps_done < args.steps:
    for idx in common.batches(len(data.y_train), args.batch_size, rng):
      x, y = put(data.x_train[idx], P(AXIS)), put(data.y_train[idx], P(AXIS))
      params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, x, y)
      steps_done += 1
      losses.append(loss)
      if steps_done == args.steps:
        break

  # The results are replicated: every device (so every process) holds the whole value.
  local = lambda tree: jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)
  final = {"params": local(params), "batch_stats": local(batch_stats)}
  logits = jax.jit(model.apply, static_argnames="train")(
      final, data.x_test, train=False)
  out = {f"{k}/{'/'.join(str(getattr(p, 'key', p)) for p in path)}": leaf
         for k in ("params", "batch_stats")
         for path, leaf in jax.tree_util.tree_flatten_with_path(final[k])[0]}
  out["test_accuracy"] = np.float64((np.asarray(logits).argmax(-1) == data.y_test).mean())
  out["final_loss"] = np.float64(np.asarray(losses[-1].addressable_data(0)))
  return out


# --------------------------------------------------------------------------------------------------
# One process of the job, and the local launcher.
# --------------------------------------------------------------------------------------------------


def run_process(args: argparse.Namespace) -> dict[str, np.ndarray]:
  """One process: joins the job, trains, writes ``--out/process_<id>.npz``."""
  if args.coordinator is None:
    raise ValueError("`--coordinator HOST:PORT` is needed with `--process-id`.")
  # CPU collectives across processes.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                             process_id=args.process_id)
  mesh = jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  t0 = time.perf_counter()
  result = train(args, mesh)
  os.makedirs(args.out, exist_ok=True)
  arrays: dict[str, Any] = dict(result)   # numpy's stub reads ** as its keyword options
  np.savez(os.path.join(args.out, f"process_{args.process_id}.npz"), **arrays)
  print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} of "
        f"{jax.device_count()} devices, {args.steps} steps in {time.perf_counter() - t0:.1f} s, "
        f"final loss {float(result['final_loss']):.4f}, "
        f"test accuracy {float(result['test_accuracy']):.3f}", flush=True)
  jax.distributed.shutdown()
  return result


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(args: argparse.Namespace) -> dict:
  """Starts the processes locally, checks that they agree, compares with one process."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.local_devices}")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  common_args = ["--num-processes", str(args.num_processes), "--coordinator", f"localhost:{port}",
                 "--model", args.model, "--batch-size", str(args.batch_size),
                 "--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed),
                 "--out", args.out]
  print(f"launching {args.num_processes} processes x {args.local_devices} CPU devices, "
        f"coordinator localhost:{port}", flush=True)
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--process-id", str(i),
                             *common_args], env=env)
           for i in range(args.num_processes)]
  deadline = time.monotonic() + args.timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired as err:
    raise SystemExit(
        f"the processes did not finish within {args.timeout:.0f} s; stopped them.") from err
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  if any(p.returncode for p in procs):
    raise SystemExit(f"a process failed: exit codes {[p.returncode for p in procs]}")

  results = [dict(np.load(os.path.join(args.out, f"process_{i}.npz")))
             for i in range(args.num_processes)]
  keys = [k for k in results[0] if k.startswith(("params/", "batch_stats/"))]
  identical = all(np.array_equal(r[k], results[0][k]) for r in results[1:] for k in keys)
  print(f"all {args.num_processes} processes hold identical params and batch_stats: "
        f"{'yes' if identical else 'NO'}")

  # The same program in this process, on one device, with the same global batches.
  single = train(args, jax.make_mesh((1,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                                     devices=jax.devices("cpu")[:1]))
  diff = max(float(np.max(np.abs(results[0][k] - single[k])) /
                   max(float(np.max(np.abs(single[k]))), 1e-12)) for k in keys)
  # Different reduction orders round differently in float32; after a few hundred SGD steps
  # that stays far below the 1e-3 checked here.
  same = diff < 1e-3
  print(f"equals a single-process run on one device with the same global batch: "
        f"{'yes' if same else 'NO'} (largest relative difference {diff:.1e}; "
        f"test accuracy {float(results[0]['test_accuracy']):.3f} vs "
        f"{float(single['test_accuracy']):.3f})")
  if not (identical and same):
    raise SystemExit(1)
  return {"identical": identical, "relative_difference": diff, "results": results,
          "single": single}


def main(argv: Sequence[str] | None = None) -> dict:
  args = build_parser().parse_args(argv)
  if args.steps is None:
    args.steps = 20 if args.quick else 200
  if args.process_id is None:
    return launch(args)
  return run_process(args)


if __name__ == "__main__":
  main()
