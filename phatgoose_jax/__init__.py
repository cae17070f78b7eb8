"""phatgoose-jax: PHATGOOSE (Muqeeth et al., ICML 2024) on a T5X-compatible T5 in JAX/Flax."""

import os as _os

# TensorFlow (under seqio) only feeds data: keep its C++ start-up chatter out of the logs.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
