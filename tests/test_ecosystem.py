"""Routing analysis files and TensorBoard summaries."""

import csv
import json

import numpy as np
import pytest

from phatgoose_jax import analysis, evaluation, library, telemetry
from test_adapters import random_expert


def test_routing_analysis_writes_png_html_and_csv(tiny_model, train_tasks, tmp_path):
  model, params = tiny_model
  config = model.module.config
  names = ["alpha", "beta", "gamma"]
  stacked = library.stack_experts([random_expert(n, i + 1, config, params) for i, n in enumerate(names)])
  routed, routed_params = library.routed_model(config, params, stacked, top_k=2, record_routing=True)
  rng = np.random.default_rng(0)
  examples = [{"inputs": rng.integers(2, config.vocab_size, rng.integers(3, 9)).astype(np.int32),
               "targets": rng.integers(2, config.vocab_size, rng.integers(2, 6)).astype(np.int32),
               "inputs_pretokenized": f"example {i}".encode()} for i in range(7)]
  for ex in examples:
    ex["inputs"][-1] = ex["targets"][-1] = 1
  import seqio
  task = evaluation.TaskData("synthetic", "predict", examples, [], None, seqio.PassThroughVocabulary(config.vocab_size))
  summary = analysis.analyze_routing(routed, routed_params, stacked.names, task, {"inputs": 8, "targets": 6},
                                     tmp_path / "out", oracle_expert="beta", batch_size=4)
  out = tmp_path / "out"
  for f in ("routing_usage.png", "routing_tokens.png"):
    assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / f).stat().st_size > 2000
  page = (out / "routing.html").read_text()
  assert page.startswith("<!doctype html>") and "<script" not in page and "http" not in page
  assert page.count("<h2>") == 4  # three examples and the usage table
  rows = list(csv.DictReader(open(out / "usage.csv")))
  sites = list(csv.DictReader(open(out / "sites.csv")))
  k = 2
  enc_tokens = sum(len(ex["inputs"]) for ex in examples)
  dec_tokens = sum(len(ex["targets"]) for ex in examples)
  for site in sites:
    counts = sum(int(r["count"]) for r in rows if r["site"] == site["site"])
    assert counts == int(site["routed_tokens"]) * k, site["site"]
    # Encoder sites and cross-attention key/value see the inputs; the other decoder sites the targets.
    reads_inputs = site["site"].startswith("encoder/") or site["site"].endswith(("encoder_decoder_attention/key",
                                                                                 "encoder_decoder_attention/value"))
    assert int(site["routed_tokens"]) == (enc_tokens if reads_inputs else dec_tokens), site["site"]
    assert 0.0 <= float(site["usage_entropy_bits"]) <= np.log2(3) + 1e-9
    assert 0.0 <= float(site["oracle_top_1"]) <= float(site["oracle_in_top_k"]) <= 1.0
  assert sum(int(r["count"]) for r in rows) == summary["routed_token_site_pairs"] * k
  assert json.loads((out / "summary.json").read_text())["oracle_expert"] == "beta"
  with pytest.raises(ValueError, match="oracle expert 'delta' is not in the library"):
    analysis.analyze_routing(routed, routed_params, stacked.names, task, {"inputs": 8, "targets": 6}, tmp_path / "x",
                             oracle_expert="delta")


def test_tensorboard_summaries_are_readable(tmp_path):
  import tensorflow as tf

  with telemetry.MetricWriter(tmp_path / "tb") as writer:
    writer.write_scalars(1, {"loss": 2.5, "learning_rate": 1e-3})
    writer.write_scalars(2, {"loss": 2.0})
  events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(events) == 1
  seen = {}
  for event in tf.compat.v1.train.summary_iterator(str(events[0])):
    for value in event.summary.value:
      seen[(event.step, value.tag)] = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
  assert seen == {(1, "loss"): 2.5, (1, "learning_rate"): pytest.approx(1e-3), (2, "loss"): 2.0}
  lines = [json.loads(l) for l in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
  assert [(l["step"], l.get("loss")) for l in lines] == [(1, 2.5), (2, 2.0)]
