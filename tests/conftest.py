"""Shared fixtures. Models are tiny and built once per session so that JAX compiles as little as possible."""

from __future__ import annotations

import os

# Tests run on the CPU whatever the machine has, in float32 matmul precision, so that parity
# tolerances mean the same everywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Test models are tiny: XLA's compile time, not run time, dominates the suite. Skip LLVM's heavy
# optimization passes (semantics are unchanged) ...
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")
# ... and keep compiled programs on disk, so that identical programs built by different tests (or an
# earlier run) are compiled once.
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from phatgoose_jax.config import T5Config  # noqa: E402

# The padded batch used by parity tests: two rows, padding in both inputs and targets.
ENCODER_TOKENS = np.array([[5, 6, 7, 8, 9, 1, 0, 0], [10, 11, 1, 0, 0, 0, 0, 0]], np.int32)
TARGET_TOKENS = np.array([[12, 13, 14, 1, 0, 0], [15, 1, 0, 0, 0, 0]], np.int32)


def shift_right(targets: np.ndarray) -> np.ndarray:
  out = np.zeros_like(targets)
  out[:, 1:] = targets[:, :-1]
  return out


@pytest.fixture(scope="session")
def padded_batch():
  return {"encoder_input_tokens": ENCODER_TOKENS, "decoder_target_tokens": TARGET_TOKENS,
          "decoder_input_tokens": shift_right(TARGET_TOKENS), "decoder_loss_weights": (TARGET_TOKENS > 0).astype(np.int32)}


@pytest.fixture(scope="session")
def tiny_config() -> T5Config:
  """T5.1.1-style (gated GELU, untied head), unequal depths to catch encoder/decoder mix-ups."""
  return T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=4, head_dim=4, mlp_dim=24,
                  num_encoder_layers=2, num_decoder_layers=3, mlp_activations=("gelu", "linear"), dropout_rate=0.0)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, tiny_config):
  """A randomly initialized HF PyTorch T5 matching tiny_config, saved as safetensors (and as .bin).

  Weights follow the conventions notes (§7.5): N(0, 1/fan_in) kernels, N(0, 1) embeddings and relative
  bias, U(0.5, 1.5) layer-norm scales, so every tensor matters and float32 stays within ~1e-5.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = tiny_config
  hf_config = transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, d_kv=cfg.head_dim, num_heads=cfg.num_heads, d_ff=cfg.mlp_dim,
      num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, dropout_rate=0.0)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  model.lm_head = torch.nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)  # HF 5.x ties by default
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.uniform_(0.5, 1.5)
      elif "relative_attention_bias" in name or name == "shared.weight":
        p.normal_(0.0, 1.0)
      else:
        p.normal_(0.0, 1.0 / np.sqrt(p.shape[1]))
  model.set_attn_implementation("eager")
  directory = tmp_path_factory.mktemp("hf_t5")
  model.save_pretrained(directory)
  bin_dir = tmp_path_factory.mktemp("hf_t5_bin")
  (bin_dir / "config.json").write_text((directory / "config.json").read_text())
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  return {"dir": directory, "bin_dir": bin_dir, "model": model}


@pytest.fixture(scope="session")
def imported(hf_checkpoint):
  from phatgoose_jax.importers.hf import import_hf_checkpoint
  return import_hf_checkpoint(hf_checkpoint["dir"])


@pytest.fixture(scope="session")
def tiny_model(imported):
  """(EncoderDecoderModel, params) of the imported HF model; its jitted functions are shared by tests."""
  from phatgoose_jax.model import EncoderDecoderModel
  from phatgoose_jax.network import Transformer
  config, params = imported
  return EncoderDecoderModel(Transformer(config)), params


@pytest.fixture(scope="session")
def train_tasks():
  from helpers import register_train_tasks
  return register_train_tasks()


@pytest.fixture(scope="session")
def byte_base_checkpoint(tmp_path_factory):
  from helpers import write_byte_base_checkpoint
  return write_byte_base_checkpoint(tmp_path_factory.mktemp("byte_base") / "ckpt")
