"""Our orbax checkpoints and the T5X importers (legacy msgpack + TensorStore zarr, and Orbax)."""

import json
import shutil

import flax
import jax
import ml_dtypes
import numpy as np
import pytest

from phatgoose_jax import checkpoints
from phatgoose_jax.importers.common import CheckpointMismatchError
from phatgoose_jax.importers.t5x import import_t5x_checkpoint


def _assert_trees_equal(a, b):
  fa, fb = (flax.traverse_util.flatten_dict(x, sep="/") for x in (a, b))
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_import_save_restore_gives_identical_logits(tiny_model, imported, padded_batch, tmp_path):
  model, params = tiny_model
  config, _ = imported
  path = checkpoints.save_checkpoint(tmp_path / "ckpt", params, config, {"note": "test"})
  assert json.loads((path / "config.json").read_text())["note"] == "test"
  config2, params2 = checkpoints.load_checkpoint(path)
  assert config2 == config
  _assert_trees_equal(params, params2)
  np.testing.assert_array_equal(model.jit_logits(params2, padded_batch), model.jit_logits(params, padded_batch))
  # Restoring onto an explicit sharding places every array there.
  device = jax.local_devices()[0]
  shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(device), params)
  _, params3 = checkpoints.load_checkpoint(path, shardings=shardings)
  assert all(x.sharding == jax.sharding.SingleDeviceSharding(device) for x in jax.tree_util.tree_leaves(params3))


def test_save_refuses_to_overwrite(imported, tmp_path):
  config, params = imported
  target = tmp_path / "ckpt"
  target.mkdir()
  (target / "other_run.txt").write_text("keep")
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    checkpoints.save_checkpoint(target, params, config)
  assert [p.name for p in target.iterdir()] == ["other_run.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_corrupt_checkpoints_are_reported(imported, tmp_path):
  config, params = imported
  path = checkpoints.save_checkpoint(tmp_path / "ckpt", params, config)
  broken = tmp_path / "broken"
  shutil.copytree(path, broken)
  (broken / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json is corrupt"):
    checkpoints.load_checkpoint(broken)
  truncated = tmp_path / "truncated"
  shutil.copytree(path, truncated)
  for f in (truncated / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:100])
  with pytest.raises(ValueError, match="cannot restore the parameters"):
    checkpoints.load_checkpoint(truncated)
  with pytest.raises(FileNotFoundError, match="not a phatgoose_jax checkpoint"):
    checkpoints.load_checkpoint(tmp_path)


def write_t5x_legacy_checkpoint(directory, params, step=100):
  """Writes T5X's legacy layout the way `t5x.checkpoints.Checkpointer` does: one zarr array per parameter
  (gzip, TensorStore), its msgpack leaf a spec with a path relative to the checkpoint dir. Embeddings are
  bfloat16 (as in bf16 T5X runs); layer-norm scales are stored inline, as T5X does for unpartitioned arrays."""
  import tensorstore as ts

  directory.mkdir(parents=True)
  flat = flax.traverse_util.flatten_dict(params)
  target = {}
  for path, value in flat.items():
    value = np.asarray(value)
    if path[-1] == "scale":
      target[path] = value
      continue
    if path[-1] == "embedding":
      value = value.astype(ml_dtypes.bfloat16)
    name = "target." + ".".join(path)
    spec = {"driver": "zarr", "dtype": "bfloat16" if value.dtype == ml_dtypes.bfloat16 else "float32",
            "kvstore": {"driver": "file", "path": name},
            "metadata": {"compressor": {"id": "gzip"}, "shape": list(value.shape), "chunks": list(value.shape)}}
    absolute = json.loads(json.dumps(spec))
    absolute["kvstore"]["path"] = str(directory / name)
    ts.open(absolute, create=True, open=True).result().write(value).result()
    target[path] = spec
  state = {"version": 3, "optimizer": {"target": flax.traverse_util.unflatten_dict(target),
                                       "state": {"step": np.array(step), "param_states": {}}}}
  (directory / "checkpoint").write_bytes(flax.serialization.msgpack_serialize(state))


def test_import_t5x_legacy_layout(imported, tmp_path):
  config, params = imported
  write_t5x_legacy_checkpoint(tmp_path / "model" / "checkpoint_100", params, step=100)
  write_t5x_legacy_checkpoint(tmp_path / "model" / "checkpoint_50", jax.tree_util.tree_map(np.zeros_like, params))
  got_config, got = import_t5x_checkpoint(tmp_path / "model")  # latest step, config read off the shapes
  assert got_config == config.replace(dropout_rate=0.1)
  expected = jax.tree_util.tree_map(np.asarray, params)
  expected["token_embedder"]["embedding"] = expected["token_embedder"]["embedding"].astype(
      ml_dtypes.bfloat16).astype(np.float32)
  _assert_trees_equal(got, expected)
  _, older = import_t5x_checkpoint(tmp_path / "model", step=50)
  assert not np.any(older["decoder"]["logits_dense"]["kernel"])


def test_import_t5x_orbax_layout(imported, tmp_path):
  import orbax.checkpoint as ocp

  config, params = imported
  step_dir = tmp_path / "checkpoint_7"
  step_dir.mkdir()
  ocp.PyTreeCheckpointer().save(step_dir / "state", {"target": params, "state": {"step": np.array(7)}})
  got_config, got = import_t5x_checkpoint(step_dir, config=config)
  assert got_config == config
  _assert_trees_equal(got, params)


def test_t5x_import_names_mismatches(imported, tmp_path):
  config, params = imported
  damaged = jax.tree_util.tree_map(np.asarray, params)
  damaged["encoder"]["layers_0"]["mlp"]["wo"]["kernel"] = np.zeros((24, 8), np.float32)
  write_t5x_legacy_checkpoint(tmp_path / "checkpoint_1", damaged)
  with pytest.raises(CheckpointMismatchError, match=r"parameter encoder/layers_0/mlp/wo/kernel: checkpoint has "
                                                    r"shape \(24, 8\).*model expects \(24, 16\)"):
    import_t5x_checkpoint(tmp_path / "checkpoint_1", config=config)
  with pytest.raises(FileNotFoundError, match="holds no T5X checkpoint"):
    import_t5x_checkpoint(tmp_path / "checkpoint_1" / "target.token_embedder.embedding")
