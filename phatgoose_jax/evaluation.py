"""Zero-shot evaluation: rank classification (our own, to the `t5` package's contract), generative metrics,
and running a model over seqio tasks with jitted, fixed-shape batches.

Rank classification (`t5x_seqio_conventions.md` §3.5): a preprocessor that turns one multiple-choice
example into one row per choice (`idx = [example, choice]`, `is_correct`, `weight`), a postprocessor that
carries those fields to the metric, and a metric that groups rows by example, optionally divides each
summed log-likelihood by its target length (EOS included: the PHATGOOSE score is the mean per-token
log-likelihood), and takes the argmax.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Rank classification: preprocessor (tf.data), postprocessor, metric
# ---------------------------------------------------------------------------------------------


def rank_classification(ds, inputs_fn: Callable, targets_fn: Callable, is_correct_fn: Callable,
                        weight_fn: Callable | None = None, mode: str = "eval",
                        passthrough_feature_keys: Sequence[str] | None = None):
  """One row per answer choice.

  inputs_fn(ex) -> scalar string; targets_fn(ex) -> [num_choices] strings; is_correct_fn(ex) -> [num_choices]
  bools. Rows carry `idx` [example index, choice index] (int32), `inputs`, `targets`, `is_correct` and,
  with weight_fn, `weight`. mode 'eval' emits every row, 'train' only correct ones, 'fewshot_eval' keeps
  each example's rows batched together.
  """
  import tensorflow as tf

  if mode not in ("eval", "train", "fewshot_eval"):
    raise ValueError(f"rank_classification mode must be 'eval', 'train' or 'fewshot_eval', got {mode!r}")
  passthrough_feature_keys = list(passthrough_feature_keys or [])

  def make_rows(i, ex):
    targets = targets_fn(ex)
    num_choices = tf.shape(targets)[0]
    is_correct = tf.cast(is_correct_fn(ex), tf.bool)
    tf.debugging.assert_equal(tf.shape(is_correct)[0], num_choices,
                              message="rank_classification: is_correct and targets differ in length")
    rows = {
        "idx": tf.stack([tf.fill([num_choices], tf.cast(i, tf.int32)), tf.range(num_choices, dtype=tf.int32)], axis=1),
        "inputs": tf.fill([num_choices], inputs_fn(ex)),
        "targets": targets,
        "is_correct": is_correct,
    }
    if weight_fn is not None:
      rows["weight"] = tf.fill([num_choices], tf.cast(weight_fn(ex), tf.float32))
    for key in passthrough_feature_keys:
      rows[key] = tf.repeat(tf.expand_dims(ex[key], 0), num_choices, axis=0)
    return rows

  ds = ds.enumerate().map(make_rows, num_parallel_calls=tf.data.AUTOTUNE)
  if mode == "fewshot_eval":
    return ds
  ds = ds.unbatch()
  if mode == "train":
    ds = ds.filter(lambda row: row["is_correct"])
  return ds


def rank_classification_postprocessor(output, example=None, is_target: bool = False):
  """Targets become (idx, is_correct, weight, number of target tokens incl. EOS); scores pass through."""
  if is_target:
    return (tuple(int(x) for x in example["idx"]), bool(example["is_correct"]), float(example.get("weight", 1.0)),
            int(len(example["targets"])))
  return output


def rank_classification_metric(targets: Sequence, scores: Sequence[float], normalize_by_target_length: bool = True
                               ) -> dict[str, float]:
  """Accuracy of the highest-scoring choice per example (weighted by the examples' weights).

  targets: postprocessed (idx, is_correct, weight, length) tuples; scores: summed target log-likelihoods.
  With normalize_by_target_length, each score is divided by its target length (the PHATGOOSE score);
  otherwise summed log-likelihoods compete (T5X's). An example with several correct choices counts as
  right if the pick is any of them (multi-answer accuracy). Ties go to the lower choice index.
  """
  if len(targets) != len(scores):
    raise ValueError(f"{len(targets)} targets but {len(scores)} scores")
  groups: dict[int, list] = collections.defaultdict(list)
  seen = set()
  for (idx, is_correct, weight, length), score in zip(targets, scores):
    if tuple(idx) in seen:
      raise ValueError(f"duplicate rank-classification row idx={tuple(idx)} (is the data sharded twice?)")
    seen.add(tuple(idx))
    value = float(score) / max(length, 1) if normalize_by_target_length else float(score)
    groups[idx[0]].append((idx[1], value, bool(is_correct), float(weight)))
  if not groups:
    return {"accuracy": float("nan")}
  total = correct = 0.0
  for rows in groups.values():
    rows.sort()
    pick = int(np.argmax([v for _, v, _, _ in rows]))
    weight = rows[0][3]
    total += weight
    correct += weight * rows[pick][2]
  return {"accuracy": 100.0 * correct / total}


# ---------------------------------------------------------------------------------------------
# Generative metrics
# ---------------------------------------------------------------------------------------------

def _as_answer_list(target) -> list[str]:
  return [str(t) for t in target] if isinstance(target, (list, tuple)) else [str(target)]


def exact_match(targets: Sequence, predictions: Sequence[str]) -> dict[str, float]:
  """Percent of predictions equal (after stripping surrounding whitespace) to the target, or to any of
  the targets when a target is a list (BIG-bench's multi-answer exact match)."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  hits = [str(p).strip() in {t.strip() for t in _as_answer_list(t)} for t, p in zip(targets, predictions)]
  return {"exact_match": 100.0 * float(np.mean(hits)) if hits else float("nan")}


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l(target: str, prediction: str) -> float:
  """ROUGE-L F-measure (beta 1) over lower-cased whitespace tokens."""
  ref, hyp = target.lower().split(), prediction.lower().split()
  if not ref or not hyp:
    return float(ref == hyp)
  lcs = _lcs_length(ref, hyp)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(hyp), lcs / len(ref)
  return 2 * precision * recall / (precision + recall)


def rouge_l_metric(targets: Sequence, predictions: Sequence[str]) -> dict[str, float]:
  """Mean ROUGE-L F (x100); with several references, the best one per prediction."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  values = [max(rouge_l(t, str(p)) for t in _as_answer_list(t)) for t, p in zip(targets, predictions)]
  return {"rougeL": 100.0 * float(np.mean(values)) if values else float("nan")}


# ---------------------------------------------------------------------------------------------
# Running methods over seqio tasks
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TaskData:
  """One task split, tokenized and in memory, with what its metrics need."""
  name: str
  kind: str                      # 'score' (rank classification) or 'predict' (generation)
  examples: list[dict]
  metric_fns: list
  postprocess_fn: Callable | None
  vocabulary: Any

  @property
  def num_examples(self) -> int:
    if self.kind == "score":
      return len({int(ex["idx"][0]) for ex in self.examples})
    return len(self.examples)


def metric_kind(metric_fn) -> str:
  """seqio's rule: a metric with positional args (targets, scores) is a score metric, (targets,
  predictions) a prediction metric."""
  import inspect
  params = [p.name for p in inspect.signature(metric_fn).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  if params[:2] == ["targets", "scores"]:
    return "score"
  if params[:2] == ["targets", "predictions"]:
    return "predict"
  raise ValueError(f"metric {getattr(metric_fn, '__name__', metric_fn)} has positional args {params}; expected "
                   f"(targets, scores) or (targets, predictions)")


def load_task(task_name: str, split: str, max_examples: int | None = None) -> TaskData:
  """Tokenized examples of a registered seqio task (rank-classification rows stay grouped by example)."""
  import seqio

  task = seqio.get_mixture_or_task(task_name)
  if not isinstance(task, seqio.Task):
    raise ValueError(f"{task_name} is a mixture; evaluate its tasks one by one")
  if split not in task.splits:
    raise ValueError(f"task {task_name} has no split {split!r} (it has {list(task.splits)})")
  if not task.metric_fns:
    raise ValueError(f"task {task_name} has no metric")
  kinds = {metric_kind(m) for m in task.metric_fns}
  if len(kinds) != 1:
    raise ValueError(f"task {task_name} mixes score and prediction metrics")
  kind = kinds.pop()
  examples = []
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False)
  from phatgoose_jax import data_checks
  eos_id = task.output_features["targets"].vocabulary.eos_id
  for i, ex in enumerate(ds.as_numpy_iterator()):
    if kind == "score" and max_examples is not None and int(ex["idx"][0]) >= max_examples:
      continue
    data_checks.check_example(ex, f"task {task_name}, split {split!r}, example {i}", eos_id)
    examples.append(ex)
    if kind == "predict" and max_examples is not None and len(examples) >= max_examples:
      break
  if not examples:
    raise ValueError(f"the {split!r} split of {task_name} is empty")
  return TaskData(task_name, kind, examples, list(task.metric_fns), task.postprocess_fn,
                  task.output_features["targets"].vocabulary)


def _fit(ids, length: int, eos_id: int) -> tuple[list[int], bool]:
  ids = [int(i) for i in ids]
  if len(ids) <= length:
    return ids, False
  return ids[:length - 1] + [eos_id], True


def make_batches(examples: Sequence[dict], batch_size: int, feature_lengths: Mapping[str, int], eos_id: int = 1):
  """Yields (batch, rows, truncated): fixed-shape model batches (padding rows are all zero, so every batch
  compiles to the same program), the examples they hold, and how many were truncated to fit."""
  from phatgoose_jax import batching

  for start in range(0, len(examples), batch_size):
    rows = list(examples[start:start + batch_size])
    truncated = 0
    inputs, targets = [], []
    for ex in rows:
      i, ti = _fit(ex["inputs"], feature_lengths["inputs"], eos_id)
      t, tt = _fit(ex["targets"], feature_lengths["targets"], eos_id)
      inputs.append(i)
      targets.append(t)
      truncated += ti or tt
    pad = batch_size - len(rows)
    batch = batching.encdec_batch(inputs + [[]] * pad, targets + [[]] * pad, feature_lengths["inputs"],
                                  feature_lengths["targets"])
    yield batch, rows, truncated


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_prediction(tokens, vocabulary) -> str:
  ids = [int(t) for t in tokens]
  eos = vocabulary.eos_id
  if eos in ids:
    ids = ids[:ids.index(eos)]
  return vocabulary.decode([i for i in ids if i > 0])


@dataclasses.dataclass
class ModelMethod:
  """A model and its parameters as an evaluation method (jitted scoring and greedy decoding); sharded
  over the partitioner's mesh when one is given (the batch size must then divide over its data axes)."""
  name: str
  model: Any
  params: Any
  partitioner: Any = None

  def __post_init__(self):
    self._sharded = None
    if self.partitioner is not None:
      from phatgoose_jax import partitioning
      self._sharded = partitioning.ShardedModel.of(self.model, self.partitioner).with_params(self.params)

  def score(self, batch, rows) -> np.ndarray:
    del rows
    if self._sharded is not None:
      return np.asarray(self._sharded.score(batch)["sum"])
    return np.asarray(self.model.jit_score(self.params, batch)["sum"])

  def predict(self, batch, rows, max_decode_length: int) -> np.ndarray:
    del rows
    if self._sharded is not None:
      return np.asarray(self._sharded.predict(batch, max_decode_length)[0])
    return np.asarray(self.model.jit_predict(self.params, batch, max_decode_length=max_decode_length)[0])


def evaluate_task(method, task: TaskData, feature_lengths: Mapping[str, int], batch_size: int = 64,
                  progress: bool = False) -> tuple[dict[str, float], dict]:
  """Runs `method` over a loaded task and applies the task's own postprocessor and metrics.

  method: anything with score(batch, rows) -> [B] summed log-likelihoods and
  predict(batch, rows, max_decode_length) -> [B, length] tokens. Returns (metrics, details) where
  details holds the per-example outputs and the number of truncated examples.
  """
  outputs, truncated = [], 0
  batches = make_batches(task.examples, batch_size, feature_lengths, task.vocabulary.eos_id)
  if progress:
    from tqdm import tqdm
    batches = tqdm(batches, total=-(-len(task.examples) // batch_size), desc=f"{method.name} {task.name}",
                   leave=False, unit="batch")
  for batch, rows, t in batches:
    truncated += t
    if task.kind == "score":
      outputs.extend(method.score(batch, rows)[:len(rows)].tolist())
    else:
      tokens = method.predict(batch, rows, feature_lengths["targets"])
      outputs.extend(decode_prediction(tok, task.vocabulary) for tok in tokens[:len(rows)])
  post = task.postprocess_fn or (lambda x, example=None, is_target=False: x)
  targets = [post(_text(ex["targets_pretokenized"]) if "targets_pretokenized" in ex else
                  task.vocabulary.decode([int(i) for i in ex["targets"]]), example=ex, is_target=True)
             for ex in task.examples]
  predictions = [post(o, example=ex, is_target=False) for o, ex in zip(outputs, task.examples)]
  metrics = {}
  for fn in task.metric_fns:
    metrics.update(fn(targets, predictions))
  return metrics, {"outputs": outputs, "truncated": truncated, "num_examples": task.num_examples}
