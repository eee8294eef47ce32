"""Plumbing shared by the examples: data, command line, progress bars, evaluation, plots, tables.

Nothing here knows about a model or a normalization layer: each example script defines its model
with ``jaxnorm.linen``, its training step and its loop, and uses this module only for what every
script needs the same way. The examples import it as ``import _common as common``, which works
when a script is run as ``python examples/<script>.py`` (Python puts the script's directory on
``sys.path``).

Data: scikit-learn's ``load_digits`` (1,797 8x8 grey digits that ship with scikit-learn, nothing
is downloaded) with a fixed 1,438 / 359 train/test split, or MNIST / Fashion-MNIST IDX files from a
directory (``--data DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import struct
import sys
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker
from tqdm.auto import tqdm

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

  def subset(self, n_train: int | None, n_test: int | None) -> Dataset:
    """The first ``n_train`` / ``n_test`` examples (``None`` keeps all)."""
    return Dataset(self.name, self.x_train[:n_train], self.y_train[:n_train],
                   self.x_test[:n_test], self.y_test[:n_test])

  def scaled(self, factor: float) -> Dataset:
    """The same images multiplied by ``factor`` (labels unchanged)."""
    return Dataset(self.name, self.x_train * factor, self.y_train, self.x_test * factor,
                   self.y_test)


def load_digits_dataset(*, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
  """scikit-learn's 8x8 digits, scaled to [0, 1], with a fixed shuffled train/test split.

  The split depends only on ``split_seed`` (not on a run's ``--seed``), so every run and every
  example sees the same images: ``round(0.2 * 1797) = 359`` for testing, 1,438 for training.
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(split_seed).permutation(len(y))
  n_test = round(test_fraction * len(y))
  test, train = perm[:n_test], perm[n_test:]
  return Dataset("digits", x[train], y[train], x[test], y[test])


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (the MNIST format), gzipped or not, into a NumPy array.

  The header is two zero bytes, a type code (0x08 = uint8, 0x09 = int8, 0x0B = int16,
  0x0C = int32, 0x0D = float32, 0x0E = float64), the number of dimensions, then each dimension
  as a big-endian uint32; the data follow, big-endian.
  """
  opener: Callable[..., Any] = gzip.open if path.endswith(".gz") else open
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
                          "Fashion-MNIST IDX files (train-images-idx3-ubyte, "
                          "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                          "t10k-labels-idx1-ubyte), gzipped or not.")


def load_idx_dataset(directory: str) -> Dataset:
  """MNIST or Fashion-MNIST from the user's own IDX files in ``directory``."""
  def images(stem: str) -> np.ndarray:
    return (read_idx(_find(directory, stem)).astype(np.float32) / 255.0)[..., None]

  def labels(stem: str) -> np.ndarray:
    return read_idx(_find(directory, stem)).astype(np.int32)

  return Dataset(os.path.basename(os.path.normpath(directory)) or "idx",
                 images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
                 images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def load_data(data_dir: str | None) -> Dataset:
  """IDX files from ``data_dir`` when given, else scikit-learn's digits."""
  return load_idx_dataset(data_dir) if data_dir else load_digits_dataset()


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


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Shuffled index batches of one epoch; the last incomplete batch is dropped."""
  perm = rng.permutation(n)
  for i in range(0, n - batch_size + 1, batch_size):
    yield perm[i:i + batch_size]


# --------------------------------------------------------------------------------------------------
# Command line and progress
# --------------------------------------------------------------------------------------------------


def make_parser(doc: str | None, *, epochs: int, quick_epochs: int, out: str,
                lr: float | None = None, lr_for: str = "both models",
                batch_size: int | None = None) -> argparse.ArgumentParser:
  """The options every example shares: --seed, --epochs, --out, --quick, --data, --no-progress.

  ``doc`` is the script's docstring; its first paragraph describes the script in ``--help``. With
  ``lr`` the parser also takes ``--lr`` (SGD learning rate of ``lr_for``), with ``batch_size``
  ``--batch-size``; ``epochs`` and ``quick_epochs`` are the defaults of ``--epochs`` without and
  with ``--quick`` (see :func:`parse`).
  """
  parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--seed", type=int, default=0, help="seed of initialization and batch order")
  parser.add_argument("--epochs", type=int, default=None,
                      help=f"training epochs (default {epochs}, or {quick_epochs} with --quick)")
  parser.add_argument("--out", default=out,
                      help="directory for the PNG plots and the markdown table")
  parser.add_argument("--quick", action="store_true",
                      help="a short run (seconds) for smoke tests and CI")
  parser.add_argument("--data", default=None, metavar="DIR",
                      help="directory with MNIST / Fashion-MNIST IDX files; default: "
                           "scikit-learn's 8x8 digits")
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


def epochs(args: argparse.Namespace, *, desc: str) -> Iterable[int]:
  """``1, ..., args.epochs`` with a tqdm bar (shown on a terminal unless --no-progress)."""
  return tqdm(range(1, args.epochs + 1), desc=desc, leave=False,
              disable=args.no_progress or not sys.stderr.isatty())


class StepTimer:
  """Wall time of the training steps run inside ``with timer:``, without the first (compiling) one.

  The block must wait for its result (``float(loss)`` does), or it times the dispatch only.
  """

  def __init__(self) -> None:
    self._seconds: list[float] = []
    self._t0 = 0.0

  def __enter__(self) -> StepTimer:
    self._t0 = time.perf_counter()
    return self

  def __exit__(self, *exc: object) -> None:
    self._seconds.append(time.perf_counter() - self._t0)

  def mean(self) -> float:
    """Mean seconds per step, the first step left out; NaN with fewer than two steps."""
    return float(np.mean(self._seconds[1:])) if len(self._seconds) > 1 else float("nan")


# --------------------------------------------------------------------------------------------------
# Evaluation and the record of a run
# --------------------------------------------------------------------------------------------------


def evaluate(predict: Callable[[np.ndarray], Any], x: np.ndarray, y: np.ndarray, *,
             batch_size: int = 512) -> tuple[float, float]:
  """Mean cross-entropy and accuracy of ``predict(x) -> logits`` over ``(x, y)``.

  ``x`` goes through in chunks of ``batch_size``, the last one padded with zeros, so a jitted
  ``predict`` compiles once; the padding is left out of the loss and the accuracy.
  """
  total_loss, correct = 0.0, 0
  for i in range(0, len(y), batch_size):
    xb, yb = x[i:i + batch_size], y[i:i + batch_size]
    n = len(yb)
    if n < batch_size:
      xb = np.concatenate([xb, np.zeros((batch_size - n,) + xb.shape[1:], xb.dtype)])
    logits = np.asarray(predict(xb), np.float64)[:n]
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    total_loss -= float(log_probs[np.arange(n), yb].sum())
    correct += int((logits.argmax(-1) == yb).sum())
  return total_loss / len(y), correct / len(y)


@dataclasses.dataclass
class History:
  """Per-epoch curves of one run (epoch 0 is before training)."""

  name: str
  epochs: list[int] = dataclasses.field(default_factory=list)
  train_loss: list[float] = dataclasses.field(default_factory=list)
  train_acc: list[float] = dataclasses.field(default_factory=list)
  test_acc: list[float] = dataclasses.field(default_factory=list)
  step_losses: list[float] = dataclasses.field(default_factory=list)
  seconds_per_step: float = float("nan")

  def record(self, epoch: int, predict: Callable[[np.ndarray], Any], data: Dataset,
             train_loss: float | None = None) -> None:
    """Appends ``epoch``'s train/test accuracy of ``predict`` (inference mode) to the curves.

    ``train_loss`` is the mean loss of the epoch's training steps; without it (epoch 0) the loss
    on the training set is computed.
    """
    loss, train_acc = evaluate(predict, data.x_train, data.y_train)
    _, test_acc = evaluate(predict, data.x_test, data.y_test)
    self.epochs.append(epoch)
    self.train_loss.append(float(loss if train_loss is None else train_loss))
    self.train_acc.append(train_acc)
    self.test_acc.append(test_acc)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def log_axis(ax: Any, axis: str = "y") -> None:
  """A log scale labelled 0.1, 0.2, 0.5, 1, 2... in plain numbers, minor ticks unlabelled."""
  target = ax.yaxis if axis == "y" else ax.xaxis
  (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
  target.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  target.set_minor_formatter(ticker.NullFormatter())


def integer_ticks(ax: Any) -> None:
  """Only whole numbers on the x axis (epochs)."""
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))


def legend_below(fig: Any, ax: Any, ncol: int | None = None) -> None:
  """One legend for the figure, under the panels, so it never covers a curve."""
  handles, labels = ax.get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=ncol or len(labels), frameon=False)


def plot_curves(histories: Sequence[History], path: str, title: str) -> str:
  """Training loss (log scale) and test accuracy per epoch, side by side, one line per run."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.8))
  for h in histories:
    ax_loss.plot(h.epochs[1:], h.train_loss[1:], marker=".", label=h.name)
    ax_acc.plot(h.epochs, h.test_acc, marker=".", label=h.name)
  ax_loss.set(title="training loss", xlabel="epoch", ylabel="cross-entropy (mean over epoch)")
  log_axis(ax_loss)
  ax_acc.set(title="test accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
  for ax in (ax_loss, ax_acc):
    integer_ticks(ax)
    ax.grid(alpha=0.3)
  return finish(fig, ax_acc, title, path)


def finish(fig: Any, legend_ax: Any, title: str, path: str, *, ncol: int | None = None) -> str:
  """Adds the title and the legend below the panels, saves ``fig`` to ``path`` and closes it."""
  fig.suptitle(title)
  legend_below(fig, legend_ax, ncol)
  rows = -(-len(legend_ax.get_legend_handles_labels()[1]) // (ncol or 10**6))
  fig.tight_layout(rect=(0, 0.04 + 0.05 * rows, 1, 1))
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


# --------------------------------------------------------------------------------------------------
# Tables and results
# --------------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; floats get 4 significant digits."""
  def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)

  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def summary_table(histories: Sequence[History]) -> str:
  """Final train loss, train and test accuracy and ms per step, one row per run."""
  return markdown_table(
      ("model", "final train loss", "train acc", "test acc", "ms / step"),
      [[h.name, h.train_loss[-1], h.train_acc[-1], h.test_acc[-1], h.seconds_per_step * 1e3]
       for h in histories])


def result(title: str, table: str, histories: Sequence[History], plots: Sequence[str],
           **extra: Any) -> dict[str, Any]:
  """What an experiment's ``run`` returns: its title, markdown table, histories by run name, plot
  paths, and any experiment-specific entries."""
  return {"title": title, "table": table, "histories": {h.name: h for h in histories},
          "plots": list(plots), **extra}


def section(res: dict[str, Any]) -> str:
  """A result's markdown section: its title as a heading, then its table."""
  return f"## {res['title']}\n\n{res['table']}"


def write_text(path: str, text: str) -> str:
  with open(path, "w") as f:
    f.write(text + "\n")
  return path


def main(build_parser: Callable[[], argparse.ArgumentParser],
         run: Callable[[argparse.Namespace], dict[str, Any]],
         argv: Sequence[str] | None) -> dict[str, Any]:
  """An experiment script's ``main``: parses ``argv``, calls ``run(args)``, prints its section and
  writes it to ``--out/summary.md``. Returns ``run``'s result."""
  args = parse(build_parser(), argv)
  res = run(args)
  print(section(res))
  write_text(os.path.join(args.out, "summary.md"), section(res))
  return res
