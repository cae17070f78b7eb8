"""The expert library: independently trained LoRA experts with their PHATGOOSE gates, on disk.

Layout (one directory per expert; no shared index, so adding an expert never rewrites the others):

  LIBRARY/
    <name>/expert.json          metadata (see `Expert`)
    <name>/adapter.safetensors  "<site>/lora_a" [d_in, r], "<site>/lora_b" [r, d_out], "<site>/gate" [d_in]

<site> is the T5X module path of a linear layer, e.g. `encoder/layers_0/attention/query`.
An expert directory is written under a temporary name and renamed into place, so a half-written expert
never appears. Loading stacks experts into [E, ...] arrays per site, in a stable (sorted-name) order
unless an explicit order is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from phatgoose_jax import adapters, checkpoints, routing

FORMAT = "phatgoose_jax.expert.v1"
METADATA_FILE = "expert.json"
TENSORS_FILE = "adapter.safetensors"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
LORA_PARAMS = ("lora_a", "lora_b")


class LibraryError(ValueError):
  """An expert or library that cannot be used; the message names the expert and the problem."""


def base_model_fingerprint(base_params) -> str:
  """A short id of a base model's weights: sha256 over every leaf's path, shape and a strided sample
  of its values (at most 65,536 per leaf), so XL-sized models are fingerprinted in well under a second."""
  h = hashlib.sha256()
  flat = adapters.flatten(base_params)
  for path in sorted(flat):
    if adapters.is_adapter_param(path):
      continue
    leaf = np.asarray(flat[path], dtype=np.float32)
    stride = max(1, leaf.size // 65536)
    h.update(f"{path}:{leaf.shape};".encode())
    h.update(np.ascontiguousarray(leaf.reshape(-1)[::stride]).tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class Expert:
  """One expert: metadata and its tensors (flat {"<site>/<param>": array})."""
  name: str
  task: str
  base_model: str          # base_model_fingerprint of the model it was trained on
  rank: int
  alpha: float
  sites: list[str]
  tensors: dict[str, np.ndarray]
  model_config: dict = dataclasses.field(default_factory=dict)
  expert_steps: int | None = None
  gate_steps: int | None = None
  validation: dict[str, float] = dataclasses.field(default_factory=dict)
  created: str = ""
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def has_gates(self) -> bool:
    return all(f"{s}/gate" in self.tensors for s in self.sites)

  @property
  def num_parameters(self) -> int:
    return int(sum(v.size for v in self.tensors.values()))

  def metadata(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("tensors")
    d.update(format=FORMAT, scale=self.scale, has_gates=self.has_gates, num_parameters=self.num_parameters)
    return d

  def check(self) -> None:
    """Raises LibraryError if the tensors do not match the metadata."""
    where = f"expert {self.name!r}"
    if not NAME_PATTERN.fullmatch(self.name):
      raise LibraryError(f"{where}: a name must match {NAME_PATTERN.pattern}")
    expected = {f"{s}/{p}" for s in self.sites for p in LORA_PARAMS}
    missing = sorted(expected - set(self.tensors))
    extra = sorted(k for k in set(self.tensors) - expected
                   if not (k.endswith("/gate") and k.rsplit("/", 1)[0] in self.sites))
    if missing or extra:
      raise LibraryError(f"{where}: tensors do not match its sites (missing {missing[:4]}, unexpected {extra[:4]})")
    for site in self.sites:
      if not adapters.is_site(site):
        raise LibraryError(f"{where}: {site!r} is not a T5X linear-layer path")
      a, b = self.tensors[f"{site}/lora_a"], self.tensors[f"{site}/lora_b"]
      if a.ndim != 2 or b.ndim != 2 or a.shape[1] != self.rank or b.shape[0] != self.rank:
        raise LibraryError(f"{where}, site {site}: lora_a {a.shape} and lora_b {b.shape} do not have rank {self.rank}")
      gate = self.tensors.get(f"{site}/gate")
      if gate is not None and gate.shape != (a.shape[0],):
        raise LibraryError(f"{where}, site {site}: gate has shape {gate.shape}, expected ({a.shape[0]},)")
      for key in (f"{site}/lora_a", f"{site}/lora_b", f"{site}/gate"):
        if key in self.tensors and not np.all(np.isfinite(self.tensors[key])):
          raise LibraryError(f"{where}: {key} holds NaN or Inf")


def expert_from_params(params, *, name: str, task: str, base_fingerprint: str, adapter_config,
                       model_config=None, **fields) -> Expert:
  """An Expert from a LoRA / gated-LoRA model's parameters (its adapter leaves)."""
  _, flat = adapters.split_params(params)
  tensors = {k: np.asarray(v, np.float32) for k, v in flat.items() if k.rsplit("/", 1)[-1] in ("lora_a", "lora_b", "gate")}
  sites = sorted({k.rsplit("/", 1)[0] for k in tensors})
  expert = Expert(name=name, task=task, base_model=base_fingerprint, rank=adapter_config.rank,
                  alpha=adapter_config.alpha, sites=sites, tensors=tensors,
                  model_config=model_config.to_dict() if model_config is not None else {}, **fields)
  expert.check()
  return expert


def save_expert(expert: Expert, directory: str | Path, overwrite: bool = False) -> Path:
  """Writes an expert directory atomically (temporary name, then rename)."""
  from safetensors.numpy import save_file

  expert.check()
  directory = Path(directory).absolute()
  if not expert.created:
    expert.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  with checkpoints.atomic_directory(directory, overwrite) as tmp:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in expert.tensors.items()}, str(tmp / TENSORS_FILE))
    (tmp / METADATA_FILE).write_text(json.dumps(expert.metadata(), indent=2, sort_keys=True) + "\n")
  return directory


def load_expert(directory: str | Path) -> Expert:
  from safetensors.numpy import load_file

  directory = Path(directory)
  meta_file, tensor_file = directory / METADATA_FILE, directory / TENSORS_FILE
  if not meta_file.is_file() or not tensor_file.is_file():
    raise LibraryError(f"{directory} is not an expert directory (needs {METADATA_FILE} and {TENSORS_FILE})")
  try:
    meta = json.loads(meta_file.read_text())
  except json.JSONDecodeError as e:
    raise LibraryError(f"{meta_file} is corrupt (not valid JSON): {e}") from e
  if meta.get("format") != FORMAT:
    raise LibraryError(f"{meta_file}: format {meta.get('format')!r} is not {FORMAT!r}")
  try:
    tensors = load_file(str(tensor_file))
  except Exception as e:
    raise LibraryError(f"{tensor_file} is corrupt or truncated: {e}") from e
  fields = {f.name for f in dataclasses.fields(Expert)} - {"tensors"}
  try:
    expert = Expert(tensors=dict(tensors), **{k: v for k, v in meta.items() if k in fields})
  except TypeError as e:
    raise LibraryError(f"{meta_file} lacks required metadata: {e}") from e
  expert.check()
  return expert


@dataclasses.dataclass
class StackedExperts:
  """Experts stacked per site: lora_a [E, d_in, r], lora_b [E, r, d_out], gate [E, d_in]."""
  names: list[str]
  sites: list[str]
  rank: int
  alpha: float
  base_model: str
  lora_a: dict[str, np.ndarray]
  lora_b: dict[str, np.ndarray]
  gate: dict[str, np.ndarray]

  @property
  def num_experts(self) -> int:
    return len(self.names)

  @property
  def sites_regex(self) -> str:
    return "|".join(re.escape(s) for s in self.sites)


def check_compatible(experts: Sequence[Expert], require_gates: bool = True) -> None:
  """Refuses a set that mixes base models, ranks, scales or site sets, or has an expert without gates."""
  if not experts:
    raise LibraryError("no experts to stack: the library is empty")
  first = experts[0]
  seen = set()
  for e in experts:
    if e.name in seen:
      raise LibraryError(f"expert {e.name!r} appears twice")
    seen.add(e.name)
    if require_gates and not e.has_gates:
      raise LibraryError(f"expert {e.name!r} has no gate vectors: train its gates (train-gate) before adding it")
    for attr in ("base_model", "rank", "alpha"):
      if getattr(e, attr) != getattr(first, attr):
        raise LibraryError(f"expert {e.name!r} has {attr} {getattr(e, attr)!r}, but {first.name!r} has "
                           f"{getattr(first, attr)!r}: experts of one library must share it")
    if e.sites != first.sites:
      only_e = sorted(set(e.sites) - set(first.sites))
      only_first = sorted(set(first.sites) - set(e.sites))
      raise LibraryError(f"expert {e.name!r} has a different site set than {first.name!r}: sites only in "
                         f"{e.name!r}: {only_e[:3]}{'...' if len(only_e) > 3 else ''}; only in {first.name!r}: "
                         f"{only_first[:3]}{'...' if len(only_first) > 3 else ''}")
    for site in e.sites:
      for p in LORA_PARAMS:
        if e.tensors[f"{site}/{p}"].shape != first.tensors[f"{site}/{p}"].shape:
          raise LibraryError(f"expert {e.name!r}, {site}/{p}: shape {e.tensors[f'{site}/{p}'].shape} differs from "
                             f"{first.name!r}'s {first.tensors[f'{site}/{p}'].shape}")


def stack_experts(experts: Sequence[Expert], require_gates: bool = True) -> StackedExperts:
  check_compatible(experts, require_gates)
  first = experts[0]
  stack = lambda site, p: np.stack([e.tensors[f"{site}/{p}"] for e in experts])
  return StackedExperts(
      names=[e.name for e in experts], sites=list(first.sites), rank=first.rank, alpha=first.alpha,
      base_model=first.base_model, lora_a={s: stack(s, "lora_a") for s in first.sites},
      lora_b={s: stack(s, "lora_b") for s in first.sites},
      gate={s: stack(s, "gate") for s in first.sites} if require_gates else {})


def routed_adapter_params(stacked: StackedExperts, router_vectors: Mapping[str, np.ndarray] | None = None
                          ) -> dict[str, np.ndarray]:
  """Flat routed-model adapter leaves: the stacked LoRA factors and, per site, the router vectors
  [E, d_in]. By default these are the gates standardized once (float32), as the PHATGOOSE router reads
  them; baselines pass their own (see routers.py)."""
  if router_vectors is None:
    import jax
    standardize = jax.jit(routing.standardize)
    router_vectors = {site: np.asarray(standardize(stacked.gate[site])) for site in stacked.sites}
  flat = {}
  for site in stacked.sites:
    if router_vectors[site].shape != stacked.lora_a[site].shape[:2]:
      raise LibraryError(f"router vectors at {site} have shape {router_vectors[site].shape}, expected "
                         f"{stacked.lora_a[site].shape[:2]}")
    flat[f"{site}/lora_a"] = stacked.lora_a[site]
    flat[f"{site}/lora_b"] = stacked.lora_b[site]
    flat[f"{site}/router"] = np.asarray(router_vectors[site], np.float32)
  return flat


def routed_model_params(base_params, stacked: StackedExperts, router_vectors: Mapping[str, np.ndarray] | None = None,
                        check_base: bool = True) -> dict:
  """Base parameters plus the routed adapter leaves, as a nested tree for `Transformer(adapter=routed)`."""
  base, _ = adapters.split_params(base_params)
  if check_base:
    fingerprint = base_model_fingerprint(base_params)
    if fingerprint != stacked.base_model:
      raise LibraryError(f"the experts were trained on base model {stacked.base_model}, but the given base model "
                         f"is {fingerprint}")
  return adapters.unflatten({**base, **routed_adapter_params(stacked, router_vectors)})


class ExpertLibrary:
  """A directory of experts. Every operation re-reads the directory, so concurrent readers see a
  consistent set: experts appear and disappear only by atomic renames."""

  def __init__(self, root: str | Path, create: bool = False):
    self.root = Path(root)
    if not self.root.is_dir():
      if not create:
        raise LibraryError(f"expert library {self.root} does not exist")
      self.root.mkdir(parents=True, exist_ok=True)  # another process may be creating it too

  def names(self) -> list[str]:
    return sorted(p.name for p in self.root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / METADATA_FILE).is_file())

  def path(self, name: str) -> Path:
    return self.root / name

  def get(self, name: str) -> Expert:
    if name not in self.names():
      raise LibraryError(f"no expert named {name!r} in {self.root} (have: {', '.join(self.names()) or 'none'})")
    expert = load_expert(self.path(name))
    if expert.name != name:
      raise LibraryError(f"{self.path(name)} holds an expert named {expert.name!r}: an expert's directory must carry "
                         f"its name (rename the directory or re-add the expert)")
    return expert

  def experts(self, names: Iterable[str] | None = None) -> list[Expert]:
    return [self.get(n) for n in (self.names() if names is None else names)]

  @contextlib.contextmanager
  def _writer_lock(self):
    """One writer at a time (an exclusive flock on <library>/.lock), so that the check against the
    present experts and the rename that adds one are a single step for concurrent processes."""
    with open(self.root / ".lock", "a") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(f, fcntl.LOCK_UN)

  def add(self, expert: Expert, overwrite: bool = False) -> Path:
    """Adds one expert after checking it against those already present; touches no other expert."""
    expert.check()
    with self._writer_lock():
      present = self.names()
      if expert.name in present and not overwrite:
        raise LibraryError(f"expert {expert.name!r} already exists in {self.root}; remove it first or overwrite")
      others = [self.get(n) for n in present if n != expert.name][:1]  # one suffices: the rest already agree
      check_compatible(others + [expert])
      return save_expert(expert, self.path(expert.name), overwrite=overwrite)

  def remove(self, name: str) -> None:
    with self._writer_lock():
      if name not in self.names():
        raise LibraryError(f"no expert named {name!r} in {self.root}")
      doomed = checkpoints.temporary_sibling(self.path(name))
      self.path(name).rename(doomed)  # disappears atomically, then is deleted
      shutil.rmtree(doomed)

  def validate(self) -> list[Expert]:
    """Loads and cross-checks every expert; raises LibraryError naming the first problem."""
    experts = self.experts()
    check_compatible(experts)
    return experts

  def stack(self, names: Sequence[str] | None = None) -> StackedExperts:
    return stack_experts(self.experts(names))


def routed_model(base_config, base_params, stacked: StackedExperts, top_k: int = 2, kernel: str = "auto",
                 record_routing: bool = False, check_base: bool = True, router: str = "phatgoose",
                 router_vectors: Mapping[str, np.ndarray] | None = None):
  """(EncoderDecoderModel, params) of a routed model: the base plus every stacked expert at each of their
  sites, routed per token. Default: PHATGOOSE (the standardized gates); `router`/`router_vectors` give
  the baselines that share this computation (Average Activation, Arrow)."""
  from phatgoose_jax.model import EncoderDecoderModel
  from phatgoose_jax.network import Transformer

  adapter = adapters.AdapterConfig(mode="routed", rank=stacked.rank, alpha=stacked.alpha, sites=stacked.sites_regex,
                                   num_experts=stacked.num_experts, top_k=top_k, kernel=kernel,
                                   record_routing=record_routing, router=router)
  params = routed_model_params(base_params, stacked, router_vectors, check_base=check_base)
  model = EncoderDecoderModel(Transformer(base_config, adapter))
  expected = {k.rsplit("/", 1)[0] for k in adapters.flatten(params) if adapters.is_adapter_param(k)}
  if expected != set(stacked.sites):
    raise LibraryError("the experts' sites are not linear sites of this base model")
  return model, params
