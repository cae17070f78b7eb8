"""T5.1.1 encoder-decoder with T5X's module tree (`t5x/examples/t5/network.py`).

Parameter paths, shapes and logical axes are T5X's; `Transformer.__call__`, `encode` and `decode` have
T5X's signatures, so T5X's `EncoderDecoderModel` and decoding functions can drive this module.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from phatgoose_jax import layers
from phatgoose_jax.adapters import AdapterConfig
from phatgoose_jax.config import T5Config

Array = jax.Array


class EncoderLayer(nn.Module):
  config: T5Config
  adapter: AdapterConfig = AdapterConfig()

  @nn.compact
  def __call__(self, inputs: Array, encoder_mask: Array | None, encoder_bias: Array,
               enable_dropout: bool = True) -> Array:
    cfg = self.config
    dtype = cfg.activation_dtype
    deterministic = not enable_dropout
    x = layers.LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, name="pre_attention_layer_norm")(inputs)
    x = layers.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=dtype, dropout_rate=cfg.dropout_rate,
        float32_logits=cfg.float32_attention_logits, adapter=self.adapter, name="attention")(
            x, x, encoder_mask, encoder_bias, enable_dropout=enable_dropout)
    x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    x = x + inputs
    y = layers.LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, name="pre_mlp_layer_norm")(x)
    y = layers.MlpBlock(intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
                        intermediate_dropout_rate=cfg.dropout_rate, dtype=dtype, adapter=self.adapter, name="mlp")(
                            y, enable_dropout=enable_dropout)
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    return y + x


class DecoderLayer(nn.Module):
  config: T5Config
  adapter: AdapterConfig = AdapterConfig()

  @nn.compact
  def __call__(self, inputs: Array, encoded: Array, decoder_mask: Array | None, decoder_bias: Array,
               encoder_decoder_mask: Array | None, enable_dropout: bool = True, decode: bool = False) -> Array:
    cfg = self.config
    dtype = cfg.activation_dtype
    deterministic = not enable_dropout

    def attention(name: str, cross: bool):
      return layers.MultiHeadDotProductAttention(
          num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=dtype, dropout_rate=cfg.dropout_rate,
          float32_logits=cfg.float32_attention_logits, cross_attention=cross, adapter=self.adapter, name=name)

    x = layers.LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, name="pre_self_attention_layer_norm")(inputs)
    x = attention("self_attention", False)(x, x, decoder_mask, decoder_bias, enable_dropout=enable_dropout,
                                           decode=decode)
    x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
    x = x + inputs

    y = layers.LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, name="pre_cross_attention_layer_norm")(x)
    y = attention("encoder_decoder_attention", True)(y, encoded, encoder_decoder_mask,
                                                     enable_dropout=enable_dropout, decode=decode)
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    y = y + x

    z = layers.LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, name="pre_mlp_layer_norm")(y)
    z = layers.MlpBlock(intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
                        intermediate_dropout_rate=cfg.dropout_rate, dtype=dtype, adapter=self.adapter, name="mlp")(
                            z, enable_dropout=enable_dropout)
    z = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(z, deterministic=deterministic)
    return z + y


def _relpos_bias(cfg: T5Config) -> layers.RelativePositionBiases:
  return layers.RelativePositionBiases(num_buckets=cfg.relative_attention_num_buckets,
                                       max_distance=cfg.relative_attention_max_distance,
                                       num_heads=cfg.num_heads, dtype=cfg.activation_dtype, name="relpos_bias")


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module
  adapter: AdapterConfig = AdapterConfig()

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, encoder_mask: Array | None = None,
               enable_dropout: bool = True) -> Array:
    cfg = self.config
    if encoder_input_tokens.ndim != 2:
      raise ValueError(f"encoder_input_tokens must be [batch, length], got shape {encoder_input_tokens.shape}")
    x = self.shared_embedding(encoder_input_tokens.astype("int32"))
    x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=not enable_dropout)
    x = x.astype(cfg.activation_dtype)
    length = encoder_input_tokens.shape[-1]
    encoder_bias = _relpos_bias(cfg)(length, length, True)  # [1, heads, length, length]
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, self.adapter, name=f"layers_{i}")(x, encoder_mask, encoder_bias, enable_dropout=enable_dropout)
    x = layers.LayerNorm(cfg.layer_norm_epsilon, dtype=cfg.activation_dtype, name="encoder_norm")(x)
    return nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=not enable_dropout)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module
  adapter: AdapterConfig = AdapterConfig()

  @nn.compact
  def __call__(self, encoded: Array, decoder_input_tokens: Array, decoder_positions: Array | None = None,
               decoder_mask: Array | None = None, encoder_decoder_mask: Array | None = None,
               enable_dropout: bool = True, decode: bool = False, max_decode_length: int | None = None) -> Array:
    cfg = self.config
    if decoder_input_tokens.ndim != 2:
      raise ValueError(f"decoder_input_tokens must be [batch, length], got shape {decoder_input_tokens.shape}")
    deterministic = not enable_dropout
    y = self.shared_embedding(decoder_input_tokens.astype("int32"))
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    y = y.astype(cfg.activation_dtype)
    length = max_decode_length if (decode and max_decode_length) else decoder_input_tokens.shape[-1]
    # Decode mode: the bias row of the current step, [1, heads, 1, length].
    decoder_bias = _relpos_bias(cfg)(length, length, False, decode=decode)
    for i in range(cfg.num_decoder_layers):
      y = DecoderLayer(cfg, self.adapter, name=f"layers_{i}")(y, encoded, decoder_mask, decoder_bias, encoder_decoder_mask,
                                                 enable_dropout=enable_dropout, decode=decode)
    y = layers.LayerNorm(cfg.layer_norm_epsilon, dtype=cfg.activation_dtype, name="decoder_norm")(y)
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
    if cfg.logits_via_embedding:
      # T5 1.0 ties the output layer to the embedding and rescales.
      logits = self.shared_embedding.attend(y)
      logits = logits / jnp.sqrt(y.shape[-1])
    else:
      logits = layers.DenseGeneral(cfg.vocab_size, dtype=jnp.float32, kernel_axes=("embed", "vocab"),
                                   name="logits_dense")(y)
    return logits  # [batch, length, vocab], float32 unless logits_via_embedding in bf16


class Transformer(nn.Module):
  """The T5 encoder-decoder. Pad id is 0; decoder inputs start with BOS id 0.

  `adapter` says what the linear sites hold besides their frozen kernel (LoRA, gated LoRA, routed experts).
  """
  config: T5Config
  adapter: AdapterConfig = AdapterConfig()

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(num_embeddings=cfg.vocab_size, features=cfg.emb_dim,
                                       dtype=cfg.activation_dtype, attend_dtype=jnp.float32,
                                       embedding_init=nn.initializers.normal(stddev=1.0),
                                       one_hot=cfg.one_hot_embedding, name="token_embedder")
    self.encoder = Encoder(cfg, self.token_embedder, self.adapter)
    self.decoder = Decoder(cfg, self.token_embedder, self.adapter)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             enable_dropout: bool = True) -> Array:
    """[batch, length] tokens -> [batch, length, emb_dim] encoder output."""
    cfg = self.config
    dtype = cfg.activation_dtype
    encoder_mask = layers.make_attention_mask(encoder_input_tokens > 0, encoder_input_tokens > 0, dtype=dtype)
    if encoder_segment_ids is not None:
      encoder_mask = layers.combine_masks(
          encoder_mask, layers.make_attention_mask(encoder_segment_ids, encoder_segment_ids, jnp.equal, dtype=dtype),
          dtype=dtype)
    return self.encoder(encoder_input_tokens, encoder_mask, enable_dropout=enable_dropout)

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
             decoder_target_tokens: Array, encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None, decoder_positions: Array | None = None,
             enable_dropout: bool = True, decode: bool = False, max_decode_length: int | None = None) -> Array:
    """Decoder logits [batch, length, vocab]. With decode=True, one step against the `cache` collection."""
    dtype = self.config.activation_dtype
    if decode:
      # Causality comes from the cache; padding does not occur during decoding.
      decoder_mask = None
      encoder_decoder_mask = layers.make_attention_mask(jnp.ones_like(decoder_target_tokens),
                                                        encoder_input_tokens > 0, dtype=dtype)
    else:
      decoder_mask = layers.make_decoder_mask(decoder_target_tokens, dtype=dtype,
                                              decoder_segment_ids=decoder_segment_ids)
      encoder_decoder_mask = layers.make_attention_mask(decoder_target_tokens > 0, encoder_input_tokens > 0,
                                                        dtype=dtype)
    if encoder_segment_ids is not None:
      if decode:
        raise ValueError("packing (encoder_segment_ids) cannot be used during decoding")
      if decoder_segment_ids is None:
        raise ValueError("encoder_segment_ids was given without decoder_segment_ids")
      encoder_decoder_mask = layers.combine_masks(
          encoder_decoder_mask,
          layers.make_attention_mask(decoder_segment_ids, encoder_segment_ids, jnp.equal, dtype=dtype), dtype=dtype)
    return self.decoder(encoded, decoder_input_tokens=decoder_input_tokens, decoder_positions=decoder_positions,
                        decoder_mask=decoder_mask, encoder_decoder_mask=encoder_decoder_mask,
                        enable_dropout=enable_dropout, decode=decode, max_decode_length=max_decode_length)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array, decoder_target_tokens: Array,
               encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None, decoder_positions: Array | None = None, *,
               enable_dropout: bool = True, decode: bool = False, max_decode_length: int | None = None) -> Array:
    """Teacher-forced logits [batch, target_length, vocab].

    Positions are accepted for T5X compatibility; like T5X, relative attention uses array offsets, which
    equal position offsets inside a packed segment.
    """
    del encoder_positions
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids=encoder_segment_ids,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids=encoder_segment_ids, decoder_segment_ids=decoder_segment_ids,
                       decoder_positions=decoder_positions, enable_dropout=enable_dropout, decode=decode,
                       max_decode_length=max_decode_length)
