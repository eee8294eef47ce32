"""Experiment 6: dropout vs batch norm: the gap between training and test accuracy.

The MLP of experiment 1 (ReLU, SGD) in four versions: none, dropout (rate 0.5 after each hidden
activation), batch norm (before each activation), and both. Reports final train and test accuracy
and their gap, and plots both accuracies and the gap per epoch; accuracies are measured in
inference mode (no dropout, BN with running averages).

  python examples/dropout_vs_bn.py --out out/dropout_vs_bn
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training import train_state

import jaxnorm.linen as jl

import _common as common
from _common import plt

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
        x = jl.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
      if self.dropout:
        x = jl.Dropout(self.rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class TrainState(train_state.TrainState):
  batch_stats: Any
  key: jax.Array  # split at every step for a fresh dropout mask


def create_state(model: nn.Module, x0: np.ndarray, lr: float, seed: int) -> TrainState:
  key, init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  init = jax.jit(lambda x: model.init({"params": init_key, "dropout": dropout_key}, x, train=False))
  variables = init(x0)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(lr),
                           batch_stats=variables.get("batch_stats", {}), key=key)


@jax.jit
def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
  key, dropout_key = jax.random.split(state.key)

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                     train=True, rngs={"dropout": dropout_key},
                                     mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates.get("batch_stats", {})

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats, key=key), loss


@jax.jit
def predict(state: TrainState, x: jax.Array) -> jax.Array:
  """Logits in inference mode: no dropout, batch norm with its running averages."""
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)


def train(model: nn.Module, data: common.Dataset, args: argparse.Namespace, name: str
          ) -> tuple[TrainState, common.History]:
  state = create_state(model, data.x_train[:args.batch_size], args.lr, args.seed)
  rng = np.random.default_rng(args.seed)  # the same batches for every variant
  hist, timer = common.History(name), common.StepTimer()
  hist.record(0, functools.partial(predict, state), data)
  for epoch in common.epochs(args, desc=name):
    losses = []
    for idx in common.batches(len(data.y_train), args.batch_size, rng):
      with timer:
        state, loss = train_step(state, data.x_train[idx], data.y_train[idx])
        losses.append(float(loss))
    hist.record(epoch, functools.partial(predict, state), data, train_loss=float(np.mean(losses)))
  hist.seconds_per_step = timer.mean()
  return state, hist


def plot_gap(histories: Sequence[common.History], path: str, title: str) -> str:
  """Train (solid) and test (dashed) accuracy per epoch, and their gap, one colour per variant."""
  fig, (ax_acc, ax_gap) = plt.subplots(1, 2, figsize=(9, 3.8))
  for i, h in enumerate(histories):
    ax_acc.plot(h.epochs, h.train_acc, color=f"C{i}", label=h.name)
    ax_acc.plot(h.epochs, h.test_acc, color=f"C{i}", ls="--")
    gap = np.asarray(h.train_acc) - np.asarray(h.test_acc)
    ax_gap.plot(h.epochs, gap, color=f"C{i}", marker=".", label=h.name)
  ax_acc.set(title="accuracy: train (solid), test (dashed)", xlabel="epoch", ylabel="accuracy",
             ylim=(0.8, 1.005))
  ax_gap.set(title="gap: train - test accuracy", xlabel="epoch", ylabel="accuracy gap")
  ax_gap.axhline(0, color="k", lw=0.8)
  for ax in (ax_acc, ax_gap):
    common.integer_ticks(ax)
    ax.grid(alpha=0.3)
  return common.finish(fig, ax_gap, title, path)


def build_parser() -> argparse.ArgumentParser:
  parser = common.make_parser(__doc__, epochs=30, quick_epochs=6, out="out/dropout_vs_bn", lr=0.1,
                              lr_for="all models", batch_size=64)
  parser.add_argument("--rate", type=float, default=0.5, help="dropout rate")
  return parser


def run(args: argparse.Namespace, data: common.Dataset | None = None) -> dict[str, Any]:
  data = common.experiment_data(args, data)
  histories = []
  for name, (drop, bn) in VARIANTS.items():
    model = MLP(num_classes=data.num_classes, dropout=drop, use_bn=bn, rate=args.rate)
    _, hist = train(model, data, args, name)
    histories.append(hist)
  title = f"Experiment 6: none / dropout {args.rate} / BN / both, SGD lr={args.lr} ({data.name})"
  gaps = {h.name: h.train_acc[-1] - h.test_acc[-1] for h in histories}
  table = common.markdown_table(
      ["model", "final train loss", "train acc", "test acc", "gap (train - test)"],
      [[h.name, h.train_loss[-1], h.train_acc[-1], h.test_acc[-1], gaps[h.name]]
       for h in histories])
  plot = plot_gap(histories, f"{args.out}/dropout_vs_bn.png", title)
  return common.result(title, table, histories, [plot], gaps=gaps)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return common.main(build_parser, run, argv)


if __name__ == "__main__":
  main()
