"""Incremental decoding over a KV cache: greedy / temperature sampling and beam search.

The contract is T5X's: `tokens_to_logits(ids [batch, 1], cache) -> (logits [batch, vocab], cache)`,
the cache a pytree whose leaves all have a leading batch dimension except those named `cache_index`.
Pad id 0 doubles as BOS. Outputs exclude BOS; positions after EOS are 0.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache], tuple[Array, Cache]]

NEG_INF = np.array(-1.0e7, dtype=np.float32)  # finite, so arithmetic on it never makes NaN


def cache_map(fn: Callable[[Array], Array], cache: Cache, apply_to_index: bool = False) -> Cache:
  """Maps `fn` over the cache leaves that carry a batch dimension (all but `cache_index`)."""
  if cache is None:
    return None
  frozen = isinstance(cache, flax.core.FrozenDict)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(cache) if frozen else cache)
  flat = {k: (fn(v) if (apply_to_index or k[-1] != "cache_index") else v) for k, v in flat.items()}
  out = flax.traverse_util.unflatten_dict(flat)
  return flax.core.freeze(out) if frozen else out


def flat_batch_beam_expand(x: Array, beam_size: int) -> Array:
  """[batch, ...] -> [batch * beam, ...], each example repeated beam_size times in a row."""
  return jnp.repeat(x, beam_size, axis=0)


def _gather_beams(x: Array, beam_indices: Array, batch_size: int, old_beams: int) -> Array:
  """x [batch * old_beams, ...], beam_indices [batch, new_beams] -> [batch * new_beams, ...]."""
  x = x.reshape((batch_size, old_beams) + x.shape[1:])
  x = jnp.take_along_axis(x, beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2)), axis=1)
  return x.reshape((-1,) + x.shape[2:])


def _filter_logits(logits: Array, topk: int, topp: float) -> Array:
  if topk > 0:
    kth = lax.top_k(logits, topk)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if topp > 0.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set whose mass reaches topp (always at least the top token).
    cutoff_index = jnp.sum(cum < topp, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return logits


def temperature_sample(inputs: Array, cache: Cache, tokens_to_logits: TokensToLogits, eos_id: int,
                       decode_rng: Array | None = None, num_decodes: int = 1, temperature: float = 1.0,
                       topk: int = 1, topp: float = 0.0) -> tuple[Array, Array]:
  """Greedy (temperature 0 or topk 1) or sampled decoding.

  inputs [batch, length]: zeros, or forced prompt tokens where non-zero (position i forces output i).
  The cache must already be expanded to batch * num_decodes rows.
  Returns (sequences [batch, num_decodes, length], log_probs [batch, num_decodes]); log_probs are the
  model's own (temperature 1) log-likelihoods of the emitted tokens, EOS included.
  """
  batch, length = inputs.shape
  greedy = temperature == 0.0 or topk == 1
  if not greedy and decode_rng is None:
    raise ValueError("sampling (temperature > 0 and topk != 1) needs decode_rng")
  rng = decode_rng if decode_rng is not None else jax.random.PRNGKey(0)
  forced = flat_batch_beam_expand(inputs, num_decodes)  # [batch * num_decodes, length]
  rows = batch * num_decodes

  def cond(state):
    i, _, _, ended, _, _ = state
    return jnp.logical_and(i < length, jnp.logical_not(jnp.all(ended)))

  def body(state):
    i, sequences, log_probs, ended, cache, rng = state
    prev = jnp.where(i == 0, jnp.zeros((rows,), jnp.int32), sequences[:, jnp.maximum(i - 1, 0)])
    logits, cache = tokens_to_logits(prev[:, None], cache)
    logits = logits.astype(jnp.float32)  # [rows, vocab]
    if greedy:
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      rng, step_rng = jax.random.split(rng)
      filtered = _filter_logits(logits / temperature, topk, topp)
      token = jax.random.categorical(step_rng, filtered).astype(jnp.int32)
    token = jnp.where(forced[:, i] != 0, forced[:, i], token)
    token = jnp.where(ended, 0, token)
    step_log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    log_probs = log_probs + jnp.where(ended, 0.0, step_log_prob)
    sequences = sequences.at[:, i].set(token)
    ended = jnp.logical_or(ended, token == eos_id)
    return i + 1, sequences, log_probs, ended, cache, rng

  init = (jnp.array(0), jnp.zeros((rows, length), jnp.int32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows,), bool), cache, rng)
  _, sequences, log_probs, _, _, _ = lax.while_loop(cond, body, init)
  return sequences.reshape(batch, num_decodes, length), log_probs.reshape(batch, num_decodes)


def brevity_penalty(alpha: float, length: Array) -> Array:
  """GNMT length penalty ((5 + length) / 6) ** alpha."""
  return jnp.power((5.0 + length.astype(jnp.float32)) / 6.0, alpha)


def beam_search(inputs: Array, cache: Cache, tokens_to_logits: TokensToLogits, eos_id: int,
                num_decodes: int = 4, alpha: float = 0.6) -> tuple[Array, Array]:
  """Beam search with the GNMT length penalty (T5X's default alpha 0.6).

  inputs [batch, length] (zeros; only the shape is used). The cache must be expanded to
  batch * num_decodes rows. Returns (sequences [batch, num_decodes, length], scores [batch, num_decodes]),
  sorted ascending by length-penalized log-likelihood, so [:, -1] is the best (T5X's order).
  """
  batch, length = inputs.shape
  beams = num_decodes
  candidates = 2 * beams  # enough that `beams` of them are still alive after EOS

  def cond(state):
    i, _, live_logp, _, finished_scores, finished_flags, _ = state
    # Stop once no live beam can beat the worst finished beam, even at the maximum length.
    best_live = live_logp[:, 0] / brevity_penalty(alpha, jnp.array(length))
    worst_finished = jnp.min(finished_scores, axis=1)
    done = jnp.all(jnp.all(finished_flags, axis=1) & (worst_finished > best_live))
    return jnp.logical_and(i < length, jnp.logical_not(done))

  def body(state):
    i, live_seqs, live_logp, finished_seqs, finished_scores, finished_flags, cache = state
    prev = jnp.where(i == 0, 0, live_seqs[:, :, jnp.maximum(i - 1, 0)]).reshape(batch * beams)
    logits, cache = tokens_to_logits(prev[:, None].astype(jnp.int32), cache)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, beams, -1)  # [batch, beams, vocab]
    vocab = logp.shape[-1]
    cand_logp = (live_logp[:, :, None] + logp).reshape(batch, beams * vocab)
    top_logp, top_idx = lax.top_k(cand_logp, candidates)  # [batch, candidates]
    src_beam = top_idx // vocab
    token = (top_idx % vocab).astype(jnp.int32)
    cand_seqs = jnp.take_along_axis(live_seqs, src_beam[:, :, None], axis=1).at[:, :, i].set(token)
    is_eos = token == eos_id

    # Alive: the best `beams` candidates that did not just end.
    alive_logp = jnp.where(is_eos, NEG_INF, top_logp)
    new_live_logp, keep = lax.top_k(alive_logp, beams)
    new_live_seqs = jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1)
    cache = cache_map(lambda x: _gather_beams(x, jnp.take_along_axis(src_beam, keep, axis=1), batch, beams),
                      cache)

    # Finished: merge the candidates that just ended into the finished pool.
    new_scores = jnp.where(is_eos, top_logp / brevity_penalty(alpha, i + 1), NEG_INF)
    pool_seqs = jnp.concatenate([finished_seqs, cand_seqs], axis=1)
    pool_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
    pool_flags = jnp.concatenate([finished_flags, is_eos], axis=1)
    pool_scores = jnp.where(pool_flags, pool_scores, NEG_INF)
    finished_scores, pick = lax.top_k(pool_scores, beams)
    finished_seqs = jnp.take_along_axis(pool_seqs, pick[:, :, None], axis=1)
    finished_flags = jnp.take_along_axis(pool_flags, pick, axis=1)
    return i + 1, new_live_seqs, new_live_logp, finished_seqs, finished_scores, finished_flags, cache

  live_logp = jnp.tile(jnp.array([0.0] + [float(NEG_INF)] * (beams - 1), jnp.float32), (batch, 1))
  init = (jnp.array(0), jnp.zeros((batch, beams, length), jnp.int32), live_logp,
          jnp.zeros((batch, beams, length), jnp.int32), jnp.full((batch, beams), NEG_INF, jnp.float32),
          jnp.zeros((batch, beams), bool), cache)
  _, live_seqs, live_logp, finished_seqs, finished_scores, finished_flags, _ = lax.while_loop(cond, body, init)

  # Rows with fewer than `beams` finished sequences are topped up with live beams, scored at full length.
  live_scores = live_logp / brevity_penalty(alpha, jnp.array(length))
  finished_scores = jnp.where(finished_flags, finished_scores, NEG_INF)
  pool_seqs = jnp.concatenate([finished_seqs, live_seqs], axis=1)
  pool_scores = jnp.concatenate([finished_scores, jnp.where(finished_flags.all(axis=1, keepdims=True),
                                                            2 * NEG_INF, live_scores)], axis=1)
  scores, pick = lax.top_k(pool_scores, beams)
  seqs = jnp.take_along_axis(pool_seqs, pick[:, :, None], axis=1)
  # Ascending order, best last (T5X's convention).
  return seqs[:, ::-1], scores[:, ::-1]
