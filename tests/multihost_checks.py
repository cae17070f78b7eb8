"""One host of a two-process JAX job on CPU (gloo collectives), 2 devices each; run by test_multihost.py.

  python multihost_checks.py PROCESS_ID PORT OUTPUT_DIR

Each host passes its own 4 rows of an 8-row batch; the global array is assembled across hosts, scored on
a (data 2, model 2) mesh over the 4 devices, gathered and compared with a one-process score; a checkpoint
is written by both hosts and restored onto the mesh. Host 0 prints one JSON line.
"""

import json
import os
import sys

pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "float32")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from phatgoose_jax import checkpoints, distributed, partitioning  # noqa: E402
from phatgoose_jax.config import T5Config  # noqa: E402
from phatgoose_jax.model import EncoderDecoderModel  # noqa: E402
from phatgoose_jax.network import Transformer  # noqa: E402

distributed.initialize_distributed(enabled=True, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                   process_id=pid)
cfg = T5Config(vocab_size=64, dtype="float32", emb_dim=16, num_heads=4, head_dim=4, mlp_dim=24, num_encoder_layers=1,
               num_decoder_layers=1, mlp_activations=("gelu", "linear"), dropout_rate=0.0)
model = EncoderDecoderModel(Transformer(cfg))
tokens = jnp.ones((1, 1), jnp.int32)
params = jax.tree_util.tree_map(np.asarray, jax.jit(lambda r: model.module.init(
    r, tokens, tokens, tokens, enable_dropout=False)["params"])(jax.random.PRNGKey(0)))
rng = np.random.default_rng(0)
enc = rng.integers(2, 60, (8, 6)).astype(np.int32); tgt = rng.integers(2, 60, (8, 4)).astype(np.int32)
dec = np.zeros_like(tgt); dec[:, 1:] = tgt[:, :-1]
full = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt, "decoder_input_tokens": dec,
        "decoder_loss_weights": np.ones_like(tgt)}
local = {k: v[pid * 4:(pid + 1) * 4] for k, v in full.items()}  # this host's rows
p = partitioning.Partitioner(num_partitions=2)
sm = partitioning.ShardedModel(model, p, params)
scores = sm.score(local)["sum"]
gathered = multihost_utils.process_allgather(scores, tiled=True)
path = checkpoints.save_checkpoint(os.path.join(out, "ckpt"), sm.params, cfg)
_, back = checkpoints.load_checkpoint(path, shardings=sm.param_shardings)
same = all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(distributed.to_host(back)),
                                                jax.tree_util.tree_leaves(params)))
ref = np.asarray(jax.jit(lambda p_, b: model.score_batch(p_, b))(params, full))
shard = distributed.shard_info()
shards = multihost_utils.process_allgather(np.array([shard.index, shard.num_shards]))
if pid == 0:
  print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                    "max_diff": float(np.abs(np.asarray(gathered) - ref).max()), "checkpoint_equal": same,
                    "files": sorted(os.listdir(path)), "shard_info": np.asarray(shards).tolist()}))
