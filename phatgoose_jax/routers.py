"""The baselines' routing vectors and expert combinations, all over the same stacked experts.

Every post-hoc method is the same model with a different router (architecture_sketch.md):
  PHATGOOSE           router 'phatgoose' with the standardized trained gates
  Average Activation  router 'phatgoose' with the standardized mean site inputs of each expert's data
  Arrow               router 'arrow' with each expert's top singular direction (input space) per site
  Retrieval           one expert per example chosen by MiniLM nearest neighbours, the same at every site
  Merged Experts      one LoRA of rank E*r equal to the mean of all experts' A B
  single expert       that expert's LoRA (Oracle / Best Individual pick among these with test labels)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax import adapters, routing
from phatgoose_jax.library import StackedExperts


# ---------------------------------------------------------------------------------------------
# Arrow
# ---------------------------------------------------------------------------------------------

@jax.jit
def _top_input_direction(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [E, d_in, r], b [E, r, d_out] -> [E, d_in]: the top left-singular vector of each A B (the input-space
  direction that A B amplifies most), from two thin QRs and an r x r SVD, never forming A B."""
  def one(a_e, b_e):
    q_a, r_a = jnp.linalg.qr(a_e)          # a_e = q_a r_a,  q_a [d_in, r]
    q_b, r_b = jnp.linalg.qr(b_e.T)        # b_e^T = q_b r_b, so A B = q_a (r_a r_b^T) q_b^T
    u, _, _ = jnp.linalg.svd(r_a @ r_b.T)  # [r, r]
    return q_a @ u[:, 0]
  return jax.vmap(one)(a.astype(jnp.float32), b.astype(jnp.float32))


def arrow_vectors(stacked: StackedExperts) -> dict[str, np.ndarray]:
  """{site: [E, d_in]} unit vectors (sign arbitrary: Arrow scores |u . v|)."""
  return {site: np.asarray(_top_input_direction(stacked.lora_a[site], stacked.lora_b[site]))
          for site in stacked.sites}


# ---------------------------------------------------------------------------------------------
# Merged Experts
# ---------------------------------------------------------------------------------------------

def merged_lora(stacked: StackedExperts) -> tuple[dict[str, np.ndarray], adapters.AdapterConfig]:
  """The mean of all experts' A_e B_e, exactly, as one LoRA: A = [A_1 .. A_E] (rank E*r),
  B = [B_1; ..; B_E] / E, with alpha scaled so that the LoRA scale stays alpha / r."""
  e = stacked.num_experts
  flat = {}
  for site in stacked.sites:
    a, b = stacked.lora_a[site], stacked.lora_b[site]  # [E, d_in, r], [E, r, d_out]
    flat[f"{site}/lora_a"] = np.concatenate(list(a), axis=1)
    flat[f"{site}/lora_b"] = np.concatenate(list(b), axis=0) / e
  config = adapters.AdapterConfig(mode="lora", rank=e * stacked.rank, alpha=e * stacked.alpha,
                                  sites=stacked.sites_regex)
  return flat, config


# ---------------------------------------------------------------------------------------------
# Average Activation
# ---------------------------------------------------------------------------------------------

def site_input_mask(site: str, encoder_mask: jax.Array, decoder_mask: jax.Array) -> jax.Array:
  """Which tokens a site's inputs live on: encoder sites and cross-attention key/value read encoder tokens;
  every other decoder site reads decoder positions."""
  if site.startswith("encoder/") or site.endswith(("encoder_decoder_attention/key", "encoder_decoder_attention/value")):
    return encoder_mask
  return decoder_mask


def masked_mean_site_inputs(intermediates: Mapping, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Per example, the mean over its non-pad tokens of each site's recorded input: {site: [batch, d_in]}."""
  encoder_mask = (batch["encoder_input_tokens"] > 0).astype(jnp.float32)
  decoder_mask = (batch["decoder_target_tokens"] > 0).astype(jnp.float32)
  out = {}
  for path, value in adapters.flatten(intermediates).items():  # sown values are 1-tuples
    if not path.endswith("/site_inputs"):
      continue
    site = path[:-len("/site_inputs")]
    mask = site_input_mask(site, encoder_mask, decoder_mask)  # [batch, length]
    u = value[0].astype(jnp.float32)  # [batch, length, d_in]
    out[site] = jnp.sum(u * mask[..., None], 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)[:, None]
  return out


def average_activation_vectors(model, params_for_expert: Callable[[int], dict], num_experts: int,
                               batches_for_expert: Callable[[int], Iterable[Mapping]]) -> dict[str, np.ndarray]:
  """{site: [E, d_in]}: for expert e, its single-expert model run teacher-forced over its training
  batches; per example the masked mean of each site's input, then the mean over examples.

  model: an EncoderDecoderModel whose adapter has record_inputs=True (mode 'lora').
  """
  @jax.jit
  def per_example_means(params, batch):
    _, state = model.compute_logits(params, batch, mutable=["intermediates"])
    return masked_mean_site_inputs(state["intermediates"], batch)

  sums: dict[str, list] = {}
  for e in range(num_experts):
    params = params_for_expert(e)
    total, count = None, 0
    for batch in batches_for_expert(e):
      means = per_example_means(params, batch)
      rows = np.asarray(batch["encoder_input_tokens"]).any(axis=1)  # padding rows of the last batch
      batch_sum = {s: np.asarray(v)[rows].sum(0) for s, v in means.items()}
      total = batch_sum if total is None else {s: total[s] + batch_sum[s] for s in total}
      count += int(rows.sum())
    if not count:
      raise ValueError(f"no training examples for expert {e}: cannot compute its average activations")
    for s, v in total.items():
      sums.setdefault(s, []).append(v / count)
  return {s: np.stack(v).astype(np.float32) for s, v in sums.items()}


def standardized(vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  f = jax.jit(routing.standardize)
  return {s: np.asarray(f(v)) for s, v in vectors.items()}


# ---------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RetrievalIndex:
  """Unit-norm sentence embeddings of up to N training examples per expert: embeddings [E, N, dim],
  valid [E, N] (experts with fewer examples are padded, and padding never wins)."""
  embeddings: np.ndarray
  valid: np.ndarray

  @classmethod
  def build(cls, embedder, texts_per_expert: Sequence[Sequence[str]], max_per_expert: int = 1000) -> "RetrievalIndex":
    n = min(max_per_expert, max(len(t) for t in texts_per_expert))
    dim = None
    rows, valid = [], []
    for texts in texts_per_expert:
      texts = list(texts)[:n]
      emb = embedder.embed(texts) if texts else np.zeros((0, 0), np.float32)
      dim = dim or emb.shape[1]
      pad = np.zeros((n - len(texts), dim), np.float32)
      rows.append(np.concatenate([emb, pad]) if len(texts) else pad)
      valid.append(np.arange(n) < len(texts))
    return cls(np.stack(rows).astype(np.float32), np.stack(valid))

  def choose(self, query_embeddings: np.ndarray) -> np.ndarray:
    """[Q, dim] unit-norm queries -> [Q] expert indices: argmax over experts of the max cosine similarity."""
    sims = np.einsum("qd,end->qen", query_embeddings, self.embeddings)  # [Q, E, N]
    sims = np.where(self.valid[None], sims, -np.inf)
    return np.argmax(sims.max(-1), axis=-1)

  def save(self, path) -> None:
    np.savez(path, embeddings=self.embeddings, valid=self.valid)

  @classmethod
  def load(cls, path) -> "RetrievalIndex":
    data = np.load(path)
    return cls(data["embeddings"], data["valid"])
