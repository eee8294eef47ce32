"""Precise batch norm: recompute the running statistics of a trained model exactly.

A small conv net with batch norm (momentum 0.99) is trained at batch size 8 on scikit-learn's
8x8 digits. Its running averages mix statistics of many past weight settings, each from 8
images. After each epoch the test accuracy is measured twice: with those running averages,
and after `jaxnorm.linen.precise_batch_stats` has replaced them with the exact population
statistics of every BatchNorm's inputs over the training set (Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm", Section 3). The recomputed statistics do not depend on how the data are
batched: the script checks that batches of 8 and of 500 give the same ones.

  PYTHONPATH=. python examples/precise_bn.py [--quick] [--out out/precise_bn]
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits
from tqdm.auto import tqdm

import jaxnorm.linen as jl


class ConvNet(nn.Module):
  """conv 16 -> BN -> relu -> pool -> conv 32 -> BN -> relu -> pool -> dense 10."""

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (16, 32):
      x = nn.Conv(features, (3, 3), use_bias=False)(x)
      x = jl.BatchNorm(use_running_average=not train, momentum=0.99)(x)
      x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def digits(seed=0):
  """(x_train, y_train, x_test, y_test): 8x8x1 images in [0, 1], a fixed 80/20 split."""
  d = load_digits()
  x, y = (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(y))
  test, train = perm[:360], perm[360:]
  return x[train], y[train], x[test], y[test]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=None, help="default 8, 2 with --quick")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--quick", action="store_true", help="a short run (< 1 minute)")
  parser.add_argument("--out", default="out/precise_bn")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  epochs = args.epochs or (2 if args.quick else 8)
  os.makedirs(args.out, exist_ok=True)

  x_train, y_train, x_test, y_test = digits()
  model = ConvNet()
  variables = model.init(jax.random.key(args.seed), x_train[:2], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.sgd(args.lr, momentum=0.9)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    param_updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, param_updates), updates["batch_stats"], opt_state, loss

  @jax.jit
  def accuracy(variables, x, y):
    logits = jnp.asarray(model.apply(variables, x, train=False))
    return jnp.mean(jnp.argmax(logits, -1) == y)

  def precise(variables, batch_size):
    batches = [x_train[i:i + batch_size] for i in range(0, len(x_train), batch_size)]
    return jl.precise_batch_stats(model, variables, batches, train=False)

  rng = np.random.default_rng(args.seed)
  history: dict[str, list[float]] = {"epoch": [], "ema": [], "precise": []}
  steps = len(x_train) // args.batch_size
  for epoch in range(1, epochs + 1):
    perm = rng.permutation(len(x_train))
    for i in tqdm(range(steps), desc=f"epoch {epoch}", disable=args.no_progress, leave=False):
      idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
      params, batch_stats, opt_state, _ = train_step(
          params, batch_stats, opt_state, x_train[idx], y_train[idx])
    trained = {"params": params, "batch_stats": batch_stats}
    recomputed = precise(trained, 500)
    history["epoch"].append(epoch)
    history["ema"].append(float(accuracy(trained, x_test, y_test)))
    history["precise"].append(float(accuracy(recomputed, x_test, y_test)))
    print(f"epoch {epoch}: test accuracy {history['ema'][-1]:.3f} with the running averages, "
          f"{history['precise'][-1]:.3f} with precise statistics")

  # The recomputed statistics do not depend on the batch size used to compute them.
  small = precise(trained, args.batch_size)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(small["batch_stats"]), jax.tree.leaves(recomputed["batch_stats"]),
      strict=True))
  print(f"precise statistics from batches of {args.batch_size} vs 500: max difference {diff:.2e}")
  gap = max(float(jnp.max(jnp.abs(a - b) / (jnp.abs(b) + 1e-3))) for a, b in zip(
      jax.tree.leaves(batch_stats), jax.tree.leaves(recomputed["batch_stats"]), strict=True))
  print(f"running averages vs precise statistics: max relative difference {gap:.2f}")

  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot(history["epoch"], history["ema"], "o-", label="running averages (momentum 0.99)")
  ax.plot(history["epoch"], history["precise"], "s-", label="precise statistics")
  ax.set(xlabel="epoch", ylabel="test accuracy",
         title=f"BN at batch size {args.batch_size}: inference statistics")
  ax.legend()
  fig.tight_layout()
  path = os.path.join(args.out, "precise_bn.png")
  fig.savefig(path, dpi=80)
  print(f"wrote {path}")
  return {"history": history, "batch_size_difference": diff, "plot": path}


if __name__ == "__main__":
  main()
