"""Float64 NumPy references for the modern normalizations, written from the papers.

Nothing here imports jaxnorm. The plain normalizations inside (layer, RMS,
group, instance, batch norm) come from :mod:`reference`; what is new is
written from each paper's equations:

* FiLM: Perez, Strub, de Vries, Dumoulin & Courville (2018), Eq. (1)-(2),
  with the ``1 + gamma`` parametrization.
* adaLN-Zero: Peebles & Xie (2023), "Scalable Diffusion Models with
  Transformers", Section 3.2 and Figure 3.
* Class-conditional batch norm: de Vries et al. (2017), Eq. (2)-(3); Miyato &
  Koyama (2018), Section 3.
* AdaIN: Huang & Belongie (2017), Eq. (8).
* QK-norm: Dehghani et al. (2023), Section 3.1 (layer norm), and its RMS form.
* DyT: Zhu, Chen, He, LeCun & Liu (2025), Eq. (1) and Algorithm 1.
* Weight standardization: Qiao et al. (2019), Eq. (5)-(6).
* Scaled weight standardization: Brock, De & Smith (2021), Eq. (2).
* FRN + TLU: Singh & Krishnan (2020), Eq. (1)-(4).
* Population moments: the definition, over the concatenated data.
"""

from __future__ import annotations

import numpy as np

import reference as ref
from reference import f64


def _cond_proj(cond, kernel, bias, x_ndim, parts):
  p = f64(cond) @ f64(kernel) + f64(bias)
  p = p.reshape(p.shape[:-1] + (1,) * (x_ndim - p.ndim) + p.shape[-1:])
  return np.split(p, parts, axis=-1)


def plain_norm(x, norm, *, eps, num_groups=None):
  if norm == "layer":
    return ref.layer_norm(x, eps=eps)
  if norm == "rms":
    return ref.rms_norm(x, eps=eps)
  if norm == "group":
    return ref.group_norm(x, num_groups=num_groups, eps=eps)
  if norm == "instance":
    return ref.instance_norm(x, eps=eps)
  return f64(x)


def film(x, cond, kernel, bias, *, norm="layer", eps=1e-6, num_groups=None):
  """FiLM(F | gamma, beta) = (1 + gamma) * norm(F) + beta, [gamma, beta] = c W + b."""
  gamma, beta = _cond_proj(cond, kernel, bias, np.ndim(x), 2)
  return (1.0 + gamma) * plain_norm(x, norm, eps=eps, num_groups=num_groups) + beta


def adaln_zero(x, cond, kernel, bias, *, eps=1e-6):
  """DiT: shift, scale, gate = c W + b; h = LN(x) (1 + scale) + shift."""
  shift, scale, gate = _cond_proj(cond, kernel, bias, np.ndim(x), 3)
  return ref.layer_norm(x, eps=eps) * (1.0 + scale) + shift, gate


def conditional_batch_norm_train(x, labels, scale, bias, *, eps=1e-5):
  """BN's x_hat with the batch statistics, then gamma[y_n] x_hat + beta[y_n]."""
  x_hat, mu, var = ref.batch_norm_train(x, eps=eps)
  labels = np.asarray(labels)
  shape = (x_hat.shape[0],) + (1,) * (x_hat.ndim - 2) + (x_hat.shape[-1],)
  return (f64(scale)[labels].reshape(shape) * x_hat
          + f64(bias)[labels].reshape(shape)), mu, var


def adain(content, style, *, eps=1e-5):
  """sigma(y) (x - mu(x)) / sigma(x) + mu(y), per example and channel over space."""
  c, s = f64(content), f64(style)
  axes_c, axes_s = tuple(range(1, c.ndim - 1)), tuple(range(1, s.ndim - 1))
  mu_c, mu_s = c.mean(axes_c, keepdims=True), s.mean(axes_s, keepdims=True)
  sd_c = np.sqrt(((c - mu_c) ** 2).mean(axes_c, keepdims=True) + eps)
  sd_s = np.sqrt(((s - mu_s) ** 2).mean(axes_s, keepdims=True) + eps)
  return sd_s * (c - mu_c) / sd_c + mu_s


def qk_norm(q, k, q_scale=None, k_scale=None, *, kind="rms", eps=1e-6):
  """Per position and head, over head_dim (the last axis)."""
  norm = ref.rms_norm if kind == "rms" else ref.layer_norm
  qn = norm(q, eps=eps) * (1.0 if q_scale is None else f64(q_scale))
  kn = norm(k, eps=eps) * (1.0 if k_scale is None else f64(k_scale))
  return qn, kn


def attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v for (B, L, H, D) inputs, per head."""
  q, k, v = f64(q), f64(k), f64(v)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits -= logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def dyt(x, alpha, scale=None, bias=None):
  """DyT(x) = gamma * tanh(alpha x) + beta."""
  y = np.tanh(f64(alpha) * f64(x))
  if scale is not None:
    y = y * f64(scale)
  if bias is not None:
    y = y + f64(bias)
  return y


def weight_standardization(w, *, eps=1e-6):
  """W_hat[:, i] = (W[:, i] - mu_i) / sqrt(sigma_i^2 + eps), over the fan-in (all but last axis)."""
  w2 = f64(w).reshape(-1, np.shape(w)[-1])
  mu = w2.mean(0)
  var = ((w2 - mu) ** 2).mean(0)
  return ((w2 - mu) / np.sqrt(var + eps)).reshape(np.shape(w))


def scaled_weight_standardization(w, gain=None, *, gamma=1.0, eps=1e-4):
  """W_hat = gain * gamma (W - mu) / (sigma sqrt(N)), N the fan-in; sigma^2 N floored at eps."""
  w2 = f64(w).reshape(-1, np.shape(w)[-1])
  n = w2.shape[0]
  mu = w2.mean(0)
  var = ((w2 - mu) ** 2).mean(0)
  out = gamma * (w2 - mu) / np.sqrt(np.maximum(n * var, eps))
  if gain is not None:
    out = out * f64(gain)
  return out.reshape(np.shape(w))


def frn(x, scale=None, bias=None, tau=None, *, eps=1e-6):
  """nu2 = mean over space of x^2; y = gamma x / sqrt(nu2 + eps) + beta; z = max(y, tau)."""
  x = f64(x)
  axes = tuple(range(1, x.ndim - 1))
  nu2 = (x ** 2).mean(axes, keepdims=True) if axes else x ** 2
  y = x / np.sqrt(nu2 + f64(eps))
  if scale is not None:
    y = y * f64(scale)
  if bias is not None:
    y = y + f64(bias)
  if tau is not None:
    y = np.maximum(y, f64(tau))
  return y


def population_moments(xs, *, axis=-1, unbiased=False):
  """Mean and variance of each feature over all of ``xs`` (a list of batches) at once."""
  x = np.concatenate([np.moveaxis(f64(b), axis, -1).reshape(-1, np.shape(b)[axis])
                      for b in xs])
  return x.mean(0), x.var(0, ddof=1 if unbiased else 0)


def numeric_grad(f, *args, h=1e-6):
  """Central differences, in float64, of the scalar ``f(*args)`` w.r.t. each argument."""
  args = [f64(a).copy() for a in args]
  grads = []
  for a in args:
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
      old = a[i]
      a[i] = old + h
      up = f(*args)
      a[i] = old - h
      down = f(*args)
      a[i] = old
      g[i] = (up - down) / (2 * h)
    grads.append(g)
  return grads
