"""Our own parameter checkpoints: orbax arrays plus a JSON description, written atomically.

Layout of a checkpoint directory:
  config.json   {"format": "phatgoose_jax.params.v1", "model_config": {...T5Config...}, ...metadata}
  params/       orbax (OCDBT) PyTree of float32 parameters

A checkpoint is written under a temporary name and renamed into place, so a directory with that name
is either complete or absent. An existing checkpoint is never replaced unless asked to.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from phatgoose_jax.config import T5Config

FORMAT = "phatgoose_jax.params.v1"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

PyTree = Any


def _orbax():
  import orbax.checkpoint as ocp  # local: orbax is slow to import and only needed here
  return ocp


def temporary_sibling(path: Path) -> Path:
  """A fresh hidden path beside `path`, on the same filesystem so that a rename is atomic."""
  return path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish_directory(tmp: Path, final: Path, overwrite: bool) -> None:
  """Renames a finished temporary directory into place; an old one is replaced only with overwrite."""
  if final.exists():
    if not overwrite:
      shutil.rmtree(tmp, ignore_errors=True)
      raise FileExistsError(f"{final} already exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
    old = temporary_sibling(final)
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, final)


@contextlib.contextmanager
def atomic_directory(final: str | Path, overwrite: bool = False):
  """Yields a fresh temporary directory beside `final`; when the block ends it is renamed into place
  (replacing `final` only with overwrite). On an error it is removed and `final` is untouched.

  With several hosts, all of them write into the same temporary directory (orbax coordinates its own
  writes) and the first host publishes it once every host is done.
  """
  from phatgoose_jax import distributed

  final = Path(final).absolute()
  if final.exists() and not overwrite:
    raise FileExistsError(f"{final} already exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
  multihost = jax.process_count() > 1
  tmp = final.parent / f".{final.name}.tmp-multihost" if multihost else temporary_sibling(final)
  if distributed.is_leader():
    final.parent.mkdir(parents=True, exist_ok=True)
    if multihost:
      shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted earlier save
    tmp.mkdir()
  distributed.barrier(f"mkdir {tmp}")
  try:
    yield tmp
    distributed.barrier(f"written {tmp}")
    if distributed.is_leader():
      publish_directory(tmp, final, overwrite)
    distributed.barrier(f"published {final}")
  except BaseException:
    if distributed.is_leader():
      shutil.rmtree(tmp, ignore_errors=True)
    raise


def save_checkpoint(directory: str | Path, params: PyTree, config: T5Config, metadata: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
  """Writes params (any sharding; gathered by orbax) and config to `directory`, atomically."""
  ocp = _orbax()
  directory = Path(directory).absolute()
  with atomic_directory(directory, overwrite) as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
      description = {"format": FORMAT, "model_config": config.to_dict(), **dict(metadata or {})}
      (tmp / CONFIG_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
  return directory


def read_description(directory: str | Path) -> dict:
  directory = Path(directory)
  config_file = directory / CONFIG_FILE
  if not config_file.is_file():
    raise FileNotFoundError(f"{directory} is not a phatgoose_jax checkpoint: {CONFIG_FILE} is missing")
  try:
    description = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file} is corrupt (not valid JSON): {e}") from e
  if description.get("format") != FORMAT:
    raise ValueError(f"{config_file}: format {description.get('format')!r} is not {FORMAT!r}")
  return description


def load_config(directory: str | Path) -> T5Config:
  return T5Config.from_dict(read_description(directory)["model_config"])


def load_checkpoint(directory: str | Path, shardings: PyTree | None = None,
                    config_overrides: Mapping[str, Any] | None = None) -> tuple[T5Config, PyTree]:
  """Restores (config, params). shardings: a tree of `jax.sharding.Sharding` matching params (e.g. from
  a mesh) to restore each array directly onto its devices; default: the first local device."""
  from phatgoose_jax.importers.common import expected_param_shapes

  ocp = _orbax()
  directory = Path(directory).absolute()
  config = load_config(directory)
  if config_overrides:
    config = config.replace(**config_overrides)
  expected = expected_param_shapes(config)
  import flax
  flat_shapes = {tuple(k.split("/")): v for k, v in expected.items()}
  if shardings is None:
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    flat_shardings = {k: default for k in flat_shapes}
  else:
    flat_shardings = flax.traverse_util.flatten_dict(flax.core.unfreeze(shardings))
    if set(flat_shardings) != set(flat_shapes):
      raise ValueError(f"shardings do not match the parameter tree of {directory}")
  abstract = flax.traverse_util.unflatten_dict({
      k: jax.ShapeDtypeStruct(shape, np.float32, sharding=flat_shardings[k]) for k, shape in flat_shapes.items()})
  try:
    params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, abstract)
  except FileNotFoundError:
    raise
  except Exception as e:
    raise ValueError(f"cannot restore the parameters in {directory / PARAMS_DIR} (corrupt or truncated, or not "
                     f"saved from this model config): {type(e).__name__}: {e}") from e
  return config, params


# ---------------------------------------------------------------------------------------------
# Training checkpoints (resume): everything a run needs to continue bit for bit
# ---------------------------------------------------------------------------------------------
#
# <model_dir>/checkpoints/step_00000040/
#   state/       orbax PyTree: {"state": the train state (step, trainable, optimizer state, RNG),
#                               "best": the best parameters so far (present when "has_best")}
#   meta.json    {"format", "step", "batches_consumed", "best_loss", "best_step", "has_best"}
# Each is written under a temporary name and renamed into place (complete or absent); the newest
# `keep` are kept. Temporary directories left by a killed write are removed at the next start.

TRAIN_FORMAT = "phatgoose_jax.train_state.v1"
TRAIN_CHECKPOINTS_DIR = "checkpoints"
_STEP_PREFIX = "step_"


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
  out = []
  for p in root.iterdir() if root.is_dir() else ():
    if p.name.startswith(_STEP_PREFIX) and p.name[len(_STEP_PREFIX):].isdigit() and (p / "meta.json").is_file():
      out.append((int(p.name[len(_STEP_PREFIX):]), p))
  return sorted(out)


def save_train_checkpoint(root: str | Path, step: int, state: PyTree, best: PyTree | None, meta: Mapping[str, Any],
                          keep: int = 2) -> Path:
  """Writes the train state of `step` atomically and prunes all but the newest `keep` checkpoints."""
  ocp = _orbax()
  root = Path(root)
  final = root / f"{_STEP_PREFIX}{step:08d}"
  tree = {"state": state, **({"best": best} if best is not None else {})}
  with atomic_directory(final, overwrite=True) as tmp:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / "state", tree)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
      description = {"format": TRAIN_FORMAT, "step": step, "has_best": best is not None, **dict(meta)}
      (tmp / "meta.json").write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
  if jax.process_index() == 0:
    for _, old in _step_dirs(root)[:-keep]:
      shutil.rmtree(old, ignore_errors=True)
  return final


def latest_train_checkpoint(root: str | Path) -> Path | None:
  """The newest complete training checkpoint under root (None if there is none). Removes temporary
  directories that a killed write left behind."""
  root = Path(root)
  if not root.is_dir():
    return None
  if jax.process_index() == 0:
    for p in root.iterdir():
      if p.name.startswith(".") and ".tmp-" in p.name:
        shutil.rmtree(p, ignore_errors=True)
  steps = _step_dirs(root)
  return steps[-1][1] if steps else None


def restore_train_checkpoint(directory: str | Path, state_target: PyTree, best_target: PyTree | None
                             ) -> tuple[PyTree, PyTree | None, dict]:
  """(state, best or None, meta) restored into the structure, dtypes and shardings of the targets."""
  ocp = _orbax()
  directory = Path(directory).absolute()
  meta_file = directory / "meta.json"
  try:
    meta = json.loads(meta_file.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{meta_file} is unreadable or corrupt: {e}") from e
  if meta.get("format") != TRAIN_FORMAT:
    raise ValueError(f"{meta_file}: format {meta.get('format')!r} is not {TRAIN_FORMAT!r}")
  as_abstract = lambda tree: jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), tree)
  target = {"state": as_abstract(state_target)}
  if meta["has_best"]:
    if best_target is None:
      raise ValueError(f"{directory}: holds best parameters but no target for them was given")
    target["best"] = as_abstract(best_target)
  try:
    tree = ocp.StandardCheckpointer().restore(directory / "state", target)
  except Exception as e:
    raise ValueError(f"cannot restore the training checkpoint {directory} (corrupt or truncated, or written by a "
                     f"different run configuration): {type(e).__name__}: {e}") from e
  return tree["state"], tree.get("best"), meta
