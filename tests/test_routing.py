"""The routing formula against a numpy transcription of the paper, and the combine kernels against each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from phatgoose_jax import routing


def numpy_phatgoose_router(u, gates, k):
  """phatgoose_method.md §3, step by step: LayerNorm-standardize token and gates (eps 1e-5, biased
  variance, no affine), score = u_hat . g_hat / sqrt(d), softmax over all experts, top-k (ties to the lower
  index), renormalize with eps 1e-6."""
  u = u.astype(np.float64)
  g = gates.astype(np.float64)
  u_hat = (u - u.mean(-1, keepdims=True)) / np.sqrt(u.var(-1, keepdims=True) + 1e-5)
  g_hat = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)
  scores = u_hat @ g_hat.T / np.sqrt(u.shape[-1])
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  idx = np.argsort(-p, axis=-1, kind="stable")[:, :k]
  top = np.take_along_axis(p, idx, -1)
  return top / (top.sum(-1, keepdims=True) + 1e-6), idx


@jax.jit
def _jax_router(u, gates):
  return routing.top_k_weights(routing.phatgoose_scores(u, routing.standardize(gates)), 2)


@pytest.mark.parametrize("d_in", [2048, 5120])
def test_router_equals_numpy_reference(d_in):
  rng = np.random.default_rng(d_in)
  u = (rng.normal(size=(37, d_in)) * 3 + 1).astype(np.float32)
  gates = rng.normal(size=(12, d_in)).astype(np.float32) * rng.uniform(0.01, 5, size=(12, 1)).astype(np.float32)
  gates[5] = gates[2] * 7 + 3  # same standardized gate as expert 2: an exact tie
  weights, indices = _jax_router(u, gates)
  ref_w, ref_i = numpy_phatgoose_router(u, gates, 2)
  np.testing.assert_allclose(weights, ref_w, atol=2e-5)
  # Where the two picks are not (near-)tied, indices must agree exactly; tied pairs {2, 5} in either order.
  np.testing.assert_array_equal(np.sort(indices, -1), np.sort(ref_i, -1))
  tie_rows = np.all(np.isin(ref_i, [2, 5]), axis=-1)
  np.testing.assert_array_equal(indices[~tie_rows], ref_i[~tie_rows])


def test_exact_ties_go_to_the_lower_index():
  scores = jnp.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
  weights, indices = routing.top_k_weights(scores, 2)
  np.testing.assert_array_equal(indices, [[1, 2], [0, 1]])
  np.testing.assert_allclose(weights, 0.5, rtol=1e-5)


def test_k_larger_than_experts_is_refused():
  with pytest.raises(ValueError, match=r"1 <= k <= number of experts; got k=4 with 3 experts"):
    routing.top_k_weights(jnp.zeros((2, 3)), 4)


@pytest.mark.parametrize("num_experts, k", [(1, 1), (3, 1), (3, 2), (3, 3), (36, 1), (36, 2), (36, 36)])
def test_kernels_agree(num_experts, k):
  rng = np.random.default_rng(num_experts * 10 + k)
  d_in, d_out, r, tokens = 24, 20, 4, 13  # an odd token count
  u = rng.normal(size=(tokens, d_in)).astype(np.float32)
  u[-3:] = 0.0  # padded positions (the kernels must not care)
  a = rng.normal(size=(num_experts, d_in, r)).astype(np.float32)
  b = rng.normal(size=(num_experts, r, d_out)).astype(np.float32)
  scores = rng.normal(size=(tokens, num_experts)).astype(np.float32)
  weights, indices = routing.top_k_weights(jnp.asarray(scores), k)
  # Reference: the formula, token by token.
  expected = np.zeros((tokens, d_out), np.float64)
  for t in range(tokens):
    for j in range(k):
      e = int(indices[t, j])
      expected[t] += float(weights[t, j]) * (u[t].astype(np.float64) @ a[e] @ b[e])
  expected *= 0.25
  for kernel in routing.KERNELS + ("auto",):
    got = routing.combine(jnp.asarray(u), jnp.asarray(a), jnp.asarray(b), weights, indices, 0.25, kernel=kernel)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5, err_msg=kernel)


def test_kernels_keep_leading_dims_and_dtype():
  rng = np.random.default_rng(0)
  u = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.bfloat16)
  a = jnp.asarray(rng.normal(size=(4, 8, 2)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(4, 2, 6)), jnp.float32)
  w, i = routing.top_k_weights(jnp.asarray(rng.normal(size=(2, 5, 4))), 2)
  outs = [routing.combine(u, a, b, w, i, 1.0, kernel=kn, out_dtype=jnp.bfloat16) for kn in routing.KERNELS]
  for out in outs:
    assert out.shape == (2, 5, 6) and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(outs[0], np.float32), rtol=3e-2, atol=3e-2)
  with pytest.raises(ValueError, match="unknown routing kernel"):
    routing.combine(u, a, b, w, i, 1.0, kernel="sparse")


def test_kernel_gradients_agree_with_the_dense_reference():
  """Gradients through every kernel (inputs, both LoRA factors, and the router through the routing weights)
  equal the dense kernel's; looped's come from blocked by a custom VJP, its forward being a while loop."""
  rng = np.random.default_rng(3)
  tokens, d_in, d_out, r, num_experts = 70, 12, 10, 3, 5  # several blocks, one expert with a partial block
  u, a, b, gates = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in
                    ((tokens, d_in), (num_experts, d_in, r), (num_experts, r, d_out), (num_experts, d_in)))

  def loss(u, a, b, gates, kernel):
    weights, indices = routing.top_k_weights(routing.phatgoose_scores(u, gates), 2)
    return jnp.sum(jnp.sin(routing.combine(u, a, b, weights, indices, 0.5, kernel=kernel)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)
  expected = grad(u, a, b, gates, "dense")
  for kernel in routing.KERNELS:
    for name, got, want in zip(("u", "lora_a", "lora_b", "router"), grad(u, a, b, gates, kernel), expected):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))),
                                 err_msg=f"{kernel} d/d{name}")
