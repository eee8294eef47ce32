"""Test configuration: eight CPU devices for the multi-device tests, and one
on-disk cache of compiled programs for the run.

XLA reads the flag when JAX initializes its backends, and JAX reads its cache
settings when it is imported, so both are set here, before any test module
imports jax.

**The compilation cache.** Most of the suite's time is XLA compiling small
programs, and many tests compile the same program again: the eager and jit
runs of one check share their references, parametrized tests share layers,
the examples and documentation run in processes of their own. JAX's
persistent cache stores each compiled executable under a key of the program
and its compile options, so an identical program is compiled once per run.
The directory is new for every run (made by the first process that reads
this file, the pytest-xdist controller, and inherited by its workers and by
every process a test starts), so nothing carries over between runs, and it
is removed at exit. A cache hit returns the same executable; its
``as_text()`` and ``memory_analysis()``, which some tests read, are the
compiled program's. Set ``JAX_COMPILATION_CACHE_DIR`` to use a directory of
your own (kept), or to an empty string to compile everything.
"""

import atexit
import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="jaxnorm-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# Every program, however small or quick to compile (the defaults skip those
# compiled in under a second, most of this suite's).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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
