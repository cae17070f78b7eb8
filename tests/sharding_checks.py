"""Sharded runs on 8 simulated CPU devices, compared with one device. Run by test_sharding.py in a
subprocess (the device count is fixed when JAX starts); prints one JSON object of measurements."""

import json
import os
import sys
import tempfile
import time

# As in conftest.py: tiny models, so skip LLVM's heavy passes and keep compiled programs on disk.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "--xla_backend_optimization_level=0")
                           + " --xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from phatgoose_jax import adapters, checkpoints, evaluation, partitioning, training  # noqa: E402
from phatgoose_jax.adapters import AdapterConfig  # noqa: E402
from phatgoose_jax.config import T5Config  # noqa: E402
from phatgoose_jax.model import EncoderDecoderModel  # noqa: E402
from phatgoose_jax.network import Transformer  # noqa: E402

CONFIG = T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=4, head_dim=4, mlp_dim=24,
                  num_encoder_layers=1, num_decoder_layers=1, mlp_activations=("gelu", "linear"), dropout_rate=0.0)
E, RANK = 4, 2
rng = np.random.default_rng(0)


def init(model, seed=0):
  tokens = jnp.ones((1, 1), jnp.int32)
  return jax.jit(lambda r: model.module.init(r, tokens, tokens, tokens, enable_dropout=False)["params"])(
      jax.random.PRNGKey(seed))


def randomized(params, scale=0.3):
  flat = adapters.flatten(params)
  return adapters.unflatten({k: (rng.normal(size=v.shape).astype(np.float32) * scale
                                 if adapters.is_adapter_param(k) else np.asarray(v)) for k, v in flat.items()})


def batch_of(rows=8):
  enc = rng.integers(3, 60, (rows, 10)).astype(np.int32)
  enc[:, 7:] = 0
  enc[::3, 5:] = 0
  tgt = rng.integers(3, 60, (rows, 6)).astype(np.int32)
  tgt[:, 4:] = 0
  tgt[:, 3] = 1
  dec = np.zeros_like(tgt)
  dec[:, 1:] = tgt[:, :-1]
  return {"encoder_input_tokens": enc, "decoder_target_tokens": tgt, "decoder_input_tokens": dec,
          "decoder_loss_weights": (tgt > 0).astype(np.int32)}


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def routing_of(intermediates):
  flat = adapters.flatten(intermediates)
  return {k: np.asarray(v[0]) for k, v in flat.items() if k.endswith(("routing_indices", "routing_weights"))}


def main():
  start = time.time()
  out = {"devices": jax.device_count()}
  base_params = jax.tree_util.tree_map(np.asarray, init(EncoderDecoderModel(Transformer(CONFIG))))
  # A routed model over E random experts (router vectors = standardized random gates), recording routing.
  routed_cfg = AdapterConfig(mode="routed", rank=RANK, num_experts=E, top_k=2, record_routing=True)
  routed_params = randomized(init(EncoderDecoderModel(Transformer(CONFIG, routed_cfg))))
  batch = batch_of()

  def reference(kernel):
    model = EncoderDecoderModel(Transformer(CONFIG, routed_cfg.replace(kernel=kernel)))
    scores, inter = jax.jit(lambda p, b: model.score_batch(p, b, return_intermediates=True))(routed_params, batch)
    logits = model.jit_logits(routed_params, batch)
    tokens, _ = model.jit_predict(routed_params, batch, max_decode_length=6)
    return model, {"scores": np.asarray(scores), "logits": np.asarray(logits), "tokens": np.asarray(tokens),
                   "routing": routing_of(inter)}

  # The dense kernel on every mesh; every other kernel on the expert-sharded mesh (and blocked, the
  # accelerators' default for many tokens, on a model-sharded one too). The teacher-forced logits are compared where
  # the dense kernel runs (scores, routing and decodes everywhere).
  meshes = {"8x1": dict(num_partitions=1), "4x2": dict(num_partitions=2, expert_axis="model"),
            "2x4": dict(num_partitions=4, expert_axis="model"),
            "data2_expert4": dict(num_partitions=1, num_expert_partitions=4),
            "data2_expert2_model2": dict(num_partitions=2, num_expert_partitions=2)}
  runs = ([(name, "dense") for name in meshes] + [("data2_expert4", kernel) for kernel in ("gather", "grouped", "looped")]
          + [(name, "blocked") for name in ("4x2", "data2_expert4")])
  partitioners = {name: partitioning.Partitioner(**kwargs) for name, kwargs in meshes.items()}
  out["meshes"] = {}
  references = {}
  for name, kernel in runs:
    if kernel not in references:
      references[kernel] = reference(kernel)
    model, ref = references[kernel]
    sharded = partitioning.ShardedModel.of(model, partitioners[name]).with_params(routed_params)
    scores, inter = sharded.score_with_intermediates(batch)
    routing = routing_of(inter)
    tokens, _ = sharded.predict(batch, 6)
    result = {
        "scores": max_diff(scores, ref["scores"]),
        "routing_weights": max(max_diff(routing[k], ref["routing"][k]) for k in routing if k.endswith("weights")),
        "routing_indices_equal": all(np.array_equal(routing[k], ref["routing"][k]) for k in routing
                                     if k.endswith("indices")),
        "tokens_equal": bool(np.array_equal(np.asarray(tokens), ref["tokens"])),
    }
    if kernel == "dense":
      result["logits"] = max_diff(sharded.logits(batch), ref["logits"])
    out["meshes"][f"{name}/{kernel}"] = result
    if kernel == "dense" and name in ("2x4", "data2_expert4"):
      sh = adapters.flatten(sharded.params)
      spec = lambda k: [list(a) if isinstance(a, tuple) else a for a in sh[k].sharding.spec]
      out[f"specs_{name}"] = {k: spec(k) for k in (
          "encoder/layers_0/mlp/wi_0/kernel", "encoder/layers_0/attention/query/lora_a",
          "decoder/layers_0/mlp/wo/lora_b", "decoder/layers_0/self_attention/key/router")}
      a = sh["encoder/layers_0/attention/query/lora_a"]
      out[f"lora_a_shard_shape_{name}"] = list(a.addressable_shards[0].data.shape)
  # The evaluation entry point (what the pipeline runs) with a partitioner: same scores and decodes.
  model, ref = references["dense"]
  method = evaluation.ModelMethod("routed", model, routed_params, partitioner=partitioners["4x2"])
  out["model_method_4x2"] = {"scores": max_diff(method.score(batch, None), ref["scores"]),
                             "tokens_equal": bool(np.array_equal(method.predict(batch, None, 6), ref["tokens"]))}
  print(f"meshes done after {time.time() - start:.0f} s", file=sys.stderr)

  # One expert-training step and one gate-training step: one device vs a 4x2 mesh.
  out["training"] = {}
  for stage in ("expert", "gate"):
    mode, regex = training.STAGES[stage]
    model = EncoderDecoderModel(Transformer(CONFIG.replace(dropout_rate=0.1), AdapterConfig(mode=mode, rank=RANK)))
    params = adapters.graft_base(init(model, 1), base_params)
    if stage == "gate":
      params = adapters.unflatten({k: (np.full(v.shape, 0.1, np.float32) if k.endswith("lora_b") else v)
                                   for k, v in adapters.flatten(params).items()})
    trainable, frozen = training.split_trainable(params, regex)
    tx, schedule = training.make_optimizer(10, learning_rate=1e-2, warmup_ratio=0.0)
    train_batch = {k: np.stack([v[:4], v[4:]]) for k, v in batch_of().items()}  # [accumulation 2, 4, length]
    results = []
    for partitioner in (None, partitioning.Partitioner(num_partitions=2)):
      trainer = training.Trainer(model, tx, schedule, partitioner=partitioner)
      state = trainer.init_state(trainable, seed=0)
      frozen_dev = {k: jnp.asarray(v) for k, v in frozen.items()}
      if partitioner is not None:
        state, frozen_dev = trainer.shard(state, frozen_dev, train_batch["encoder_input_tokens"].shape)
      state, metrics = trainer.train_step(state, frozen_dev, train_batch)
      results.append({k: np.asarray(v) for k, v in state.trainable.items()})
      if partitioner is not None:
        # lora_b of an MLP input is [lora_rank, mlp]: split over 'model'; a gate is [embed]: replicated.
        sample = next(k for k in state.trainable if k.endswith(("mlp/wi_0/lora_b", "mlp/wi_0/gate")))
        out["training"][f"{stage}_sharded_leaf"] = [sample, str(state.trainable[sample].sharding.spec)]
    out["training"][stage] = max(max_diff(results[0][k], results[1][k]) for k in results[0])
    out["training"][f"{stage}_moved"] = max(max_diff(results[0][k], trainable[k]) for k in trainable)

  print(f"training done after {time.time() - start:.0f} s", file=sys.stderr)
  # A checkpoint saved from a 4x2 mesh restores on 2x4 and on one device with identical values.
  lora_cfg = AdapterConfig(mode="lora", rank=RANK)
  model = EncoderDecoderModel(Transformer(CONFIG, lora_cfg))
  p42 = partitioning.Partitioner(num_partitions=2)
  sharded = partitioning.ShardedModel(EncoderDecoderModel(Transformer(CONFIG)), p42, base_params)
  with tempfile.TemporaryDirectory() as tmp:
    path = checkpoints.save_checkpoint(os.path.join(tmp, "ckpt"), sharded.params, CONFIG)
    p24 = partitioning.Partitioner(num_partitions=4)
    target = p24.param_shardings(partitioning.params_axes_of(Transformer(CONFIG)), base_params)
    _, on24 = checkpoints.load_checkpoint(path, shardings=target)
    _, on1 = checkpoints.load_checkpoint(path)
    flat24, flat1, ref = adapters.flatten(on24), adapters.flatten(on1), adapters.flatten(base_params)
    out["checkpoint"] = {
        "equal_2x4": all(np.array_equal(np.asarray(flat24[k]), ref[k]) for k in ref),
        "equal_1": all(np.array_equal(np.asarray(flat1[k]), ref[k]) for k in ref),
        "spec_2x4": str(flat24["decoder/layers_0/mlp/wi_0/kernel"].sharding.spec),
    }
  del model

  # Refusals.
  errors = {}
  try:
    partitioning.Partitioner(num_partitions=2).sharding(("batch", "experts"), (8, 4), "some/param")
  except partitioning.PartitioningError as e:
    errors["unknown_axis"] = str(e)
  try:
    partitioning.Partitioner(num_partitions=2).shard_batch({"encoder_input_tokens": np.ones((6, 4), np.int32)})
  except partitioning.PartitioningError as e:
    errors["batch"] = str(e)
  try:
    odd = CONFIG.replace(mlp_dim=20)
    partitioning.ShardedModel(EncoderDecoderModel(Transformer(odd)), partitioning.Partitioner(num_partitions=8),
                              jax.tree_util.tree_map(np.asarray, init(EncoderDecoderModel(Transformer(odd)))))
  except partitioning.PartitioningError as e:
    errors["param"] = str(e)
  try:
    partitioning.Partitioner(num_partitions=3)
  except partitioning.PartitioningError as e:
    errors["mesh"] = str(e)
  out["errors"] = errors
  json.dump(out, sys.stdout)


if __name__ == "__main__":
  main()
