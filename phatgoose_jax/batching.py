"""In-memory batches with exactly the features of seqio's `EncDecFeatureConverter(pack=False)`."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pad_to(ids: Sequence[int], length: int, what: str) -> np.ndarray:
  if len(ids) > length:
    raise ValueError(f"{what} has {len(ids)} tokens, more than the feature length {length}")
  out = np.zeros(length, np.int32)
  out[:len(ids)] = ids
  return out


def encdec_batch(inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]] | None, input_length: int,
                 target_length: int) -> dict[str, np.ndarray]:
  """Token id lists (EOS already appended) -> `encoder_input_tokens`, `decoder_target_tokens`,
  `decoder_input_tokens` (targets shifted right, BOS 0) and `decoder_loss_weights` (targets != 0)."""
  if targets is None:
    targets = [[] for _ in inputs]
  if len(inputs) != len(targets):
    raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
  enc = np.stack([pad_to(x, input_length, f"input {i}") for i, x in enumerate(inputs)])
  tgt = np.stack([pad_to(y, target_length, f"target {i}") for i, y in enumerate(targets)])
  dec_in = np.zeros_like(tgt)
  dec_in[:, 1:] = tgt[:, :-1]
  return {"encoder_input_tokens": enc, "decoder_target_tokens": tgt, "decoder_input_tokens": dec_in,
          "decoder_loss_weights": (tgt > 0).astype(np.int32)}
