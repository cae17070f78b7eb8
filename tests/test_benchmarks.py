"""BIG-bench and T0 task registration on small fixtures in the real file formats."""

import json

import pytest
import seqio

from phatgoose_jax import evaluation


@pytest.fixture(scope="module")
def byte_vocab():
  return seqio.ByteVocabulary()


def _write_bigbench(root):
  """Two tasks in BIG-bench's task.json format: a multiple-choice task with subtasks (one with two correct
  answers) and a generative one."""
  mc = {"name": "logical_deduction", "description": "x", "keywords": ["logic"], "metrics": ["multiple_choice_grade"],
        "preferred_score": "multiple_choice_grade", "task_prefix": "Q: ",
        "examples": [{"input": "Which is first?", "target_scores": {"the cat": 0, "the dog": 1}},
                     {"input": "Pick shapes.", "target_scores": {"circle": 1, "square": 0, "oval": 1}}]}
  gen = {"name": "word_sorting", "description": "x", "keywords": [], "metrics": ["exact_str_match"],
         "examples": [{"input": "Sort: b a", "target": "a b"}, {"input": "Sort: d c", "target": ["c d", "c  d"]}]}
  for sub in ("three_objects", "five_objects"):
    (root / "logical_deduction" / sub).mkdir(parents=True)
    (root / "logical_deduction" / sub / "task.json").write_text(json.dumps(mc))
  (root / "word_sorting").mkdir()
  (root / "word_sorting" / "task.json").write_text(json.dumps(gen))


def test_bigbench_parsing_and_registration(tmp_path, byte_vocab):
  from phatgoose_tasks import bigbench

  _write_bigbench(tmp_path)
  names = bigbench.register(tmp_path, vocabulary=byte_vocab, suites=("hard",))
  assert sorted(names) == ["bigbench_hard_logical_deduction__five_objects", "bigbench_hard_logical_deduction__three_objects",
                           "bigbench_hard_word_sorting"]
  mc = evaluation.load_task("bigbench_hard_logical_deduction__three_objects", "validation")
  assert mc.kind == "score" and mc.num_examples == 2
  rows = [(tuple(ex["idx"]), ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode(), bool(ex["is_correct"]))
          for ex in mc.examples]
  assert rows[:2] == [((0, 0), "Q: Which is first?\nAnswer:", "the cat", False),
                      ((0, 1), "Q: Which is first?\nAnswer:", "the dog", True)]
  assert [r[3] for r in rows[2:]] == [True, False, True]  # multi-answer example
  # Multi-answer accuracy: picking either correct shape counts.
  targets = [evaluation.rank_classification_postprocessor(None, ex, is_target=True) for ex in mc.examples]
  assert evaluation.rank_classification_metric(targets, [-1, 0, -5, -9, -1])["accuracy"] == 100.0
  gen = evaluation.load_task("bigbench_hard_word_sorting", "validation")
  assert gen.kind == "predict" and gen.examples[1]["inputs_pretokenized"].decode() == "Sort: d c\nAnswer:"
  post = [gen.postprocess_fn(None, example=ex, is_target=True) for ex in gen.examples]
  assert post == [["a b"], ["c d", "c  d"]]
  assert "bigbench_hard" in seqio.MixtureRegistry.names()


def test_bigbench_refuses_malformed_files(tmp_path, byte_vocab):
  from phatgoose_tasks import bigbench

  (tmp_path / "snarks").mkdir()
  (tmp_path / "snarks" / "task.json").write_text('{"examples": [{"input": "x"}]}')
  with pytest.raises(bigbench.BigBenchError, match=r"snarks/task.json: example 0 lacks 'input' and 'target_scores'"):
    bigbench.register(tmp_path, vocabulary=byte_vocab, suites=("hard",))
  with pytest.raises(FileNotFoundError, match="run `python -m phatgoose_jax.resources"):
    bigbench.register(tmp_path / "missing", vocabulary=byte_vocab)


PROMPTSOURCE_RTE = """dataset: super_glue
subset: rte
templates:
  0583671e-b717-4353-a0d4-ea1e4ac56429: !Template
    answer_choices: Yes ||| No
    id: 0583671e-b717-4353-a0d4-ea1e4ac56429
    jinja: Given that {{premise}} Does it follow that "{{hypothesis}}"? ||| {{ answer_choices[label] }}
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics:
      - Accuracy
      original_task: true
    name: given does it follow
    reference: ''
  aaaaaaaa-0000-0000-0000-000000000000: !Template
    answer_choices: null
    id: aaaaaaaa-0000-0000-0000-000000000000
    jinja: 'Write a hypothesis for: {{premise}} ||| {{hypothesis}}'
    metadata: !TemplateMetadata
      original_task: false
    name: generate hypothesis
    reference: ''
"""


def test_t0_templates_and_registration(tmp_path, byte_vocab):
  from phatgoose_tasks import t0

  templates = tmp_path / "templates" / "super_glue" / "rte"
  templates.mkdir(parents=True)
  (templates / "templates.yaml").write_text(PROMPTSOURCE_RTE)
  (tmp_path / "templates" / "ag_news").mkdir()
  (tmp_path / "templates" / "ag_news" / "templates.yaml").write_text(
      PROMPTSOURCE_RTE.replace("super_glue", "ag_news").replace("subset: rte", "subset: null")
      .replace("{{premise}}", "{{text}}").replace('"{{hypothesis}}"', "news").replace("{{hypothesis}}", "{{text}}"))
  data = tmp_path / "data"
  (data / "super_glue__rte").mkdir(parents=True)
  rows = [{"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": 0},
          {"premise": "It rains.", "hypothesis": "It is dry.", "label": 1}]
  (data / "super_glue__rte" / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  (data / "ag_news").mkdir()
  (data / "ag_news" / "train.jsonl").write_text(json.dumps({"text": "Stocks rose.", "label": 0}) + "\n")

  loaded = t0.load_templates(templates / "templates.yaml")
  assert [t["original_task"] for t in loaded] == [True, False]
  applied = t0.apply_template(loaded[0], rows[1])
  assert applied == {"inputs": 'Given that It rains. Does it follow that "It is dry."?', "targets": "No",
                     "choices": ["Yes", "No"]}

  names = t0.register(data, tmp_path / "templates", vocabulary=byte_vocab, held_in=["agnews"], held_out=["rte"])
  assert names == ["t0_train_agnews", "t0_eval_rte__given_does_it_follow"]  # only the original-task template
  task = evaluation.load_task("t0_eval_rte__given_does_it_follow", "validation")
  assert task.num_examples == 2 and [bool(e["is_correct"]) for e in task.examples] == [True, False, False, True]
  train = seqio.get_mixture_or_task("t0_train_agnews").get_dataset(None, split="train", shuffle=False)
  ex = next(train.as_numpy_iterator())
  assert ex["targets_pretokenized"].decode() in ("Yes", "No") and ex["inputs"][-1] == 1
  (data / "super_glue__rte" / "validation.jsonl").write_text("{broken\n")
  with pytest.raises(t0.T0Error, match=r"validation.jsonl, line 1: not valid JSON"):
    t0.read_jsonl(data / "super_glue__rte" / "validation.jsonl")
