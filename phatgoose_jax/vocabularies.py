"""seqio vocabularies: the real T5 SentencePiece vocabulary, or bytes where no SentencePiece model is at hand."""

from __future__ import annotations

from pathlib import Path

import gin
import seqio

from phatgoose_jax import resources

# T5's 100 sentinel ids (<extra_id_0> .. <extra_id_99>) come after the 32,000 pieces.
T5_EXTRA_IDS = 100


@gin.configurable
def t5_vocabulary(path: str | None = None, extra_ids: int = T5_EXTRA_IDS, fetch: bool = True
                  ) -> seqio.SentencePieceVocabulary:
  """The standard T5 vocabulary (32,100 ids with sentinels). path: an explicit spiece.model; by default
  the project's verified copy, fetched from PyPI on first use when fetch is true."""
  if path is None:
    local = resources.resource_path(resources.T5_SPIECE)
    if not local.is_file():
      if not fetch:
        raise FileNotFoundError(f"{local} is missing; run `python -m phatgoose_jax.resources` to fetch it")
      resources.fetch(resources.T5_SPIECE)
    path = str(local)
  elif not Path(path).is_file():
    raise FileNotFoundError(f"SentencePiece model {path} not found")
  return seqio.SentencePieceVocabulary(str(path), extra_ids=extra_ids)


@gin.configurable
def byte_vocabulary(extra_ids: int = 0) -> seqio.ByteVocabulary:
  """UTF-8 bytes: 3 special ids (pad 0, eos 1, unk 2) then 256 bytes (id = byte + 3)."""
  return seqio.ByteVocabulary(extra_ids=extra_ids)


@gin.configurable
def get_vocabulary(name: str = "t5") -> seqio.Vocabulary:
  """A vocabulary by name: 't5' (SentencePiece) or 'byte'."""
  if name == "t5":
    return t5_vocabulary()
  if name == "byte":
    return byte_vocabulary()
  raise ValueError(f"unknown vocabulary {name!r}; choose 't5' or 'byte'")
