"""seqio tasks and mixtures of phatgoose-jax (importable as `phatgoose_tasks`; the folder is `tasks/`).

Importing this package registers the offline letter-skills benchmark (`offline.py`). BIG-bench and T0
tasks register from their modules (`bigbench.py`, `t0.py`) because they read local data files.
"""

from phatgoose_tasks import offline

offline.register()
