"""Where one routed site's time goes: the base matmul against the router and each combine kernel, and the
looped kernel's per-block matmuls, at one site's shape (random data, float32, median of --repeats runs).

    python benchmarks/site_breakdown.py                      # T5-base attention site, T=2048, E=36, k=2
    python benchmarks/site_breakdown.py --experts 166 --d_out 2048

Used for the per-site explanations in docs/performance.md; the model-level ratios come from
`phatgoose bench`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from phatgoose_jax import benchmark, routing  # noqa: E402


def measure(fn, *args, repeats: int) -> tuple[float, float]:
  """(median ms over `repeats` timed runs, XLA's temporaries in MiB) of fn compiled once."""
  compiled, _ = benchmark.compile_seconds(fn, *args)
  seconds = benchmark.alternate({"fn": lambda: compiled(*args)}, repeats)["fn"]
  return 1e3 * seconds, compiled.memory_analysis().temp_size_in_bytes / 2**20


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--d_in", type=int, default=768)
  parser.add_argument("--d_out", type=int, default=768)
  parser.add_argument("--experts", type=int, default=36)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32) * 0.05)  # values do not matter here
  u = normal(args.tokens, args.d_in)
  kernel = normal(args.d_in, args.d_out)
  a, b = normal(args.experts, args.d_in, args.rank), normal(args.experts, args.rank, args.d_out)
  gates = routing.standardize(normal(args.experts, args.d_in))
  weights, indices = jax.jit(lambda u, g: routing.top_k_weights(routing.phatgoose_scores(u, g), args.top_k))(u, gates)
  block = routing.looped_block_size(args.tokens * args.top_k, args.experts)
  layout = jax.jit(lambda w, i: routing.block_layout(w, i, args.experts, block))(weights, indices)
  used = int(layout.used_blocks)

  ms = lambda fn, *fn_args: measure(fn, *fn_args, repeats=args.repeats)[0]
  rows = [("base matmul u @ W", ms(lambda u, w: u @ w, u, kernel))]
  rows.append(("router (scores, softmax, top-k)",
               ms(lambda u, g: routing.top_k_weights(routing.phatgoose_scores(u, g), args.top_k), u, gates)))
  rows.append((f"block layout (sort, block {block})",
               ms(lambda w, i: routing.block_layout(w, i, args.experts, block), weights, indices)))
  for name in routing.KERNELS:
    if name == "gather" and args.tokens * args.top_k > 4 * args.experts:
      continue  # per-token weight gathers: seconds at this many tokens, and never chosen here
    combine = lambda u, a, b, w, i, name=name: routing.combine(u, a, b, w, i, 1.0, kernel=name)
    time_ms, temp = measure(combine, u, a, b, weights, indices, repeats=args.repeats)
    rows.append((f"combine {name} (temporaries {temp:.1f} MiB)", time_ms))

  def per_block(matmul):
    def run(x, a, b):
      def body(n, acc):
        return acc + jnp.sum(matmul(lax.dynamic_slice_in_dim(x, n * block % (args.tokens - block), block),
                                    a[n % args.experts], b[n % args.experts]))
      return lax.fori_loop(0, used, body, jnp.float32(0))
    return run

  rows.append((f"looped: {used} down matmuls [{block},{args.d_in}]x[{args.d_in},{args.rank}]",
               ms(per_block(lambda x, a, b: x @ a), u, a, b)))
  h = u[:, :args.rank]
  rows.append((f"looped: {used} up matmuls [{block},{args.rank}]x[{args.rank},{args.d_out}]",
               ms(per_block(lambda x, a, b: x @ b), h, a, b)))
  base = rows[0][1]
  print(f"site T={args.tokens} d_in={args.d_in} d_out={args.d_out} E={args.experts} k={args.top_k} r={args.rank} "
        f"({jax.default_backend()}, {jax.device_count()} device(s))\n")
  print("| part | ms | / base matmul |\n|---|---|---|")
  for name, ms in rows:
    print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")
  lora_flops = 2 * args.tokens * args.top_k * args.rank * (args.d_in + args.d_out)
  print(f"\nLoRA FLOPs / base matmul FLOPs: {lora_flops / (2 * args.tokens * args.d_in * args.d_out):.3f}; "
        f"router: {args.experts / args.d_out:.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
