"""Expert and gate training: what trains, what stays frozen (bitwise), that the loss goes down, and outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import adapters, checkpoints, cli, library, training
from phatgoose_jax.adapters import AdapterConfig
from phatgoose_jax.model import EncoderDecoderModel
from phatgoose_jax.network import Transformer

LENGTHS = {"inputs": 8, "targets": 8}


def _common(train_tasks, base_dir, model_dir, **kwargs):
  return dict(model_dir=str(model_dir), mixture_or_task_name=train_tasks[0], task_feature_lengths=LENGTHS,
              batch_size=16, initial_checkpoint_path=str(base_dir), eval_period=4, eval_steps=2, log_period=4,
              dropout_rate=0.0, **kwargs)


@pytest.fixture(scope="module")
def expert_run(train_tasks, byte_base_checkpoint, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("expert_run")
  summary = training.train("expert", train_steps=8, accumulation_steps=2, learning_rate=3e-2,
                           adapter=AdapterConfig(rank=4), **_common(train_tasks, byte_base_checkpoint, model_dir))
  return model_dir, summary


def test_expert_training_lowers_the_loss_and_writes_an_expert(expert_run, byte_base_checkpoint):
  model_dir, summary = expert_run
  log = [json.loads(line) for line in (model_dir / "train_log.jsonl").read_text().splitlines()]
  vals = {r["step"]: r["validation_loss"] for r in log if "validation_loss" in r}
  assert sorted(vals) == [0, 4, 8]
  assert vals[8] < vals[0] - 0.05, vals  # a few steps of LoRA training already help
  assert all(np.isfinite(r["loss"]) and r["learning_rate"] > 0 for r in log if "loss" in r)
  expert = library.load_expert(model_dir / "expert")
  _, base_params = checkpoints.load_checkpoint(byte_base_checkpoint)
  assert expert.base_model == library.base_model_fingerprint(base_params)
  assert expert.rank == 4 and expert.expert_steps == 8 and not expert.has_gates
  assert len(expert.sites) == 7 + 11 and expert.validation["loss"] == pytest.approx(min(vals.values()))
  assert any(np.any(expert.tensors[f"{s}/lora_b"]) for s in expert.sites)
  # Telemetry: the same numbers as TensorBoard summaries (read back with TensorFlow) and JSON lines.
  import tensorflow as tf
  [events] = (model_dir / "tensorboard").glob("events.out.tfevents.*")
  tags = {(e.step, v.tag): float(tf.make_ndarray(v.tensor)) for e in tf.compat.v1.train.summary_iterator(str(events))
          for v in e.summary.value}
  assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "step_time"} <= {t for s, t in tags if s == 4}
  assert tags[(8, "validation_loss")] == pytest.approx(vals[8])


def test_gate_training_trains_only_gates(expert_run, train_tasks, byte_base_checkpoint, tmp_path):
  model_dir, _ = expert_run
  summary = training.train("gate", train_steps=4, expert_path=str(model_dir / "expert"),
                           **_common(train_tasks, byte_base_checkpoint, tmp_path / "gate"))
  gated = library.load_expert(summary["output"])
  expert = library.load_expert(model_dir / "expert")
  assert gated.has_gates and gated.gate_steps == 4 and gated.expert_steps == 8
  for k, v in expert.tensors.items():  # the expert's LoRA is carried over bitwise
    np.testing.assert_array_equal(gated.tensors[k], v)
  if summary["best_step"] > 0:
    assert any(np.any(gated.tensors[f"{s}/gate"]) for s in gated.sites)
  lib = library.ExpertLibrary(tmp_path / "lib", create=True)
  lib.add(gated)
  with pytest.raises(library.LibraryError, match="has no gate vectors"):
    lib.add(library.Expert(**{**expert.__dict__, "name": "ungated"}))


@pytest.mark.parametrize("stage", ["expert", "gate"])
def test_a_train_step_changes_only_the_stage_parameters(byte_base_checkpoint, stage):
  """Bitwise: after real optimizer steps every non-trainable leaf is identical, every trainable one moved."""
  config, base_params = checkpoints.load_checkpoint(byte_base_checkpoint)
  mode, regex = training.STAGES[stage]
  model = EncoderDecoderModel(Transformer(config.replace(dropout_rate=0.1), AdapterConfig(mode=mode, rank=4)))
  tokens = jnp.ones((1, 1), jnp.int32)
  params = adapters.graft_base(jax.jit(lambda r: model.module.init(r, tokens, tokens, tokens,
                                                                    enable_dropout=False))(jax.random.PRNGKey(1))["params"],
                               base_params)
  flat = adapters.flatten(params)
  if stage == "gate":  # a trained expert: non-zero B so the gates get a gradient
    flat = {k: (np.full(v.shape, 0.1, np.float32) if k.endswith("lora_b") else v) for k, v in flat.items()}
  before = {k: np.array(v) for k, v in flat.items()}
  trainable, frozen = training.split_trainable(adapters.unflatten(flat), regex)
  suffixes = {"expert": ("lora_a", "lora_b"), "gate": ("gate",)}[stage]
  assert sorted(trainable) == sorted(k for k in before if k.rsplit("/", 1)[-1] in suffixes)
  tx, schedule = training.make_optimizer(10, learning_rate=1e-2, warmup_ratio=0.0)
  trainer = training.Trainer(model, tx, schedule)
  state = trainer.init_state(trainable, seed=0)
  assert set(state.opt_state[1][0].mu) == set(trainable)  # optimizer state only for trainable leaves
  rng = np.random.default_rng(0)
  batch = {"encoder_input_tokens": rng.integers(3, 200, (2, 4, 8)), "decoder_target_tokens": rng.integers(3, 200, (2, 4, 6)),
           "decoder_loss_weights": np.ones((2, 4, 6), np.int32)}
  batch["decoder_input_tokens"] = np.concatenate([np.zeros((2, 4, 1), np.int64), batch["decoder_target_tokens"][..., :-1]], -1)
  frozen_dev = {k: jnp.asarray(v) for k, v in frozen.items()}
  for _ in range(2):
    state, metrics = trainer.train_step(state, frozen_dev, batch)
  after = {**{k: np.asarray(v) for k, v in frozen_dev.items()}, **{k: np.asarray(v) for k, v in state.trainable.items()}}
  for k, v in before.items():
    if k in trainable:
      assert not np.array_equal(after[k], v), f"{k} did not train"
    else:
      np.testing.assert_array_equal(after[k], v, err_msg=f"{k} changed")
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))


def test_refusals(train_tasks, byte_base_checkpoint, tmp_path):
  with pytest.raises(ValueError, match="BATCH_SIZE=16 does not divide into ACCUMULATION_STEPS=3"):
    training.train("expert", train_steps=1, accumulation_steps=3, **_common(train_tasks, byte_base_checkpoint, tmp_path / "a"))
  other = tmp_path / "other_run"
  other.mkdir()
  (other / "notes.txt").write_text("someone else's")
  with pytest.raises(FileExistsError, match="not a run directory"):
    training.train("expert", train_steps=1, **_common(train_tasks, byte_base_checkpoint, other))
  assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
  with pytest.raises(ValueError, match="gate training needs EXPERT_PATH"):
    training.train("gate", train_steps=1, **_common(train_tasks, byte_base_checkpoint, tmp_path / "g"))


def test_cli_train_expert_with_gin(train_tasks, byte_base_checkpoint, tmp_path, capsys):
  # Sharded through gin/partitioning (a 1x1 mesh here; tests/test_sharding.py runs 8 devices).
  args = ["train-expert", "--gin_file=runs/train_expert.gin", "--gin_file=partitioning/data_parallel.gin",
          f"--gin.MODEL_DIR='{tmp_path / 'cli'}'",
          f"--gin.MIXTURE_OR_TASK_NAME='{train_tasks[1]}'", f"--gin.INITIAL_CHECKPOINT_PATH='{byte_base_checkpoint}'",
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 8}", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
          "--gin.ACCUMULATION_STEPS=1", "--gin.EVAL_PERIOD=0", "--gin.AdapterConfig.rank=2"]
  assert cli.main(args) == 0
  assert "sharded over mesh {'data': 1, 'model': 1}" in capsys.readouterr().err
  expert = library.load_expert(tmp_path / "cli" / "expert")
  assert expert.rank == 2 and expert.task == train_tasks[1] and expert.scale == 0.5
  capsys.readouterr()
  assert cli.main(["train-expert", "--gin_file=runs/train_expert.gin"]) == 1  # required macros missing
  assert "no value for model_dir, mixture_or_task_name, initial_checkpoint_path" in capsys.readouterr().err
