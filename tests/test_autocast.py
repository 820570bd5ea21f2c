"""Under torch.autocast the GEMMs run in the autocast dtype; the result dtype and the
parameters' gradient dtypes are the reference's."""
import warnings

import pytest
import torch

import rein
import rein.layer
from _parity import TOL
from _tolerance import assert_sums_close

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
    assert grads.keys() == rgrads.keys() and len(grads) >= 6
    for n in grads:
        torch.testing.assert_close(grads[n], rgrads[n], msg=n)


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


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu)])
def test_fp16_autocast_output_dtype_follows_promotion(x_dtype):
    """out is promote(x, fp16) as the reference gives; dx keeps x's dtype. Runs the kernels
    on either device (fp16 compute works in the interpreter; CPU autocast cannot run the
    reference on bf16 features, hence bf16 x on the GPU only: see the op-level test below)."""
    from _parity import DEVICE

    torch.manual_seed(1)
    layer = rein.ReinLayer(2, 40, 4, token_length=9, lora_dim=4, scale_init=0.4).to(DEVICE)
    x = torch.randn(2, 7, 40, device=DEVICE).to(x_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the kernels run: no fallback warning
        out, gx, grads = _fwd_bwd(layer, x, torch.float16, DEVICE)
    layer.fused = False
    ref, rgx, rgrads = _fwd_bwd(layer, x, torch.float16, DEVICE)
    assert out.dtype == ref.dtype == torch.promote_types(x_dtype, torch.float16)
    assert gx.dtype == rgx.dtype == x_dtype
    # fp16 GEMMs accumulating in fp32: the error is that of the fp16 roundings a result
    # goes through (operands, p, U, the stored P1 and gz', the outputs), not of the sums
    assert_sums_close(out, ref, terms=16, dtype=torch.float16, name="out")
    assert_sums_close(gx, rgx, terms=32, dtype=torch.float16, name="dx")
    assert grads.keys() == rgrads.keys()
    for n in grads:
        assert_sums_close(grads[n], rgrads[n], terms=32, dtype=torch.float16, name=n)


def test_op_output_dtype_is_promote_of_x_and_compute_dtype(kernels):
    """bf16 features with fp16 parameters give fp32 out, as the reference's promotion
    does (the first native run found the fused path returning bf16 here), and bf16 dx;
    both against float64 on the same inputs."""
    import torch.nn.functional as F

    import rein_kernels
    from _parity import DEVICE, op_args

    gen = torch.Generator().manual_seed(5)
    C, m = 24, 7
    x = torch.randn(2, 5, C, generator=gen).to(DEVICE, torch.bfloat16)
    g = torch.randn(2, 5, C, generator=gen).to(DEVICE)
    T, W_t, W_d = (torch.randn(*s, generator=gen).mul(0.2).to(DEVICE, torch.float16)
                   for s in ((m, C), (C, C), (C, C)))
    b_t, b_d = (torch.randn(C, generator=gen).mul(0.2).to(DEVICE, torch.float16) for _ in range(2))
    scale = torch.tensor(0.5, device=DEVICE, dtype=torch.float16)
    U = F.linear(F.linear(T[1:], W_t, b_t), W_d).contiguous()
    xg = x.clone().requires_grad_(True)
    out, _ = kernels.rein_layer_fwd(*op_args(kernels, xg, T, U, W_d, b_d, scale, 1, 1, True))
    assert out.dtype == torch.float32
    (gx,) = torch.autograd.grad(out, [xg], g)
    assert gx.dtype == torch.bfloat16

    x64 = x.double().requires_grad_(True)
    ref = rein_kernels.rein_layer_reference(x64, *(t.double() for t in (T, W_t, b_t, W_d, b_d, scale)),
                                            batch_first=True, num_prefix_tokens=1)
    (rgx,) = torch.autograd.grad(ref, [x64], g.double())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-2)
    torch.testing.assert_close(gx.double(), rgx, rtol=0, atol=3e-2)


def test_backward_inside_an_autocast_region():
    """Backward run inside the forward's fp16 region gives the gradients it gives outside."""
    from _parity import DEVICE

    torch.manual_seed(2)
    layer = rein.ReinLayer(2, 40, 4, token_length=9, lora_dim=4, scale_init=0.4).to(DEVICE)
    x = torch.randn(2, 7, 40, device=DEVICE)
    g = torch.randn(2, 7, 40, device=DEVICE)
    params = [p for p in layer.parameters() if p.requires_grad]

    def grads(inside):
        xg = x.clone().requires_grad_(True)
        with torch.autocast(DEVICE, dtype=torch.float16):
            out = layer(xg, 1, batch_first=True)
            if inside:
                return torch.autograd.grad(out, [xg] + params, g.to(out.dtype), allow_unused=True)
        return torch.autograd.grad(out, [xg] + params, g.to(out.dtype), allow_unused=True)

    for a, b in zip(grads(True), grads(False)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_backward_op_ignores_an_enclosing_autocast_region(kernels):
    """rein::layer_bwd picks every dtype itself: inside a bf16 region its fp16 gradients
    are the same bits as outside (without its guard, the weight GEMMs would be recast)."""
    import torch.nn.functional as F

    from _parity import DEVICE, bwd_args, op_args

    gen = torch.Generator().manual_seed(4)
    C, m = 24, 7

    def r(*shape, s=0.3):
        return (torch.randn(*shape, generator=gen) * s).to(DEVICE, torch.float16)

    x, g = r(2, 6, C, s=1.0), r(2, 6, C, s=1.0)
    T, W_t, b_t, W_d, b_d = r(m, C), r(C, C), r(C), r(C, C), r(C)
    scale = torch.tensor(0.7, device=DEVICE, dtype=torch.float16)
    U = F.linear(F.linear(T[1:], W_t, b_t), W_d).contiguous()
    fwd_args = op_args(kernels, x, T, U, W_d, b_d, scale, 1, 1, True)
    _, lse = kernels.rein_layer_fwd(*fwd_args)
    args = bwd_args(kernels, g, fwd_args, lse)
    outside = kernels.rein_layer_bwd(*args)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        inside = kernels.rein_layer_bwd(*args)
    for a, b in zip(inside, outside):
        assert a.dtype == b.dtype == torch.float16 and torch.equal(a, b)
