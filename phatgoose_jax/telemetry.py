"""Training and evaluation metrics as TensorBoard summaries (clu's metric writers) and JSON lines.

Every scalar goes to <dir>/events.out.tfevents.* (TensorBoard; read back with TensorFlow's summary
iterator) and, one JSON object per write, to <dir>/metrics.jsonl. Only the first host writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

import jax


class MetricWriter:
  def __init__(self, directory: str | Path):
    from clu import metric_writers

    self.directory = Path(directory)
    self._leader = jax.process_index() == 0
    if self._leader:
      self.directory.mkdir(parents=True, exist_ok=True)
    # clu's default writer: TensorBoard summaries (plus absl logging); other hosts only log.
    self._writer = metric_writers.create_default_writer(str(self.directory), just_logging=not self._leader,
                                                        asynchronous=False)
    self._jsonl = open(self.directory / "metrics.jsonl", "a") if self._leader else None

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self._writer.write_scalars(int(step), scalars)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
      self._jsonl.flush()

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
