"""Partitioning over a device mesh, T5X style: logical axis names -> mesh axes -> NamedShardings.

The mesh is ('data', 'model'), or ('data', 'expert', 'model') with a dedicated expert axis. Rules are
T5X's `standard_logical_axis_rules` plus `expert` and `lora_rank`. Every jitted function runs under
`jax.set_mesh(mesh)` and `nn_partitioning.axis_rules(rules)`: the legacy `with mesh:` no longer activates
Flax's logical sharding constraints (they silently become no-ops).

Unlike T5X, a logical axis name without a rule is an error (T5X replicates it silently), and so is a
sharded dimension that the mesh does not divide.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import flax
import gin
import jax
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
Rules = Sequence[tuple[str, Any]]


@gin.configurable
def standard_logical_axis_rules(activation_partitioning_dims: int = 1, parameter_partitioning_dims: int = 1,
                                expert_axis: str | None = None, additional_rules: Rules = ()) -> list[tuple[str, Any]]:
  """T5X's standard rules plus the adapter axes.

  expert_axis: where the stacked experts' leading `expert` dimension goes: None (replicated), 'model'
  (shares the model axis; its rule comes first so that it wins over `joined_kv`/`mlp` on the same
  array) or 'expert' (a dedicated mesh axis; the batch is then split over data x expert).
  `lora_rank` is never sharded (it is 16).
  """
  if activation_partitioning_dims not in (1, 2) or parameter_partitioning_dims not in (1, 2):
    raise ValueError("activation/parameter_partitioning_dims must be 1 or 2")
  batch = ("data", "expert") if expert_axis == "expert" else "data"
  rules: list[tuple[str, Any]] = []
  if expert_axis is not None:
    rules.append(("expert", expert_axis))
  rules += [("batch", batch), ("vocab", "model")]
  if activation_partitioning_dims == 2:
    rules.append(("embed", "model"))
  if parameter_partitioning_dims == 2:
    rules.append(("embed", "data"))
  rules += [("embed", None), ("mlp", "model"), ("heads", "model"), ("kv", None), ("joined_kv", "model"),
            ("relpos_buckets", None), ("abspos_buckets", None), ("length", None), ("layers", None),
            ("stack", None), ("mlp_activations", None), ("lora_rank", None)]
  if expert_axis is None:
    rules.append(("expert", None))
  rules += list(additional_rules)
  return rules


# For users who train under T5X's Adafactor: factorization of the new axes (t5x/contrib/moe convention).
ADAFACTOR_FACTOR_RULES = {"expert": "BATCH", "lora_rank": "NONE"}


class PartitioningError(ValueError):
  pass


@gin.configurable
class Partitioner:
  """A mesh and logical axis rules, and the placement and jit helpers that use them."""

  def __init__(self, num_partitions: int = 1, num_expert_partitions: int = 1, expert_axis: str | None = None,
               logical_axis_rules: Rules | None = None, devices: Sequence[jax.Device] | None = None):
    devices = list(devices if devices is not None else jax.devices())
    per_replica = num_partitions * num_expert_partitions
    if num_partitions < 1 or num_expert_partitions < 1 or len(devices) % per_replica:
      raise PartitioningError(f"{len(devices)} devices cannot be split into model={num_partitions} x "
                              f"expert={num_expert_partitions} partitions")
    data = len(devices) // per_replica
    if num_expert_partitions > 1:
      if expert_axis not in (None, "expert"):
        raise PartitioningError("with num_expert_partitions > 1 the experts go on the 'expert' mesh axis")
      expert_axis = "expert"
      shape, names = (data, num_expert_partitions, num_partitions), ("data", "expert", "model")
    else:
      if expert_axis == "expert":
        raise PartitioningError("expert_axis='expert' needs num_expert_partitions > 1")
      shape, names = (data, num_partitions), ("data", "model")
    self.mesh = Mesh(np.asarray(devices, dtype=object).reshape(shape), names)
    self.rules = list(logical_axis_rules) if logical_axis_rules is not None else standard_logical_axis_rules(
        expert_axis=expert_axis)
    self._known = {name for name, _ in self.rules}

  def __repr__(self) -> str:
    return f"Partitioner(mesh={dict(self.mesh.shape)})"

  @property
  def data_axes(self):
    """The mesh axes the batch dimension is split over."""
    return nn_partitioning.logical_to_mesh_axes(("batch",), self.rules)[0]

  @contextlib.contextmanager
  def context(self):
    with jax.set_mesh(self.mesh), nn_partitioning.axis_rules(self.rules):
      yield

  # -- logical -> physical ------------------------------------------------------------------------
  def _axis_size(self, axis) -> int:
    if axis is None:
      return 1
    axes = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(self.mesh.shape[a] for a in axes)

  def sharding(self, logical_axes: Sequence[str | None], shape: Sequence[int], what: str) -> NamedSharding:
    """The NamedSharding of an array with these logical axes; refuses unknown names and non-dividing meshes."""
    logical_axes = tuple(logical_axes)
    if len(logical_axes) != len(shape):
      raise PartitioningError(f"{what}: {len(logical_axes)} logical axes {logical_axes} for shape {tuple(shape)}")
    unknown = [n for n in logical_axes if n is not None and n not in self._known]
    if unknown:
      raise PartitioningError(f"{what}: logical axis name(s) {unknown} have no partitioning rule (axes "
                              f"{logical_axes}); add a rule, e.g. ('{unknown[0]}', None) to replicate")
    spec = nn_partitioning.logical_to_mesh_axes(logical_axes, self.rules)
    for dim, (size, axis) in enumerate(zip(shape, spec)):
      parts = self._axis_size(axis)
      if size % parts:
        raise PartitioningError(f"{what}: dimension {dim} ('{logical_axes[dim]}', size {size}) is not divisible by "
                                f"mesh axis {axis} of size {parts} (mesh {dict(self.mesh.shape)})")
    return NamedSharding(self.mesh, spec)

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def param_shardings(self, params_axes: PyTree, params: PyTree) -> PyTree:
    """Shardings for a parameter tree from its `params_axes` collection (T5X's `get_mesh_axes`)."""
    axes = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn_partitioning.get_axis_names(params_axes)),
                                           is_leaf=lambda _, x: isinstance(x, PartitionSpec))
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    missing = sorted("/".join(k) for k in set(flat) - set(axes))
    if missing:
      raise PartitioningError(f"parameters without logical axis names: {missing[:5]} (create them with "
                              f"param_with_axes)")
    out = {k: self.sharding(tuple(axes[k]), np.shape(v), "/".join(k)) for k, v in flat.items()}
    return flax.traverse_util.unflatten_dict(out)

  def batch_sharding(self, shape: Sequence[int], batch_dim: int = 0, what: str = "batch") -> NamedSharding:
    logical = [None] * len(shape)
    logical[batch_dim] = "batch"
    return self.sharding(logical, shape, what)

  # -- placement ------------------------------------------------------------------------------------
  def place(self, tree: PyTree, shardings: PyTree) -> PyTree:
    return jax.device_put(tree, shardings)

  def shard_batch(self, batch: Mapping[str, np.ndarray], batch_dim: int = 0,
                  host_local: bool | None = None) -> dict[str, jax.Array]:
    """Global arrays from a batch. With several processes each passes its host-local slice (the rows of
    its seqio shard) and the global array is assembled across hosts."""
    host_local = jax.process_count() > 1 if host_local is None else host_local
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      if host_local:
        global_shape = list(v.shape)
        global_shape[batch_dim] *= jax.process_count()
        sharding = self.batch_sharding(global_shape, batch_dim, f"batch feature {k}")
        out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(global_shape))
      else:
        out[k] = jax.device_put(v, self.batch_sharding(v.shape, batch_dim, f"batch feature {k}"))
    return out

  # -- jit ----------------------------------------------------------------------------------------------
  def jit(self, fn: Callable, in_shardings=None, out_shardings=None, donate_argnums=(), static_argnames=()):
    """`jax.jit` with explicit shardings, called under this mesh and these rules."""
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums,
                     static_argnames=static_argnames)

    @functools.wraps(fn)
    def call(*args, **kwargs):
      with self.context():
        return jitted(*args, **kwargs)
    call.lower = lambda *a, **k: _lower_in(self, jitted, *a, **k)
    return call


def _lower_in(partitioner: Partitioner, jitted, *args, **kwargs):
  with partitioner.context():
    return jitted.lower(*args, **kwargs)


def params_axes_of(module) -> PyTree:
  """The `params_axes` collection of a Transformer, computed without memory."""
  return abstract_variables(module)["params_axes"]


class ShardedModel:
  """Jitted, sharded scoring, teacher-forced logits and greedy decoding for an EncoderDecoderModel.

  `ShardedModel.of(model, partitioner)` compiles once per model and mesh; `with_params(params)` places a
  parameter tree by its logical axes and shares those compiled functions (one per evaluated method).
  """

  _compiled: dict = {}

  def __init__(self, model, partitioner: Partitioner, params: PyTree | None = None):
    self.model = model
    self.partitioner = partitioner
    self._param_shardings = None
    self._jitted: dict = {}
    self.params = None if params is None else self.place(params)

  @classmethod
  def of(cls, model, partitioner: Partitioner) -> "ShardedModel":
    key = (id(model), id(partitioner))
    if key not in cls._compiled:
      cls._compiled[key] = (cls(model, partitioner), model, partitioner)  # keeps the ids alive
    return cls._compiled[key][0]

  def with_params(self, params: PyTree) -> "ShardedModel":
    other = ShardedModel.__new__(ShardedModel)
    other.__dict__.update(self.__dict__)
    other.params = self.place(params)
    return other

  @property
  def param_shardings(self) -> PyTree:
    if self._param_shardings is None:
      shapes = abstract_variables(self.model.module)
      self._param_shardings = self.partitioner.param_shardings(shapes["params_axes"], shapes["params"])
    return self._param_shardings

  def place(self, params: PyTree) -> PyTree:
    return self.partitioner.place(params, self.param_shardings)

  def _call(self, name: str, fn: Callable, batch):
    if name not in self._jitted:
      self._jitted[name] = self.partitioner.jit(fn, in_shardings=(self.param_shardings, None))
    return self._jitted[name](self.params, self.partitioner.shard_batch(batch))

  def score(self, batch):
    """{'sum', 'mean', 'length'} per example, as EncoderDecoderModel.score_batch_detailed."""
    return self._call("score", self.model.score_batch_detailed, batch)

  def logits(self, batch):
    return self._call("logits", lambda params, batch: self.model.compute_logits(params, batch), batch)

  def predict(self, batch, max_decode_length: int):
    """Greedy decoding (the model's decoding defaults); compiled once per max_decode_length."""
    return self._call(f"predict/{max_decode_length}", lambda params, batch: self.model.predict_batch_with_aux(
        params, batch, max_decode_length=max_decode_length), batch)

  def score_with_intermediates(self, batch):
    return self._call("intermediates", lambda params, batch: self.model.score_batch(
        params, batch, return_intermediates=True), batch)


def abstract_variables(module) -> PyTree:
  """Shapes and dtypes of a Transformer's `params` and `params_axes`, computed without memory."""
  import jax.numpy as jnp
  tokens = jnp.ones((1, 1), jnp.int32)
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, tokens, enable_dropout=False))
