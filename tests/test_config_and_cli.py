"""Size presets, gin flags and their errors, vocabularies, and the command line."""

import subprocess
import sys

import gin
import pytest

from phatgoose_jax import cli, config as config_lib, gin_utils, resources, vocabularies
from phatgoose_jax.config import T5Config

T5X_SIZES = {  # T5X t5_1_1/*.gin (conventions §1.9): emb_dim, heads, head_dim, mlp_dim, layers
    "small": (512, 6, 64, 1024, 8), "base": (768, 12, 64, 2048, 12), "large": (1024, 16, 64, 2816, 24),
    "xl": (2048, 32, 64, 5120, 24), "xxl": (4096, 64, 64, 10240, 24), "tiny": (8, 4, 3, 16, 2)}


@pytest.mark.parametrize("size", sorted(T5X_SIZES))
def test_size_gin_files_match_t5x(size):
  cfg = config_lib.model_size_config(size)
  emb, heads, head_dim, mlp, n = T5X_SIZES[size]
  assert (cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (emb, heads, head_dim, mlp)
  assert cfg.num_encoder_layers == cfg.num_decoder_layers == n
  assert cfg.mlp_activations == ("gelu", "linear") and not cfg.logits_via_embedding
  if size != "tiny":
    assert cfg.vocab_size == 32128 and cfg.dtype == "bfloat16"


def test_unknown_size_and_bad_bindings_fail_clearly():
  with pytest.raises(ValueError, match=r"unknown model size 'huge'; known sizes: tiny, small, base"):
    config_lib.model_size_config("huge")
  with pytest.raises(gin_utils.GinConfigError, match=r"malformed gin binding 'T5Config.emb_dim = '"):
    config_lib.config_from_gin(["tiny"], ["T5Config.emb_dim = "])
  with pytest.raises(gin_utils.GinConfigError, match=r"doesn't have a parameter named 'emb_size'"):
    config_lib.config_from_gin(["tiny"], ["T5Config.emb_size = 3"])
  with pytest.raises(gin_utils.GinConfigError, match=r"gin file 'nope.gin' not found"):
    config_lib.config_from_gin(["nope.gin"])
  with pytest.raises(gin_utils.GinConfigError, match=r"expected --gin.NAME=VALUE"):
    gin_utils.split_gin_flags(["--gin.T5Config.emb_dim"])
  with pytest.raises(ValueError, match=r"unknown activation\(s\) \['swish'\]"):
    T5Config(mlp_activations=("swish",))


def test_gin_flags_and_isolation():
  files, bindings, rest = gin_utils.split_gin_flags(
      ["import-t5x", "--gin_file=small", "--gin_file", "x.gin", "--gin.T5Config.dtype='float32'", "src"])
  assert files == ["small", "x.gin"] and bindings == ["T5Config.dtype='float32'"] and rest == ["import-t5x", "src"]
  cfg = config_lib.config_from_gin(["small"], bindings + ["T5Config.num_heads = 2"])
  assert cfg.dtype == "float32" and cfg.num_heads == 2 and cfg.emb_dim == 512
  with gin.unlock_config():
    gin.bind_parameter("T5Config.emb_dim", 7)
  try:
    assert config_lib.model_size_config("tiny").emb_dim == 8  # presets ignore the caller's bindings ...
    assert T5Config().emb_dim == 7  # ... and leave them in place
  finally:
    gin.clear_config()


def test_real_t5_vocabulary():
  try:
    vocab = vocabularies.t5_vocabulary()
  except resources.ResourceError as e:
    pytest.skip(f"the T5 SentencePiece model could not be obtained from PyPI here: {e}")
  assert vocab.encode("Hello world") == [8774, 296]
  assert vocab.vocab_size == 32100 and vocab.eos_id == 1 and vocab.pad_id == 0
  assert resources.sha256_of(resources.resource_path(resources.T5_SPIECE)) == resources.T5_SPIECE.files[0][2]


def test_byte_vocabulary():
  vocab = vocabularies.get_vocabulary("byte")
  assert vocab.encode("hello") == [107, 104, 111, 111, 114] and vocab.vocab_size == 259
  with pytest.raises(ValueError, match="unknown vocabulary"):
    vocabularies.get_vocabulary("wordpiece")


def test_resource_with_wrong_hash_is_refused(tmp_path, monkeypatch):
  monkeypatch.setenv("PHATGOOSE_DATA_DIR", str(tmp_path))
  (tmp_path / resources.T5_SPIECE.name).write_bytes(b"not a sentencepiece model")
  with pytest.raises(resources.ResourceError, match="sha256"):
    resources.fetch(resources.T5_SPIECE)


def test_every_subcommand_has_help(capsys):
  expected = {"pretrain", "train-expert", "train-gate", "train-multitask", "library", "eval", "analyze-routing",
              "import-hf", "import-t5x", "import-peft", "export-peft", "bench"}
  assert expected <= set(cli._COMMANDS)
  for name in list(cli._COMMANDS) + ["library add", "library list", "library remove", "library validate"]:
    with pytest.raises(SystemExit) as exit_info:
      cli.main(name.split() + ["--help"])
    assert exit_info.value.code == 0, name
    assert "usage: phatgoose" in capsys.readouterr().out, name
  # And the installed console script runs.
  proc = subprocess.run([sys.executable, "-m", "phatgoose_jax.cli", "--help"], capture_output=True, text=True)
  assert proc.returncode == 0 and "import-hf" in proc.stdout and "import-t5x" in proc.stdout


def test_cli_import_t5x_then_demo(imported, tmp_path, capsys):
  from test_checkpoints import write_t5x_legacy_checkpoint

  config, params = imported
  write_t5x_legacy_checkpoint(tmp_path / "t5x" / "checkpoint_3", params)
  out = tmp_path / "ours"
  assert cli.main(["import-t5x", str(tmp_path / "t5x"), str(out), "--dtype", "float32"]) == 0
  assert "imported" in capsys.readouterr().out
  assert cli.main(["import-t5x", str(tmp_path / "t5x"), str(out)]) == 1  # exists: refused
  assert "refusing to overwrite" in capsys.readouterr().err
  assert cli.main(["demo", "--checkpoint", str(out), "--vocabulary", "byte"]) == 1  # 259 ids > 64
  assert "has 259 ids but the model only 64" in capsys.readouterr().err
  assert cli.main(["import-t5x", str(tmp_path / "t5x"), str(tmp_path / "x"), "--gin_file=tiny"]) == 1
  assert "model expects" in capsys.readouterr().err


def test_demo_runs_on_a_random_tiny_model(capsys):
  assert cli.main(["demo", "--vocabulary", "byte", "--gin.T5Config.num_decoder_layers=1"]) == 0
  out = capsys.readouterr().out
  assert "rank classification (7 rows" in out and "beam (first call" in out
