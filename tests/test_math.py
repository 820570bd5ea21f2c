"""The layer against an independent statement of its maths, and against numbers
worked out by hand.

The parity suite checks the kernels against autograd of the reference; if both were
wrong the same way (a softmax scale, a dropped bias) it would pass. Here the closed
form of ``_closed_form.py`` (written from docs/maths.md, no autograd, no U) judges the
reference in float64 and the kernels in fp32, and two tiny cases are pinned to values
computed on paper.
"""
import copy
import math

import pytest
import torch

import rein
from _closed_form import closed_form, layer_grads
from _parity import DEVICE, make_layer, make_x, run
from _tolerance import assert_sums_close

from test_parity import CASES

# Named parity cases with the whole layer exercised (refined rows and value tokens).
MATH_CASES = ["default", "seq_first", "no_cls", "registers", "no_softmax", "lora",
              "lora_seq_first_no_softmax", "zero_mlp_delta_f", "negative_scale", "wide", "last_layer",
              "large_logits", "one_hot"]


def _setup(name, seed=11):
    case = CASES[name]
    layer = make_layer(case, seed)
    x = make_x(case, seed)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 7)).to(DEVICE)
    return case, layer, x, g


def _closed(case, layer, x, g):
    T = layer.get_tokens(case.layer)
    out, grads = closed_form(
        x, g, T.detach(), layer.mlp_token2feat.weight.detach(), layer.mlp_token2feat.bias.detach(),
        layer.mlp_delta_f.weight.detach(), layer.mlp_delta_f.bias.detach(),
        torch.tensor(1.0, dtype=x.dtype) if layer.zero_mlp_delta_f else layer.scale.detach(),
        batch_first=case.batch_first, num_prefix=case.prefix, use_softmax=case.softmax)
    return out, {"x": grads["x"], **layer_grads(layer, case.layer, grads)}


def _compare(out, grads, c_out, c_grads, rel):
    def check(name, got, want):
        scale = max(want.abs().max().item(), 1e-12)
        err = (got.double() - want).abs().max().item()
        assert err <= rel * scale, f"{name}: error {err:.3e} > {rel:.0e} x {scale:.3e}"

    check("out", out, c_out)
    for name, want in c_grads.items():
        check(name, grads[name], want)
    # everything the layer does not use (transform, merge) gets no gradient from it
    for name in set(grads) - set(c_grads):
        assert not grads[name].abs().any(), name


@pytest.mark.parametrize("name", MATH_CASES)
def test_reference_matches_closed_form_float64(name):
    case, layer, x, g = _setup(name)
    layer = layer.double().to(DEVICE)
    c_out, c_grads = _closed(case, layer, x.double(), g.double())
    out, grads = run(layer, x.double(), g.double(), False, case.batch_first, case.prefix, case.layer)
    _compare(out, grads, c_out, c_grads, rel=1e-10)


@pytest.mark.parametrize("name", MATH_CASES)
def test_fused_matches_closed_form(name, kernels):
    """fp32 kernels (tf32 off) against float64 maths on the same fp32 inputs."""
    case, layer, x, g = _setup(name)
    layer = layer.to(DEVICE)
    c_out, c_grads = _closed(case, copy.deepcopy(layer).double(), x.double(), g.double())
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out, grads = run(layer, x, g, True, case.batch_first, case.prefix, case.layer)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    # large logits: softmax inputs of ~100 carry fp32 rounding of ~1e-5 into p
    _compare(out, grads, c_out, c_grads, rel=1e-3 if name in ("large_logits", "one_hot") else 1e-4)


LN3 = math.log(3.0)
# Worked on paper (docs/maths.md's forward and backward), C = 4, m = 2, one cls row and
# one refined row x = [2, 0, 0, 0]; T = [0 ; (t, 0, 0, 0)], W_t = 0, b_t = (4, 0, 0, 0),
# W_d = I, b_d = (0, 1, 0, 0), scale = 1/2, g = (1, 0, 0, 0) on the refined row.
#  softmax, t = ln 3: c z = (0, ln 3), p = (1/4, 3/4), d = (3, 0, 0, 0), y = (5, 1, 0, 0),
#    out = (4.5, 0.5, 0, 0); gh = (1/2, 0, 0, 0), gp = (0, 2), <p, gp> = 3/2,
#    gz = p (gp - 3/2) / 2 = (-3/16, 3/16); dx = g + gh + gz T = (3/2 + 3 ln3 / 16, 0, 0, 0);
#    dscale = 5; dT = gz^T x = rows (-3/8, ...), (3/8, ...); dV = 3/4 gh = (3/8, 0, 0, 0).
#  no softmax, t = 1: p = z = (0, 2), d = (8, 0, 0, 0), y = (10, 1, 0, 0), out = (7, 0.5, 0, 0);
#    gp = gz = (0, 2); dx = (1 + 1/2 + 2, 0, 0, 0) = (3.5, ...); dscale = 10; dT row 1 = 2 x;
#    dV = 2 gh = (1, 0, 0, 0).
HAND = {
    True: dict(t=LN3, out=[4.5, 0.5, 0, 0], dx=1.5 + 3 * LN3 / 16, dscale=5.0, dT=(-0.375, 0.375),
               dV=0.375, dWd=2.5),
    False: dict(t=1.0, out=[7.0, 0.5, 0, 0], dx=3.5, dscale=10.0, dT=(0.0, 4.0), dV=1.0, dWd=5.0),
}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("softmax", [True, False])
def test_hand_computed_case(softmax, fused):
    want = HAND[softmax]
    layer = rein.ReinLayer(1, 4, 4, token_length=2, use_softmax=softmax, scale_init=0.5, fused=fused)
    with torch.no_grad():
        layer.learnable_tokens.zero_()
        layer.learnable_tokens[0, 1, 0] = want["t"]
        layer.mlp_token2feat.weight.zero_()
        layer.mlp_token2feat.bias.copy_(torch.tensor([4.0, 0, 0, 0]))
        layer.mlp_delta_f.weight.copy_(torch.eye(4))
        layer.mlp_delta_f.bias.copy_(torch.tensor([0.0, 1, 0, 0]))
    layer = layer.to(DEVICE)
    cls = torch.tensor([7.0, -7, 7, -7])
    x = torch.stack([cls, torch.tensor([2.0, 0, 0, 0])])[None].to(DEVICE).requires_grad_(True)
    g = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [1.0, 0, 0, 0]]], device=DEVICE)
    out = layer(x, 0, batch_first=True)
    params = dict(layer.named_parameters())
    gx, gT, gWt, gbt, gWd, gbd, gs = torch.autograd.grad(out, [x] + [params[k] for k in (
        "learnable_tokens", "mlp_token2feat.weight", "mlp_token2feat.bias", "mlp_delta_f.weight",
        "mlp_delta_f.bias", "scale")], g)

    def close(got, expected):  # fp32 sums over at most the 2 rows, the 4 channels and the 2 tokens
        assert_sums_close(got.cpu().double(), torch.as_tensor(expected, dtype=torch.float64), terms=2 + 4 + 2)

    close(out[0, 0], cls)  # the cls row passes through
    close(out[0, 1], want["out"])
    close(gx[0, 0], g[0, 0].cpu())
    close(gx[0, 1], [want["dx"], 0, 0, 0])
    close(gs, want["dscale"])
    close(gT[0], [[want["dT"][0], 0, 0, 0], [want["dT"][1], 0, 0, 0]])
    close(gbt, [want["dV"], 0, 0, 0])                                 # db_t = sum dV
    close(gWt, torch.zeros(4, 4).index_put_((torch.tensor([0]), torch.tensor([0])),
                                            torch.tensor(want["dV"] * want["t"]).float()))  # dV^T T[1:]
    close(gWd, torch.zeros(4, 4).index_put_((torch.tensor([0]), torch.tensor([0])),
                                            torch.tensor(want["dWd"]).float()))  # gy^T h
    close(gbd, [0.5, 0, 0, 0])


# ----------------------------------------------------------------------------- exact arithmetic


def _integer_layer(C, m, prefix, seed, x_hi=16, batch=3):
    """fp16 parameters, inputs and an output gradient holding small integers, no softmax:
    every product and every partial sum the layer forms is an integer under 2^24, so fp32
    accumulation is exact and the only rounding is the final one to fp16. A kernel that
    accumulates (or keeps a partial sum) in fp16, or rounds scale * acc before adding the
    residual, differs from the correctly rounded result somewhere."""
    gen = torch.Generator().manual_seed(seed)

    def ints(*shape, hi):
        return torch.randint(-hi, hi + 1, shape, generator=gen).to(torch.float16)

    layer = rein.ReinLayer(1, C, 4, token_length=m, use_softmax=False, scale_init=1.0)
    with torch.no_grad():
        layer.learnable_tokens.copy_(ints(1, m, C, hi=1))
        # sparse, so that U and g U^T stay small enough for fp16 to hold them exactly
        sparse = torch.rand(C, C, generator=gen) < 0.15
        layer.mlp_token2feat.weight.copy_(ints(C, C, hi=1) * sparse)
        layer.mlp_token2feat.bias.copy_(ints(C, hi=1))
        layer.mlp_delta_f.weight.copy_(ints(C, C, hi=2))
        layer.mlp_delta_f.bias.copy_(ints(C, hi=40))
    layer = layer.half()
    layer.scale = torch.nn.Parameter(layer.scale.float())  # fp32: dscale comes back unrounded
    layer = layer.to(DEVICE)
    x = ints(batch, 29, C, hi=x_hi).to(DEVICE)
    g = ints(batch, 29, C, hi=3).to(DEVICE)
    return layer, x, g


@pytest.mark.parametrize("prefix", [0, 1])
def test_fused_rounds_once_and_accumulates_in_fp32(prefix, kernels):
    layer, x, g = _integer_layer(C=24, m=5, prefix=prefix, seed=5 + prefix)
    out, grads = run(layer, x, g, True, True, prefix, 0)
    exact_layer = copy.deepcopy(layer).double()
    want, want_grads = run(exact_layer, x.double(), g.double(), False, True, prefix, 0)
    # the exact values are integers (checked); out is large enough that fp16 must round
    # many of its elements, and dscale sums terms far past fp16's integers
    for t in (want, want_grads["x"], want_grads["scale"]):
        assert torch.equal(t, t.round()) and t.abs().max() < 2**24
    assert (want.abs() > 2048).sum() > 20
    y = (want - x.double()) / layer.scale.item()
    assert (g.double() * y).abs().sum() > 2**16
    # out and dx are the exact result rounded once to fp16; dscale is exact (fp32 holds it)
    assert torch.equal(out, want.half()), (out.double() - want).abs().max()
    assert torch.equal(grads["x"], want_grads["x"].half()), (grads["x"].double() - want_grads["x"]).abs().max()
    assert grads["scale"].float().item() == want_grads["scale"].item()


def test_fp32_parameters_get_fp32_sums_under_autocast(monkeypatch):
    """Kernels v4 under fp16 autocast with fp32 parameters: the weight-gradient GEMMs return
    fp32 sums, so dscale, which autograd forms from them (<W_d, dW> + <U, dU> + <b_d, db>),
    is exact on integer data where fp16 would round it (v3 rounds dW_d to the compute dtype)."""
    import rein_kernels

    monkeypatch.setattr(rein_kernels, "KERNELS", "v4")
    layer, x, g = _integer_layer(C=24, m=5, prefix=1, seed=7, x_hi=64, batch=6)
    layer = layer.float()
    # g^T x, dW's direct part, has integers past fp16's 2048 that fp16 cannot hold
    direct = g[:, 1:].double().flatten(0, 1).t() @ x[:, 1:].double().flatten(0, 1)
    assert (direct.half().double() != direct).any()
    with torch.autocast(DEVICE, dtype=torch.float16):
        _, grads = run(layer, x, g, True, True, 1, 0)
    exact_layer = copy.deepcopy(layer).double()
    _, want = run(exact_layer, x.double(), g.double(), False, True, 1, 0)
    assert torch.equal(want["scale"], want["scale"].round()) and abs(want["scale"].item()) > 2**11
    assert grads["scale"].dtype == torch.float32
    assert grads["scale"].item() == want["scale"].item()
