"""One trainer for every stage; a stage is which parameters train and what the run writes.

  expert     LoRA on a frozen base (AdapterConfig.mode 'lora'); trains `lora_a`/`lora_b`; writes an expert
  gate       a frozen base and frozen expert plus a zero-initialized gate per site ('gated_lora');
             trains `gate`; writes the expert with its gates
  full       every base parameter (pretraining, multitask fine-tuning); writes a checkpoint

Only the trainable leaves are differentiated and only they have optimizer state; the frozen leaves are
passed through untouched (bitwise). The optimizer is AdamW (no weight decay by default) after global-norm
clipping, with a linear warmup to a constant learning rate (HF's `constant_with_warmup`, as the original
code). A global batch of BATCH_SIZE sequences is split into ACCUMULATION_STEPS micro-batches whose
gradients are summed inside one jitted step; the loss is the mean over all target tokens of the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from phatgoose_jax import adapters, checkpoints, data_checks, distributed, gin_utils, library, telemetry
from phatgoose_jax.adapters import AdapterConfig
from phatgoose_jax.config import T5Config
from phatgoose_jax.model import EncoderDecoderModel, weighted_cross_entropy
from phatgoose_jax.network import Transformer

STAGES = {
    # stage: (adapter mode, regex of trainable parameter paths)
    "expert": ("lora", r".*/lora_[ab]"),
    "gate": ("gated_lora", r".*/gate"),
    "full": ("none", r".*"),
}
PyTree = Any


# ---------------------------------------------------------------------------------------------
# Optimizer and the jitted step
# ---------------------------------------------------------------------------------------------

@gin.configurable
def make_optimizer(train_steps: int, learning_rate: float = 5e-3, warmup_ratio: float = 0.06,
                   weight_decay: float = 0.0, max_grad_norm: float = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW after global-norm clipping; lr rises linearly from 0 over int(warmup_ratio * steps) steps."""
  warmup = int(warmup_ratio * train_steps)
  schedule = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup),
                                   optax.constant_schedule(learning_rate)], [warmup]) if warmup else \
      optax.constant_schedule(learning_rate)
  tx = optax.chain(optax.clip_by_global_norm(max_grad_norm) if max_grad_norm else optax.identity(),
                   optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return tx, schedule


@dataclasses.dataclass
class TrainState:
  step: jax.Array
  trainable: dict[str, jax.Array]   # flat {path: array}
  opt_state: PyTree
  rng: jax.Array


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "trainable", "opt_state", "rng"], meta_fields=[])


def split_trainable(params, trainable_regex: str) -> tuple[dict, dict]:
  """(trainable, frozen) flat dicts by a full-match regex over parameter paths."""
  pattern = re.compile(trainable_regex)
  flat = adapters.flatten(params)
  trainable = {k: v for k, v in flat.items() if pattern.fullmatch(k)}
  if not trainable:
    raise ValueError(f"no parameter matches the trainable regex {trainable_regex!r}")
  return trainable, {k: v for k, v in flat.items() if k not in trainable}


class Trainer:
  """Compiles one train step and one eval step for a model and a trainable/frozen split.

  With a partitioner, parameters and optimizer state are placed by their logical axes (the optimizer's
  moments like their parameters), batches [accumulation, micro_batch, length] split over the data axes,
  and the steps are jitted with those in/out shardings (the train state is donated).
  """

  def __init__(self, model: EncoderDecoderModel, tx: optax.GradientTransformation, schedule: optax.Schedule,
               partitioner=None, skip_nonfinite: bool = False):
    self.model = model
    self.skip_nonfinite = skip_nonfinite
    self.tx = tx
    self.schedule = schedule
    self.partitioner = partitioner
    self._flat_shardings = None
    if partitioner is None:
      self.train_step = jax.jit(self._train_step, donate_argnums=(0,))
      self.eval_step = jax.jit(self._eval_step)

  def _param_sharding(self, key: str):
    if self._flat_shardings is None:
      from phatgoose_jax import partitioning
      shapes = partitioning.abstract_variables(self.model.module)
      shardings = self.partitioner.param_shardings(shapes["params_axes"], shapes["params"])
      self._flat_shardings = adapters.flatten(shardings)
    return self._flat_shardings[key]

  def shardings_of(self, state: TrainState, frozen: Mapping[str, jax.Array]):
    """(state shardings, frozen shardings) for a sharded trainer."""
    replicated = self.partitioner.replicated()
    trainable = {k: self._param_sharding(k) for k in state.trainable}
    opt = optax.tree_map_params(self.tx, lambda _, sharding: sharding, state.opt_state, trainable,
                                transform_non_params=lambda _: replicated)
    state_shardings = TrainState(step=replicated, trainable=trainable, opt_state=opt, rng=replicated)
    return state_shardings, {k: self._param_sharding(k) for k in frozen}

  def init_state(self, trainable: Mapping[str, jax.Array], seed: int) -> TrainState:
    # A copy: the train step donates its state, which must not delete the caller's arrays.
    trainable = {k: jnp.array(v, jnp.float32, copy=True) for k, v in trainable.items()}
    return TrainState(step=jnp.array(0, jnp.int32), trainable=trainable, opt_state=self.tx.init(trainable),
                      rng=jax.random.PRNGKey(seed))

  def shard(self, state: TrainState, frozen: Mapping[str, jax.Array], batch_shape: tuple[int, ...]):
    """Places state and frozen leaves on the mesh and compiles the sharded steps; returns them placed."""
    p = self.partitioner
    state_shardings, frozen_shardings = self.shardings_of(state, frozen)
    batch_sharding = p.batch_sharding(batch_shape, batch_dim=1, what="training batch")
    metric_sharding = p.replicated()
    self.train_step = p.jit(self._train_step, in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                            out_shardings=(state_shardings, metric_sharding), donate_argnums=(0,))
    eval_batch = p.batch_sharding(batch_shape[1:], batch_dim=0, what="evaluation batch")
    self.eval_step = p.jit(self._eval_step, in_shardings=(state_shardings.trainable, frozen_shardings, eval_batch))
    return p.place(state, state_shardings), p.place(dict(frozen), frozen_shardings)

  def _token_loss(self, trainable, frozen, batch, dropout_rng):
    params = adapters.unflatten({**frozen, **trainable})
    logits = self.model.compute_logits(params, batch, dropout_rng=dropout_rng)
    weights = batch.get("decoder_loss_weights", batch["decoder_target_tokens"] > 0)
    loss_sum, _, weight_sum = weighted_cross_entropy(logits, batch["decoder_target_tokens"], weights,
                                                     self.model.label_smoothing, self.model.z_loss)
    return loss_sum, weight_sum

  def _train_step(self, state: TrainState, frozen: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]):
    """batch leaves are [accumulation, micro_batch, length]."""
    rng, step_rng = jax.random.split(state.rng)
    accumulation = jax.tree_util.tree_leaves(batch)[0].shape[0]

    def micro_step(carry, inputs):
      grad_sum, loss_sum, token_sum = carry
      micro_batch, i = inputs
      loss_value_and_grads = jax.value_and_grad(self._token_loss, has_aux=True)
      (loss, tokens), grads = loss_value_and_grads(state.trainable, frozen, micro_batch,
                                                   jax.random.fold_in(step_rng, i))
      return (jax.tree_util.tree_map(jnp.add, grad_sum, grads), loss_sum + loss, token_sum + tokens), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
    (grad_sum, loss_sum, token_sum), _ = jax.lax.scan(micro_step, (zeros, 0.0, 0.0),
                                                      (batch, jnp.arange(accumulation)))
    denom = jnp.maximum(token_sum, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grad_sum)  # gradient of the mean token loss
    updates, opt_state = self.tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    grad_norm = optax.global_norm(grads)
    if self.skip_nonfinite:  # a NaN/Inf step leaves parameters and optimizer state as they were
      finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jnp.where(finite, new, old)
      trainable = jax.tree_util.tree_map(keep, trainable, state.trainable)
      opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
    metrics = {"loss": loss_sum / denom, "grad_norm": grad_norm, "learning_rate": self.schedule(state.step),
               "tokens": token_sum}
    return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state, rng=rng), metrics

  def _eval_step(self, trainable, frozen, batch):
    return self._token_loss(trainable, frozen, batch, None)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def _seqio_dataset(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], split: str, shuffle: bool,
                   seed: int | None, num_epochs: int | None, pack: bool, use_cached: bool = False):
  import seqio
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # TF only feeds data (as in T5X)
  # With several hosts each reads its own shard of the data (seqio's shard_info).
  return seqio.get_dataset(mixture_or_task_name, task_feature_lengths=dict(task_feature_lengths),
                           feature_converter=seqio.EncDecFeatureConverter(pack=pack), dataset_split=split,
                           use_cached=use_cached, shuffle=shuffle, num_epochs=num_epochs, seed=seed,
                           shard_info=distributed.shard_info())


def _seqio_batches(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], split: str, batch_size: int,
                   shuffle: bool, seed: int | None, num_epochs: int | None, pack: bool,
                   use_cached: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Streams model-feature batches from seqio (tf.data): for data too large to hold in memory."""
  ds = _seqio_dataset(mixture_or_task_name, task_feature_lengths, split, shuffle, seed, num_epochs, pack, use_cached)
  ds = ds.batch(batch_size, drop_remainder=num_epochs is None)
  for batch in ds.as_numpy_iterator():
    yield {k: np.asarray(v) for k, v in batch.items()}


def _materialize(task_name: str, task_feature_lengths, split: str, pack: bool, use_cached: bool) -> dict[str, np.ndarray]:
  """One pass of a task's split through seqio's preprocessing and feature converter, as arrays [N, L]."""
  ds = _seqio_dataset(task_name, task_feature_lengths, split, False, None, 1, pack, use_cached)
  rows = list(ds.as_numpy_iterator())
  if not rows:
    raise ValueError(f"the {split!r} split of {task_name} yielded no example")
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _in_memory_batches(mixture_or_task_name: str, task_feature_lengths, split: str, batch_size: int, seed: int,
                       pack: bool, use_cached: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Endless shuffled batches from data held in memory (each task's split is preprocessed once).

  A mixture samples each example's task in proportion to the seqio mixing rates; within a task, examples
  are drawn epoch by epoch in a fresh permutation. Deterministic in the seed.
  """
  import seqio
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  tasks = list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]
  rates = np.array([provider.get_rate(t) if isinstance(provider, seqio.Mixture) else 1.0 for t in tasks], np.float64)
  if not np.all(np.isfinite(rates)) or rates.sum() <= 0:
    raise ValueError(f"{mixture_or_task_name}: mixing rates {rates.tolist()} do not form a distribution")
  data = [_materialize(t.name, task_feature_lengths, split, pack, use_cached) for t in tasks]
  rng = np.random.default_rng(seed)
  orders = [rng.permutation(len(next(iter(d.values())))) for d in data]
  cursors = [0] * len(data)
  while True:
    which = rng.choice(len(data), size=batch_size, p=rates / rates.sum()) if len(data) > 1 else np.zeros(batch_size, int)
    picks = []
    for t in which:
      if cursors[t] == len(orders[t]):
        orders[t], cursors[t] = rng.permutation(len(orders[t])), 0
      picks.append((t, orders[t][cursors[t]]))
      cursors[t] += 1
    yield {k: np.stack([data[t][k][i] for t, i in picks]) for k in data[0]}


def _accumulated(batches: Iterator[dict], accumulation: int) -> Iterator[dict]:
  while True:
    micro = []
    for _ in range(accumulation):
      try:
        micro.append(next(batches))
      except StopIteration:
        return
    yield {k: np.stack([m[k] for m in micro]) for k in micro[0]}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

class Preempted(RuntimeError):
  """SIGTERM arrived; a checkpoint was written and the same command resumes."""


class NonFiniteLossError(RuntimeError):
  pass


@contextlib.contextmanager
def _preemption_signal():
  """Yields a function telling whether SIGTERM arrived (only the main thread can install handlers)."""
  received = []
  if threading.current_thread() is not threading.main_thread():
    yield lambda: False
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    yield lambda: bool(received)
  finally:
    signal.signal(signal.SIGTERM, previous)


def _state_tree(state: "TrainState") -> dict:
  return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state, "rng": state.rng}


def _truncate_log(path: Path, step: int) -> None:
  """Drops log records written after `step` (by the run that was interrupted), so that none repeats."""
  if not path.is_file():
    return
  kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(line + "\n" for line in kept))
  tmp.replace(path)


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def _prepare_model_dir(model_dir: Path, run_info: dict, overwrite: bool) -> None:
  """Refuses a directory that holds another run's files (by comparing the recorded run description)."""
  info_file = model_dir / "run.json"
  if model_dir.exists() and any(model_dir.iterdir()):
    if not info_file.is_file():
      raise FileExistsError(f"MODEL_DIR {model_dir} is not empty and holds no run.json: it is not a run directory; "
                            f"choose an empty or new directory")
    previous = json.loads(info_file.read_text())
    if previous != run_info and not overwrite:
      changed = sorted(k for k in set(previous) | set(run_info) if previous.get(k) != run_info.get(k))
      raise FileExistsError(f"MODEL_DIR {model_dir} holds a different run (differs in {changed}); choose another "
                            f"directory")
  model_dir.mkdir(parents=True, exist_ok=True)
  text = json.dumps(run_info, indent=2, sort_keys=True) + "\n"
  if not info_file.is_file() or info_file.read_text() != text:
    info_file.write_text(text)


def _load_base(initial_checkpoint_path: str | None, model_config: T5Config | None, seed: int):
  if initial_checkpoint_path:
    config, params = checkpoints.load_checkpoint(initial_checkpoint_path)
    return config, jax.tree_util.tree_map(np.asarray, params)
  if model_config is None:
    raise ValueError("pass INITIAL_CHECKPOINT_PATH or a model config (a size gin file) to start from scratch")
  module = Transformer(model_config)
  tokens = jnp.ones((1, 1), jnp.int32)
  params = jax.jit(lambda r: module.init(r, tokens, tokens, tokens, enable_dropout=False)["params"])(
      jax.random.PRNGKey(seed))
  return model_config, jax.tree_util.tree_map(np.asarray, params)


@gin.configurable(denylist=["stage"])
def train(stage: str, *, model_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, accumulation_steps: int = 1,
          initial_checkpoint_path: str | None = None, expert_path: str | None = None,
          model_config: T5Config | None = None, adapter: AdapterConfig | None = None,
          dropout_rate: float | None = 0.1, eval_period: int = 100, eval_steps: int | None = 20,
          validation_split: str = "validation", log_period: int = 10, seed: int = 42, pack: bool = True,
          use_cached: bool = False, expert_name: str | None = None, overwrite: bool = False,
          mixture_or_task_module: str | None = None, in_memory_data: bool = False, partitioner=None,
          learning_rate: float = 5e-3, warmup_ratio: float = 0.06, weight_decay: float = 0.0,
          max_grad_norm: float = 1.0, checkpoint_period: int = 100, keep_checkpoints: int = 2,
          on_nonfinite: str = "stop", validate_examples: int | None = 10_000) -> dict:
  """Trains one stage and writes its result into model_dir. Returns a summary dict.

  batch_size is the global batch (sequences per optimizer step); it must divide by accumulation_steps.
  Validation loss is computed every eval_period steps (and at the end) on up to eval_steps batches of
  validation_split; the parameters with the lowest validation loss are what the run writes.
  in_memory_data: preprocess each task's training split once and sample batches from memory (fast for
  small data); otherwise stream from seqio.
  partitioner: a partitioning.Partitioner to train sharded over its mesh (gin/partitioning/*.gin); with
  several hosts each reads batch_size / process_count sequences per step.
  checkpoint_period: every so many steps the whole train state (parameters, optimizer state, step, RNG,
  input position, best-so-far) is checkpointed under model_dir/checkpoints (the newest keep_checkpoints
  are kept); a restarted run resumes from the newest and ends with the same parameters as an
  uninterrupted one. SIGTERM (preemption) writes a checkpoint and raises Preempted.
  validate_examples: how many examples of each task's train (and validation) split are checked before
  training (fields, empty targets, UTF-8; those over the feature lengths are counted); None: all.
  on_nonfinite: 'stop' (raise NonFiniteLossError at the step whose loss or gradient is NaN/Inf, keeping
  the last good checkpoint) or 'skip' (that step's update is not applied and training continues).
  """
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)}")
  if on_nonfinite not in ("stop", "skip"):
    raise ValueError(f"on_nonfinite must be 'stop' or 'skip', not {on_nonfinite!r}")
  gin_utils.require("train", model_dir=model_dir, mixture_or_task_name=mixture_or_task_name,
                    task_feature_lengths=task_feature_lengths, train_steps=train_steps, batch_size=batch_size,
                    initial_checkpoint_path=initial_checkpoint_path, expert_path=expert_path)
  if batch_size % accumulation_steps:
    raise ValueError(f"BATCH_SIZE={batch_size} does not divide into ACCUMULATION_STEPS={accumulation_steps}")
  mode, trainable_regex = STAGES[stage]
  if mixture_or_task_module:
    import importlib
    importlib.import_module(mixture_or_task_module)  # registers the seqio tasks
  model_dir = Path(model_dir)
  # Bad data is refused before anything is written.
  for split in ("train",) + ((validation_split,) if eval_period else ()):
    data_checks.check_split(mixture_or_task_name, split, task_feature_lengths, validate_examples,
                            log=lambda msg: _log(f"[{stage}] {msg}"))
  base_config, base_params = _load_base(initial_checkpoint_path, model_config, seed)
  if dropout_rate is not None:
    base_config = base_config.replace(dropout_rate=dropout_rate)
  adapter = (adapter or AdapterConfig()).replace(mode=mode)
  fingerprint = library.base_model_fingerprint(base_params)

  run_info = {"stage": stage, "mixture_or_task_name": mixture_or_task_name, "train_steps": train_steps,
              "batch_size": batch_size, "accumulation_steps": accumulation_steps, "seed": seed,
              "task_feature_lengths": dict(task_feature_lengths), "base_model": fingerprint,
              "initial_checkpoint_path": initial_checkpoint_path, "expert_path": expert_path,
              "adapter": dataclasses.asdict(adapter), "learning_rate": learning_rate}
  _prepare_model_dir(model_dir, run_info, overwrite)
  if overwrite:  # start over: an earlier run's checkpoints must not be resumed
    for name in (checkpoints.TRAIN_CHECKPOINTS_DIR, "tensorboard", "train_log.jsonl", "summary.json"):
      path = model_dir / name
      shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
  elif (model_dir / "summary.json").is_file():
    _log(f"[{stage}] {model_dir} holds this run, finished: nothing to do (pass overwrite to train again)")
    return json.loads((model_dir / "summary.json").read_text())

  source_expert = None
  if stage == "gate":
    if not expert_path:
      raise ValueError("gate training needs EXPERT_PATH: the expert (a directory written by train-expert)")
    source_expert = library.load_expert(expert_path)
    if source_expert.base_model != fingerprint:
      raise library.LibraryError(f"expert {source_expert.name!r} was trained on base model {source_expert.base_model}, "
                                 f"not on {fingerprint} (INITIAL_CHECKPOINT_PATH)")
    # The gated model has exactly the expert's sites, rank and scale.
    adapter = adapter.replace(rank=source_expert.rank, alpha=source_expert.alpha,
                              sites="|".join(re.escape(s) for s in source_expert.sites))

  model = EncoderDecoderModel(Transformer(base_config, adapter))
  # Start from the adapter model's initialization with the base weights grafted in.
  tokens = jnp.ones((1, 1), jnp.int32)
  init_params = jax.jit(lambda r: model.module.init(r, tokens, tokens, tokens, enable_dropout=False)["params"])(
      jax.random.PRNGKey(seed))
  params = adapters.graft_base(init_params, base_params) if mode != "none" else base_params
  if source_expert is not None:
    flat = adapters.flatten(params)
    lora_keys = {k for k in flat if k.rsplit("/", 1)[-1] in library.LORA_PARAMS}
    if lora_keys != {k for k in source_expert.tensors if not k.endswith("/gate")}:
      raise library.LibraryError(f"expert {source_expert.name!r}: its sites are not all linear sites of this model")
    flat.update({k: source_expert.tensors[k] for k in lora_keys})
    params = adapters.unflatten(flat)

  trainable, frozen = split_trainable(params, trainable_regex)
  tx, schedule = make_optimizer(train_steps, learning_rate=learning_rate, warmup_ratio=warmup_ratio,
                                weight_decay=weight_decay, max_grad_norm=max_grad_norm)
  trainer = Trainer(model, tx, schedule, partitioner=partitioner, skip_nonfinite=on_nonfinite == "skip")
  state = trainer.init_state(trainable, seed)
  frozen = {k: jnp.asarray(v) for k, v in frozen.items()}
  hosts = jax.process_count()
  if batch_size % (accumulation_steps * hosts):
    raise ValueError(f"BATCH_SIZE={batch_size} does not split into {accumulation_steps} micro-batches on {hosts} hosts")
  if partitioner is not None:
    state, frozen = trainer.shard(state, frozen, (accumulation_steps, batch_size // accumulation_steps, 1))
    to_device = lambda b, dim: partitioner.shard_batch(b, batch_dim=dim)
    _log(f"[{stage}] sharded over mesh {dict(partitioner.mesh.shape)} on {jax.process_count()} host(s)")
  else:
    to_device = lambda b, dim: b
  n_train = sum(v.size for v in trainable.values())
  n_frozen = sum(v.size for v in frozen.values())
  _log(f"[{stage}] {mixture_or_task_name}: training {n_train:,} parameters ({len(trainable)} tensors), "
       f"{n_frozen:,} frozen; {train_steps} steps x {batch_size} sequences ({accumulation_steps} micro-batches)")

  micro = batch_size // accumulation_steps // hosts  # this host's rows of each micro-batch
  if in_memory_data:
    source = _in_memory_batches(mixture_or_task_name, task_feature_lengths, "train", micro, seed, pack, use_cached)
  else:
    source = _seqio_batches(mixture_or_task_name, task_feature_lengths, "train", micro, True, seed, None, pack,
                            use_cached)
  train_batches = _accumulated(source, accumulation_steps)

  def validation_loss() -> float:
    loss, tokens = 0.0, 0.0
    batches = _seqio_batches(mixture_or_task_name, task_feature_lengths, validation_split, micro, False, None, 1,
                             pack, use_cached)
    for i, batch in enumerate(batches):
      if eval_steps is not None and i >= eval_steps:
        break
      l, t = trainer.eval_step(state.trainable, frozen, to_device(batch, 0))
      loss, tokens = loss + float(l), tokens + float(t)
    if tokens == 0:
      raise ValueError(f"the {validation_split!r} split of {mixture_or_task_name} is empty")
    return loss / tokens

  ckpt_root = model_dir / checkpoints.TRAIN_CHECKPOINTS_DIR
  log_path = model_dir / "train_log.jsonl"
  best = {"loss": math.inf, "step": 0, "trainable": None}
  start_step = 0
  resume_from = checkpoints.latest_train_checkpoint(ckpt_root)
  if resume_from is not None:
    best_target = distributed.to_host(state.trainable)
    saved, saved_best, meta = checkpoints.restore_train_checkpoint(resume_from, _state_tree(state), best_target)
    state = TrainState(**saved)
    start_step = int(meta["step"])
    best = {"loss": meta["best_loss"] if meta["best_loss"] is not None else math.inf, "step": meta["best_step"],
            "trainable": distributed.to_host(saved_best) if saved_best is not None else None}
    for _ in range(meta["batches_consumed"]):  # the input pipeline continues where it stopped
      next(train_batches)
    _truncate_log(log_path, start_step)
    _log(f"[{stage}] resuming from {resume_from} (step {start_step}/{train_steps})")
  else:
    _truncate_log(log_path, -1)  # a run killed before its first checkpoint starts over

  def save_checkpoint(step: int) -> Path:
    meta = {"batches_consumed": step, "best_loss": None if math.isinf(best["loss"]) else best["loss"],
            "best_step": best["step"]}
    path = checkpoints.save_train_checkpoint(ckpt_root, step, _state_tree(state), best["trainable"], meta,
                                             keep=keep_checkpoints)
    _log(f"[{stage}] checkpoint {path.name}")
    return path

  log_file = open(log_path, "a")
  writer = telemetry.MetricWriter(model_dir / "tensorboard")
  if eval_period and start_step == 0:  # the starting point is a candidate too (e.g. zero gates, or an untouched base)
    val = validation_loss()
    _log(f"[{stage}] step 0: validation loss {val:.4f}")
    log_file.write(json.dumps({"step": 0, "validation_loss": val}) + "\n")
    writer.write_scalars(0, {"validation_loss": val})
    best = {"loss": val, "step": 0, "trainable": distributed.to_host(state.trainable)}
  start = time.time()
  step_times = []
  with _preemption_signal() as preempted:
    for step in range(start_step + 1, train_steps + 1):
      if preempted():
        path = save_checkpoint(step - 1)
        log_file.close()
        writer.close()
        raise Preempted(f"[{stage}] SIGTERM: stopped after step {step - 1}/{train_steps} with checkpoint {path}; "
                        f"run the same command again to resume")
      try:
        batch = next(train_batches)
      except StopIteration:
        raise ValueError(f"{mixture_or_task_name} yielded no training batch of {micro} sequences") from None
      t0 = time.time()
      state, metrics = trainer.train_step(state, frozen, to_device(batch, 1))
      loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        if on_nonfinite == "skip":
          _log(f"[{stage}] step {step}: loss {loss} / gradient norm {grad_norm} not finite: update skipped")
        else:
          log_file.close()
          writer.close()
          last = checkpoints.latest_train_checkpoint(ckpt_root)
          raise NonFiniteLossError(
              f"[{stage}] step {step}: loss {loss} / gradient norm {grad_norm} is not finite; stopped. The last good "
              f"checkpoint is {last or 'none (no checkpoint was written yet)'}. Lower the learning rate or check the "
              f"data, then resume; or set train.on_nonfinite='skip'")
      record = {"step": step}
      if step % log_period == 0 or step == train_steps:
        metrics = {k: float(v) for k, v in metrics.items()}
        step_times.append(time.time() - t0)
        elapsed = time.time() - start
        done = step - start_step
        eta = elapsed / done * (train_steps - step)
        record.update(metrics, tokens_per_second=metrics["tokens"] / max(step_times[-1], 1e-9), elapsed=elapsed)
        writer.write_scalars(step, {"loss": metrics["loss"], "learning_rate": metrics["learning_rate"],
                                    "grad_norm": metrics["grad_norm"], "tokens_per_second": record["tokens_per_second"],
                                    "step_time": step_times[-1]})
        _log(f"[{stage}] step {step}/{train_steps} loss {metrics['loss']:.4f} grad_norm {metrics['grad_norm']:.3f} "
             f"lr {metrics['learning_rate']:.2e} ({done / elapsed:.2f} steps/s, ETA {eta:.0f}s)")
      if eval_period and (step % eval_period == 0 or step == train_steps):
        val = validation_loss()
        record["validation_loss"] = val
        writer.write_scalars(step, {"validation_loss": val})
        _log(f"[{stage}] step {step}: validation loss {val:.4f}{' (best so far)' if val < best['loss'] else ''}")
        if val < best["loss"]:
          best = {"loss": val, "step": step, "trainable": distributed.to_host(state.trainable)}
      if len(record) > 1:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
      if checkpoint_period and step % checkpoint_period == 0 and step < train_steps:
        save_checkpoint(step)
  log_file.close()
  writer.close()
  if best["trainable"] is None:  # no validation: keep the last parameters
    best = {"loss": None, "step": train_steps, "trainable": distributed.to_host(state.trainable)}
  final_params = adapters.unflatten({**distributed.to_host(frozen), **best["trainable"]})

  summary = {"stage": stage, "steps": train_steps, "best_step": best["step"], "validation_loss": best["loss"],
             "seconds": time.time() - start}
  if stage == "full":
    path = checkpoints.save_checkpoint(model_dir / "checkpoint", final_params, base_config,
                                       {"train_summary": summary}, overwrite=True)
  else:
    name = expert_name or (source_expert.name if source_expert else _default_expert_name(mixture_or_task_name))
    validation = {"loss": best["loss"]} if best["loss"] is not None else {}
    fields = dict(expert_steps=train_steps, validation=validation)
    if source_expert is not None:
      fields = dict(expert_steps=source_expert.expert_steps, gate_steps=train_steps,
                    validation={**source_expert.validation, **{f"gate_{k}": v for k, v in validation.items()}})
    expert = library.expert_from_params(final_params, name=name, task=mixture_or_task_name,
                                        base_fingerprint=fingerprint, adapter_config=adapter,
                                        model_config=base_config, **fields)
    path = library.save_expert(expert, model_dir / "expert", overwrite=True)
  summary["output"] = str(path)
  (model_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  _log(f"[{stage}] done: {path} (best step {best['step']}, validation loss {best['loss']})")
  return summary


def _default_expert_name(task: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.\-]", "_", task)
