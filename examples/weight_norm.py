"""Experiment 5: plain vs weight norm (with data-dependent init) vs batch norm.

The MLP of experiment 1 (ReLU, SGD) in three versions: plain ``Dense`` layers; weight-normalized
layers w = g v / ||v|| (Salimans & Kingma, 2016) whose g and bias are set from the first batch so
every pre-activation starts with zero mean and unit variance (``jaxnorm.weight_norm_data_init``);
and ``Dense`` + ``BatchNorm``. Plots the curves and reports the time per training step.

  python examples/weight_norm.py --out out/weight_norm
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import jaxnorm
import jaxnorm.linen as jl

import _common as common
import bn_vs_no_bn as experiment1  # its SGD step and training loop


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
        x = jl.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      else:
        x = nn.Dense(width)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x)


def build_parser() -> argparse.ArgumentParser:
  parser = common.make_parser(__doc__, epochs=20, quick_epochs=4, out="out/weight_norm", lr=0.1,
                              lr_for="all models", batch_size=64)
  parser.add_argument("--init-batch", type=int, default=256, help="examples for the data init")
  return parser


def run(args: argparse.Namespace, data: common.Dataset | None = None) -> dict[str, Any]:
  data = common.experiment_data(args, data)
  histories, init_stats = [], {}
  for kind in ("plain", "weight norm", "batch norm"):
    model = MLP(num_classes=data.num_classes, kind=kind)
    state = experiment1.create_state(model, data.x_train[:args.batch_size], args.lr, args.seed)
    if kind == "weight norm":
      # Data-dependent init: one forward pass that sets every layer's g and bias from a batch.
      x0 = jnp.asarray(data.x_train[:args.init_batch])
      data_init = jax.jit(functools.partial(model.apply, train=False, data_init=True,
                                            mutable=["params"]))
      _, new = data_init({"params": state.params}, x0)
      state = experiment1.TrainState.create(apply_fn=model.apply, params=new["params"],
                                            tx=state.tx, batch_stats={})
      # Check: the first layer's pre-activations on the init batch are standardized.
      first = new["params"]["WNDense_0"]
      z = x0.reshape(len(x0), -1) @ jaxnorm.weight_norm({"v": first["v"], "g": first["g"]})
      z = z + first["bias"]
      init_stats = {"mean_abs_mean": float(jnp.abs(z.mean(0)).mean()),
                    "mean_std": float(z.std(0).mean())}
    _, hist = experiment1.train(model, data, args, kind, state=state)
    histories.append(hist)
  title = (f"Experiment 5: plain vs weight norm (data init) vs batch norm, SGD lr={args.lr} "
           f"({data.name})")
  table = common.summary_table(histories)
  table += ("\n\nAfter the data-dependent init, first layer on the init batch: mean |mean| = "
            f"{init_stats['mean_abs_mean']:.2g}, mean std = {init_stats['mean_std']:.3g}.")
  plot = common.plot_curves(histories, f"{args.out}/weight_norm.png", title)
  return common.result(title, table, histories, [plot], init_stats=init_stats)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return common.main(build_parser, run, argv)


if __name__ == "__main__":
  main()
