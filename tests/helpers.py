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


TRAIN_TASKS = ("pg_test_reverse", "pg_test_upper")


def register_train_tasks() -> tuple[str, ...]:
  """Two tiny seqio tasks over bytes (reverse a word; upper-case it); registering twice is a no-op."""
  import seqio
  import tensorflow as tf

  vocab = seqio.ByteVocabulary()

  def make(transform):
    def dataset_fn(split, shuffle_files, seed=None):
      rng = np.random.default_rng({"train": 0, "validation": 1}[split])
      words = ["".join(rng.choice(list("abcdefgh"), size=rng.integers(2, 6))) for _ in range(96)]
      return tf.data.Dataset.from_tensor_slices({"inputs": words, "targets": [transform(w) for w in words]})
    return dataset_fn

  for name, fn in zip(TRAIN_TASKS, (lambda w: w[::-1], str.upper)):
    if name not in seqio.TaskRegistry.names():
      seqio.TaskRegistry.add(name, seqio.FunctionDataSource(make(fn), splits=["train", "validation"]),
                             preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
                             output_features={"inputs": seqio.Feature(vocab), "targets": seqio.Feature(vocab)})
  return TRAIN_TASKS


def write_byte_base_checkpoint(path):
  """A randomly initialized (always the same) one-layer T5.1.1 over the byte vocabulary, saved as our
  checkpoint at path."""
  import jax.numpy as jnp
  from phatgoose_jax import checkpoints
  from phatgoose_jax.config import T5Config
  from phatgoose_jax.network import Transformer

  config = T5Config(vocab_size=264, dtype="float32", emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                    num_encoder_layers=1, num_decoder_layers=1, mlp_activations=("gelu", "linear"), dropout_rate=0.0)
  tokens = jnp.ones((1, 1), jnp.int32)
  params = Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False)["params"]
  return checkpoints.save_checkpoint(path, params, config)
