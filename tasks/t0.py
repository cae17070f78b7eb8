"""T0 held-in (PHATGOOSE's 36 P3 experts) and held-out (11 datasets) tasks, for users who have the data.

Data: JSON-lines exports of the Hugging Face datasets (field names as in HF, which the templates use), at
`<data_dir>/<dataset>[__<subset>]/<split>.jsonl`; e.g. `datasets.load_dataset("super_glue", "rte")
["validation"].to_json("data/t0/super_glue__rte/validation.jsonl")`. Nothing is downloaded here.
Templates: promptsource's YAML files (`python -m phatgoose_tasks.t0` extracts them from the PyPI sdist
`promptsource==0.2.3`, taken from the index and checked against its sha256), rendered with Jinja2 the way promptsource
does: the template renders to "input ||| target", answer choices to "a ||| b ||| ...".

Registered: per held-in expert, a training task over all its datasets' templates (`t0_train_<expert>`);
per held-out dataset and original-task template, a rank-classification task (`t0_eval_<dataset>__<template>`)
and the mixtures `t0_held_out` (every pair; the paper reports the mean over pairs) and `t0_held_in`.
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path
from typing import Iterable, Mapping

# PHATGOOSE's 36 P3 experts (scripts/concatenate.py `p3_dataset_dict`), each over its HF datasets.
HELD_IN = {
    "agnews": [("ag_news", None)], "amazonpolarity": [("amazon_polarity", None)], "cosmosqa": [("cosmos_qa", None)],
    "samsum": [("samsum", None)], "quartz": [("quartz", None)], "ropes": [("ropes", None)],
    "wikibio": [("wiki_bio", None)], "paws": [("paws", "labeled_final")], "wikiqa": [("wiki_qa", None)],
    "socialiqa": [("social_i_qa", None)], "qasc": [("qasc", None)], "quail": [("quail", None)],
    "dream": [("dream", None)], "wiqa": [("wiqa", None)], "quarel": [("quarel", None)], "sciq": [("sciq", None)],
    "quoref": [("quoref", None)], "duorc": [("duorc", "ParaphraseRC"), ("duorc", "SelfRC")],
    "rottentomatoes": [("rotten_tomatoes", None)], "yelp": [("yelp_review_full", None)],
    "commongen": [("common_gen", None)], "gigaword": [("gigaword", None)], "xsum": [("xsum", None)],
    "mrpc": [("glue", "mrpc")], "qqp": [("glue", "qqp")], "commonsenseqa": [("commonsense_qa", None)],
    "cose": [("cos_e", "v1.11")], "wikihop": [("wiki_hop", "original")], "hotpotqa": [("kilt_tasks", "hotpotqa")],
    "appreviews": [("app_reviews", None)], "trec": [("trec", None)], "multinews": [("multi_news", None)],
    "imdb": [("imdb", None)],
    "adversarialqa": [("adversarial_qa", "dbidaf"), ("adversarial_qa", "dbert"), ("adversarial_qa", "droberta")],
    "cnndailymail": [("cnn_dailymail", "3.0.0")], "dbpedia14": [("dbpedia_14", None)],
}
# T0's 11 held-out datasets and the split PHATGOOSE evaluates (phatgoose_method.md §5).
HELD_OUT = {
    "rte": ("super_glue", "rte", "validation"), "cb": ("super_glue", "cb", "validation"),
    "copa": ("super_glue", "copa", "validation"), "wic": ("super_glue", "wic", "validation"),
    "wsc": ("super_glue", "wsc.fixed", "validation"), "hellaswag": ("hellaswag", None, "validation"),
    "winogrande": ("winogrande", "winogrande_xl", "validation"), "storycloze": ("story_cloze", "2016", "test"),
    "anli_r1": ("anli", None, "dev_r1"), "anli_r2": ("anli", None, "dev_r2"), "anli_r3": ("anli", None, "dev_r3"),
}
SEPARATOR = "|||"


class T0Error(ValueError):
  pass


def _gin_configurable(fn):
  import gin
  return gin.configurable("t0.register")(fn)


# ---------------------------------------------------------------------------------------------
# promptsource templates
# ---------------------------------------------------------------------------------------------

def _yaml_loader():
  import yaml

  class Loader(yaml.SafeLoader):
    pass

  # promptsource tags its objects; plain mappings carry everything we need.
  for tag in ("!Template", "!TemplateMetadata"):
    Loader.add_constructor(tag, lambda loader, node: loader.construct_mapping(node, deep=True))
  return Loader


def load_templates(path: str | Path) -> list[dict]:
  """The templates of one promptsource `templates.yaml`, each with `name`, `jinja`, `answer_choices`
  and `original_task` (promptsource 0.2's `original_task`, or the newer `task_template`)."""
  import yaml
  try:
    data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_yaml_loader())
  except yaml.YAMLError as e:
    raise T0Error(f"{path} is not a readable promptsource template file: {e}") from e
  out = []
  for tid, t in sorted((data or {}).get("templates", {}).items()):
    meta = t.get("metadata") or {}
    if "jinja" not in t or SEPARATOR not in t["jinja"]:
      raise T0Error(f"{path}: template {t.get('name', tid)!r} has no 'input ||| target' jinja")
    out.append({"id": str(tid), "name": str(t.get("name", tid)), "jinja": t["jinja"],
                "answer_choices": t.get("answer_choices"),
                "original_task": bool(meta.get("original_task", meta.get("task_template", False)))})
  return out


@functools.lru_cache(maxsize=None)
def _jinja_env():
  import jinja2
  env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
  env.globals.update(zip=zip, range=range, len=len)
  return env


def _choices_of(template: dict, example: Mapping) -> list[str] | None:
  choices = template.get("answer_choices")
  if choices is None:
    return None
  if isinstance(choices, (list, tuple)):
    return [str(c).strip() for c in choices]
  rendered = _jinja_env().from_string(str(choices)).render(**example)
  return [c.strip() for c in rendered.split(SEPARATOR)]


def apply_template(template: dict, example: Mapping, seed: int = 0) -> dict | None:
  """{'inputs', 'targets', 'choices'} for one example, or None where the template does not apply
  (it renders no target, as promptsource skips such examples)."""
  choices = _choices_of(template, example)
  env = _jinja_env()
  rng = random.Random(seed)
  context = {**example, "answer_choices": choices, "choice": rng.choice}
  try:
    rendered = env.from_string(template["jinja"]).render(**context)
  except Exception as e:  # noqa: BLE001 - a template error names the template and the fields
    raise T0Error(f"template {template['name']!r} cannot render an example with fields {sorted(example)}: {e}") from e
  parts = [p.strip() for p in rendered.split(SEPARATOR)]
  if len(parts) < 2 or not parts[0] or not parts[1]:
    return None
  return {"inputs": parts[0], "targets": parts[1], "choices": choices}


# ---------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------

def dataset_dir(data_dir: Path, dataset: str, subset: str | None) -> Path:
  return Path(data_dir) / (dataset if subset is None else f"{dataset}__{subset}")


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise T0Error(f"{path}, line {n}: not valid JSON ({e})") from e
      if limit is not None and len(rows) >= limit:
        break
  return rows


def _name(s: str) -> str:
  return re.sub(r"[^\w]", "_", s)


# ---------------------------------------------------------------------------------------------
# seqio registration
# ---------------------------------------------------------------------------------------------

@_gin_configurable
def register(data_dir: str | Path = "data/t0", templates_dir: str | Path = "data/promptsource_templates",
             vocabulary=None, held_in: Iterable[str] | None = None,
             held_out: Iterable[str] | None = None, max_train_examples: int = 500_000) -> list[str]:
  """Registers the T0 tasks whose data files exist; returns their names. templates_dir holds promptsource's
  `<dataset>[/<subset>]/templates.yaml`."""
  import seqio
  import tensorflow as tf

  from phatgoose_jax import evaluation, vocabularies

  data_dir, templates_dir = Path(data_dir), Path(templates_dir)
  vocab = vocabulary or vocabularies.t5_vocabulary()
  features = {"inputs": seqio.Feature(vocab, add_eos=True), "targets": seqio.Feature(vocab, add_eos=True)}
  text_pre = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos]
  registered = []

  def templates_for(dataset, subset):
    path = templates_dir / dataset / (subset or "") / "templates.yaml" if subset else templates_dir / dataset / "templates.yaml"
    if not path.is_file():
      raise FileNotFoundError(f"no promptsource templates for {dataset}/{subset}: {path} is missing")
    return load_templates(path)

  for expert in (held_in if held_in is not None else HELD_IN):
    sources = [(d, s) for d, s in HELD_IN[expert] if (dataset_dir(data_dir, d, s) / "train.jsonl").is_file()]
    if not sources:
      continue
    name = f"t0_train_{expert}"
    registered.append(name)
    if name in seqio.TaskRegistry.names():
      continue

    def train_fn(split, shuffle_files, seed=None, sources=tuple(sources)):
      del shuffle_files
      rows = []
      for d, s in sources:
        file = dataset_dir(data_dir, d, s) / f"{'train' if split == 'train' else 'validation'}.jsonl"
        if not file.is_file():
          continue
        for t in templates_for(d, s):  # all templates, as T0 and PHATGOOSE train on
          for i, ex in enumerate(read_jsonl(file)):
            applied = apply_template(t, ex, seed=i)
            if applied:
              rows.append((applied["inputs"], applied["targets"]))
      random.Random(seed or 0).shuffle(rows)
      rows = rows[:max_train_examples]
      if not rows:
        raise T0Error(f"{name}: no example of split {split!r} rendered")
      return tf.data.Dataset.from_tensor_slices({"inputs": [r[0] for r in rows], "targets": [r[1] for r in rows]})

    seqio.TaskRegistry.add(name, seqio.FunctionDataSource(train_fn, splits=["train", "validation"]),
                           preprocessors=text_pre, output_features=features)

  eval_names = []
  for key in (held_out if held_out is not None else HELD_OUT):
    dataset, subset, split = HELD_OUT[key]
    file = dataset_dir(data_dir, dataset, subset) / f"{split}.jsonl"
    if not file.is_file():
      continue
    for t in templates_for(dataset, subset):
      if not t["original_task"] or not t["answer_choices"]:
        continue
      name = f"t0_eval_{key}__{_name(t['name'])}"
      eval_names.append(name)
      registered.append(name)
      if name in seqio.TaskRegistry.names():
        continue

      def eval_fn(split, shuffle_files, seed=None, t=t, file=file):
        del split, shuffle_files, seed
        rows = []
        for i, ex in enumerate(read_jsonl(file)):
          applied = apply_template(t, ex, seed=i)
          if applied and applied["choices"] and applied["targets"] in applied["choices"]:
            rows.append(applied)
        if not rows:
          raise T0Error(f"{file}: template {t['name']!r} rendered no example with its answer among the choices")
        width = max(len(r["choices"]) for r in rows)
        return tf.data.Dataset.from_tensor_slices({
            "inputs": [r["inputs"] for r in rows],
            "choices": [r["choices"] + [""] * (width - len(r["choices"])) for r in rows],
            "num_choices": [len(r["choices"]) for r in rows],
            "label": [r["choices"].index(r["targets"]) for r in rows]})

      seqio.TaskRegistry.add(
          name, seqio.FunctionDataSource(eval_fn, splits=["validation"]),
          preprocessors=[functools.partial(
              evaluation.rank_classification, inputs_fn=lambda ex: ex["inputs"],
              targets_fn=lambda ex: ex["choices"][:ex["num_choices"]],
              is_correct_fn=lambda ex: tf.equal(tf.range(ex["num_choices"]), ex["label"])), *text_pre],
          output_features=features, postprocess_fn=evaluation.rank_classification_postprocessor,
          metric_fns=[evaluation.rank_classification_metric])
  held_in_names = [n for n in registered if n.startswith("t0_train_")]
  if eval_names and "t0_held_out" not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add("t0_held_out", eval_names, default_rate=1.0)
  if held_in_names and "t0_held_in" not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add("t0_held_in", held_in_names, default_rate=1.0)
  return registered


def _templates_resource():
  from phatgoose_jax import resources
  prefix = "promptsource-0.2.3/promptsource/templates/"
  # pip refuses this sdist on Python >= 3.10 (Requires-Python), so it is taken from the index directly.
  return resources.Resource(
      name="promptsource_templates", package="promptsource", version="0.2.3", files=(),
      member_globs=(prefix + "*/templates.yaml", prefix + "*/*/templates.yaml"), member_strip=prefix,
      download="index", archive_name="promptsource-0.2.3.tar.gz",
      archive_sha256="f106c889778a0fe5590e7183904bf964e1a01691c8a29451e44f3df5ddef05f5",
      description="promptsource's prompt templates (YAML only)")


def fetch_templates() -> Path:
  from phatgoose_jax import resources
  return resources.fetch(_templates_resource())


if __name__ == "__main__":
  print(fetch_templates())
