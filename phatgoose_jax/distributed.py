"""Multi-host setup: opt-in `jax.distributed.initialize` and each host's share of the input."""

from __future__ import annotations

import gin
import jax


@gin.configurable
def initialize_distributed(enabled: bool = False, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> None:
  """Joins this process to a multi-host JAX job. On TPU pods and SLURM/Kubernetes GPU clusters JAX finds
  the coordinator itself (leave the arguments None); elsewhere give all three. Off by default."""
  if not enabled:
    return
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def shard_info():
  """seqio's ShardInfo for this host (None on one host): each host reads a disjoint slice of the data."""
  if jax.process_count() == 1:
    return None
  import seqio
  return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def is_leader() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every host reaches this point (a no-op on one host)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def to_host(tree):
  """numpy copies of a tree of (possibly sharded) arrays; with several hosts each gets the whole arrays."""
  import numpy as np
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree_util.tree_map(np.asarray, tree)
