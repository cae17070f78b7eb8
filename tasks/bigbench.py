"""BIG-bench Lite and Hard as used by PHATGOOSE, read from local BIG-bench `task.json` files.

`python -m phatgoose_jax.resources bigbench` extracts the needed task files from the PyPI sdist
`bigbench==1.0.0` (downloaded with `pip download --no-deps`, never installed) into `data/bigbench/`.
`register(directory)` then registers one seqio task per (sub)task and the mixtures `bigbench_lite` and
`bigbench_hard`.

Protocol (phatgoose_method.md §5): the prompt is the example's input followed by "\nAnswer:"; the choices
are the `target_scores` keys; rank classification (accuracy) for multiple-choice tasks, multi-answer
accuracy where several choices score 1, greedy generation with exact match (or ROUGE-L for
conlang_translation) for the generative tasks. Every example of a task file is evaluated (the original
reads the `train_validation` split of the HF conversion of the same files).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable

# The paper's 17 BIG-bench Lite tasks (24 minus 7 that T5's vocabulary cannot tokenize).
BBL_TASKS = ("bbq_lite_json", "conceptual_combinations", "conlang_translation", "formal_fallacies_syllogisms_negation",
             "hindu_knowledge", "known_unknowns", "linguistics_puzzles", "logic_grid_puzzle", "logical_deduction",
             "novel_concepts", "operators", "play_dialog_same_or_different", "repeat_copy_logic", "strange_stories",
             "strategyqa", "vitaminc_fact_verification", "winowhy")
# The paper's 22 BIG-bench Hard tasks (dyck_languages excluded). boolean_expressions,
# multistep_arithmetic_two and web_of_lies are programmatic in the sdist: no task.json to read.
BBH_TASKS = ("boolean_expressions", "causal_judgment", "date_understanding", "disambiguation_qa", "formal_fallacies",
             "geometric_shapes", "hyperbaton", "logical_deduction", "movie_recommendation", "multistep_arithmetic_two",
             "navigate", "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
             "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
             "tracking_shuffled_objects", "web_of_lies", "word_sorting")
ROUGE_TASKS = {"conlang_translation"}
# BBH names whose BIG-bench folder is named differently.
TASK_DIRS = {"formal_fallacies": "formal_fallacies_syllogisms_negation"}
PROMPT_SUFFIX = "\nAnswer:"


class BigBenchError(ValueError):
  pass


def _resource():
  from phatgoose_jax import resources
  prefix = "bigbench-1.0.0/bigbench/benchmark_tasks/"
  globs = tuple(g for t in sorted({TASK_DIRS.get(t, t) for t in set(BBL_TASKS) | set(BBH_TASKS)})
                for g in (f"{prefix}{t}/task.json", f"{prefix}{t}/*/task.json"))
  return resources.Resource(
      name="bigbench", package="bigbench", version="1.0.0", files=(), member_globs=globs, member_strip=prefix,
      download="index", archive_name="bigbench-1.0.0.tar.gz",
      archive_sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
      description="the BIG-bench task files of the paper's BBL and BBH tasks (from the bigbench sdist, 358 MB)")


def fetch() -> Path:
  """Extracts the BBL/BBH task.json files into the data directory (once); returns that directory."""
  from phatgoose_jax import resources
  return resources.fetch(_resource())


def task_files(directory: Path, task: str) -> list[tuple[str, Path]]:
  """(subtask name, task.json) for a task: one per subtask folder when it has subtasks (its own task.json
  then only lists them), else its own file."""
  root = Path(directory) / TASK_DIRS.get(task, task)
  subs = sorted((p.parent.name, p) for p in root.glob("*/task.json"))
  if subs:
    return [(f"{task}:{name}", path) for name, path in subs]
  return [(task, root / "task.json")] if (root / "task.json").is_file() else []


def read_task(path: Path) -> dict:
  """A BIG-bench task.json, checked for the fields we use, with a message naming the file."""
  try:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BigBenchError(f"{path} is not valid UTF-8 JSON: {e}") from e
  examples = data.get("examples")
  if not isinstance(examples, list) or not examples:
    raise BigBenchError(f"{path} has no 'examples' list")
  for i, ex in enumerate(examples):
    if "input" not in ex or not ("target_scores" in ex or "target" in ex):
      raise BigBenchError(f"{path}: example {i} lacks 'input' and 'target_scores'/'target'")
  return data


def prompt(data: dict, example: dict) -> str:
  prefix = data.get("task_prefix", "")
  return f"{prefix}{example['input']}{PROMPT_SUFFIX}"


def is_multiple_choice(data: dict) -> bool:
  return all("target_scores" in ex for ex in data["examples"])


def mc_rows(data: dict) -> list[dict]:
  rows = []
  for ex in data["examples"]:
    choices = list(ex["target_scores"])
    correct = [float(ex["target_scores"][c]) >= 1.0 for c in choices]
    rows.append({"inputs": prompt(data, ex), "choices": choices, "correct": correct})
  return rows


def generative_rows(data: dict) -> list[dict]:
  rows = []
  for ex in data["examples"]:
    target = ex.get("target")
    targets = target if isinstance(target, list) else [target]
    rows.append({"inputs": prompt(data, ex), "targets": [str(t) for t in targets]})
  return rows


def seqio_name(suite: str, task: str) -> str:
  return f"bigbench_{suite}_{task.replace(':', '__')}"


def _gin_configurable(fn):
  import gin
  return gin.configurable("bigbench.register")(fn)


@_gin_configurable
def register(directory: str | Path = "data/bigbench", vocabulary=None, suites: Iterable[str] = ("lite", "hard")
             ) -> list[str]:
  """Registers every available task of the suites; returns their seqio names. Missing task files are
  skipped with a note (the programmatic BBH tasks have none)."""
  import seqio
  import tensorflow as tf

  from phatgoose_jax import evaluation, vocabularies

  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"BIG-bench directory {directory} not found; run `python -m phatgoose_jax.resources "
                            f"bigbench` to extract the task files from the bigbench sdist")
  vocab = vocabulary or vocabularies.t5_vocabulary()
  features = {"inputs": seqio.Feature(vocab, add_eos=True), "targets": seqio.Feature(vocab, add_eos=True)}
  registered, per_suite = [], {}
  for suite in suites:
    names = {"lite": BBL_TASKS, "hard": BBH_TASKS}[suite]
    per_suite[suite] = []
    for task in names:
      files = task_files(directory, task)
      if not files:
        print(f"bigbench: no task.json for {task} under {directory} (programmatic in the sdist?); skipped")
        continue
      for sub, path in files:
        name = seqio_name(suite, sub)
        per_suite[suite].append(name)
        if name in seqio.TaskRegistry.names():
          continue
        data = read_task(path)
        if is_multiple_choice(data):
          def dataset_fn(split, shuffle_files, seed=None, rows=tuple(mc_rows(data))):
            del split, shuffle_files, seed
            width = max(len(r["choices"]) for r in rows)
            pad = lambda xs, v: list(xs) + [v] * (width - len(xs))
            return tf.data.Dataset.from_tensor_slices({
                "inputs": [r["inputs"] for r in rows],
                "choices": [pad(r["choices"], "") for r in rows],
                "correct": [pad(r["correct"], False) for r in rows],
                "num_choices": [len(r["choices"]) for r in rows]})
          seqio.TaskRegistry.add(
              name, seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
              preprocessors=[functools.partial(
                  evaluation.rank_classification, inputs_fn=lambda ex: ex["inputs"],
                  targets_fn=lambda ex: ex["choices"][:ex["num_choices"]],
                  is_correct_fn=lambda ex: ex["correct"][:ex["num_choices"]]),
                             seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
              output_features=features, postprocess_fn=evaluation.rank_classification_postprocessor,
              metric_fns=[evaluation.rank_classification_metric])
        else:
          rows = generative_rows(data)
          def dataset_fn(split, shuffle_files, seed=None, rows=tuple(rows)):
            del split, shuffle_files, seed
            return tf.data.Dataset.from_tensor_slices({
                "inputs": [r["inputs"] for r in rows], "targets": [r["targets"][0] for r in rows],
                "all_targets": tf.ragged.constant([r["targets"] for r in rows])})
          metric = evaluation.rouge_l_metric if sub.split(":")[0] in ROUGE_TASKS else evaluation.exact_match
          seqio.TaskRegistry.add(
              name, seqio.FunctionDataSource(dataset_fn, splits=["validation"]),
              preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
              output_features=features, postprocess_fn=_all_targets_postprocessor, metric_fns=[metric])
        registered.append(name)
  for suite, names in per_suite.items():
    mixture = f"bigbench_{suite}"
    if names and mixture not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(mixture, names, default_rate=1.0)
  return registered


def _all_targets_postprocessor(output, example=None, is_target: bool = False):
  """For targets, every acceptable answer (BIG-bench lists several for some examples)."""
  if not is_target:
    return output
  answers = example.get("all_targets")
  if answers is None:
    return output
  decode = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)
  return [decode(a) for a in answers]


if __name__ == "__main__":
  print(fetch())
