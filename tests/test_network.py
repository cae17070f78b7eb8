"""The network: T5X's exact parameter tree, masks, packing, dtypes, dropout and the decode cache."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import partitioning as nn_partitioning

from phatgoose_jax import layers
from phatgoose_jax.config import model_size_config
from phatgoose_jax.model import EncoderDecoderModel
from phatgoose_jax.network import Transformer
from helpers import assert_decoding_matches_teacher_forcing


def t5x_xl_table():
  """T5X's T5.1.1 XL parameter table (conventions §1.2), expanded over the 24+24 layers."""
  E, V, J, M, H = 2048, 32128, 2048, 5120, 32
  attn = {f"{p}/kernel": ((E, J), ("embed", "joined_kv")) for p in ("query", "key", "value")}
  attn["out/kernel"] = ((J, E), ("joined_kv", "embed"))
  mlp = {"mlp/wi_0/kernel": ((E, M), ("embed", "mlp")), "mlp/wi_1/kernel": ((E, M), ("embed", "mlp")),
         "mlp/wo/kernel": ((M, E), ("mlp", "embed"))}
  norm = ((E,), ("embed",))
  table = {"token_embedder/embedding": ((V, E), ("vocab", "embed")),
           "encoder/relpos_bias/rel_embedding": ((H, 32), ("heads", "relpos_buckets")),
           "decoder/relpos_bias/rel_embedding": ((H, 32), ("heads", "relpos_buckets")),
           "encoder/encoder_norm/scale": norm, "decoder/decoder_norm/scale": norm,
           "decoder/logits_dense/kernel": ((E, V), ("embed", "vocab"))}
  for i in range(24):
    enc = f"encoder/layers_{i}"
    table[f"{enc}/pre_attention_layer_norm/scale"] = norm
    table[f"{enc}/pre_mlp_layer_norm/scale"] = norm
    table.update({f"{enc}/attention/{k}": v for k, v in attn.items()})
    table.update({f"{enc}/{k}": v for k, v in mlp.items()})
    dec = f"decoder/layers_{i}"
    for n in ("pre_self_attention_layer_norm", "pre_cross_attention_layer_norm", "pre_mlp_layer_norm"):
      table[f"{dec}/{n}/scale"] = norm
    table.update({f"{dec}/self_attention/{k}": v for k, v in attn.items()})
    table.update({f"{dec}/encoder_decoder_attention/{k}": v for k, v in attn.items()})
    table.update({f"{dec}/{k}": v for k, v in mlp.items()})
  return table


def test_xl_parameter_tree_equals_t5x_table():
  config = model_size_config("xl")
  module = Transformer(config)
  tokens = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False))
  assert set(shapes) == {"params", "params_axes"}
  params = flax.traverse_util.flatten_dict(shapes["params"], sep="/")
  axes = nn_partitioning.get_axis_names(shapes["params_axes"])
  axes = flax.traverse_util.flatten_dict(axes, sep="/", is_leaf=lambda _, x: isinstance(x, jax.sharding.PartitionSpec))
  table = t5x_xl_table()
  assert sorted(params) == sorted(table)
  for path, (shape, names) in table.items():
    assert params[path].shape == shape, path
    assert params[path].dtype == jnp.float32, path
    assert tuple(axes[path]) == names, path
  assert sum(np.prod(s) for s, _ in table.values()) == 2_849_757_184


def test_relative_position_buckets_match_t5x_vectors():
  rel = np.array([-200, -128, -64, -32, -16, -9, -8, -7, -1, 0, 1, 7, 8, 9, 16, 32, 64, 128, 200])
  bidir = [15, 15, 14, 12, 10, 8, 8, 7, 1, 0, 17, 23, 24, 24, 26, 28, 30, 31, 31]
  causal = [31, 31, 26, 21, 16, 9, 8, 7, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
  np.testing.assert_array_equal(layers.relative_position_bucket(rel, True, 32, 128), bidir)
  np.testing.assert_array_equal(layers.relative_position_bucket(rel, False, 32, 128), causal)
  # The traced (jnp) path used while decoding gives the same buckets.
  np.testing.assert_array_equal(layers.relative_position_bucket(jnp.asarray(rel), False, 32, 128), causal)


def test_rms_norm_matches_numpy():
  x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  scale = np.linspace(0.5, 1.5, 5).astype(np.float32)
  expected = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(layers.rms_norm(x, scale, 1e-6, jnp.float32), expected, rtol=1e-6, atol=1e-6)


def test_packed_rows_equal_separate_rows(tiny_model):
  """Two examples packed into one row (segment ids) give the same logits as when run alone."""
  model, params = tiny_model
  a_in, a_tgt = [5, 6, 7, 1], [8, 9, 1]
  b_in, b_tgt = [10, 11, 1], [12, 1]
  packed = {
      "encoder_input_tokens": np.array([a_in + b_in + [0]]),
      "encoder_segment_ids": np.array([[1] * 4 + [2] * 3 + [0]]),
      "encoder_positions": np.array([[0, 1, 2, 3, 0, 1, 2, 0]]),
      "decoder_target_tokens": np.array([a_tgt + b_tgt + [0]]),
      "decoder_input_tokens": np.array([[0, 8, 9, 0, 12, 0]]),
      "decoder_segment_ids": np.array([[1] * 3 + [2] * 2 + [0]]),
      "decoder_positions": np.array([[0, 1, 2, 0, 1, 0]]),
  }
  packed_logits = model.jit_logits(params, packed)
  for tokens_in, tokens_tgt, enc_slice, dec_slice in ((a_in, a_tgt, slice(0, 4), slice(0, 3)),
                                                      (b_in, b_tgt, slice(4, 7), slice(3, 5))):
    alone = {"encoder_input_tokens": np.array([tokens_in]), "decoder_target_tokens": np.array([tokens_tgt]),
             "decoder_input_tokens": np.array([[0] + tokens_tgt[:-1]])}
    np.testing.assert_allclose(packed_logits[0, dec_slice], model.jit_logits(params, alone)[0], atol=1e-5)


def test_bfloat16_activations_keep_float32_params(tiny_model, padded_batch):
  model, params = tiny_model
  bf16 = Transformer(model.module.config.replace(dtype="bfloat16"))
  logits = EncoderDecoderModel(bf16).jit_logits(params, padded_batch)
  assert logits.dtype == jnp.float32  # the output layer computes in float32
  reference = model.jit_logits(params, padded_batch)
  valid = padded_batch["decoder_target_tokens"] > 0
  err = np.abs(np.asarray(logits) - np.asarray(reference))[valid].max()
  assert 0 < err < 0.2, err  # bf16 differs, but only by rounding


def test_dropout_only_with_rng(tiny_model, padded_batch):
  model, params = tiny_model
  noisy = EncoderDecoderModel(Transformer(model.module.config.replace(dropout_rate=0.5)))
  plain = noisy.jit_logits(params, padded_batch)
  np.testing.assert_allclose(plain, model.jit_logits(params, padded_batch), atol=1e-6)
  a = noisy.jit_logits(params, padded_batch, dropout_rng=jax.random.PRNGKey(1))
  b = noisy.jit_logits(params, padded_batch, dropout_rng=jax.random.PRNGKey(2))
  assert not np.allclose(a, b) and not np.allclose(a, plain)


def test_incremental_decoding_equals_teacher_forcing(tiny_model, padded_batch):
  """Step-by-step logits from the KV cache (self and cross attention, relpos row) equal one full pass."""
  model, params = tiny_model
  assert_decoding_matches_teacher_forcing(model, params, padded_batch, model.jit_logits(params, padded_batch))


def test_bad_shapes_are_refused(tiny_model):
  model, params = tiny_model
  with pytest.raises(ValueError, match=r"encoder_input_tokens must be \[batch, length\]"):
    model.jit_logits(params, {"encoder_input_tokens": np.ones((2, 3, 4), np.int32),
                                  "decoder_input_tokens": np.ones((2, 3), np.int32),
                                  "decoder_target_tokens": np.ones((2, 3), np.int32)})
