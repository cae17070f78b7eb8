"""`./run.sh` default job until the evaluation pipeline exists: rank-classify and generate with one model.

Without `--checkpoint` the model is a randomly initialized tiny T5, so its answers are chance; the run
shows that tokenization, scoring, greedy and beam decoding work end to end and how long each takes.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from phatgoose_jax import batching, checkpoints, config as config_lib, vocabularies
from phatgoose_jax.model import EncoderDecoderModel
from phatgoose_jax.network import Transformer

QUESTIONS = (
    ("Is the sky blue on a clear day?", ("yes", "no")),
    ("Translate English to German: That is good.", ("Das ist gut.", "Ich bin müde.", "Guten Morgen.")),
    ("Which is larger, an elephant or a mouse?", ("an elephant", "a mouse")),
)


def _round_up(n: int, multiple: int = 8) -> int:
  return int(math.ceil(n / multiple) * multiple)


def run_demo(checkpoint: str | None = None, vocabulary: str = "t5", gin_files=(), bindings=(), seed: int = 0) -> int:
  vocab = vocabularies.get_vocabulary(vocabulary)
  if checkpoint:
    config, params = checkpoints.load_checkpoint(checkpoint)
    source = f"checkpoint {checkpoint}"
  else:
    # Size from gin (tiny by default); the vocabulary dimension follows the vocabulary, padded to 128.
    vocab_binding = [f"T5Config.vocab_size = {_round_up(vocab.vocab_size, 128)}"]
    config = config_lib.config_from_gin(list(gin_files) or ["tiny"], vocab_binding + list(bindings))
    source = "random initialization (answers are chance)"
  if vocab.vocab_size > config.vocab_size:
    raise ValueError(f"vocabulary {vocabulary!r} has {vocab.vocab_size} ids but the model only {config.vocab_size}")
  model = EncoderDecoderModel(Transformer(config), vocab, vocab)
  if not checkpoint:
    params = model.get_initial_variables(jax.random.PRNGKey(seed), {"encoder_input_tokens": (1, 8),
                                                                    "decoder_input_tokens": (1, 8)})["params"]
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f"model: {source}; {n_params:,} parameters; emb_dim={config.emb_dim}, layers="
        f"{config.num_encoder_layers}/{config.num_decoder_layers}, activations {config.dtype}")
  print(f"vocabulary: {vocabulary} ({vocab.vocab_size} ids); device: {jax.devices()[0].platform}")

  # Rank classification: one row per (question, choice), scored by mean per-token log-likelihood (EOS included).
  rows = [(qi, ci) for qi, (_, choices) in enumerate(QUESTIONS) for ci in range(len(choices))]
  inputs = [vocab.encode(QUESTIONS[qi][0]) + [vocab.eos_id] for qi, _ in rows]
  targets = [vocab.encode(QUESTIONS[qi][1][ci]) + [vocab.eos_id] for qi, ci in rows]
  in_len, tgt_len = _round_up(max(map(len, inputs))), _round_up(max(map(len, targets)))
  batch = batching.encdec_batch(inputs, targets, in_len, tgt_len)
  t0 = time.perf_counter()
  scores = jax.block_until_ready(model.jit_score(params, batch))
  t_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  scores = jax.block_until_ready(model.jit_score(params, batch))
  t_score = time.perf_counter() - t0

  print(f"\nrank classification ({len(rows)} rows; first call {t_first:.2f}s incl. compile, then {t_score*1e3:.1f} ms)")
  print(f"{'question':46s} {'choice':16s} {'mean logp':>10s} {'sum logp':>10s}  pick")
  for qi, (question, choices) in enumerate(QUESTIONS):
    idx = [r for r, (q, _) in enumerate(rows) if q == qi]
    best = idx[int(np.argmax(np.asarray(scores["mean"])[idx]))]
    for r in idx:
      print(f"{question[:46]:46s} {choices[rows[r][1]][:16]:16s} {float(scores['mean'][r]):10.3f} "
            f"{float(scores['sum'][r]):10.3f}  {'<-' if r == best else ''}")

  prompts = [vocab.encode(q) + [vocab.eos_id] for q, _ in QUESTIONS]
  enc = batching.encdec_batch(prompts, None, _round_up(max(map(len, prompts))), 16)
  print("\ngeneration (16 tokens)")
  for method, kwargs in (("greedy", {}), ("beam", {"num_decodes": 4, "alpha": 0.6})):
    t0 = time.perf_counter()
    tokens, aux = jax.block_until_ready(model.jit_predict(params, enc, method=method, **kwargs))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokens, aux = jax.block_until_ready(model.jit_predict(params, enc, method=method, **kwargs))
    t_run = time.perf_counter() - t0
    print(f"  {method} (first call {t_first:.2f}s incl. compile, then {t_run*1e3:.1f} ms for {len(prompts)} prompts)")
    for (question, _), row, score in zip(QUESTIONS, np.asarray(tokens), np.asarray(aux["scores"])):
      ids = [int(t) for t in row if t != 0]
      ids = ids[:ids.index(vocab.eos_id)] if vocab.eos_id in ids else ids
      print(f"    {question[:40]:40s} -> {vocab.decode(ids)[:60]!r} (score {score:.2f})")
  return 0
