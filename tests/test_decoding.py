"""Decoding algorithms against brute force, on a toy autoregressive model with a known distribution."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import decoding

VOCAB, EOS, LENGTH, BATCH = 5, 1, 4, 2


def toy_model(seed=0):
  """A bigram model: logits depend on the previous token and the batch row. Its cache is the step
  counter plus a per-row tensor, to exercise beam gathering of batch-leading cache entries."""
  table = jax.random.normal(jax.random.PRNGKey(seed), (BATCH, VOCAB, VOCAB)) * 2.0
  table = table.at[:, 0, 0].set(-5.0)  # make emitting pad after BOS unlikely

  def tokens_to_logits(ids, cache):
    rows = cache["row"]  # [rows]: which batch element each (possibly beam-expanded) row belongs to
    logits = table[rows, ids[:, 0]]
    return logits, {"row": rows, "cache_index": cache["cache_index"] + 1}

  def sequence_log_prob(row, seq):
    logp = jax.nn.log_softmax(table[row], axis=-1)
    total, prev = 0.0, 0
    for t in seq:
      total += float(logp[prev, t])
      prev = t
      if t == EOS:
        break
    return total

  return tokens_to_logits, sequence_log_prob


def initial_cache(beams):
  return {"row": jnp.repeat(jnp.arange(BATCH), beams), "cache_index": jnp.array(0)}


def all_sequences():
  """Every output the decoder can emit: up to LENGTH tokens, stopping at the first EOS, zero-padded."""
  seqs = []
  for n in range(1, LENGTH + 1):
    for prefix in itertools.product([t for t in range(VOCAB) if t != EOS], repeat=n - 1):
      for last in range(VOCAB):
        if n < LENGTH and last != EOS:
          continue
        seqs.append(list(prefix) + [last] + [0] * (LENGTH - n))
  return seqs


def test_greedy_picks_argmax_each_step():
  tokens_to_logits, _ = toy_model()
  seqs, log_probs = decoding.temperature_sample(jnp.zeros((BATCH, LENGTH), jnp.int32), initial_cache(1),
                                                tokens_to_logits, EOS, temperature=0.0)
  cache = initial_cache(1)
  prev = jnp.zeros((BATCH,), jnp.int32)
  ended = np.zeros(BATCH, bool)
  for i in range(LENGTH):
    logits, cache = tokens_to_logits(prev[:, None], cache)
    want = np.where(ended, 0, np.argmax(logits, -1))
    np.testing.assert_array_equal(seqs[:, 0, i], want)
    ended |= want == EOS
    prev = jnp.asarray(want)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_with_wide_beam_is_exact(alpha):
  """With beams >= all live prefixes, beam search must find the best sequence under its length penalty."""
  tokens_to_logits, seq_logp = toy_model(seed=3)
  beams = (VOCAB - 1) ** (LENGTH - 1)
  seqs, scores = decoding.beam_search(jnp.zeros((BATCH, LENGTH), jnp.int32), initial_cache(beams),
                                      tokens_to_logits, EOS, num_decodes=beams, alpha=alpha)
  for row in range(BATCH):
    def penalized(seq):
      n = next((i + 1 for i, t in enumerate(seq) if t == EOS), LENGTH)
      return seq_logp(row, seq) / ((5.0 + n) / 6.0) ** alpha
    best = max(all_sequences(), key=penalized)
    assert list(np.asarray(seqs[row, -1])) == best
    np.testing.assert_allclose(float(scores[row, -1]), penalized(best), rtol=1e-5)
    assert np.all(np.diff(np.asarray(scores[row])) >= 0)  # ascending, best last


def test_one_beam_without_penalty_is_greedy():
  tokens_to_logits, _ = toy_model(seed=5)
  greedy, _ = decoding.temperature_sample(jnp.zeros((BATCH, LENGTH), jnp.int32), initial_cache(1),
                                          tokens_to_logits, EOS, temperature=0.0)
  beam, _ = decoding.beam_search(jnp.zeros((BATCH, LENGTH), jnp.int32), initial_cache(1), tokens_to_logits, EOS,
                                 num_decodes=1, alpha=0.0)
  np.testing.assert_array_equal(beam[:, -1], greedy[:, 0])


def test_sampling_follows_topk_and_the_model_distribution():
  tokens_to_logits, seq_logp = toy_model(seed=7)
  n = 64
  seqs, log_probs = decoding.temperature_sample(jnp.zeros((BATCH, LENGTH), jnp.int32), initial_cache(n),
                                                tokens_to_logits, EOS, decode_rng=jax.random.PRNGKey(0),
                                                num_decodes=n, temperature=1.0, topk=2)
  first = np.asarray(seqs[:, :, 0])
  tokens_to_logits_first = np.asarray(tokens_to_logits(jnp.zeros((BATCH, 1), jnp.int32), initial_cache(1))[0])
  for row in range(BATCH):
    top2 = set(np.argsort(tokens_to_logits_first[row])[-2:])
    assert set(first[row]) <= top2 and len(set(first[row])) == 2
    for k in range(4):  # reported log-probs are the model's own likelihood of the emitted sequence
      np.testing.assert_allclose(float(log_probs[row, k]), seq_logp(row, list(np.asarray(seqs[row, k]))), rtol=1e-5)
  again, _ = decoding.temperature_sample(jnp.zeros((BATCH, LENGTH), jnp.int32), initial_cache(n), tokens_to_logits,
                                         EOS, decode_rng=jax.random.PRNGKey(0), num_decodes=n, temperature=1.0, topk=2)
  np.testing.assert_array_equal(seqs, again)


def test_sampling_needs_an_rng():
  tokens_to_logits, _ = toy_model()
  with pytest.raises(ValueError, match="needs decode_rng"):
    decoding.temperature_sample(jnp.zeros((BATCH, LENGTH), jnp.int32), initial_cache(1), tokens_to_logits, EOS,
                                temperature=1.0, topk=0)


def test_cache_map_leaves_cache_index_alone():
  cache = {"layer": {"cached_key": jnp.ones((2, 3)), "cache_index": jnp.array(4)}}
  out = decoding.cache_map(lambda x: x * 2, cache)
  assert int(out["layer"]["cache_index"]) == 4 and float(out["layer"]["cached_key"][0, 0]) == 2.0


def test_model_beam_search_runs_and_beats_greedy_likelihood(tiny_model, padded_batch):
  model, params = tiny_model
  greedy, g_aux = model.jit_predict(params, padded_batch, max_decode_length=6, method="greedy")
  beams, b_aux = model.jit_predict(params, padded_batch, max_decode_length=6, method="beam", num_decodes=4,
                                   alpha=0.0, return_all_decodes=True)
  assert beams.shape == (2, 4, 6)
  # With no length penalty, the best beam is at least as likely as the greedy sequence.
  assert np.all(np.asarray(b_aux["scores"][:, -1]) >= np.asarray(g_aux["scores"]) - 1e-4)
