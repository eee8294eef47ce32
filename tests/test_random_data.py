"""tests/random_data.py gives jax.random's values, eagerly and under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import random_data


def test_equal_to_jax_random_eagerly():
  key = jax.random.key(5)
  for shape in [(), 7, (3, 5), (300,)]:  # the last one longer than the shortest draw
    np.testing.assert_array_equal(random_data.normal(key, shape),
                                  jax.random.normal(key, shape))
  np.testing.assert_array_equal(random_data.normal(key, (4, 5), jnp.bfloat16),
                                jax.random.normal(key, (4, 5), jnp.bfloat16))
  np.testing.assert_array_equal(random_data.uniform(key, (4, 5), minval=-2.0, maxval=3.0),
                                jax.random.uniform(key, (4, 5), minval=-2.0, maxval=3.0))
  np.testing.assert_array_equal(random_data.bernoulli(key, 0.7, (4, 5)),
                                jax.random.bernoulli(key, 0.7, (4, 5)))
  y = random_data.normal(jax.random.PRNGKey(1), (2, 3))  # raw uint32 keys too
  np.testing.assert_array_equal(y, jax.random.normal(jax.random.PRNGKey(1), (2, 3)))
  assert y.dtype == jnp.float32 and y.shape == (2, 3)


def test_equal_to_jax_random_under_jit_and_vmap():
  keys = jax.random.split(jax.random.key(6), 3)
  got = jax.jit(jax.vmap(lambda k: random_data.normal(k, (3, 5))))(keys)
  want = jax.vmap(lambda k: jax.random.normal(k, (3, 5)))(keys)
  np.testing.assert_array_equal(got, want)
