"""Under torch.autocast the GEMMs run in the autocast dtype; the result dtype and the
parameters' gradient dtypes are the reference's."""
import warnings

import pytest
import torch

import rein
import rein.layer
from _parity import TOL

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fwd_bwd(layer, x, dtype, device):
    xg = x.clone().requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        out = layer(xg, 1, batch_first=True)
    out.float().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    return out, xg.grad, grads


def test_cpu_bf16_autocast_falls_back_to_reference(monkeypatch):
    """The interpreter computes bf16 wrongly, so bf16 on CPU takes the reference path."""
    monkeypatch.setattr(rein.layer, "_warned_fallback", set())
    layer = rein.ReinLayer(2, 24, 4, token_length=6, scale_init=0.3)
    x = torch.randn(2, 9, 24)
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch reference"):
        out, gx, grads = _fwd_bwd(layer, x, torch.bfloat16, "cpu")
    layer.fused = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref, rgx, rgrads = _fwd_bwd(layer, x, torch.bfloat16, "cpu")
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rgx)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_cuda_autocast_matches_reference(dtype, x_dtype):
    torch.manual_seed(0)
    layer = rein.ReinLayer(3, 200, 16, token_length=37, lora_dim=8, scale_init=0.3).cuda()
    x = torch.randn(2, 65, 200, device="cuda").to(x_dtype)
    out, gx, grads = _fwd_bwd(layer, x, dtype, "cuda")
    layer.fused = False
    ref, rgx, rgrads = _fwd_bwd(layer, x, dtype, "cuda")
    layer.double()
    exact, egx, egrads = _fwd_bwd_exact(layer, x)
    assert out.dtype == ref.dtype and gx.dtype == rgx.dtype
    assert all(g.dtype == torch.float32 for g in grads.values())
    tol = TOL["bf16" if dtype == torch.bfloat16 else "fp16"]
    pairs = [("out", out, ref, exact), ("x", gx, rgx, egx)] + [
        (n, grads[n], rgrads[n], egrads[n]) for n in grads]
    for name, got, theirs, ex in pairs:
        err = (got.double() - ex).abs().max().item()
        bound = 2 * (theirs.double() - ex).abs().max().item() + tol * ex.abs().max().item()
        assert err <= bound, f"{name}: {err:.3e} > {bound:.3e}"


def _fwd_bwd_exact(layer, x):
    xg = x.double().clone().requires_grad_(True)
    out = layer(xg, 1, batch_first=True)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    return out, xg.grad, grads
