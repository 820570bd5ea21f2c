"""Kernels run natively on a GPU and through Triton's interpreter on a CPU.

TRITON_INTERPRET must be set before triton is first imported, hence here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis: fresh draws in every local run; the same draws in CI (HYPOTHESIS_PROFILE=ci),
# so that CI's verdict depends on the code alone.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
