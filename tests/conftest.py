"""Test-wide settings: offline, deterministic, and light on the 2 CPU cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on 2 shared cores: one intra-op thread is much faster than two contending ones.
os.environ.setdefault("OMP_NUM_THREADS", "1")
