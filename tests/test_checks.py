"""Every bad input raises the documented error, with its full message, at trace time."""

import re

import jax
import jax.numpy as jnp
import pytest

import jaxnorm

P3, S3 = jaxnorm.batch_norm_init(3)
X = jnp.ones((4, 3))


def _bn(**kwargs):
  args = dict(params=P3, state=S3, x=X)
  args.update({k: kwargs.pop(k) for k in ("params", "state", "x") if k in kwargs})
  return lambda: jaxnorm.batch_norm(args["params"], args["state"], args["x"],
                                    **{"train": True, **kwargs})


CASES = {
    "bn_scalar": (_bn(x=jnp.float32(1.0)), ValueError,
                  "`x` must have at least 1 dimension, got a scalar."),
    "ln_scalar": (lambda: jaxnorm.layer_norm({}, jnp.float32(1.0)), ValueError,
                  "`x` must have at least 1 dimension, got a scalar."),
    "gn_rank": (lambda: jaxnorm.group_norm({}, jnp.ones(4), num_groups=2), ValueError,
                "`x` must have at least 2 dimensions (a batch axis first and channels "
                "last), got shape (4,) with 1."),
    "in_rank": (lambda: jaxnorm.instance_norm({}, jnp.ones((2, 3))), ValueError,
                "`x` must have at least 3 dimensions (batch, at least one spatial axis, "
                "channels), got shape (2, 3) with 2."),
    "bn_axis_range": (_bn(axis=2), ValueError,
                      "`axis`=2 is out of range for an input with 2 dimensions; expected "
                      "values in [-2, 1]."),
    "bn_params_features": (_bn(x=jnp.ones((4, 5))), ValueError,
                           "`x` has features of shape (5,) along axis -1 but "
                           "`params['scale']` has shape (3,); pass `axis=` to choose the "
                           "feature axis."),
    "bn_nchw_without_axis": (_bn(x=jnp.ones((2, 3, 4, 4))), ValueError,
                             "`x` has features of shape (4,) along axis -1 but "
                             "`params['scale']` has shape (3,); pass `axis=` to choose "
                             "the feature axis."),
    "bn_state_features": (_bn(params={}, state={"mean": jnp.zeros(3), "var": jnp.ones(4)}),
                          ValueError,
                          "`x` has features of shape (3,) along axis -1 but "
                          "`state['var']` has shape (4,); pass `axis=` to choose the "
                          "feature axis."),
    "ln_params_features": (lambda: jaxnorm.layer_norm(P3, jnp.ones((2, 5))), ValueError,
                           "`x` has features of shape (5,) along axis -1 but "
                           "`params['scale']` has shape (3,); pass `axis=` to choose the "
                           "feature axis."),
    "gn_params_features": (lambda: jaxnorm.group_norm(P3, jnp.ones((2, 4)), num_groups=2),
                           ValueError,
                           "`x` has features of shape (4,) along the last axis but "
                           "`params['scale']` has shape (3,); pass `axis=` to choose the "
                           "feature axis."),
    "bn_int": (_bn(x=jnp.ones((4, 3), jnp.int32)), TypeError,
               "`x` must have a floating-point or complex dtype, got int32; cast it "
               "first, for example `x.astype(jnp.float32)`."),
    "ln_int": (lambda: jaxnorm.layer_norm({}, jnp.ones((2, 3), jnp.int8)), TypeError,
               "`x` must have a floating-point or complex dtype, got int8; cast it "
               "first, for example `x.astype(jnp.float32)`."),
    "moments_int": (lambda: jaxnorm.moments(jnp.ones((2, 3), jnp.int32), 0), TypeError,
                    "`x` must have a floating-point or complex dtype, got int32; cast it "
                    "first, for example `x.astype(jnp.float32)`."),
    "params_int": (_bn(params={"scale": jnp.ones(3, jnp.int32)}), TypeError,
                   "`params['scale']` must have a floating-point or complex dtype, got "
                   "int32; cast it first, for example "
                   "`params['scale'].astype(jnp.float32)`."),
    "state_missing_var": (_bn(state={"mean": jnp.zeros(3)}), ValueError,
                          "`state` is missing ['var']; it must hold 'mean' and 'var' "
                          "(build it with `batch_norm_init`), got keys ['mean']."),
    "state_missing_both": (_bn(state={}), ValueError,
                           "`state` is missing ['mean', 'var']; it must hold 'mean' and "
                           "'var' (build it with `batch_norm_init`), got keys []."),
    "state_not_dict": (_bn(state=None), TypeError,
                       "`state` must be a dict with keys 'mean' and 'var', got NoneType."),
    "bn_eps_zero": (_bn(eps=0.0), ValueError, "`eps` must be > 0, got 0.0."),
    "ln_eps_negative": (lambda: jaxnorm.layer_norm({}, X, eps=-1e-6), ValueError,
                        "`eps` must be > 0, got -1e-06."),
    "gn_eps_zero": (lambda: jaxnorm.group_norm({}, X, num_groups=1, eps=0), ValueError,
                    "`eps` must be > 0, got 0."),
    "bn_momentum_high": (_bn(momentum=1.5), ValueError,
                         "`momentum` must be in [0, 1], got 1.5."),
    "bn_momentum_negative": (_bn(momentum=-0.1), ValueError,
                             "`momentum` must be in [0, 1], got -0.1."),
    "bn_one_value_per_channel": (
        _bn(x=jnp.ones((1, 3))), ValueError,
        "Train-mode batch norm needs more than one value per channel to compute batch "
        "statistics, but `x` of shape (1, 3) has 1 per channel. Use `train=False`, a "
        "larger batch, or layer_norm."),
    "gn_groups_divide": (lambda: jaxnorm.group_norm({}, jnp.ones((2, 6)), num_groups=4),
                         ValueError,
                         "`num_groups`=4 must divide the number of channels, but `x` has "
                         "6 channels; pass `num_groups=` a divisor of 6 or "
                         "`group_size=`."),
    "gn_group_size_divide": (lambda: jaxnorm.group_norm({}, jnp.ones((2, 6)),
                                                        num_groups=None, group_size=4),
                             ValueError,
                             "`group_size`=4 must divide the number of channels, but `x` "
                             "has 6 channels."),
    "gn_both_groups": (lambda: jaxnorm.group_norm({}, jnp.ones((2, 6)), num_groups=2,
                                                  group_size=3),
                       ValueError,
                       "Give exactly one of `num_groups` and `group_size`, got "
                       "num_groups=2 and group_size=3; pass `num_groups=None` with "
                       "`group_size`."),
    "gn_groups_zero": (lambda: jaxnorm.group_norm({}, jnp.ones((2, 6)), num_groups=0),
                       ValueError, "`num_groups` must be a positive int, got 0."),
    "bn_mask_broadcast": (_bn(mask=jnp.ones((3, 4), bool)), ValueError,
                          "`mask` of shape (3, 4) does not broadcast to the shape of `x`, "
                          "(4, 3)."),
    "bn_mask_grows_x": (_bn(mask=jnp.ones((2, 4, 3), bool)), ValueError,
                        "`mask` of shape (2, 4, 3) does not broadcast to the shape of "
                        "`x`, (4, 3)."),
    "ln_mask_broadcast": (lambda: jaxnorm.layer_norm({}, X, mask=jnp.ones(4, bool)),
                          ValueError,
                          "`mask` of shape (4,) does not broadcast to the shape of `x`, "
                          "(4, 3)."),
    "bn_mask_float": (_bn(mask=jnp.ones((4, 3))), TypeError,
                      "`mask` must be a boolean array, got dtype float32; use for example "
                      "`mask = lengths_mask > 0`."),
    "in_mask_int": (lambda: jaxnorm.instance_norm({}, jnp.ones((2, 3, 4)),
                                                  mask=jnp.ones((2, 3, 1), jnp.int32)),
                    TypeError,
                    "`mask` must be a boolean array, got dtype int32; use for example "
                    "`mask = lengths_mask > 0`."),
    "moments_mask_list": (lambda: jaxnorm.moments(X, 0, mask=[True] * 3), TypeError,
                          "`mask` must be a boolean array, got list; use for example "
                          "`mask = lengths_mask > 0`."),
    "bn_unknown_key": (_bn(params={**P3, "gamma": jnp.ones(3)}), ValueError,
                       "`params` has unexpected keys ['gamma']; expected keys among "
                       "['bias', 'scale'] (a missing key turns that term off)."),
    "rms_bias_key": (lambda: jaxnorm.rms_norm(P3, X), ValueError,
                     "`params` has unexpected keys ['bias']; expected keys among "
                     "['scale'] (a missing key turns that term off)."),
    "bn_virtual_batch": (_bn(virtual_batch_size=3), ValueError,
                         "`virtual_batch_size`=3 must divide the batch size, but `x` has "
                         "4 examples along axis 0."),
    "init_num_features": (lambda: jaxnorm.batch_norm_init(0), ValueError,
                          "`num_features` must be positive, got 0."),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_full_message(name):
  fn, error, message = CASES[name]
  with pytest.raises(error, match=re.escape(message) + "$"):
    fn()


@pytest.mark.parametrize("name", ["bn_params_features", "bn_eps_zero", "bn_mask_float",
                                  "bn_one_value_per_channel", "gn_groups_divide"])
def test_errors_are_raised_at_trace_time_under_jit(name):
  fn, error, message = CASES[name]
  # JAX appends a note on traceback filtering after a newline.
  with pytest.raises(error, match=re.escape(message) + r"(\n|$)"):
    jax.jit(fn)()


def test_inference_mode_accepts_a_single_example():
  y, _ = jaxnorm.batch_norm(P3, S3, jnp.ones((1, 3)), train=False)
  assert y.shape == (1, 3)
