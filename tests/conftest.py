"""Suite-wide settings."""

from __future__ import annotations

import os

# Two cores are shared by the test process and the servers it starts: oversubscribed threads cost far
# more than they gain on the tiny models the tests use.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch
except ImportError:  # the operator-only environment has no torch
    torch = None

if torch is not None:
    torch.set_num_threads(1)
