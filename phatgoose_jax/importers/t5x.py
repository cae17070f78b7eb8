"""Import T5X checkpoints: the legacy msgpack + TensorStore/zarr layout and the Orbax layout.

Legacy (`t5x/checkpoints.py::Checkpointer`): `checkpoint_<step>/checkpoint` is msgpack
`{'version', 'optimizer': {'target': params, 'state': ...}}`; each partitioned array is its own zarr
array beside it, its msgpack leaf a TensorStore spec with a path relative to the checkpoint directory.
Orbax (T5X's `OrbaxCheckpointManagerInterface`): `checkpoint_<step>/state/` holds the same
`{'target', 'state'}` tree. Only `target` (the parameters) is imported; optimizer slots are skipped.
T5X's parameter tree is ours, so paths carry over unchanged.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping

import flax
import numpy as np

from phatgoose_jax.config import T5Config
from phatgoose_jax.importers.common import (CheckpointMismatchError, check_against_config,
                                            infer_config_from_shapes, unflatten)

LEGACY = "t5x_legacy"
ORBAX = "t5x_orbax"


def resolve_checkpoint_dir(path: str | Path, step: int | None = None) -> Path:
  """A `checkpoint_<step>` directory, given it or a model directory that holds several (latest by default)."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"T5X checkpoint {path} does not exist")
  if (path / "checkpoint").is_file() or (path / "state").is_dir() or (path / "_METADATA").is_file():
    return path
  steps = {}
  for child in path.iterdir():
    m = re.fullmatch(r"checkpoint_(\d+)", child.name)
    if m and child.is_dir():
      steps[int(m.group(1))] = child
  if not steps:
    raise FileNotFoundError(f"{path} holds no T5X checkpoint (no 'checkpoint' file, no 'state/' folder, "
                            f"no checkpoint_<step> folders)")
  if step is None:
    return steps[max(steps)]
  if step not in steps:
    raise FileNotFoundError(f"{path} has no checkpoint_{step}; steps present: {sorted(steps)}")
  return steps[step]


def detect_checkpoint_type(checkpoint_dir: Path) -> str:
  """T5X's `detect_checkpoint_type`, restricted to the two formats we read."""
  if (checkpoint_dir / "_METADATA").is_file() or (checkpoint_dir / "state" / "_METADATA").is_file():
    return ORBAX
  ckpt_file = checkpoint_dir / "checkpoint"
  if ckpt_file.is_file():
    head = ckpt_file.read_bytes()[:64]
    if head.startswith(b"model_checkpoint_path"):
      raise CheckpointMismatchError(f"{checkpoint_dir} is a TensorFlow (Mesh TensorFlow) checkpoint; convert it "
                                    f"with T5X's checkpoint_importer first")
    return LEGACY
  if (checkpoint_dir / "state").is_dir():
    return ORBAX
  raise CheckpointMismatchError(f"{checkpoint_dir}: not a T5X checkpoint (neither a msgpack 'checkpoint' file nor "
                                f"an Orbax 'state/' folder)")


def _is_tensorstore_spec(leaf: Any) -> bool:
  return isinstance(leaf, Mapping) and "driver" in leaf


def _read_tensorstore(spec: Mapping, checkpoint_dir: Path, name: str) -> np.ndarray:
  import tensorstore as ts

  spec = copy.deepcopy(dict(spec))
  if "kvstore" in spec:
    kvstore = dict(spec["kvstore"])
    relative = kvstore.get("path", "")
    # T5X writes GCS specs with a dummy bucket for local runs; the files sit beside `checkpoint`.
    spec["kvstore"] = {"driver": "file", "path": str(checkpoint_dir / Path(relative).name)}
  elif "path" in spec:  # older T5X specs keep `path` at the top level
    spec["kvstore"] = {"driver": "file", "path": str(checkpoint_dir / Path(spec.pop("path")).name)}
  try:
    return np.asarray(ts.open(spec, open=True).result().read().result())
  except Exception as e:
    raise CheckpointMismatchError(f"cannot read array {name} ({spec['kvstore']['path']}): {e}") from e


def _read_legacy(checkpoint_dir: Path) -> dict[str, np.ndarray]:
  raw = (checkpoint_dir / "checkpoint").read_bytes()
  try:
    state = flax.serialization.msgpack_restore(raw)
  except Exception as e:
    raise CheckpointMismatchError(f"{checkpoint_dir / 'checkpoint'} is not a readable msgpack file "
                                  f"(corrupt or truncated?): {e}") from e
  if not isinstance(state, Mapping) or "optimizer" not in state or "target" not in state["optimizer"]:
    keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
    raise CheckpointMismatchError(f"{checkpoint_dir / 'checkpoint'}: expected T5X's {{'version', 'optimizer': "
                                  f"{{'target', 'state'}}}} msgpack, found {keys}")
  target = state["optimizer"]["target"]
  flat = flax.traverse_util.flatten_dict(target, sep="/", is_leaf=lambda _, v: _is_tensorstore_spec(v))
  return {name: (_read_tensorstore(leaf, checkpoint_dir, name) if _is_tensorstore_spec(leaf) else np.asarray(leaf))
          for name, leaf in flat.items()}


def _read_orbax(checkpoint_dir: Path) -> dict[str, np.ndarray]:
  import jax
  import orbax.checkpoint as ocp

  item_dir = checkpoint_dir / "state" if (checkpoint_dir / "state").is_dir() else checkpoint_dir
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = checkpointer.metadata(item_dir)
    tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
    # Restore as host numpy arrays: the saving run's device layout need not exist here.
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    state = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:
    raise CheckpointMismatchError(f"cannot read the Orbax checkpoint in {item_dir}: {type(e).__name__}: {e}") from e
  if "target" not in state:
    raise CheckpointMismatchError(f"{item_dir}: expected T5X's {{'target', 'state'}} tree, found keys {sorted(state)}")
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(state["target"], sep="/").items()}


def import_t5x_checkpoint(path: str | Path, config: T5Config | None = None, step: int | None = None,
                          dtype: str = "float32") -> tuple[T5Config, dict]:
  """Reads a T5X checkpoint. Without a config, the config is read off the parameter shapes.

  Returns (config, params) with float32 params; raises CheckpointMismatchError naming every
  missing, extra or mis-shaped parameter.
  """
  checkpoint_dir = resolve_checkpoint_dir(path, step)
  kind = detect_checkpoint_type(checkpoint_dir)
  flat = _read_legacy(checkpoint_dir) if kind == LEGACY else _read_orbax(checkpoint_dir)
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  if config is None:
    config = infer_config_from_shapes({k: v.shape for k, v in flat.items()}, dtype=dtype)
  check_against_config(flat, config, {k: f"{kind} {checkpoint_dir}" for k in flat})
  return config, unflatten(flat)
