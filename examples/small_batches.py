"""Experiment 7: tiny batches (2 and 4): batch norm vs batch renorm vs group norm vs StdConv + GN.

A small ReLU conv net (conv 16 -> pool -> conv 32 -> pool -> dense), the normalization after each
convolution, trained by SGD at batch sizes 2 and 4. Batch norm's statistics over 2 or 4 examples are
noisy and its running averages (used at test time) disagree with what training saw; batch renorm
(r_max 3, d_max 5) corrects the batch statistics toward the running ones; group norm (4 groups)
uses no batch statistics at all. The fourth model is the BiT / big_vision recipe for small batches:
weight-standardized convolutions (``jl.StdConv``, each output channel's kernel standardized to mean
0 and variance 1 over its fan-in; Qiao et al., 2019) followed by the same group norm. Reports test
accuracy in inference mode and the last epoch's mean training loss, and plots the smoothed training
loss against the number of training images seen and the final test accuracies.

  python examples/small_batches.py --out out/small_batches
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

KINDS = ("BatchNorm", "BatchRenorm", "GroupNorm", "StdConv + GroupNorm")


class ConvNet(nn.Module):
  num_classes: int = 10
  kind: str = "BatchNorm"

  def _conv(self, features):
    conv = jl.StdConv if self.kind == "StdConv + GroupNorm" else nn.Conv
    return conv(features, (3, 3), padding="SAME", use_bias=False)

  def _norm(self, x, train):
    if self.kind in ("GroupNorm", "StdConv + GroupNorm"):
      return jl.GroupNorm(num_groups=4)(x)
    if self.kind == "BatchRenorm":
      return jl.BatchRenorm(use_running_average=not train, momentum=0.9, r_max=3.0, d_max=5.0)(x)
    return jl.BatchNorm(use_running_average=not train, momentum=0.9)(x)

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (16, 32):
      x = self._conv(features)(x)
      x = nn.relu(self._norm(x, train))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


class TrainState(train_state.TrainState):
  batch_stats: Any


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
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)


def train(model: nn.Module, data: common.Dataset, args: argparse.Namespace, name: str,
          batch_size: int) -> tuple[TrainState, common.History]:
  """SGD at --lr for --epochs; keeps every step's loss for the plot."""
  _, init_key, dropout_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)
  variables = jax.jit(lambda x: model.init({"params": init_key, "dropout": dropout_key}, x,
                                           train=False))(data.x_train[:batch_size])
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optax.sgd(args.lr),
                            batch_stats=variables.get("batch_stats", {}))
  rng = np.random.default_rng(args.seed)
  hist, timer = common.History(name), common.StepTimer()
  hist.record(0, functools.partial(predict, state), data)
  for epoch in common.epochs(args, desc=name):
    losses = []
    for idx in common.batches(len(data.y_train), batch_size, rng):
      with timer:
        state, loss = train_step(state, data.x_train[idx], data.y_train[idx])
        losses.append(float(loss))
    hist.step_losses.extend(losses)
    hist.record(epoch, functools.partial(predict, state), data, train_loss=float(np.mean(losses)))
  hist.seconds_per_step = timer.mean()
  return state, hist


def plot(histories: dict[tuple[str, int], common.History], batch_sizes: Sequence[int], path: str,
         title: str) -> str:
  """Left: training loss (moving average) against images seen; right: final test accuracy."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4.8))
  styles = ["-", "--", ":", "-."]
  for (kind, bs), h in histories.items():
    losses = np.asarray(h.step_losses)
    window = max(1, len(losses) // 10)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    seen = (np.arange(len(smooth)) + window) * bs
    ax_loss.plot(seen, smooth, color=f"C{KINDS.index(kind)}",
                 ls=styles[list(batch_sizes).index(bs) % len(styles)], label=f"{kind}, batch {bs}")
  ax_loss.set(title="training loss (moving average over 1/10 of the run)",
              xlabel="training images seen", ylabel="cross-entropy")
  common.log_axis(ax_loss)
  width = 0.8 / len(batch_sizes)
  for j, bs in enumerate(batch_sizes):
    acc = [histories[(kind, bs)].test_acc[-1] for kind in KINDS]
    bars = ax_acc.bar(np.arange(len(KINDS)) + (j - (len(batch_sizes) - 1) / 2) * width, acc,
                      width, color=[f"C{i}" for i in range(len(KINDS))], alpha=1 - 0.35 * j,
                      edgecolor="k")
    ax_acc.bar_label(bars, labels=[f"{a:.3f}\nbatch {bs}" for a in acc], fontsize=7)
  ax_acc.set_xticks(np.arange(len(KINDS)), [kind.replace(" + ", " +\n") for kind in KINDS])
  ax_acc.set(title="final test accuracy", ylabel="accuracy", ylim=(0, 1.15))
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
  # One legend column per batch size (the labels come batch by batch).
  return common.finish(fig, ax_loss, title, path, ncol=len(batch_sizes))


def build_parser() -> argparse.ArgumentParser:
  parser = common.make_parser(__doc__, epochs=3, quick_epochs=1, out="out/small_batches", lr=0.02,
                              lr_for="all runs")
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4])
  parser.add_argument("--train-size", type=int, default=None,
                      help="training images (default: all; 400 with --quick)")
  return parser


def run(args: argparse.Namespace, data: common.Dataset | None = None) -> dict[str, Any]:
  data = common.experiment_data(args, data, quick_subset=False)
  n_train = args.train_size or (400 if args.quick else None)
  data = data.subset(n_train, 1000 if data.name != "digits" else None)
  histories = {}
  for bs in args.batch_sizes:
    for kind in KINDS:
      model = ConvNet(num_classes=data.num_classes, kind=kind)
      _, histories[(kind, bs)] = train(model, data, args, f"{kind}, batch {bs}", bs)
  acc = {key: h.test_acc[-1] for key, h in histories.items()}
  title = f"Experiment 7: batch sizes {args.batch_sizes}, SGD lr={args.lr} ({data.name})"
  loss = {key: h.train_loss[-1] for key, h in histories.items()}
  table = common.markdown_table(
      ["normalization"] + [f"test acc, batch {bs}" for bs in args.batch_sizes]
      + [f"last-epoch train loss, batch {bs}" for bs in args.batch_sizes],
      [[kind] + [acc[(kind, bs)] for bs in args.batch_sizes]
       + [loss[(kind, bs)] for bs in args.batch_sizes] for kind in KINDS])
  path = plot(histories, args.batch_sizes, f"{args.out}/small_batches.png", title)
  return common.result(title, table, list(histories.values()), [path], accuracy=acc)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return common.main(build_parser, run, argv)


if __name__ == "__main__":
  main()
