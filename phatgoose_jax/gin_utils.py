"""gin plumbing shared by every entry point: `--gin_file` / `--gin.NAME=value` flags, search paths, errors."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Sequence

import gin

from phatgoose_jax.config import GIN_DIR


class _DropGinProbeErrors(logging.Filter):
  """gin's package-resource reader logs "Path not found" for every search path it probes; a miss on
  one path is normal (the next one is tried), and a real miss still raises."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found")


logging.getLogger().addFilter(_DropGinProbeErrors())


class GinConfigError(ValueError):
  """A gin file or binding that cannot be used; the message says which and why."""


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """Separates T5X-style gin flags from the other arguments.

  Accepts `--gin_file=F`, `--gin_file F` (repeatable, later files win), `--gin.NAME=VALUE`
  (T5X's shorthand for `--gin_bindings=NAME=VALUE`) and `--gin_bindings=NAME=VALUE`.
  Returns (gin_files, bindings, remaining_args).
  """
  files, bindings, rest = [], [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg == "--gin_file" or arg == "--gin_bindings":
      if i + 1 >= len(args):
        raise GinConfigError(f"{arg} needs a value")
      (files if arg == "--gin_file" else bindings).append(args[i + 1])
      i += 2
      continue
    if arg.startswith("--gin_file="):
      files.append(arg[len("--gin_file="):])
    elif arg.startswith("--gin_bindings="):
      bindings.append(arg[len("--gin_bindings="):])
    elif arg.startswith("--gin."):
      binding = arg[len("--gin."):]
      if "=" not in binding:
        raise GinConfigError(f"malformed gin flag {arg!r}: expected --gin.NAME=VALUE")
      bindings.append(binding)
    else:
      rest.append(arg)
    i += 1
  return files, bindings, rest


def _resolve_gin_file(path: str | Path) -> str:
  p = Path(path)
  candidates = [p] if p.is_absolute() else [Path.cwd() / p, GIN_DIR / p, GIN_DIR.parent / p]
  for c in candidates:
    if c.is_file():
      return str(c)
  raise GinConfigError(f"gin file {str(path)!r} not found (looked in: {', '.join(str(c) for c in candidates)})")


def parse_gin(gin_files: Sequence[str | Path] = (), bindings: Sequence[str] = ()) -> None:
  """Parses gin files then bindings (later wins), with errors that name the file or binding."""
  prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
  if not prefixes or prefixes[0] != str(GIN_DIR):
    # First, so that `include 'runs/x.gin'` is found as a file before gin's package-resource reader tries
    # to import a Python package named `runs` (which a `runs/` output folder in the working directory is).
    if str(GIN_DIR) in prefixes:
      prefixes.remove(str(GIN_DIR))
    prefixes.insert(0, str(GIN_DIR))
  for f in gin_files:
    resolved = _resolve_gin_file(f)
    try:
      gin.parse_config_file(resolved)
    except Exception as e:  # gin raises several types (ValueError, SyntaxError, KeyError...)
      raise GinConfigError(f"cannot parse gin file {resolved}: {e}") from e
  for b in bindings:
    if "=" not in b:
      raise GinConfigError(f"malformed gin binding {b!r}: expected NAME=VALUE")
    try:
      gin.parse_config([b])
    except Exception as e:
      raise GinConfigError(f"malformed gin binding {b!r}: {e}") from e


@contextlib.contextmanager
def isolated_gin_config() -> Iterator[None]:
  """Runs a block with an empty gin config, then restores the previous one exactly."""
  cfg = gin.config
  saved = ({k: dict(v) for k, v in cfg._CONFIG.items()}, set(cfg._IMPORTS),  # pylint: disable=protected-access
           dict(cfg._OPERATIVE_CONFIG), dict(cfg._SINGLETONS))  # pylint: disable=protected-access
  with gin.unlock_config():
    gin.clear_config()
  try:
    yield
  finally:
    with gin.unlock_config():
      gin.clear_config()
    cfg._CONFIG.update(saved[0])  # pylint: disable=protected-access
    cfg._IMPORTS.update(saved[1])  # pylint: disable=protected-access
    cfg._OPERATIVE_CONFIG.update(saved[2])  # pylint: disable=protected-access
    cfg._SINGLETONS.update(saved[3])  # pylint: disable=protected-access


def require(function: str, **arguments) -> None:
  """Raises GinConfigError naming every argument still bound to gin.REQUIRED (e.g. through a macro such as
  `MODEL_DIR = %gin.REQUIRED`, which gin passes through instead of refusing)."""
  missing = [name for name, value in arguments.items() if value is gin.REQUIRED]
  if missing:
    raise GinConfigError(f"{function}: no value for {', '.join(missing)}; set them with --gin.MACRO=VALUE flags "
                         f"(e.g. --gin.{missing[0].upper()}=...) or in a gin file")
