"""Shared pieces of the examples: data, the normalization layers, training loops, plots, tables.

Every example imports its normalization layers through :data:`norm` below, so one place decides
where they come from: ``jaxnorm.linen``. While a jaxnorm module is still a placeholder (``None``)
the matching ``flax.linen`` module stands in, and :func:`norm_sources` says so.

Data: scikit-learn's ``load_digits`` (1,797 8x8 grey digits that ship with scikit-learn, nothing is
downloaded) with a fixed train/test split, or MNIST / Fashion-MNIST IDX files from a directory
(``--data DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import struct
import sys
import time
import types
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import jaxnorm.linen as _jaxnorm_linen  # noqa: E402

# --------------------------------------------------------------------------------------------------
# The normalization layers: ONE alias for every example.
# --------------------------------------------------------------------------------------------------

_NAMES = ("BatchNorm", "LayerNorm", "GroupNorm", "BatchRenorm", "Dropout", "WeightNorm")


def _resolve() -> tuple[types.SimpleNamespace, dict[str, str]]:
  layers, sources = {}, {}
  for name in _NAMES:
    cls = getattr(_jaxnorm_linen, name, None)
    if cls is not None:
      layers[name], sources[name] = cls, "jaxnorm.linen"
    elif hasattr(nn, name):
      layers[name], sources[name] = getattr(nn, name), "flax.linen (jaxnorm's is not there yet)"
    else:
      layers[name], sources[name] = None, "missing"
  return types.SimpleNamespace(**layers), sources


norm, _SOURCES = _resolve()


def norm_sources() -> dict[str, str]:
  """Where each layer of :data:`norm` comes from (``"jaxnorm.linen"`` when all is well)."""
  return dict(_SOURCES)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dataset:
  """Images in [0, 1] with a trailing channel axis, ``(N, H, W, 1)``, and integer labels."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def num_classes(self) -> int:
    return int(max(self.y_train.max(), self.y_test.max())) + 1

  @property
  def image_shape(self) -> tuple[int, ...]:
    return self.x_train.shape[1:]

  def subset(self, n_train: int | None, n_test: int | None) -> "Dataset":
    """The first ``n_train`` / ``n_test`` examples (``None`` keeps all)."""
    return Dataset(self.name, self.x_train[:n_train], self.y_train[:n_train],
                   self.x_test[:n_test], self.y_test[:n_test])


def load_digits_dataset(*, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
  """scikit-learn's 8x8 digits, scaled to [0, 1], with a fixed shuffled train/test split.

  The split depends only on ``split_seed`` (not on a run's ``--seed``), so every run and every
  example sees the same 1,437 training and 360 test images.
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(split_seed).permutation(len(y))
  n_test = int(round(test_fraction * len(y)))
  test, train = perm[:n_test], perm[n_test:]
  return Dataset("digits", x[train], y[train], x[test], y[test])


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (the MNIST format), gzipped or not, into a NumPy array.

  The header is two zero bytes, a type code (0x08 = uint8, 0x09 = int8, 0x0B = int16,
  0x0C = int32, 0x0D = float32, 0x0E = float64), the number of dimensions, then each dimension
  as a big-endian uint32; the data follow, big-endian.
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise ValueError(f"{path!r} is not an IDX file: its first two bytes are {raw[:2]!r}, "
                     "expected b'\\x00\\x00'.")
  dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
  code, ndim = raw[2], raw[3]
  if code not in dtypes:
    raise ValueError(f"{path!r} has IDX type code {code:#04x}; expected one of "
                     f"{sorted(hex(c) for c in dtypes)}.")
  shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  data = np.frombuffer(raw, dtype=dtypes[code], offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(f"{path!r} declares shape {shape} ({int(np.prod(shape))} values) but holds "
                     f"{data.size} values.")
  return data.reshape(shape)


def _find(directory: str, stem: str) -> str:
  for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
                    stem.replace("-idx", ".idx") + ".gz"):
    path = os.path.join(directory, candidate)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"No {stem}[.gz] in {directory!r}; --data expects the four MNIST / "
                          "Fashion-MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                          "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte), gzipped or not.")


def load_idx_dataset(directory: str) -> Dataset:
  """MNIST or Fashion-MNIST from the user's own IDX files in ``directory``."""
  def images(stem):
    return (read_idx(_find(directory, stem)).astype(np.float32) / 255.0)[..., None]

  def labels(stem):
    return read_idx(_find(directory, stem)).astype(np.int32)

  return Dataset(os.path.basename(os.path.normpath(directory)) or "idx",
                 images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
                 images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def load_data(data_dir: str | None) -> Dataset:
  """IDX files from ``data_dir`` when given, else scikit-learn's digits."""
  return load_idx_dataset(data_dir) if data_dir else load_digits_dataset()


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def make_parser(doc: str, *, epochs: int, quick_epochs: int, out: str,
                lr: float | None = None, lr_for: str = "both models",
                batch_size: int | None = None) -> argparse.ArgumentParser:
  """The options every example shares: --seed, --epochs, --out, --quick, --data, --no-progress.

  ``doc`` is the script's docstring; its first paragraph describes the script in ``--help``. With
  ``lr`` the parser also takes ``--lr`` (SGD learning rate of ``lr_for``), with ``batch_size``
  ``--batch-size``; ``epochs`` and ``quick_epochs`` are the defaults of ``--epochs`` without and
  with ``--quick`` (see :func:`parse`).
  """
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--seed", type=int, default=0, help="seed of initialization and batch order")
  parser.add_argument("--epochs", type=int, default=None,
                      help=f"training epochs (default {epochs}, or {quick_epochs} with --quick)")
  parser.add_argument("--out", default=out, help="directory for the PNG plots and the markdown table")
  parser.add_argument("--quick", action="store_true",
                      help="a short run (seconds) for smoke tests and CI")
  parser.add_argument("--data", default=None, metavar="DIR",
                      help="directory with MNIST / Fashion-MNIST IDX files; default: scikit-learn's "
                           "8x8 digits")
  parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
  if lr is not None:
    parser.add_argument("--lr", type=float, default=lr, help=f"SGD learning rate ({lr_for})")
  if batch_size is not None:
    parser.add_argument("--batch-size", type=int, default=batch_size)
  parser.set_defaults(_epochs=epochs, _quick_epochs=quick_epochs)
  return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
  """Parses ``argv``, fills in the --epochs default (quick or not) and creates --out."""
  args = parser.parse_args(argv)
  if args.epochs is None:
    args.epochs = args._quick_epochs if args.quick else args._epochs
  os.makedirs(args.out, exist_ok=True)
  return args


def experiment_data(args: argparse.Namespace, data: Dataset | None = None, *,
                    quick_subset: bool = True) -> Dataset:
  """``data`` when given (the demo loads it once for all experiments), else --data's data set.

  With ``quick_subset`` and --quick, IDX data (MNIST-sized) is cut to its first 2,000 training and
  1,000 test images; the digits stay whole.
  """
  data = data if data is not None else load_data(args.data)
  if quick_subset and args.quick and data.name != "digits":
    data = data.subset(2000, 1000)
  return data


def run_experiment(build_parser: Callable[[], argparse.ArgumentParser],
                   run: Callable[[argparse.Namespace], dict],
                   argv: Sequence[str] | None) -> dict:
  """An experiment script's ``main``: parses ``argv``, calls ``run(args)``, prints the result's
  section (:func:`section`) and the layers' sources, writes the section to ``--out/summary.md``.
  Returns ``run``'s result."""
  args = parse(build_parser(), argv)
  result = run(args)
  print(f"{section(result)}\n\n{sources_line()}")
  write_text(os.path.join(args.out, "summary.md"), section(result))
  return result


def progress(iterable, *, desc: str, disable: bool = False, **kwargs):
  """A tqdm bar, shown only on a terminal."""
  return tqdm(iterable, desc=desc, leave=False, disable=disable or not sys.stderr.isatty(), **kwargs)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array


@dataclasses.dataclass
class History:
  """Per-epoch curves of one run (epoch 0 is before training)."""

  name: str
  epochs: list = dataclasses.field(default_factory=list)
  train_loss: list = dataclasses.field(default_factory=list)
  train_acc: list = dataclasses.field(default_factory=list)
  test_acc: list = dataclasses.field(default_factory=list)
  step_losses: list = dataclasses.field(default_factory=list)
  seconds_per_step: float = float("nan")


def variables_of(state: TrainState) -> dict:
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


def init_state(model: nn.Module, x0: np.ndarray, tx: optax.GradientTransformation,
               seed: int) -> TrainState:
  """Initializes ``model`` on the example batch ``x0`` (its call is ``model(x, train=...)``)."""
  key = jax.random.PRNGKey(seed)
  key, init_key, drop_key = jax.random.split(key, 3)
  # Under jit, init compiles once instead of dispatching (and compiling) every op one by one.
  init = jax.jit(lambda rngs, x: model.init(rngs, x, train=False))
  variables = init({"params": init_key, "dropout": drop_key}, jnp.asarray(x0))
  params = variables["params"]
  return TrainState(params, variables.get("batch_stats", {}), tx.init(params), key)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_train_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
  """A jit-compiled SGD step: (params, batch_stats, opt_state, x, y, key) -> (..., loss)."""

  @jax.jit
  def step(params, batch_stats, opt_state, x, y, key):
    def loss_fn(p):
      variables = {"params": p, "batch_stats": batch_stats}
      logits, updates = model.apply(variables, x, train=True, rngs={"dropout": key},
                                    mutable=["batch_stats"])
      return cross_entropy(logits, y), updates.get("batch_stats", batch_stats)

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


def make_eval(model: nn.Module, batch_size: int = 512) -> Callable:
  """Returns ``evaluate(state, x, y) -> (loss, accuracy)`` in inference mode.

  Every chunk is padded to ``batch_size`` so the evaluation compiles once.
  """

  @jax.jit
  def _eval(variables, x, y, valid):
    logits = model.apply(variables, x, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return (losses * valid).sum(), ((logits.argmax(-1) == y) * valid).sum()

  def evaluate(state: TrainState, x, y):
    total_loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
      xb, yb = x[i:i + batch_size], y[i:i + batch_size]
      n = len(yb)
      valid = np.arange(batch_size) < n
      if n < batch_size:
        xb = np.concatenate([xb, np.zeros((batch_size - n,) + xb.shape[1:], xb.dtype)])
        yb = np.concatenate([yb, np.zeros((batch_size - n,), yb.dtype)])
      loss, c = _eval(variables_of(state), jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(valid))
      total_loss += float(loss)
      correct += int(c)
    return total_loss / len(y), correct / len(y)

  return evaluate


def batches(n: int, batch_size: int, rng: np.random.Generator):
  """Shuffled index batches of one epoch; the last incomplete batch is dropped."""
  perm = rng.permutation(n)
  for i in range(0, n - batch_size + 1, batch_size):
    yield perm[i:i + batch_size]


def fit(model: nn.Module, data: Dataset, *, name: str, epochs: int, batch_size: int,
        tx: optax.GradientTransformation, seed: int, callback: Callable | None = None,
        quiet: bool = False, state: TrainState | None = None) -> tuple[TrainState, History]:
  """Trains ``model`` on ``data`` and records per-epoch curves.

  ``callback(state, epoch)`` runs before training (epoch 0) and after every epoch. The batch order
  depends on ``seed`` only, so two models trained with the same seed see the same batches.
  """
  if state is None:
    state = init_state(model, data.x_train[:batch_size], tx, seed)
  step = make_train_step(model, tx)
  evaluate = make_eval(model)
  rng = np.random.default_rng(seed)
  hist = History(name)

  def record(epoch, train_loss):
    _, train_acc = evaluate(state, data.x_train, data.y_train)
    _, test_acc = evaluate(state, data.x_test, data.y_test)
    if train_loss is None:
      train_loss, _ = evaluate(state, data.x_train, data.y_train)
    hist.epochs.append(epoch)
    hist.train_loss.append(float(train_loss))
    hist.train_acc.append(train_acc)
    hist.test_acc.append(test_acc)
    if callback is not None:
      callback(state, epoch)

  record(0, None)
  n_steps, t_steps = 0, 0.0
  for epoch in progress(range(1, epochs + 1), desc=name, disable=quiet):
    losses = []
    for idx in batches(len(data.y_train), batch_size, rng):
      key, sub = jax.random.split(state.key)
      t0 = time.perf_counter()
      params, stats, opt_state, loss = step(state.params, state.batch_stats, state.opt_state,
                                            jnp.asarray(data.x_train[idx]),
                                            jnp.asarray(data.y_train[idx]), sub)
      loss = float(loss)  # waits for the step
      if n_steps > 0 or epoch > 1:  # the first step compiles
        t_steps += time.perf_counter() - t0
      n_steps += 1
      state = TrainState(params, stats, opt_state, key)
      losses.append(loss)
    hist.step_losses.extend(losses)
    record(epoch, np.mean(losses) if losses else float("nan"))
  if n_steps > 1:
    hist.seconds_per_step = t_steps / (n_steps - 1)
  return state, hist


def fit_from_args(model: nn.Module, data: Dataset, args: argparse.Namespace, *, name: str,
                  **overrides) -> tuple[TrainState, History]:
  """:func:`fit` with the run's options: --epochs, --batch-size, SGD at --lr, --seed, and
  --no-progress; keyword arguments (``batch_size=``, ``tx=``, ``callback=``, ``state=``...) override
  them or add to them."""
  kwargs = dict(epochs=args.epochs, batch_size=getattr(args, "batch_size", None),
                tx=optax.sgd(args.lr), seed=args.seed, quiet=args.no_progress)
  kwargs.update(overrides)
  return fit(model, data, name=name, **kwargs)


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def plot_curves(histories: Sequence[History], path: str, title: str) -> str:
  """Training loss and test accuracy per epoch, side by side, one line per run."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
  for h in histories:
    ax_loss.plot(h.epochs[1:], h.train_loss[1:], marker=".", label=h.name)
    ax_acc.plot(h.epochs, h.test_acc, marker=".", label=h.name)
  ax_loss.set(title="training loss", xlabel="epoch", ylabel="cross-entropy (mean over epoch)")
  ax_loss.set_yscale("log")
  ax_acc.set(title="test accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
  for ax in (ax_loss, ax_acc):
    ax.legend()
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  return save(fig, path)


def save(fig, path: str) -> str:
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; floats get 4 significant digits."""
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)

  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def summary_rows(histories: Sequence[History]) -> list[list[Any]]:
  return [[h.name, h.train_loss[-1], h.train_acc[-1], h.test_acc[-1],
           h.seconds_per_step * 1e3] for h in histories]


SUMMARY_HEADERS = ("model", "final train loss", "train acc", "test acc", "ms / step")


def summary_table(histories: Sequence[History]) -> str:
  """The markdown table of :data:`SUMMARY_HEADERS`, one row per run."""
  return markdown_table(SUMMARY_HEADERS, summary_rows(histories))


def experiment_result(title: str, table: str, histories: Sequence[History], plots: Sequence[str],
           **extra) -> dict:
  """What an experiment's ``run`` returns: its title, markdown table, histories by run name, plot
  paths, and any experiment-specific entries."""
  return {"title": title, "table": table, "histories": {h.name: h for h in histories},
          "plots": list(plots), **extra}


def curves_result(args: argparse.Namespace, filename: str, title: str,
                  histories: Sequence[History], *, table: str | None = None, **extra) -> dict:
  """Plots the curves of ``histories`` to ``--out/filename`` (:func:`plot_curves`) and returns the
  :func:`experiment_result` with that plot; the table defaults to :func:`summary_table`."""
  plot = plot_curves(histories, os.path.join(args.out, filename), title)
  return experiment_result(title, summary_table(histories) if table is None else table,
                           histories, [plot], **extra)


def section(result: dict) -> str:
  """A result's markdown section: its title as a heading, then its table."""
  return f"## {result['title']}\n\n{result['table']}"


def write_text(path: str, text: str) -> str:
  with open(path, "w") as f:
    f.write(text + "\n")
  return path


def sources_line() -> str:
  src = norm_sources()
  stand_ins = {k: v for k, v in src.items() if v != "jaxnorm.linen"}
  if not stand_ins:
    return "normalization layers: jaxnorm.linen"
  return "normalization layers: jaxnorm.linen, except " + ", ".join(
      f"{k} from {v}" for k, v in stand_ins.items())
