"""``run.py --sweep``: every layer and pass at small, cache-sized and large shapes.

Batch norm (train fwd, train fwd then ReLU, train fwd+bwd, inference) and
group norm (fwd, fwd+bwd) on channels-last conv activations; layer norm and
RMS norm (fwd; fwd+bwd returning ``dx`` only; fwd+bwd returning ``y``,
``dx`` and the parameter gradients) on rows. float32 and bfloat16 (bfloat16 activations,
float32 parameters and statistics, output in bfloat16 for every library).
Each case is timed side by side with Flax's module and the floor ``x * 2``
(see ``timing.py``); haiku and equinox columns appear when they are installed
(haiku: all four layers; equinox: layer and RMS norm, vmapped over rows, as
its GroupNorm is channels-first and its BatchNorm keeps state through a
named vmap axis, neither comparable on channels-last arrays without a
transpose).
"""

from __future__ import annotations

import functools
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import timing

import jaxnorm

CONV_SHAPES = ((8, 8, 8, 64), (32, 16, 16, 128), (64, 32, 32, 128))
ROW_SHAPES = ((256, 768), (2048, 1024), (8192, 1024), (4, 128, 4096))
QUICK_CONV = CONV_SHAPES[:2]
QUICK_ROWS = ROW_SHAPES[:2]
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
GROUPS = 32
OPTIONAL_LIBS = tuple(lib for lib in ("haiku", "equinox")
                      if importlib.util.find_spec(lib) is not None)


# ----------------------------------------------------------------------------
# Passes. Each turns `f(params, x) -> y` (or BN's `(y, stats)`) into the
# function that is timed, with the arrays it takes.

def _fwd(f):
  return f


def _then_relu(train):
  """BN's training forward pass with a ReLU after it, as conv nets use it:
  an elementwise op that XLA's output step takes into its own loop (a custom
  call's output cannot be)."""
  def g(params, stats, x):
    y, new_stats = train(params, stats, x)
    return jax.nn.relu(y), new_stats
  return g


def _grad_dx(f):
  """fwd+bwd returning dx only (the parameters are not differentiated)."""
  def g(params, x, ct):
    _, vjp = jax.vjp(lambda x: f(params, x), x)
    return vjp(ct)[0]
  return g


def _grad_all(f):
  """fwd+bwd returning y, dx and the parameter gradients (a training step)."""
  def g(params, x, ct):
    y, vjp = jax.vjp(f, params, x)
    return y, vjp(ct)
  return g


def _bn_grad(train):
  """BN train fwd+bwd: y, new statistics, gradients wrt parameters and x."""
  def g(params, stats, x, ct):
    (y, new_stats), vjp = jax.vjp(lambda p, x: train(p, stats, x), params, x)
    return y, new_stats, vjp((ct, jax.tree.map(jnp.zeros_like, new_stats)))
  return g


# ----------------------------------------------------------------------------
# Libraries: per layer, `{lib: (train_or_apply_fn, params[, stats])}`.

def _bn_libs(c, dt):
  """{lib: (train(p, s, x) -> (y, s'), infer(p, s, x) -> y, params, stats)}."""
  p, s = jaxnorm.batch_norm_init(c)
  fl = nn.BatchNorm(use_running_average=False, momentum=0.99, epsilon=1e-5, dtype=dt)
  fl_inf = nn.BatchNorm(use_running_average=True, momentum=0.99, epsilon=1e-5, dtype=dt)

  def fl_train(params, stats, x):
    y, upd = fl.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    return y, upd["batch_stats"]

  libs = {
      "jaxnorm": (lambda p, s, x: jaxnorm.batch_norm(p, s, x, train=True, dtype=dt),
                  lambda p, s, x: jaxnorm.batch_norm(p, s, x, train=False, dtype=dt)[0],
                  p, s),
      "flax": (fl_train,
               lambda p, s, x: fl_inf.apply({"params": p, "batch_stats": s}, x),
               p, s),
  }
  if "haiku" in OPTIONAL_LIBS:
    libs["haiku"] = _haiku_bn(c, dt)
  return libs


def _gn_libs(c, dt):
  p = jaxnorm.group_norm_init(c)
  fl = nn.GroupNorm(num_groups=GROUPS, epsilon=1e-6, dtype=dt)
  libs = {
      "jaxnorm": (lambda p, x: jaxnorm.group_norm(p, x, num_groups=GROUPS, dtype=dt), p),
      "flax": (lambda p, x: fl.apply({"params": p}, x), p),
  }
  if "haiku" in OPTIONAL_LIBS:
    libs["haiku"] = _haiku_simple("GroupNorm", c, dt, groups=GROUPS, eps=1e-6)
  return libs


def _row_libs(kind, c, dt):
  if kind == "LN":
    p = jaxnorm.layer_norm_init(c)
    fl = nn.LayerNorm(epsilon=1e-6, dtype=dt)
    jn = lambda p, x: jaxnorm.layer_norm(p, x, dtype=dt)
  else:
    p = jaxnorm.rms_norm_init(c)
    fl = nn.RMSNorm(epsilon=1e-6, dtype=dt)
    jn = lambda p, x: jaxnorm.rms_norm(p, x, dtype=dt)
  libs = {"jaxnorm": (jn, p), "flax": (lambda p, x: fl.apply({"params": p}, x), p)}
  if "haiku" in OPTIONAL_LIBS:
    libs["haiku"] = (_haiku_simple("LayerNorm", c, dt, axis=-1, create_scale=True,
                                   create_offset=True, eps=1e-6) if kind == "LN" else
                     _haiku_simple("RMSNorm", c, dt, axis=-1, eps=1e-6))
  if "equinox" in OPTIONAL_LIBS:
    libs["equinox"] = _equinox_rows(kind, c, dt)
  return libs


def _haiku_simple(name, c, dt, **kw):
  import haiku as hk  # optional

  t = hk.without_apply_rng(hk.transform(lambda x: getattr(hk, name)(**kw)(x).astype(dt)))
  x0 = jnp.zeros((2, 4, 4, c) if name == "GroupNorm" else (2, c), dt)
  return t.apply, t.init(None, x0)


def _haiku_bn(c, dt):
  import haiku as hk  # optional

  def fwd(x, training):
    return hk.BatchNorm(True, True, decay_rate=0.99, eps=1e-5)(x, training).astype(dt)

  t = hk.without_apply_rng(hk.transform_with_state(fwd))
  p, s = t.init(None, jnp.zeros((2, 1, 1, c), dt), True)   # conv layout
  return (lambda p, s, x: t.apply(p, s, x, True),
          lambda p, s, x: t.apply(p, s, x, False)[0], p, s)


def _equinox_rows(kind, c, dt):
  import equinox as eqx  # optional

  layer = (eqx.nn.LayerNorm(c, eps=1e-6) if kind == "LN" else eqx.nn.RMSNorm(c, eps=1e-6))
  params, static = eqx.partition(layer, eqx.is_array)

  def apply(params, x):
    m = eqx.combine(params, static)
    f = m
    for _ in range(x.ndim - 1):
      f = jax.vmap(f)
    return f(x).astype(dt)

  return apply, params


# ----------------------------------------------------------------------------
# Cases.

def _shape_name(shape):
  return "x".join(map(str, shape))


def make_cases(quick, dtypes, only):
  """Yields (case, shape, dtype, {lib: (fn, args)}, floor array), lazily."""
  key1, key2 = jax.random.split(jax.random.PRNGKey(0))
  conv = QUICK_CONV if quick else CONV_SHAPES
  rows = QUICK_ROWS if quick else ROW_SHAPES

  def arrays(shape, dt):
    return (jax.random.normal(key1, shape, jnp.float32).astype(dt),
            jax.random.normal(key2, shape, jnp.float32).astype(dt))

  def wanted(name, shape, dname):
    return not only or only.lower() in f"{name} {_shape_name(shape)} {dname}".lower()

  for dname in dtypes:
    dt = DTYPES[dname]
    for shape in conv:
      x, ct = arrays(shape, dt)
      c = shape[-1]
      # Building a case's dict is cheap (closures, no compiles), so all six are built up front.
      bn = _bn_libs(c, dt)
      gn = _gn_libs(c, dt)
      for name, libs in (
          ("BN train fwd", {k: (tr, (p, s, x)) for k, (tr, _, p, s) in bn.items()}),
          ("BN train fwd+ReLU",
           {k: (_then_relu(tr), (p, s, x)) for k, (tr, _, p, s) in bn.items()}),
          ("BN train fwd+bwd",
           {k: (_bn_grad(tr), (p, s, x, ct)) for k, (tr, _, p, s) in bn.items()}),
          ("BN inference", {k: (inf, (p, s, x)) for k, (_, inf, p, s) in bn.items()}),
          ("GN fwd", {k: (f, (p, x)) for k, (f, p) in gn.items()}),
          ("GN fwd+bwd", {k: (_grad_all(f), (p, x, ct)) for k, (f, p) in gn.items()}),
      ):
        if wanted(name, shape, dname):
          yield name, _shape_name(shape), dname, libs, x
    for shape in rows:
      x, ct = arrays(shape, dt)
      for kind in ("LN", "RMS"):
        row_libs = _row_libs(kind, shape[-1], dt)
        for suffix, wrap, data in (
            ("fwd", _fwd, (x,)),
            ("fwd+bwd dx", _grad_dx, (x, ct)),
            ("fwd+bwd y,dx,dp", _grad_all, (x, ct))):
          name = f"{kind} {suffix}"
          if wanted(name, shape, dname):
            yield (name, _shape_name(shape), dname,
                   {k: (wrap(f), (p, *data)) for k, (f, p) in row_libs.items()}, x)


# ----------------------------------------------------------------------------
# Running and formatting.

def run(quick, repeats, dtypes, only, log=print):
  """Times every case; returns the rows (dicts) in order."""
  rows = []
  log(header())
  for name, shp, dname, libs, floor_x in make_cases(quick, dtypes, only):
    calls, temps = {}, {}
    for lib, (f, args) in libs.items():
      c = jax.jit(f).lower(*args).compile()
      calls[lib] = functools.partial(c, *args)
      temps[lib] = timing.temp_bytes(c)
    floor = jax.jit(lambda a: a * 2).lower(floor_x).compile()
    calls["floor"] = functools.partial(floor, floor_x)
    med, samples = timing.time_interleaved(calls, repeats)
    ratios = {lib: timing.paired_ratio(samples, lib, "flax") for lib in libs if lib != "flax"}
    row = dict(name=name, shape=shp, dtype=dname, t=med, ratio=ratios, temp=temps)
    rows.append(row)
    log(fmt_row(row))
  return rows


def header() -> str:
  extra = "".join(f" {lib}/flax |" for lib in OPTIONAL_LIBS)
  return ("| case | shape | dtype | jaxnorm us | flax us | jaxnorm/flax | jaxnorm/floor | "
          f"flax/floor | temp KiB jaxnorm / flax |{extra}\n"
          "|---|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(OPTIONAL_LIBS))


def fmt_row(r) -> str:
  t, fl = r["t"], r["t"]["floor"]
  extra = "".join(f" {r['ratio'][lib]:.2f} |" if lib in r["ratio"] else " - |"
                  for lib in OPTIONAL_LIBS)
  return (f"| {r['name']} | {r['shape']} | {r['dtype']} | {t['jaxnorm'] * 1e6:.0f} | "
          f"{t['flax'] * 1e6:.0f} | {r['ratio']['jaxnorm']:.2f} | {t['jaxnorm'] / fl:.1f} | "
          f"{t['flax'] / fl:.1f} | {r['temp']['jaxnorm'] / 1024:.0f} / "
          f"{r['temp']['flax'] / 1024:.0f} |{extra}")


def summary(rows, limit=1.05) -> str:
  """Geometric means and the rows above ``limit``."""
  if not rows:
    return "no cases matched"
  ratios = [r["ratio"]["jaxnorm"] for r in rows]
  bwd = [r["ratio"]["jaxnorm"] for r in rows if "bwd" in r["name"]]
  worst = max(rows, key=lambda r: r["ratio"]["jaxnorm"])
  above = [r for r in rows if r["ratio"]["jaxnorm"] > limit]
  lines = [f"{len(rows)} cases; geometric mean of jaxnorm/flax {timing.geomean(ratios):.2f}"
           f" (fwd+bwd rows {timing.geomean(bwd):.2f}); worst {worst['ratio']['jaxnorm']:.2f}"
           f" ({worst['name']} {worst['shape']} {worst['dtype']}); "
           f"{len(above)} above {limit}"]
  lines += [f"- {r['name']} {r['shape']} {r['dtype']}: {r['ratio']['jaxnorm']:.2f}"
            for r in above]
  if not OPTIONAL_LIBS:
    lines.append("haiku and equinox are not installed: no columns for them.")
  return "\n".join(lines)
