"""Every bad input raises the documented error, with its full message, at trace time.

Two parts: the layers' bad inputs (``CASES``), each run eagerly and under
``jax.jit`` with its arrays passed as traced arguments, and unit tests of each
check in ``jaxnorm/_src/checks.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm
from jaxnorm._src import checks

P3, S3 = jaxnorm.batch_norm_init(3)
X = jnp.ones((4, 3))

# Errors raised while tracing under `jax.jit` carry JAX's note on traceback
# filtering (PEP 678), which `match=` also sees; nothing else may follow.
_JAX_NOTE = (r"(\n-{20}\nFor simplicity, JAX has removed its internal frames from "
             r"the traceback of the following exception\. Set "
             r"JAX_TRACEBACK_FILTERING=off to include these\.)?")


def full_message(message: str) -> str:
  """`message` from the start, then at most JAX's note (added under jit);
  append "$" for a full-text `match=`."""
  return "^" + re.escape(message) + _JAX_NOTE


class Case(NamedTuple):
  fn: Callable[..., Any]  # takes the arrays as arguments
  args: tuple[Any, ...]  # the arrays: traced under jit
  error: type[Exception]
  message: str


def _bn(*, params=P3, state=S3, x=X, mask=None, **static) -> tuple:
  """Train-mode batch norm; the pytrees are arguments, `static` is closed over."""
  def fn(params, state, x, mask):
    return jaxnorm.batch_norm(params, state, x, mask=mask, **{"train": True, **static})
  return fn, (params, state, x, mask)


def _case(fn_args: tuple, error: type[Exception], message: str) -> Case:
  return Case(*fn_args, error, message)


def _fn(fn: Callable[..., Any], *args: Any) -> tuple:
  return fn, args


CASES = {
    "bn_scalar": _case(_bn(x=jnp.float32(1.0)), ValueError,
                       "`x` must have at least 1 dimension, got a scalar."),
    "ln_scalar": _case(_fn(lambda x: jaxnorm.layer_norm({}, x), jnp.float32(1.0)),
                       ValueError, "`x` must have at least 1 dimension, got a scalar."),
    "gn_rank": _case(_fn(lambda x: jaxnorm.group_norm({}, x, num_groups=2), jnp.ones(4)),
                     ValueError,
                     "`x` must have at least 2 dimensions (a batch axis first and "
                     "channels last), got shape (4,) with 1."),
    "in_rank": _case(_fn(lambda x: jaxnorm.instance_norm({}, x), jnp.ones((2, 3))),
                     ValueError,
                     "`x` must have at least 3 dimensions (batch, at least one spatial "
                     "axis, channels), got shape (2, 3) with 2."),
    "bn_axis_range": _case(_bn(axis=2), ValueError,
                           "`axis`=2 is out of range for an input with 2 dimensions; "
                           "expected values in [-2, 1]."),
    "bn_axis_bool": _case(_bn(axis=True), TypeError,
                          "`axis` must be an int or a sequence of ints, got True; a bool "
                          "is not an axis number."),
    "ln_axis_bool_in_tuple": _case(
        _fn(lambda x: jaxnorm.layer_norm({}, x, axis=(0, False)), X), TypeError,
        "`axis` must be an int or a sequence of ints, got (0, False); a bool is not an "
        "axis number."),
    "bn_params_features": _case(_bn(x=jnp.ones((4, 5))), ValueError,
                                "`x` has features of shape (5,) along axis -1 but "
                                "`params['scale']` has shape (3,); pass `axis=` to "
                                "choose the feature axis."),
    "bn_nchw_without_axis": _case(_bn(x=jnp.ones((2, 3, 4, 4))), ValueError,
                                  "`x` has features of shape (4,) along axis -1 but "
                                  "`params['scale']` has shape (3,); pass `axis=` to "
                                  "choose the feature axis."),
    "bn_state_features": _case(
        _bn(params={}, state={"mean": jnp.zeros(3), "var": jnp.ones(4)}), ValueError,
        "`x` has features of shape (3,) along axis -1 but `state['var']` has shape "
        "(4,); pass `axis=` to choose the feature axis."),
    "ln_params_features": _case(
        _fn(lambda p, x: jaxnorm.layer_norm(p, x), P3, jnp.ones((2, 5))), ValueError,
        "`x` has features of shape (5,) along axis -1 but `params['scale']` has shape "
        "(3,); pass `axis=` to choose the feature axis."),
    "gn_params_features": _case(
        _fn(lambda p, x: jaxnorm.group_norm(p, x, num_groups=2), P3, jnp.ones((2, 4))),
        ValueError,
        "`x` has features of shape (4,) along the last axis but `params['scale']` has "
        "shape (3,); group norm takes the channels last, so build `params` with "
        "`group_norm_init(4)`, or move `x`'s channels last (`jnp.moveaxis(x, 1, -1)` for "
        "NCHW)."),
    "bn_int": _case(_bn(x=jnp.ones((4, 3), jnp.int32)), TypeError,
                    "`x` must have a floating-point or complex dtype, got int32; cast it "
                    "first, for example `x.astype(jnp.float32)`."),
    "ln_int": _case(_fn(lambda x: jaxnorm.layer_norm({}, x), jnp.ones((2, 3), jnp.int8)),
                    TypeError,
                    "`x` must have a floating-point or complex dtype, got int8; cast it "
                    "first, for example `x.astype(jnp.float32)`."),
    "moments_int": _case(_fn(lambda x: jaxnorm.moments(x, 0), jnp.ones((2, 3), jnp.int32)),
                         TypeError,
                         "`x` must have a floating-point or complex dtype, got int32; "
                         "cast it first, for example `x.astype(jnp.float32)`."),
    "params_int": _case(_bn(params={"scale": jnp.ones(3, jnp.int32)}), TypeError,
                        "`params['scale']` must have a floating-point or complex dtype, "
                        "got int32; cast it first, for example "
                        "`params['scale'].astype(jnp.float32)`."),
    "state_missing_var": _case(_bn(state={"mean": jnp.zeros(3)}), ValueError,
                               "`state` is missing ['var']; it must hold 'mean' and "
                               "'var' (build it with `batch_norm_init`), got keys "
                               "['mean']."),
    "state_missing_both": _case(_bn(state={}), ValueError,
                                "`state` is missing ['mean', 'var']; it must hold 'mean' "
                                "and 'var' (build it with `batch_norm_init`), got keys "
                                "[]."),
    "state_not_dict": _case(_bn(state=None), TypeError,
                            "`state` must be a dict with keys 'mean' and 'var', got "
                            "NoneType."),
    "state_unknown_key": _case(_bn(state={**S3, "count": jnp.zeros(())}), ValueError,
                               "`state` has unexpected keys ['count']; expected keys "
                               "among ['mean', 'num_batches_tracked', 'var']."),
    "bn_eps_zero": _case(_bn(eps=0.0), ValueError, "`eps` must be > 0, got 0.0."),
    "bn_eps_jax_negative": _case(_bn(eps=jnp.float32(-1)), ValueError,
                                 "`eps` must be > 0, got -1.0."),
    "bn_eps_numpy_zero": _case(_bn(eps=np.float32(0)), ValueError,
                               "`eps` must be > 0, got 0.0."),
    "bn_eps_inf": _case(_bn(eps=float("inf")), ValueError,
                        "`eps` must be a finite number > 0, got inf."),
    "ln_eps_nan": _case(_fn(lambda x: jaxnorm.layer_norm({}, x, eps=jnp.nan), X),
                        ValueError, "`eps` must be a finite number > 0, got nan."),
    "bn_eps_string": _case(_bn(eps="1e-5"), TypeError,
                           "`eps` must be a real number, got str '1e-5'."),
    "ln_eps_negative": _case(_fn(lambda x: jaxnorm.layer_norm({}, x, eps=-1e-6), X),
                             ValueError, "`eps` must be > 0, got -1e-06."),
    "gn_eps_zero": _case(_fn(lambda x: jaxnorm.group_norm({}, x, num_groups=1, eps=0), X),
                         ValueError, "`eps` must be > 0, got 0."),
    "bn_momentum_high": _case(_bn(momentum=1.5), ValueError,
                              "`momentum` must be in [0, 1], got 1.5."),
    "bn_momentum_negative": _case(_bn(momentum=-0.1), ValueError,
                                  "`momentum` must be in [0, 1], got -0.1."),
    "bn_momentum_jax": _case(_bn(momentum=jnp.float32(1.5)), ValueError,
                             "`momentum` must be in [0, 1], got 1.5."),
    "bn_dtype_int": _case(_bn(dtype=jnp.int32), TypeError,
                          "`dtype` must be None or a floating-point or complex dtype "
                          "such as jnp.float32, got int32; an integer or bool dtype "
                          "would round the normalized values."),
    "ln_dtype_bool": _case(_fn(lambda x: jaxnorm.layer_norm({}, x, dtype=bool), X),
                           TypeError,
                           "`dtype` must be None or a floating-point or complex dtype "
                           "such as jnp.float32, got bool; an integer or bool dtype "
                           "would round the normalized values."),
    "bn_one_value_per_channel": _case(
        _bn(x=jnp.ones((1, 3))), ValueError,
        "Train-mode batch norm needs more than one value per channel to compute batch "
        "statistics, but `x` of shape (1, 3) has 1 per channel. Use `train=False`, a "
        "larger batch, or layer_norm."),
    "gn_groups_divide": _case(
        _fn(lambda x: jaxnorm.group_norm({}, x, num_groups=4), jnp.ones((2, 6))),
        ValueError,
        "`num_groups`=4 must divide the number of channels, but `x` has 6 channels; "
        "pass `num_groups=` a divisor of 6 or `group_size=`."),
    "gn_group_size_divide": _case(
        _fn(lambda x: jaxnorm.group_norm({}, x, num_groups=None, group_size=4),
            jnp.ones((2, 6))),
        ValueError,
        "`group_size`=4 must divide the number of channels, but `x` has 6 channels."),
    "gn_both_groups": _case(
        _fn(lambda x: jaxnorm.group_norm({}, x, num_groups=2, group_size=3),
            jnp.ones((2, 6))),
        ValueError,
        "Give exactly one of `num_groups` and `group_size`, got num_groups=2 and "
        "group_size=3; pass `num_groups=None` with `group_size`."),
    "gn_groups_zero": _case(
        _fn(lambda x: jaxnorm.group_norm({}, x, num_groups=0), jnp.ones((2, 6))),
        ValueError, "`num_groups` must be a positive int, got 0."),
    "gn_groups_float": _case(
        _fn(lambda x: jaxnorm.group_norm({}, x, num_groups=2.0), jnp.ones((2, 6))),
        TypeError, "`num_groups` must be a positive int, got float 2.0."),
    "bn_mask_broadcast": _case(_bn(mask=jnp.ones((3, 4), bool)), ValueError,
                               "`mask` of shape (3, 4) does not broadcast to the shape "
                               "of `x`, (4, 3)."),
    "bn_mask_grows_x": _case(_bn(mask=jnp.ones((2, 4, 3), bool)), ValueError,
                             "`mask` of shape (2, 4, 3) does not broadcast to the shape "
                             "of `x`, (4, 3)."),
    "ln_mask_broadcast": _case(
        _fn(lambda x, m: jaxnorm.layer_norm({}, x, mask=m), X, jnp.ones(4, bool)),
        ValueError,
        "`mask` of shape (4,) does not broadcast to the shape of `x`, (4, 3)."),
    "bn_mask_float": _case(_bn(mask=jnp.ones((4, 3))), TypeError,
                           "`mask` must be a boolean array, got dtype float32; use for "
                           "example `mask = lengths_mask > 0`."),
    "in_mask_int": _case(
        _fn(lambda x, m: jaxnorm.instance_norm({}, x, mask=m), jnp.ones((2, 3, 4)),
            jnp.ones((2, 3, 1), jnp.int32)),
        TypeError,
        "`mask` must be a boolean array, got dtype int32; use for example "
        "`mask = lengths_mask > 0`."),
    "moments_mask_list": _case(
        _fn(lambda x, m: jaxnorm.moments(x, 0, mask=m), X, [True] * 3), TypeError,
        "`mask` must be a boolean array, got list; use for example "
        "`mask = lengths_mask > 0`."),
    "bn_unknown_key": _case(_bn(params={**P3, "gamma": jnp.ones(3)}), ValueError,
                            "`params` has unexpected keys ['gamma']; expected keys among "
                            "['bias', 'scale'] (a missing key turns that term off)."),
    "rms_bias_key": _case(_fn(lambda p, x: jaxnorm.rms_norm(p, x), P3, X), ValueError,
                          "`params` has unexpected keys ['bias']; expected keys among "
                          "['scale'] (a missing key turns that term off)."),
    "bn_virtual_batch": _case(_bn(virtual_batch_size=3), ValueError,
                              "`virtual_batch_size`=3 must divide the batch size, but "
                              "`x` has 4 examples along axis 0."),
    "init_num_features": _case(_fn(lambda: jaxnorm.batch_norm_init(0)), ValueError,
                               "`num_features` must be positive, got 0."),
    "init_num_features_bool": _case(_fn(lambda: jaxnorm.layer_norm_init(True)),
                                    TypeError,
                                    "`num_features` must be an int or a tuple of ints, "
                                    "got True."),

    "bn_train_string": _case(_bn(train="no"), TypeError,
                             "`train` must be a Python bool, got str 'no'."),
    "bn_virtual_batch_one": _case(
        _bn(virtual_batch_size=1), ValueError,
        "`virtual_batch_size`=1 makes chunks of one example, and a chunk of one "
        "example has zero variance (a single value per feature); pass "
        "`virtual_batch_size` >= 2, or None to use the whole batch."),
    "init_num_features_string": _case(
        _fn(lambda: jaxnorm.batch_norm_init("4")), TypeError,
        "`num_features` must be an int or a tuple of ints, got '4'."),
    "init_dtype_int": _case(
        _fn(lambda: jaxnorm.batch_norm_init(3, dtype=jnp.int32)), TypeError,
        "`dtype` must be None or a floating-point or complex dtype such as "
        "jnp.float32, got int32; an integer or bool dtype would round the "
        "normalized values."),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_full_message(name):
  case = CASES[name]
  with pytest.raises(case.error, match=full_message(case.message) + "$"):
    case.fn(*case.args)


@pytest.mark.parametrize("name", sorted(CASES))
def test_errors_are_raised_at_trace_time_under_jit(name):
  # The arrays are arguments, hence tracers: a check that needed their values
  # would fail here with a tracer error instead of the message.
  case = CASES[name]
  with pytest.raises(case.error, match=full_message(case.message) + "$"):
    jax.jit(case.fn)(*case.args)


def test_traced_train_is_a_clear_error():
  message = ("`train` must be a Python bool known at trace time, because it selects "
             "the code path, but it is a traced value of dtype bool and shape (); "
             "make it static, for example with `jax.jit(f, "
             "static_argnames='train')`, or close over it.")
  f = jax.jit(lambda train: jaxnorm.batch_norm(P3, S3, X, train=train))
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    f(True)


def test_inference_mode_accepts_a_single_example():
  y, _ = jaxnorm.batch_norm(P3, S3, jnp.ones((1, 3)), train=False)
  assert y.shape == (1, 3)


def test_concrete_jax_hyperparameters_are_accepted():
  y, _ = jaxnorm.batch_norm(P3, S3, X, train=True, eps=jnp.float32(1e-5),
                            momentum=np.float32(0.9))
  assert y.shape == X.shape


def test_state_from_torch_keeps_num_batches_tracked():
  state = {**S3, "num_batches_tracked": jnp.zeros((), jnp.int32)}
  _, new_state = jaxnorm.batch_norm(P3, state, X, train=True)
  assert sorted(new_state) == ["mean", "num_batches_tracked", "var"]


# Unit tests of the checks themselves.

@pytest.mark.parametrize("value, expected", [
    (True, True), (np.bool_(False), False), (3, 3), (2.5, 2.5), (1j, 1j),
    (2**70, 2**70), (np.int8(-3), -3), (np.float32(0.5), 0.5),
    (np.array(2.0), 2.0), (jnp.float32(-1), -1.0), (jnp.array(True), True),
    (jnp.int32(7), 7), (jnp.complex64(1 + 2j), 1 + 2j),
])
def test_concrete_value_of_numbers(value, expected):
  got = checks.concrete_value(value)
  assert got == expected
  assert type(got) is type(expected)
  assert checks.is_concrete_number(value) and checks._is_concrete_number(value)


@pytest.mark.parametrize("value", [None, "1.0", [1.0], (1,), jnp.ones(2),
                                   np.ones((1,)), jnp.ones((1, 1))])
def test_concrete_value_of_non_scalars_is_none(value):
  assert checks.concrete_value(value) is None
  assert not checks.is_concrete_number(value)


def test_concrete_value_under_jit():
  seen = {}
  constant = jnp.float32(0.25)  # made outside: closed over, not traced

  def f(x):
    seen["traced"] = checks.concrete_value(x)
    seen["closed_over"] = checks.concrete_value(constant)
    seen["is_traced"] = checks.is_traced(x)
    return x

  jax.jit(f)(jnp.float32(1.0))
  assert seen == {"traced": None, "closed_over": 0.25, "is_traced": True}
  assert not checks.is_traced(jnp.float32(1.0))


@pytest.mark.parametrize("eps", [1e-5, 1, np.float64(1e-3), jnp.float32(1e-6),
                                 jnp.array(1e-5, jnp.bfloat16), jnp.int32(1)])
def test_check_eps_accepts_positive_numbers(eps):
  assert checks.check_eps(eps) is None


def test_check_eps_leaves_traced_values_alone():
  jax.jit(lambda e: checks.check_eps(e, name="epsilon") or e)(-1.0)


@pytest.mark.parametrize("eps, error, message", [
    (0.0, ValueError, "`eps` must be > 0, got 0.0."),
    (-1, ValueError, "`eps` must be > 0, got -1."),
    (jnp.float32(-1), ValueError, "`eps` must be > 0, got -1.0."),
    (np.float32(0.0), ValueError, "`eps` must be > 0, got 0.0."),
    (float("inf"), ValueError, "`eps` must be a finite number > 0, got inf."),
    (jnp.float32(jnp.inf), ValueError, "`eps` must be a finite number > 0, got inf."),
    (float("nan"), ValueError, "`eps` must be a finite number > 0, got nan."),
    ("1e-5", TypeError, "`eps` must be a real number, got str '1e-5'."),
    (None, TypeError, "`eps` must be a real number, got NoneType None."),
    (True, TypeError, "`eps` must be a real number, got bool True."),
    (1e-5j, TypeError, "`eps` must be a real number, got complex 1e-05j."),
    (jnp.ones(3), TypeError,
     "`eps` must be a real number, got an array of dtype float32 and shape (3,)."),
    (jnp.array(True), TypeError, "`eps` must be a real number, got True of dtype bool."),
])
def test_check_eps_rejects(eps, error, message):
  with pytest.raises(error, match=full_message(message) + "$"):
    checks.check_eps(eps)


def test_check_eps_names_the_argument():
  with pytest.raises(ValueError, match=full_message("`epsilon` must be > 0, got 0.") + "$"):
    checks.check_eps(0, name="epsilon")


@pytest.mark.parametrize("momentum", [0, 0.0, 0.99, 1, jnp.float32(0.9), np.float16(1.0)])
def test_check_momentum_accepts(momentum):
  assert checks.check_momentum(momentum) is None


@pytest.mark.parametrize("momentum, error, message", [
    (1.5, ValueError, "`momentum` must be in [0, 1], got 1.5."),
    (-0.1, ValueError, "`momentum` must be in [0, 1], got -0.1."),
    (jnp.float32(2), ValueError, "`momentum` must be in [0, 1], got 2.0."),
    (float("nan"), ValueError, "`momentum` must be in [0, 1], got nan."),
    (float("inf"), ValueError, "`momentum` must be in [0, 1], got inf."),
    ("0.9", TypeError, "`momentum` must be a real number, got str '0.9'."),
])
def test_check_momentum_rejects(momentum, error, message):
  with pytest.raises(error, match=full_message(message) + "$"):
    checks.check_momentum(momentum)


def test_check_at_least():
  checks.check_at_least("r_max", float("inf"), 1.0)
  checks.check_at_least("r_max", jnp.float32(1.0), 1.0)
  with pytest.raises(ValueError, match=full_message("`r_max` must be >= 1.0, got 0.5.") + "$"):
    checks.check_at_least("r_max", jnp.float32(0.5), 1.0)
  with pytest.raises(ValueError, match=full_message("`d_max` must be >= 0.0, got nan.") + "$"):
    checks.check_at_least("d_max", float("nan"), 0.0)
  with pytest.raises(TypeError, match=full_message(
      "`d_max` must be a real number, got str '5'.") + "$"):
    checks.check_at_least("d_max", "5", 0.0)


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), (np.bool_(True), True),
    (np.array(False), False), (jnp.array(True), True)])
def test_check_train_accepts_concrete_bools(value, expected):
  got = checks.check_train("train", value)
  assert got is expected


@pytest.mark.parametrize("value, message", [
    ("no", "`train` must be a Python bool, got str 'no'."),
    (1, "`train` must be a Python bool, got int 1."),
    (None, "`train` must be a Python bool, got NoneType None."),
    (jnp.ones(2, bool),
     "`train` must be a Python bool, got an array of dtype bool and shape (2,)."),
    (jnp.float32(1), "`train` must be a Python bool, got 1.0 of dtype float32."),
])
def test_check_train_rejects(value, message):
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    checks.check_train("train", value)


def test_check_train_explains_a_traced_value():
  message = ("`use_running_average` must be a Python bool known at trace time, because "
             "it selects the code path, but it is a traced value of dtype bool and "
             "shape (); make it static, for example with `jax.jit(f, "
             "static_argnames='use_running_average')`, or close over it.")
  f = jax.jit(lambda t: checks.check_train("use_running_average", t))
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    f(True)
  # Static, it is fine.
  seen = []
  jax.jit(lambda t: seen.append(checks.check_train("train", t)), static_argnums=0)(True)
  assert seen == [True]


@pytest.mark.parametrize("dtype, expected", [
    (None, None), (jnp.float32, jnp.float32), ("bfloat16", jnp.bfloat16),
    (np.float16, jnp.float16), (jnp.complex64, jnp.complex64)])
def test_check_float_dtype_accepts(dtype, expected):
  got = checks.check_float_dtype("dtype", dtype)
  assert got == (None if expected is None else jnp.dtype(expected))


@pytest.mark.parametrize("dtype, shown", [(jnp.int32, "int32"), (bool, "bool"),
                                          (np.uint8, "uint8"), ("foo", "'foo'")])
def test_check_float_dtype_rejects(dtype, shown):
  message = ("`param_dtype` must be None or a floating-point or complex dtype such as "
             f"jnp.float32, got {shown}; an integer or bool dtype would round the "
             "normalized values.")
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    checks.check_float_dtype("param_dtype", dtype)


def test_check_float_dtype_real_only():
  message = ("`dtype` must be None or a floating-point dtype such as jnp.float32, got "
             "complex64; an integer or bool dtype would round the normalized values.")
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    checks.check_float_dtype("dtype", jnp.complex64, allow_complex=False)


def test_result_dtype():
  x = jnp.ones(3, jnp.bfloat16)
  assert checks.result_dtype(x, {"scale": jnp.ones(3)}, None) == jnp.float32
  assert checks.result_dtype(x, {}, None) == jnp.bfloat16
  assert checks.result_dtype(x, {}, "float16") == jnp.float16
  with pytest.raises(TypeError, match=full_message(
      "`dtype` must be None or a floating-point or complex dtype such as jnp.float32, "
      "got int8; an integer or bool dtype would round the normalized values.") + "$"):
    checks.result_dtype(x, {}, jnp.int8)


def test_check_state_keys():
  checks.check_state_keys({"mean": 0, "var": 1}, ("mean", "var"))
  checks.check_state_keys({}, ("mean", "var"))
  with pytest.raises(ValueError, match=full_message(
      "`state` has unexpected keys ['avg', 'count']; expected keys among "
      "['mean', 'var'].") + "$"):
    checks.check_state_keys({"mean": 0, "count": 1, "avg": 2}, ("var", "mean"))


def test_check_state_with_custom_allowed_keys():
  state = {"mean": jnp.zeros(3), "var": jnp.ones(3), "step": jnp.zeros(())}
  checks.check_state(state, (3,), "along axis -1",
                     allowed=("mean", "var", "step"))
  with pytest.raises(ValueError, match=full_message(
      "`state` has unexpected keys ['step']; expected keys among ['mean', 'var'].") + "$"):
    checks.check_state(state, (3,), "along axis -1", allowed=("mean", "var"))


@pytest.mark.parametrize("axis, ndim, expected", [
    (-1, 3, (2,)), (0, 1, (0,)), ((2, 0), 3, (0, 2)), ([-1, -3], 3, (0, 2)),
    ((), 2, ()), (np.int64(1), 2, (1,))])
def test_normalize_axes_accepts(axis, ndim, expected):
  assert checks.normalize_axes("axis", axis, ndim) == expected


@pytest.mark.parametrize("axis, error, message", [
    (True, TypeError,
     "`axis` must be an int or a sequence of ints, got True; a bool is not an axis "
     "number."),
    (np.bool_(False), TypeError,
     "`axis` must be an int or a sequence of ints, got np.False_; a bool is not an "
     "axis number."),
    ((1, True), TypeError,
     "`axis` must be an int or a sequence of ints, got (1, True); a bool is not an "
     "axis number."),
    ("1", TypeError, "`axis` must be an int or a sequence of ints, got '1'."),
    (1.0, TypeError, "`axis` must be an int or a sequence of ints, got 1.0."),
    (None, TypeError, "`axis` must be an int or a sequence of ints, got None."),
    (3, ValueError,
     "`axis`=3 is out of range for an input with 3 dimensions; expected values in "
     "[-3, 2]."),
    ((0, -3), ValueError, "`axis`=(0, -3) names the same axis twice."),
])
def test_normalize_axes_rejects(axis, error, message):
  with pytest.raises(error, match=full_message(message) + "$"):
    checks.normalize_axes("axis", axis, 3)


@pytest.mark.parametrize("value, expected", [
    (3, 3), (np.int64(2), 2), (jnp.int32(4), 4), (np.array(5), 5)])
def test_check_positive_int_accepts(value, expected):
  got = checks.check_positive_int("n_steps", value)
  assert got == expected and type(got) is int


@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, "`n_steps` must be a positive int, got 0."),
    (-2, ValueError, "`n_steps` must be a positive int, got -2."),
    (jnp.int32(0), ValueError, "`n_steps` must be a positive int, got 0."),
    (2.0, TypeError, "`n_steps` must be a positive int, got float 2.0."),
    ("2", TypeError, "`n_steps` must be a positive int, got str '2'."),
    (True, TypeError, "`n_steps` must be a positive int, got bool True."),
    (None, TypeError, "`n_steps` must be a positive int, got NoneType None."),
])
def test_check_positive_int_rejects(value, error, message):
  with pytest.raises(error, match=full_message(message) + "$"):
    checks.check_positive_int("n_steps", value)


def test_check_positive_int_traced():
  message = ("`num_groups` must be a positive int, got a traced value of dtype int32 "
             "and shape (); it sets a shape, so it must be known at trace time.")
  with pytest.raises(TypeError, match=full_message(message) + "$"):
    jax.jit(lambda n: checks.check_positive_int("num_groups", n))(2)


@pytest.mark.parametrize("value, expected", [
    (4, (4,)), (np.int32(4), (4,)), ((2, 3), (2, 3)), ([2, 3], (2, 3)), ((), ())])
def test_feature_shape_accepts(value, expected):
  assert checks.feature_shape("num_features", value) == expected


@pytest.mark.parametrize("value, error, message", [
    ("4", TypeError, "`num_features` must be an int or a tuple of ints, got '4'."),
    (True, TypeError, "`num_features` must be an int or a tuple of ints, got True."),
    (4.0, TypeError, "`num_features` must be an int or a tuple of ints, got 4.0."),
    ((2, "3"), TypeError,
     "`num_features` must be an int or a tuple of ints, got (2, '3')."),
    ((2, False), TypeError,
     "`num_features` must be an int or a tuple of ints, got (2, False)."),
    (None, TypeError, "`num_features` must be an int or a tuple of ints, got None."),
    (0, ValueError, "`num_features` must be positive, got 0."),
    ((3, 0), ValueError, "`num_features` must be positive, got (3, 0)."),
])
def test_feature_shape_rejects(value, error, message):
  with pytest.raises(error, match=full_message(message) + "$"):
    checks.feature_shape("num_features", value)


def test_feature_shape_allow_zero():
  """The Flax modules build zero-feature layers; the core does not."""
  assert checks.feature_shape("num_features", 0, allow_zero=True) == (0,)
  assert checks.feature_shape("num_features", (3, 0), allow_zero=True) == (3, 0)
  with pytest.raises(ValueError, match=full_message(
      "`num_features` must be non-negative, got (3, -1).") + "$"):
    checks.feature_shape("num_features", (3, -1), allow_zero=True)


def test_check_virtual_batch_size():
  assert checks.check_virtual_batch_size(2) == 2
  assert checks.check_virtual_batch_size(np.int64(4), batch_size=8) == 4
  # One image per chunk still has H * W values per channel.
  assert checks.check_virtual_batch_size(1, values_per_example=25) == 1
  with pytest.raises(ValueError, match=full_message(
      "`virtual_batch_size`=1 makes chunks of one example, and a chunk of one example "
      "has zero variance (a single value per feature); pass `virtual_batch_size` >= 2, "
      "or None to use the whole batch.") + "$"):
    checks.check_virtual_batch_size(1)
  with pytest.raises(ValueError, match=full_message(
      "`virtual_batch_size`=3 must divide the batch size, but `x` has 8 examples along "
      "axis 1.") + "$"):
    checks.check_virtual_batch_size(3, batch_size=8, batch_axis=1)
  with pytest.raises(ValueError, match=full_message(
      "`virtual_batch_size` must be a positive int, got 0.") + "$"):
    checks.check_virtual_batch_size(0)
  with pytest.raises(TypeError, match=full_message(
      "`virtual_batch_size` must be a positive int, got str '2'.") + "$"):
    checks.check_virtual_batch_size("2")


def test_check_min_rank():
  checks.check_min_rank("x", jnp.ones(3), 1)
  with pytest.raises(ValueError, match=full_message(
      "`x` must have at least 1 dimension, got a scalar.") + "$"):
    checks.check_min_rank("x", jnp.float32(1), 1)
  with pytest.raises(ValueError, match=full_message(
      "`t` must have at least 2 dimensions, got shape (3,).") + "$"):
    checks.check_min_rank("t", jnp.ones(3), 2)
  with pytest.raises(ValueError, match=full_message(
      "`w` must have at least 2 dimensions (a matrix), got shape (3,) with 1.") + "$"):
    checks.check_min_rank("w", jnp.ones(3), 2, "a matrix")


def test_check_array():
  checks.check_array("x", jnp.ones(2, jnp.complex64))
  with pytest.raises(TypeError, match=full_message(
      "`x` must be an array, got an object of type list.") + "$"):
    checks.check_array("x", [1.0])
  with pytest.raises(TypeError, match=full_message(
      "`w` must have a floating-point dtype, got complex64; cast it first, for example "
      "`w.astype(jnp.float32)`.") + "$"):
    checks.check_array("w", jnp.ones(2, jnp.complex64), allow_complex=False)
  with pytest.raises(TypeError, match=full_message(
      "`x` must have a floating-point or complex dtype, got bool; cast it first, for "
      "example `x.astype(jnp.float32)`.") + "$"):
    checks.check_array("x", jnp.ones(2, bool))


def test_full_message_is_a_full_text_check():
  pattern = full_message("`eps` must be > 0, got 0.") + "$"
  assert re.search(pattern, "`eps` must be > 0, got 0.")
  assert not re.search(pattern, "`eps` must be > 0, got 0.0.")
  assert not re.search(pattern, "x`eps` must be > 0, got 0.")
  assert not re.search(pattern, "`eps` must be > 0, got 0. More.")
  note = ("\n--------------------\nFor simplicity, JAX has removed its internal frames "
          "from the traceback of the following exception. Set "
          "JAX_TRACEBACK_FILTERING=off to include these.")
  assert re.search(pattern, "`eps` must be > 0, got 0." + note)
  assert not re.search(pattern, "`eps` must be > 0, got 0." + note + "\nMore.")
