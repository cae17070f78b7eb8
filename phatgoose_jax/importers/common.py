"""What every importer shares: the expected parameter tree of a config and a strict comparison with it."""

from __future__ import annotations

from typing import Mapping

import flax
import numpy as np

from phatgoose_jax.config import T5Config


class CheckpointMismatchError(ValueError):
  """A checkpoint whose tensors do not fit the model: the message lists every offending parameter."""


def expected_param_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
  """{'encoder/layers_0/attention/query/kernel': shape, ...} for a config, computed without memory."""
  from phatgoose_jax import partitioning  # local: both import heavy flax machinery
  from phatgoose_jax.network import Transformer

  shapes = partitioning.abstract_variables(Transformer(config))
  flat = flax.traverse_util.flatten_dict(shapes["params"], sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def check_against_config(flat_params: Mapping[str, np.ndarray], config: T5Config,
                         sources: Mapping[str, str] | None = None) -> None:
  """Raises CheckpointMismatchError naming every missing, extra or mis-shaped parameter.

  sources maps our parameter path to a description of where it came from in the checkpoint.
  """
  expected = expected_param_shapes(config)
  sources = sources or {}
  problems = []
  for path in sorted(set(expected) - set(flat_params)):
    problems.append(f"missing parameter {path} (model expects shape {expected[path]})")
  for path in sorted(set(flat_params) - set(expected)):
    problems.append(f"unexpected parameter {path} with shape {tuple(flat_params[path].shape)}"
                    f"{' from ' + sources[path] if path in sources else ''} (the model has no such parameter)")
  for path in sorted(set(flat_params) & set(expected)):
    got = tuple(flat_params[path].shape)
    if got != expected[path]:
      problems.append(f"parameter {path}: checkpoint has shape {got}"
                      f"{' (from ' + sources[path] + ')' if path in sources else ''}, model expects {expected[path]}")
  if problems:
    raise CheckpointMismatchError(f"checkpoint does not match the model config ({len(problems)} problem(s)):\n  "
                                  + "\n  ".join(problems))


def unflatten(flat_params: Mapping[str, np.ndarray]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): np.asarray(v, np.float32)
                                            for k, v in flat_params.items()})


def infer_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], **overrides) -> T5Config:
  """Reads a T5Config off a T5X-layout parameter tree (every dimension is visible in some shape).

  The activation of a single `wi` is not visible: it is taken to be ReLU (T5 1.0); `wi_0`/`wi_1` is
  gated GELU (T5.1.1). Anything else can be fixed with overrides.
  """
  def shape(path):
    if path not in shapes:
      raise CheckpointMismatchError(f"cannot infer the model config: parameter {path} is missing")
    return shapes[path]

  vocab_size, emb_dim = shape("token_embedder/embedding")
  num_heads, num_buckets = shape("encoder/relpos_bias/rel_embedding")
  joined_kv = shape("encoder/layers_0/attention/query/kernel")[1]
  if joined_kv % num_heads:
    raise CheckpointMismatchError(f"query kernel width {joined_kv} is not a multiple of the {num_heads} heads")
  count = lambda stack: len({k.split("/")[1] for k in shapes if k.startswith(f"{stack}/layers_")})
  gated = "encoder/layers_0/mlp/wi_0/kernel" in shapes
  mlp_dim = shape("encoder/layers_0/mlp/wi_0/kernel" if gated else "encoder/layers_0/mlp/wi/kernel")[1]
  fields = dict(vocab_size=vocab_size, emb_dim=emb_dim, num_heads=num_heads, head_dim=joined_kv // num_heads,
                mlp_dim=mlp_dim, num_encoder_layers=count("encoder"), num_decoder_layers=count("decoder"),
                mlp_activations=("gelu", "linear") if gated else ("relu",),
                logits_via_embedding="decoder/logits_dense/kernel" not in shapes,
                relative_attention_num_buckets=num_buckets, dtype="float32")
  fields.update(overrides)
  return T5Config(**fields)
