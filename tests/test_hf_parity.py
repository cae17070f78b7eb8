"""Parity with HF transformers' PyTorch T5ForConditionalGeneration (T5.1.1 style) through our importer."""

import json
import shutil

import numpy as np
import pytest

from phatgoose_jax.importers.common import CheckpointMismatchError
from phatgoose_jax.importers.hf import convert_state_dict, export_state_dict, import_hf_checkpoint, read_state_dict

torch = pytest.importorskip("torch")


def _hf_forward(model, batch):
  with torch.no_grad():
    return model(input_ids=torch.tensor(batch["encoder_input_tokens"], dtype=torch.long),
                 attention_mask=torch.tensor(batch["encoder_input_tokens"] > 0),
                 decoder_input_ids=torch.tensor(batch["decoder_input_tokens"], dtype=torch.long))


def test_encoder_output_and_logits_match_hf(tiny_model, hf_checkpoint, padded_batch):
  model, params = tiny_model
  out = _hf_forward(hf_checkpoint["model"], padded_batch)
  module = model.module
  encoded = module.apply({"params": params}, padded_batch["encoder_input_tokens"], enable_dropout=False,
                         method=module.encode)
  logits = np.asarray(model.jit_logits(params, padded_batch))
  # Padded positions are garbage in both implementations (they differ in how they mask them).
  enc_valid = padded_batch["encoder_input_tokens"] > 0
  dec_valid = padded_batch["decoder_target_tokens"] > 0
  enc_err = np.abs(np.asarray(encoded) - out.encoder_last_hidden_state.numpy())[enc_valid].max()
  logit_err = np.abs(logits - out.logits.numpy())[dec_valid].max()
  assert enc_err <= 1e-4, enc_err
  assert logit_err <= 1e-4, logit_err
  assert np.abs(out.logits.numpy()).max() > 1.0  # the comparison is not between near-zero tensors


def test_scores_equal_hf_loss(tiny_model, hf_checkpoint, padded_batch):
  model, params = tiny_model
  hf = hf_checkpoint["model"]
  targets = padded_batch["decoder_target_tokens"]
  scores = model.jit_score(params, padded_batch)
  for row in range(targets.shape[0]):
    n = int((targets[row] > 0).sum())
    labels = torch.tensor(targets[row:row + 1, :n], dtype=torch.long)
    with torch.no_grad():
      loss = hf(input_ids=torch.tensor(padded_batch["encoder_input_tokens"][row:row + 1], dtype=torch.long),
                attention_mask=torch.tensor(padded_batch["encoder_input_tokens"][row:row + 1] > 0),
                labels=labels).loss.item()  # mean NLL over the n target tokens, EOS included
    np.testing.assert_allclose(float(scores["mean"][row]), -loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(scores["sum"][row]), -loss * n, rtol=1e-5, atol=1e-4)
    assert int(scores["num_tokens"][row]) == n
  np.testing.assert_allclose(model.score_batch(params, padded_batch), scores["sum"], rtol=1e-6)


def test_greedy_decoding_equals_hf_generate(tiny_model, hf_checkpoint, padded_batch):
  from transformers import GenerationConfig
  from transformers.cache_utils import DynamicCache, EncoderDecoderCache

  model, params = tiny_model
  steps = 10
  with torch.no_grad():
    generated = hf_checkpoint["model"].generate(
        input_ids=torch.tensor(padded_batch["encoder_input_tokens"], dtype=torch.long),
        attention_mask=torch.tensor(padded_batch["encoder_input_tokens"] > 0),
        cache=EncoderDecoderCache(DynamicCache(), DynamicCache()),  # HF sizes its default cache by encoder depth
        generation_config=GenerationConfig(max_new_tokens=steps, num_beams=1, do_sample=False,
                                           decoder_start_token_id=0, eos_token_id=1, pad_token_id=0))
  expected = generated.numpy()[:, 1:]  # drop the start token
  ours, aux = model.jit_predict(params, padded_batch, max_decode_length=steps)
  ours = np.asarray(ours)[:, :expected.shape[1]]
  np.testing.assert_array_equal(ours, expected)
  assert np.all(np.isfinite(aux["scores"]))


def test_bin_and_safetensors_import_identically(hf_checkpoint, imported):
  config_bin, params_bin = import_hf_checkpoint(hf_checkpoint["bin_dir"])
  config, params = imported
  assert config_bin == config
  import jax
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_bin)):
    np.testing.assert_array_equal(a, b)


def test_export_round_trip(hf_checkpoint, imported):
  config, params = imported
  state = export_state_dict(params, config)
  original = read_state_dict(hf_checkpoint["dir"])
  for key, value in state.items():
    np.testing.assert_array_equal(value, original[key], err_msg=key)
  hf_config = json.loads((hf_checkpoint["dir"] / "config.json").read_text())
  config2, params2 = convert_state_dict(state, hf_config)
  assert config2 == config


@pytest.mark.parametrize("damage, message", [
    ("missing", r"missing tensor decoder\.block\.1\.layer\.2\.DenseReluDense\.wo\.weight \(for parameter "
                r"decoder/layers_1/mlp/wo/kernel\)"),
    ("extra", r"unexpected tensor encoder\.block\.0\.layer\.0\.SelfAttention\.q\.bias with shape \(16,\)"),
    ("shape", r"parameter encoder/layers_1/mlp/wi_0/kernel: checkpoint has shape \(16, 20\) \(from "
              r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_0\.weight \(20, 16\) transposed\), "
              r"model expects \(16, 24\)"),
])
def test_mismatched_checkpoint_names_parameter_and_shapes(hf_checkpoint, damage, message):
  state = read_state_dict(hf_checkpoint["dir"])
  hf_config = json.loads((hf_checkpoint["dir"] / "config.json").read_text())
  if damage == "missing":
    del state["decoder.block.1.layer.2.DenseReluDense.wo.weight"]
  elif damage == "extra":
    state["encoder.block.0.layer.0.SelfAttention.q.bias"] = np.zeros(16, np.float32)
  else:
    state["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] = np.zeros((20, 16), np.float32)
  with pytest.raises(CheckpointMismatchError, match=message):
    convert_state_dict(state, hf_config)


def test_failed_import_leaves_existing_output_alone(hf_checkpoint, tmp_path, capsys):
  from phatgoose_jax import cli

  broken = tmp_path / "broken_hf"
  shutil.copytree(hf_checkpoint["dir"], broken)
  config = json.loads((broken / "config.json").read_text())
  config["d_ff"] = 32  # the weights say 24
  (broken / "config.json").write_text(json.dumps(config))
  existing = tmp_path / "out"
  existing.mkdir()
  (existing / "keep.txt").write_text("precious")
  assert cli.main(["import-hf", str(broken), str(existing), "--overwrite"]) == 1
  assert "model expects (16, 32)" in capsys.readouterr().err
  assert (existing / "keep.txt").read_text() == "precious"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken_hf", "out"]  # no temporary left behind
  fresh = tmp_path / "fresh"
  assert cli.main(["import-hf", str(broken), str(fresh)]) == 1
  assert not fresh.exists()
