"""Experiment 1: the same MLP trained with and without batch norm.

Both models see the same initial seed, the same batches in the same order, the same optimizer and
learning rate; the only difference is a ``BatchNorm`` between each hidden ``Dense`` and its
activation (the ``Dense`` then has no bias: BN's own bias replaces it). Writes the training-loss
and test-accuracy curves side by side (``bn_vs_no_bn.png``) and a markdown table.

  python examples/bn_vs_no_bn.py --out out/bn_vs_no_bn
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training import train_state

import jaxnorm.linen as jl

import _common as common

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
        x = jl.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      self.sow("intermediates", "preact", x)
      x = act(x)
    return nn.Dense(self.num_classes)(x)


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_state(model: nn.Module, x0: np.ndarray, lr: float, seed: int) -> TrainState:
  _, init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed), 3)
  init = jax.jit(lambda x: model.init({"params": init_key, "dropout": dropout_key}, x, train=False))
  variables = init(x0)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(lr),
                           batch_stats=variables.get("batch_stats", {}))


@jax.jit
def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                     train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates.get("batch_stats", {})

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss


@jax.jit
def predict(state: TrainState, x: jax.Array) -> jax.Array:
  """Logits in inference mode: batch norm uses its running averages."""
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)


def train(model: nn.Module, data: common.Dataset, args: argparse.Namespace, name: str, *,
          state: TrainState | None = None,
          on_epoch: Callable[[TrainState, int], None] | None = None
          ) -> tuple[TrainState, common.History]:
  """SGD at --lr for --epochs from ``state`` (default: a fresh one from ``create_state``).

  ``on_epoch(state, epoch)`` runs before training and after each epoch. The batch order depends
  on --seed only, so every model sees the same batches.
  """
  if state is None:
    state = create_state(model, data.x_train[:args.batch_size], args.lr, args.seed)
  rng = np.random.default_rng(args.seed)
  hist, timer = common.History(name), common.StepTimer()
  hist.record(0, functools.partial(predict, state), data)
  if on_epoch:
    on_epoch(state, 0)
  for epoch in common.epochs(args, desc=name):
    losses = []
    for idx in common.batches(len(data.y_train), args.batch_size, rng):
      with timer:
        state, loss = train_step(state, data.x_train[idx], data.y_train[idx])
        losses.append(float(loss))
    hist.record(epoch, functools.partial(predict, state), data, train_loss=float(np.mean(losses)))
    if on_epoch:
      on_epoch(state, epoch)
  hist.seconds_per_step = timer.mean()
  return state, hist


def build_parser() -> argparse.ArgumentParser:
  parser = common.make_parser(__doc__, epochs=20, quick_epochs=4, out="out/bn_vs_no_bn", lr=0.1,
                              batch_size=64)
  parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu")
  return parser


def run(args: argparse.Namespace, data: common.Dataset | None = None) -> dict[str, Any]:
  """Trains both models; returns their histories, the plot path and the markdown table."""
  data = common.experiment_data(args, data)
  histories = []
  for use_bn in (False, True):
    model = MLP(num_classes=data.num_classes, use_bn=use_bn, activation=args.activation)
    _, hist = train(model, data, args, "MLP + BN" if use_bn else "MLP")
    histories.append(hist)
  title = (f"Experiment 1: {args.activation} MLP with vs without batch norm "
           f"(SGD lr={args.lr}, {data.name})")
  plot = common.plot_curves(histories, f"{args.out}/bn_vs_no_bn.png", title)
  return common.result(title, common.summary_table(histories), histories, [plot])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return common.main(build_parser, run, argv)


if __name__ == "__main__":
  main()
