"""Runs every example in --quick mode, in-process, and checks what each one demonstrates.

The demo (experiments 1-3) runs once per session; each assertion is about an effect that holds with
the fixed seeds, not a lucky draw. The examples are scripts, run as ``python examples/<script>.py``
(Python then puts ``examples/`` on ``sys.path``); this test module does the same for itself.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import re
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common as common  # noqa: E402

SCRIPTS = ("demo", "bn_vs_no_bn", "sigmoid_lenet", "saturation", "rnn_layer_norm", "weight_norm",
           "dropout_vs_bn", "small_batches")
CHANCE = 0.1


def _import(name):
  return __import__(name)


def _assert_pngs(paths):
  assert paths
  for p in paths:
    assert p.endswith(".png") and os.path.getsize(p) > 1000, p
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", p


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  out = tmp_path_factory.mktemp("demo")
  results = _import("demo").main(["--quick", "--no-progress", "--out", str(out)])
  return out, results


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_read_as_user_code(name):
  # No import path edits. A script with a model builds its normalization layers from
  # `jaxnorm.linen as jl` itself (no alias hidden in a helper); one without a model imports the
  # experiment script whose model it runs. The helper module is plumbing only.
  source = (EXAMPLES / f"{name}.py").read_text()
  assert "sys.path" not in source
  if "(nn.Module)" in source:
    assert re.search(r"^import jaxnorm\.linen as jl$", source, re.M) and "jl." in source, name
  else:
    imported = re.findall(r"^import (\w+)", source, re.M)
    assert set(imported) & set(SCRIPTS), name
  helper = (EXAMPLES / "_common.py").read_text()
  assert "jaxnorm" not in helper.split('"""', 2)[2]


def test_a_script_runs_from_the_command_line(tmp_path):
  # The way the README runs them: the script's own directory is on sys.path, nothing else.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  root = EXAMPLES.parent
  env["PYTHONPATH"] = str(root)  # this checkout's jaxnorm, as an editable install would give
  proc = subprocess.run([sys.executable, str(EXAMPLES / "demo.py"), "--help"], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "--quick" in proc.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
  module = _import(name)
  with pytest.raises(SystemExit) as e:
    module.main(["--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for option in ("--seed", "--epochs", "--out", "--quick"):
    assert option in text


@pytest.mark.slow
def test_demo_writes_plots_and_summary(demo):
  out, results = demo
  _assert_pngs([p for r in results.values() for p in r["plots"]])
  summary = (out / "summary.md").read_text()
  for title in ("Experiment 1", "Experiment 2", "Experiment 3", "| model |", "gamma", "beta"):
    assert title in summary


@pytest.mark.slow
def test_bn_vs_no_bn(demo):
  h = demo[1]["bn_vs_no_bn"]["histories"]
  bn, plain = h["MLP + BN"], h["MLP"]
  assert bn.test_acc[-1] > 0.9
  assert plain.test_acc[-1] > 3 * CHANCE
  # Same init seed, same batches, same learning rate: BN trains faster.
  assert bn.train_loss[-1] < 0.5 * plain.train_loss[-1]
  assert bn.test_acc[-1] > plain.test_acc[-1]


@pytest.mark.slow
def test_sigmoid_lenet(demo):
  r = demo[1]["sigmoid_lenet"]
  bn, plain = r["histories"]["LeNet + BN"], r["histories"]["LeNet"]
  assert bn.test_acc[-1] > 0.7  # chance is 0.1
  assert bn.test_acc[-1] > plain.test_acc[-1] + 0.3
  assert r["gamma"].shape == r["beta"].shape == (6,)
  # The scale and bias were learned (they start at exactly 1 and 0).
  assert np.abs(r["gamma"] - 1).max() > 0.05 and np.abs(r["beta"]).max() > 0.01


@pytest.mark.slow
def test_saturation(demo):
  r = demo[1]["saturation"]
  plain, bn = r["fractions"]["MLP"], r["fractions"]["MLP + BN"]
  for epoch in r["checkpoints"]:
    assert bn[epoch] < plain[epoch]
  assert plain[r["checkpoints"][-1]] > 0.05
  assert bn[r["checkpoints"][-1]] < 0.01


def _write_idx(path, array):
  array = np.ascontiguousarray(array)
  code = {np.dtype("uint8"): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


def test_read_idx_roundtrip(tmp_path):
  a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  for name in ("a", "a.gz"):
    _write_idx(str(tmp_path / name), a)
    np.testing.assert_array_equal(common.read_idx(str(tmp_path / name)), a)
  b = np.array([1, -2, 70000], dtype=">i4")
  _write_idx(str(tmp_path / "b"), b)
  np.testing.assert_array_equal(common.read_idx(str(tmp_path / "b")), b)
  (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
  with pytest.raises(ValueError, match="is not an IDX file"):
    common.read_idx(str(tmp_path / "bad"))


@pytest.mark.slow
def test_idx_data_option(tmp_path):
  # MNIST-format files made from the digits (uint8 pixels 0..255), half gzipped, half not.
  d = common.load_digits_dataset()
  to_u8 = lambda x: np.round(x[..., 0] * 255).astype(np.uint8)
  _write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), to_u8(d.x_train))
  _write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), d.y_train.astype(np.uint8))
  _write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), to_u8(d.x_test))
  _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), d.y_test.astype(np.uint8))
  loaded = common.load_data(str(tmp_path))
  assert loaded.x_train.shape == d.x_train.shape and loaded.x_test.shape == d.x_test.shape
  np.testing.assert_allclose(loaded.x_train, d.x_train, atol=1 / 255)
  np.testing.assert_array_equal(loaded.y_test, d.y_test)
  r = _import("bn_vs_no_bn").main(["--quick", "--no-progress", "--epochs", "2", "--data",
                                   str(tmp_path), "--out", str(tmp_path / "out")])
  assert r["histories"]["MLP + BN"].test_acc[-1] > 0.8
  _assert_pngs(r["plots"])
  with pytest.raises(FileNotFoundError, match="IDX files"):
    common.load_data(str(tmp_path / "out"))


@pytest.mark.slow
def test_rnn_layer_norm(tmp_path):
  r = _import("rnn_layer_norm").main(["--quick", "--no-progress", "--out", str(tmp_path)])
  _assert_pngs(r["plots"])
  lo, hi = r["lengths"]
  assert lo < hi  # the sequences really have different lengths
  # LN needs no batch: one sequence alone gives the same output as in a batch; padding is masked.
  assert r["checks"]["batch_independent_max_diff"] < 1e-5
  assert r["checks"]["padding_max_diff"] < 1e-5
  assert r["checks"]["bn_batch1"].startswith("max |output| = 0 (UserWarning: BatchNorm:")
  # Trained one sequence at a time, the LN model learns (chance is 0.1).
  assert r["histories"]["RNN + LN"].test_acc[-1] > 3 * CHANCE


@pytest.mark.slow
def test_weight_norm(tmp_path):
  r = _import("weight_norm").main(["--quick", "--no-progress", "--out", str(tmp_path)])
  _assert_pngs(r["plots"])
  assert r["init_stats"]["mean_abs_mean"] < 1e-4
  assert abs(r["init_stats"]["mean_std"] - 1) < 1e-2
  h = r["histories"]
  # Weight norm with data init and batch norm both train faster than the plain MLP.
  assert h["weight norm"].train_loss[-1] < 0.5 * h["plain"].train_loss[-1]
  assert h["batch norm"].train_loss[-1] < 0.5 * h["plain"].train_loss[-1]
  assert all(hist.seconds_per_step > 0 for hist in h.values())


@pytest.mark.slow
def test_dropout_vs_bn(tmp_path):
  r = _import("dropout_vs_bn").main(["--quick", "--no-progress", "--out", str(tmp_path)])
  _assert_pngs(r["plots"])
  # Every variant learns; the quick run is too short to overfit, so no claim about the gaps here.
  for h in r["histories"].values():
    assert h.test_acc[-1] > 0.8
  assert set(r["gaps"]) == {"none", "dropout", "BN", "BN + dropout"}


@pytest.mark.slow
def test_small_batches(tmp_path):
  r = _import("small_batches").main(["--quick", "--no-progress", "--out", str(tmp_path)])
  _assert_pngs(r["plots"])
  # Every normalization, StdConv + GroupNorm (the BiT recipe) included, runs at both batch sizes
  # and trains well above chance (0.1).
  kinds = ("BatchNorm", "BatchRenorm", "GroupNorm", "StdConv + GroupNorm")
  assert set(r["accuracy"]) == {(kind, bs) for kind in kinds for bs in (2, 4)}
  for acc in r["accuracy"].values():
    assert acc > 3 * CHANCE


def test_small_batches_stdconv_model_standardizes_its_kernels():
  # Weight standardization removes each output channel's kernel mean, so adding a constant per
  # output channel to the stored first-layer kernel leaves the StdConv model's logits unchanged.
  # The same shift changes the plain-conv GroupNorm model's logits (the shift adds a multiple of
  # each patch's pixel sum, which varies across the image, so GN cannot remove it).
  small_batches = _import("small_batches")
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 1)).astype(np.float32)
  for kind, invariant in (("StdConv + GroupNorm", True), ("GroupNorm", False)):
    model = small_batches.ConvNet(kind=kind)
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    params = variables["params"]
    (first,) = [name for name in params if name.endswith("Conv_0")]
    kernel = params[first]["kernel"]
    shifted = {**params, first: {**params[first], "kernel": kernel + np.linspace(1, 2, 16)}}
    logits = model.apply(variables, x, train=False)
    logits_shifted = model.apply({**variables, "params": shifted}, x, train=False)
    assert np.allclose(logits, logits_shifted, atol=1e-4) == invariant, kind
