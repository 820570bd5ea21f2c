"""The fused layer as a torch.library custom op: opcheck, torch.compile without graph breaks."""
import pytest
import torch

import rein
from _parity import DEVICE, bwd_args, op_args
from _tolerance import assert_sums_close


def _op_args(op, seq_dim, prefix, softmax, requires_grad=True, x_dtype=torch.float32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seq_dim * 10 + prefix)
    C, m = 21, 7

    def r(*s, dt=dtype):
        return (torch.randn(*s, generator=g) * 0.5).to(DEVICE, dt).requires_grad_(requires_grad)

    return op_args(op, r(3, 5, C, dt=x_dtype), r(m, C), r(m - 1, C), r(C, C), r(C), r((), dt=torch.float32),
                   prefix, seq_dim, softmax)


# x and the parameters in different dtypes, as under autocast: the fake implementation's
# dtypes must be the real ones (out: promote(x, parameters); dx: x's; the others their input's)
MIXED = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float16),
         (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("x_dtype,dtype", MIXED)
def test_fake_results_have_the_real_dtypes_and_shapes(x_dtype, dtype, kernels):
    """What torch.compile plans with (the fake implementations) is what the kernels return."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _op_args(kernels, 1, 1, True, requires_grad=False, x_dtype=x_dtype, dtype=dtype)
    real_fwd = kernels.rein_layer_fwd(*args)
    real_bwd = kernels.rein_layer_bwd(*bwd_args(kernels, torch.randn_like(args[0]), args, real_fwd[1]))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake_fwd = kernels.rein_layer_fwd(*fake_args)
        fake_bwd = kernels.rein_layer_bwd(*bwd_args(kernels, torch.empty_like(fake_args[0]), fake_args,
                                                    fake_fwd[1]))
    for real, fake in zip((*real_fwd, *real_bwd), (*fake_fwd, *fake_bwd)):
        assert (real.dtype, real.shape) == (fake.dtype, fake.shape)


@pytest.mark.parametrize("x_dtype,dtype", MIXED)
@pytest.mark.parametrize("seq_dim,prefix,softmax", [(0, 1, True), (1, 0, True), (1, 2, False)])
def test_opcheck_forward(seq_dim, prefix, softmax, x_dtype, dtype, kernels):
    torch.library.opcheck(kernels.rein_layer_fwd,
                          _op_args(kernels, seq_dim, prefix, softmax, x_dtype=x_dtype, dtype=dtype))


@pytest.mark.parametrize("x_dtype,dtype", MIXED)
def test_opcheck_backward(x_dtype, dtype, kernels):
    args = _op_args(kernels, 1, 1, True, requires_grad=False, x_dtype=x_dtype, dtype=dtype)
    _, lse = kernels.rein_layer_fwd(*args)
    torch.library.opcheck(kernels.rein_layer_bwd, bwd_args(kernels, torch.randn_like(args[0]), args, lse))


@pytest.mark.slow
@pytest.mark.parametrize("registration", ["custom_op", pytest.param("triton_op", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch.compile traces a triton_op's kernels on a GPU only"))])
def test_compile_fullgraph_matches_eager(registration, monkeypatch, kernels):
    import rein_kernels

    monkeypatch.setattr(rein_kernels, "REGISTRATION", registration)
    torch._dynamo.reset()
    layer = rein.ReinLayer(3, 21, 4, token_length=7, lora_dim=4, scale_init=0.4).to(DEVICE)

    def step(x):
        out = layer(x, 1, batch_first=True)
        return out, layer.return_auto(out)[1]

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(2, 9, 21, device=DEVICE)
    results = []
    for fn in (compiled, step):
        xg = x.clone().requires_grad_(True)
        out, q = fn(xg)
        params = [xg] + list(layer.parameters())
        results.append((out, q, torch.autograd.grad((out * out).sum() + q.sum(), params)))
    (o1, q1, g1), (o2, q2, g2) = results
    C, m, L, Q, rows = 21, 7, 3, layer.query_dims, 2 * 9
    # sums over the channels and tokens; the queries' over the rank, channels, layers and
    # merged 3 Q; the gradients' also over the rows (the scale's over rows x channels)
    assert_sums_close(o1, o2, terms=C + m, name="out")
    assert_sums_close(q1, q2, terms=4 + C + L + 3 * Q, name="queries")
    for k, (a, b) in enumerate(zip(g1, g2)):
        assert_sums_close(a, b, terms=rows * C if b.dim() == 0 else rows + C + m + 3 * Q, name=f"gradient {k}")


@pytest.mark.parametrize("name", ["default", "registers", "lora_seq_first_no_softmax", "wide"])
def test_triton_op_registration_matches_the_float64_reference(name, monkeypatch, kernels):
    """The kernels registered as a torch.library.triton_op (what torch.compile traces on a
    GPU) compute what the custom op does: the parity check, eagerly (interpreter on a CPU)."""
    import dataclasses
    import zlib

    import rein_kernels
    from _parity import check_case
    from test_parity import CASES

    op = kernels
    if not op.HAS_TRITON_OP:
        pytest.skip("torch.library.triton_op needs torch >= 2.6")
    calls = []
    real = op.rein_layer_fwd_t
    monkeypatch.setattr(op, "rein_layer_fwd_t", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(rein_kernels, "REGISTRATION", "triton_op")
    check_case(dataclasses.replace(CASES[name], dtype="fp32"), seed=zlib.crc32(name.encode()) % 1000)
    assert calls, "the triton_op registration was not used"
