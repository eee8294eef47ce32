"""Experiment 5: plain vs weight norm (with data-dependent init) vs batch norm.

The MLP of experiment 1 (ReLU, SGD) in three versions: plain ``Dense`` layers; weight-normalized
layers w = g v / ||v|| (Salimans & Kingma, 2016) whose g and bias are set from the first batch so
every pre-activation starts with zero mean and unit variance (``jaxnorm.weight_norm_data_init``);
and ``Dense`` + ``BatchNorm``. Plots the curves and reports the time per training step.

  python examples/weight_norm.py --out out/weight_norm
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxnorm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402
from _common import norm  # noqa: E402


class WNDense(nn.Module):
  """Dense with w = g * v / ||v|| (norm over the input axis); ``data_init`` sets g and bias."""

  features: int

  @nn.compact
  def __call__(self, x, data_init: bool = False):
    v = self.param("v", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    g = self.param("g", nn.initializers.ones, (self.features,))
    b = self.param("bias", nn.initializers.zeros, (self.features,))
    wn = {"v": v, "g": g}
    if data_init:
      wn, b = jaxnorm.weight_norm_data_init(wn, x @ jaxnorm.weight_norm(wn, axis=-1))
      self.put_variable("params", "g", wn["g"])
      self.put_variable("params", "bias", b)
    return x @ jaxnorm.weight_norm(wn, axis=-1) + b


class MLP(nn.Module):
  hidden: Sequence[int] = (128, 128, 128)
  num_classes: int = 10
  kind: str = "plain"  # "plain", "weight norm" or "batch norm"

  @nn.compact
  def __call__(self, x, train: bool, data_init: bool = False):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      if self.kind == "weight norm":
        x = WNDense(width)(x, data_init)
      elif self.kind == "batch norm":
        x = nn.Dense(width, use_bias=False)(x)
        x = norm.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      else:
        x = nn.Dense(width)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x)


def build_parser():
  parser = common.make_parser(__doc__, epochs=20, quick_epochs=4, out="out/weight_norm", lr=0.1,
                              lr_for="all models", batch_size=64)
  parser.add_argument("--init-batch", type=int, default=256, help="examples for the data init")
  return parser


def run(args, data: common.Dataset | None = None) -> dict:
  data = common.experiment_data(args, data)
  tx = optax.sgd(args.lr)
  histories, init_stats = [], {}
  for kind in ("plain", "weight norm", "batch norm"):
    model = MLP(num_classes=data.num_classes, kind=kind)
    state = common.init_state(model, data.x_train[:args.batch_size], tx, args.seed)
    if kind == "weight norm":
      x0 = jnp.asarray(data.x_train[:args.init_batch])
      _, new = jax.jit(lambda p: model.apply({"params": p}, x0, train=False, data_init=True,
                                             mutable=["params"]))(state.params)
      state = common.TrainState(new["params"], {}, tx.init(new["params"]), state.key)
      # Check: the first layer's pre-activations on the init batch are standardized.
      z = x0.reshape(len(x0), -1) @ jaxnorm.weight_norm(
          {"v": new["params"]["WNDense_0"]["v"], "g": new["params"]["WNDense_0"]["g"]}
      ) + new["params"]["WNDense_0"]["bias"]
      init_stats = {"mean_abs_mean": float(jnp.abs(z.mean(0)).mean()),
                    "mean_std": float(z.std(0).mean())}
    _, hist = common.fit_from_args(model, data, args, name=kind, tx=tx, state=state)
    histories.append(hist)
  title = f"Experiment 5: plain vs weight norm (data init) vs batch norm, SGD lr={args.lr} ({data.name})"
  table = common.summary_table(histories)
  table += ("\n\nAfter the data-dependent init, first layer on the init batch: mean |mean| = "
            f"{init_stats['mean_abs_mean']:.2g}, mean std = {init_stats['mean_std']:.3g}.")
  return common.curves_result(args, "weight_norm.png", title, histories, table=table,
                              init_stats=init_stats)


def main(argv: Sequence[str] | None = None) -> dict:
  return common.run_experiment(build_parser, run, argv)


if __name__ == "__main__":
  main()
