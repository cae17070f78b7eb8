"""The adapter site: what sits beside a frozen T5X linear layer (`kernel`).

One site per linear layer of the encoder and decoder (attention query/key/value/out, MLP wi*/wo), chosen
by a regex over its T5X module path. Per `AdapterConfig.mode`:

  none        y = W u
  lora        y = W u + scale * (u A) B                        A: lora_a [d_in, r], B: lora_b [r, d_out]
  gated_lora  y = W u + sigmoid(v . u) * scale * (u A) B       v: gate [d_in]   (PHATGOOSE gate training)
  routed      y = W u + scale * sum_j w_j (u A_j) B_j          lora_a [E, d_in, r], lora_b [E, r, d_out],
                                                               router [E, d_in]; w from the router
scale = alpha / r (the paper: alpha 1, r 16). u is the site's raw input.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Mapping, Sequence

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax import routing

MODES = ("none", "lora", "gated_lora", "routed")
ROUTERS = ("phatgoose", "arrow")
# Every linear layer of the T5X encoder and decoder (not the output layer `logits_dense`).
SITE_CANDIDATES = re.compile(r"(encoder|decoder)/layers_\d+/((attention|self_attention|encoder_decoder_attention)/"
                             r"(query|key|value|out)|mlp/(wi|wi_\d+|wo))")
ADAPTER_PARAMS = ("lora_a", "lora_b", "gate", "router")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """What the adapter sites hold and compute.

  sites: regex (full match) over a site's module path, e.g. 'encoder/layers_0/attention/query';
    '.*' (default) is every linear layer of encoder and decoder, as in the paper.
  num_experts / top_k / router / kernel: routed mode only. kernel is the combine implementation
    ('dense', 'gather', 'grouped', 'blocked', 'looped' or 'auto': routing.choose_kernel per site, shape
    and backend); all compute the same function.
  router: 'phatgoose' (standardized input . router vector / sqrt(d_in); the vectors are standardized
    gates, or standardized mean activations for Average Activation) or 'arrow' (|input . vector| /
    arrow_temperature, the vectors unit singular directions).
  record_routing: sow each site's top-k indices and weights into `intermediates` (teacher-forced passes).
  record_inputs: sow each site's raw input into `intermediates` (for Average Activation).
  """
  mode: str = "none"
  rank: int = 16
  alpha: float = 1.0
  sites: str = ".*"
  lora_init_stddev: float = 0.01
  num_experts: int = 0
  top_k: int = 2
  router: str = "phatgoose"
  kernel: str = "auto"
  arrow_temperature: float = 1.0
  record_routing: bool = False
  record_inputs: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"AdapterConfig.mode={self.mode!r}; choose one of {MODES}")
    try:
      re.compile(self.sites)
    except re.error as e:
      raise ValueError(f"AdapterConfig.sites={self.sites!r} is not a valid regex: {e}") from e
    if self.mode != "none" and self.rank <= 0:
      raise ValueError(f"AdapterConfig.rank must be positive, got {self.rank}")
    if self.mode == "routed":
      if self.num_experts <= 0:
        raise ValueError("routed mode needs AdapterConfig.num_experts >= 1")
      if not 1 <= self.top_k <= self.num_experts:
        raise ValueError(f"top_k={self.top_k} must be between 1 and the number of experts ({self.num_experts})")
      if self.router not in ROUTERS:
        raise ValueError(f"unknown router {self.router!r}; choose one of {ROUTERS}")
      if self.kernel not in routing.KERNELS + ("auto",):
        raise ValueError(f"unknown routing kernel {self.kernel!r}; choose one of {routing.KERNELS} or 'auto'")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def replace(self, **changes) -> "AdapterConfig":
    return dataclasses.replace(self, **changes)

  def applies_to(self, module_path: str) -> bool:
    return self.mode != "none" and is_site(module_path) and _site_regex(self.sites).fullmatch(module_path) is not None


@functools.lru_cache(maxsize=None)
def _site_regex(pattern: str) -> re.Pattern:
  return re.compile(pattern)


def is_site(module_path: str) -> bool:
  return SITE_CANDIDATES.fullmatch(module_path) is not None


# ---------------------------------------------------------------------------------------------
# The computation at one site (called from layers.DenseGeneral, creating parameters in its scope)
# ---------------------------------------------------------------------------------------------

def site_delta(module, u: jax.Array, d_out: int, kernel_axes: Sequence[str], cfg: AdapterConfig) -> jax.Array:
  """The adapter's contribution at one site. u [..., d_in] (raw input, flattened over the contracted
  axes) -> [..., d_out], in u's dtype."""
  from phatgoose_jax.layers import param_with_axes  # local: layers imports this module

  in_axis, out_axis = kernel_axes
  d_in, r, dtype = u.shape[-1], cfg.rank, u.dtype
  if cfg.record_inputs:
    module.sow("intermediates", "site_inputs", u)
  lora_init = jax.nn.initializers.normal(cfg.lora_init_stddev)
  zeros = jax.nn.initializers.zeros
  if cfg.mode in ("lora", "gated_lora"):
    a = param_with_axes("lora_a", lora_init, (d_in, r), jnp.float32, axes=(in_axis, "lora_rank"), module=module)
    b = param_with_axes("lora_b", zeros, (r, d_out), jnp.float32, axes=("lora_rank", out_axis), module=module)
    delta = jnp.dot(jnp.dot(u, a.astype(dtype), preferred_element_type=jnp.float32).astype(dtype),
                    b.astype(dtype), preferred_element_type=jnp.float32) * cfg.scale  # [..., d_out]
    if cfg.mode == "gated_lora":
      gate = param_with_axes("gate", zeros, (d_in,), jnp.float32, axes=(in_axis,), module=module)
      gate_logit = jnp.dot(u.astype(jnp.float32), gate, precision=jax.lax.Precision.HIGHEST)  # [...]
      delta = delta * jax.nn.sigmoid(gate_logit)[..., None]
    return delta.astype(dtype)

  # routed
  e = cfg.num_experts
  a = param_with_axes("lora_a", lora_init, (e, d_in, r), jnp.float32, axes=("expert", in_axis, "lora_rank"),
                      module=module)
  b = param_with_axes("lora_b", zeros, (e, r, d_out), jnp.float32, axes=("expert", "lora_rank", out_axis),
                      module=module)
  router = param_with_axes("router", zeros, (e, d_in), jnp.float32, axes=("expert", in_axis), module=module)
  lead = u.shape[:-1]
  u2 = u.reshape(-1, d_in)  # [T, d_in]
  if cfg.router == "arrow":
    scores = routing.arrow_scores(u2, router, cfg.arrow_temperature)  # [T, E]
  else:
    scores = routing.phatgoose_scores(u2, router)  # [T, E]
  weights, indices = routing.top_k_weights(scores, cfg.top_k)  # [T, k]
  if cfg.record_routing:
    module.sow("intermediates", "routing_indices", indices.reshape(lead + (cfg.top_k,)))
    module.sow("intermediates", "routing_weights", weights.reshape(lead + (cfg.top_k,)))
  return routing.combine(u2, a, b, weights, indices, cfg.scale, kernel=cfg.kernel, out_dtype=dtype).reshape(
      lead + (d_out,))


# ---------------------------------------------------------------------------------------------
# Parameter trees
# ---------------------------------------------------------------------------------------------

def flatten(params) -> dict[str, np.ndarray]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def unflatten(flat: Mapping[str, jax.Array]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def is_adapter_param(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in ADAPTER_PARAMS


def split_params(params) -> tuple[dict, dict]:
  """(base leaves, adapter leaves), each a flat {path: array} dict."""
  flat = flatten(params)
  base = {k: v for k, v in flat.items() if not is_adapter_param(k)}
  return base, {k: v for k, v in flat.items() if is_adapter_param(k)}


def adapter_sites(params) -> list[str]:
  """Module paths of the sites that hold adapter parameters, sorted."""
  return sorted({k.rsplit("/", 1)[0] for k in flatten(params) if is_adapter_param(k)})


def graft_base(initialized, base_params) -> dict:
  """An adapter model's freshly initialized params with every base leaf replaced by `base_params`'s.

  A base (T5X/HF/our) checkpoint thus loads into a LoRA model unchanged; the adapter leaves keep their
  initialization. The base trees must match exactly.
  """
  init_base, init_adapter = split_params(initialized)
  given = flatten(base_params)
  given_base = {k: v for k, v in given.items() if not is_adapter_param(k)}
  missing = sorted(set(init_base) - set(given_base))
  extra = sorted(set(given_base) - set(init_base))
  if missing or extra:
    raise ValueError(f"base parameters do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
  for k, v in init_base.items():
    if tuple(v.shape) != tuple(given_base[k].shape):
      raise ValueError(f"base parameter {k}: given shape {tuple(given_base[k].shape)}, model expects {tuple(v.shape)}")
  return unflatten({**given_base, **init_adapter})
