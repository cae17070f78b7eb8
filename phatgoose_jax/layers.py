"""T5X-compatible layers (`t5x/examples/t5/layers.py` conventions).

Every parameter is created with `param_with_axes` and named exactly as in T5X, so T5X/HF-converted
checkpoints load unchanged and T5X's partitioner can shard them. Parameters are float32; the
activation dtype is configurable.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax import lax

from phatgoose_jax import adapters
from phatgoose_jax.adapters import AdapterConfig

param_with_axes = nn_partitioning.param_with_axes
with_sharding_constraint = nn_partitioning.with_sharding_constraint

Array = jax.Array
Initializer = Callable[..., Array]

default_embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
attention_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

# Mask value T5X turns a 0 in a mask into.
MASK_BIAS = -1e10


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------

def activation_fn(name: str) -> Callable[[Array], Array]:
  if name == "linear":
    return lambda x: x
  if name == "gelu":  # tanh approximation, HF `gelu_new`
    return functools.partial(nn.gelu, approximate=True)
  if name == "gelu_exact":
    return functools.partial(nn.gelu, approximate=False)
  if name == "relu":
    return nn.relu
  if name == "silu":
    return nn.silu
  raise ValueError(f"unknown activation {name!r}")


def rms_norm(x: Array, scale: Array, epsilon: float, dtype) -> Array:
  """T5 layer norm: no mean subtraction, no bias, computed in float32."""
  x32 = jnp.asarray(x, jnp.float32)  # [..., d]
  mean2 = jnp.mean(lax.square(x32), axis=-1, keepdims=True)
  y = x32 * lax.rsqrt(mean2 + epsilon)
  return jnp.asarray(y, dtype) * jnp.asarray(scale, dtype)


def relative_position_bucket(relative_position, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128):
  """T5's bucketing of `memory_position - query_position` (T5X `_relative_position_bucket`).

  Half the buckets are exact small distances, the rest log-spaced up to `max_distance`.
  Works on numpy and jax arrays alike.
  """
  xp = jnp if isinstance(relative_position, jax.Array) else np
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = xp.abs(n)
  else:
    n = xp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # The eps keeps exact powers from landing one bucket low through float rounding (T5X does the same).
  val_if_large = max_exact + (
      xp.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
      / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = xp.minimum(val_if_large, num_buckets - 1)
  return ret + xp.where(is_small, n, val_if_large)


def make_attention_mask(query_input: Array, key_input: Array, pairwise_fn=jnp.multiply,
                        extra_batch_dims: int = 0, dtype=jnp.float32) -> Array:
  """[batch, 1, q_len, kv_len] mask from per-position query and key indicators."""
  mask = pairwise_fn(jnp.expand_dims(query_input, axis=-1), jnp.expand_dims(key_input, axis=-2))
  mask = jnp.expand_dims(mask, axis=-3)
  mask = jnp.expand_dims(mask, axis=tuple(range(extra_batch_dims)))
  return mask.astype(dtype)


def make_causal_mask(x: Array, extra_batch_dims: int = 0, dtype=jnp.float32) -> Array:
  idxs = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return make_attention_mask(idxs, idxs, jnp.greater_equal, extra_batch_dims=extra_batch_dims, dtype=dtype)


def combine_masks(*masks: Array | None, dtype=jnp.float32) -> Array | None:
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  mask = masks[0]
  for other in masks[1:]:
    mask = jnp.logical_and(mask, other)
  return mask.astype(dtype)


def combine_biases(*biases: Array | None) -> Array | None:
  biases = [b for b in biases if b is not None]
  if not biases:
    return None
  out = biases[0]
  for b in biases[1:]:
    out = out + b
  return out


def make_decoder_mask(decoder_target_tokens: Array, dtype, decoder_causal_attention: Array | None = None,
                      decoder_segment_ids: Array | None = None) -> Array:
  """Causal, non-padding (target > 0) and same-segment mask for decoder self-attention."""
  masks = []
  causal_mask = make_causal_mask(decoder_target_tokens)
  if decoder_causal_attention is not None:
    # Prefix-LM style: full attention inside the "inputs" part.
    inputs_mask = make_attention_mask(decoder_causal_attention, decoder_causal_attention, jnp.logical_and)
    masks.append(jnp.logical_or(causal_mask, inputs_mask).astype(dtype))
  else:
    masks.append(causal_mask)
  masks.append(make_attention_mask(decoder_target_tokens > 0, decoder_target_tokens > 0, dtype=dtype))
  if decoder_segment_ids is not None:
    masks.append(make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal, dtype=dtype))
  return combine_masks(*masks, dtype=dtype)


def mask_to_bias(mask: Array, dtype) -> Array:
  return lax.select(mask > 0, jnp.full(mask.shape, 0.0).astype(dtype), jnp.full(mask.shape, MASK_BIAS).astype(dtype))


def dot_product_attention(query: Array, key: Array, value: Array, bias: Array | None = None,
                          dropout_rng=None, dropout_rate: float = 0.0, deterministic: bool = False,
                          dtype=jnp.float32, float32_logits: bool = False) -> Array:
  """Attention without 1/sqrt(d) (T5 folds it into the query initializer).

  query [batch, q_len, heads, head_dim], key/value [batch, kv_len, heads, head_dim],
  bias broadcastable to [batch, heads, q_len, kv_len]. Returns [batch, q_len, heads, head_dim].
  """
  if float32_logits:
    query = query.astype(jnp.float32)
    key = key.astype(jnp.float32)
  attn_weights = jnp.einsum("bqhd,bkhd->bhqk", query, key)  # [batch, heads, q_len, kv_len]
  if bias is not None:
    attn_weights = attn_weights + bias.astype(attn_weights.dtype)
  attn_weights = jax.nn.softmax(attn_weights).astype(dtype)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    dropout_shape = list(attn_weights.shape)
    dropout_shape[-2] = 1  # same mask for every query position
    keep = jax.random.bernoulli(dropout_rng, keep_prob, dropout_shape)
    keep = jnp.broadcast_to(keep, attn_weights.shape)
    attn_weights = attn_weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))
  return jnp.einsum("bhqk,bkhd->bqhd", attn_weights, value.astype(dtype))


def _normalize_axes(axes: Iterable[int], ndim: int) -> tuple[int, ...]:
  return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


def _canonicalize_tuple(x) -> tuple:
  return tuple(x) if isinstance(x, Iterable) else (x,)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class DenseGeneral(nn.Module):
  """Linear map over one or more input axes with a 2-D `kernel` [prod(in), prod(features)].

  The kernel is stored flattened (T5X does so for Adafactor's factorization) and reshaped at call time.
  With an `adapter` whose sites match this module's path, the adapter's parameters sit beside `kernel`
  and its output is added (see adapters.py).
  """
  features: int | Sequence[int]
  axis: int | Sequence[int] = -1
  dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init
  kernel_axes: tuple[str, ...] = ()
  adapter: AdapterConfig | None = None

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    features = _canonicalize_tuple(self.features)
    axis = _normalize_axes(_canonicalize_tuple(self.axis), inputs.ndim)
    kernel_in_shape = tuple(inputs.shape[ax] for ax in axis)
    kernel_param_shape = (int(np.prod(kernel_in_shape)), int(np.prod(features)))
    kernel = param_with_axes("kernel", self.kernel_init, kernel_param_shape, jnp.float32, axes=self.kernel_axes)
    kernel = jnp.reshape(jnp.asarray(kernel, self.dtype), kernel_in_shape + features)
    inputs = jnp.asarray(inputs, self.dtype)
    contract_ind = tuple(range(len(axis)))
    y = lax.dot_general(inputs, kernel, ((axis, contract_ind), ((), ())))
    if self.adapter is not None and self.adapter.applies_to("/".join(self.path)):
      if axis != tuple(range(inputs.ndim - len(axis), inputs.ndim)):
        raise ValueError(f"adapter sites need trailing contracted axes, got axis={axis} for {self.path}")
      u = inputs.reshape(inputs.shape[:inputs.ndim - len(axis)] + (kernel_param_shape[0],))  # [..., d_in]
      delta = adapters.site_delta(self, u, kernel_param_shape[1], self.kernel_axes, self.adapter)  # [..., d_out]
      y = y + delta.reshape(y.shape).astype(y.dtype)
    return y


class Embed(nn.Module):
  """Token embedding with `attend` for tied output logits."""
  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  attend_dtype: jnp.dtype | None = None
  embedding_init: Initializer = default_embed_init
  one_hot: bool = False

  def setup(self):
    self.embedding = param_with_axes("embedding", self.embedding_init, (self.num_embeddings, self.features),
                                     jnp.float32, axes=("vocab", "embed"))

  def __call__(self, inputs: Array) -> Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"Embed expects integer token ids, got dtype {inputs.dtype}")
    if self.one_hot:  # one-hot matmul partitions well under SPMD; a gather is cheaper on one device
      iota = lax.iota(jnp.int32, self.num_embeddings)
      one_hot = jnp.array(inputs[..., jnp.newaxis] == iota, dtype=self.dtype)
      output = jnp.dot(one_hot, jnp.asarray(self.embedding, self.dtype))
    else:
      output = jnp.asarray(self.embedding, self.dtype)[inputs]
      output = with_sharding_constraint(output, ("batch", "length", "embed"))
    return output

  def attend(self, query: Array) -> Array:
    dtype = self.attend_dtype if self.attend_dtype is not None else self.dtype
    return jnp.dot(query, jnp.asarray(self.embedding, dtype).T)


class LayerNorm(nn.Module):
  """T5 RMS layer norm (T5X calls it LayerNorm; the parameter is `scale`)."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param_with_axes("scale", self.scale_init, (x.shape[-1],), jnp.float32, axes=("embed",))
    return rms_norm(x, scale, self.epsilon, self.dtype)


class RelativePositionBiases(nn.Module):
  """One table [heads, buckets] per stack, shared by all its layers.

  `__call__(qlen, klen, bidirectional)` returns [1, heads, qlen, klen]. In decode mode it returns the
  single row of the current step, [1, heads, 1, klen], and keeps the step in the `cache` collection.
  """
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: jnp.dtype
  embedding_init: Initializer = relpos_init

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool = True, decode: bool = False) -> Array:
    rel_embedding = param_with_axes("rel_embedding", self.embedding_init, (self.num_heads, self.num_buckets),
                                    jnp.float32, axes=("heads", "relpos_buckets"))
    if decode and self.has_variable("cache", "cache_index"):
      cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
      step = cache_index.value
      cache_index.value = step + 1
      relative_position = jnp.arange(klen, dtype=jnp.int32)[None, :] - step  # [1, klen]
      rp_bucket = relative_position_bucket(relative_position, bidirectional, self.num_buckets, self.max_distance)
    else:
      if decode:  # first (initializing) decode call: create the step counter
        self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
      context_position = np.arange(qlen, dtype=np.int32)[:, None]
      memory_position = np.arange(klen, dtype=np.int32)[None, :]
      rp_bucket = relative_position_bucket(memory_position - context_position, bidirectional, self.num_buckets,
                                           self.max_distance)
    # The gather is a one-hot contraction, which partitions cleanly along heads.
    bucket_iota = lax.broadcasted_iota(jnp.int32, (self.num_buckets, 1, 1), 0)
    rp_bucket_one_hot = jnp.array(jnp.asarray(rp_bucket)[jnp.newaxis, ...] == bucket_iota, dtype=self.dtype)
    values = lax.dot_general(jnp.asarray(rel_embedding, self.dtype), rp_bucket_one_hot,
                             (((1,), (0,)), ((), ())))  # [heads, qlen, klen]
    return values[jnp.newaxis, ...]


class MultiHeadDotProductAttention(nn.Module):
  """T5X multi-head attention with a KV cache for incremental decoding.

  Cache (collection `cache`), T5X's layout: `cached_key`/`cached_value` [batch, heads, head_dim, length]
  and a scalar `cache_index`. Self-attention appends one position per step. Cross-attention
  (`cross_attention=True`) projects the encoder output once, at the first step, and reuses it.
  """
  num_heads: int
  head_dim: int
  dtype: jnp.dtype = jnp.float32
  dropout_rate: float = 0.0
  kernel_init: Initializer = attention_kernel_init
  float32_logits: bool = False
  cross_attention: bool = False
  adapter: AdapterConfig | None = None

  def _projection(self, name: str, init: Initializer) -> nn.Module:
    return DenseGeneral(features=(self.num_heads, self.head_dim), axis=-1, kernel_axes=("embed", "joined_kv"),
                        kernel_init=init, dtype=self.dtype, adapter=self.adapter, name=name)

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array | None = None, bias: Array | None = None,
               *, enable_dropout: bool = True, decode: bool = False) -> Array:
    depth_scaling = jnp.sqrt(self.head_dim).astype(self.dtype)

    def query_init(*args):
      return self.kernel_init(*args) / depth_scaling

    query = self._projection("query", query_init)(inputs_q)  # [batch, q_len, heads, head_dim]
    query = with_sharding_constraint(query, ("batch", "length", "heads", "kv"))

    if decode and self.cross_attention and self.has_variable("cache", "cached_key"):
      key, value = self._cached_cross_key_value(inputs_kv)
    else:
      key = self._projection("key", self.kernel_init)(inputs_kv)
      value = self._projection("value", self.kernel_init)(inputs_kv)
      key = with_sharding_constraint(key, ("batch", "length", "heads", "kv"))
      value = with_sharding_constraint(value, ("batch", "length", "heads", "kv"))
      if decode and self.cross_attention:  # initializing call: create the cache
        self._cross_cache_variables(inputs_kv)
      elif decode:
        key, value, mask, bias = self._append_to_self_attention_cache(query, key, value, mask, bias)

    if mask is not None:
      bias = combine_biases(mask_to_bias(mask, self.dtype), bias)
    dropout_rng = None
    if enable_dropout and self.dropout_rate > 0.0:
      dropout_rng = self.make_rng("dropout")
    x = dot_product_attention(query, key, value, bias=bias, dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                              deterministic=not enable_dropout, dtype=self.dtype,
                              float32_logits=self.float32_logits)
    return DenseGeneral(features=inputs_q.shape[-1], axis=(-2, -1), kernel_init=self.kernel_init,
                        kernel_axes=("joined_kv", "embed"), dtype=self.dtype, adapter=self.adapter, name="out")(x)

  def _append_to_self_attention_cache(self, query, key, value, mask, bias):
    is_initialized = self.has_variable("cache", "cached_key")
    swap = lambda x: x[:-3] + tuple(x[i] for i in (-2, -1, -3))  # [b, l, h, d] -> [b, h, d, l]
    cached_key = self.variable("cache", "cached_key", jnp.zeros, swap(key.shape), key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, swap(value.shape), value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
    if not is_initialized:  # the initializing call only creates the cache
      return key, value, mask, bias
    batch, num_heads, head_dim, length = cached_key.value.shape
    expected = (batch, 1, num_heads, head_dim)
    if expected != query.shape:
      raise ValueError(f"autoregressive cache expects a query of shape {expected}, got {query.shape}")
    cur_index = cache_index.value
    one_key = jnp.moveaxis(key, -3, -1)  # [batch, heads, head_dim, 1]
    one_value = jnp.moveaxis(value, -3, -1)
    cached_key.value = lax.dynamic_update_slice(cached_key.value, one_key.astype(cached_key.value.dtype),
                                                (0, 0, 0, cur_index))
    cached_value.value = lax.dynamic_update_slice(cached_value.value, one_value.astype(cached_value.value.dtype),
                                                  (0, 0, 0, cur_index))
    cache_index.value = cur_index + 1
    key = jnp.moveaxis(cached_key.value, -1, -3)  # [batch, length, heads, head_dim]
    value = jnp.moveaxis(cached_value.value, -1, -3)
    # Attend only to positions filled so far.
    mask = combine_masks(mask, jnp.broadcast_to(jnp.arange(length) <= cur_index, (batch, 1, 1, length)))
    if bias is not None and bias.shape[-2] != 1:  # a full [.., len, len] bias: take this step's row
      bias = lax.dynamic_slice_in_dim(bias, cur_index, 1, axis=-2)
    return key, value, mask, bias

  def _cross_cache_variables(self, inputs_kv):
    batch, kv_len = inputs_kv.shape[:2]
    cache_shape = (batch, self.num_heads, self.head_dim, kv_len)
    cached_key = self.variable("cache", "cached_key", jnp.zeros, cache_shape, self.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, cache_shape, self.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
    if cached_key.value.shape != cache_shape:
      raise ValueError(f"cross-attention cache holds encoder states of shape {cached_key.value.shape}, "
                       f"but the encoder output passed gives {cache_shape}")
    return cached_key, cached_value, cache_index

  def _cached_cross_key_value(self, inputs_kv):
    cached_key, cached_value, cache_index = self._cross_cache_variables(inputs_kv)

    def project(module, x, old_k, old_v):
      del old_k, old_v
      k = module._projection("key", module.kernel_init)(x)  # [batch, kv_len, heads, head_dim]
      v = module._projection("value", module.kernel_init)(x)
      return jnp.moveaxis(k, -3, -1).astype(module.dtype), jnp.moveaxis(v, -3, -1).astype(module.dtype)

    def reuse(module, x, old_k, old_v):
      del module, x
      return old_k, old_v

    # The encoder output does not change while decoding: project it at the first step only.
    k, v = nn.cond(cache_index.value == 0, project, reuse, self, inputs_kv, cached_key.value, cached_value.value)
    cached_key.value, cached_value.value = k, v
    cache_index.value = cache_index.value + 1
    return jnp.moveaxis(k, -1, -3), jnp.moveaxis(v, -1, -3)


class MlpBlock(nn.Module):
  """Transformer MLP: (gated) activations, dropout, output projection. `wi` or `wi_0, wi_1, ...`."""
  intermediate_dim: int = 2048
  activations: Sequence[str] = ("relu",)
  kernel_init: Initializer = default_kernel_init
  intermediate_dropout_rate: float = 0.1
  dtype: jnp.dtype = jnp.float32
  adapter: AdapterConfig | None = None

  @nn.compact
  def __call__(self, inputs: Array, enable_dropout: bool = True) -> Array:
    activations = []
    for idx, act in enumerate(self.activations):
      name = "wi" if len(self.activations) == 1 else f"wi_{idx}"
      x = DenseGeneral(self.intermediate_dim, dtype=self.dtype, kernel_init=self.kernel_init,
                       kernel_axes=("embed", "mlp"), adapter=self.adapter, name=name)(inputs)
      activations.append(activation_fn(act)(x))
    x = functools.reduce(lambda a, b: a * b, activations)  # [batch, length, mlp]
    x = nn.Dropout(rate=self.intermediate_dropout_rate, broadcast_dims=(-2,))(x, deterministic=not enable_dropout)
    x = with_sharding_constraint(x, ("batch", "length", "mlp"))
    return DenseGeneral(inputs.shape[-1], dtype=self.dtype, kernel_init=self.kernel_init,
                        kernel_axes=("mlp", "embed"), adapter=self.adapter, name="wo")(x)
