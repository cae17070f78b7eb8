"""Routing math and the routed-LoRA combine kernels, as pure functions.

Notation: T tokens (any leading dims flattened), E experts, k chosen per token, r LoRA rank.
Router math is float32 throughout. Every combine kernel computes the same function,

    y[t] = scale * sum_j w[t, j] * (u[t] @ A[idx[t, j]]) @ B[idx[t, j]],

and differs only in how the work is laid out (see `combine`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

STANDARDIZE_EPS = 1e-5   # torch.nn.LayerNorm's default, used by the original code for inputs and gates
RENORMALIZE_EPS = 1e-6   # added to the sum of the kept top-k probabilities
KERNELS = ("dense", "gather", "grouped", "blocked", "looped")


# ---------------------------------------------------------------------------------------------
# Routers
# ---------------------------------------------------------------------------------------------

def standardize(x: Array, eps: float = STANDARDIZE_EPS) -> Array:
  """Mean 0, std 1 over the last axis (biased variance, no affine): LayerNorm without parameters."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * lax.rsqrt(var + eps)


def phatgoose_scores(u: Array, standardized_gates: Array) -> Array:
  """u [T, d_in] (raw site input), standardized_gates [E, d_in] -> scores [T, E].

  scores = standardize(u) . g_hat / sqrt(d_in). The gates are standardized once, when the library is
  loaded; the input is standardized here, per token.

  Computed without materializing standardize(u): with mu, sigma the token's mean and std,
  standardize(u) . g = (u . g - mu * sum(g)) / sigma, so the router is one float32 matmul on the raw
  input plus two per-token reductions (exact for any g; sum(g) is 0 for standardized gates).
  """
  d_in = u.shape[-1]
  u = u.astype(jnp.float32)
  gates = standardized_gates.astype(jnp.float32)
  mean = jnp.mean(u, axis=-1, keepdims=True)  # [T, 1]
  var = jnp.mean(jnp.square(u - mean), axis=-1, keepdims=True)  # [T, 1] (XLA fuses it: nothing written)
  dots = jnp.einsum("td,ed->te", u, gates, precision=lax.Precision.HIGHEST)  # [T, E]
  centered = dots - mean * jnp.sum(gates, axis=-1)  # [T, E]
  return centered * (lax.rsqrt(var + STANDARDIZE_EPS) / jnp.sqrt(jnp.float32(d_in)))


def arrow_scores(u: Array, directions: Array, temperature: float = 1.0) -> Array:
  """Arrow: |u . v_e| / temperature with v_e each expert's unit top singular direction (sign-free).
  u [T, d_in], directions [E, d_in] -> [T, E]."""
  dots = jnp.einsum("td,ed->te", u.astype(jnp.float32), directions.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST)
  return jnp.abs(dots) / temperature


def top_k_weights(scores: Array, k: int, eps: float = RENORMALIZE_EPS) -> tuple[Array, Array]:
  """Softmax over all E, keep the k largest, renormalize. scores [T, E] -> (weights [T, k], indices [T, k]).

  Ties go to the lower expert index (lax.top_k's order).
  """
  num_experts = scores.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f"top-k routing needs 1 <= k <= number of experts; got k={k} with {num_experts} experts")
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  top_probs, indices = lax.top_k(probs, k)
  return top_probs / (jnp.sum(top_probs, axis=-1, keepdims=True) + eps), indices


# ---------------------------------------------------------------------------------------------
# Combine kernels: u [T, d_in], A [E, d_in, r], B [E, r, d_out], weights/indices [T, k] -> [T, d_out]
# ---------------------------------------------------------------------------------------------

def _lora_dtype(u: Array, a: Array) -> jnp.dtype:
  return jnp.result_type(u.dtype, a.dtype)


def combine_dense(u: Array, a: Array, b: Array, weights: Array, indices: Array) -> Array:
  """Reference: every expert's down-projection, a masked weighting, one up-projection over E*r.

  Costs T*E*r*(d_in + d_out); exact and partition-friendly (one-hot combine, no gathers).
  """
  num_experts, _, rank = a.shape
  h = jnp.einsum("td,edr->ter", u, a, preferred_element_type=jnp.float32)  # [T, E, r]
  combine = jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)  # [T, E]
  h = (h * combine[..., None]).astype(b.dtype).reshape(h.shape[0], num_experts * rank)  # [T, E*r]
  return jnp.dot(h, b.reshape(num_experts * rank, -1), preferred_element_type=jnp.float32)  # [T, d_out]


def combine_gather(u: Array, a: Array, b: Array, weights: Array, indices: Array) -> Array:
  """Per token, gather the k chosen experts' A and B. Weight traffic T*k*r*(d_in + d_out): for few tokens."""
  a_k = a[indices]  # [T, k, d_in, r]
  b_k = b[indices]  # [T, k, r, d_out]
  h = jnp.einsum("td,tkdr->tkr", u, a_k, preferred_element_type=jnp.float32)
  h = (h * weights[..., None]).astype(b.dtype)
  return jnp.einsum("tkr,tkrf->tf", h, b_k, preferred_element_type=jnp.float32)


def combine_grouped(u: Array, a: Array, b: Array, weights: Array, indices: Array) -> Array:
  """Sort the T*k (token, expert) pairs by expert and run two grouped matmuls (`lax.ragged_dot`).

  Exact FLOPs (T*k*r*(d_in + d_out)) and each expert's weights read once; pays a sort and a gather.
  """
  num_tokens, k = indices.shape
  num_experts = a.shape[0]
  flat_experts = indices.reshape(-1)  # [T*k]
  order = jnp.argsort(flat_experts, stable=True)  # pair positions sorted by expert
  token_of_pair = order // k
  x_sorted = u[token_of_pair]  # [T*k, d_in]
  group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)  # [E]
  h = lax.ragged_dot(x_sorted, a, group_sizes, preferred_element_type=jnp.float32)  # [T*k, r]
  h = (h * weights.reshape(-1)[order][:, None]).astype(b.dtype)
  y_sorted = lax.ragged_dot(h, b, group_sizes, preferred_element_type=jnp.float32)  # [T*k, d_out]
  # Scatter-add back to tokens (each pair lands on its own token).
  return jnp.zeros((num_tokens, y_sorted.shape[-1]), jnp.float32).at[token_of_pair].add(y_sorted)


def blocked_layout_block_size(num_pairs: int, num_experts: int) -> int:
  """Rows per block of the blocked kernel: about the mean rows per expert, a power of two in [8, 128]
  (smaller blocks waste less padding, larger ones make better matmuls)."""
  mean_rows = max(1, num_pairs // num_experts)
  return int(min(128, max(8, 1 << (mean_rows.bit_length() - 1))))


class BlockLayout(NamedTuple):
  """The T*k (token, expert) pairs sorted by expert, each expert's group padded to whole blocks.

  Row r of the layout holds pair (token_of_row[r], its expert) with weight_of_row[r]; padding rows hold
  the out-of-range token `num_tokens` (read as zeros, written nowhere) with weight 0. Block n belongs to expert_of_block[n]; only the first
  used_blocks blocks hold pairs (the rest of the static bound num_pairs // block + E is padding).
  """
  block: int
  token_of_row: Array     # [rows] int32
  weight_of_row: Array    # [rows] float32
  expert_of_block: Array  # [blocks] int32
  row_of_pair: Array      # [T*k] int32: where pair (t, j) = t*k + j sits in the layout
  used_blocks: Array      # [] int32


def block_layout(weights: Array, indices: Array, num_experts: int, block: int) -> BlockLayout:
  """weights/indices [T, k] -> the blocked layout (sum_e ceil(count_e / block) <= T*k // block + E blocks)."""
  num_tokens, k = indices.shape
  num_pairs = num_tokens * k
  num_blocks = num_pairs // block + num_experts
  num_rows = num_blocks * block
  flat_experts = indices.reshape(-1)  # [P]
  counts = jnp.bincount(flat_experts, length=num_experts)  # [E]
  padded_counts = (counts + block - 1) // block * block  # [E]
  padded_ends = jnp.cumsum(padded_counts)  # [E]
  group_starts = jnp.cumsum(counts) - counts  # [E]
  order = jnp.argsort(flat_experts, stable=True)  # [P] pairs sorted by expert
  sorted_experts = flat_experts[order]
  row_of_sorted = (padded_ends - padded_counts)[sorted_experts] + jnp.arange(num_pairs) - group_starts[sorted_experts]
  row_of_sorted = row_of_sorted.astype(jnp.int32)  # [P] each sorted pair's row in the layout
  token_of_row = jnp.full((num_rows,), num_tokens, jnp.int32).at[row_of_sorted].set(
      (order // k).astype(jnp.int32), unique_indices=True)  # [rows]
  weight_of_row = jnp.zeros((num_rows,), jnp.float32).at[row_of_sorted].set(
      weights.reshape(-1)[order], unique_indices=True)  # [rows]
  expert_of_block = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(num_blocks) * block, side="right"),
                                num_experts - 1).astype(jnp.int32)  # [blocks]; trailing blocks are all padding
  row_of_pair = jnp.zeros((num_pairs,), jnp.int32).at[order].set(row_of_sorted, unique_indices=True)  # [P]
  used_blocks = (padded_ends[-1] // block).astype(jnp.int32)
  return BlockLayout(block, token_of_row, weight_of_row, expert_of_block, row_of_pair, used_blocks)


def combine_blocked(u: Array, a: Array, b: Array, weights: Array, indices: Array, block: int | None = None) -> Array:
  """Megablocks-style: pairs in the blocked layout (`block_layout`), then two batched matmuls over blocks,
  each block against its own expert's A and B.

  FLOPs (T*k + E*block)*r*(d_in + d_out) at most (the static bound on padded rows); moves u's rows once
  to the blocked layout and gathers the k outputs back per token. Pure JAX, no scatter-add.
  """
  num_tokens, k = indices.shape
  num_experts, d_in, _ = a.shape
  layout = block_layout(weights, indices, num_experts, block or blocked_layout_block_size(num_tokens * k, num_experts))
  num_blocks, block = layout.expert_of_block.shape[0], layout.block
  x = u.at[layout.token_of_row].get(mode="fill", fill_value=0).reshape(num_blocks, block, d_in)  # [blocks, block, d_in]
  experts = layout.expert_of_block
  h = jnp.einsum("nmd,ndr->nmr", x, a[experts], preferred_element_type=jnp.float32)  # [blocks, block, r]
  h = (h * layout.weight_of_row.reshape(num_blocks, block, 1)).astype(b.dtype)
  y = jnp.einsum("nmr,nrf->nmf", h, b[experts], preferred_element_type=jnp.float32)  # [blocks, block, d_out]
  return jnp.sum(y.reshape(num_blocks * block, -1)[layout.row_of_pair].reshape(num_tokens, k, -1), axis=1)  # [T, d_out]


def looped_block_size(num_pairs: int, num_experts: int) -> int:
  """Rows per block of the looped kernel: the mean rows per expert rounded up to a power of two, within
  [4, 32]. Measured per site on CPU (T from 8 to 2048, E 36 and 166): blocks near the mean group size
  waste the least padding, and past 32 rows the per-block matmuls gain nothing."""
  mean_rows = -(-num_pairs // num_experts)
  return int(min(32, max(4, 1 << (mean_rows - 1).bit_length())))


def _looped_forward(u: Array, a: Array, b: Array, weights: Array, indices: Array) -> Array:
  num_tokens = indices.shape[0]
  num_experts = a.shape[0]
  layout = block_layout(weights, indices, num_experts, looped_block_size(indices.size, num_experts))
  block = layout.block

  def one_block(n, y):  # y [T, d_out] float32
    tokens = lax.dynamic_slice_in_dim(layout.token_of_row, n * block, block)  # [block]; padding rows hold T
    row_weights = lax.dynamic_slice_in_dim(layout.weight_of_row, n * block, block)  # [block]
    expert = layout.expert_of_block[n]
    x = u.at[tokens].get(mode="fill", fill_value=0)  # [block, d_in]; padding rows read zeros
    h = (jnp.dot(x, a[expert], preferred_element_type=jnp.float32) * row_weights[:, None]).astype(b.dtype)  # [block, r]
    return y.at[tokens].add(jnp.dot(h, b[expert], preferred_element_type=jnp.float32), mode="drop")  # padding dropped

  return lax.fori_loop(0, layout.used_blocks, one_block, jnp.zeros((num_tokens, b.shape[-1]), jnp.float32))  # [T, d_out]


@jax.custom_vjp
def combine_looped(u: Array, a: Array, b: Array, weights: Array, indices: Array) -> Array:
  """The blocked layout walked one block at a time: each block's rows are gathered, multiplied through
  its expert's A and B, and scatter-added into the output inside one loop, so no [rows, d] array is
  ever written and only the used blocks run. Built for CPUs, where it beats the batched matmuls of
  `blocked` (docs/performance.md); on accelerators a sequential loop of small matmuls is the wrong shape.

  The loop's trip count is data-dependent (a while loop, which reverse-mode autodiff cannot walk), so
  gradients come from `combine_blocked`, which computes the same function.
  """
  return _looped_forward(u, a, b, weights, indices)


def _looped_fwd(u, a, b, weights, indices):
  return _looped_forward(u, a, b, weights, indices), (u, a, b, weights, indices)


def _looped_bwd(residuals, cotangent):
  u, a, b, weights, indices = residuals
  _, vjp = jax.vjp(lambda u, a, b, w: combine_blocked(u, a, b, w, indices), u, a, b, weights)
  return (*vjp(cotangent), None)


combine_looped.defvjp(_looped_fwd, _looped_bwd)


_COMBINE = {"dense": combine_dense, "gather": combine_gather, "grouped": combine_grouped, "blocked": combine_blocked,
            "looped": combine_looped}


def choose_kernel(num_tokens: int, num_experts: int, k: int, rank: int, d_in: int, d_out: int,
                  backend: str | None = None) -> str:
  """The automatic choice, from static shapes and the backend (default: JAX's default backend).

  CPU (measured, docs/performance.md): dense while E*r <= 256 (E/k times the LoRA FLOPs, but two large
  matmuls and no data movement), looped otherwise: from 8 to 2,048 tokens it matched or beat gather and
  dense per site, and beat blocked's batched matmuls at every size.
  Accelerators (not yet measured: the rule the CPU sweep gave before looped existed): gather when there
  are fewer (token, expert) pairs than experts (reads the chosen experts' weights per token), dense
  while E*r <= 256 or T <= 128, blocked otherwise. A sequential loop of small matmuls is the wrong shape
  for an accelerator. grouped (lax.ragged_dot) is never chosen: XLA:CPU expands it densely; it is kept
  for accelerators with a native grouped matmul.
  """
  del d_in, d_out
  if num_experts <= k:
    return "dense"
  if (backend or jax.default_backend()) == "cpu":
    return "dense" if num_experts * rank <= 256 else "looped"
  if num_tokens * k <= num_experts:
    return "gather"
  if num_experts * rank <= 256 or num_tokens <= 128:
    return "dense"
  return "blocked"


def combine(u: Array, a: Array, b: Array, weights: Array, indices: Array, scale: float,
            kernel: str = "auto", out_dtype=None) -> Array:
  """The routed LoRA delta: u [..., d_in] -> [..., d_out] (leading dims flattened internally)."""
  lead = u.shape[:-1]
  u2 = u.reshape(-1, u.shape[-1])
  w2 = weights.reshape(-1, weights.shape[-1])
  i2 = indices.reshape(-1, indices.shape[-1])
  num_experts, d_in, rank = a.shape
  if b.shape[:2] != (num_experts, rank) or d_in != u.shape[-1]:
    raise ValueError(f"expert shapes do not fit: input d_in={u.shape[-1]}, lora_a {a.shape}, lora_b {b.shape}")
  if kernel == "auto":
    kernel = choose_kernel(u2.shape[0], num_experts, i2.shape[-1], rank, d_in, b.shape[-1])
  if kernel not in _COMBINE:
    raise ValueError(f"unknown routing kernel {kernel!r}; choose one of {KERNELS} or 'auto'")
  dtype = _lora_dtype(u, a)
  y = _COMBINE[kernel](u2.astype(dtype), a.astype(dtype), b.astype(dtype), w2.astype(jnp.float32), i2)
  y = y * scale
  return y.reshape(lead + (b.shape[-1],)).astype(out_dtype or dtype)
