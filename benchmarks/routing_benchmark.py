"""The routing benchmark (phatgoose_jax/benchmark.py; also `phatgoose bench`), runnable from a checkout:

    python benchmarks/routing_benchmark.py --preset targets --output benchmarks/results/cpu_targets.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phatgoose_jax.benchmark import main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
