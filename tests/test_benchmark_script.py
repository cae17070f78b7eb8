"""The routing benchmark runs (tiny shapes, few iterations): its rows, tables and JSON, kernels that agree
with the dense reference, and arithmetic floors counted by hand."""

import json

import jax
import pytest

from phatgoose_jax import benchmark, routing


def test_floor_by_hand():
  cfg = benchmark.TINY  # d=32, 2 heads x 16, gated MLP 64, one encoder and one decoder layer, vocab 128
  b, n = 2, 16
  tokens = b * n  # per stack
  d, f = 32, 64
  # Linear layers: encoder q,k,v,o + wi_0, wi_1, wo; decoder self q,k,v,o + cross q,o (decoder tokens) and
  # cross k,v (encoder tokens) + the MLP.
  linear = tokens * (4 * d * d + 3 * d * f) + tokens * (4 * d * d + 2 * d * d + 3 * d * f) + tokens * 2 * d * d
  attention = 2 * 32 * (tokens * n + tokens * (n + n))
  logits = tokens * d * 128
  base = linear + attention + logits
  # Router: E * d_in per token and site; 18 sites, of which the MLP outputs read d_in = 64.
  experts, k, r = 8, 2, 16
  router = tokens * experts * (16 * d + 2 * f)
  lora = tokens * k * r * (sum([2 * d] * 12 + [d + f] * 6))
  macs = benchmark.forward_macs(cfg, b, n, n, experts, k, r)
  assert macs == {"base": base, "router": router, "lora": lora}
  assert benchmark.arithmetic_floor(macs) == pytest.approx((base + router + lora) / base)


def test_auto_kernels_counted_from_site_shapes():
  base = benchmark.config_of("base")  # 12 encoder layers x 7 sites; 12 decoder layers x 11, 2 of them on encoder tokens
  cpu = jax.default_backend() == "cpu"
  assert benchmark.auto_kernels(base, 2048, 2048, 36, 2) == {"looped" if cpu else "blocked": 216}
  # A decoding step (8 tokens: fewer pairs than experts): looped on CPU, gather on accelerators; the
  # encoder-side sites see 8 x 64 tokens.
  assert benchmark.auto_kernels(base, 8 * 64, 8, 36, 2) == ({"looped": 216} if cpu else {"blocked": 108, "gather": 108})
  assert benchmark.auto_kernels(base, 2048, 2048, 8, 2) == {"dense": 216}  # E*r = 128: dense


def test_tiny_run_rows_tables_and_agreement(tmp_path):
  preset = benchmark.Preset(
      shapes=("tiny",), score_rows=benchmark._grid(("tiny",), (4,), (2,), benchmark.KERNELS, ((2, 16),)),  # pylint: disable=protected-access
      decode_rows=(("tiny", 8, 2, "gather", 2),), memory_rows=(("tiny", 64, 2, "auto", (2, 16)),),
      training_shape=None, repeats=2)  # the training rows compile three steps: benchmarks only
  results = benchmark.run(preset, check=True, progress=lambda msg: None)
  assert [r["kernel"] for r in results["score"]] == list(routing.KERNELS) + ["auto"]
  for row in results["score"]:
    assert row["max_abs_diff_vs_dense"] <= 1e-5, row["kernel"]  # every kernel computes the same scores
    assert row["ratio"] > 0 and row["floor"] > 1 and row["compile_seconds"] > 0 and row["routed_memory_bytes"] > 0
  assert results["decode"][0]["routed_ms_per_step"] != 0 and results["memory"][0]["routed_memory_bytes"] > 0
  assert len(results["auto_vs_best"]) == 1 and results["auto_vs_best"][0]["auto_runs"] == "dense"
  assert results["score"][-1]["auto_kernels"] == {"dense": 18}  # E*r = 64 at all 18 sites
  tables = benchmark.format_tables(results)
  for heading in ("## Scoring", "## Incremental decoding", "## Memory", "## Automatic choice"):
    assert heading in tables
  assert "| tiny | 4 | 2 | auto (dense) | 2x16 |" in tables
  assert tables.count("| tiny | 4 | 2 |") == 1 + len(routing.KERNELS) + 1  # score rows + the auto-vs-best row
  json.dumps(results)  # the JSON file is this object
  # The command line refuses to overwrite an earlier result.
  existing = tmp_path / "r.json"
  existing.write_text("{}")
  with pytest.raises(FileExistsError):
    benchmark.main(["--preset", "tiny", "--output", str(existing)])
  assert existing.read_text() == "{}"
