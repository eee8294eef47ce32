"""Experiment 6: dropout vs batch norm: the gap between training and test accuracy.

The MLP of experiment 1 (ReLU, SGD) in four versions: none, dropout (rate 0.5 after each hidden
activation), batch norm (before each activation), and both. Reports final train and test accuracy
and their gap; accuracies are measured in inference mode (no dropout, BN with running averages).

  python examples/dropout_vs_bn.py --out out/dropout_vs_bn
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import flax.linen as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402
from _common import norm  # noqa: E402

VARIANTS = {"none": (False, False), "dropout": (True, False), "BN": (False, True),
            "BN + dropout": (True, True)}


class MLP(nn.Module):
  hidden: Sequence[int] = (256, 256)
  num_classes: int = 10
  dropout: bool = False
  use_bn: bool = False
  rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.Dense(width, use_bias=not self.use_bn)(x)
      if self.use_bn:
        x = norm.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      if self.dropout:
        x = norm.Dropout(self.rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def build_parser():
  parser = common.make_parser(__doc__, epochs=30, quick_epochs=6, out="out/dropout_vs_bn", lr=0.1,
                              lr_for="all models", batch_size=64)
  parser.add_argument("--rate", type=float, default=0.5, help="dropout rate")
  return parser


def run(args, data: common.Dataset | None = None) -> dict:
  data = common.experiment_data(args, data)
  histories = []
  for name, (drop, bn) in VARIANTS.items():
    model = MLP(num_classes=data.num_classes, dropout=drop, use_bn=bn, rate=args.rate)
    _, hist = common.fit_from_args(model, data, args, name=name)
    histories.append(hist)
  title = f"Experiment 6: none / dropout {args.rate} / BN / both, SGD lr={args.lr} ({data.name})"
  gaps = {h.name: h.train_acc[-1] - h.test_acc[-1] for h in histories}
  table = common.markdown_table(
      ["model", "final train loss", "train acc", "test acc", "gap (train - test)"],
      [[h.name, h.train_loss[-1], h.train_acc[-1], h.test_acc[-1], gaps[h.name]]
       for h in histories])
  return common.curves_result(args, "dropout_vs_bn.png", title, histories, table=table, gaps=gaps)


def main(argv: Sequence[str] | None = None) -> dict:
  return common.run_experiment(build_parser, run, argv)


if __name__ == "__main__":
  main()
