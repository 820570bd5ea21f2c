"""Kernels run natively on a GPU and through Triton's interpreter on a CPU.

TRITON_INTERPRET must be set before triton is first imported, hence here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's caches do not tell apart code built for another ATEN_CPU_CAPABILITY (torch
# 2.14: C++ vectorised for AVX-512 by an earlier run, reused under "default", fails to
# compile), so a run that picks a capability keeps its own cache.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    import getpass
    import tempfile

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}"))

# Hypothesis: fresh draws in every local run; the same draws in CI (HYPOTHESIS_PROFILE=ci),
# so that CI's verdict depends on the code alone.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


import importlib  # noqa: E402

import pytest  # noqa: E402


KERNEL_MODULES = {"v4": "rein_kernels.rein_layer_v4", "v3": "rein_kernels.rein_layer"}


@pytest.fixture(params=["v4", "v4-streamed", "v3"])
def kernels(request, monkeypatch):
    """Run a test on each kernel version (rein_kernels.KERNELS) while both are kept, v4 in
    each layout of its row kernels (``row_layout``: the autotuner may pick either on a GPU);
    the kernels' module is the fixture's value."""
    import rein_kernels

    version, _, layout = request.param.partition("-")
    monkeypatch.setattr(rein_kernels, "KERNELS", version)
    module = importlib.import_module(KERNEL_MODULES[version])
    if version != "v4":
        yield module
        return
    with module.row_layout(streamed=layout == "streamed"):
        yield module
