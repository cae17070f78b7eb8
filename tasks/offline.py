"""The offline letter-skills benchmark: held-in skills, held-out compositions, and a pretraining corpus.

Everything is generated deterministically from a seed; nothing is downloaded. See tasks/README.md for the
design and why it mirrors the paper's setting.

Held-in (one expert each): eight single-word letter skills, each with one fixed instruction wording.
Held-out: four compositions of two held-in skills, each asked with a new wording, in a generative form
(exact match) and a multiple-choice form (rank classification) whose distractors are what each skill
alone would produce. The pretraining corpus is span corruption over sentences of the same pseudo-words,
capitalized words, numbers and instruction vocabulary, with no word ever paired with a transformed form.
"""

from __future__ import annotations

import functools
import string
from typing import Iterator

import numpy as np

VOCABULARY_EXTRA_IDS = 100   # sentinels for span corruption: <extra_id_i> = vocab_size - 1 - i
SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"train": 4000, "validation": 100, "test": 100}
_SPLIT_SALT = {"train": 0, "validation": 1, "test": 2}
LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
VOWELS = set("aeiou")


# ---------------------------------------------------------------------------------------------
# Skills: str -> str on one lower-case word
# ---------------------------------------------------------------------------------------------

def upper(w: str) -> str:
  return w.upper()


def shift(w: str) -> str:
  return "".join(chr((ord(c) - 97 + 1) % 26 + 97) if c in string.ascii_lowercase else c for c in w)


def atbash(w: str) -> str:
  return "".join(chr(219 - ord(c)) if c in string.ascii_lowercase else c for c in w)


def leet(w: str) -> str:
  return "".join(LEET.get(c, c) for c in w)


def mask_vowels(w: str) -> str:
  return "".join("*" if c in VOWELS else c for c in w)


def reverse(w: str) -> str:
  return w[::-1]


def rotate(w: str) -> str:
  return w[1:] + w[:1]


def double(w: str) -> str:
  return "".join(c + c for c in w)


# name: (function, the held-in instruction)
SKILLS = {
    "upper": (upper, "Uppercase: {w}"),
    "shift": (shift, "Shift each letter forward: {w}"),
    "atbash": (atbash, "Mirror the alphabet: {w}"),
    "leet": (leet, "Leetify: {w}"),
    "mask_vowels": (mask_vowels, "Hide the vowels: {w}"),
    "reverse": (reverse, "Reverse: {w}"),
    "rotate": (rotate, "Rotate left: {w}"),
    "double": (double, "Double each letter: {w}"),
}

# name: (first skill, second skill, a new wording). The answer is second(first(w)).
COMPOSITIONS = {
    "shift_then_upper": ("shift", "upper", "Write {w} in capital letters, each one moved a step along the alphabet."),
    "reverse_then_upper": ("reverse", "upper", "Spell {w} backwards using capital letters."),
    "reverse_then_leet": ("reverse", "leet", "Read {w} from its last letter to its first, in leetspeak."),
    "rotate_then_mask": ("rotate", "mask_vowels", "Move the first letter of {w} to the end and star out its vowels."),
}

HELD_IN = tuple(f"pg_offline_{s}" for s in SKILLS)
HELD_OUT_GENERATIVE = tuple(f"pg_offline_heldout_{c}" for c in COMPOSITIONS)
HELD_OUT_MC = tuple(f"pg_offline_heldout_{c}_mc" for c in COMPOSITIONS)
HELD_OUT = HELD_OUT_MC + HELD_OUT_GENERATIVE
PRETRAIN = "pg_offline_span_corruption"
MULTITASK = "pg_offline_multitask"
HELD_OUT_MIXTURE = "pg_offline_heldout"


# ---------------------------------------------------------------------------------------------
# Deterministic generation
# ---------------------------------------------------------------------------------------------

def _rng(seed: int, *parts) -> np.random.Generator:
  """An independent stream per (seed, task, split): tasks never share examples by accident."""
  return np.random.default_rng([seed] + [abs(hash_str(p)) % (2**31) for p in parts])


def hash_str(s) -> int:
  h = 0
  for ch in str(s):
    h = (h * 131 + ord(ch)) % (2**61 - 1)
  return h


def pseudo_word(rng: np.random.Generator, min_len: int = 3, max_len: int = 6) -> str:
  """A pronounceable-ish lower-case word: alternating consonant clusters and vowels."""
  n = int(rng.integers(min_len, max_len + 1))
  consonants, vowels = "bcdfghklmnprstvz", "aeiou"
  start = int(rng.integers(2))
  return "".join((vowels if (i + start) % 2 else consonants)[int(rng.integers(len(vowels if (i + start) % 2 else consonants)))]
                 for i in range(n))


def _words(seed: int, task: str, split: str, count: int) -> list[str]:
  """Words for one split. Train, validation and test words are disjoint (test words are never trained on)."""
  rng = _rng(seed, "words", split)
  pool, seen = [], set()
  while len(pool) < count * 3:
    w = pseudo_word(rng)
    if w not in seen:
      seen.add(w)
      pool.append(w)
  # Disjointness across splits: a word belongs to the split its hash selects.
  pool = [w for w in pool if hash_str(w) % 3 == _SPLIT_SALT[split]]
  order = _rng(seed, task, split).permutation(len(pool))
  words = [pool[i] for i in order]
  while len(words) < count:  # extremely rare; recycle deterministically
    words += words
  return words[:count]


def skill_examples(seed: int, skill: str, split: str, count: int | None = None) -> list[dict]:
  fn, template = SKILLS[skill]
  words = _words(seed, skill, split, count or SPLIT_SIZES[split])
  return [{"inputs": template.format(w=w), "targets": fn(w), "word": w} for w in words]


def composition_examples(seed: int, name: str, split: str, count: int | None = None) -> list[dict]:
  first, second, template = COMPOSITIONS[name]
  f1, f2 = SKILLS[first][0], SKILLS[second][0]
  words = _words(seed, name, split, count or SPLIT_SIZES[split])
  return [{"inputs": template.format(w=w), "targets": f2(f1(w)), "word": w} for w in words]


def composition_choices(name: str, word: str) -> tuple[list[str], int]:
  """The correct composition and distractors: each skill alone, and the two in the other order when that
  differs; shuffled deterministically per word. Returns (choices, index of the correct one)."""
  first, second, _ = COMPOSITIONS[name]
  f1, f2 = SKILLS[first][0], SKILLS[second][0]
  correct = f2(f1(word))
  candidates = [correct, f1(word), f2(word), f1(f2(word)), word]
  choices = []
  for c in candidates:
    if c not in choices:
      choices.append(c)
  choices = choices[:4]
  order = _rng(0, "choices", name, word).permutation(len(choices))
  shuffled = [choices[i] for i in order]
  return shuffled, shuffled.index(correct)


def mc_examples(seed: int, name: str, split: str, count: int | None = None) -> list[dict]:
  out = []
  for ex in composition_examples(seed, name, split, count):
    choices, label = composition_choices(name, ex["word"])
    out.append({"inputs": ex["inputs"], "choices": choices, "label": label, "word": ex["word"]})
  return out


# Pretraining text: the benchmark's vocabulary in sentences, with no word-to-transformed-word pairs.
_FILLER = ("the letter alphabet word capital small step along first last end move each one write read spell "
           "from to in of and a is its vowels hide star mirror shift rotate double left forward backwards "
           "using with".split())


def corpus_sentence(rng: np.random.Generator) -> str:
  """Filler vocabulary and pseudo-words, some capitalized, some in capitals, some numbers. A few words
  recur within a sentence (always in the same form), as in natural text, so filling a masked span often
  means copying from the context; no word ever appears next to a transformed form of itself."""
  topic = [pseudo_word(rng) for _ in range(int(rng.integers(1, 4)))]
  topic = [w.upper() if rng.random() < 0.15 else (w.capitalize() if rng.random() < 0.15 else w) for w in topic]
  parts = []
  for _ in range(int(rng.integers(6, 11))):
    r = rng.random()
    if r < 0.35:
      parts.append(topic[int(rng.integers(len(topic)))])
    elif r < 0.55:
      parts.append(pseudo_word(rng))
    elif r < 0.85:
      parts.append(_FILLER[int(rng.integers(len(_FILLER)))])
    elif r < 0.93:
      parts.append(pseudo_word(rng).upper())
    else:
      parts.append(str(int(rng.integers(0, 10000))))
  return " ".join(parts) + str(rng.choice([".", ".", "!", "?", ":", " *"]))


def span_corruption(ids: list[int], rng: np.random.Generator, vocab_size: int, noise_density: float = 0.15,
                    mean_span_length: float = 3.0) -> tuple[list[int], list[int]]:
  """T5's span corruption on one token list: drop ~noise_density of the tokens in spans of mean length
  mean_span_length, each replaced by a sentinel in the inputs; targets are the sentinels and the spans."""
  n = len(ids)
  num_noise = max(1, int(round(n * noise_density)))
  num_spans = max(1, int(round(num_noise / mean_span_length)))
  num_noise = max(num_noise, num_spans)
  # Random partition of noise and non-noise tokens into num_spans segments each.
  def segments(total, k):
    cuts = np.sort(rng.choice(np.arange(1, total), size=k - 1, replace=False)) if k > 1 else np.array([], int)
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(int)
  if n - num_noise < num_spans:
    return ids, []
  noise_lengths = segments(num_noise, num_spans)
  keep_lengths = segments(n - num_noise, num_spans)
  inputs, targets, pos = [], [], 0
  for i in range(num_spans):
    inputs += ids[pos:pos + keep_lengths[i]]
    pos += keep_lengths[i]
    sentinel = vocab_size - 1 - i
    inputs.append(sentinel)
    targets.append(sentinel)
    targets += ids[pos:pos + noise_lengths[i]]
    pos += noise_lengths[i]
  return inputs, targets


def pretraining_examples(seed: int, split: str, count: int, vocab, max_input_tokens: int = 48,
                         reconstruct_fraction: float = 0.5) -> Iterator[dict]:
  """Span-corruption examples over corpus sentences, generated lazily. In `reconstruct_fraction` of them
  the target is the whole original sentence instead of only the dropped spans (BART/MASS-style
  denoising): a tiny model trained for minutes needs that to learn to copy, which a T5 pretrained on a
  trillion tokens can already do."""
  rng = _rng(seed, "pretrain", split)
  made = 0
  while made < count:
    text = corpus_sentence(rng)
    ids = vocab.encode(text)[:max_input_tokens - 1]
    inputs, targets = span_corruption(ids, rng, vocab.vocab_size)
    if not targets:
      continue
    if rng.random() < reconstruct_fraction:
      targets = ids
    made += 1
    yield {"inputs": inputs, "targets": targets}


# ---------------------------------------------------------------------------------------------
# seqio registration
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def vocabulary():
  import seqio
  return seqio.ByteVocabulary(extra_ids=VOCABULARY_EXTRA_IDS)


def register(data_seed: int = 0) -> None:
  """Registers every offline task and mixture (idempotent; data_seed fixes all generated data)."""
  import seqio
  import tensorflow as tf

  from phatgoose_jax import evaluation

  if PRETRAIN in seqio.TaskRegistry.names():
    return
  vocab = vocabulary()
  features = {"inputs": seqio.Feature(vocab, add_eos=True), "targets": seqio.Feature(vocab, add_eos=True)}
  text_pre = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos]

  def text_source(make):
    def dataset_fn(split, shuffle_files, seed=None):
      del shuffle_files, seed
      examples = make(split)
      return tf.data.Dataset.from_tensor_slices({"inputs": [e["inputs"] for e in examples],
                                                 "targets": [e["targets"] for e in examples]})
    return seqio.FunctionDataSource(dataset_fn, splits=SPLITS)

  for skill in SKILLS:
    seqio.TaskRegistry.add(f"pg_offline_{skill}", text_source(functools.partial(lambda s, sp: skill_examples(data_seed, s, sp), skill)),
                           preprocessors=text_pre, output_features=features,
                           metric_fns=[evaluation.exact_match])
  for name in COMPOSITIONS:
    seqio.TaskRegistry.add(f"pg_offline_heldout_{name}",
                           text_source(functools.partial(lambda n, sp: composition_examples(data_seed, n, sp), name)),
                           preprocessors=text_pre, output_features=features, metric_fns=[evaluation.exact_match])

    def mc_source(n=name):
      def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files, seed
        ex = mc_examples(data_seed, n, split)
        width = max(len(e["choices"]) for e in ex)
        return tf.data.Dataset.from_tensor_slices({
            "inputs": [e["inputs"] for e in ex],
            "choices": tf.ragged.constant([e["choices"] for e in ex]).to_tensor(default_value="", shape=[len(ex), width]),
            "num_choices": [len(e["choices"]) for e in ex],
            "label": [e["label"] for e in ex]})
      return seqio.FunctionDataSource(dataset_fn, splits=SPLITS)

    seqio.TaskRegistry.add(
        f"pg_offline_heldout_{name}_mc", mc_source(),
        preprocessors=[functools.partial(
            evaluation.rank_classification, inputs_fn=lambda ex: ex["inputs"],
            targets_fn=lambda ex: ex["choices"][:ex["num_choices"]],
            is_correct_fn=lambda ex: tf.equal(tf.range(ex["num_choices"]), ex["label"])),
                       *text_pre],
        output_features=features, postprocess_fn=evaluation.rank_classification_postprocessor,
        metric_fns=[evaluation.rank_classification_metric])

  def pretrain_source():
    def dataset_fn(split, shuffle_files, seed=None):
      del shuffle_files, seed
      count = {"train": 20000, "validation": 200, "test": 200}[split]
      return tf.data.Dataset.from_generator(
          lambda: pretraining_examples(data_seed, split, count, vocab), output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                                              "targets": tf.TensorSpec([None], tf.int32)})
    return seqio.FunctionDataSource(dataset_fn, splits=SPLITS)

  seqio.TaskRegistry.add(PRETRAIN, pretrain_source(), preprocessors=[seqio.preprocessors.append_eos],
                         output_features=features)
  seqio.MixtureRegistry.add(MULTITASK, list(HELD_IN), default_rate=1.0)
  seqio.MixtureRegistry.add(HELD_OUT_MIXTURE, list(HELD_OUT), default_rate=1.0)


def retrieval_text(example: dict) -> str:
  """The Retrieval baseline's text of an example (the original's format, choices included when present)."""
  choices = example.get("choices")
  if choices:
    return f"Answer Choices: {', '.join(choices)}, Instance: {example['inputs']}"
  return f"Instance: {example['inputs']}"
