"""Experiment 4: layer norm in a recurrent network, batch size 1, variable-length sequences.

Each digit is read as a sequence of its rows (top to bottom): blank rows above and below the digit
are trimmed, and each sequence keeps only its first 60-100% rows (drawn once, fixed seed), so
lengths vary (5 to 8 rows for the 8x8 digits). Sequences are padded
to the image height and carry a mask; padded steps leave the hidden state unchanged. The cell is an
Elman RNN, h_t = tanh(LN(W x_t + U h_{t-1})), unrolled with ``nn.scan``; it is trained with one
sequence per step (batch size 1), with and without layer norm.

Layer norm normalizes each example over its own hidden units, so it needs no batch: a sequence's
output does not depend on the other sequences in its batch. Batch norm at batch size 1 in training
mode has nothing to normalize over (each unit's batch variance is 0): jaxnorm's BatchNorm, like
Flax's, returns just its bias there, and warns. The script checks both facts and prints them.

  python examples/rnn_layer_norm.py --out out/rnn_layer_norm
"""

from __future__ import annotations

import argparse
import functools
import warnings
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

import jaxnorm.linen as jl

import _common as common


def to_sequences(images: np.ndarray, pad_to: int | None = None, *, keep_min: float = 0.6,
                 seed: int = 0) -> np.ndarray:
  """(N, H, W, 1) images -> (N, T, W + 1) row sequences; the last feature is the mask (1 = valid).

  Blank rows above and below each digit are trimmed (MNIST has many; the 8x8 digits none), then each
  sequence keeps its first L rows, L drawn uniformly between ``keep_min`` of its length and all of
  it (fixed by ``seed``), so lengths vary. The rows are padded with zeros up to ``pad_to``
  (default H).
  """
  rows = images[..., 0]
  n, h, w = rows.shape
  t = pad_to or h
  rng = np.random.default_rng(seed)
  out = np.zeros((n, t, w + 1), np.float32)
  for i, img in enumerate(rows):
    nonblank = np.flatnonzero(img.max(axis=1) > 0)
    first, last = (nonblank[0], nonblank[-1]) if len(nonblank) else (0, 0)
    seq = img[first:last + 1]
    seq = seq[:rng.integers(int(np.ceil(keep_min * len(seq))), len(seq) + 1)]
    out[i, :len(seq), :w] = seq
    out[i, :len(seq), w] = 1.0
  return out


class ElmanCell(nn.Module):
  """One step: h' = tanh(LN(W x + U h)) where the mask is on, h' = h where it is off."""

  hidden: int
  use_ln: bool

  @nn.compact
  def __call__(self, h, inputs):
    x, valid = inputs
    z = nn.Dense(self.hidden, use_bias=not self.use_ln, name="wx")(x)
    z = z + nn.Dense(self.hidden, use_bias=False, name="uh")(h)
    if self.use_ln:
      z = jl.LayerNorm(name="ln")(z)
    h_new = jnp.tanh(z)
    return jnp.where(valid[:, None], h_new, h), None


class RowRNN(nn.Module):
  """Reads (B, T, F + 1) masked sequences with ``nn.scan`` and classifies the last hidden state."""

  num_classes: int = 10
  hidden: int = 64
  use_ln: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    del train  # no train/inference difference: layer norm keeps no running statistics
    feats, valid = x[..., :-1], x[..., -1] > 0.5
    h0 = jnp.zeros((x.shape[0], self.hidden), x.dtype)
    scan = nn.scan(ElmanCell, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1)
    h, _ = scan(self.hidden, self.use_ln, name="cell")(h0, (feats, valid))
    return nn.Dense(self.num_classes, name="out")(h)


@jax.jit
def train_step(state: train_state.TrainState, x: jax.Array, y: jax.Array
               ) -> tuple[train_state.TrainState, jax.Array]:
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


@jax.jit
def predict(state: train_state.TrainState, x: jax.Array) -> jax.Array:
  return state.apply_fn({"params": state.params}, x, train=False)


def train(model: nn.Module, data: common.Dataset, args: argparse.Namespace, name: str
          ) -> tuple[train_state.TrainState, common.History]:
  """SGD at --lr, one sequence per step (batch size 1), for --epochs."""
  _, init_key, _ = jax.random.split(jax.random.PRNGKey(args.seed), 3)
  params = jax.jit(lambda x: model.init(init_key, x, train=False))(data.x_train[:1])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(args.lr))
  rng = np.random.default_rng(args.seed)
  hist, timer = common.History(name), common.StepTimer()
  hist.record(0, functools.partial(predict, state), data)
  for epoch in common.epochs(args, desc=name):
    losses = []
    for idx in common.batches(len(data.y_train), 1, rng):
      with timer:
        state, loss = train_step(state, data.x_train[idx], data.y_train[idx])
        losses.append(float(loss))
    hist.record(epoch, functools.partial(predict, state), data, train_loss=float(np.mean(losses)))
  hist.seconds_per_step = timer.mean()
  return state, hist


def build_parser() -> argparse.ArgumentParser:
  parser = common.make_parser(__doc__, epochs=5, quick_epochs=2, out="out/rnn_layer_norm", lr=0.05)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--train-size", type=int, default=None,
                      help="training sequences per epoch (default: all; 400 with --quick)")
  return parser


def checks(model: nn.Module, params: Any, seqs: np.ndarray) -> dict[str, Any]:
  """Batch independence, padding invariance (LN model), and BN's collapse at batch size 1."""
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  one_by_one = np.concatenate([np.asarray(apply(params, seqs[i:i + 1])) for i in range(8)])
  batched = np.asarray(apply(params, seqs[:8]))
  longer = np.concatenate([seqs[:8], np.zeros((8, 4, seqs.shape[-1]), seqs.dtype)], axis=1)
  padded = np.asarray(apply(params, longer))
  bn = jl.BatchNorm(use_running_average=False)
  z = jax.random.normal(jax.random.PRNGKey(0), (1, 16))
  bn_vars = bn.init(jax.random.PRNGKey(1), z)
  with warnings.catch_warnings(record=True) as caught:  # batch of one: Flax's result, and a warning
    warnings.simplefilter("always")
    bn_out, _ = bn.apply(bn_vars, z, mutable=["batch_stats"])
  said = "; ".join(f"{w.category.__name__}: {w.message}" for w in caught)
  bn_batch1 = f"max |output| = {float(np.abs(np.asarray(bn_out)).max()):.2g} ({said})"
  return {"batch_independent_max_diff": float(np.abs(one_by_one - batched).max()),
          "padding_max_diff": float(np.abs(padded - batched).max()),
          "bn_batch1": bn_batch1}


def run(args: argparse.Namespace, data: common.Dataset | None = None) -> dict[str, Any]:
  data = common.experiment_data(args, data, quick_subset=False)
  n_train = args.train_size or (400 if args.quick else None)
  n_test = 1000 if data.name != "digits" else None
  seq = common.Dataset(data.name, to_sequences(data.x_train[:n_train], seed=1),
                       data.y_train[:n_train], to_sequences(data.x_test[:n_test], seed=2),
                       data.y_test[:n_test])
  lengths = seq.x_train[..., -1].sum(axis=1)
  histories, results = [], {}
  for use_ln in (False, True):
    name = "RNN + LN" if use_ln else "RNN"
    model = RowRNN(num_classes=data.num_classes, hidden=args.hidden, use_ln=use_ln)
    state, hist = train(model, seq, args, name)
    histories.append(hist)
    if use_ln:
      results = checks(model, state.params, seq.x_test)
  title = (f"Experiment 4: Elman RNN over rows, batch size 1, lengths {int(lengths.min())}-"
           f"{int(lengths.max())}, SGD lr={args.lr} ({data.name})")
  table = common.summary_table(histories)
  table += ("\n\nLN model, one sequence at a time vs a batch of 8: max |difference| = "
            f"{results['batch_independent_max_diff']:.2g}; padded to 12 steps instead of "
            f"{seq.x_test.shape[1]}: {results['padding_max_diff']:.2g}. BatchNorm on a batch of "
            f"one in training mode: {results['bn_batch1']}")
  plot = common.plot_curves(histories, f"{args.out}/rnn_layer_norm.png", title)
  return common.result(title, table, histories, [plot], checks=results,
                       lengths=(int(lengths.min()), int(lengths.max())))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return common.main(build_parser, run, argv)


if __name__ == "__main__":
  main()
