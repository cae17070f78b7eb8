"""What the router does on a task: expert usage per site, routing entropy, agreement with the task's
oracle expert, and the per-token routing of a few examples (PNG, CSV and a self-contained HTML page)."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from phatgoose_jax import evaluation, plots


def _entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
  p = np.asarray(p, np.float64)
  return -np.sum(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def analyze_routing(model, params, expert_names: Sequence[str], task: evaluation.TaskData,
                    feature_lengths: Mapping[str, int], out_dir: str | Path, oracle_expert: str | None = None,
                    batch_size: int = 32, show_examples: int = 3) -> dict:
  """Runs the routed model (recording routing) teacher-forced over the task's examples and writes
  usage.csv, sites.csv, summary.json, routing_usage.png, routing_tokens.png and routing.html into out_dir.

  usage.csv counts every routed (token, top-k slot) pair per site and expert, so a site's counts sum to
  its routed tokens times k. Entropies are in bits: of a site's usage distribution, and the mean over
  tokens of the top-k weights. Oracle agreement: the share of routed tokens whose top-k (top-1) holds the
  oracle expert.
  """
  out_dir = Path(out_dir)
  if oracle_expert is not None and oracle_expert not in expert_names:
    raise ValueError(f"oracle expert {oracle_expert!r} is not in the library ({', '.join(expert_names)})")
  out_dir.mkdir(parents=True, exist_ok=True)
  num_experts = len(expert_names)
  oracle = expert_names.index(oracle_expert) if oracle_expert is not None else None
  counts: dict[str, np.ndarray] = {}
  tokens: dict[str, int] = {}
  token_entropy: dict[str, float] = {}
  in_topk: dict[str, int] = {}
  top1: dict[str, int] = {}
  shown = []
  for batch, rows, _ in evaluation.make_batches(task.examples, batch_size, feature_lengths, task.vocabulary.eos_id):
    indices, masks, weights = plots.collect_routing(model, params, batch, with_weights=True)
    for site, idx in indices.items():
      chosen = idx[masks[site]]  # [tokens, k]
      counts[site] = counts.get(site, 0) + np.bincount(chosen.reshape(-1), minlength=num_experts)
      tokens[site] = tokens.get(site, 0) + chosen.shape[0]
      w = weights[site][masks[site]]
      w = w / np.maximum(w.sum(-1, keepdims=True), 1e-12)
      token_entropy[site] = token_entropy.get(site, 0.0) + float(_entropy_bits(w).sum())
      if oracle is not None:
        in_topk[site] = in_topk.get(site, 0) + int(np.any(chosen == oracle, axis=-1).sum())
        top1[site] = top1.get(site, 0) + int((chosen[:, 0] == oracle).sum())
    for r in range(min(len(rows), show_examples - len(shown))):
      shown.append((batch, indices, r, rows[r]))
  if not counts:
    raise ValueError("the model records no routing (is it a routed model with record_routing=True?)")
  sites = plots._site_order(list(counts))  # pylint: disable=protected-access

  with open(out_dir / "usage.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["site", "expert", "count", "share"])
    for site in sites:
      for e, name in enumerate(expert_names):
        writer.writerow([site, name, int(counts[site][e]), f"{counts[site][e] / counts[site].sum():.6f}"])
  site_rows = []
  for site in sites:
    row = {"site": site, "routed_tokens": tokens[site],
           "usage_entropy_bits": float(_entropy_bits(counts[site] / counts[site].sum())),
           "mean_token_entropy_bits": token_entropy[site] / max(tokens[site], 1)}
    if oracle is not None:
      row["oracle_in_top_k"] = in_topk[site] / max(tokens[site], 1)
      row["oracle_top_1"] = top1[site] / max(tokens[site], 1)
    site_rows.append(row)
  with open(out_dir / "sites.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(site_rows[0]))
    writer.writeheader()
    writer.writerows(site_rows)

  usage = np.stack([counts[s] / counts[s].sum() for s in sites])
  plots.usage_heatmap(usage, sites, expert_names, out_dir / "routing_usage.png", f"expert usage per site: {task.name}")
  batch, indices, r, example = shown[0]
  text = evaluation._text(example.get("inputs_pretokenized", b""))  # pylint: disable=protected-access
  plots.token_routing_figure(batch, indices, r, task.vocabulary, expert_names, out_dir / "routing_tokens.png",
                             f"per-token routing (encoder): {text[:70]}")
  (out_dir / "routing.html").write_text(_html_page(task, expert_names, shown, usage, sites, site_rows))

  total_tokens = sum(tokens.values())
  summary = {"task": task.name, "experts": list(expert_names), "examples": len(task.examples), "sites": len(sites),
             "routed_token_site_pairs": total_tokens, "top_k": int(next(iter(indices.values())).shape[-1]),
             "usage_share": {n: float(usage[:, e].mean()) for e, n in enumerate(expert_names)},
             "mean_usage_entropy_bits": float(np.mean([r["usage_entropy_bits"] for r in site_rows]))}
  if oracle is not None:
    summary["oracle_expert"] = oracle_expert
    summary["oracle_in_top_k"] = sum(in_topk.values()) / total_tokens
    summary["oracle_top_1"] = sum(top1.values()) / total_tokens
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


_PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
            "#bab0ac", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _html_page(task, expert_names, shown, usage, sites, site_rows) -> str:
  """One file, no scripts or external assets: per-token top-1 experts of the examples, the usage table."""
  color = lambda e: _PALETTE[e % len(_PALETTE)]
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Routing: {html.escape(task.name)}</title>",
           "<style>body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse;font-size:12px}"
           "td,th{border:1px solid #ddd;padding:2px 4px;text-align:center} th.site{text-align:left}"
           ".legend span{display:inline-block;padding:2px 8px;margin:2px;color:#fff;border-radius:3px}</style></head><body>",
           f"<h1>Routing on {html.escape(task.name)}</h1><div class='legend'>"
           + "".join(f"<span style='background:{color(e)}'>{html.escape(n)}</span>" for e, n in enumerate(expert_names))
           + "</div>"]
  for batch, indices, r, example in shown:
    tokens, enc_sites, top1 = plots.encoder_top1(batch, indices, r)
    text = evaluation._text(example.get("inputs_pretokenized", b""))  # pylint: disable=protected-access
    labels = [plots.token_label(task.vocabulary, t) for t in tokens]
    parts.append(f"<h2>{html.escape(text[:200])}</h2><p>top-1 expert per encoder site (row) and input token "
                 f"(column)</p><table><tr><th></th>" + "".join(f"<th>{html.escape(l)}</th>" for l in labels) + "</tr>")
    for site, row in zip(enc_sites, top1):
      parts.append(f"<tr><th class='site'>{html.escape(site)}</th>" + "".join(
          f"<td style='background:{color(int(e))}' title='{html.escape(expert_names[int(e)])}'>&nbsp;</td>" for e in row)
          + "</tr>")
    parts.append("</table>")
  parts.append("<h2>Expert usage per site (share of top-k slots)</h2><table><tr><th>site</th>"
               + "".join(f"<th>{html.escape(n)}</th>" for n in expert_names) + "<th>usage entropy (bits)</th></tr>")
  for site, shares, row in zip(sites, usage, site_rows):
    parts.append(f"<tr><th class='site'>{html.escape(site)}</th>" + "".join(
        f"<td style='background:rgba(78,121,167,{v:.3f})'>{v:.2f}</td>" for v in shares)
        + f"<td>{row['usage_entropy_bits']:.2f}</td></tr>")
  parts.append("</table></body></html>")
  return "\n".join(parts)
