"""The main demo: experiments 1, 2 and 3 in one short run, with plots and a summary table.

1. the same MLP with and without batch norm (``bn_vs_no_bn.py``);
2. a sigmoid LeNet at SGD learning rate 1.0 with and without batch norm, and the learned
   scale/bias of its first BN layer (``sigmoid_lenet.py``);
3. how far the sigmoids' inputs sit in the saturated region |z| > 4, with and without batch norm
   (``saturation.py``).

Writes ``bn_vs_no_bn.png``, ``sigmoid_lenet.png``, ``saturation.png`` and ``summary.md`` to
``--out`` and prints the tables.

  python examples/demo.py --out out/demo            # about a minute on a 2-core CPU
  python examples/demo.py --quick --out out/demo    # 4 epochs
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import jax

import jaxnorm

import _common as common
import bn_vs_no_bn
import saturation
import sigmoid_lenet

EXPERIMENTS = (bn_vs_no_bn, sigmoid_lenet, saturation)


def build_parser() -> argparse.ArgumentParser:
  return common.make_parser(__doc__, epochs=10, quick_epochs=4, out="out/demo")


def experiment_args(module: ModuleType, args: argparse.Namespace) -> argparse.Namespace:
  """The experiment's own defaults (learning rate, batch size...) with the demo's shared options."""
  shared = ["--seed", str(args.seed), "--epochs", str(args.epochs), "--out", args.out]
  shared += ["--quick"] * args.quick + ["--no-progress"] * args.no_progress
  shared += ["--data", args.data] if args.data else []
  return common.parse(module.build_parser(), shared)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = common.parse(build_parser(), argv)
  data = common.load_data(args.data)
  results, sections = {}, []
  t_start = time.perf_counter()
  for module in EXPERIMENTS:
    t0 = time.perf_counter()
    result = module.run(experiment_args(module, args), data)
    result["seconds"] = time.perf_counter() - t0
    results[module.__name__] = result
    section = f"{common.section(result)}\n\n(run time {result['seconds']:.0f} s)"
    print(section + "\n", flush=True)
    sections.append(section)
  total = time.perf_counter() - t_start
  command = "python examples/demo.py " + " ".join(argv if argv is not None else sys.argv[1:])
  header = (f"# jaxnorm demo\n\nCommand: `{command.strip()}`; data: {data.name} "
            f"({len(data.y_train)} train / {len(data.y_test)} test images); "
            f"{args.epochs} epochs; seed {args.seed}; total {total:.0f} s on "
            f"{platform.machine()} ({jax.default_backend()}, jax {jax.__version__}, "
            f"jaxnorm {jaxnorm.__version__}).\n")
  plots = "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})"
                    for r in results.values() for p in r["plots"])
  summary = header + "\n" + "\n\n".join(sections) + "\n\n" + plots
  path = common.write_text(os.path.join(args.out, "summary.md"), summary)
  print(f"wrote {path} and " + ", ".join(p for r in results.values() for p in r["plots"]))
  return results


if __name__ == "__main__":
  main()
