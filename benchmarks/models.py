"""``run.py --models``: full jitted training steps of three small Flax models.

Each model is written once in ``flax.linen`` with its normalization layer as a
field, then built twice: with Flax's own norm modules and with
``jaxnorm.linen``'s drop-ins. Both share one set of initial variables (the
variable trees are identical). A training step is forward, backward, an optax
Adam update and, for batch norm, the new ``batch_stats``; it is one
``jax.jit``-compiled function.

Reported per model: the step time of each (side by side, interleaved rounds,
see ``timing.py``) and their ratio; the compile time (trace, lower and compile
of a fresh ``jax.jit`` of a fresh step function, alternating the two libraries,
median); and the compiled step's temporary memory
(``memory_analysis().temp_size_in_bytes``, the peak scratch of the step).

Models (Flax's layers around the norms):

* ResNet-18 for CIFAR (He et al., 2016): 3x3 stem, four stages of two basic
  blocks, BatchNorm after every convolution, on 32x32x3 images, 10 classes.
* Pre-LN transformer (Xiong et al., 2020): a stack of blocks
  ``x + attn(norm(x))``, ``x + mlp(norm(x))`` and a final norm, with
  LayerNorm or RMSNorm, next-token cross-entropy on random tokens.
* UNet block (as in diffusion models): GroupNorm-SiLU-conv residual blocks, a
  strided downsample, a middle block, a nearest upsample with a skip
  concatenation, regressing random targets.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import timing

import jaxnorm.linen

WARMUP = 2  # untimed steps per library before the timed rounds

# ----------------------------------------------------------------------------
# Models.

class BasicBlock(nn.Module):
  filters: int
  strides: int
  norm: Callable[..., Any]

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(self.norm, use_running_average=not train)
    y = nn.Conv(self.filters, (3, 3), self.strides, padding=1, use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.filters, (3, 3), padding=1, use_bias=False)(y)
    y = norm()(y)
    if x.shape != y.shape:
      x = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  norm: Callable[..., Any]
  width: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(x)
    x = nn.relu(self.norm(use_running_average=not train)(x))
    for stage in range(4):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2 ** stage, strides, self.norm)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class TransformerBlock(nn.Module):
  norm: Callable[..., Any]
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x):
    h = self.norm()(x)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    x = x + nn.MultiHeadDotProductAttention(self.heads)(h, h, mask=mask)
    h = self.norm()(x)
    h = nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp)(h)))
    return x + h


class Transformer(nn.Module):
  norm: Callable[..., Any]
  vocab: int = 512
  dim: int = 256
  heads: int = 4
  layers: int = 4

  @nn.compact
  def __call__(self, tokens, train: bool):
    del train
    x = nn.Embed(self.vocab, self.dim)(tokens)
    for _ in range(self.layers):
      x = TransformerBlock(self.norm, self.heads, 4 * self.dim)(x)
    return nn.Dense(self.vocab)(self.norm()(x))


class ResBlock(nn.Module):
  norm: Callable[..., Any]
  channels: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.channels, (3, 3), padding=1)(nn.silu(self.norm()(x)))
    h = nn.Conv(self.channels, (3, 3), padding=1)(nn.silu(self.norm()(h)))
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1))(x)
    return x + h


class UNetBlock(nn.Module):
  norm: Callable[..., Any]
  channels: int = 64

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    c, out_channels = self.channels, x.shape[-1]
    skip = ResBlock(self.norm, c)(nn.Conv(c, (3, 3), padding=1)(x))
    h = nn.Conv(2 * c, (3, 3), strides=2, padding=1)(skip)
    h = ResBlock(self.norm, 2 * c)(h)
    h = ResBlock(self.norm, 2 * c)(h)
    n, hh, ww, ch = h.shape
    h = jax.image.resize(h, (n, 2 * hh, 2 * ww, ch), "nearest")
    h = ResBlock(self.norm, c)(jnp.concatenate([h, skip], axis=-1))
    return nn.Conv(out_channels, (3, 3), padding=1)(nn.silu(self.norm()(h)))


# ----------------------------------------------------------------------------
# Configurations: (name, model class, kwargs, {lib: norm}, make_batch, loss).

def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def configs(quick):
  key = jax.random.PRNGKey(1)
  k1, k2 = jax.random.split(key)
  b = 2 if quick else 8

  def images(shape):
    return jax.random.normal(k1, shape, jnp.float32)

  bn = {"flax": functools.partial(nn.BatchNorm, momentum=0.9),
        "jaxnorm": functools.partial(jaxnorm.linen.BatchNorm, momentum=0.9)}
  ln = {"flax": nn.LayerNorm, "jaxnorm": jaxnorm.linen.LayerNorm}
  rms = {"flax": nn.RMSNorm, "jaxnorm": jaxnorm.linen.RMSNorm}
  gn = {"flax": functools.partial(nn.GroupNorm, num_groups=32),
        "jaxnorm": functools.partial(jaxnorm.linen.GroupNorm, num_groups=32)}
  seq = 64 if quick else 128
  tok = jax.random.randint(k1, (b, seq + 1), 0, 512)
  tf_kw = dict(dim=128, layers=2) if quick else {}
  res_kw = dict(width=16) if quick else {}
  side = 16 if quick else 32
  unet_kw = dict(channels=32) if quick else {}
  unet_x = images((b // 2 or 1, side, side, 3))
  unet_t = jax.random.normal(k2, unet_x.shape)
  cifar = images((b, 32, 32, 3))
  labels = jax.random.randint(k2, (b,), 0, 10)
  return [
      (f"ResNet-18 CIFAR, BatchNorm, batch {b}", ResNet18, res_kw, bn, cifar,
       lambda out: _xent(out, labels)),
      (f"pre-LN transformer, LayerNorm, {b}x{seq}", Transformer, tf_kw, ln, tok[:, :-1],
       lambda out: _xent(out, tok[:, 1:])),
      (f"pre-LN transformer, RMSNorm, {b}x{seq}", Transformer, tf_kw, rms, tok[:, :-1],
       lambda out: _xent(out, tok[:, 1:])),
      (f"UNet block, GroupNorm, batch {unet_x.shape[0]} x{side}x{side}", UNetBlock,
       unet_kw, gn, unet_x, lambda out: jnp.mean((out - unet_t) ** 2)),
  ]


def make_step(model, tx, loss_of):
  """A fresh training-step function: (params, stats, opt_state, x) -> new ones, loss."""
  def step(params, stats, opt_state, x):
    def loss_fn(params):
      out, upd = model.apply({"params": params, **stats}, x, train=True,
                             mutable=list(stats))
      return loss_of(out), upd
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss
  return step


# ----------------------------------------------------------------------------
# Running and formatting.

def _compile_step(step, args):
  """Compiles ``step`` for ``args``; returns the executable and the seconds compiling took."""
  t0 = time.perf_counter()
  c = jax.jit(step).lower(*args).compile()
  return c, time.perf_counter() - t0


def run(quick, repeats, compiles, only, log=print):
  rows = []
  log(header())
  for name, cls, kw, norms, x, loss_of in configs(quick):
    if only and only.lower() not in name.lower():
      continue
    models = {lib: cls(norm=norm, **kw) for lib, norm in norms.items()}
    variables = models["flax"].init(jax.random.PRNGKey(0), x, train=True)
    params = variables["params"]
    stats = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.adam(1e-3)
    args = (params, stats, tx.init(params), x)
    compiled, ctimes = {}, {lib: [] for lib in models}
    for i in range(compiles):
      for lib in (list(models) if i % 2 == 0 else list(models)[::-1]):
        compiled[lib], t = _compile_step(make_step(models[lib], tx, loss_of), args)
        ctimes[lib].append(t)
    losses = {lib: float(c(*args)[-1]) for lib, c in compiled.items()}
    calls = {lib: functools.partial(c, *args) for lib, c in compiled.items()}
    med, samples = timing.time_interleaved(calls, repeats, warmup=WARMUP, min_sample=0)
    row = dict(name=name, t=med, ratio=timing.paired_ratio(samples, "jaxnorm", "flax"),
               compile={k: statistics.median(v) for k, v in ctimes.items()},
               temp={k: timing.temp_bytes(c) for k, c in compiled.items()},
               loss_diff=abs(losses["jaxnorm"] - losses["flax"]))
    rows.append(row)
    log(fmt_row(row))
  return rows


def header() -> str:
  return ("| model | jaxnorm step ms | flax step ms | step jaxnorm/flax | compile s jaxnorm / flax"
          " | compile jaxnorm/flax | temp MiB jaxnorm / flax | loss difference |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")


def fmt_row(r) -> str:
  t, c, m = r["t"], r["compile"], r["temp"]
  return (f"| {r['name']} | {t['jaxnorm'] * 1e3:.1f} | {t['flax'] * 1e3:.1f} | {r['ratio']:.2f} | "
          f"{c['jaxnorm']:.1f} / {c['flax']:.1f} | {c['jaxnorm'] / c['flax']:.2f} | "
          f"{m['jaxnorm'] / 2**20:.1f} / {m['flax'] / 2**20:.1f} | {r['loss_diff']:.1e} |")
