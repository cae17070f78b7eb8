"""Sharded evaluation, training and checkpoints on 8 simulated CPU devices (in a subprocess, because the
device count is fixed when JAX starts) equal the single-device run."""

import atexit
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TOLERANCE = 1e-5

# The checks compile ~30 programs in their own process. It starts when pytest collects this module, so it
# runs beside the rest of the suite (XLA compiles mostly on one core) and is collected by the fixture.
_LOG = tempfile.TemporaryFile(mode="w+")
_OUTPUT = tempfile.TemporaryFile(mode="w+")
_PROCESS = subprocess.Popen([sys.executable, str(Path(__file__).with_name("sharding_checks.py"))], stdout=_OUTPUT,
                            stderr=_LOG, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
atexit.register(lambda: _PROCESS.poll() is None and _PROCESS.kill())


@pytest.fixture(scope="module")
def checks():
  try:
    returncode = _PROCESS.wait(timeout=900)
  except subprocess.TimeoutExpired:
    _PROCESS.kill()
    pytest.fail("sharding_checks.py did not finish in 15 minutes")
  _LOG.seek(0)
  _OUTPUT.seek(0)
  if returncode != 0:
    pytest.fail(f"sharding_checks.py failed:\n{_LOG.read()[-4000:]}")
  return json.loads(_OUTPUT.read().strip().splitlines()[-1])


def test_eight_devices(checks):
  assert checks["devices"] == 8


def test_every_mesh_and_kernel_equals_one_device(checks):
  assert len(checks["meshes"]) == 10  # 5 meshes with dense; gather, grouped, looped on data2_expert4; blocked on two
  for name, r in checks["meshes"].items():
    if name.endswith("/dense"):
      assert r["logits"] <= TOLERANCE, name
    assert r["scores"] <= TOLERANCE, name
    assert r["routing_weights"] <= TOLERANCE, name
    assert r["routing_indices_equal"], name
    assert r["tokens_equal"], name
  assert checks["model_method_4x2"]["scores"] <= TOLERANCE and checks["model_method_4x2"]["tokens_equal"]


def test_parameters_are_really_sharded(checks):
  model = checks["specs_2x4"]
  assert model["encoder/layers_0/mlp/wi_0/kernel"] == [None, "model"]           # mlp -> model
  assert model["encoder/layers_0/attention/query/lora_a"] == ["model", None, None]  # expert -> model, first
  assert model["decoder/layers_0/mlp/wo/lora_b"] == ["model", None, None]
  assert model["decoder/layers_0/self_attention/key/router"] == ["model", None]
  expert = checks["specs_data2_expert4"]
  assert expert["encoder/layers_0/attention/query/lora_a"] == ["expert", None, None]
  assert expert["decoder/layers_0/self_attention/key/router"] == ["expert", None]
  assert checks["lora_a_shard_shape_data2_expert4"] == [1, 16, 2]  # 4 experts over 4 devices


def test_training_steps_match_one_device(checks):
  t = checks["training"]
  for stage in ("expert", "gate"):
    assert t[stage] <= TOLERANCE, stage
    assert t[f"{stage}_moved"] > 1e-4, stage  # the step did change the parameters
  assert t["expert_sharded_leaf"][1] == "P(None, 'model')"  # lora_b [lora_rank, mlp] over the model axis
  assert t["gate_sharded_leaf"][1] == "P(None,)"  # a gate [embed] is replicated


def test_checkpoint_restores_across_meshes(checks):
  c = checks["checkpoint"]
  assert c["equal_2x4"] and c["equal_1"]
  assert "model" in c["spec_2x4"]


def test_clear_refusals(checks):
  e = checks["errors"]
  assert "logical axis name(s) ['experts'] have no partitioning rule" in e["unknown_axis"]
  assert "dimension 0 ('batch', size 6) is not divisible by mesh axis data of size 4" in e["batch"]
  assert "mlp/wi_0/kernel: dimension 1 ('mlp', size 20) is not divisible by mesh axis model of size 8" in e["param"]
  assert "8 devices cannot be split into model=3" in e["mesh"]
