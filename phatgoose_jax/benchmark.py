"""Routed-model speed against the base model: scoring throughput, incremental decoding, memory, and the
training steps, for every routing kernel and the automatic choice, side by side in one process.

    phatgoose bench --preset targets --output benchmarks/results/cpu_targets.json
    (or: python benchmarks/routing_benchmark.py ..., the same program)

Every ratio is routed / base, timed alternately in the same loop (median of --repeats timed runs after
one compile run), so machine noise hits both alike. Each row also prints its arithmetic floor:
(base + router + k-expert LoRA FLOPs) / base FLOPs, counted from the shapes. Compile time is reported
separately; memory is XLA's static estimate for the compiled program (arguments + temporaries + outputs).
See docs/performance.md for the numbers and what they mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from phatgoose_jax import adapters, partitioning, routing, training
from phatgoose_jax.adapters import AdapterConfig
from phatgoose_jax.config import T5Config, model_size_config
from phatgoose_jax.model import EncoderDecoderModel
from phatgoose_jax.network import Transformer

KERNELS = routing.KERNELS + ("auto",)
RANK = 16
TINY = T5Config(vocab_size=128, dtype="float32", emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                num_encoder_layers=1, num_decoder_layers=1, mlp_activations=("gelu", "linear"), dropout_rate=0.0)


@dataclasses.dataclass
class Preset:
  shapes: tuple[str, ...]
  score_rows: tuple[tuple[str, int, int, str, tuple[int, int]], ...]   # (shape, E, k, kernel, (batch, length))
  decode_rows: tuple[tuple[str, int, int, str, int], ...]              # (shape, E, k, kernel, batch)
  memory_rows: tuple[tuple[str, int, int, str, tuple[int, int]], ...]  # compiled, not run
  training_shape: str | None
  repeats: int


def _grid(shapes, experts, top_ks, kernels, batches):
  return tuple((s, e, k, kn, b) for s in shapes for b in batches for e in experts for k in top_ks for kn in kernels
               if k <= e)


PRESETS = {
    # For the test suite: every kernel on a tiny model, a few iterations.
    "tiny": Preset(shapes=("tiny",), score_rows=_grid(("tiny",), (4, 8), (1, 2), KERNELS, ((2, 16),)),
                   decode_rows=_grid(("tiny",), (8,), (2,), ("gather", "auto"), (2,)),
                   memory_rows=_grid(("tiny",), (64,), (2,), ("auto",), ((2, 16),)), training_shape="tiny", repeats=2),
    # The targets on 2 CPU cores: T5-base scoring and decoding at E=36/166, k=2; T5-small for the
    # rest of the expert and k grid; E=1024 memory at the small shape; training steps at the small shape.
    "targets": Preset(
        shapes=("small", "base"),
        score_rows=(_grid(("base",), (36, 166), (2,), ("blocked", "looped", "auto"), ((8, 256),))
                    + _grid(("small",), (8, 36, 166), (2,), ("dense", "blocked", "looped", "auto"), ((8, 256),))
                    + _grid(("small",), (36,), (1, 4), ("auto",), ((8, 256),))),
        decode_rows=_grid(("base",), (36,), (2,), ("auto",), (8, 64)),
        memory_rows=_grid(("small",), (1024,), (2,), ("dense", "blocked", "looped", "auto"), ((8, 256),)),
        training_shape="small", repeats=3),
    # The T5-base target rows again, with more timed runs (ratios on a noisy 2-core VM move by ~10% at 3).
    "base-targets": Preset(
        shapes=("base",), score_rows=_grid(("base",), (36, 166), (2,), ("looped", "auto"), ((8, 256),)),
        decode_rows=_grid(("base",), (36,), (2,), ("auto",), (8, 64)), memory_rows=(), training_shape=None,
        repeats=9),
    # Everything the issue lists (hours on a CPU; minutes on an accelerator).
    "full": Preset(
        shapes=("small", "base"),
        score_rows=_grid(("small", "base"), (8, 36, 166), (1, 2, 4), KERNELS, ((8, 256), (32, 512))),
        decode_rows=_grid(("small", "base"), (8, 36, 166), (1, 2, 4), KERNELS, (8, 64)),
        memory_rows=_grid(("small",), (1024,), (1, 2, 4), KERNELS, ((8, 256), (32, 512))),
        training_shape="base", repeats=5),
}


# ---------------------------------------------------------------------------------------------
# Arithmetic: multiply-adds of one teacher-forced forward pass
# ---------------------------------------------------------------------------------------------

def site_shapes(config: T5Config) -> list[tuple[str, int, int]]:
  """(stack, d_in, d_out) of every linear adapter site; stack 'enc' sites see encoder tokens ('dec': decoder
  tokens). The cross-attention key/value projections read the encoder output: 'enc'."""
  d, hd, f = config.emb_dim, config.num_heads * config.head_dim, config.mlp_dim
  mlp = [(d, f)] * len(config.mlp_activations) + [(f, d)]
  attention = [(d, hd)] * 3 + [(hd, d)]
  sites = [("enc", i, o) for _ in range(config.num_encoder_layers) for i, o in attention + mlp]
  for _ in range(config.num_decoder_layers):
    sites += [("dec", i, o) for i, o in attention + mlp]
    sites += [("dec", d, hd), ("enc", d, hd), ("enc", d, hd), ("dec", hd, d)]  # cross-attention q, k, v, out
  return sites


def forward_macs(config: T5Config, batch: int, enc_len: int, dec_len: int, experts: int = 0, k: int = 0,
                 rank: int = RANK) -> dict[str, float]:
  """Multiply-adds of base, router and k-expert LoRA work in a teacher-forced forward pass."""
  tokens = {"enc": batch * enc_len, "dec": batch * dec_len}
  hd = config.num_heads * config.head_dim
  base = sum(tokens[s] * i * o for s, i, o in site_shapes(config))
  base += 2 * hd * (tokens["enc"] * enc_len * config.num_encoder_layers                     # scores + values
                    + tokens["dec"] * (dec_len + enc_len) * config.num_decoder_layers)
  base += tokens["dec"] * config.emb_dim * config.vocab_size  # logits
  router = sum(tokens[s] * experts * i for s, i, _ in site_shapes(config))
  lora = sum(tokens[s] * k * rank * (i + o) for s, i, o in site_shapes(config))
  return {"base": float(base), "router": float(router), "lora": float(lora)}


def auto_kernels(config: T5Config, enc_tokens: int, dec_tokens: int, experts: int, k: int,
                 rank: int = RANK) -> dict[str, int]:
  """How many sites `auto` runs with each kernel (routing.choose_kernel on this backend), from the shapes."""
  tokens = {"enc": enc_tokens, "dec": dec_tokens}
  counts: dict[str, int] = {}
  for stack, d_in, d_out in site_shapes(config):
    kernel = routing.choose_kernel(tokens[stack], experts, k, rank, d_in, d_out)
    counts[kernel] = counts.get(kernel, 0) + 1
  return counts


def arithmetic_floor(macs: dict[str, float]) -> float:
  return (macs["base"] + macs["router"] + macs["lora"]) / macs["base"]


# ---------------------------------------------------------------------------------------------
# Models with random weights
# ---------------------------------------------------------------------------------------------

def config_of(shape: str) -> T5Config:
  if shape == "tiny":
    return TINY
  return model_size_config(shape, dtype="float32", dropout_rate=0.0)


def random_params(model: EncoderDecoderModel, seed: int = 0) -> dict:
  """Random weights at the model's shapes (no init compile): base kernels ~N(0, 1/d_in), LoRA factors
  small, routers standardized random vectors."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in adapters.flatten(abstract_params(model)).items():
    shape = leaf.shape
    if path.endswith("router"):
      flat[path] = np.asarray(routing.standardize(rng.standard_normal(shape, np.float32)))
    elif path.endswith(("lora_a", "lora_b")):
      flat[path] = rng.standard_normal(shape, np.float32) * 0.02
    elif path.endswith("scale"):
      flat[path] = np.ones(shape, np.float32)
    else:
      fan_in = shape[0] if len(shape) == 2 else shape[-1]
      flat[path] = rng.standard_normal(shape, np.float32) / np.float32(math.sqrt(fan_in))
  return jax.device_put(adapters.unflatten(flat))


def abstract_params(model: EncoderDecoderModel):
  return partitioning.abstract_variables(model.module)["params"]


def batch_of(config: T5Config, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, config.vocab_size, (batch, length)).astype(np.int32)
  decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": rng.integers(2, config.vocab_size, (batch, length)).astype(np.int32),
          "decoder_target_tokens": targets, "decoder_input_tokens": decoder_inputs,
          "decoder_loss_weights": np.ones_like(targets)}


def routed_config(experts: int, k: int, kernel: str) -> AdapterConfig:
  return AdapterConfig(mode="routed", rank=RANK, num_experts=experts, top_k=k, kernel=kernel)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def compile_seconds(fn, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def memory_bytes(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes + analysis.output_size_in_bytes
             - analysis.alias_size_in_bytes)


def alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median seconds of each thunk, timed in turn `repeats` times (after one warm-up call each)."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


class Bench:
  """Builds and caches the base model of each shape; runs rows; collects results."""

  def __init__(self, repeats: int, check: bool):
    self.repeats = repeats
    self.check = check  # compare every kernel's scores with the dense kernel's (the reference)
    self._base: dict[str, tuple] = {}
    self._references: dict[tuple, np.ndarray] = {}
    self._compiled_base: dict[tuple, tuple] = {}

  def base(self, shape: str):
    if shape not in self._base:
      config = config_of(shape)
      model = EncoderDecoderModel(Transformer(config))
      self._base[shape] = (config, model, random_params(model))
    return self._base[shape]

  def routed_params(self, shape: str, experts: int, k: int):
    config, _, base_params = self.base(shape)
    model = EncoderDecoderModel(Transformer(config, routed_config(experts, k, "dense")))
    params = random_params(model, seed=1)
    flat = adapters.flatten(params)
    flat.update(adapters.flatten(base_params))
    return adapters.unflatten(flat)

  def score_row(self, shape: str, experts: int, k: int, kernel: str, batch_shape: tuple[int, int],
                routed_params) -> dict:
    config, base_model, base_params = self.base(shape)
    batch = batch_of(config, *batch_shape)
    model = EncoderDecoderModel(Transformer(config, routed_config(experts, k, kernel)))
    score = lambda m: (lambda params, batch: m.score_batch_detailed(params, batch)["sum"])
    if (shape, batch_shape) not in self._compiled_base:
      self._compiled_base[(shape, batch_shape)] = compile_seconds(score(base_model), base_params, batch)
    base_fn, base_compile = self._compiled_base[(shape, batch_shape)]
    routed_fn, routed_compile = compile_seconds(score(model), routed_params, batch)
    times = alternate({"base": lambda: base_fn(base_params, batch), "routed": lambda: routed_fn(routed_params, batch)},
                      self.repeats)
    macs = forward_macs(config, batch_shape[0], batch_shape[1], batch_shape[1], experts, k)
    tokens = 2 * batch_shape[0] * batch_shape[1]  # inputs + targets
    row = {"shape": shape, "experts": experts, "top_k": k, "kernel": kernel, "batch": list(batch_shape),
           "base_seconds": times["base"], "routed_seconds": times["routed"], "ratio": times["routed"] / times["base"],
           "floor": arithmetic_floor(macs), "base_tokens_per_second": tokens / times["base"],
           "routed_tokens_per_second": tokens / times["routed"], "compile_seconds": routed_compile,
           "base_compile_seconds": base_compile, "routed_memory_bytes": memory_bytes(routed_fn),
           "base_memory_bytes": memory_bytes(base_fn)}
    if kernel == "auto":
      row["auto_kernels"] = auto_kernels(config, batch_shape[0] * batch_shape[1], batch_shape[0] * batch_shape[1],
                                         experts, k)
    if self.check:
      scores = np.asarray(routed_fn(routed_params, batch))
      key = (shape, experts, k, tuple(batch_shape))
      if key not in self._references:
        dense = EncoderDecoderModel(Transformer(config, routed_config(experts, k, "dense")))
        self._references[key] = np.asarray(jax.jit(score(dense))(routed_params, batch))
      ref = self._references[key]
      row["max_abs_diff_vs_dense"] = float(np.max(np.abs(scores - ref)) / max(1.0, float(np.max(np.abs(ref)))))
    return row

  def decode_row(self, shape: str, experts: int, k: int, kernel: str, batch_size: int, routed_params) -> dict:
    """ms per incremental decoding step: (time for L2 steps - time for L1 steps) / (L2 - L1), so the
    encoder pass and the loop setup cancel out."""
    config, base_model, base_params = self.base(shape)
    model = EncoderDecoderModel(Transformer(config, routed_config(experts, k, kernel)))
    short, long = (4, 12) if shape == "tiny" else (8, 24)
    batch = batch_of(config, batch_size, 64 if shape != "tiny" else 16)
    batch = {"encoder_input_tokens": batch["encoder_input_tokens"],
             "decoder_input_tokens": np.zeros((batch_size, long), np.int32)}
    fns, compile_total = {}, 0.0
    for name, m, p in (("base", base_model, base_params), ("routed", model, routed_params)):
      for steps in (short, long):
        b = {**batch, "decoder_input_tokens": batch["decoder_input_tokens"][:, :steps]}
        decode = lambda params, b, m=m, steps=steps: m.predict_batch_with_aux(params, b, max_decode_length=steps)[0]
        compiled, seconds = compile_seconds(decode, p, b)
        compile_total += seconds if name == "routed" else 0.0
        fns[f"{name}/{steps}"] = (lambda c=compiled, p=p, b=b: c(p, b))
    times = alternate(fns, self.repeats)
    per_step = {n: (times[f"{n}/{long}"] - times[f"{n}/{short}"]) / (long - short) for n in ("base", "routed")}
    macs = forward_macs(config, batch_size, 1, 1, experts, k)
    row = {"shape": shape, "experts": experts, "top_k": k, "kernel": kernel, "batch": batch_size,
           "base_ms_per_step": 1e3 * per_step["base"], "routed_ms_per_step": 1e3 * per_step["routed"],
           "ratio": per_step["routed"] / per_step["base"], "floor": arithmetic_floor(macs),
           "compile_seconds": compile_total}
    if kernel == "auto":  # per step; the cross-attention keys and values (encoder tokens) run once, at step 0
      row["auto_kernels"] = auto_kernels(config, batch_size * batch["encoder_input_tokens"].shape[1], batch_size,
                                         experts, k)
    return row

  def memory_row(self, shape: str, experts: int, k: int, kernel: str, batch_shape: tuple[int, int]) -> dict:
    """Compiled (never run) at abstract shapes: the E=1024 expert tensors need not exist."""
    config, base_model, base_params = self.base(shape)
    batch = batch_of(config, *batch_shape)
    model = EncoderDecoderModel(Transformer(config, routed_config(experts, k, kernel)))
    score = lambda m: (lambda params, batch: m.score_batch_detailed(params, batch)["sum"])
    routed, seconds = compile_seconds(score(model), abstract_params(model), batch)
    base, _ = compile_seconds(score(base_model), base_params, batch)
    macs = forward_macs(config, batch_shape[0], batch_shape[1], batch_shape[1], experts, k)
    return {"shape": shape, "experts": experts, "top_k": k, "kernel": kernel, "batch": list(batch_shape),
            "routed_memory_bytes": memory_bytes(routed), "base_memory_bytes": memory_bytes(base),
            "floor": arithmetic_floor(macs), "compile_seconds": seconds}

  def training_rows(self, shape: str) -> list[dict]:
    """Our expert-training and gate-training steps against a plain single-LoRA step (value_and_grad of
    the token cross-entropy and an AdamW update, nothing else), on the same batch."""
    config, _, base_params = self.base(shape)
    config = config.replace(dropout_rate=0.1)
    batch_shape = (2, 8, 16) if shape == "tiny" else (1, 8, 256)  # [accumulation, batch, length]
    one = batch_of(config, batch_shape[1], batch_shape[2])
    batch = {k: v[None] for k, v in one.items()}
    fns = {}
    for stage in ("expert", "gate"):
      mode, regex = training.STAGES[stage]
      model = EncoderDecoderModel(Transformer(config, AdapterConfig(mode=mode, rank=RANK)))
      params = adapters.graft_base(random_params(model, seed=2), base_params)
      trainable, frozen = training.split_trainable(params, regex)
      tx, schedule = training.make_optimizer(10_000, learning_rate=1e-4, warmup_ratio=0.0)
      trainer = training.Trainer(model, tx, schedule)
      state = {"s": trainer.init_state(trainable, seed=0)}
      frozen = jax.device_put(frozen)

      def step(trainer=trainer, state=state, frozen=frozen):
        state["s"], metrics = trainer.train_step(state["s"], frozen, batch)
        return metrics["loss"]
      fns[stage] = step
      if stage == "expert":
        fns["plain_lora"] = _plain_lora_step(model, trainable, frozen, one)
    times = alternate(fns, self.repeats)
    return [{"shape": shape, "step": name, "seconds": times[name], "ratio_to_plain_lora": times[name] / times["plain_lora"]}
            for name in ("expert", "gate", "plain_lora")]


def _plain_lora_step(model, trainable, frozen, batch):
  import optax
  tx = optax.adamw(1e-4)
  state = {"params": {k: jnp.array(v) for k, v in trainable.items()}}
  state["opt"] = tx.init(state["params"])

  def loss_fn(train, rng):
    params = adapters.unflatten({**frozen, **train})
    logits = model.compute_logits(params, batch, dropout_rng=rng)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ll = jnp.take_along_axis(logp, batch["decoder_target_tokens"][..., None], axis=-1)[..., 0]
    return -jnp.sum(ll * batch["decoder_loss_weights"]) / jnp.sum(batch["decoder_loss_weights"])

  @jax.jit
  def update(params, opt, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, rng)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  def step():
    state["params"], state["opt"], loss = update(state["params"], state["opt"], jax.random.PRNGKey(0))
    return loss
  return step


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _mib(n):
  return "-" if n is None else f"{n / 2**20:,.0f}"


def _kernel_label(row: dict) -> str:
  """'auto (looped)': the kernel name, with what auto ran at the sites (site counts when it mixed)."""
  used = row.get("auto_kernels")
  if not used:
    return row["kernel"]
  return f"auto ({', '.join(used if len(used) == 1 else (f'{n} {kn}' for kn, n in sorted(used.items())))})"


def format_tables(results: dict) -> str:
  lines = []
  score = results["score"]
  if score:
    lines += ["## Scoring (teacher-forced forward), routed / base", "",
              "| shape | E | k | kernel | batch | base tok/s | routed tok/s | ratio | floor | ratio/floor | "
              "compile s | memory MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in score:
      lines.append(f"| {r['shape']} | {r['experts']} | {r['top_k']} | {_kernel_label(r)} | {r['batch'][0]}x{r['batch'][1]} | "
                   f"{r['base_tokens_per_second']:,.0f} | {r['routed_tokens_per_second']:,.0f} | {r['ratio']:.2f} | "
                   f"{r['floor']:.3f} | {r['ratio'] / r['floor']:.2f} | {r['compile_seconds']:.1f} | "
                   f"{_mib(r['routed_memory_bytes'])} |")
    lines.append("")
  if results["decode"]:
    lines += ["## Incremental decoding, ms per step", "",
              "| shape | E | k | kernel | batch | base ms | routed ms | ratio | floor |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["decode"]:
      lines.append(f"| {r['shape']} | {r['experts']} | {r['top_k']} | {_kernel_label(r)} | {r['batch']} | "
                   f"{r['base_ms_per_step']:.2f} | {r['routed_ms_per_step']:.2f} | {r['ratio']:.2f} | {r['floor']:.3f} |")
    lines.append("")
  if results["memory"]:
    lines += ["## Memory (XLA's estimate for the compiled scoring program)", "",
              "| shape | E | k | kernel | batch | base MiB | routed MiB | floor |", "|---|---|---|---|---|---|---|---|"]
    for r in results["memory"]:
      lines.append(f"| {r['shape']} | {r['experts']} | {r['top_k']} | {r['kernel']} | {r['batch'][0]}x{r['batch'][1]} | "
                   f"{_mib(r['base_memory_bytes'])} | {_mib(r['routed_memory_bytes'])} | {r['floor']:.3f} |")
    lines.append("")
  if results["training"]:
    lines += ["## Training steps", "", "| shape | step | seconds | / plain LoRA step |", "|---|---|---|---|"]
    for r in results["training"]:
      lines.append(f"| {r['shape']} | {r['step']} | {r['seconds']:.3f} | {r['ratio_to_plain_lora']:.2f} |")
    lines.append("")
  if results["auto_vs_best"]:
    lines += ["## Automatic choice against the best kernel", "",
              "| shape | E | k | batch | auto | auto runs | best | auto/best |", "|---|---|---|---|---|---|---|---|"]
    for r in results["auto_vs_best"]:
      lines.append(f"| {r['shape']} | {r['experts']} | {r['top_k']} | {r['batch']} | {r['auto_ratio']:.2f} | "
                   f"{r['auto_runs']} | {r['best_kernel']} {r['best_ratio']:.2f} | {r['auto_over_best']:.2f} |")
    lines.append("")
  return "\n".join(lines)


def auto_vs_best(score_rows: list[dict]) -> list[dict]:
  """Per row group, auto's ratio against the best explicit kernel's; `auto_runs` names the kernel auto ran
  at every site when it is one kernel (then the two rows time the same program: any gap is noise)."""
  groups: dict[tuple, dict[str, dict]] = {}
  for r in score_rows:
    groups.setdefault((r["shape"], r["experts"], r["top_k"], f"{r['batch'][0]}x{r['batch'][1]}"), {})[r["kernel"]] = r
  out = []
  for (shape, e, k, batch), rows in groups.items():
    explicit = {kn: r["ratio"] for kn, r in rows.items() if kn != "auto"}
    if "auto" in rows and explicit:
      best = min(explicit, key=explicit.get)
      used = rows["auto"].get("auto_kernels", {})
      out.append({"shape": shape, "experts": e, "top_k": k, "batch": batch, "auto_ratio": rows["auto"]["ratio"],
                  "auto_runs": next(iter(used)) if len(used) == 1 else "+".join(sorted(used)),
                  "best_kernel": best, "best_ratio": explicit[best],
                  "auto_over_best": rows["auto"]["ratio"] / explicit[best]})
  return out


def source_commit() -> str | None:
  """The git commit of this checkout (with '+changes' when the tree differs from it), None outside git."""
  root = Path(__file__).resolve().parents[1]
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True, check=True)
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()], "commit": source_commit()}


def run(preset: Preset, check: bool = True, progress: Callable[[str], None] = print, only: Iterable[str] = ()) -> dict:
  only = set(only) or {"score", "decode", "memory", "training"}
  bench = Bench(preset.repeats, check)
  results = {"machine": machine(), "repeats": preset.repeats, "score": [], "decode": [], "memory": [], "training": []}
  params_cache: dict[tuple, Any] = {}

  def routed(shape, e, k):
    key = (shape, e, k)
    if key not in params_cache:
      params_cache.clear()  # one expert pool in memory at a time
      params_cache[key] = bench.routed_params(shape, e, k)
    return params_cache[key]

  start = time.time()
  rows = ([("score", r) for r in preset.score_rows] * ("score" in only) + [("decode", r) for r in preset.decode_rows] *
          ("decode" in only) + [("memory", r) for r in preset.memory_rows] * ("memory" in only))
  for i, (kind, (shape, e, k, kernel, b)) in enumerate(rows):
    if kind == "score":
      row = bench.score_row(shape, e, k, kernel, b, routed(shape, e, k))
    elif kind == "decode":
      row = bench.decode_row(shape, e, k, kernel, b, routed(shape, e, k))
    else:
      row = bench.memory_row(shape, e, k, kernel, b)
    results[kind].append(row)
    elapsed = time.time() - start
    progress(f"[{i + 1}/{len(rows)}] {kind} {shape} E={e} k={k} {kernel} {b}: ratio {row.get('ratio', float('nan')):.2f} "
             f"floor {row['floor']:.3f} ({elapsed:.0f}s elapsed, ETA {elapsed / (i + 1) * (len(rows) - i - 1):.0f}s)")
  if preset.training_shape and "training" in only:
    results["training"] = bench.training_rows(preset.training_shape)
  results["auto_vs_best"] = auto_vs_best(results["score"])
  return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--preset", choices=sorted(PRESETS), default="targets")
  parser.add_argument("--only", action="append", choices=["score", "decode", "memory", "training"], default=[],
                      help="run only these sections (repeatable)")
  parser.add_argument("--repeats", type=int, default=None, help="timed runs per function (default: the preset's)")
  parser.add_argument("--no_check", action="store_true", help="skip comparing each kernel with the dense one")
  parser.add_argument("--output", default=None, help="JSON file to write (refuses to overwrite)")


def run_from_args(args) -> int:
  if args.output and Path(args.output).exists():
    raise FileExistsError(f"{args.output} exists; choose another --output")
  preset = PRESETS[args.preset]
  if args.repeats:
    preset = dataclasses.replace(preset, repeats=args.repeats)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  results = run(preset, check=not args.no_check, progress=log, only=args.only)
  results["preset"] = args.preset
  print(format_tables(results))
  if args.output:
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(parser)
  return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
  sys.exit(main())
