"""A training run that dies on purpose, for tests/test_reliability.py.

  python resume_driver.py RUN_JSON FAULT

RUN_JSON holds train()'s keyword arguments. FAULT is 'kill_after_step:N' (SIGKILL once step N is done),
'kill_publishing:N' (SIGKILL while the checkpoint of step N is written: its files are there, the rename
is not done) or 'sigterm_after_step:N' (preemption: SIGTERM once step N is done).
"""

import json
import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")  # as in conftest.py: same programs, same bits
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from helpers import register_train_tasks  # noqa: E402
from phatgoose_jax import checkpoints, training  # noqa: E402
from phatgoose_jax.adapters import AdapterConfig  # noqa: E402


def main():
  kwargs = json.loads(open(sys.argv[1]).read())
  kind, step = sys.argv[2].split(":")
  step = int(step)
  register_train_tasks()
  if kind in ("kill_after_step", "sigterm_after_step"):
    sig = signal.SIGKILL if kind == "kill_after_step" else signal.SIGTERM
    original_init = training.Trainer.__init__

    def init(self, *args, **kw):
      original_init(self, *args, **kw)
      jitted = self.train_step

      def step_then_signal(state, frozen, batch):
        state, metrics = jitted(state, frozen, batch)
        if int(state.step) == step:
          jax.block_until_ready(state)
          os.kill(os.getpid(), sig)
        return state, metrics
      self.train_step = step_then_signal
    training.Trainer.__init__ = init
  elif kind == "kill_publishing":
    original_publish = checkpoints.publish_directory

    def publish(tmp, final, overwrite):
      if final.name == f"step_{step:08d}":
        os.kill(os.getpid(), signal.SIGKILL)
      return original_publish(tmp, final, overwrite)
    checkpoints.publish_directory = publish
  else:
    raise SystemExit(f"unknown fault {sys.argv[2]}")
  kwargs["adapter"] = AdapterConfig(**kwargs["adapter"])
  try:
    training.train("expert", **kwargs)
  except training.Preempted as e:
    print(e, file=sys.stderr)
    return 143
  return 0


if __name__ == "__main__":
  sys.exit(main())
