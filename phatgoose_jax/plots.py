"""Routing figures: expert usage per site (heatmap) and the per-token routing of one example."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np

from phatgoose_jax import adapters, evaluation, routers


def _site_order(sites: Sequence[str]) -> list[str]:
  """Encoder before decoder, by layer, then module, so that the heatmap reads top to bottom like the model."""
  def key(site):
    stack, layer, *rest = site.split("/")
    return (stack != "encoder", int(layer.split("_")[1]), "/".join(rest))
  return sorted(sites, key=key)


def collect_routing(model, params, batch) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Top-k indices per site [batch, length, k] and the token mask each site's inputs live on."""
  _, intermediates = jax.jit(lambda p, b: model.score_batch(p, b, return_intermediates=True))(params, batch)
  flat = adapters.flatten({k: v for k, v in intermediates.items()})
  indices = {p[:-len("/routing_indices")]: np.asarray(v[0]) for p, v in flat.items() if p.endswith("/routing_indices")}
  enc = np.asarray(batch["encoder_input_tokens"]) > 0
  dec = np.asarray(batch["decoder_target_tokens"]) > 0
  masks = {s: np.asarray(routers.site_input_mask(s, enc, dec)) for s in indices}
  return indices, masks


def usage_per_site(indices: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray], num_experts: int
                   ) -> dict[str, np.ndarray]:
  """Fraction of routed (token, slot) pairs that went to each expert, per site."""
  out = {}
  for site, idx in indices.items():
    chosen = idx[masks[site]]  # [tokens, k]
    out[site] = np.bincount(chosen.reshape(-1), minlength=num_experts) / max(chosen.size, 1)
  return out


def routing_figures(model, params, expert_names: Sequence[str], tasks: Sequence[evaluation.TaskData],
                    feature_lengths: Mapping[str, int], out_dir: Path, examples_per_task: int = 32) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [ex for t in tasks for ex in t.examples[:examples_per_task]]
  usage_sum, count = None, 0
  first = None
  for batch, batch_rows, _ in evaluation.make_batches(rows, 64, feature_lengths, tasks[0].vocabulary.eos_id):
    indices, masks = collect_routing(model, params, batch)
    usage = usage_per_site(indices, masks, len(expert_names))
    usage_sum = usage if usage_sum is None else {s: usage_sum[s] + usage[s] for s in usage}
    count += 1
    if first is None:
      first = (batch, indices, batch_rows[0])
  sites = _site_order(list(usage_sum))
  matrix = np.stack([usage_sum[s] / count for s in sites])
  fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(expert_names), 2 + 0.18 * len(sites)))
  im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
  ax.set_xticks(range(len(expert_names)), [n.replace("pg_offline_", "") for n in expert_names], rotation=45, ha="right")
  ax.set_yticks(range(len(sites)), [s.replace("encoder_decoder_attention", "cross").replace("self_attention", "self")
                                    for s in sites], fontsize=6)
  ax.set_title("PHATGOOSE expert usage per site (held-out tasks)")
  fig.colorbar(im, ax=ax, label="share of top-k slots")
  fig.tight_layout()
  fig.savefig(out_dir / "routing_usage.png", dpi=120)
  plt.close(fig)

  batch, indices, example = first
  vocab = tasks[0].vocabulary
  enc_tokens = [t for t in np.asarray(batch["encoder_input_tokens"][0]) if t > 0]
  labels = [vocab.decode([int(t)]) or f"<{int(t)}>" for t in enc_tokens]
  enc_sites = [s for s in _site_order(list(indices)) if s.startswith("encoder/")]
  top1 = np.stack([indices[s][0, :len(enc_tokens), 0] for s in enc_sites])  # [sites, tokens]
  fig, ax = plt.subplots(figsize=(2 + 0.22 * len(labels), 1.5 + 0.2 * len(enc_sites)))
  cmap = plt.get_cmap("tab10", len(expert_names))
  ax.imshow(top1, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(expert_names) - 0.5)
  ax.set_xticks(range(len(labels)), labels, fontsize=7)
  ax.set_yticks(range(len(enc_sites)), enc_sites, fontsize=6)
  handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(expert_names))]
  ax.legend(handles, [n.replace("pg_offline_", "") for n in expert_names], bbox_to_anchor=(1.01, 1), loc="upper left",
            fontsize=7, title="top-1 expert")
  text = evaluation._text(example.get("inputs_pretokenized", b""))  # pylint: disable=protected-access
  ax.set_title(f"per-token routing (encoder): {text[:70]}", fontsize=8)
  fig.tight_layout()
  fig.savefig(out_dir / "routing_tokens.png", dpi=120)
  plt.close(fig)
