"""Several processes on JAX's own distributed runtime equal one process on the gathered batch.

One pair of subprocesses (tests/_distributed_worker.py) joins
``jax.distributed`` on localhost with gloo CPU collectives, 2 devices each, and
runs every layer under ``jax.shard_map`` with ``axis_name`` and as a sharded
``jax.jit``. Here each output, gradient and running average is compared with
the float64 formula of its paper on the whole (gathered) batch, and the two
processes must hold bitwise-identical results.

The data make it hard: the per-process means differ by 1e5, the masked cases
leave the second process without a single selected entry, and in one of them
the masked-out entries hold NaN and inf (padding), which must reach no output,
statistic or gradient.

The launch has a hard timeout (both processes are killed and the test fails
with their output) and retries on a new port when the coordinator's port was
taken between choosing it and binding it.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import _distributed_worker as worker
import numpy as np
import pytest

import reference as ref

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 300          # one launch; a healthy run takes 15-45 s on 2 busy cores
ATTEMPTS = 3             # only port clashes are retried
REPO = Path(__file__).resolve().parent.parent
EPS_BN, EPS_LN = 1e-5, 1e-6
_PORT_CLASH = ("address already in use", "failed to bind", "bind failed", "errno 98")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(out_dir: Path) -> list[tuple[int, str]]:
  """Runs the workers once; returns each one's (return code, output).

  When one process fails the others are stopped at once (they would wait for it in
  the runtime until its own timeout); after TIMEOUT_S all are killed and the test fails.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  port = _free_port()
  logs = [out_dir / f"process_{i}.log" for i in range(NUM_PROCESSES)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:       # a file, not a pipe: a full pipe would block the worker
      procs.append(subprocess.Popen(
          [sys.executable, str(REPO / "tests" / "_distributed_worker.py"), str(i),
           str(NUM_PROCESSES), str(port), str(out_dir)],
          env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    timed_out = time.monotonic() > deadline
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = [(p.returncode, log.read_text()) for p, log in zip(procs, logs, strict=True)]
  if timed_out:
    pytest.fail(f"the {NUM_PROCESSES} worker processes did not finish within {TIMEOUT_S} s "
                "(a hang in a collective?); their output:\n"
                + "\n-----\n".join(out[-3000:] for _, out in outputs))
  return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(inputs, results of process 0, results of process 1), from one launch."""
  for attempt in range(ATTEMPTS):
    out_dir = tmp_path_factory.mktemp(f"distributed{attempt}")
    outputs = _launch(out_dir)
    if all(code == 0 for code, _ in outputs):
      break
    clash = any(s in out.lower() for _, out in outputs for s in _PORT_CLASH)
    if not clash or attempt == ATTEMPTS - 1:
      pytest.fail("a worker process failed:\n" + "\n-----\n".join(
          f"process {i}, exit code {code}:\n{out[-4000:]}"
          for i, (code, out) in enumerate(outputs)))
  results = [dict(np.load(out_dir / f"process_{i}.npz")) for i in range(NUM_PROCESSES)]
  inputs = {k[len("in/"):]: v for k, v in results[0].items() if k.startswith("in/")}
  return inputs, results


def _close(actual, expected, rtol):
  """Relative error against the largest reference value (entries near 0 included)."""
  expected = np.asarray(expected, np.float64)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol,
                             atol=rtol * max(float(np.max(np.abs(expected))), 1e-30))


# Float64 references on the gathered batch, from the papers' formulas.


def _bn_reference(x, w, scale, bias, state_mean, state_var, *, mask=None, renorm=None):
  """Batch norm (or renorm, Ioffe 2017) of each feature over its selected rows.

  Gradients of L = sum over selected entries of y * w: the closed form of
  Ioffe & Szegedy's Section 3 with scale * r for renorm (r and d are constants
  to the gradient); rows left out get no gradient.
  """
  x, w = ref.f64(x), ref.f64(w)
  sel = np.ones(x.shape, bool) if mask is None else np.asarray(mask)
  out = {k: np.zeros(x.shape) for k in ("y", "dx")}
  out.update({k: np.zeros(x.shape[1]) for k in ("dscale", "dbias", "mean", "var")})
  for c in range(x.shape[1]):
    rows = sel[:, c]
    xc, wc = x[rows, c:c + 1], w[rows, c:c + 1]
    _, mu, var = ref.batch_norm_train(xc, eps=EPS_BN)
    xhat = (xc - mu) / np.sqrt(var + EPS_BN)
    r, d = np.ones(1), np.zeros(1)
    if renorm is not None:
      sigma = np.sqrt(ref.f64(state_var[c]) + EPS_BN)
      r = np.clip(np.sqrt(var + EPS_BN) / sigma, 1 / renorm["r_max"], renorm["r_max"])
      d = np.clip((mu - ref.f64(state_mean[c])) / sigma, -renorm["d_max"], renorm["d_max"])
    out["y"][rows, c] = ((xhat * r + d) * ref.f64(scale[c]) + ref.f64(bias[c]))[:, 0]
    out["dx"][rows, c] = ref.batch_norm_input_grad(xc, wc, ref.f64(scale[c:c + 1]) * r,
                                                   eps=EPS_BN)[:, 0]
    out["dscale"][c] = np.sum(wc * (xhat * r + d))
    out["dbias"][c] = np.sum(wc)
    out["mean"][c], out["var"][c] = mu[0], var[0]
  out["mean"], out["var"] = ref.running_average(state_mean, state_var, out["mean"], out["var"],
                                                worker.MOMENTUM)
  return out


def _ghost_reference(x, w, scale, bias, k):
  """Ghost batch norm (Hoffer et al. 2017): batch norm of each chunk of k rows of the
  gathered batch; the running averages take the mean of the chunks' statistics."""
  chunks = [_bn_reference(x[i:i + k], w[i:i + k], scale, bias, np.zeros(x.shape[1]),
                          np.ones(x.shape[1])) for i in range(0, x.shape[0], k)]
  out = {key: np.concatenate([c[key] for c in chunks]) for key in ("y", "dx")}
  out.update({key: np.sum([c[key] for c in chunks], axis=0) for key in ("dscale", "dbias")})
  # Each chunk's state is 0.9 * init + 0.1 * stats: their mean is that of the mean stats.
  out.update({key: np.mean([c[key] for c in chunks], axis=0) for key in ("mean", "var")})
  return out


def _normalize_vjp(x, dxhat, axes, eps):
  """For xhat = (x - mean) / sqrt(var + eps) over `axes`: (xhat, dL/dx given dL/dxhat).

  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), the means over `axes`.
  """
  mu = x.mean(axis=axes, keepdims=True)
  rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + eps)
  xhat = (x - mu) * rstd
  dx = rstd * (dxhat - dxhat.mean(axis=axes, keepdims=True)
               - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))
  return xhat, dx


def _gn_reference(x, w, scale, bias, groups):
  x, w, scale = ref.f64(x), ref.f64(w), ref.f64(scale)
  n, h, wd, c = x.shape
  grouped = lambda a: a.reshape(n, h, wd, groups, c // groups)
  xhat, dx = _normalize_vjp(grouped(x), grouped(w * scale), (1, 2, 4), EPS_LN)
  xhat, dx = xhat.reshape(x.shape), dx.reshape(x.shape)
  return {"y": ref.group_norm(x, scale, bias, num_groups=groups, eps=EPS_LN), "dx": dx,
          "dscale": np.sum(w * xhat, axis=(0, 1, 2)), "dbias": np.sum(w, axis=(0, 1, 2))}


def _ln_reference(x, w, scale, bias):
  x, w, scale = ref.f64(x), ref.f64(w), ref.f64(scale)
  xhat, dx = _normalize_vjp(x, w * scale, (-1,), EPS_LN)
  return {"y": ref.layer_norm(x, scale, bias, eps=EPS_LN), "dx": dx,
          "dscale": np.sum(w * xhat, axis=0), "dbias": np.sum(w, axis=0)}


def _reference(case, d):
  zeros, ones = np.zeros(worker.FEATURES), np.ones(worker.FEATURES)
  if case in ("bn", "linen", "nnx"):
    return _bn_reference(d["x_offset"], d["w"], d["scale"], d["bias"], zeros, ones)
  if case in ("bn_mask", "bn_nan"):
    return _bn_reference(d["x_offset"], d["w"], d["scale"], d["bias"], zeros, ones,
                         mask=d["mask"])
  if case == "renorm":
    return _bn_reference(d["x"], d["w"], d["scale"], d["bias"], d["state_mean"],
                         d["state_var"], renorm=worker.RENORM)
  if case == "ghost":
    return _ghost_reference(d["x"], d["w"], d["scale"], d["bias"], worker.GHOST)
  if case == "gn":
    return _gn_reference(d["x_img"], d["w_img"], d["scale_img"], d["bias_img"], worker.GN_GROUPS)
  assert case == "ln_cols"
  return _ln_reference(d["x_wide"], d["w_wide"], d["scale_wide"], d["bias_wide"])


CASES = ["bn", "bn_mask", "bn_nan", "ghost", "renorm", "gn", "ln_cols", "linen", "nnx"]
STATEFUL = {"bn", "bn_mask", "bn_nan", "ghost", "renorm", "linen", "nnx"}


def test_the_runtime_spans_both_processes(runs):
  _, results = runs
  for r in results:
    assert int(r["meta/devices"]) == NUM_PROCESSES * DEVICES_PER_PROCESS


def test_processes_hold_identical_results(runs):
  _, (first, *others) = runs
  keys = sorted(k for k in first if not k.startswith(("in/", "meta/")))
  assert len(keys) == 2 * (6 * len(STATEFUL) + 4 * (len(CASES) - len(STATEFUL)))
  for other in others:
    assert sorted(k for k in other if not k.startswith(("in/", "meta/"))) == keys
    for k in keys:
      np.testing.assert_array_equal(other[k], first[k], err_msg=k)


def test_inputs_are_as_described(runs):
  # The per-process means differ by 1e5, and the mask leaves process 1 nothing.
  d, _ = runs
  half = d["x"].shape[0] // NUM_PROCESSES
  gap = d["x_offset"][half:].mean() - d["x_offset"][:half].mean()
  assert 0.99e5 < gap < 1.01e5
  assert not d["mask"][half:].any() and d["mask"][:half].any()
  assert np.isnan(d["x_padded"][half:]).all() and np.isinf(d["x_padded"]).any()
  np.testing.assert_array_equal(d["x_padded"][d["mask"]], d["x_offset"][d["mask"]])


@pytest.mark.parametrize("how", ["smap", "jit"])
@pytest.mark.parametrize("case", CASES)
def test_equals_one_process_on_the_gathered_batch(runs, case, how):
  d, (res, *_) = runs
  expected = _reference(case, d)
  got = lambda k: res[f"{case}/{how}/{k}"]
  selected = d["mask"] if case in ("bn_mask", "bn_nan") else np.ones(got("y").shape, bool)
  _close(got("y")[selected], expected["y"][selected], rtol=1e-5)
  _close(got("dx"), expected["dx"], rtol=1e-4)
  _close(got("dparams/scale"), expected["dscale"], rtol=1e-4)
  _close(got("dparams/bias"), expected["dbias"], rtol=1e-4)
  if case in STATEFUL:
    _close(got("state/mean"), expected["mean"], rtol=1e-5)
    _close(got("state/var"), expected["var"], rtol=1e-5)


@pytest.mark.slow
def test_distributed_example_on_two_processes(tmp_path):
  # The launcher starts the processes, checks they agree bitwise, and compares with one
  # process on one device; it exits non-zero when either check fails.
  cmd = [sys.executable, str(REPO / "examples" / "distributed.py"), "--num-processes", "2",
         "--quick", "--steps", "10", "--out", str(tmp_path), "--timeout", str(TIMEOUT_S)]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  try:
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S + 120)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"examples/distributed.py did not finish within {TIMEOUT_S + 120} s:\n{e.stdout}")
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  lines = done.stdout.splitlines()
  assert "all 2 processes hold identical params and batch_stats: yes" in lines
  assert any(line.startswith("equals a single-process run on one device with the same global "
                             "batch: yes") for line in lines), done.stdout
  # Each process prints its own summary line to the shared stdout, which gloo's C++ logging also
  # writes to: search the whole text, not line starts (one run in a loaded suite found a single
  # "process " line start; both processes had finished and agreed).
  reported = sorted(set(re.findall(r"process (\d+)/2: ", done.stdout)))
  assert reported == ["0", "1"], done.stdout
