"""Reference formulas in float64 NumPy, written from the papers.

Nothing here imports jaxnorm: each function is the equation of its paper,
computed in float64 on whatever values it is given (float32 or bfloat16 inputs
are upcast first), so the tests compare our layers against an independent
implementation.

* Batch norm: Ioffe & Szegedy (2015), Algorithm 1, and the closed-form
  backward pass of its Section 3.
* Layer norm: Ba, Kiros & Hinton (2016), Eq. (3)-(4).
* RMS norm: Zhang & Sennrich (2019), Eq. (4).
* Group norm: Wu & He (2018), Eq. (1)-(3) and the code of its Figure 3.
* Instance norm: Ulyanov, Vedaldi & Lempitsky (2016), Eq. (2).
"""

from __future__ import annotations

import numpy as np


def f64(a):
  """Upcasts any array (bfloat16 included) to a float64 (or complex128) NumPy array."""
  a = np.asarray(a)
  if np.iscomplexobj(a):
    return a.astype(np.complex128)
  return a.astype(np.float32).astype(np.float64) if a.dtype.itemsize < 4 else a.astype(np.float64)


def _channels_last_2d(x, axis):
  """Moves the feature axis last and flattens the rest: (m, C), plus the undo."""
  x = np.moveaxis(x, axis, -1)
  shape = x.shape
  return x.reshape(-1, shape[-1]), lambda y: np.moveaxis(y.reshape(shape), -1, axis)


# Batch normalization (Ioffe & Szegedy 2015, Algorithm 1).


def batch_norm_train(x, scale=None, bias=None, *, axis=-1, eps=1e-5, mask=None, xp=np):
  """Algorithm 1 over the mini-batch of every position but the feature axis (or axes).

  Returns ``(y, mu_B, sigma2_B)`` with the biased variance ``sigma2_B`` and the
  statistics of the features' shape. ``mask`` (broadcastable to ``x``) keeps
  only the selected entries in the mini-batch (masked-out values are never
  read). ``xp=np`` computes in float64; ``xp=jax.numpy`` gives the same
  two-pass formula in the input's dtype, for autodiff references.
  """
  if xp is np:
    x = f64(x)
  feat = (axis,) if isinstance(axis, int) else tuple(axis)
  feat = tuple(a % x.ndim for a in feat)
  red = tuple(a for a in range(x.ndim) if a not in feat)
  bshape = tuple(x.shape[a] if a in feat else 1 for a in range(x.ndim))
  keep = xp.ones(x.shape, bool) if mask is None else xp.broadcast_to(xp.asarray(mask), x.shape)
  m = xp.sum(keep, axis=red, keepdims=True).astype(x.dtype)          # mini-batch size
  mu = xp.sum(xp.where(keep, x, 0), axis=red, keepdims=True) / m     # mini-batch mean
  sigma2 = xp.sum(xp.where(keep, (x - mu) ** 2, 0), axis=red, keepdims=True) / m
  y = (x - mu) / xp.sqrt(sigma2 + eps)                               # normalize
  if scale is not None:                                              # scale and shift
    y = y * xp.reshape(f64(scale) if xp is np else scale, bshape)
  if bias is not None:
    y = y + xp.reshape(f64(bias) if xp is np else bias, bshape)
  return y, xp.reshape(mu, mu.shape[:0] + tuple(x.shape[a] for a in feat)), xp.reshape(
      sigma2, tuple(x.shape[a] for a in feat))


def batch_norm_infer(x, mean, var, scale=None, bias=None, *, axis=-1, eps=1e-5):
  """Inference (Algorithm 2, step 10): ``y = gamma / sqrt(Var + eps) * (x - E) + beta``."""
  x2, undo = _channels_last_2d(f64(x), axis)
  gamma = np.ones(x2.shape[1]) if scale is None else f64(scale)
  beta = np.zeros(x2.shape[1]) if bias is None else f64(bias)
  y = gamma / np.sqrt(f64(var) + eps) * (x2 - f64(mean)) + beta
  return undo(y)


def batch_norm_input_grad(x, dy, scale=None, *, axis=-1, eps=1e-5):
  """Closed-form dL/dx of train-mode batch norm.

  From the chain rule of Ioffe & Szegedy (2015), Section 3, simplified:
  ``dx = scale * rstd / N * (N * dy - sum(dy) - xhat * sum(dy * xhat))``.
  """
  x2, undo = _channels_last_2d(f64(x), axis)
  dy2, _ = _channels_last_2d(f64(dy), axis)
  n = x2.shape[0]
  mu = x2.mean(axis=0)
  rstd = 1.0 / np.sqrt(((x2 - mu) ** 2).mean(axis=0) + eps)
  xhat = (x2 - mu) * rstd
  gamma = np.ones(x2.shape[1]) if scale is None else f64(scale)
  dx = gamma * rstd / n * (n * dy2 - dy2.sum(axis=0) - xhat * (dy2 * xhat).sum(axis=0))
  return undo(dx)


def running_average(state_mean, state_var, batch_mean, batch_var, momentum):
  """``state = momentum * state + (1 - momentum) * batch`` (Flax/Keras convention)."""
  return (momentum * f64(state_mean) + (1 - momentum) * f64(batch_mean),
          momentum * f64(state_var) + (1 - momentum) * f64(batch_var))


# Layer norm (Ba et al. 2016) and RMS norm (Zhang & Sennrich 2019).


def layer_norm(x, scale=None, bias=None, *, axes=(-1,), eps=1e-6):
  """``mu = 1/H sum a_i``, ``sigma = sqrt(1/H sum (a_i - mu)^2)`` over the hidden units."""
  x = f64(x)
  axes = tuple(a % x.ndim for a in axes)
  h = np.prod([x.shape[a] for a in axes])
  mu = x.sum(axis=axes, keepdims=True) / h
  sigma2 = ((x - mu) ** 2).sum(axis=axes, keepdims=True) / h
  y = (x - mu) / np.sqrt(sigma2 + eps)
  pshape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
  if scale is not None:
    y = y * f64(scale).reshape(pshape)
  if bias is not None:
    y = y + f64(bias).reshape(pshape)
  return y


def rms_norm(x, scale=None, *, axes=(-1,), eps=1e-6):
  """``a_bar_i = a_i / RMS(a) * g_i`` with ``RMS(a) = sqrt(1/n sum a_i^2)`` (+ eps inside)."""
  x = f64(x)
  axes = tuple(a % x.ndim for a in axes)
  n = np.prod([x.shape[a] for a in axes])
  rms = np.sqrt((x ** 2).sum(axis=axes, keepdims=True) / n + eps)
  y = x / rms
  if scale is not None:
    y = y * f64(scale).reshape([x.shape[a] if a in axes else 1 for a in range(x.ndim)])
  return y


# Group norm (Wu & He 2018) and instance norm (Ulyanov et al. 2016).


def group_norm(x, scale=None, bias=None, *, num_groups, eps=1e-6):
  """Figure 3 of Wu & He, on channels-last input ``(N, ..., C)``.

  The paper's code works on ``(N, C, H, W)``: reshape to ``(N, G, C // G, H, W)``,
  take moments over ``[2, 3, 4]``, normalize, reshape back, ``* gamma + beta``.
  """
  x = f64(x)
  n, c = x.shape[0], x.shape[-1]
  xc = np.moveaxis(x, -1, 1)                            # (N, C, spatial...)
  spatial = xc.shape[2:]
  xg = xc.reshape((n, num_groups, c // num_groups) + spatial)
  axes = tuple(range(2, xg.ndim))
  mean = xg.mean(axis=axes, keepdims=True)
  var = ((xg - mean) ** 2).mean(axis=axes, keepdims=True)
  xg = (xg - mean) / np.sqrt(var + eps)
  y = np.moveaxis(xg.reshape(xc.shape), 1, -1)
  if scale is not None:
    y = y * f64(scale)
  if bias is not None:
    y = y + f64(bias)
  return y


def instance_norm(x, scale=None, bias=None, *, eps=1e-6):
  """``y_tijk = (x_tijk - mu_ti) / sqrt(sigma_ti^2 + eps)``, per example t and channel i.

  Channels last: ``x`` is ``(N, spatial..., C)``, moments over the spatial axes.
  """
  x = f64(x)
  axes = tuple(range(1, x.ndim - 1))
  mu = x.mean(axis=axes, keepdims=True)
  sigma2 = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
  y = (x - mu) / np.sqrt(sigma2 + eps)
  if scale is not None:
    y = y * f64(scale)
  if bias is not None:
    y = y + f64(bias)
  return y


# Statistics.


def mean_var(x, axes):
  """Mean and biased variance; complex: complex mean and real ``E|x|^2 - |E x|^2``.

  Computed in two passes as ``E|x - E x|^2`` (the same number, without the
  cancellation of the one-pass form at large offsets).
  """
  x = f64(x)
  mean = x.mean(axis=axes, keepdims=True)
  var = (np.abs(x - mean) ** 2).mean(axis=axes)
  return np.squeeze(mean, axes), var


def masked_channel_moments(x, mask):
  """Per last-axis channel: mean and biased variance of the selected entries alone."""
  x = f64(x)
  mask = np.broadcast_to(np.asarray(mask), x.shape)
  means, vars_ = [], []
  for c in range(x.shape[-1]):
    v = x[..., c][mask[..., c]]
    means.append(v.mean())
    vars_.append(((v - v.mean()) ** 2).mean())
  return np.array(means), np.array(vars_)
