"""``run.py --hlo``: what XLA made of each sweep case, without timing anything.

For each library and case, from the optimized HLO of the compiled program
(``jax.jit(f).lower(...).compile().as_text()``), counted in its entry
computation:

* ``thunks``: the operations the runtime launches one after another (fusions,
  custom calls, copies, reductions, dots, while loops, ...); at small shapes
  each costs a fixed few microseconds, more when the cores are busy;
* ``full``: full-size intermediates, arrays with as many elements as ``x``
  that are written out and read back, and are not outputs of the program;
* ``barriers`` (``opt-barrier``) and ``loops`` (``while``), which split or
  serialize the program;
* the temporary memory of the compiled program.

A cheap, deterministic companion to the timings: on a busy machine, fewer
thunks and no full-size intermediates is what wins at small shapes.
"""

from __future__ import annotations

import math
import re

import jax
import sweep

_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
_INSTR = re.compile(r"^\s*(ROOT\s+)?%(\S+) = (\(?[^=]*?\)?) ([\w-]+)\(")
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def _elements(shape_text):
  sizes = []
  for dims in _SHAPE.findall(shape_text):
    sizes.append(math.prod(int(d) for d in dims.split(",") if d) if dims else 1)
  return max(sizes, default=0)


def entry_stats(hlo_text: str, size: int) -> dict:
  """Counts in the entry computation of an optimized HLO module."""
  entry = hlo_text[hlo_text.index("\nENTRY"):]
  thunks = full = barriers = loops = 0
  names = []
  root_operands = ""
  for line in entry.splitlines()[1:]:
    m = _INSTR.match(line)
    if not m:
      continue
    is_root, name, shape, op = m.groups()
    if is_root:
      root_operands = line
    if op in _FREE:
      continue
    thunks += op != "opt-barrier"
    barriers += op == "opt-barrier"
    loops += op == "while"
    if _elements(shape) >= size and not is_root:
      names.append(name)
  for name in names:
    # An output that the root tuple returns is not a temporary.
    if f"%{name}," not in root_operands + "," and f"%{name})" not in root_operands:
      full += 1
  return dict(thunks=thunks, full=full, barriers=barriers, loops=loops)


def run(quick, dtypes, only, log=print):
  libs_seen = None
  rows = []
  for name, shp, dname, libs, floor_x in sweep.make_cases(quick, dtypes, only):
    if libs_seen is None:
      libs_seen = [k for k in libs]
      log(header(libs_seen))
    stats = {}
    for lib, (f, args) in libs.items():
      c = jax.jit(f).lower(*args).compile()
      s = entry_stats(c.as_text(), floor_x.size)
      s["temp"] = c.memory_analysis().temp_size_in_bytes
      stats[lib] = s
    row = dict(name=name, shape=shp, dtype=dname, stats=stats)
    rows.append(row)
    log(fmt_row(row, libs_seen))
  return rows


def header(libs) -> str:
  cols = "".join(f" {lib} thunks / full / barriers / loops / temp KiB |" for lib in libs)
  return f"| case | shape | dtype |{cols}\n|---|---|---|" + "---:|" * len(libs)


def fmt_row(r, libs) -> str:
  cells = "".join(
      " {thunks} / {full} / {barriers} / {loops} / {kib:.0f} |".format(
          kib=r["stats"][lib]["temp"] / 1024, **r["stats"][lib]) for lib in libs)
  return f"| {r['name']} | {r['shape']} | {r['dtype']} |{cells}"
