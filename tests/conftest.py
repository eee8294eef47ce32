"""Test configuration: eight CPU devices for the multi-device tests.

XLA reads the flag when JAX initializes its backends, so it is set here,
before any test module imports jax.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402  (after the flag)
import pytest  # noqa: E402


@pytest.fixture(params=["eager", "jit"])
def run(request):
  """Calls a function eagerly or under `jax.jit` (keyword arguments static)."""
  if request.param == "eager":
    return lambda f, *args, **kwargs: f(*args, **kwargs)

  def jitted(f, *args, **kwargs):
    return jax.jit(lambda *a: f(*a, **kwargs))(*args)

  return jitted
