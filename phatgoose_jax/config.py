"""Model configuration: T5X's `T5Config`, gin-configurable, and the size presets in `gin/models/`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import gin
import jax.numpy as jnp

# Where the size presets live (the repository's top-level `gin/` folder).
GIN_DIR = Path(__file__).resolve().parent.parent / "gin"
MODEL_SIZES = ("tiny", "small", "base", "large", "xl", "xxl")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of a T5 encoder-decoder, field for field T5X's `network.T5Config`.

  `dtype` is the activation dtype; parameters are always stored in float32.
  The last four fields are not in T5X's config (T5X hard-codes them); their defaults are T5X's values,
  except `one_hot_embedding` (T5X: True), which only changes how the lookup is computed.
  """

  vocab_size: int = 32128
  dtype: str = "float32"
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: Sequence[str] = ("relu",)
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False
  float32_attention_logits: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  one_hot_embedding: bool = False

  def __post_init__(self):
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    try:
      jnp.dtype(self.dtype)
    except TypeError as e:
      raise ValueError(f"T5Config.dtype={self.dtype!r} is not a dtype name (use 'float32' or 'bfloat16')") from e
    for name in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
    unknown = [a for a in self.mlp_activations if a not in ACTIVATIONS]
    if unknown:
      raise ValueError(f"T5Config.mlp_activations has unknown activation(s) {unknown}; known: {sorted(ACTIVATIONS)}")

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["mlp_activations"] = list(self.mlp_activations)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "T5Config":
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(d) - known)
    if extra:
      raise ValueError(f"unknown T5Config field(s) {extra}; known fields: {sorted(known)}")
    return cls(**d)


# Names accepted in `mlp_activations` (T5X: `_convert_to_activation_function`).
ACTIVATIONS = ("relu", "gelu", "linear", "silu", "gelu_exact")


def size_gin_file(size: str) -> Path:
  """The gin file of a named T5.1.1 size, with a clear error for an unknown name."""
  if size not in MODEL_SIZES:
    raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(MODEL_SIZES)} "
                     f"(or pass a gin file that binds T5Config)")
  return GIN_DIR / "models" / f"t5_1_1_{size}.gin"


def config_from_gin(gin_files: Sequence[str | Path] = (), bindings: Sequence[str] = ()) -> T5Config:
  """Builds a T5Config from gin files and bindings, leaving gin's global state as it found it.

  A size name (e.g. "base") may stand for its gin file.
  """
  from phatgoose_jax import gin_utils  # local: gin_utils imports this module

  files = [size_gin_file(f) if str(f) in MODEL_SIZES else Path(f) for f in gin_files]
  with gin_utils.isolated_gin_config():
    gin_utils.parse_gin(files, bindings)
    return T5Config()


def model_size_config(size: str, **overrides) -> T5Config:
  """The T5Config of a named size preset (read from `gin/models/t5_1_1_<size>.gin`)."""
  return config_from_gin([size_gin_file(size)]).replace(**overrides)
