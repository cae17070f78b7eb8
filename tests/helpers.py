"""Checks shared by several test modules."""

import flax
import jax
import numpy as np


def assert_decoding_matches_teacher_forcing(model, params, batch, expected_logits, atol=2e-5):
  """Step-by-step logits from the decode cache equal the teacher-forced logits at every real position;
  the cache follows T5X's contract (a leading batch dimension on every entry but cache_index)."""
  module = model.module
  enc, dec_in, tgt = (batch[k] for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens"))
  cache = jax.jit(model._init_cache, static_argnums=(1, 2))(params, enc.shape, tgt.shape)  # pylint: disable=protected-access
  for path, leaf in flax.traverse_util.flatten_dict(cache).items():
    if path[-1] == "cache_index":
      assert leaf.shape == (), path
    else:
      assert leaf.shape[0] == enc.shape[0], path
  encoded = jax.jit(lambda p, x: module.apply({"params": p}, x, enable_dropout=False, method=module.encode))(params, enc)
  step = jax.jit(lambda cache, ids: module.apply({"params": params, "cache": cache}, encoded, enc, ids, ids,
                                                 enable_dropout=False, decode=True, max_decode_length=tgt.shape[1],
                                                 mutable=["cache"], method=module.decode))
  expected_logits = np.asarray(expected_logits)
  for i in range(tgt.shape[1]):
    logits, variables = step(cache, dec_in[:, i:i + 1])
    cache = variables["cache"]
    rows = tgt[:, i] > 0
    np.testing.assert_allclose(np.asarray(logits)[rows, 0], expected_logits[rows, i], atol=atol, err_msg=f"step {i}")
