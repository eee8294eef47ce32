"""Experiment 1: the same MLP trained with and without batch norm.

Both models see the same initial seed, the same batches in the same order, the same optimizer and
learning rate; the only difference is a ``BatchNorm`` between each hidden ``Dense`` and its
activation (the ``Dense`` then has no bias: BN's own bias replaces it). Writes the training-loss
and test-accuracy curves side by side (``bn_vs_no_bn.png``) and a markdown table.

  python examples/bn_vs_no_bn.py --out out/bn_vs_no_bn
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import flax.linen as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402
from _common import norm  # noqa: E402

ACTIVATIONS = {"relu": nn.relu, "sigmoid": nn.sigmoid, "tanh": nn.tanh}


class MLP(nn.Module):
  """Flatten, then ``len(hidden)`` x [Dense -> (BatchNorm) -> activation], then Dense.

  Every activation's input is sown into the ``intermediates`` collection (used by experiment 3).
  """

  hidden: Sequence[int] = (128, 128, 128)
  num_classes: int = 10
  use_bn: bool = False
  activation: str = "relu"

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape((x.shape[0], -1))
    act = ACTIVATIONS[self.activation]
    for width in self.hidden:
      x = nn.Dense(width, use_bias=not self.use_bn)(x)
      if self.use_bn:
        x = norm.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      self.sow("intermediates", "preact", x)
      x = act(x)
    return nn.Dense(self.num_classes)(x)


def build_parser():
  parser = common.make_parser(__doc__, epochs=20, quick_epochs=4, out="out/bn_vs_no_bn", lr=0.1,
                              batch_size=64)
  parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
  return parser


def run(args, data: common.Dataset | None = None) -> dict:
  """Trains both models; returns their histories, the plot path and the markdown table."""
  data = common.experiment_data(args, data)
  histories = []
  for use_bn in (False, True):
    model = MLP(num_classes=data.num_classes, use_bn=use_bn, activation=args.activation)
    _, hist = common.fit_from_args(model, data, args, name="MLP + BN" if use_bn else "MLP")
    histories.append(hist)
  title = (f"Experiment 1: {args.activation} MLP with vs without batch norm "
           f"(SGD lr={args.lr}, {data.name})")
  return common.curves_result(args, "bn_vs_no_bn.png", title, histories)


def main(argv: Sequence[str] | None = None) -> dict:
  return common.run_experiment(build_parser, run, argv)


if __name__ == "__main__":
  main()
