"""Experiment 7: tiny batches (2 and 4): batch norm vs batch renorm vs group norm.

A small ReLU conv net (conv 16 -> pool -> conv 32 -> pool -> dense), the normalization after each
convolution, trained by SGD at batch sizes 2 and 4. Batch norm's statistics over 2 or 4 examples are
noisy and its running averages (used at test time) disagree with what training saw; batch renorm
(r_max 3, d_max 5) corrects the batch statistics toward the running ones; group norm (4 groups)
uses no batch statistics at all. Reports test accuracy in inference mode.

  python examples/small_batches.py --out out/small_batches
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import flax.linen as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402
from _common import norm  # noqa: E402

KINDS = ("BatchNorm", "BatchRenorm", "GroupNorm")


class ConvNet(nn.Module):
  num_classes: int = 10
  kind: str = "BatchNorm"

  def _norm(self, x, train):
    if self.kind == "GroupNorm":
      return norm.GroupNorm(num_groups=4)(x)
    cls = getattr(norm, self.kind)
    return cls(use_running_average=not train, momentum=0.9)(x)

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (16, 32):
      x = nn.Conv(features, (3, 3), padding="SAME", use_bias=False)(x)
      x = nn.relu(self._norm(x, train))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


def build_parser():
  parser = common.make_parser(__doc__, epochs=3, quick_epochs=1, out="out/small_batches", lr=0.02,
                              lr_for="all runs")
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4])
  parser.add_argument("--train-size", type=int, default=None,
                      help="training images (default: all; 400 with --quick)")
  return parser


def run(args, data: common.Dataset | None = None) -> dict:
  data = common.experiment_data(args, data, quick_subset=False)
  n_train = args.train_size or (400 if args.quick else None)
  data = data.subset(n_train, 1000 if data.name != "digits" else None)
  histories, acc = [], {}
  for bs in args.batch_sizes:
    for kind in KINDS:
      model = ConvNet(num_classes=data.num_classes, kind=kind)
      _, hist = common.fit_from_args(model, data, args, name=f"{kind}, batch {bs}", batch_size=bs)
      histories.append(hist)
      acc[(kind, bs)] = hist.test_acc[-1]
  title = f"Experiment 7: batch sizes {args.batch_sizes}, SGD lr={args.lr} ({data.name})"
  table = common.markdown_table(
      ["normalization"] + [f"test acc, batch {bs}" for bs in args.batch_sizes],
      [[kind] + [acc[(kind, bs)] for bs in args.batch_sizes] for kind in KINDS])
  return common.curves_result(args, "small_batches.png", title, histories, table=table,
                              accuracy=acc)


def main(argv: Sequence[str] | None = None) -> dict:
  return common.run_experiment(build_parser, run, argv)


if __name__ == "__main__":
  main()
