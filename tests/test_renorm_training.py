"""Batch renorm helps where Ioffe (2017) says it does: training at tiny batch sizes.

A one-hidden-layer MLP on scikit-learn's digits, batch size 4, evaluated in
inference mode (running statistics). With batches this small, plain batch
norm's batch statistics differ from the running ones used at inference;
renorm's r/d corrections train the network on (nearly) the inference
normalization. Same initialization, data order and optimizer for both; the
renorm limits ramp from (r_max, d_max) = (1, 0) to (3, 5) as in the paper.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import random_data
from sklearn.datasets import load_digits

import jaxnorm

HIDDEN = 64
BATCH = 4
STEPS = 300
SEEDS = (0, 1, 2)


def _data():
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm]
  return x[:1200], y[:1200], x[1200:], y[1200:]


def _forward(p, s, x, *, train, renorm, r_max=1.0, d_max=0.0):
  h = x @ p["w1"]
  if train and renorm:
    h, s = jaxnorm.batch_renorm(p["bn"], s, h, train=True, r_max=r_max, d_max=d_max)
  else:
    h, s = jaxnorm.batch_norm(p["bn"], s, h, train=train)
  return jax.nn.relu(h) @ p["w2"] + p["b2"], s


def _train_and_eval(seed, renorm, data):
  xtr, ytr, xte, yte = data
  k1, k2 = jax.random.split(jax.random.key(seed))
  bn_params, state = jaxnorm.batch_norm_init(HIDDEN)
  params = {"w1": random_data.normal(k1, (64, HIDDEN)) / 8,
            "w2": random_data.normal(k2, (HIDDEN, 10)) / 8,
            "b2": jnp.zeros(10), "bn": bn_params}
  opt = optax.sgd(0.05, momentum=0.9)
  order = np.random.default_rng(seed).permutation(len(xtr))[: STEPS * BATCH]
  xb = jnp.asarray(xtr[order].reshape(STEPS, BATCH, -1))
  yb = jnp.asarray(ytr[order].reshape(STEPS, BATCH))
  ramp = np.clip((np.arange(STEPS) - 20) / (0.4 * STEPS), 0.0, 1.0)
  r_max = jnp.asarray(1.0 + 2.0 * ramp, jnp.float32)
  d_max = jnp.asarray(5.0 * ramp, jnp.float32)

  def step(carry, inputs):
    p, s, o = carry
    x, y, rm, dm = inputs

    def loss(p):
      logits, ns = _forward(p, s, x, train=True, renorm=renorm, r_max=rm, d_max=dm)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), ns

    (_, ns), g = jax.value_and_grad(loss, has_aux=True)(p)
    u, o = opt.update(g, o, p)
    return (optax.apply_updates(p, u), ns, o), None

  @jax.jit
  def fit(params, state):
    (p, s, _), _ = jax.lax.scan(step, (params, state, opt.init(params)),
                                (xb, yb, r_max, d_max))
    logits, _ = _forward(p, s, jnp.asarray(xte), train=False, renorm=False)
    return jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(yte))

  return float(fit(params, state))


@pytest.mark.slow
def test_batch_renorm_beats_batch_norm_at_batch_size_4():
  data = _data()
  bn = np.array([_train_and_eval(s, False, data) for s in SEEDS])
  rn = np.array([_train_and_eval(s, True, data) for s in SEEDS])
  # Both learn (chance is 0.1) ...
  assert bn.min() > 0.7 and rn.min() > 0.7, (bn, rn)
  # ... and renorm's inference accuracy is higher on average over the seeds.
  assert (rn - bn).mean() >= 0.01, (bn, rn)
