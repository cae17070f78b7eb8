"""Rank classification and generative metrics against hand-computed examples; task registration."""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from phatgoose_jax import evaluation


def _rows(ds):
  return [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items()} for ex in ds.as_numpy_iterator()]


def test_rank_classification_preprocessor_modes():
  ds = tf.data.Dataset.from_tensor_slices({"q": ["a?", "b?"], "choices": [["x", "y", "z"], ["u", "v", "w"]],
                                           "label": [2, 0]})
  kwargs = dict(inputs_fn=lambda ex: ex["q"], targets_fn=lambda ex: ex["choices"],
                is_correct_fn=lambda ex: tf.equal(tf.range(3), ex["label"]), weight_fn=lambda ex: 2.0)
  rows = _rows(evaluation.rank_classification(ds, **kwargs))
  assert [tuple(r["idx"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
  assert [r["targets"] for r in rows] == ["x", "y", "z", "u", "v", "w"]
  assert [bool(r["is_correct"]) for r in rows] == [False, False, True, True, False, False]
  assert all(r["inputs"] == ("a?" if r["idx"][0] == 0 else "b?") and r["weight"] == 2.0 for r in rows)
  train = _rows(evaluation.rank_classification(ds, mode="train", **kwargs))
  assert [(tuple(r["idx"]), r["targets"]) for r in train] == [((0, 2), "z"), ((1, 0), "u")]
  fewshot = list(evaluation.rank_classification(ds, mode="fewshot_eval", **kwargs).as_numpy_iterator())
  assert fewshot[0]["targets"].shape == (3,)
  with pytest.raises(ValueError, match="mode must be"):
    evaluation.rank_classification(ds, mode="test", **kwargs)


def _targets(groups):
  """groups: [(choice lengths, correct flags)] -> postprocessed targets in row order."""
  out = []
  for i, (lengths, correct) in enumerate(groups):
    for j, (n, c) in enumerate(zip(lengths, correct)):
      out.append(((i, j), c, 1.0, n))
  return out


def test_rank_classification_metric_by_hand():
  # Example 0: summed log-likelihoods -4 (2 tokens), -5 (5 tokens): sum picks choice 0, mean picks 1 (-2 vs -1).
  # Example 1: a tie (-3, -3): the lower index wins. Example 2: two correct answers; the pick is one of them.
  targets = _targets([([2, 5], [False, True]), ([3, 3], [True, False]), ([1, 1, 1], [True, False, True])])
  scores = [-4.0, -5.0, -3.0, -3.0, -9.0, -8.0, -1.0]
  assert evaluation.rank_classification_metric(targets, scores, normalize_by_target_length=True)["accuracy"] == 100.0
  assert evaluation.rank_classification_metric(targets, scores, normalize_by_target_length=False)["accuracy"] == \
      pytest.approx(200 / 3)
  # Rows may arrive in any order.
  order = np.random.default_rng(0).permutation(len(scores))
  assert evaluation.rank_classification_metric([targets[i] for i in order], [scores[i] for i in order])["accuracy"] == 100.0
  with pytest.raises(ValueError, match=r"duplicate rank-classification row idx=\(0, 0\)"):
    evaluation.rank_classification_metric(targets + targets[:1], scores + scores[:1])


def test_rank_classification_postprocessor():
  ex = {"idx": np.array([3, 1]), "is_correct": np.True_, "targets": np.array([5, 6, 1])}
  assert evaluation.rank_classification_postprocessor("ignored", example=ex, is_target=True) == ((3, 1), True, 1.0, 3)
  assert evaluation.rank_classification_postprocessor(-2.5, example=ex) == -2.5


def test_generative_metrics_by_hand():
  assert evaluation.exact_match(["ab", "c ", ["x", "y"]], ["ab", "c", "y"])["exact_match"] == 100.0
  assert evaluation.exact_match(["ab", "cd"], ["ab", "ce"])["exact_match"] == 50.0
  # ROUGE-L: reference "the cat sat on the mat", prediction "the cat on mat": LCS 4, P = 4/4, R = 4/6.
  assert evaluation.rouge_l("the cat sat on the mat", "the cat on mat") == pytest.approx(2 * 1 * (4 / 6) / (1 + 4 / 6))
  assert evaluation.rouge_l_metric([["a b", "c d"]], ["c d"])["rougeL"] == 100.0
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    evaluation.exact_match(["a", "b"], ["a"])


def test_metric_kind_follows_seqio():
  assert evaluation.metric_kind(evaluation.rank_classification_metric) == "score"
  assert evaluation.metric_kind(evaluation.exact_match) == "predict"
  with pytest.raises(ValueError, match="expected"):
    evaluation.metric_kind(lambda preds, refs: {})


def test_offline_tasks_yield_their_declared_features():
  import phatgoose_tasks  # noqa: F401  (registers the offline benchmark)
  from phatgoose_tasks import offline

  for name in offline.HELD_IN + offline.HELD_OUT + (offline.PRETRAIN,):
    task = seqio.get_mixture_or_task(name)
    for split in ("train", "test"):
      ex = next(task.get_dataset(sequence_length=None, split=split, shuffle=False).as_numpy_iterator())
      for feature in task.output_features:
        assert ex[feature].dtype == np.int32 and ex[feature].ndim == 1 and ex[feature][-1] == 1, (name, feature)
  mixture = seqio.get_mixture_or_task(offline.MULTITASK)
  assert sorted(t.name for t in mixture.tasks) == sorted(offline.HELD_IN)
  # Held-out words are never training words, and the multiple-choice distractors are single-skill answers.
  train_words = {e["word"] for s in offline.SKILLS for e in offline.skill_examples(0, s, "train")}
  test_words = {e["word"] for c in offline.COMPOSITIONS for e in offline.composition_examples(0, c, "test")}
  assert not train_words & test_words
  choices, label = offline.composition_choices("reverse_then_upper", "kabo")
  assert choices[label] == "OBAK" and {"obak", "KABO"} <= set(choices)
  # Deterministic from the seed.
  assert offline.mc_examples(0, "shift_then_upper", "test", 5) == offline.mc_examples(0, "shift_then_upper", "test", 5)


def test_span_corruption_by_hand():
  from phatgoose_tasks import offline
  ids = list(range(10, 40))
  inputs, targets = offline.span_corruption(ids, np.random.default_rng(0), vocab_size=100)
  sentinels = [t for t in inputs if t >= 90]
  assert sentinels == [99 - i for i in range(len(sentinels))] and sentinels == [t for t in targets if t >= 90]
  # Interleaving inputs and targets by sentinel restores the original.
  restored, spans = [], {}
  cur = None
  for t in targets:
    if t >= 90:
      cur = t
      spans[cur] = []
    else:
      spans[cur].append(t)
  for t in inputs:
    restored += spans[t] if t >= 90 else [t]
  assert restored == ids
