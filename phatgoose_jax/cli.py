"""`phatgoose` command line. Every subcommand takes `--gin_file=F` and `--gin.NAME=VALUE` flags."""

from __future__ import annotations

import argparse
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
    print(f"phatgoose {args.command}: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
