"""PEFT interop: adapters made by the real `peft` library on a tiny HF T5 import into experts whose logits
equal PEFT's own forward; export and re-import is exact; rank and target mismatches as documented."""

import copy
import json
import re

import numpy as np
import pytest

from phatgoose_jax import adapters, cli, library
from phatgoose_jax.adapters import AdapterConfig
from phatgoose_jax.importers import peft as peft_io
from phatgoose_jax.model import EncoderDecoderModel
from phatgoose_jax.network import Transformer

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


def _peft_adapter(hf_model, directory, targets, r, alpha, seed, use_rslora=False):
  """A PEFT LoRA on a copy of the HF model, with random A and B (PEFT initializes B to zero), saved."""
  model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
      r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="SEQ_2_SEQ_LM", use_rslora=use_rslora))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.normal_(0.0, 0.3)
  model.eval()
  model.save_pretrained(directory)
  return model


def _logits(model, batch):
  with torch.no_grad():
    return model(input_ids=torch.tensor(batch["encoder_input_tokens"], dtype=torch.long),
                 attention_mask=torch.tensor(batch["encoder_input_tokens"] > 0),
                 decoder_input_ids=torch.tensor(batch["decoder_input_tokens"], dtype=torch.long)).logits.numpy()


def _our_logits(config, base_params, expert, batch):
  sites = "|".join(re.escape(s) for s in expert.sites)
  model = EncoderDecoderModel(Transformer(config, AdapterConfig(mode="lora", rank=expert.rank, alpha=expert.alpha,
                                                                sites=sites)))
  flat = {**adapters.flatten(base_params), **{k: v for k, v in expert.tensors.items() if not k.endswith("/gate")}}
  return np.asarray(model.jit_logits(adapters.unflatten(flat), batch))


@pytest.mark.parametrize("targets,r,alpha,rslora", [
    (["q", "k", "v", "o", "wi_0", "wi_1", "wo"], 4, 8, False),
    (["q", "v"], 2, 16, True),
])
def test_peft_adapter_imports_with_peft_logits(hf_checkpoint, imported, padded_batch, tmp_path, targets, r, alpha, rslora):
  config, base_params = imported
  peft_model = _peft_adapter(hf_checkpoint["model"], tmp_path / "adapter", targets, r, alpha, seed=r, use_rslora=rslora)
  expert = peft_io.import_peft(tmp_path / "adapter", config, library.base_model_fingerprint(base_params), name="imp")
  assert expert.rank == r and not expert.has_gates
  assert {s.rsplit("/", 1)[-1] for s in expert.sites} == {
      {"q": "query", "k": "key", "v": "value", "o": "out"}.get(t, t) for t in targets}
  ours = _our_logits(config, base_params, expert, padded_batch)
  theirs = _logits(peft_model, padded_batch)
  base = _logits(hf_checkpoint["model"], padded_batch)
  valid = padded_batch["decoder_target_tokens"] > 0
  assert np.abs(ours - theirs)[valid].max() <= 1e-4
  assert np.abs(theirs - base)[valid].max() > 1e-2  # the adapter does change the model


def test_export_reimport_rank_and_target_handling(hf_checkpoint, imported, padded_batch, tmp_path, capsys):
  config, base_params = imported
  fingerprint = library.base_model_fingerprint(base_params)
  peft_model = _peft_adapter(hf_checkpoint["model"], tmp_path / "adapter", ["q", "wo"], 2, 4, seed=1)
  expert = peft_io.import_peft(tmp_path / "adapter", config, fingerprint, name="imp")
  # Export (with gates added, as after train-gate) and re-import: identical tensors.
  rng = np.random.default_rng(0)
  gated = library.Expert(**{**expert.__dict__, "tensors": {
      **expert.tensors, **{f"{s}/gate": rng.normal(size=expert.tensors[f"{s}/lora_a"].shape[0]).astype(np.float32)
                           for s in expert.sites}}})
  peft_io.export_peft(gated, config, tmp_path / "exported")
  config_json = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
  assert config_json["target_modules"] == ["q", "wo"] and config_json["r"] == 2
  back = peft_io.import_peft(tmp_path / "exported", config, fingerprint, name="imp")
  assert back.tensors.keys() == gated.tensors.keys() and back.rank == 2 and back.alpha == gated.alpha
  for k, v in gated.tensors.items():
    np.testing.assert_array_equal(back.tensors[k], v, err_msg=k)
  # PEFT itself loads our export and computes the same logits.
  reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_checkpoint["model"]), tmp_path / "exported").eval()
  valid = padded_batch["decoder_target_tokens"] > 0
  assert np.abs(_logits(reloaded, padded_batch) - _logits(peft_model, padded_batch))[valid].max() <= 1e-5
  # A subset of one module name (only the first encoder layer's q) exports as a regex PEFT understands.
  subset = library.Expert(**{**expert.__dict__, "sites": ["encoder/layers_0/attention/query"], "tensors": {
      k: v for k, v in expert.tensors.items() if k.startswith("encoder/layers_0/attention/query/")}})
  peft_io.export_peft(subset, config, tmp_path / "subset")
  assert isinstance(json.loads((tmp_path / "subset" / "adapter_config.json").read_text())["target_modules"], str)
  sub_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_checkpoint["model"]), tmp_path / "subset")
  assert sum("lora_A" in n for n, _ in sub_model.named_parameters()) == 1
  # Rank: a library of rank 4 needs --pad_rank (zero padding keeps the function); a lower rank is refused.
  with pytest.raises(peft_io.PeftError, match="rank 2 differs from the library's rank 4; pass --pad_rank"):
    peft_io.import_peft(tmp_path / "adapter", config, fingerprint, name="imp", rank=4)
  padded = peft_io.import_peft(tmp_path / "adapter", config, fingerprint, name="imp", rank=4, alpha=1.0, pad_rank=True)
  assert padded.rank == 4 and padded.tensors["decoder/layers_0/mlp/wo/lora_a"].shape[1] == 4
  np.testing.assert_allclose(_our_logits(config, base_params, padded, padded_batch),
                             _our_logits(config, base_params, expert, padded_batch), atol=1e-5)
  with pytest.raises(peft_io.PeftError, match="rank 2 is above the requested rank 1"):
    peft_io.import_peft(tmp_path / "adapter", config, fingerprint, name="imp", rank=1)
  # Targets this base model does not have (an adapter for a deeper model) are refused by name.
  state = peft_io._read_weights(tmp_path / "adapter")  # pylint: disable=protected-access
  from safetensors.numpy import save_file
  deeper = tmp_path / "deeper"
  deeper.mkdir()
  (deeper / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
  save_file({**state, "base_model.model.encoder.block.7.layer.0.SelfAttention.q.lora_A.weight": np.zeros((2, 16), np.float32)},
            str(deeper / "adapter_model.safetensors"))
  with pytest.raises(peft_io.PeftError, match=r"not LoRA factors of this model's linear layers.*block\.7"):
    peft_io.import_peft(deeper, config, fingerprint, name="imp")
  # The CLI: import into an expert directory; into a library only with gates.
  base_dir = tmp_path / "base_ckpt"
  from phatgoose_jax import checkpoints
  checkpoints.save_checkpoint(base_dir, base_params, config)
  assert cli.main(["import-peft", str(tmp_path / "adapter"), "--base", str(base_dir), "--name", "cli_imp",
                   "--output", str(tmp_path / "cli_expert")]) == 0
  assert library.load_expert(tmp_path / "cli_expert").name == "cli_imp"
  assert cli.main(["import-peft", str(tmp_path / "adapter"), "--base", str(base_dir), "--name", "cli_imp",
                   "--library", str(tmp_path / "lib")]) == 1
  assert "has no gate vectors" in capsys.readouterr().err
  assert cli.main(["import-peft", str(tmp_path / "exported"), "--base", str(base_dir), "--name", "gated",
                   "--library", str(tmp_path / "lib")]) == 0
  assert cli.main(["export-peft", str(tmp_path / "lib"), "gated", str(tmp_path / "cli_export"), "--base", str(base_dir)]) == 0
  assert (tmp_path / "cli_export" / "adapter_model.safetensors").is_file()
