"""Experiment 3: does batch norm keep the sigmoids out of saturation?

Trains the MLP of experiment 1 with sigmoid activations (SGD, lr 0.5), with and without batch
norm, on inputs left at their raw scale (pixel values 0..16 as scikit-learn ships the digits, i.e.
no input normalization; ``--input-scale``). At several points of training it collects every
pre-activation entering a sigmoid on a fixed batch of training images, in training mode (what the
sigmoids see while learning), plots their histograms and reports the fraction in the saturated
region |z| > 4, where sigmoid'(z) < 0.018 (its maximum is 0.25 at z = 0). Without --quick it also
runs the control with inputs scaled to [0, 1], where neither model saturates.

  python examples/saturation.py --out out/saturation
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import _common as common
import bn_vs_no_bn as experiment1  # the MLP (with jaxnorm.linen.BatchNorm), its step and loop
from _common import plt

SATURATION = 4.0


def build_parser() -> argparse.ArgumentParser:
  parser = common.make_parser(__doc__, epochs=20, quick_epochs=4, out="out/saturation", lr=0.5,
                              batch_size=64)
  parser.add_argument("--input-scale", type=float, default=None,
                      help="multiply the [0, 1] images by this (default: 16 for the digits, their "
                           "raw range; 255 for IDX data)")
  parser.add_argument("--probe-size", type=int, default=256,
                      help="training images whose pre-activations are collected")
  return parser


def checkpoints(epochs: int) -> list[int]:
  """Epoch 0 (at initialization), about a third, two thirds, and the end."""
  return sorted({0, max(1, epochs // 3), max(1, (2 * epochs) // 3), epochs})


@jax.jit
def sigmoid_inputs(state: experiment1.TrainState, x: jax.Array) -> jax.Array:
  """Every sigmoid input on the batch ``x``, in training mode, as one flat array.

  The MLP sows each activation's input into ``intermediates``; the ``batch_stats`` update of this
  call is thrown away, so probing does not change the model.
  """
  _, updates = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x,
                              train=True, mutable=["batch_stats", "intermediates"])
  leaves = jax.tree_util.tree_leaves(updates["intermediates"])
  return jnp.concatenate([leaf.ravel() for leaf in leaves])


def train_and_probe(data, args, marks, use_bn, name):
  """Trains the sigmoid MLP; returns its sigmoid inputs at the epochs of ``marks``, its history."""
  model = experiment1.MLP(num_classes=data.num_classes, use_bn=use_bn, activation="sigmoid")
  x_probe = jnp.asarray(data.x_train[:args.probe_size])
  preacts = {}

  def probe(state, epoch):
    if epoch in marks:
      preacts[epoch] = np.asarray(sigmoid_inputs(state, x_probe))

  _, hist = experiment1.train(model, data, args, name, on_epoch=probe)
  return preacts, hist


def plot_histograms(preacts, fractions, marks, title, path) -> str:
  """Histograms of the first two runs' sigmoid inputs (rows) at each checkpoint (columns)."""
  shown = list(preacts)[:2]
  fig, axes = plt.subplots(2, len(marks), figsize=(3.0 * len(marks), 5.2), sharex=True)
  axes = np.asarray(axes).reshape(2, len(marks))
  for row, name in enumerate(shown):
    for col, epoch in enumerate(marks):
      ax = axes[row, col]
      z = preacts[name][epoch]
      ax.hist(np.clip(z, -12, 12), bins=60, range=(-12, 12), density=True,
              color="C1" if row else "C0", label=name)
      for b in (-SATURATION, SATURATION):
        ax.axvline(b, color="k", ls="--", lw=0.8)
      ax.set_title(f"{name}, epoch {epoch}: {100 * fractions[name][epoch]:.1f}% saturated",
                   fontsize=9)
      ax.set_xlabel("pre-activation z (clipped to ±12)")
      if col == 0:
        ax.set_ylabel("density")
      ax.legend(fontsize=7, loc="upper left")
  fig.suptitle(title + "; dashed: |z| = 4")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def run(args: argparse.Namespace, data: common.Dataset | None = None) -> dict[str, Any]:
  """Trains both MLPs; returns the saturated fractions per checkpoint, the plot and a table."""
  data = common.experiment_data(args, data)
  scale = args.input_scale or (16.0 if data.name == "digits" else 255.0)
  marks = checkpoints(args.epochs)
  runs = [(scale, False), (scale, True)]
  if not args.quick:
    runs += [(1.0, False), (1.0, True)]
  preacts, histories, fractions, rows = {}, [], {}, []
  for s, use_bn in runs:
    name = ("MLP + BN" if use_bn else "MLP") + ("" if s == scale else f", inputs x{s:g}")
    preacts[name], hist = train_and_probe(data.scaled(s), args, marks, use_bn, name)
    histories.append(hist)
    fractions[name] = {e: float(np.mean(np.abs(z) > SATURATION)) for e, z in preacts[name].items()}
    rows.append([name, f"{s:g}"] + [100 * fractions[name][e] for e in marks] + [hist.test_acc[-1]])

  title = (f"Experiment 3: inputs of the sigmoids (MLP, SGD lr={args.lr}, "
           f"{data.name} x{scale:g})")
  plot = plot_histograms(preacts, fractions, marks, title, f"{args.out}/saturation.png")
  table = common.markdown_table(
      ["model", "input scale"] + [f"% saturated, epoch {e}" for e in marks] + ["final test acc"],
      rows)
  return common.result(title, table, histories, [plot], fractions=fractions, checkpoints=marks)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return common.main(build_parser, run, argv)


if __name__ == "__main__":
  main()
