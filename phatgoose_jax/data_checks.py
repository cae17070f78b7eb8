"""Checks of task data before it is trained or evaluated on: refusals that say what, where and how to fix.

Every example needs `inputs` and `targets`, a non-empty target and UTF-8 text; examples longer than the
feature lengths are truncated (T5X's behaviour) and counted, never silently.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

REQUIRED_FIELDS = ("inputs", "targets")
TEXT_FIELDS = ("inputs_pretokenized", "targets_pretokenized")


class DataError(ValueError):
  pass


def check_example(example: Mapping[str, np.ndarray], where: str, eos_id: int = 1) -> None:
  """Raises DataError for an example that cannot be trained or evaluated on."""
  for field in REQUIRED_FIELDS:
    if field not in example:
      raise DataError(f"{where}: no {field!r} field (it has {sorted(example)}); every example needs "
                      f"{list(REQUIRED_FIELDS)}: fix the task's source or preprocessors")
  targets = np.asarray(example["targets"]).reshape(-1)
  if not np.any((targets != eos_id) & (targets != 0)):
    raise DataError(f"{where}: the target is empty; drop such examples in the task's preprocessors "
                    f"(e.g. seqio.preprocessors filtering on the target length)")
  for field in TEXT_FIELDS:
    value = example.get(field)
    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
      value = value.item()
    if isinstance(value, bytes):
      try:
        value.decode("utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{where}: {field} is not valid UTF-8 (byte {e.start}: {value[max(0, e.start - 8):e.start + 8]!r}); "
                        f"re-encode the source text as UTF-8") from None


def check_split(mixture_or_task_name: str, split: str, feature_lengths: Mapping[str, int],
                max_examples: int | None = None, log: Callable[[str], None] = print) -> dict[str, dict[str, int]]:
  """Reads up to max_examples of every task of a mixture (or of a task) through its preprocessors and
  checks each example; logs how many exceed the feature lengths. Returns {task: {examples, truncated}}."""
  import seqio

  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  if isinstance(provider, seqio.Mixture):
    if not provider.tasks:
      raise DataError(f"mixture {mixture_or_task_name} has no tasks; register it with at least one task")
    tasks = list(provider.tasks)
  else:
    tasks = [provider]
  counts = {}
  for task in tasks:
    if split not in task.splits:
      raise DataError(f"task {task.name} has no {split!r} split (it has {list(task.splits)})")
    eos_id = task.output_features["targets"].vocabulary.eos_id if "targets" in task.output_features else 1
    examples = truncated = 0
    try:
      ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1, use_cached=False)
      for i, example in enumerate(ds.as_numpy_iterator()):
        if max_examples is not None and i >= max_examples:
          break
        check_example(example, f"task {task.name}, split {split!r}, example {i}", eos_id)
        examples += 1
        truncated += any(len(example[f]) > n for f, n in feature_lengths.items() if f in example)
    except DataError:
      raise
    except Exception as e:  # seqio/tf.data errors: name the task and split
      raise DataError(f"task {task.name}, split {split!r}: reading its examples failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if examples == 0:
      raise DataError(f"task {task.name}, split {split!r} has no examples")
    if truncated:
      log(f"{task.name} ({split}): {truncated} of {examples} examples exceed the feature lengths "
          f"{dict(feature_lengths)} and are truncated")
    counts[task.name] = {"examples": examples, "truncated": truncated}
  return counts
