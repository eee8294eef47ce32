"""Experiment 2: a sigmoid LeNet trained by SGD at learning rate 1.0, with and without batch norm.

The LeNet of LeCun et al. (1998) with sigmoid activations and average pooling. With batch norm, a
``BatchNorm`` sits after every convolution and hidden dense layer, before its sigmoid, and those
layers drop their bias (BN's bias makes it redundant). A learning rate of 1.0 is far above what the
plain sigmoid network tolerates early in training; with BN it trains at once. At the end the learned
scale (gamma) and bias (beta) of the first BN layer are printed.

  python examples/sigmoid_lenet.py --out out/sigmoid_lenet
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import numpy as np

import jaxnorm.linen as jl

import _common as common
import bn_vs_no_bn as experiment1  # its SGD step and training loop


class LeNet(nn.Module):
  """conv(6, 5x5) -> pool -> conv(16, 5x5) -> pool -> dense 120 -> dense 84 -> dense classes.

  Convolutions use SAME padding, so the net fits any image size (8x8 digits or 28x28 MNIST).
  Every sigmoid's input is sown into the ``intermediates`` collection as ``preact_<layer>``, for
  inspecting saturation (without BN they stayed within |z| < 4 in a 4-epoch run, seed 0).
  """

  num_classes: int = 10
  use_bn: bool = False

  def _norm_act(self, x, train, name):
    if self.use_bn:
      x = jl.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn_{name}")(x)
    self.sow("intermediates", f"preact_{name}", x)
    return nn.sigmoid(x)

  @nn.compact
  def __call__(self, x, train: bool):
    bias = not self.use_bn
    x = nn.Conv(6, (5, 5), padding="SAME", use_bias=bias, name="conv1")(x)
    x = nn.avg_pool(self._norm_act(x, train, "conv1"), (2, 2), strides=(2, 2))
    x = nn.Conv(16, (5, 5), padding="SAME", use_bias=bias, name="conv2")(x)
    x = nn.avg_pool(self._norm_act(x, train, "conv2"), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = self._norm_act(nn.Dense(120, use_bias=bias, name="dense1")(x), train, "dense1")
    x = self._norm_act(nn.Dense(84, use_bias=bias, name="dense2")(x), train, "dense2")
    return nn.Dense(self.num_classes, name="out")(x)


def build_parser() -> argparse.ArgumentParser:
  return common.make_parser(__doc__, epochs=20, quick_epochs=4, out="out/sigmoid_lenet", lr=1.0,
                            batch_size=64)


def run(args: argparse.Namespace, data: common.Dataset | None = None) -> dict[str, Any]:
  """Trains both LeNets; returns histories, plot, table and the first BN layer's gamma and beta."""
  data = common.experiment_data(args, data)
  histories, states = [], {}
  for use_bn in (False, True):
    name = "LeNet + BN" if use_bn else "LeNet"
    model = LeNet(num_classes=data.num_classes, use_bn=use_bn)
    states[name], hist = experiment1.train(model, data, args, name)
    histories.append(hist)
  title = f"Experiment 2: sigmoid LeNet, SGD lr={args.lr}, with vs without BN ({data.name})"
  bn1 = states["LeNet + BN"].params["bn_conv1"]
  gamma, beta = np.asarray(bn1["scale"]), np.asarray(bn1["bias"])
  gb = common.markdown_table(
      ["first BN layer (after conv1)"] + [f"ch {i}" for i in range(len(gamma))],
      [["gamma (scale)"] + [float(v) for v in gamma], ["beta (bias)"] + [float(v) for v in beta]])
  table = (common.summary_table(histories) + "\n\nLearned scale and bias of the first BN layer:\n\n"
           + gb)
  plot = common.plot_curves(histories, f"{args.out}/sigmoid_lenet.png", title)
  return common.result(title, table, histories, [plot], gamma=gamma, beta=beta)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return common.main(build_parser, run, argv)


if __name__ == "__main__":
  main()
