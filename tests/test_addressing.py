"""Element offsets past 2^31 on any device: x viewed with sequences 2^30 elements apart.

The view lies in the middle of an 8 GiB (virtual, untouched) fp16 buffer, so that an
offset computed in int32 wraps to an address inside the buffer: the test then fails on
its values (an assertion) rather than on a segfault. Only the pages of the few rows used
are ever touched, so it needs little real memory, on the CPU too.
"""
import torch

import rein
from _parity import DEVICE
from _tolerance import assert_sums_close

STRIDE = 2**30


def test_offsets_past_2_pow_31_forward_and_backward(kernels):
    C, S0, S1 = 24, 3, 5
    base = torch.empty(2**32 + S1 * C, dtype=torch.float16, device=DEVICE)
    x = base.as_strided((S0, S1, C), (STRIDE, C, 1), storage_offset=2**31)
    gen = torch.Generator().manual_seed(3)
    x.copy_(torch.randn(S0, S1, C, generator=gen))
    g = torch.randn(S0, S1, C, generator=gen).to(DEVICE, torch.float16)
    assert x.storage_offset() + (S0 - 1) * STRIDE > 2**31 and x.data_ptr() - base.data_ptr() >= 2**32
    torch.manual_seed(0)
    layer = rein.ReinLayer(1, C, 4, token_length=5, scale_init=0.5).to(DEVICE, torch.float16)
    params = list(layer.parameters())

    def fwd_bwd(inp, fused):
        layer.fused = fused
        inp = inp.detach().requires_grad_(True)
        out = layer(inp, 0, batch_first=True)
        grads = torch.autograd.grad(out, [inp] + params, g, allow_unused=True)
        return out, grads

    out, grads = fwd_bwd(x, True)
    ref, ref_grads = fwd_bwd(x.float().contiguous().half(), False)
    # fp16 on both paths: the error is that of the fp16 roundings a result goes through
    # (operands, p, U, the stored P1 and gz', the outputs; the reference's sums on a CPU)
    assert_sums_close(out, ref, terms=16, dtype=torch.float16, name="out")
    for k, (got, want) in enumerate(zip(grads, ref_grads)):
        if want is None:
            assert got is None
            continue
        assert_sums_close(got, want, terms=32, dtype=torch.float16, name=f"gradient {k}")
