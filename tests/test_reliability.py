"""Reliability: exact resume after SIGKILL at three points, SIGTERM checkpoints, NaN stops, and refusals of
bad input that leave outputs untouched."""

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import adapters, checkpoints, library, training
from phatgoose_jax.adapters import AdapterConfig
from helpers import TRAIN_TASKS, write_byte_base_checkpoint

DRIVER = Path(__file__).with_name("resume_driver.py")
STEPS, PERIOD = 9, 3


def _run_kwargs(train_tasks, base, model_dir):
  # Dropout on, so that the RNG state matters; validation twice, so that the best-so-far matters too.
  return dict(model_dir=str(model_dir), mixture_or_task_name=train_tasks[0],
              task_feature_lengths={"inputs": 8, "targets": 8}, batch_size=8, accumulation_steps=2,
              initial_checkpoint_path=str(base), train_steps=STEPS, eval_period=5, eval_steps=1, log_period=1,
              checkpoint_period=PERIOD, dropout_rate=0.1, learning_rate=3e-2, adapter={"rank": 2})


def _train(kwargs):
  return training.train("expert", **{**kwargs, "adapter": AdapterConfig(**kwargs["adapter"])})


def _losses(model_dir):
  return [(r["step"], r.get("loss"), r.get("validation_loss"))
          for r in map(json.loads, (Path(model_dir) / "train_log.jsonl").read_text().splitlines())]


# The four runs that die on purpose start when pytest collects this module, each in its own process, so
# that they run beside the rest of the suite; the fixture below collects them. They train on their own
# copy of the (deterministic) byte base model, with the tasks the driver registers itself.
_FAULTS = {"before_first_checkpoint": "kill_after_step:2", "between_checkpoints": "kill_after_step:5",
           "during_checkpoint_write": f"kill_publishing:{2 * PERIOD}", "sigterm": "sigterm_after_step:4"}
_ROOT = Path(tempfile.mkdtemp(prefix="phatgoose_faults_"))
_BASE = write_byte_base_checkpoint(_ROOT / "base")
_PROCESSES = {}
for _name, _fault in _FAULTS.items():
  _kwargs = _run_kwargs(TRAIN_TASKS, _BASE, _ROOT / _name)
  (_ROOT / f"{_name}.json").write_text(json.dumps(_kwargs))
  _PROCESSES[_name] = (subprocess.Popen([sys.executable, str(DRIVER), str(_ROOT / f"{_name}.json"), _fault],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), _kwargs)


@atexit.register
def _cleanup():
  for proc, _ in _PROCESSES.values():
    if proc.poll() is None:
      proc.kill()
  shutil.rmtree(_ROOT, ignore_errors=True)


@pytest.fixture(scope="module")
def faulted_runs():
  out = {}
  for name, (proc, kwargs) in _PROCESSES.items():
    _, err = proc.communicate(timeout=600)
    out[name] = (proc.returncode, err, kwargs)
  return out


@pytest.fixture(scope="module")
def uninterrupted(train_tasks, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("uninterrupted")
  _train(_run_kwargs(train_tasks, _BASE, model_dir))
  return library.load_expert(model_dir / "expert"), _losses(model_dir)


@pytest.mark.parametrize("fault", ["before_first_checkpoint", "between_checkpoints", "during_checkpoint_write"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(fault, faulted_runs, uninterrupted):
  returncode, err, kwargs = faulted_runs[fault]
  assert returncode == -9, err[-2000:]
  model_dir = Path(kwargs["model_dir"])
  saved = sorted(p.name for p in (model_dir / "checkpoints").iterdir()) if (model_dir / "checkpoints").exists() else []
  expected_latest = {"before_first_checkpoint": None, "between_checkpoints": 3, "during_checkpoint_write": 3}[fault]
  complete = checkpoints.latest_train_checkpoint(model_dir / "checkpoints")
  assert (complete.name if complete else None) == (f"step_{expected_latest:08d}" if expected_latest else None), saved
  if fault == "during_checkpoint_write":
    assert any(".tmp-" in name for name in saved)  # the half-published write was left behind ...
  _train(kwargs)  # ... and the restart resumes from step 3 (or from scratch) and cleans it up
  assert not any(".tmp-" in p.name for p in (model_dir / "checkpoints").iterdir())
  expert, losses = library.load_expert(model_dir / "expert"), _losses(model_dir)
  reference, reference_losses = uninterrupted
  assert losses == reference_losses  # every step's loss, bit for bit, and no step logged twice
  assert expert.tensors.keys() == reference.tensors.keys()
  for key, value in reference.tensors.items():
    np.testing.assert_array_equal(expert.tensors[key], value, err_msg=key)


def test_sigterm_writes_a_checkpoint_and_exits_143(faulted_runs, uninterrupted):
  returncode, err, kwargs = faulted_runs["sigterm"]
  assert returncode == 143, err[-2000:]
  assert "SIGTERM: stopped after step 4/9" in err
  latest = checkpoints.latest_train_checkpoint(Path(kwargs["model_dir"]) / "checkpoints")
  assert latest.name == "step_00000004"
  _train(kwargs)
  expert = library.load_expert(Path(kwargs["model_dir"]) / "expert")
  for key, value in uninterrupted[0].tensors.items():
    np.testing.assert_array_equal(expert.tensors[key], value, err_msg=key)


def test_nan_loss_stops_at_its_step_and_keeps_the_last_checkpoint(train_tasks, byte_base_checkpoint, tmp_path,
                                                                  monkeypatch):
  class NanAtStep5(training.Trainer):
    def _train_step(self, state, frozen, batch):
      new_state, metrics = super()._train_step(state, frozen, batch)
      metrics["loss"] = jnp.where(new_state.step == 5, jnp.nan, metrics["loss"])
      return new_state, metrics

  monkeypatch.setattr(training, "Trainer", NanAtStep5)
  kwargs = _run_kwargs(train_tasks, byte_base_checkpoint, tmp_path / "nan")
  with pytest.raises(training.NonFiniteLossError, match=r"step 5: loss nan .* last good checkpoint is .*step_00000003"):
    _train(kwargs)
  assert checkpoints.latest_train_checkpoint(tmp_path / "nan" / "checkpoints").name == "step_00000003"
  assert not (tmp_path / "nan" / "expert").exists()


# ---------------------------------------------------------------------------------------------
# Bad input: refused with what, where and how to fix; nothing existing changes
# ---------------------------------------------------------------------------------------------

def _register_bad_tasks():
  import seqio
  import tensorflow as tf

  vocab = seqio.ByteVocabulary()
  rows = {
      "pg_bad_missing_targets": {"inputs": ["abc", "de"]},
      "pg_bad_empty_target": {"inputs": ["abc", "de"], "targets": ["x", ""]},
      "pg_bad_utf8": {"inputs": [b"ok", b"caf\xe9 au lait"], "targets": ["x", "y"]},
      "pg_long_examples": {"inputs": ["a" * 40, "bb", "cc"] * 4, "targets": ["x", "y" * 20, "z"] * 4},
  }
  for name, data in rows.items():
    if name in seqio.TaskRegistry.names():
      continue
    features = {k: seqio.Feature(vocab) for k in data}
    seqio.TaskRegistry.add(
        name, seqio.FunctionDataSource(lambda split, shuffle_files, seed=None, data=data:
                                       tf.data.Dataset.from_tensor_slices(data), splits=["train", "validation"]),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos], output_features=features)


def _snapshot(*roots):
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots if Path(root).exists()
          for p in sorted(Path(root).rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(train_tasks, byte_base_checkpoint, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("finished")
  kwargs = {**_run_kwargs(train_tasks, byte_base_checkpoint, model_dir), "train_steps": 2, "eval_period": 0}
  _train(kwargs)
  return kwargs


def test_a_finished_run_is_not_trained_again(finished_run):
  before = _snapshot(finished_run["model_dir"])
  summary = _train(finished_run)
  assert summary["steps"] == 2 and _snapshot(finished_run["model_dir"]) == before


def test_bad_inputs_are_refused_and_change_nothing(train_tasks, byte_base_checkpoint, finished_run, tmp_path, capsys):
  from phatgoose_jax import data_checks
  from test_adapters import random_expert

  _register_bad_tasks()
  config, base_params = checkpoints.load_checkpoint(byte_base_checkpoint)
  lib_dir = tmp_path / "lib"
  lib = library.ExpertLibrary(lib_dir, create=True)
  lib.add(random_expert("one", 1, config, base_params, rank=2))
  lib.add(random_expert("two", 2, config, base_params, rank=2))
  corrupt_ckpt = tmp_path / "corrupt_ckpt"
  import shutil
  shutil.copytree(byte_base_checkpoint, corrupt_ckpt)
  biggest = max((p for p in (corrupt_ckpt / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # truncated mid-file
  misnamed = tmp_path / "misnamed_lib"
  shutil.copytree(lib_dir, misnamed)
  (misnamed / "two").rename(misnamed / "three")  # a directory holding expert 'two': a duplicate name

  def train_on(task, model_dir, **changes):
    return lambda: _train({**_run_kwargs(train_tasks, byte_base_checkpoint, model_dir), "mixture_or_task_name": task,
                           **changes})

  cases = [
      ("missing field", train_on("pg_bad_missing_targets", tmp_path / "m1"), data_checks.DataError,
       r"task pg_bad_missing_targets, split 'train'"),
      ("empty target", train_on("pg_bad_empty_target", tmp_path / "m2"), data_checks.DataError,
       r"task pg_bad_empty_target, split 'train', example 1: the target is empty"),
      ("not UTF-8", train_on("pg_bad_utf8", tmp_path / "m3"), data_checks.DataError,
       r"task pg_bad_utf8, split 'train', example 1: inputs_pretokenized is not valid UTF-8 \(byte 3"),
      ("unknown mixture", train_on("pg_no_such_mixture", tmp_path / "m4"), ValueError, r"pg_no_such_mixture"),
      ("different run in MODEL_DIR", lambda: _train({**finished_run, "learning_rate": 1e-3}), FileExistsError,
       r"holds a different run \(differs in \['learning_rate'\]\)"),
      ("k > experts", lambda: library.routed_model(config, base_params, lib.stack(), top_k=3), ValueError,
       r"top_k=3 must be between 1 and the number of experts \(2\)"),
      ("truncated checkpoint", lambda: checkpoints.load_checkpoint(corrupt_ckpt), ValueError,
       r"corrupt_ckpt/params \(corrupt or truncated"),
      ("duplicate expert name", lambda: library.ExpertLibrary(misnamed).validate(), library.LibraryError,
       r"misnamed_lib/three holds an expert named 'two'"),
      ("empty library", lambda: library.ExpertLibrary(tmp_path / "empty_lib", create=True).validate(),
       library.LibraryError, r"the library is empty"),
      ("expert without gates", lambda: lib.add(library.Expert(**{
          **random_expert("nogate", 3, config, base_params, rank=2).__dict__,
          "tensors": {k: v for k, v in random_expert("nogate", 3, config, base_params, rank=2).tensors.items()
                      if not k.endswith("/gate")}})), library.LibraryError, r"expert 'nogate' has no gate vectors"),
  ]
  before = _snapshot(tmp_path, finished_run["model_dir"])
  for name, action, error, message in cases:
    with pytest.raises(error, match=message):
      action()
    after = _snapshot(tmp_path, finished_run["model_dir"])
    created = sorted(set(after) - set(before))
    assert all("empty_lib" in p for p in created), (name, created)  # only the deliberately created empty library
    assert {p: v for p, v in after.items() if p in before} == before, name
  # Too-long examples are not an error: they are truncated and counted in the log.
  capsys.readouterr()
  _train({**_run_kwargs(train_tasks, byte_base_checkpoint, tmp_path / "long"), "mixture_or_task_name": "pg_long_examples",
          "train_steps": 1, "eval_period": 0})
  assert "pg_long_examples (train): 8 of 12 examples exceed the feature lengths" in capsys.readouterr().err


def test_concurrent_library_adds_leave_a_valid_library(byte_base_checkpoint, tmp_path):
  """Two processes add incompatible experts (ranks 2 and 3) to one empty library at once: one wins and
  the other is refused; without the lock both could pass their check and leave a mixed library."""
  from test_adapters import random_expert

  config, base_params = checkpoints.load_checkpoint(byte_base_checkpoint)
  sources = [library.save_expert(random_expert(f"r{rank}", rank, config, base_params, rank=rank), tmp_path / f"src{rank}")
             for rank in (2, 3)]
  lib_dir = tmp_path / "lib"
  procs = [subprocess.Popen([sys.executable, "-m", "phatgoose_jax.cli", "library", "add", str(lib_dir), str(src)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for src in sources]
  results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
  assert sorted(code for code, _ in results) == [0, 1], results
  assert "experts of one library must share it" in "".join(err for _, err in results)
  experts = library.ExpertLibrary(lib_dir).validate()
  assert len(experts) == 1  # incompatible: exactly one got in


def test_nonfinite_steps_can_be_skipped(train_tasks, tmp_path, capsys):
  """on_nonfinite='skip': a base with a NaN weight makes every loss NaN; each update is skipped, the run
  ends, and the LoRA factors are still their initial values (B = 0)."""
  config, params = checkpoints.load_checkpoint(_BASE)
  flat = {k: np.asarray(v) for k, v in adapters.flatten(params).items()}
  flat["decoder/decoder_norm/scale"] = np.full_like(flat["decoder/decoder_norm/scale"], np.nan)
  nan_base = checkpoints.save_checkpoint(tmp_path / "nan_base", adapters.unflatten(flat), config)
  kwargs = {**_run_kwargs(train_tasks, nan_base, tmp_path / "skip"), "train_steps": 3, "eval_period": 0,
            "on_nonfinite": "skip"}
  _train(kwargs)
  assert capsys.readouterr().err.count("not finite: update skipped") == 3
  expert = library.load_expert(tmp_path / "skip" / "expert")
  assert all(not np.any(expert.tensors[f"{s}/lora_b"]) for s in expert.sites)
