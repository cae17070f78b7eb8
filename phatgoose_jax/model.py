"""The encoder-decoder model around the network: loss, scoring and decoding (T5X `EncoderDecoderModel` API).

Batches are dicts of seqio `EncDecFeatureConverter` features: `encoder_input_tokens`,
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights`, and when packed
`{encoder,decoder}_segment_ids` / `_positions`.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from phatgoose_jax import decoding

Array = jax.Array
Batch = Mapping[str, Array]
PyTree = Any

DECODE_METHODS = ("greedy", "sample", "beam")


def cross_entropy_with_logits(logits: Array, targets: Array, z_loss: float = 0.0) -> tuple[Array, Array]:
  """Per-token cross entropy against soft targets, plus T5's z-loss term (both [batch, length])."""
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  loss = log_z - jnp.sum(targets * logits, axis=-1)
  z = z_loss * jnp.square(log_z)
  return loss + z, z


def token_log_likelihoods(logits: Array, targets: Array) -> Array:
  """log p(target_t | ...) for every position: logits [batch, length, vocab] -> [batch, length]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def weighted_cross_entropy(logits: Array, targets: Array, weights: Array | None, label_smoothing: float = 0.0,
                           z_loss: float = 0.0) -> tuple[Array, Array, Array]:
  """T5X `compute_weighted_cross_entropy`: (summed loss, summed z-loss, weight sum)."""
  vocab_size = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low_confidence = (1.0 - confidence) / (vocab_size - 1)
  normalizing_constant = -(confidence * jnp.log(confidence) +
                           (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20))
  soft_targets = jax.nn.one_hot(targets, vocab_size) * (confidence - low_confidence) + low_confidence
  loss, z = cross_entropy_with_logits(logits.astype(jnp.float32), soft_targets, z_loss)
  loss = loss - normalizing_constant
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  return jnp.sum(loss * weights), jnp.sum(z * weights), jnp.sum(weights)


def _loss_weights(batch: Batch) -> Array:
  weights = batch.get("decoder_loss_weights")
  if weights is None:  # EncDecFeatureConverter's definition: every non-pad target, EOS included
    weights = batch["decoder_target_tokens"] > 0
  return weights.astype(jnp.float32)


class EncoderDecoderModel:
  """Loss, scoring and decoding for a `Transformer`. All methods are pure in (params, batch): jit them."""

  def __init__(self, module: nn.Module, input_vocabulary=None, output_vocabulary=None, label_smoothing: float = 0.0,
               z_loss: float = 0.0, eos_id: int | None = None):
    self.module = module
    self.input_vocabulary = input_vocabulary
    self.output_vocabulary = output_vocabulary
    self.label_smoothing = label_smoothing
    self.z_loss = z_loss
    if eos_id is None:
      eos_id = output_vocabulary.eos_id if output_vocabulary is not None else 1
    self.eos_id = eos_id

  # -- variables ---------------------------------------------------------------------------------------
  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]],
                            input_types: Mapping[str, Any] | None = None) -> PyTree:
    """`{'params', 'params_axes'}` for inputs of the given shapes (T5X's signature)."""
    input_types = input_types or {}
    enc_shape = input_shapes["encoder_input_tokens"]
    dec_shape = input_shapes["decoder_input_tokens"]
    ones = lambda shape, key: jnp.ones(shape, input_types.get(key, jnp.int32))
    return self.module.init(rng, ones(enc_shape, "encoder_input_tokens"), ones(dec_shape, "decoder_input_tokens"),
                            ones(dec_shape, "decoder_target_tokens"), enable_dropout=False)

  # -- teacher forcing ---------------------------------------------------------------------------------
  def compute_logits(self, params: PyTree, batch: Batch, dropout_rng: Array | None = None,
                     mutable=False, other_variables: Mapping[str, PyTree] | None = None):
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return self.module.apply(
        {"params": params, **(other_variables or {})}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"], encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"), encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"), enable_dropout=rngs is not None, rngs=rngs,
        mutable=mutable)

  def loss_fn(self, params: PyTree, batch: Batch, dropout_rng: Array | None,
              other_variables: Mapping[str, PyTree] | None = None) -> tuple[Array, dict]:
    """Mean per-token cross entropy over `decoder_loss_weights` (the PHATGOOSE objective), and metrics."""
    logits = self.compute_logits(params, batch, dropout_rng, other_variables=other_variables)
    loss_sum, z_sum, weight_sum = weighted_cross_entropy(logits, batch["decoder_target_tokens"], _loss_weights(batch),
                                                         self.label_smoothing, self.z_loss)
    denom = jnp.maximum(weight_sum, 1.0)
    correct = (jnp.argmax(logits, -1) == batch["decoder_target_tokens"]) * _loss_weights(batch)
    metrics = {"loss": loss_sum / denom, "z_loss": z_sum / denom, "num_tokens": weight_sum,
               "accuracy": jnp.sum(correct) / denom}
    return loss_sum / denom, metrics

  # -- scoring -----------------------------------------------------------------------------------------
  def score_batch_detailed(self, params: PyTree, batch: Batch,
                           other_variables: Mapping[str, PyTree] | None = None) -> dict[str, Array]:
    """Per-example target log-likelihoods: `sum` (T5X's score), `mean` (per target token, EOS included:
    the PHATGOOSE rank-classification score) and `num_tokens`, each [batch]."""
    logits = self.compute_logits(params, batch, other_variables=other_variables)
    weights = _loss_weights(batch)
    token_ll = token_log_likelihoods(logits, batch["decoder_target_tokens"]) * weights  # [batch, length]
    total = jnp.sum(token_ll, axis=-1)
    count = jnp.sum(weights, axis=-1)
    return {"sum": total, "mean": total / jnp.maximum(count, 1.0), "num_tokens": count}

  def score_batch(self, params: PyTree, batch: Batch, return_intermediates: bool = False):
    """T5X's `score_batch`: summed target log-likelihood per example [batch]."""
    if return_intermediates:
      logits, state = self.compute_logits(params, batch, mutable=["intermediates"])
      token_ll = token_log_likelihoods(logits, batch["decoder_target_tokens"]) * _loss_weights(batch)
      intermediates = dict(state.get("intermediates", {}))
      intermediates["decoder"] = {**intermediates.get("decoder", {}),
                                  "target_tokens": (batch["decoder_target_tokens"],),
                                  "loss_weights": (_loss_weights(batch),), "token_scores": (token_ll,)}
      return jnp.sum(token_ll, axis=-1), intermediates
    return self.score_batch_detailed(params, batch)["sum"]

  # -- decoding ----------------------------------------------------------------------------------------
  def _init_cache(self, params: PyTree, encoder_shape, decoder_shape) -> PyTree:
    """Empty decode cache for the given (already beam-expanded) shapes, the way T5X builds it."""
    _, variables = self.module.apply(
        {"params": params}, jnp.ones(encoder_shape, jnp.int32), jnp.ones(decoder_shape, jnp.int32),
        jnp.ones(decoder_shape, jnp.int32), decode=True, enable_dropout=False, mutable=["cache"])
    return variables["cache"]

  def predict_batch_with_aux(self, params: PyTree, batch: Batch, rng: Array | None = None, *,
                             method: str = "greedy", num_decodes: int = 1, temperature: float = 1.0,
                             topk: int = 0, topp: float = 0.0, alpha: float = 0.6,
                             max_decode_length: int | None = None,
                             return_all_decodes: bool = False) -> tuple[Array, dict[str, Array]]:
    """Decodes `batch` (only `encoder_input_tokens` is needed, plus `decoder_input_tokens` for the length).

    method: 'greedy', 'sample' (temperature/topk/topp, needs rng) or 'beam' (num_decodes beams,
    length penalty alpha). Returns tokens [batch, length] (or [batch, num_decodes, length] with
    return_all_decodes) and {'scores': ...}.
    """
    if method not in DECODE_METHODS:
      raise ValueError(f"unknown decoding method {method!r}; choose one of {DECODE_METHODS}")
    encoder_tokens = batch["encoder_input_tokens"]
    if max_decode_length is None:
      if "decoder_input_tokens" not in batch:
        raise ValueError("pass max_decode_length or a batch with decoder_input_tokens")
      max_decode_length = batch["decoder_input_tokens"].shape[1]
    batch_size = encoder_tokens.shape[0]
    num_decodes = num_decodes if method != "greedy" else 1

    encoded = self.module.apply({"params": params}, encoder_tokens, enable_dropout=False, method=self.module.encode)
    encoded = decoding.flat_batch_beam_expand(encoded, num_decodes)
    encoder_tokens_x = decoding.flat_batch_beam_expand(encoder_tokens, num_decodes)
    cache = self._init_cache(params, encoder_tokens_x.shape, (batch_size * num_decodes, max_decode_length))

    def tokens_to_logits(ids, cache):
      logits, variables = self.module.apply(
          {"params": params, "cache": cache}, encoded, encoder_tokens_x, ids, ids, enable_dropout=False, decode=True,
          max_decode_length=max_decode_length, mutable=["cache"], method=self.module.decode)
      return logits[:, 0, :], variables["cache"]

    prompt = jnp.zeros((batch_size, max_decode_length), jnp.int32)
    if method == "beam":
      decodes, scores = decoding.beam_search(prompt, cache, tokens_to_logits, self.eos_id, num_decodes=num_decodes,
                                             alpha=alpha)
      best = decodes[:, -1, :]
      best_score = scores[:, -1]
    else:
      decodes, scores = decoding.temperature_sample(
          prompt, cache, tokens_to_logits, self.eos_id, decode_rng=rng, num_decodes=num_decodes,
          temperature=0.0 if method == "greedy" else temperature, topk=1 if method == "greedy" else topk, topp=topp)
      pick = jnp.argmax(scores, axis=1)
      best = jnp.take_along_axis(decodes, pick[:, None, None], axis=1)[:, 0, :]
      best_score = jnp.take_along_axis(scores, pick[:, None], axis=1)[:, 0]
    if return_all_decodes:
      return decodes, {"scores": scores}
    return best, {"scores": best_score}

  def predict_batch(self, params: PyTree, batch: Batch, rng: Array | None = None, **kwargs) -> Array:
    return self.predict_batch_with_aux(params, batch, rng, **kwargs)[0]

  # -- jitted entry points (compiled once per input shape) -------------------------------------------
  @functools.cached_property
  def jit_logits(self):
    """Teacher-forced logits; `dropout_rng=None` evaluates without dropout."""
    return jax.jit(self.compute_logits, static_argnames=("mutable",))

  @functools.cached_property
  def jit_score_intermediates(self):
    """score_batch with return_intermediates=True, jitted once per model (routing analysis)."""
    return jax.jit(lambda params, batch: self.score_batch(params, batch, return_intermediates=True))

  @functools.cached_property
  def jit_score(self):
    return jax.jit(self.score_batch_detailed)

  @functools.cached_property
  def jit_predict(self):
    return jax.jit(self.predict_batch_with_aux,
                   static_argnames=("method", "num_decodes", "temperature", "topk", "topp", "alpha",
                                    "max_decode_length", "return_all_decodes"))
