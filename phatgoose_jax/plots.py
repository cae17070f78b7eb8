"""Routing figures: expert usage per site (heatmap) and the per-token routing of one example."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from phatgoose_jax import adapters, evaluation, routers


def _site_order(sites: Sequence[str]) -> list[str]:
  """Encoder before decoder, by layer, then module, so that the heatmap reads top to bottom like the model."""
  def key(site):
    stack, layer, *rest = site.split("/")
    return (stack != "encoder", int(layer.split("_")[1]), "/".join(rest))
  return sorted(sites, key=key)


def collect_routing(model, params, batch, with_weights: bool = False):
  """Top-k indices per site [batch, length, k] and the token mask each site's inputs live on (and, with
  with_weights, the top-k weights [batch, length, k])."""
  _, intermediates = model.jit_score_intermediates(params, batch)
  flat = adapters.flatten({k: v for k, v in intermediates.items()})
  indices = {p[:-len("/routing_indices")]: np.asarray(v[0]) for p, v in flat.items() if p.endswith("/routing_indices")}
  enc = np.asarray(batch["encoder_input_tokens"]) > 0
  dec = np.asarray(batch["decoder_target_tokens"]) > 0
  masks = {s: np.asarray(routers.site_input_mask(s, enc, dec)) for s in indices}
  if with_weights:
    weights = {p[:-len("/routing_weights")]: np.asarray(v[0]) for p, v in flat.items() if p.endswith("/routing_weights")}
    return indices, masks, weights
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
  usage_heatmap(np.stack([usage_sum[s] / count for s in sites]), sites, expert_names, out_dir / "routing_usage.png",
                "PHATGOOSE expert usage per site (held-out tasks)")
  batch, indices, example = first
  text = evaluation._text(example.get("inputs_pretokenized", b""))  # pylint: disable=protected-access
  token_routing_figure(batch, indices, 0, tasks[0].vocabulary, expert_names, out_dir / "routing_tokens.png",
                       f"per-token routing (encoder): {text[:70]}")


def _short_expert(name: str) -> str:
  return name.replace("pg_offline_", "")


def _short_site(site: str) -> str:
  return site.replace("encoder_decoder_attention", "cross").replace("self_attention", "self")


def usage_heatmap(matrix: np.ndarray, sites: Sequence[str], expert_names: Sequence[str], path: Path, title: str) -> None:
  """matrix [sites, experts]: a share of top-k slots per site."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(expert_names), 2 + 0.18 * len(sites)))
  im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
  ax.set_xticks(range(len(expert_names)), [_short_expert(n) for n in expert_names], rotation=45, ha="right")
  ax.set_yticks(range(len(sites)), [_short_site(s) for s in sites], fontsize=6)
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label="share of top-k slots")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def encoder_top1(batch, indices: Mapping[str, np.ndarray], row: int) -> tuple[list[int], list[str], np.ndarray]:
  """(tokens, encoder sites, top-1 expert [sites, tokens]) of one example's encoder."""
  tokens = [int(t) for t in np.asarray(batch["encoder_input_tokens"][row]) if t > 0]
  sites = [s for s in _site_order(list(indices)) if s.startswith("encoder/")]
  return tokens, sites, np.stack([indices[s][row, :len(tokens), 0] for s in sites])


def token_label(vocab, token: int) -> str:
  """A token's text, or <id> where the vocabulary has none (pass-through vocabularies, special ids)."""
  text = vocab.decode([int(token)])
  return text if isinstance(text, str) and text else f"<{int(token)}>"


def token_routing_figure(batch, indices, row: int, vocab, expert_names: Sequence[str], path: Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  tokens, sites, top1 = encoder_top1(batch, indices, row)
  labels = [token_label(vocab, t) for t in tokens]
  fig, ax = plt.subplots(figsize=(2 + 0.22 * len(labels), 1.5 + 0.2 * len(sites)))
  cmap = plt.get_cmap("tab10" if len(expert_names) <= 10 else "tab20", len(expert_names))
  ax.imshow(top1, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(expert_names) - 0.5)
  ax.set_xticks(range(len(labels)), labels, fontsize=7)
  ax.set_yticks(range(len(sites)), sites, fontsize=6)
  handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(expert_names))]
  ax.legend(handles, [_short_expert(n) for n in expert_names], bbox_to_anchor=(1.01, 1), loc="upper left",
            fontsize=7, title="top-1 expert")
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
