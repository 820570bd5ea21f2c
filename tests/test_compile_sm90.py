"""The GPU kernels compile for sm_90 (H100/H200) on this machine, GPU or not."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the native tests compile for the real device")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, str(here / "compile_sm90.py")], cwd=here.parent, env=env,
                          capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # both kernel versions: every config of every path, 5 dtype combinations, both flag sets,
    # each config list at the alignments its launcher chooses it for (v4: 168, v3: 160); the
    # matching kernel at 3 sizes, aligned or not (6)
    assert "334 variants, 0 failure(s)" in out and out.count("\nok ") + out.startswith("ok ") == 334, out[-2000:]
