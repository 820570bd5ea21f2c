"""Bad input: a clear error naming what was expected, or the reference's own result."""
import pytest
import torch

import rein
from _parity import DEVICE
from _tolerance import assert_sums_close


@pytest.fixture(params=[True, False], ids=["fused", "reference"])
def layer(request):
    return rein.ReinLayer(3, 16, 4, token_length=5, fused=request.param, scale_init=0.3).to(DEVICE)


def test_wrong_rank(layer):
    with pytest.raises(ValueError, match=r"rank 3 \(\[N, B, C\]"):
        layer(torch.randn(5, 16, device=DEVICE), 0)
    with pytest.raises(ValueError, match=r"rank 3 \(\[B, N, C\]"):
        layer(torch.randn(1, 2, 5, 16, device=DEVICE), 0, batch_first=True)


def test_embed_dim_mismatch(layer):
    with pytest.raises(ValueError, match="15 channels.*expected embed_dims=16"):
        layer(torch.randn(4, 2, 15, device=DEVICE), 0)


@pytest.mark.parametrize("idx", [3, -1, -2, 1.0])
def test_layer_index_out_of_range(layer, idx):
    with pytest.raises(IndexError, match=r"out of range \[0, 3\)"):
        layer(torch.randn(4, 2, 16, device=DEVICE), idx)


def test_dtype_mismatch(layer):
    with pytest.raises(TypeError, match="x is torch.float16 but the Rein parameters are"):
        layer(torch.randn(4, 2, 16, device=DEVICE).half(), 0)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 2, 16, dtype=torch.long, device=DEVICE), 0)


def test_device_mismatch(layer):
    with pytest.raises(RuntimeError, match="x is on meta but the Rein parameters are on"):
        layer(torch.randn(4, 2, 16, device="meta"), 0)


def test_too_many_prefix_tokens(layer):
    with pytest.raises(ValueError, match=r"num_prefix_tokens=5 must be in \[0, 4\]"):
        layer(torch.randn(4, 2, 16, device=DEVICE), 0, num_prefix_tokens=5)


@pytest.mark.parametrize("shape", [(0, 7, 16), (3, 0, 16)], ids=["empty_batch", "empty_sequence"])
def test_empty_input(layer, shape):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    out = layer(x, 1, batch_first=True, has_cls_token=shape[1] > 0)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_rows_propagate_like_reference(bad):
    layer = rein.ReinLayer(3, 16, 4, token_length=5, scale_init=0.3).to(DEVICE)
    x = torch.randn(3, 6, 16, device=DEVICE)
    x[1, 2, 5] = bad
    layer.fused = False
    ref = layer(x, 0, batch_first=True)
    layer.fused = True
    out = layer(x, 0, batch_first=True)
    # Rows are independent: the bad row is non-finite in both, every other row agrees.
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    ok = torch.isfinite(ref)
    assert_sums_close(out[ok], ref[ok], terms=16 + 5)  # sums over the channels and tokens
    # backward runs (no crash, no hang) and the finite rows still get finite gradients
    xg = x.clone().requires_grad_(True)
    layer(xg, 0, batch_first=True).sum().backward()
    assert torch.isfinite(xg.grad[0]).all()


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="embed_dims must be a positive int"):
        rein.ReinLayer(3, 0, 4)
    with pytest.raises(ValueError, match="lora_dim must be None or a positive int"):
        rein.ReinLayer(3, 8, 4, lora_dim=0)
