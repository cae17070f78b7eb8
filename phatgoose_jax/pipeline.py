"""The main job: pretrain (or reuse) a base, train every expert and gate, and compare PHATGOOSE with every
baseline zero-shot on held-out tasks. Stages write their outputs under `output_dir` and a rerun skips what
is finished.

  output_dir/base/                       pretrained base (skipped with an initial checkpoint)
  output_dir/seed_<s>/experts/<task>/    LoRA expert runs (train-expert)
  output_dir/seed_<s>/gates/<task>/      gate runs (train-gate); their experts form seed_<s>/library/
  output_dir/seed_<s>/multitask/         one LoRA on the union of held-in tasks (a non-post-hoc reference)
  output_dir/seed_<s>/routing/           Average-Activation vectors, the Retrieval index
  output_dir/seed_<s>/eval/<method>.json per-task metrics of each method
  output_dir/results.json, results.csv, routing_usage.png, routing_tokens.png
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import gin
import jax
import numpy as np

from phatgoose_jax import adapters, checkpoints, evaluation, library, routers, training
from phatgoose_jax.adapters import AdapterConfig
from phatgoose_jax.config import T5Config
from phatgoose_jax.model import EncoderDecoderModel
from phatgoose_jax.network import Transformer

ROUTED_METHODS = ("phatgoose", "average_activation", "arrow")
METHODS = ("base", "phatgoose", "average_activation", "arrow", "retrieval", "merged", "multitask", "oracle",
           "best_individual")


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


@gin.configurable
@dataclasses.dataclass
class PipelineConfig:
  """Everything the main job does. Defaults: the offline letter-skills benchmark on a small byte-level
  T5 pretrained here (see gin/runs/offline_benchmark.gin and tasks/README.md)."""
  output_dir: str = "runs/offline"
  seeds: int = 1
  tasks_module: str = "phatgoose_tasks"
  register_fns: Sequence[Any] = ()     # called once before anything else, e.g. [@t0.register] (gin-configured)
  held_in_tasks: Sequence[str] = ()    # one expert per entry (a task or a mixture)
  held_out_tasks: Sequence[str] = ()   # tasks, or mixtures standing for their tasks
  multitask_mixture: str | None = None
  eval_split: str = "test"
  # Base model: an existing checkpoint, or pretraining from scratch on pretrain_task.
  initial_checkpoint_path: str | None = None
  model_config: T5Config | None = None
  pretrain_task: str | None = None
  pretrain_steps: int = 0
  pretrain_batch_size: int = 32
  pretrain_learning_rate: float = 3e-3
  pretrain_feature_lengths: dict = dataclasses.field(default_factory=lambda: {"inputs": 64, "targets": 24})
  pack: bool = True                    # pack training sequences (T5X's default; short tasks may not need it)
  in_memory_data: bool = False         # preprocess training data once and sample from memory (small data)
  # Experts, gates, multitask.
  expert_steps: int = 1000
  gate_steps: int = 100
  multitask_steps: int = 1000
  batch_size: int = 32
  accumulation_steps: int = 1
  learning_rate: float = 5e-3
  dropout_rate: float = 0.1
  train_feature_lengths: dict = dataclasses.field(default_factory=lambda: {"inputs": 64, "targets": 32})
  eval_period: int = 0
  lora_rank: int = 16
  lora_alpha: float = 1.0
  # Evaluation.
  methods: Sequence[str] = METHODS
  top_k: int = 2
  kernel: str = "auto"
  eval_feature_lengths: dict = dataclasses.field(default_factory=lambda: {"inputs": 96, "targets": 16})
  eval_batch_size: int = 64
  max_eval_examples: int | None = None
  average_activation_examples: int = 100
  # Sharding of training and evaluation (gin/partitioning/*.gin binds it); None: one device.
  partitioner: Any = None
  retrieval_examples: int = 100
  evaluate_held_in: bool = True
  # Compiled XLA programs are kept here, so the identical train steps of every expert (and reruns)
  # compile once. None disables it.
  compilation_cache_dir: str | None = "~/.cache/phatgoose_jax/xla"

  def __post_init__(self):
    unknown = [m for m in self.methods if m not in METHODS]
    if unknown:
      raise ValueError(f"unknown method(s) {unknown}; known: {METHODS}")
    if not self.held_in_tasks or not self.held_out_tasks:
      raise ValueError("PipelineConfig needs held_in_tasks and held_out_tasks")
    if not 1 <= self.top_k <= len(self.held_in_tasks):
      raise ValueError(f"top_k={self.top_k} must be between 1 and the number of experts ({len(self.held_in_tasks)})")
    if self.initial_checkpoint_path is None and (self.pretrain_task is None or self.model_config is None):
      raise ValueError("give INITIAL_CHECKPOINT_PATH, or pretrain_task and a model config to pretrain a base")


def expand_tasks(names: Sequence[str]) -> list[str]:
  import seqio
  out = []
  for name in names:
    provider = seqio.get_mixture_or_task(name)  # raises, naming the task, if it is not registered
    out.extend([t.name for t in seqio.get_subtasks(provider)] if isinstance(provider, seqio.Mixture) else [name])
  return out


def _done(run_dir: Path) -> bool:
  return (run_dir / "summary.json").is_file()


def _expert_name(task: str) -> str:
  return training._default_expert_name(task)  # pylint: disable=protected-access


class Pipeline:
  def __init__(self, cfg: PipelineConfig):
    import importlib
    importlib.import_module(cfg.tasks_module)
    for register in cfg.register_fns:
      register()
    # A held-out mixture stands for its tasks (e.g. t0_held_out: every dataset x template pair).
    cfg = dataclasses.replace(cfg, held_out_tasks=tuple(expand_tasks(cfg.held_out_tasks)))
    self.cfg = cfg
    if cfg.compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", str(Path(cfg.compilation_cache_dir).expanduser()))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    self.out = Path(cfg.output_dir)
    self._claim_output_dir()
    self._tasks: dict[str, evaluation.TaskData] = {}

  # Settings that do not change any stored result: a rerun may change them (more seeds extend a run).
  _RERUNNABLE = ("seeds", "compilation_cache_dir", "partitioner", "output_dir")

  def _claim_output_dir(self) -> None:
    """Records this run's settings in output_dir/pipeline.json; refuses a directory holding another run's
    results (they would be reused as if they were this run's)."""
    settings = {f.name: _jsonable(getattr(self.cfg, f.name)) for f in dataclasses.fields(self.cfg)
                if f.name not in self._RERUNNABLE}
    record = self.out / "pipeline.json"
    if record.is_file():
      previous = json.loads(record.read_text())
      if previous != settings:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise FileExistsError(f"{self.out} holds the results of a different pipeline run (differs in {changed}); "
                              f"choose another --output_dir")
    elif self.out.exists() and any(self.out.iterdir()):
      raise FileExistsError(f"{self.out} is not empty and holds no pipeline.json: not a pipeline output directory; "
                            f"choose another --output_dir")
    else:
      self.out.mkdir(parents=True, exist_ok=True)
      record.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")

  # -- training stages ------------------------------------------------------------------------------
  def base_checkpoint(self) -> Path:
    cfg = self.cfg
    if cfg.initial_checkpoint_path:
      return Path(cfg.initial_checkpoint_path)
    run = self.out / "base"
    if not _done(run):
      _log(f"== pretraining the base model on {cfg.pretrain_task} ({cfg.pretrain_steps} steps)")
      training.train("full", model_dir=str(run), mixture_or_task_name=cfg.pretrain_task,
                     task_feature_lengths=cfg.pretrain_feature_lengths, train_steps=cfg.pretrain_steps,
                     batch_size=cfg.pretrain_batch_size, model_config=cfg.model_config, dropout_rate=0.0,
                     learning_rate=cfg.pretrain_learning_rate, warmup_ratio=0.02, eval_period=0, seed=0,
                     log_period=max(1, cfg.pretrain_steps // 10), pack=cfg.pack, in_memory_data=cfg.in_memory_data,
                     partitioner=cfg.partitioner)
    return run / "checkpoint"

  def _train(self, stage: str, run: Path, task: str, steps: int, seed: int, **kwargs) -> Path:
    cfg = self.cfg
    if not _done(run):
      training.train(stage, model_dir=str(run), mixture_or_task_name=task, task_feature_lengths=cfg.train_feature_lengths,
                     train_steps=steps, batch_size=cfg.batch_size, accumulation_steps=cfg.accumulation_steps,
                     initial_checkpoint_path=str(self.base_checkpoint()), dropout_rate=cfg.dropout_rate,
                     learning_rate=cfg.learning_rate, eval_period=cfg.eval_period, eval_steps=4, seed=seed,
                     log_period=max(1, steps // 4), pack=cfg.pack, in_memory_data=cfg.in_memory_data,
                     partitioner=cfg.partitioner, **kwargs)
    return run / "expert"

  def train_experts(self, seed: int) -> library.ExpertLibrary:
    """Expert then gate training for every held-in task; the gated experts form the seed's library."""
    cfg = self.cfg
    sdir = self.out / f"seed_{seed}"
    lib = library.ExpertLibrary(sdir / "library", create=True)
    adapter = AdapterConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    for i, task in enumerate(cfg.held_in_tasks):
      name = _expert_name(task)
      if name in lib.names():
        continue
      _log(f"== seed {seed}: expert {i + 1}/{len(cfg.held_in_tasks)} ({task})")
      expert_dir = self._train("expert", sdir / "experts" / name, task, cfg.expert_steps, seed, adapter=adapter,
                               expert_name=name)
      gated_dir = self._train("gate", sdir / "gates" / name, task, cfg.gate_steps, seed, expert_path=str(expert_dir))
      lib.add(library.load_expert(gated_dir), overwrite=True)
    return lib

  def train_multitask(self, seed: int) -> Path | None:
    cfg = self.cfg
    if "multitask" not in cfg.methods or not cfg.multitask_mixture:
      return None
    _log(f"== seed {seed}: multitask LoRA on {cfg.multitask_mixture}")
    return self._train("expert", self.out / f"seed_{seed}" / "multitask", cfg.multitask_mixture, cfg.multitask_steps,
                       seed, adapter=AdapterConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha), expert_name="multitask")

  # -- evaluation ----------------------------------------------------------------------------------
  def task(self, name: str, split: str | None = None) -> evaluation.TaskData:
    key = f"{name}:{split or self.cfg.eval_split}"
    if key not in self._tasks:
      self._tasks[key] = evaluation.load_task(name, split or self.cfg.eval_split, self.cfg.max_eval_examples)
    return self._tasks[key]

  def _method(self, name: str, model, params) -> evaluation.ModelMethod:
    return evaluation.ModelMethod(name, model, params, partitioner=self.cfg.partitioner)

  def _run_method(self, method, tasks: Sequence[str], result_file: Path, split: str | None = None) -> dict:
    if result_file.is_file():
      return json.loads(result_file.read_text())
    results, start = {}, time.time()
    for t in tasks:
      data = self.task(t, split)
      metrics, details = evaluation.evaluate_task(method, data, self.cfg.eval_feature_lengths,
                                                  self.cfg.eval_batch_size, progress=True)
      if details["truncated"]:
        _log(f"   {method.name} {t}: {details['truncated']} example(s) truncated to the evaluation lengths")
      results[t] = {**metrics, "num_examples": details["num_examples"]}
    _log(f"   {method.name}: " + ", ".join(f"{_short(t)} {_main_metric(r):.1f}" for t, r in results.items())
         + f" ({time.time() - start:.0f}s)")
    result_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.rename(result_file)
    return results

  def evaluate(self, seed: int, lib: library.ExpertLibrary, multitask_dir: Path | None) -> dict[str, dict]:
    cfg = self.cfg
    sdir = self.out / f"seed_{seed}"
    edir = sdir / "eval"
    config, base = checkpoints.load_checkpoint(self.base_checkpoint())
    base = jax.tree_util.tree_map(np.asarray, base)
    stacked = lib.stack([_expert_name(t) for t in cfg.held_in_tasks])
    names = stacked.names
    lora_cfg = AdapterConfig(mode="lora", rank=stacked.rank, alpha=stacked.alpha, sites=stacked.sites_regex)
    lora = EncoderDecoderModel(Transformer(config, lora_cfg))  # one compiled model for every single LoRA
    base_flat, _ = adapters.split_params(base)

    def lora_params(tensors: dict[str, np.ndarray]) -> dict:
      return adapters.unflatten({**base_flat, **{k: v for k, v in tensors.items() if k.rsplit("/", 1)[-1] in
                                                 library.LORA_PARAMS}})

    expert_params = lambda e: lora_params({f"{s}/{p}": getattr(stacked, p)[s][e] for s in stacked.sites
                                           for p in library.LORA_PARAMS})
    held_out = list(cfg.held_out_tasks)
    results: dict[str, dict] = {}
    _log(f"== seed {seed}: evaluating on {len(held_out)} held-out tasks")

    if "base" in cfg.methods:
      # The base model is the LoRA model with B = 0 (exactly the base computation, and no extra compile).
      zero_params = lora_params({f"{s}/{p}": (np.zeros_like(getattr(stacked, p)[s][0]) if p == "lora_b" else
                                              getattr(stacked, p)[s][0]) for s in stacked.sites
                                 for p in library.LORA_PARAMS})
      results["base"] = self._run_method(self._method("base", lora, zero_params), held_out, edir / "base.json")

    singles = {}
    if {"oracle", "best_individual"} & set(cfg.methods):
      for e, name in enumerate(names):
        singles[name] = self._run_method(self._method(f"expert:{name}", lora, expert_params(e)), held_out,
                                         edir / f"expert_{name}.json")
      results.update(oracle_and_best_individual(singles, held_out, cfg.methods))
    if cfg.evaluate_held_in:
      held_in = {}
      for e, (name, task) in enumerate(zip(names, cfg.held_in_tasks)):
        held_in[name] = self._run_method(self._method(f"expert:{name}", lora, expert_params(e)), [task],
                                         edir / f"held_in_{name}.json", split="test")
      results["_held_in_experts"] = {n: r for name, r in held_in.items() for n, r in r.items()}

    routed_vectors = {}
    if "phatgoose" in cfg.methods:
      routed_vectors["phatgoose"] = ("phatgoose", None)
    if "average_activation" in cfg.methods:
      routed_vectors["average_activation"] = ("phatgoose", self.average_activation_vectors(seed, stacked, lora,
                                                                                          expert_params))
    if "arrow" in cfg.methods:
      routed_vectors["arrow"] = ("arrow", routers.arrow_vectors(stacked))
    models = {}
    for method, (router, vectors) in routed_vectors.items():
      if router not in models:
        models[router] = library.routed_model(config, base, stacked, top_k=cfg.top_k, kernel=cfg.kernel,
                                              router=router, router_vectors=vectors)
      model, _ = models[router]
      params = library.routed_model_params(base, stacked, vectors, check_base=False)
      results[method] = self._run_method(self._method(method, model, params), held_out,
                                         edir / f"{method}.json")
      if method == "phatgoose" and cfg.evaluate_held_in:
        # Does routing recover the skills the library has experts for? (held-in test splits)
        results["_held_in_phatgoose"] = self._run_method(
            self._method(method, model, params), list(cfg.held_in_tasks), edir / "held_in_phatgoose.json",
            split="test")

    if "retrieval" in cfg.methods:
      index = self.retrieval_index(seed, names)
      results["retrieval"] = self._run_method(RetrievalMethod(lora, expert_params, index, self.embedder()), held_out,
                                              edir / "retrieval.json")
    if "merged" in cfg.methods:
      flat, merged_cfg = routers.merged_lora(stacked)
      merged = EncoderDecoderModel(Transformer(config, merged_cfg))
      results["merged"] = self._run_method(
          self._method("merged", merged, adapters.unflatten({**base_flat, **flat})), held_out,
          edir / "merged.json")
    if "multitask" in cfg.methods and multitask_dir is not None:
      mt = library.load_expert(multitask_dir)
      results["multitask"] = self._run_method(self._method("multitask", lora, lora_params(mt.tensors)),
                                              held_out, edir / "multitask.json")
    if "phatgoose" in cfg.methods and seed == 0:
      self.routing_plots(config, base, stacked)
    return results

  # -- baselines' ingredients ------------------------------------------------------------------------
  def average_activation_vectors(self, seed, stacked, lora, expert_params) -> dict[str, np.ndarray]:
    cfg = self.cfg
    path = self.out / f"seed_{seed}" / "routing" / "average_activation.npz"
    if path.is_file():
      data = np.load(path)
      return {s: data[s.replace("/", "|")] for s in stacked.sites}
    _log(f"   average activations over {cfg.average_activation_examples} training examples per expert")
    recording = EncoderDecoderModel(Transformer(lora.module.config, lora.module.adapter.replace(record_inputs=True)))

    def batches(e):
      data = evaluation.load_task(cfg.held_in_tasks[e], "train", cfg.average_activation_examples)
      for batch, _, _ in evaluation.make_batches(data.examples, cfg.eval_batch_size, cfg.train_feature_lengths,
                                                 data.vocabulary.eos_id):
        yield batch

    vectors = routers.standardized(routers.average_activation_vectors(recording, expert_params, stacked.num_experts,
                                                                      batches))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{s.replace("/", "|"): v for s, v in vectors.items()})
    return vectors

  def embedder(self):
    if not hasattr(self, "_embedder"):
      from phatgoose_jax.embedder import SentenceEmbedder
      self._embedder = SentenceEmbedder()
    return self._embedder

  def retrieval_index(self, seed: int, names: Sequence[str]) -> routers.RetrievalIndex:
    cfg = self.cfg
    path = self.out / f"seed_{seed}" / "routing" / "retrieval_index.npz"
    if path.is_file():
      return routers.RetrievalIndex.load(path)
    _log(f"   retrieval index: MiniLM embeddings of {cfg.retrieval_examples} training examples per expert")
    texts = []
    for task in cfg.held_in_tasks:
      data = evaluation.load_task(task, "train", cfg.retrieval_examples)
      texts.append([retrieval_text(ex) for ex in data.examples])
    index = routers.RetrievalIndex.build(self.embedder(), texts, cfg.retrieval_examples)
    path.parent.mkdir(parents=True, exist_ok=True)
    index.save(path)
    return index

  # -- plots -----------------------------------------------------------------------------------------
  def routing_plots(self, config, base, stacked) -> None:
    from phatgoose_jax import plots
    if (self.out / "routing_usage.png").is_file():
      return
    model, params = library.routed_model(config, base, stacked, top_k=self.cfg.top_k, kernel=self.cfg.kernel,
                                         record_routing=True)
    plots.routing_figures(model, params, stacked.names, [self.task(t) for t in self.cfg.held_out_tasks],
                          self.cfg.eval_feature_lengths, self.out)

  def write_eval_summaries(self, per_seed: Mapping[int, Mapping[str, dict]]) -> None:
    """Every numeric evaluation metric as a TensorBoard scalar <method>/<task>/<metric> at step = seed."""
    from phatgoose_jax import telemetry
    jsonl = self.out / "tensorboard" / "metrics.jsonl"
    written = {json.loads(line)["step"] for line in jsonl.read_text().splitlines()} if jsonl.is_file() else set()
    if not set(per_seed) - written:
      return  # a rerun: every seed's metrics are there already
    with telemetry.MetricWriter(self.out / "tensorboard") as writer:
      for seed, results in per_seed.items():
        if seed in written:
          continue
        writer.write_scalars(seed, {f"{method}/{task}/{metric}": value for method, per_task in results.items()
                                    if not method.startswith("_") for task, metrics in per_task.items()
                                    if isinstance(metrics, Mapping) for metric, value in metrics.items()
                                    if isinstance(value, (int, float)) and not isinstance(value, bool)})

  # -- the whole job ---------------------------------------------------------------------------------
  def run(self) -> dict:
    start = time.time()
    self.base_checkpoint()
    per_seed = {}
    for seed in range(self.cfg.seeds):
      lib = self.train_experts(seed)
      multitask_dir = self.train_multitask(seed)
      per_seed[seed] = self.evaluate(seed, lib, multitask_dir)
    self.write_eval_summaries(per_seed)
    summary = aggregate(per_seed, list(self.cfg.held_out_tasks), [m for m in self.cfg.methods])
    summary["config"] = {f.name: _jsonable(getattr(self.cfg, f.name)) for f in dataclasses.fields(self.cfg)}
    summary["wall_seconds"] = time.time() - start
    write_results(summary, self.out)
    print(format_table(summary))
    print(f"\nresults: {self.out / 'results.json'}, {self.out / 'results.csv'}; plots: "
          f"{self.out / 'routing_usage.png'}, {self.out / 'routing_tokens.png'} "
          f"(wall time {summary['wall_seconds'] / 60:.1f} min)")
    return summary


class RetrievalMethod:
  """One expert per example, chosen by MiniLM nearest neighbours among the experts' training examples,
  applied at every site (the single-expert LoRA model with that expert's weights)."""

  def __init__(self, lora_model, expert_params, index: routers.RetrievalIndex, embedder):
    self.name = "retrieval"
    self.model = lora_model
    self.expert_params = expert_params
    self.index = index
    self.embedder = embedder
    self._choice: dict[str, int] = {}   # query text -> expert (rank-classification rows share their query)
    self._params: dict[int, Any] = {}

  def _experts(self, rows) -> np.ndarray:
    texts = [retrieval_text(r) for r in rows]
    missing = sorted({t for t in texts if t not in self._choice})
    if missing:
      self._choice.update(zip(missing, self.index.choose(self.embedder.embed(missing)).tolist()))
    return np.array([self._choice[t] for t in texts])

  def _params_of(self, e: int):
    if e not in self._params:
      self._params[e] = self.expert_params(int(e))
    return self._params[e]

  def _per_expert(self, batch, rows, run):
    experts = self._experts(rows)
    out = None
    for e in np.unique(experts):
      res = run(self._params_of(e))
      out = np.zeros_like(res) if out is None else out
      sel = np.zeros(res.shape[0], bool)
      sel[:len(rows)] = experts == e
      out[sel] = res[sel]
    return out

  def score(self, batch, rows):
    return self._per_expert(batch, rows, lambda p: np.asarray(self.model.jit_score(p, batch)["sum"]))

  def predict(self, batch, rows, max_decode_length):
    return self._per_expert(batch, rows, lambda p: np.asarray(
        self.model.jit_predict(p, batch, max_decode_length=max_decode_length)[0]))


def _jsonable(value):
  """Settings as JSON that reads back equal: tuples as lists, functions by name, other objects by repr."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return _jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if callable(value) and hasattr(value, "__qualname__"):
    return f"{value.__module__}.{value.__qualname__}"
  return repr(value)


def method_from_library(method: str, config, base_params, lib: library.ExpertLibrary | None, top_k: int = 2,
                        kernel: str = "auto", partitioner=None) -> evaluation.ModelMethod:
  """One evaluation method over a base model and a library: 'base', 'phatgoose', 'arrow', 'merged' or
  'expert:NAME' (the methods that need task data or training, like Average Activation, Retrieval and
  multitask, are built by the pipeline)."""
  if method == "base":
    return evaluation.ModelMethod("base", EncoderDecoderModel(Transformer(config)), base_params, partitioner)
  if lib is None:
    raise ValueError(f"method {method!r} needs --library")
  base_flat, _ = adapters.split_params(base_params)
  if method.startswith("expert:"):
    expert = lib.get(method.split(":", 1)[1])
    sites = "|".join(re.escape(s) for s in expert.sites)
    model = EncoderDecoderModel(Transformer(config, AdapterConfig(mode="lora", rank=expert.rank, alpha=expert.alpha,
                                                                  sites=sites)))
    lora = {k: v for k, v in expert.tensors.items() if k.rsplit("/", 1)[-1] in library.LORA_PARAMS}
    return evaluation.ModelMethod(method, model, adapters.unflatten({**base_flat, **lora}), partitioner)
  stacked = lib.stack()
  if method in ("phatgoose", "arrow"):
    vectors = routers.arrow_vectors(stacked) if method == "arrow" else None
    model, params = library.routed_model(config, base_params, stacked, top_k=top_k, kernel=kernel, router=method,
                                         router_vectors=vectors)
    return evaluation.ModelMethod(method, model, params, partitioner)
  if method == "merged":
    flat, merged_cfg = routers.merged_lora(stacked)
    return evaluation.ModelMethod("merged", EncoderDecoderModel(Transformer(config, merged_cfg)),
                                  adapters.unflatten({**base_flat, **flat}), partitioner)
  raise ValueError(f"unknown method {method!r}: choose base, phatgoose, arrow, merged or expert:NAME")


def retrieval_text(example: dict) -> str:
  """The Retrieval baseline's text of an example: "Instance: <input>". (The original prefixes the answer
  choices; a rank-classification row here carries only its own choice, so queries and library use the
  input alone.)"""
  return f"Instance: {evaluation._text(example.get('inputs_pretokenized', b''))}"  # pylint: disable=protected-access


def oracle_and_best_individual(singles: dict[str, dict], tasks: Sequence[str], methods) -> dict[str, dict]:
  """Oracle: per task the best single expert (chosen with test labels); Best Individual: the one expert
  with the best mean over tasks."""
  out = {}
  if "oracle" in methods:
    out["oracle"] = {}
    for t in tasks:
      best = max(singles, key=lambda n: _main_metric(singles[n][t]))
      out["oracle"][t] = {**singles[best][t], "expert": best}
  if "best_individual" in methods:
    best = max(singles, key=lambda n: np.mean([_main_metric(singles[n][t]) for t in tasks]))
    out["best_individual"] = {t: {**singles[best][t], "expert": best} for t in tasks}
  return out


def _main_metric(result: dict) -> float:
  for key in ("accuracy", "exact_match", "rougeL"):
    if key in result:
      return float(result[key])
  raise ValueError(f"no known metric in {result}")


def _short(task: str) -> str:
  return task.replace("pg_offline_heldout_", "").replace("pg_offline_", "")


def aggregate(per_seed: dict[int, dict], tasks: list[str], methods: list[str]) -> dict:
  """Per method and task: the main metric's mean and std over seeds; the mean over tasks likewise."""
  out = {"tasks": tasks, "seeds": sorted(per_seed), "methods": {}}
  for m in methods:
    if not all(m in r for r in per_seed.values()):
      continue
    by_task = {t: [_main_metric(per_seed[s][m][t]) for s in per_seed] for t in tasks}
    means = [float(np.mean([by_task[t][i] for t in tasks])) for i in range(len(per_seed))]
    out["methods"][m] = {
        "per_task": {t: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v} for t, v in by_task.items()},
        "mean": {"mean": float(np.mean(means)), "std": float(np.std(means)), "values": means}}
  out["held_in_experts"] = {s: r.get("_held_in_experts", {}) for s, r in per_seed.items()}
  out["held_in_phatgoose"] = {s: r.get("_held_in_phatgoose", {}) for s, r in per_seed.items()}
  out["per_seed"] = {s: {m: v for m, v in r.items() if not m.startswith("_")} for s, r in per_seed.items()}
  return out


def format_table(summary: dict) -> str:
  tasks = summary["tasks"]
  multi = len(summary["seeds"]) > 1
  cell = lambda d: f"{d['mean']:.1f}±{d['std']:.1f}" if multi else f"{d['mean']:.1f}"
  header = ["method"] + [_short(t) for t in tasks] + ["mean"]
  rows = [[m] + [cell(r["per_task"][t]) for t in tasks] + [cell(r["mean"])] for m, r in summary["methods"].items()]
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  lines = ["  ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))
           for row in [header, ["-" * w for w in widths], *rows]]
  return "\n".join(lines)


def write_results(summary: dict, out: Path) -> None:
  (out / "results.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
  tasks = summary["tasks"]
  with open(out / "results.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["method"] + tasks + ["mean"] + [f"{t}_std" for t in tasks] + ["mean_std"])
    for m, r in summary["methods"].items():
      w.writerow([m] + [f"{r['per_task'][t]['mean']:.3f}" for t in tasks] + [f"{r['mean']['mean']:.3f}"]
                 + [f"{r['per_task'][t]['std']:.3f}" for t in tasks] + [f"{r['mean']['std']:.3f}"])
