"""What an exact statistic costs in XLA's reductions: the sums one pass of a
normalization layer takes, timed on their own (``run.py --reductions``).

Flax's fast variance takes ``sum(x)`` and ``sum(x * x)``. Exact statistics
(``jaxnorm/_src/moments.py``) take both sums of ``x - f``, with ``f`` a frame
from the data (per feature): the square of an unshifted ``x`` has already lost
the digits of the variance when the mean is large against the spread, and
``sum(x) - n f`` has lost those of the mean. The two sums are the same reads
of ``x``; the table shows what the subtraction of a broadcast frame costs
inside them (on the CPU backend each sum is one YNNPACK fusion). Batch norm's
statistics are column sums (the features are the last axis), layer norm's are
row sums.

"compiled" is the framed pair as batch norm's forward pass takes it on the CPU backend: both
sums in one read of ``x`` by jaxnorm's compiled loop (``jaxnorm/_src/cpu_sums.py``; columns
only, where the library is built).

Each pair is timed in one jitted program, as in the layers: "plain" is
``sum(x), sum(x*x)``, "framed" is ``sum(x - f), sum((x - f)^2)``, each use of
``f`` its own copy out of one ``optimization_barrier`` (as
``moments.block_moments`` does, so that neither sum shares a full-size
``x - f``). Times are medians of interleaved rounds, ratios are to ``sum(x)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import timing
from jax import lax

from jaxnorm._src import cpu_sums

SHAPES = (((8, 8, 8, 64), (32, 16, 16, 128), (64, 32, 32, 128)),
          ((256, 768), (2048, 1024), (8192, 1024)))
QUICK_SHAPES = (((32, 16, 16, 128),), ((2048, 1024),))


def _cases(shape, rows):
  """``{name: fn(x, f)}`` for statistics over the last axis (rows) or all
  leading axes (columns)."""
  axes = (len(shape) - 1,) if rows else tuple(range(len(shape) - 1))
  s = lambda v: jnp.sum(v, axis=axes, keepdims=True)

  def framed(x, f):
    f1, f2 = lax.optimization_barrier((f, f))
    return s(x - f1), s((x - f2) * (x - f2))

  cases = {
      "sum(x)": lambda x, f: s(x),
      "sum(x*x)": lambda x, f: s(x * x),
      "sum(x-f)": lambda x, f: s(x - f),
      "sum((x-f)^2)": lambda x, f: s((x - f) * (x - f)),
      "plain pair": lambda x, f: (s(x), s(x * x)),
      "framed pair": framed,
  }
  if cpu_sums.layout(shape, axes) is not None and cpu_sums.enabled():
    # The framed pair as batch norm's forward pass takes it on CPU.
    cases["compiled pair"] = lambda x, f: cpu_sums.framed_sums(x, f, axes)
  return cases


def run(quick, repeats, log=print):
  rows_out = []
  groups = QUICK_SHAPES if quick else SHAPES
  for rows, shapes in ((False, groups[0]), (True, groups[1])):
    for shape in shapes:
      x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32) + 3.0
      fshape = shape[:-1] + (1,) if rows else (1,) * (len(shape) - 1) + shape[-1:]
      f = jnp.full(fshape, 3.0, jnp.float32)
      fns = {k: jax.jit(g) for k, g in _cases(shape, rows).items()}
      medians, _ = timing.time_interleaved(
          {k: functools.partial(g, x, f) for k, g in fns.items()}, repeats)
      r = {"shape": "x".join(map(str, shape)), "kind": "rows" if rows else "columns",
           "us": {k: v * 1e6 for k, v in medians.items()}}
      rows_out.append(r)
      log(fmt_row(r))
  return rows_out


NAMES = ("sum(x)", "sum(x*x)", "sum(x-f)", "sum((x-f)^2)", "plain pair", "framed pair",
         "compiled pair")


def header() -> str:
  return ("| sums of | shape | " + " | ".join(f"`{n}`" for n in NAMES)
          + " | framed / plain pair | compiled / plain pair |\n|---|---|"
          + "---:|" * (len(NAMES) + 2))


def fmt_row(r) -> str:
  us = r["us"]
  base = us["sum(x)"]
  cells = [f"{us[n]:.0f} us" if n == "sum(x)" else f"{us[n] / base:.2f}" if n in us else "-"
           for n in NAMES]
  compiled = (f"{us['compiled pair'] / us['plain pair']:.2f}" if "compiled pair" in us
              else "-")
  return (f"| {r['kind']} | {r['shape']} | " + " | ".join(cells)
          + f" | {us['framed pair'] / us['plain pair']:.2f} | {compiled} |")
