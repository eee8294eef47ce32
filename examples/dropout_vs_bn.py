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
import optax

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
  parser = common.make_parser(__doc__.split("\n\n")[0], epochs=30, quick_epochs=6,
                              out="out/dropout_vs_bn")
  parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (all models)")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--rate", type=float, default=0.5, help="dropout rate")
  return parser


def run(args, data: common.Dataset | None = None) -> dict:
  data = data if data is not None else common.load_data(args.data)
  if args.quick and data.name != "digits":
    data = data.subset(2000, 1000)
  histories = []
  for name, (drop, bn) in VARIANTS.items():
    model = MLP(num_classes=data.num_classes, dropout=drop, use_bn=bn, rate=args.rate)
    _, hist = common.fit(model, data, name=name, epochs=args.epochs, batch_size=args.batch_size,
                         tx=optax.sgd(args.lr), seed=args.seed, quiet=args.no_progress)
    histories.append(hist)
  title = f"Experiment 6: none / dropout {args.rate} / BN / both, SGD lr={args.lr} ({data.name})"
  plot = common.plot_curves(histories, os.path.join(args.out, "dropout_vs_bn.png"), title)
  gaps = {h.name: h.train_acc[-1] - h.test_acc[-1] for h in histories}
  table = common.markdown_table(
      ["model", "final train loss", "train acc", "test acc", "gap (train - test)"],
      [[h.name, h.train_loss[-1], h.train_acc[-1], h.test_acc[-1], gaps[h.name]]
       for h in histories])
  return {"histories": {h.name: h for h in histories}, "gaps": gaps, "plots": [plot],
          "table": table, "title": title}


def main(argv: Sequence[str] | None = None) -> dict:
  args = common.parse(build_parser(), argv)
  result = run(args)
  print(f"## {result['title']}\n\n{result['table']}\n\n{common.sources_line()}")
  common.write_text(os.path.join(args.out, "summary.md"), f"## {result['title']}\n\n{result['table']}")
  return result


if __name__ == "__main__":
  main()
