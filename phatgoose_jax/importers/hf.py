"""Import Hugging Face transformers T5 checkpoints (`config.json` + safetensors or PyTorch `.bin`).

Names follow transformers' own T5X converter (`convert_t5x_checkpoint_to_pytorch.py`): HF linear weights
are [out, in] and are transposed into T5X's [in, out] kernels; the relative-position table is transposed
from [buckets, heads] to [heads, buckets].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from phatgoose_jax.config import T5Config
from phatgoose_jax.importers.common import CheckpointMismatchError, check_against_config, unflatten

_ATTENTION = {"query": "q", "key": "k", "value": "v", "out": "o"}
_FEED_FORWARD = {"gated-gelu": ("gelu", "linear"), "gated-silu": ("silu", "linear"), "gated-relu": ("relu", "linear"),
                 "relu": ("relu",), "gelu": ("gelu",), "silu": ("silu",)}
# Keys HF writes that alias another tensor.
_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def t5config_from_hf(hf: Mapping, has_lm_head: bool, dtype: str = "float32") -> T5Config:
  """Our config from an HF T5 `config.json`. has_lm_head: the checkpoint holds a separate `lm_head.weight`."""
  try:
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _FEED_FORWARD:
      raise CheckpointMismatchError(f"config.json: feed_forward_proj={proj!r} is not supported "
                                    f"(known: {sorted(_FEED_FORWARD)})")
    if hf.get("is_gated_act") is not None and hf["is_gated_act"] != proj.startswith("gated"):
      raise CheckpointMismatchError(f"config.json: is_gated_act={hf['is_gated_act']} contradicts "
                                    f"feed_forward_proj={proj!r}")
    num_layers = hf["num_layers"]
    return T5Config(
        vocab_size=hf["vocab_size"], dtype=dtype, emb_dim=hf["d_model"], num_heads=hf["num_heads"],
        num_encoder_layers=num_layers, num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
        head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], mlp_activations=_FEED_FORWARD[proj],
        dropout_rate=hf.get("dropout_rate", 0.1), logits_via_embedding=not has_lm_head,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6))
  except KeyError as e:
    raise CheckpointMismatchError(f"config.json lacks the field {e.args[0]!r} that a T5 config must have") from e


def scales_decoder_output(hf: Mapping) -> bool:
  """HF multiplies the decoder output by d_model**-0.5 before the head iff this is true."""
  if "scale_decoder_outputs" in hf:
    return bool(hf["scale_decoder_outputs"])
  return bool(hf.get("tie_word_embeddings", True))


def name_map(config: T5Config) -> Iterator[tuple[str, str, bool]]:
  """(our parameter path, HF state-dict key, transpose?) for every parameter of the model."""
  yield "token_embedder/embedding", "shared.weight", False
  mlp_names = ["wi"] if len(config.mlp_activations) == 1 else [f"wi_{i}" for i in range(len(config.mlp_activations))]
  stacks = (("encoder", config.num_encoder_layers, (("attention", 0, "SelfAttention", "pre_attention_layer_norm"),), 1),
            ("decoder", config.num_decoder_layers,
             (("self_attention", 0, "SelfAttention", "pre_self_attention_layer_norm"),
              ("encoder_decoder_attention", 1, "EncDecAttention", "pre_cross_attention_layer_norm")), 2))
  for stack, num_layers, attentions, mlp_sub in stacks:
    yield f"{stack}/relpos_bias/rel_embedding", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True
    for i in range(num_layers):
      ours, hf = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
      for name, sub, hf_name, norm in attentions:
        yield f"{ours}/{norm}/scale", f"{hf}.{sub}.layer_norm.weight", False
        for proj, hf_proj in _ATTENTION.items():
          yield f"{ours}/{name}/{proj}/kernel", f"{hf}.{sub}.{hf_name}.{hf_proj}.weight", True
      yield f"{ours}/pre_mlp_layer_norm/scale", f"{hf}.{mlp_sub}.layer_norm.weight", False
      for mlp in mlp_names + ["wo"]:
        yield f"{ours}/mlp/{mlp}/kernel", f"{hf}.{mlp_sub}.DenseReluDense.{mlp}.weight", True
    yield f"{stack}/{stack}_norm/scale", f"{stack}.final_layer_norm.weight", False
  if not config.logits_via_embedding:
    yield "decoder/logits_dense/kernel", "lm_head.weight", True


def read_state_dict(checkpoint_dir: Path) -> dict[str, np.ndarray]:
  """All tensors of an HF checkpoint directory as float32 numpy arrays.

  Reads `model.safetensors`, sharded `model-*.safetensors` (via the index), or `pytorch_model.bin`.
  """
  checkpoint_dir = Path(checkpoint_dir)
  index = checkpoint_dir / "model.safetensors.index.json"
  if (checkpoint_dir / "model.safetensors").is_file():
    files = [checkpoint_dir / "model.safetensors"]
  elif index.is_file():
    files = sorted({checkpoint_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
  else:
    files = []
  if files:
    from safetensors import safe_open
    state = {}
    for f in files:
      if not f.is_file():
        raise FileNotFoundError(f"{index} names the shard {f.name}, which is missing")
      # The flax reader understands bfloat16, which numpy alone does not.
      with safe_open(str(f), framework="flax") as reader:
        for key in reader.keys():
          state[key] = np.asarray(reader.get_tensor(key), dtype=np.float32)
    return state
  bin_file = checkpoint_dir / "pytorch_model.bin"
  if bin_file.is_file():
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"{bin_file} is a PyTorch file: reading it needs torch (pip install torch), "
                        f"or convert it to safetensors first") from e
    raw = torch.load(str(bin_file), map_location="cpu", weights_only=True)
    return {k: v.detach().to(torch.float32).numpy() for k, v in raw.items()}
  raise FileNotFoundError(f"no HF weights in {checkpoint_dir}: expected model.safetensors, "
                          f"model.safetensors.index.json or pytorch_model.bin")


def import_hf_checkpoint(checkpoint_dir: str | Path, dtype: str = "float32") -> tuple[T5Config, dict]:
  """Reads an HF T5 checkpoint directory. Returns (config, params) with params a nested float32 tree."""
  checkpoint_dir = Path(checkpoint_dir)
  config_file = checkpoint_dir / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{config_file} not found: an HF checkpoint directory holds config.json beside its weights")
  try:
    hf_config = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointMismatchError(f"{config_file} is not valid JSON: {e}") from e
  state = read_state_dict(checkpoint_dir)
  return convert_state_dict(state, hf_config, dtype=dtype, origin=str(checkpoint_dir))


def convert_state_dict(state: Mapping[str, np.ndarray], hf_config: Mapping, dtype: str = "float32",
                       origin: str = "checkpoint") -> tuple[T5Config, dict]:
  """HF state dict + config -> (config, params), checking every tensor against the config."""
  if "lm_head.weight" not in state and "shared.weight" in state and not scales_decoder_output(hf_config):
    # Tied but not rescaled: T5X's tied head always rescales, so use an untied copy of the embedding.
    state = {**state, "lm_head.weight": state["shared.weight"]}
  has_lm_head = "lm_head.weight" in state and not (
      "shared.weight" in state and np.array_equal(state["lm_head.weight"], state["shared.weight"])
      and scales_decoder_output(hf_config))
  config = t5config_from_hf(hf_config, has_lm_head=has_lm_head, dtype=dtype)
  flat, sources, used = {}, {}, set()
  for ours, key, transpose in name_map(config):
    if key not in state:
      continue  # reported as missing by the check below
    value = state[key]
    flat[ours] = value.T if transpose and value.ndim == 2 else value
    sources[ours] = f"{key} {tuple(value.shape)}{' transposed' if transpose else ''}"
    used.add(key)
  if has_lm_head and scales_decoder_output(hf_config):
    # HF rescales the decoder output before a separate head; fold that into the head's kernel.
    flat["decoder/logits_dense/kernel"] = flat["decoder/logits_dense/kernel"] * config.emb_dim ** -0.5
  ignorable = set(_ALIASES) | ({"lm_head.weight"} if not has_lm_head else set())
  extra = sorted(k for k in set(state) - used - ignorable)
  problems = [f"unexpected tensor {k} with shape {tuple(state[k].shape)} (no parameter of this model takes it)"
              for k in extra]
  missing = [f"missing tensor {key} (for parameter {ours})" for ours, key, _ in name_map(config) if key not in state]
  if problems or missing:
    raise CheckpointMismatchError(f"{origin} does not match its config.json:\n  " + "\n  ".join(missing + problems))
  check_against_config(flat, config, sources)
  return config, unflatten(flat)


def export_state_dict(params: Mapping, config: T5Config) -> dict[str, np.ndarray]:
  """Our params -> HF state dict (the inverse of `convert_state_dict` for an untied T5.1.1 model)."""
  import flax
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  state = {}
  for ours, key, transpose in name_map(config):
    value = np.asarray(flat[ours], np.float32)
    state[key] = np.ascontiguousarray(value.T if transpose and value.ndim == 2 else value)
  return state
