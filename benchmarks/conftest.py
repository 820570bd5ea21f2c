import pytest
import torch


@pytest.fixture(scope="session")
def gpu_ceilings():
    """The device's measured ceilings (for the floor), or None on a CPU."""
    if not torch.cuda.is_available():
        return None
    from ceilings import measure_ceilings

    return measure_ceilings()
