"""Side-by-side benchmark of jaxnorm against flax.linen (and haiku/equinox if installed).

Every case is compiled with ``jax.jit`` for each library on the same inputs,
warmed up, then timed interleaved (library A, library B, A, B, ...) in this
one process; the reported time is the median of the repeats, with
``block_until_ready`` on every output. Each time is also given as a multiple of
the memory-bandwidth floor, the time of an elementwise ``x * 2`` on the same
array, and with the temporary memory of the compiled program
(``compiled.memory_analysis().temp_size_in_bytes``).

A second table gives the max abs error of each library against a float64
NumPy reference at input offsets 0, 1e3, 1e4, 1e5 (``x = offset + randn``).

Allocator: glibc returns buffers larger than its mmap threshold (at most
32 MiB) to the kernel on free, so every step of a large-array benchmark pays
fresh page faults. By default this script re-executes itself with
``MALLOC_MMAP_MAX_=0`` and a huge ``MALLOC_TRIM_THRESHOLD_`` so freed buffers
are reused (``--malloc default`` keeps glibc's defaults). The setting is
printed with the tables.

Modes (they combine; with neither flag the single-shape tables below run):

* ``--sweep`` (``sweep.py``): every layer and pass at small, cache-sized and
  large shapes, float32 and bfloat16, with a summary of the rows where jaxnorm
  is slower than Flax.
* ``--hlo`` (``hlo.py``): the sweep's cases counted in the optimized HLO
  (launched operations, full-size intermediates, barriers, loops), no timing.
* ``--models`` (``models.py``): full jitted training steps of a ResNet-18
  (BatchNorm), a pre-LN transformer (LayerNorm, RMSNorm) and a UNet block
  (GroupNorm): step time, compile time and temporary memory.
* ``--reductions`` (``reductions.py``): the sums of one statistic on their
  own, plain (Flax's fast variance) and in a frame (exact), at the sweep's
  shapes in float32: what exactness costs in XLA's reductions.

Usage::

  python benchmarks/run.py --quick               # small shapes, a minute
  python benchmarks/run.py --out benchmark.md    # full shapes, tables to a file
  python benchmarks/run.py --sweep --models --reps 31 --out bench.md
  python benchmarks/run.py --sweep --quick --reps 3 --only "LN fwd"   # a smoke run
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys

# The checkout this script lives in is what gets measured, whatever jaxnorm is
# installed in the environment.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small shapes, fewer repeats")
  p.add_argument("--out", default=None, help="write the tables as markdown to this file")
  p.add_argument("--repeats", "--reps", type=int, default=None,
                 help="timed rounds per case (each round runs every library once)")
  p.add_argument("--sweep", action="store_true", help="the shape sweep (sweep.py)")
  p.add_argument("--models", action="store_true",
                 help="training steps of three small models (models.py)")
  p.add_argument("--hlo", action="store_true",
                 help="the sweep's cases as counts from the optimized HLO, no timing (hlo.py)")
  p.add_argument("--reductions", action="store_true",
                 help="the sums of one statistic, plain and in a frame (reductions.py)")
  p.add_argument("--compiles", type=int, default=None,
                 help="--models: fresh compiles per library for the compile time")
  p.add_argument("--dtypes", default="f32,bf16", help="--sweep: comma-separated f32,bf16")
  p.add_argument("--malloc", choices=("heap", "default"), default="heap",
                 help="heap: reuse freed buffers (MALLOC_MMAP_MAX_=0); default: glibc's")
  p.add_argument("--only", default=None, help="run only cases whose name contains this")
  p.add_argument("--no-errors", action="store_true", help="skip the accuracy table")
  return p.parse_args(argv)


def _maybe_reexec(args):
  """Re-executes with the allocator environment unless already set."""
  if args.malloc != "heap" or os.environ.get("JAXNORM_BENCH_CHILD"):
    return
  env = dict(os.environ, JAXNORM_BENCH_CHILD="1", **_HEAP_ENV)
  os.execve(sys.executable, [sys.executable] + sys.argv, env)


ARGS = _parse_args()
_maybe_reexec(ARGS)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402  (after the allocator re-exec)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import timing  # noqa: E402  (benchmarks/ is this script's directory, on sys.path)

import jaxnorm  # noqa: E402

# ----------------------------------------------------------------------------
# Cases: each library gives a jit-able function of arrays, built on the same
# inputs. `make(lib)` returns (fn, args).

def _bn_flax_fns(use_fast_variance=True):
  mod = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-5,
                     use_fast_variance=use_fast_variance)
  mod_inf = nn.BatchNorm(use_running_average=True, momentum=0.99, epsilon=1e-5)

  def train(params, stats, x):
    y, upd = mod.apply({"params": params, "batch_stats": stats}, x,
                       mutable=["batch_stats"])
    return y, upd["batch_stats"]

  def infer(params, stats, x):
    return mod_inf.apply({"params": params, "batch_stats": stats}, x)

  return train, infer


def _bn_jaxnorm_fns():
  def train(params, stats, x):
    return jaxnorm.batch_norm(params, stats, x, train=True)

  def infer(params, stats, x):
    return jaxnorm.batch_norm(params, stats, x, train=False)[0]

  return train, infer


def _stats(c, mean=0.0):
  return {"mean": jnp.full((c,), mean, jnp.float32), "var": jnp.ones((c,), jnp.float32)}


def make_cases(quick):
  """Returns a list of (name, shape, dtype, {lib: (fn, args)}, floor_array)."""
  key = jax.random.PRNGKey(0)
  k1, k2 = jax.random.split(key)
  cases = []

  bn_shape = (16, 16, 16, 128) if quick else (64, 32, 32, 128)
  c = bn_shape[-1]
  x = jax.random.normal(k1, bn_shape, jnp.float32)
  ct = jax.random.normal(k2, bn_shape, jnp.float32)
  p = {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}
  s = _stats(c)
  libs_train = {"jaxnorm": _bn_jaxnorm_fns()[0], "flax": _bn_flax_fns()[0]}
  libs_inf = {"jaxnorm": _bn_jaxnorm_fns()[1], "flax": _bn_flax_fns()[1]}
  shp = "x".join(map(str, bn_shape))
  cases.append(("BN train fwd", shp, "f32",
                {k: (f, (p, s, x)) for k, f in libs_train.items()}, x))
  cases.append(("BN train fwd+bwd", shp, "f32",
                {k: (_bn_grad(f), (p, s, x, ct)) for k, f in libs_train.items()}, x))
  cases.append(("BN inference", shp, "f32",
                {k: (f, (p, s, x)) for k, f in libs_inf.items()}, x))

  ln_shape = (2048, 1024) if quick else (8192, 1024)
  shp = "x".join(map(str, ln_shape))
  for dt, dname in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16")):
    x = jax.random.normal(k1, ln_shape, jnp.float32).astype(dt)
    ct = jax.random.normal(k2, ln_shape, jnp.float32).astype(dt)
    for name, fl, jn, params in (
        ("LayerNorm", nn.LayerNorm(epsilon=1e-6, dtype=dt, param_dtype=jnp.float32),
         jaxnorm.layer_norm, jaxnorm.layer_norm_init(ln_shape[-1])),
        ("RMSNorm", nn.RMSNorm(epsilon=1e-6, dtype=dt, param_dtype=jnp.float32),
         jaxnorm.rms_norm, jaxnorm.rms_norm_init(ln_shape[-1]))):
      fns = {
          "jaxnorm": functools.partial(_apply_in_dtype, jn),
          "flax": functools.partial(_apply_linen, fl),
      }
      cases.append((f"{name} fwd", shp, dname, {k: (f, (params, x)) for k, f in fns.items()}, x))
      cases.append((f"{name} fwd+bwd", shp, dname,
                    {k: (_plain_grad(f), (params, x, ct)) for k, f in fns.items()}, x))

  gn_shape = (8, 32, 32, 256) if quick else (32, 32, 32, 256)
  shp = "x".join(map(str, gn_shape))
  x = jax.random.normal(k1, gn_shape, jnp.float32)
  ct = jax.random.normal(k2, gn_shape, jnp.float32)
  gp = jaxnorm.group_norm_init(gn_shape[-1])
  fl = nn.GroupNorm(num_groups=32, epsilon=1e-6)
  fns = {
      "jaxnorm": lambda p, x: jaxnorm.group_norm(p, x, num_groups=32),
      "flax": functools.partial(_apply_linen, fl),
  }
  cases.append(("GroupNorm fwd+bwd", shp, "f32",
                {k: (_plain_grad(f), (gp, x, ct)) for k, f in fns.items()}, x))
  _add_optional_libs(cases)
  return cases


def _apply_in_dtype(fn, p, x):
  """``fn(p, x)`` computing in ``x``'s dtype, as the Flax modules here do (``dtype=dt``)."""
  return fn(p, x, dtype=x.dtype)


def _apply_linen(module, p, x):
  return module.apply({"params": p}, x)


def _bn_grad(train):
  """Forward + backward of BN train mode: y, new stats, grads wrt params and x."""
  def g(params, stats, x, ct):
    (y, new_stats), vjp = jax.vjp(lambda p, x: train(p, stats, x), params, x)
    zero_stats = jax.tree.map(jnp.zeros_like, new_stats)
    return y, new_stats, vjp((ct, zero_stats))
  return g


def _plain_grad(f):
  def g(params, x, ct):
    y, vjp = jax.vjp(f, params, x)
    return y, vjp(ct)
  return g


def _add_optional_libs(cases):
  """haiku / equinox columns, only when installed (they are optional)."""
  for lib in ("haiku", "equinox"):
    if importlib.util.find_spec(lib) is None:
      continue
    # Not wired up: report their presence instead of silently ignoring them.
    print(f"note: {lib} is installed but has no cases in this script yet.")


# ----------------------------------------------------------------------------
# Timing (helpers in timing.py).

def run_timing(cases, repeats, only):
  rows = []
  for name, shp, dname, libs, floor_x in cases:
    if only and only.lower() not in name.lower():
      continue
    compiled = {}
    temps = {}
    for lib, (f, args) in libs.items():
      c = jax.jit(f).lower(*args).compile()
      compiled[lib] = (c, args)
      temps[lib] = timing.temp_bytes(c)
    floor = jax.jit(lambda a: a * 2).lower(floor_x).compile()
    calls = {lib: functools.partial(c, *a) for lib, (c, a) in compiled.items()}
    calls["floor"] = functools.partial(floor, floor_x)
    t, _ = timing.time_interleaved(calls, repeats)
    row = dict(name=name, shape=shp, dtype=dname, floor=t["floor"], t=t, temp=temps)
    rows.append(row)
    print(_fmt_row(row), flush=True)
  return rows


def _mb(b):
  return f"{b / 2**20:.1f}"


TIME_HEADER = ("| case | shape | dtype | jaxnorm ms | flax ms | jaxnorm/flax | "
               "jaxnorm / floor | flax / floor | temp MiB jaxnorm | temp MiB flax |\n"
               "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")


def _fmt_row(r):
  tj, tf, fl = r["t"]["jaxnorm"], r["t"]["flax"], r["floor"]
  return (f"| {r['name']} | {r['shape']} | {r['dtype']} | {tj * 1e3:.2f} | {tf * 1e3:.2f} | "
          f"{tj / tf:.2f} | {tj / fl:.1f} | {tf / fl:.1f} | {_mb(r['temp']['jaxnorm'])} | "
          f"{_mb(r['temp']['flax'])} |")


# ----------------------------------------------------------------------------
# Accuracy against float64 NumPy.

def _ref_norm(x, axes, eps, groups=None):
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=axes, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(var + eps)


def run_errors(quick):
  """Max abs error of y vs float64 NumPy, x = offset + randn (float32)."""
  offsets = (0.0, 1e3, 1e4, 1e5)
  rng = np.random.default_rng(0)
  bn_shape = (16, 8, 8, 32) if quick else (64, 16, 16, 64)
  ln_shape = (256, 1024)
  gn_shape = (8, 16, 16, 64)
  z_bn = rng.standard_normal(bn_shape)
  z_ln = rng.standard_normal(ln_shape)
  z_gn = rng.standard_normal(gn_shape)

  def bn_flax(fast):
    train, _ = _bn_flax_fns(fast)
    return lambda x: train(*_bn_params(x), x)[0]

  def _bn_params(x):
    c = x.shape[-1]
    return ({"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}, _stats(c))

  ln_fl = lambda fast: nn.LayerNorm(epsilon=1e-6, use_fast_variance=fast)
  gn_fl = lambda fast: nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=fast)
  cases = [
      ("BN train", z_bn, (0, 1, 2), 1e-5, {
          "jaxnorm": lambda x: jaxnorm.batch_norm(*_bn_params(x), x, train=True)[0],
          "flax": bn_flax(True), "flax (fast_variance=False)": bn_flax(False)}),
      ("LayerNorm", z_ln, (1,), 1e-6, {
          "jaxnorm": lambda x: jaxnorm.layer_norm(jaxnorm.layer_norm_init(x.shape[-1]), x),
          "flax": lambda x: ln_fl(True).apply({"params": jaxnorm.layer_norm_init(x.shape[-1])}, x),
          "flax (fast_variance=False)":
              lambda x: ln_fl(False).apply({"params": jaxnorm.layer_norm_init(x.shape[-1])}, x)}),
      ("GroupNorm", z_gn, None, 1e-6, {
          "jaxnorm": lambda x: jaxnorm.group_norm(jaxnorm.group_norm_init(x.shape[-1]), x),
          "flax": lambda x: gn_fl(True).apply({"params": jaxnorm.group_norm_init(x.shape[-1])}, x),
          "flax (fast_variance=False)":
              lambda x: gn_fl(False).apply({"params": jaxnorm.group_norm_init(x.shape[-1])}, x)}),
  ]
  rows = []
  for name, z, axes, eps, libs in cases:
    for lib, f in libs.items():
      errs = []
      fj = jax.jit(f)
      for off in offsets:
        x32 = (off + z).astype(np.float32)
        x64 = x32.astype(np.float64)   # the reference sees the same float32 input
        if axes is None:   # group norm, 32 groups
          n, h, w, c = x64.shape
          ref = _ref_norm(x64.reshape(n, h, w, 32, c // 32), (1, 2, 4), eps).reshape(x64.shape)
        else:
          ref = _ref_norm(x64, axes, eps)
        y = np.asarray(fj(jnp.asarray(x32)), np.float64)
        errs.append(float(np.max(np.abs(y - ref))))
      rows.append((name, lib, errs))
      print(_fmt_err(rows[-1]), flush=True)
  return offsets, rows


def _fmt_err(row):
  name, lib, errs = row
  return f"| {name} | {lib} | " + " | ".join(f"{e:.1e}" for e in errs) + " |"


ERR_HEADER = ("| layer | library | offset 0 | 1e3 | 1e4 | 1e5 |\n"
              "|---|---|---:|---:|---:|---:|")


def _single_shape(args, repeats, env, out):
  """The original mode: one large shape per layer, with the accuracy table."""
  print(env)
  print(TIME_HEADER)
  rows = run_timing(make_cases(args.quick), repeats, args.only)
  err = None
  if not args.no_errors:
    print()
    print("max abs error vs float64 NumPy, x = offset + randn in float32")
    print(ERR_HEADER)
    err = run_errors(args.quick)
  out.append(f"{env}\n\n" + TIME_HEADER + "\n" + "\n".join(_fmt_row(r) for r in rows) + "\n")
  out.append("floor: `x * 2` on the same array (one read, one write).\n")
  if err is not None:
    out.append("Max abs error of `y` vs float64 NumPy, `x = offset + randn` in float32:\n\n"
               + ERR_HEADER + "\n" + "\n".join(_fmt_err(r) for r in err[1]) + "\n")


def _sweep(args, repeats, out):
  import sweep  # imports jax: after the allocator re-exec
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  unknown = sorted(set(dtypes) - set(sweep.DTYPES))
  if unknown:
    raise SystemExit(f"--dtypes takes f32 and bf16, got {', '.join(unknown)}.")
  env = timing.environment_line(repeats)
  print(env)
  rows = sweep.run(args.quick, repeats, dtypes, args.only)
  summ = sweep.summary(rows)
  print(summ)
  out.append(f"### Shape sweep\n\n{env}\n\n" + sweep.header() + "\n"
             + "\n".join(sweep.fmt_row(r) for r in rows) + "\n\n" + summ + "\n")


def _models(args, repeats, out):
  import models  # imports jax: after the allocator re-exec
  compiles = args.compiles or (1 if args.quick else 3)
  env = (timing.environment_line(repeats, "interleaved steps", models.WARMUP)
         + f"; compile time: median of {compiles} fresh compiles per library, alternating")
  print(env)
  rows = models.run(args.quick, repeats, compiles, args.only)
  out.append(f"### Training steps\n\n{env}\n\n" + models.header() + "\n"
             + "\n".join(models.fmt_row(r) for r in rows) + "\n")


def _reductions(args, repeats, out):
  import reductions  # imports jax: after the allocator re-exec
  env = timing.environment_line(repeats)
  print(env)
  print(reductions.header())
  rows = reductions.run(args.quick, repeats)
  out.append(f"### Sums of one statistic (float32)\n\n{env}\n\n" + reductions.header() + "\n"
             + "\n".join(reductions.fmt_row(r) for r in rows) + "\n")


def _hlo(args, out):
  import hlo  # imports jax: after the allocator re-exec
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  rows = hlo.run(args.quick, dtypes, args.only)
  if rows:
    libs = list(rows[0]["stats"])
    out.append("### Optimized HLO of the sweep's cases\n\n" + hlo.header(libs) + "\n"
               + "\n".join(hlo.fmt_row(r, libs) for r in rows) + "\n")


def main():
  args = ARGS
  print(f"jaxnorm from {os.path.dirname(jaxnorm.__file__)}")
  out = []
  if args.sweep:
    _sweep(args, args.repeats or (5 if args.quick else 31), out)
  if args.models:
    _models(args, args.repeats or (3 if args.quick else 11), out)
  if args.hlo:
    _hlo(args, out)
  if args.reductions:
    _reductions(args, args.repeats or (5 if args.quick else 31), out)
  if not (args.sweep or args.models or args.hlo or args.reductions):
    repeats = args.repeats or (10 if args.quick else 20)
    _single_shape(args, repeats, timing.environment_line(repeats, "interleaved runs"), out)
  if args.out:
    with open(args.out, "w") as fh:
      fh.write(f"Command: `python benchmarks/run.py {' '.join(sys.argv[1:])}`\n\n")
      fh.write("\n".join(out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
