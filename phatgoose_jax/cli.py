"""`phatgoose` command line. Every subcommand takes `--gin_file=F` and `--gin.NAME=VALUE` flags."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from phatgoose_jax import gin_utils

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable, str]] = {}


def command(name: str, help_text: str):
  def register(fn):
    _COMMANDS[name] = (getattr(fn, "add_arguments", lambda p: None), fn, help_text)
    return fn
  return register


def _arguments(add):
  def attach(fn):
    fn.add_arguments = add
    return fn
  return attach


def _add_gin_help(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--gin_file", action="append", default=[], metavar="FILE",
                      help="gin file (repeatable; later files win). A size name (tiny, small, base, large, xl, xxl) "
                           "stands for gin/models/t5_1_1_<size>.gin")
  parser.epilog = ((parser.epilog or "") + "\nAny --gin.NAME=VALUE flag binds a gin parameter or macro, "
                   "e.g. --gin.T5Config.dtype=\\'float32\\'.")


# --------------------------------------------------------------------------------------------------
@command("import-hf", "convert a Hugging Face T5 checkpoint (config.json + safetensors/.bin) to ours")
@_arguments(lambda p: (p.add_argument("source", help="HF checkpoint directory"),
                       p.add_argument("output", help="checkpoint directory to create"),
                       p.add_argument("--dtype", default="bfloat16", help="activation dtype to record (default bfloat16)"),
                       p.add_argument("--overwrite", action="store_true", help="replace an existing output")))
def import_hf(args, gin_files, bindings) -> int:
  from phatgoose_jax import checkpoints
  from phatgoose_jax.importers.hf import import_hf_checkpoint

  _refuse_existing(args.output, args.overwrite)
  _forbid_gin(gin_files, bindings, "import-hf reads the model config from config.json")
  start = time.time()
  config, params = import_hf_checkpoint(args.source, dtype=args.dtype)
  path = checkpoints.save_checkpoint(args.output, params, config, {"imported_from": str(Path(args.source).absolute()),
                                                                    "source_format": "hf"},
                                     overwrite=args.overwrite)
  print(f"imported {args.source} -> {path} ({_count(params)/1e6:.1f}M parameters, {time.time() - start:.1f}s)")
  print(f"config: {config}")
  return 0


@command("import-t5x", "convert a T5X checkpoint (legacy msgpack+zarr or Orbax) to ours")
@_arguments(lambda p: (p.add_argument("source", help="checkpoint_<step> directory, or a model dir (latest step)"),
                       p.add_argument("output", help="checkpoint directory to create"),
                       p.add_argument("--step", type=int, default=None, help="step to take from a model dir"),
                       p.add_argument("--dtype", default="bfloat16", help="activation dtype (default bfloat16)"),
                       p.add_argument("--overwrite", action="store_true", help="replace an existing output"),
                       _add_gin_help(p)))
def import_t5x(args, gin_files, bindings) -> int:
  from phatgoose_jax import checkpoints, config as config_lib
  from phatgoose_jax.importers.t5x import import_t5x_checkpoint

  _refuse_existing(args.output, args.overwrite)
  config = None
  if gin_files or bindings:  # otherwise the config is read off the checkpoint's shapes
    config = config_lib.config_from_gin(gin_files, bindings)
  start = time.time()
  config, params = import_t5x_checkpoint(args.source, config=config, step=args.step, dtype=args.dtype)
  path = checkpoints.save_checkpoint(args.output, params, config,
                                     {"imported_from": str(Path(args.source).absolute()), "source_format": "t5x"},
                                     overwrite=args.overwrite)
  print(f"imported {args.source} -> {path} ({_count(params)/1e6:.1f}M parameters, {time.time() - start:.1f}s)")
  print(f"config: {config}")
  return 0


@command("demo", "score and generate with a model (default: a randomly initialized tiny T5 and the real T5 vocabulary)")
@_arguments(lambda p: (p.add_argument("--checkpoint", default=None, help="our checkpoint directory (default: random init)"),
                       p.add_argument("--vocabulary", default="t5", choices=["t5", "byte"]),
                       p.add_argument("--seed", type=int, default=0),
                       _add_gin_help(p)))
def demo(args, gin_files, bindings) -> int:
  from phatgoose_jax import demo as demo_lib
  return demo_lib.run_demo(checkpoint=args.checkpoint, vocabulary=args.vocabulary, gin_files=gin_files,
                           bindings=bindings, seed=args.seed)


def _train(stage: str, gin_files, bindings) -> int:
  import gin
  from phatgoose_jax import training
  if not gin_files:
    raise gin_utils.GinConfigError(f"give the run configuration: --gin_file=runs/train_{stage}.gin")
  gin_utils.parse_gin(gin_files, bindings)
  try:
    summary = training.train(stage)
  finally:
    gin.clear_config()
  print(f"{stage} training done: {summary['output']} (best step {summary['best_step']}, "
        f"validation loss {summary['validation_loss']})")
  return 0


_TRAIN_EPILOG = ("Configured by gin: --gin_file=runs/train_{0}.gin plus --gin.MACRO=VALUE flags for MODEL_DIR, "
                 "MIXTURE_OR_TASK_NAME, INITIAL_CHECKPOINT_PATH, TRAIN_STEPS, BATCH_SIZE, ...; see the gin file.")


@command("train-expert", "train a LoRA expert on a seqio task with the base model frozen (PHATGOOSE stage 1)")
@_arguments(lambda p: (_add_gin_help(p), setattr(p, "epilog", _TRAIN_EPILOG.format("expert") + (p.epilog or ""))))
def train_expert(args, gin_files, bindings) -> int:
  return _train("expert", gin_files, bindings)


@command("train-gate", "train the sigmoid gates of an expert with base and expert frozen (PHATGOOSE stage 2)")
@_arguments(lambda p: (_add_gin_help(p), setattr(p, "epilog", _TRAIN_EPILOG.format("gate") + (p.epilog or ""))))
def train_gate(args, gin_files, bindings) -> int:
  return _train("gate", gin_files, bindings)


@command("pretrain", "train the whole base model (e.g. span corruption) from a size gin file or a checkpoint")
@_arguments(lambda p: (_add_gin_help(p), setattr(p, "epilog", _TRAIN_EPILOG.format("pretrain") + (p.epilog or ""))))
def pretrain(args, gin_files, bindings) -> int:
  return _train("full", gin_files, bindings)


@command("train-multitask", "train one LoRA on a mixture of tasks (the multitask baseline)")
@_arguments(lambda p: (_add_gin_help(p), setattr(p, "epilog", _TRAIN_EPILOG.format("multitask") + (p.epilog or ""))))
def train_multitask(args, gin_files, bindings) -> int:
  return _train("expert", gin_files, bindings)


def _base_and_library(checkpoint: str, library_dir: str | None):
  import jax
  import numpy as np
  from phatgoose_jax import checkpoints, library
  config, params = checkpoints.load_checkpoint(checkpoint)
  params = jax.tree_util.tree_map(np.asarray, params)
  return config, params, (library.ExpertLibrary(library_dir) if library_dir else None)


def _register_tasks(module: str | None) -> None:
  if module:
    import importlib
    importlib.import_module(module)


def _feature_lengths(text: str) -> dict[str, int]:
  try:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
  except ValueError:
    raise ValueError(f"--feature_lengths {text!r}: expected inputs=N,targets=M") from None


def _eval_arguments(p):
  p.add_argument("--checkpoint", required=True, help="base model checkpoint (ours)")
  p.add_argument("--library", default=None, help="expert library (for every method but base)")
  p.add_argument("--method", default="phatgoose", help="base | phatgoose | arrow | merged | expert:NAME")
  p.add_argument("--tasks", nargs="+", required=True, help="seqio tasks to evaluate")
  p.add_argument("--split", default="validation")
  p.add_argument("--tasks_module", default="phatgoose_tasks", help="module that registers the tasks")
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--kernel", default="auto", help="routing kernel (dense, gather, grouped, blocked, looped, auto)")
  p.add_argument("--feature_lengths", default="inputs=512,targets=64")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--max_examples", type=int, default=None)
  p.add_argument("--output", default=None, help="JSON file for the metrics (refuses to overwrite)")
  p.add_argument("--tensorboard", default=None, help="directory for TensorBoard summaries of the metrics")


@command("eval", "evaluate one method (base, PHATGOOSE, Arrow, merged, one expert) on seqio tasks")
@_arguments(_eval_arguments)
def eval_command(args, gin_files, bindings) -> int:
  import json
  from phatgoose_jax import evaluation, pipeline, telemetry
  _forbid_gin(gin_files, bindings, "eval takes its settings as flags")
  if args.output:
    _refuse_existing(args.output, False)
  _register_tasks(args.tasks_module)
  config, base, lib = _base_and_library(args.checkpoint, args.library)
  method = pipeline.method_from_library(args.method, config, base, lib, top_k=args.top_k, kernel=args.kernel)
  lengths = _feature_lengths(args.feature_lengths)
  results = {}
  for task in args.tasks:
    data = evaluation.load_task(task, args.split, args.max_examples)
    metrics, details = evaluation.evaluate_task(method, data, lengths, args.batch_size, progress=True)
    results[task] = {**metrics, "num_examples": details["num_examples"], "truncated": details["truncated"]}
  _print_table(("task", "metric", "value", "examples", "truncated"),
               [(t, m, f"{v:.2f}", str(r["num_examples"]), str(r["truncated"])) for t, r in results.items()
                for m, v in r.items() if m not in ("num_examples", "truncated")])
  if args.output:
    Path(args.output).write_text(json.dumps({"method": args.method, "split": args.split, "results": results}, indent=2) + "\n")
  if args.tensorboard:
    with telemetry.MetricWriter(args.tensorboard) as writer:
      writer.write_scalars(0, {f"{args.method}/{t}/{m}": v for t, r in results.items() for m, v in r.items()})
  return 0


def _analyze_arguments(p):
  p.add_argument("--checkpoint", required=True, help="base model checkpoint (ours)")
  p.add_argument("--library", required=True, help="expert library")
  p.add_argument("--task", required=True, help="seqio task whose examples are routed")
  p.add_argument("--split", default="validation")
  p.add_argument("--tasks_module", default="phatgoose_tasks")
  p.add_argument("--output_dir", required=True, help="where the PNG, HTML and CSV files go (must be new or empty)")
  p.add_argument("--oracle_expert", default=None, help="the library's expert for this task, to measure agreement")
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--max_examples", type=int, default=64)
  p.add_argument("--feature_lengths", default="inputs=512,targets=64")


@command("analyze-routing", "what PHATGOOSE's router does on a task: usage heatmap, per-token routing, entropy, CSV")
@_arguments(_analyze_arguments)
def analyze_routing(args, gin_files, bindings) -> int:
  from phatgoose_jax import analysis, evaluation, library
  _forbid_gin(gin_files, bindings, "analyze-routing takes its settings as flags")
  out = Path(args.output_dir)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"{out} is not empty; choose a new --output_dir")
  _register_tasks(args.tasks_module)
  config, base, lib = _base_and_library(args.checkpoint, args.library)
  stacked = lib.stack()
  model, params = library.routed_model(config, base, stacked, top_k=args.top_k, record_routing=True)
  task = evaluation.load_task(args.task, args.split, args.max_examples)
  summary = analysis.analyze_routing(model, params, stacked.names, task, _feature_lengths(args.feature_lengths), out,
                                     oracle_expert=args.oracle_expert)
  print(f"routing of {summary['examples']} examples of {args.task} over {summary['sites']} sites -> {out} "
        f"(usage.csv, sites.csv, routing_usage.png, routing_tokens.png, routing.html)")
  print(f"mean usage entropy {summary['mean_usage_entropy_bits']:.2f} bits"
        + (f"; oracle expert in top-{summary['top_k']}: {summary['oracle_in_top_k']:.1%}, top-1: "
           f"{summary['oracle_top_1']:.1%}" if "oracle_expert" in summary else ""))
  return 0


def _import_peft_arguments(p):
  p.add_argument("adapter", help="PEFT LoRA directory (adapter_config.json + adapter_model.safetensors or .bin)")
  p.add_argument("--base", required=True, help="our checkpoint of the base model the adapter was trained on")
  p.add_argument("--name", required=True, help="the expert's name")
  p.add_argument("--task", default=None, help="the task it was trained on (for the record)")
  p.add_argument("--output", default=None, help="write the expert to this directory")
  p.add_argument("--library", default=None, help="add the expert to this library (it needs gates: see train-gate)")
  p.add_argument("--pad_rank", action="store_true", help="zero-pad a lower-rank adapter to the library's rank")


@command("import-peft", "import a Hugging Face PEFT LoRA adapter of a T5 model as an expert")
@_arguments(_import_peft_arguments)
def import_peft(args, gin_files, bindings) -> int:
  from phatgoose_jax import library
  from phatgoose_jax.importers import peft as peft_io
  _forbid_gin(gin_files, bindings, "import-peft takes no configuration")
  if not args.output and not args.library:
    raise ValueError("give --output (an expert directory, e.g. to train its gates) or --library")
  if args.output:
    _refuse_existing(args.output, False)
  config, base, lib = _base_and_library(args.base, None)
  rank = alpha = None
  if args.library and library.ExpertLibrary(args.library, create=True).names():
    first = library.ExpertLibrary(args.library).experts()[0]
    rank, alpha = first.rank, first.alpha
  expert = peft_io.import_peft(args.adapter, config, library.base_model_fingerprint(base), args.name, task=args.task,
                               rank=rank, alpha=alpha, pad_rank=args.pad_rank)
  if args.library:
    if not expert.has_gates:
      raise library.LibraryError(f"expert {expert.name!r} has no gate vectors: import it with --output, train its "
                                 f"gates (phatgoose train-gate --gin.EXPERT_PATH=...), then library add")
    path = library.ExpertLibrary(args.library).add(expert)
  else:
    path = library.save_expert(expert, args.output)
  print(f"imported {args.adapter} -> {path} (rank {expert.rank}, {len(expert.sites)} sites, "
        f"{'with' if expert.has_gates else 'without'} gates)")
  return 0


@command("export-peft", "write an expert of a library as a Hugging Face PEFT LoRA adapter")
@_arguments(lambda p: (p.add_argument("library", help="expert library"), p.add_argument("name", help="expert name"),
                       p.add_argument("output", help="PEFT directory to create"),
                       p.add_argument("--base", required=True, help="our checkpoint of the base model"),
                       p.add_argument("--base_model_name_or_path", default=None,
                                      help="recorded in adapter_config.json, e.g. google/t5-xl-lm-adapt")))
def export_peft(args, gin_files, bindings) -> int:
  from phatgoose_jax import checkpoints, library
  from phatgoose_jax.importers import peft as peft_io
  _forbid_gin(gin_files, bindings, "export-peft takes no configuration")
  _refuse_existing(args.output, False)
  expert = library.ExpertLibrary(args.library).get(args.name)
  config = checkpoints.load_config(args.base)
  path = peft_io.export_peft(expert, config, args.output, args.base_model_name_or_path)
  print(f"exported {args.name!r} -> {path}")
  return 0


def _bench_arguments(p):
  from phatgoose_jax import benchmark
  benchmark.add_arguments(p)


@command("bench", "routed vs base model speed: scoring, decoding, memory, training steps (see docs/performance.md)")
@_arguments(_bench_arguments)
def bench(args, gin_files, bindings) -> int:
  from phatgoose_jax import benchmark
  _forbid_gin(gin_files, bindings, "bench takes its settings as flags")
  return benchmark.run_from_args(args)


def _library_arguments(p):
  sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
  add = sub.add_parser("add", help="add a trained expert (a directory written by train-gate)")
  add.add_argument("library", help="library directory (created if missing)")
  add.add_argument("expert", help="expert directory, e.g. MODEL_DIR/expert of a gate-training run")
  add.add_argument("--name", default=None, help="name in the library (default: the expert's own name)")
  add.add_argument("--overwrite", action="store_true", help="replace an expert of the same name")
  lst = sub.add_parser("list", help="list the experts")
  lst.add_argument("library")
  rm = sub.add_parser("remove", help="remove an expert")
  rm.add_argument("library")
  rm.add_argument("name")
  val = sub.add_parser("validate", help="load every expert and check that they can be stacked together")
  val.add_argument("library")


@command("library", "manage an expert library: add, list, remove, validate")
@_arguments(_library_arguments)
def library_command(args, gin_files, bindings) -> int:
  from phatgoose_jax import library
  _forbid_gin(gin_files, bindings, "library commands take no configuration")
  if args.action == "add":
    expert = library.load_expert(args.expert)
    if args.name:
      expert.name = args.name
    lib = library.ExpertLibrary(args.library, create=True)
    path = lib.add(expert, overwrite=args.overwrite)
    print(f"added {expert.name!r} ({expert.num_parameters:,} parameters, {len(expert.sites)} sites) -> {path}")
  elif args.action == "list":
    lib = library.ExpertLibrary(args.library)
    experts = lib.experts()
    rows = [(e.name, e.task, str(e.rank), str(len(e.sites)), str(e.expert_steps or "-"), str(e.gate_steps or "-"),
             ", ".join(f"{k}={v:.4g}" for k, v in e.validation.items()) or "-",
             f"{_directory_size(lib.path(e.name)) / 2**20:.1f} MiB") for e in experts]
    _print_table(("name", "task", "rank", "sites", "expert steps", "gate steps", "validation", "size"), rows)
    print(f"{len(experts)} expert(s) in {lib.root}")
  elif args.action == "remove":
    library.ExpertLibrary(args.library).remove(args.name)
    print(f"removed {args.name!r}")
  else:
    experts = library.ExpertLibrary(args.library).validate()
    print(f"{args.library}: {len(experts)} expert(s), consistent (base model {experts[0].base_model}, "
          f"rank {experts[0].rank}, {len(experts[0].sites)} sites, all with gates)")
  return 0


@command("pipeline", "the main job: base, experts, gates, every method on held-out tasks, results and plots")
@_arguments(lambda p: (p.add_argument("--seeds", type=int, default=None, help="repeat for N training seeds; "
                                      "report mean and std"),
                       p.add_argument("--output_dir", default=None, help="where everything is written "
                                      "(default: the gin file's, runs/offline)"),
                       _add_gin_help(p)))
def pipeline_command(args, gin_files, bindings) -> int:
  import gin
  from phatgoose_jax import pipeline
  gin_utils.parse_gin(gin_files or ["runs/offline_benchmark.gin"], bindings)
  overrides = {k: v for k, v in (("seeds", args.seeds), ("output_dir", args.output_dir)) if v is not None}
  try:
    cfg = pipeline.PipelineConfig(**overrides)
  finally:
    pass
  pipeline.Pipeline(cfg).run()
  gin.clear_config()
  return 0


# --------------------------------------------------------------------------------------------------
def _directory_size(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  for row in [header, ["-" * w for w in widths], *rows]:
    print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())


def _count(params) -> int:
  import jax
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def _refuse_existing(output: str, overwrite: bool) -> None:
  if Path(output).exists() and not overwrite:
    raise FileExistsError(f"{output} already exists; refusing to overwrite it (pass --overwrite)")


def _forbid_gin(gin_files, bindings, why: str) -> None:
  if gin_files or bindings:
    raise gin_utils.GinConfigError(f"gin flags are not used here: {why}")


def _maybe_initialize_distributed(bindings) -> None:
  """`--gin.initialize_distributed.*` flags join a multi-host job before anything touches a device."""
  flags = [b for b in bindings if b.startswith("initialize_distributed.")]
  if flags:
    from phatgoose_jax import distributed
    with gin_utils.isolated_gin_config():
      gin_utils.parse_gin([], flags)
      distributed.initialize_distributed()


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="phatgoose", description="PHATGOOSE in JAX/Flax: T5X-compatible T5 with "
                                   "recycled LoRA experts and per-token routing.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (add_arguments, _, help_text) in _COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    gin_files, bindings, rest = gin_utils.split_gin_flags(argv)
  except gin_utils.GinConfigError as e:
    print(f"phatgoose: error: {e}", file=sys.stderr)
    return 2
  parser = build_parser()
  args = parser.parse_args(rest)
  if args.command is None:
    parser.print_help()
    return 2
  gin_files = list(getattr(args, "gin_file", [])) + gin_files
  _, fn, _ = _COMMANDS[args.command]
  try:
    _maybe_initialize_distributed(bindings)
    return fn(args, gin_files, bindings)
  except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:  # a message, not a traceback
    from phatgoose_jax.training import Preempted
    if isinstance(e, Preempted):
      print(f"phatgoose {args.command}: {e}", file=sys.stderr)
      return 128 + signal.SIGTERM  # as if killed by SIGTERM, so that schedulers retry
    print(f"phatgoose {args.command}: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
