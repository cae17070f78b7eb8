"""Hugging Face PEFT LoRA adapters of T5-family models <-> our experts.

PEFT stores, per adapted nn.Linear `<module>` (weight [out, in]):
  base_model.model.<module>.lora_A.weight  [r, in]     base_model.model.<module>.lora_B.weight  [out, r]
and computes W x + (lora_alpha / r) * B A x (lora_alpha / sqrt(r) with use_rslora). Ours, with the
kernel [in, out]: u W + (alpha / rank) * (u A) B, so A = lora_A.T and B = lora_B.T and the scale carries
over. Gates are not part of PEFT's format: an expert exported with gates keeps them in
`phatgoose_gates.safetensors` beside the adapter, which import reads back.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
import numpy as np

from phatgoose_jax import adapters, checkpoints, library
from phatgoose_jax.config import T5Config
from phatgoose_jax.importers import hf
from phatgoose_jax.importers.common import expected_param_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
GATES_FILE = "phatgoose_gates.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_]+)?\.weight")


class PeftError(ValueError):
  pass


def site_modules(config: T5Config) -> dict[str, str]:
  """{our site path: HF module name} for every linear site of a model config."""
  out = {}
  for ours, hf_key, _ in hf.name_map(config):
    if ours.endswith("/kernel") and adapters.is_site(ours[:-len("/kernel")]):
      out[ours[:-len("/kernel")]] = hf_key[:-len(".weight")]
  return out


def _read_weights(adapter_dir: Path) -> dict[str, np.ndarray]:
  safetensors_file, bin_file = (adapter_dir / f for f in WEIGHTS_FILES)
  if safetensors_file.is_file():
    from safetensors.numpy import load_file
    try:
      return {k: np.asarray(v, np.float32) for k, v in load_file(str(safetensors_file)).items()}
    except Exception as e:
      raise PeftError(f"{safetensors_file} is corrupt or truncated: {e}") from e
  if bin_file.is_file():
    try:
      import torch
    except ImportError as e:
      raise PeftError(f"{bin_file} is a PyTorch file: reading it needs torch") from e
    return {k: v.detach().to(torch.float32).numpy() for k, v in torch.load(str(bin_file), map_location="cpu",
                                                                            weights_only=True).items()}
  raise PeftError(f"no adapter weights in {adapter_dir}: expected {' or '.join(WEIGHTS_FILES)}")


def read_adapter_config(adapter_dir: Path) -> dict:
  config_file = adapter_dir / CONFIG_FILE
  if not config_file.is_file():
    raise PeftError(f"{adapter_dir} is not a PEFT adapter directory: {CONFIG_FILE} is missing")
  try:
    config = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise PeftError(f"{config_file} is not valid JSON: {e}") from e
  problems = []
  if config.get("peft_type") != "LORA":
    problems.append(f"peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
  if config.get("use_dora"):
    problems.append("DoRA adapters (use_dora) are not plain LoRA")
  if config.get("bias", "none") != "none":
    problems.append(f"bias={config['bias']!r}: trained biases have no place in a LoRA expert")
  if config.get("rank_pattern") or config.get("alpha_pattern"):
    problems.append("per-module ranks or alphas (rank_pattern / alpha_pattern)")
  if config.get("modules_to_save"):
    problems.append(f"modules_to_save={config['modules_to_save']} (fully fine-tuned modules)")
  if config.get("fan_in_fan_out"):
    problems.append("fan_in_fan_out=True (T5's layers are nn.Linear)")
  if problems:
    raise PeftError(f"{config_file}: cannot import: " + "; ".join(problems))
  return config


def import_peft(adapter_dir: str | Path, base_config: T5Config, base_fingerprint: str, name: str,
                task: str | None = None, rank: int | None = None, alpha: float | None = None,
                pad_rank: bool = False) -> library.Expert:
  """An expert from a PEFT LoRA directory, for the base model with this config and fingerprint.

  rank / alpha: the library's convention to convert to (default: the adapter's own r and lora_alpha).
  A rank above the adapter's is reached by zero-padding A and B only with pad_rank (the function is
  unchanged); a lower one is refused. The adapter's scale is folded into B where alpha/rank differ.
  """
  adapter_dir = Path(adapter_dir)
  config = read_adapter_config(adapter_dir)
  r = int(config["r"])
  peft_scale = float(config.get("lora_alpha", r)) / (math.sqrt(r) if config.get("use_rslora") else r)
  target_rank = r if rank is None else int(rank)
  if target_rank < r:
    raise PeftError(f"{adapter_dir}: rank {r} is above the requested rank {target_rank}; LoRA factors cannot be "
                    f"truncated without changing the expert")
  if target_rank > r and not pad_rank:
    raise PeftError(f"{adapter_dir}: rank {r} differs from the library's rank {target_rank}; pass --pad_rank to "
                    f"zero-pad it (the function is unchanged) or import into a library of rank {r}")
  target_alpha = peft_scale * target_rank if alpha is None else float(alpha)
  b_factor = peft_scale / (target_alpha / target_rank)

  module_of_site = site_modules(base_config)
  modules = {module: site for site, module in module_of_site.items()}
  shapes = expected_param_shapes(base_config)
  factors: dict[str, dict[str, np.ndarray]] = {}
  unknown = []
  for key, value in _read_weights(adapter_dir).items():
    match = _LORA_KEY.fullmatch(key)
    if not match or match["module"] not in modules:
      unknown.append(key)
      continue
    factors.setdefault(modules[match["module"]], {})[match["which"]] = value
  if unknown:
    raise PeftError(f"{adapter_dir}: {len(unknown)} tensor(s) are not LoRA factors of this model's linear layers, "
                    f"e.g. {unknown[:3]} (is the base model a T5.1.1 with {base_config.num_encoder_layers} encoder "
                    f"layers?)")
  if not factors:
    raise PeftError(f"{adapter_dir}: no LoRA factors found")
  tensors = {}
  for site, pair in sorted(factors.items()):
    if set(pair) != {"A", "B"}:
      raise PeftError(f"{adapter_dir}: {site} has lora_{''.join(pair)} but not both factors")
    d_in, d_out = shapes[f"{site}/kernel"]
    a, b = pair["A"].T, pair["B"].T * np.float32(b_factor)  # [d_in, r], [r, d_out]
    if a.shape != (d_in, r) or b.shape != (r, d_out):
      raise PeftError(f"{adapter_dir}: {module_of_site[site]} has lora_A {pair['A'].shape} and lora_B "
                      f"{pair['B'].shape}; this base model needs [{r}, {d_in}] and [{d_out}, {r}]")
    pad = target_rank - r
    tensors[f"{site}/lora_a"] = np.pad(a, ((0, 0), (0, pad))).astype(np.float32)
    tensors[f"{site}/lora_b"] = np.pad(b, ((0, pad), (0, 0))).astype(np.float32)
  gates_file = adapter_dir / GATES_FILE
  if gates_file.is_file():
    from safetensors.numpy import load_file
    for site, gate in load_file(str(gates_file)).items():
      if site not in factors:
        raise PeftError(f"{gates_file}: a gate for {site}, which has no LoRA factors")
      tensors[f"{site}/gate"] = np.asarray(gate, np.float32)
  expert = library.Expert(name=name, task=task or config.get("base_model_name_or_path") or "peft",
                          base_model=base_fingerprint, rank=target_rank, alpha=target_alpha, sites=sorted(factors),
                          tensors=tensors, model_config=base_config.to_dict(),
                          extra={"imported_from": str(adapter_dir.absolute()), "peft_r": r,
                                 "peft_lora_alpha": config.get("lora_alpha"), "peft_use_rslora": bool(config.get("use_rslora"))})
  try:
    expert.check()
  except library.LibraryError as e:
    raise PeftError(f"{adapter_dir}: {e}") from e
  return expert


def export_peft(expert: library.Expert, base_config: T5Config, output_dir: str | Path,
                base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
  """Writes the expert as a PEFT LoRA directory (and its gates, if any, in GATES_FILE)."""
  from safetensors.numpy import save_file

  expert.check()
  modules = site_modules(base_config)
  missing = [s for s in expert.sites if s not in modules]
  if missing:
    raise PeftError(f"expert {expert.name!r}: sites {missing[:3]} are not linear layers of this base model")
  names = {modules[s] for s in expert.sites}
  short = sorted({m.rsplit(".", 1)[-1] for m in names})
  every = {m for m in modules.values() if m.rsplit(".", 1)[-1] in short}
  # PEFT's list form adapts every module with these names; a subset of them needs its regex form.
  target_modules = short if names == every else "|".join(re.escape(m) for m in sorted(names))
  config = {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": expert.rank, "lora_alpha": expert.alpha,
            "target_modules": target_modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path, "init_lora_weights": True}
  weights, gates = {}, {}
  for site in expert.sites:
    module = PREFIX + modules[site]
    weights[f"{module}.lora_A.weight"] = np.ascontiguousarray(expert.tensors[f"{site}/lora_a"].T, np.float32)
    weights[f"{module}.lora_B.weight"] = np.ascontiguousarray(expert.tensors[f"{site}/lora_b"].T, np.float32)
    if f"{site}/gate" in expert.tensors:
      gates[site] = np.ascontiguousarray(expert.tensors[f"{site}/gate"], np.float32)
  with checkpoints.atomic_directory(output_dir, overwrite) as tmp:
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(weights, str(tmp / WEIGHTS_FILES[0]), metadata={"format": "pt"})
    if gates:
      save_file(gates, str(tmp / GATES_FILE))
  return Path(output_dir)
