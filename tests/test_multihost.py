"""A real two-process JAX job on CPU: host-local batches become one global array, sharded scoring equals
the one-process score, each host reads its own seqio shard, and a checkpoint is written by both hosts."""

import atexit
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("multihost_checks.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Started at collection so that they run beside the rest of the suite.
_OUT = Path(tempfile.mkdtemp(prefix="phatgoose_multihost_"))
_PORT = str(_free_port())
_HOSTS = [subprocess.Popen([sys.executable, str(SCRIPT), str(i), _PORT, str(_OUT)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(2)]


@atexit.register
def _cleanup():
  for proc in _HOSTS:
    if proc.poll() is None:
      proc.kill()
  shutil.rmtree(_OUT, ignore_errors=True)


def test_two_hosts_score_and_checkpoint_like_one():
  outputs = [proc.communicate(timeout=600) for proc in _HOSTS]
  for proc, (_, err) in zip(_HOSTS, outputs):
    if proc.returncode != 0:
      pytest.fail(f"a host failed:\n{err[-3000:]}")
  result = json.loads(outputs[0][0].strip().splitlines()[-1])
  assert result["processes"] == 2 and result["devices"] == 4
  assert result["max_diff"] <= 1e-5
  assert result["checkpoint_equal"] and result["files"] == ["config.json", "params"]
  assert result["shard_info"] == [[0, 2], [1, 2]]  # seqio (index, num_shards) of host 0 and of host 1
  assert [p.name for p in _OUT.iterdir()] == ["ckpt"]  # the shared temporary directory was renamed away
