"""LoRA, gated LoRA and routed sites in the network: parameters, equivalences, decoding, routing record."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import partitioning as nn_partitioning

from phatgoose_jax import adapters, library
from phatgoose_jax.adapters import AdapterConfig
from phatgoose_jax.model import EncoderDecoderModel
from phatgoose_jax.network import Transformer
from helpers import assert_decoding_matches_teacher_forcing

RANK = 4


def init_params(model, seed=0, shapes_only=False):
  tokens = jnp.ones((1, 1), jnp.int32)
  init = lambda: model.module.init(jax.random.PRNGKey(seed), tokens, tokens, tokens, enable_dropout=False)
  return jax.eval_shape(init) if shapes_only else jax.jit(init)()


def random_expert(name, seed, config, base_params, sites=".*", rank=RANK):
  """An expert with random (non-zero) LoRA factors and gates, on the given base."""
  model = EncoderDecoderModel(Transformer(config, AdapterConfig(mode="gated_lora", rank=rank, sites=sites)))
  rng = np.random.default_rng(seed)
  shapes = adapters.flatten(init_params(model, shapes_only=True)["params"])
  flat = {**adapters.flatten(base_params),
          **{k: rng.normal(size=v.shape).astype(np.float32) * (1.0 if k.endswith("/gate") else 0.3)
             for k, v in shapes.items() if adapters.is_adapter_param(k)}}
  return library.expert_from_params(adapters.unflatten(flat), name=name, task=f"task_{name}",
                                    base_fingerprint=library.base_model_fingerprint(base_params),
                                    adapter_config=AdapterConfig(mode="gated_lora", rank=rank), model_config=config)


@pytest.fixture(scope="module")
def experts(tiny_model):
  model, params = tiny_model
  return [random_expert(n, i + 1, model.module.config, params) for i, n in enumerate(["alpha", "beta", "gamma"])]


def test_lora_parameters_axes_and_site_selection(tiny_model):
  model, _ = tiny_model
  cfg = model.module.config
  variables = init_params(EncoderDecoderModel(Transformer(cfg, AdapterConfig(mode="lora", rank=RANK))))
  flat = adapters.flatten(variables["params"])
  axes = flax.traverse_util.flatten_dict(nn_partitioning.get_axis_names(variables["params_axes"]), sep="/",
                                         is_leaf=lambda _, x: isinstance(x, jax.sharding.PartitionSpec))
  sites = adapters.adapter_sites(variables["params"])
  assert len(sites) == 7 * cfg.num_encoder_layers + 11 * cfg.num_decoder_layers  # every linear layer
  assert flat["encoder/layers_0/attention/out/lora_a"].shape == (16, RANK)  # d_in = heads * head_dim
  assert tuple(axes["encoder/layers_0/attention/out/lora_a"]) == ("joined_kv", "lora_rank")
  assert tuple(axes["decoder/layers_1/mlp/wo/lora_b"]) == ("lora_rank", "embed")
  assert tuple(axes["decoder/layers_1/mlp/wo/lora_a"]) == ("mlp", "lora_rank")
  assert not np.any(flat["decoder/layers_1/mlp/wo/lora_b"])  # B starts at zero
  assert abs(float(np.std(flat["decoder/layers_1/mlp/wo/lora_a"])) - 0.01) < 0.003  # A ~ N(0, 0.01^2)
  assert "decoder/logits_dense/lora_a" not in flat
  enc_only = init_params(EncoderDecoderModel(Transformer(cfg, AdapterConfig(mode="lora", rank=RANK,
                                                                            sites=r"encoder/.*/mlp/.*"))),
                         shapes_only=True)
  assert adapters.adapter_sites(enc_only["params"]) == sorted(
      f"encoder/layers_{i}/mlp/{m}" for i in range(2) for m in ("wi_0", "wi_1", "wo"))


def test_base_checkpoint_loads_into_lora_model_unchanged(tiny_model, padded_batch):
  model, params = tiny_model
  lora = EncoderDecoderModel(Transformer(model.module.config, AdapterConfig(mode="lora", rank=RANK)))
  grafted = adapters.graft_base(init_params(lora)["params"], params)
  base_part, _ = adapters.split_params(grafted)
  for k, v in adapters.flatten(params).items():
    np.testing.assert_array_equal(base_part[k], v)
  # Zero B: the LoRA model computes exactly the base model.
  np.testing.assert_allclose(lora.jit_logits(grafted, padded_batch), model.jit_logits(params, padded_batch), atol=1e-6)
  with pytest.raises(ValueError, match="base parameter encoder/layers_0/mlp/wo/kernel: given shape"):
    broken = adapters.flatten(params)
    broken["encoder/layers_0/mlp/wo/kernel"] = np.zeros((3, 3))
    adapters.graft_base(grafted, adapters.unflatten(broken))


def _lora_params_of(expert, base_params, gates=False):
  keep = ("lora_a", "lora_b", "gate") if gates else ("lora_a", "lora_b")
  return adapters.unflatten({**adapters.flatten(base_params),
                             **{k: v for k, v in expert.tensors.items() if k.rsplit("/", 1)[-1] in keep}})


def test_zero_gate_halves_the_lora_update(tiny_model, experts, padded_batch):
  model, params = tiny_model
  cfg = model.module.config
  e = experts[0]
  gated = EncoderDecoderModel(Transformer(cfg, AdapterConfig(mode="gated_lora", rank=RANK)))
  zero_gates = {k: (np.zeros_like(v) if k.endswith("/gate") else v) for k, v in e.tensors.items()}
  gated_params = _lora_params_of(library.Expert(**{**e.__dict__, "tensors": zero_gates}), params, gates=True)
  lora = EncoderDecoderModel(Transformer(cfg, AdapterConfig(mode="lora", rank=RANK)))
  halved = {k: (v / 2 if k.endswith("lora_b") else v) for k, v in e.tensors.items()}
  np.testing.assert_allclose(gated.jit_logits(gated_params, padded_batch),
                             lora.jit_logits(_lora_params_of(library.Expert(**{**e.__dict__, "tensors": halved}), params),
                                             padded_batch), atol=1e-5)


@pytest.mark.parametrize("kernel", ["dense", "gather", "grouped"])
def test_one_routed_expert_equals_its_lora_model(tiny_model, experts, padded_batch, kernel):
  model, params = tiny_model
  cfg = model.module.config
  lora = EncoderDecoderModel(Transformer(cfg, AdapterConfig(mode="lora", rank=RANK)))
  expected = lora.jit_logits(_lora_params_of(experts[1], params), padded_batch)
  routed, routed_params = library.routed_model(cfg, params, library.stack_experts([experts[1]]), top_k=1, kernel=kernel)
  # Equal up to the renormalization eps: the single weight is 1 / (1 + 1e-6).
  np.testing.assert_allclose(routed.jit_logits(routed_params, padded_batch), expected, atol=1e-5, rtol=1e-5)
  assert not np.allclose(expected, model.jit_logits(params, padded_batch), atol=1e-3)  # the expert matters


def test_routed_with_zero_b_equals_base(tiny_model, experts, padded_batch):
  model, params = tiny_model
  zeroed = [library.Expert(**{**e.__dict__, "tensors": {k: (np.zeros_like(v) if k.endswith("lora_b") else v)
                                                         for k, v in e.tensors.items()}}) for e in experts]
  routed, routed_params = library.routed_model(model.module.config, params, library.stack_experts(zeroed), top_k=2)
  np.testing.assert_allclose(routed.jit_logits(routed_params, padded_batch), model.jit_logits(params, padded_batch),
                             atol=1e-6)


def test_routed_model_kernels_agree_and_decode_matches_teacher_forcing(tiny_model, experts, padded_batch):
  model, params = tiny_model
  stacked = library.stack_experts(experts)
  outs = {}
  for kernel in ("dense", "gather", "grouped"):
    routed, routed_params = library.routed_model(model.module.config, params, stacked, top_k=2, kernel=kernel)
    outs[kernel] = np.asarray(routed.jit_logits(routed_params, padded_batch))
  np.testing.assert_allclose(outs["gather"], outs["dense"], atol=1e-5)
  np.testing.assert_allclose(outs["grouped"], outs["dense"], atol=1e-5)

  # Incremental decoding (self-attention sites per position, cross-attention k/v routed once) equals
  # the teacher-forced pass.
  assert_decoding_matches_teacher_forcing(routed, routed_params, padded_batch, outs["grouped"])


def test_routing_record(tiny_model, experts, padded_batch):
  model, params = tiny_model
  stacked = library.stack_experts(experts)
  recording, rec_params = library.routed_model(model.module.config, params, stacked, top_k=2, record_routing=True)
  plain, _ = library.routed_model(model.module.config, params, stacked, top_k=2)
  scores, intermediates = jax.jit(lambda p, b: recording.score_batch(p, b, return_intermediates=True))(
      rec_params, padded_batch)
  np.testing.assert_allclose(scores, plain.jit_score(rec_params, padded_batch)["sum"], atol=1e-6)
  site = intermediates["encoder"]["layers_1"]["mlp"]["wo"]
  indices, weights = site["routing_indices"][0], site["routing_weights"][0]
  assert indices.shape == padded_batch["encoder_input_tokens"].shape + (2,)
  assert np.all((indices >= 0) & (indices < 3)) and np.all(indices[..., 0] != indices[..., 1])
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-5)
  cross = intermediates["decoder"]["layers_0"]["encoder_decoder_attention"]["key"]["routing_indices"][0]
  assert cross.shape == padded_batch["encoder_input_tokens"].shape + (2,)  # routed over encoder tokens
  with pytest.raises(ValueError, match="top_k=4 must be between 1 and the number of experts"):
    library.routed_model(model.module.config, params, stacked, top_k=4)
