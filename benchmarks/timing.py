"""Timing helpers shared by the benchmark modes of ``benchmarks/run.py``.

All timings are side by side in one process: the callables of one case run
interleaved, each round in a fresh random order (seeded), and each library's
time is the median of its samples. Not a rotation (A, B, floor, then B,
floor, A, ...): a rotation keeps every callable after the same one, and what
ran just before moves a call's time (whether XLA's worker threads are awake,
which arrays are in cache). In an A/B of five builds of layer norm's
8192x1024 fwd+bwd (y, dx, dparams) with rotated order, the build that always
followed Flax's program read 0.55 and 0.58x Flax's time in two runs (a
different build each time), the others 0.45-0.48; in random order all read
0.45-0.46. The ratio of two libraries is the median of the per-round ratios,
each taken from two runs a few milliseconds apart, which cancels most of the
drift of a shared machine. Small cases repeat each call ``inner`` times per
sample (each call blocked on), so one sample spans at least ~2 ms.
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import random
import statistics
import time

import jax


def block(tree):
  """Blocks on every array of ``tree``."""
  jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a,
               tree)


def temp_bytes(compiled) -> float:
  """Temporary memory of a compiled program (its peak scratch), or nan."""
  try:
    return compiled.memory_analysis().temp_size_in_bytes
  except Exception:  # pragma: no cover  (backend without memory analysis)
    return float("nan")


def _one(f, inner):
  t0 = time.perf_counter()
  for _ in range(inner):
    block(f())
  return (time.perf_counter() - t0) / inner


def time_interleaved(fns, repeats, warmup=3, min_sample=2e-3):
  """Times zero-argument callables side by side.

  Args:
    fns: ``{name: callable}``, each returning arrays.
    repeats: rounds; each round times every callable once (one sample).
    warmup: untimed calls of each callable first.
    min_sample: a sample repeats a call until it spans about this many seconds.

  Returns:
    ``(medians, samples)``: ``{name: median seconds per call}`` and
    ``{name: [seconds per call, one per round]}``.
  """
  names = list(fns)
  single = {}
  for k in names:
    for _ in range(warmup):
      block(fns[k]())
    single[k] = _one(fns[k], 1)
  inner = max(1, min(1000, math.ceil(min_sample / max(min(single.values()), 1e-7))))
  samples = {k: [] for k in names}
  order = random.Random(0)
  for _ in range(repeats):
    for k in order.sample(names, len(names)):
      samples[k].append(_one(fns[k], inner))
  return {k: statistics.median(v) for k, v in samples.items()}, samples


def paired_ratio(samples, a, b) -> float:
  """Median over rounds of ``samples[a][i] / samples[b][i]``."""
  return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))


def geomean(values) -> float:
  values = [v for v in values if v == v and v > 0]
  if not values:
    return float("nan")
  return math.exp(sum(math.log(v) for v in values) / len(values))


def allocator_setting() -> str:
  if os.environ.get("MALLOC_MMAP_MAX_") == "0":
    return "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2^40 (freed buffers reused)"
  return "glibc defaults"


def environment_line(repeats, what="interleaved rounds", warmup=3) -> str:
  """One line naming versions, backend, machine, allocator and repetitions."""
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  return (f"jax {jax.__version__}, flax {importlib.import_module('flax').__version__}, "
          f"backend {jax.default_backend()} ({kind}; {platform.machine()}, "
          f"{os.cpu_count()} cores), allocator: {allocator_setting()}, median of "
          f"{repeats} {what} after {warmup} warm-ups")
