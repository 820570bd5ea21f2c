"""Shared machinery of the parity suite: fused vs the float64 reference, forward and grads."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

import rein
import rein_kernels
import rein_kernels._common as common

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative tolerance (of max |reference|) per dtype, on top of 2x torch's own error in
# that dtype (the flash-attn bound: |fused - ref| <= 2 |torch - ref| + tol * max|ref|).
TOL = {
    # CPU interpreter: fp32 dots are exact products with fp32 sums; GPU fp32 with
    # tf32 off is the same arithmetic in another order.
    "fp32": 2e-5,
    # tf32 keeps 10 mantissa bits of each operand: ~5e-4 relative per product.
    "tf32": 5e-3,
    # fp16 operands (11 bits) with fp32 accumulation; P1/gz' stored in fp16, and the
    # parameter gradients formed from them by fp16 autograd (a reduction over m-1 tokens
    # for db_t): 5e-3 failed 1 of 400 random fp16 cases by 7% (db_t, C = 5).
    "fp16": 1e-2,
    # bf16 operands (8 bits) with fp32 accumulation; P1/gz' stored in bf16.
    "bf16": 3e-2,
}
DTYPE = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Case:
    B: int = 2
    N: int = 13
    C: int = 37
    m: int = 11
    L: int = 3
    layer: int = 1
    lora: int | None = None
    batch_first: bool = True
    prefix: int = 1
    softmax: bool = True
    zero_mlp: bool = False
    scale: float = 0.37
    dtype: str = "fp32"
    # x ~ x_scale * N(0, 1); tokens ~ U(-token_scale, token_scale) when set (trained-size
    # tokens instead of the init's ~0.2), full-rank tokens only. Together they reach
    # scaled logits of 100 and more.
    x_scale: float = 1.0
    token_scale: float | None = None
    # the prefix positions (cls, registers) scaled by this: register tokens can be far
    # larger than patch tokens, and must not leak into any gradient
    prefix_scale: float = 1.0


def op_args(op, x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax) -> tuple:
    """The arguments of ``op.rein_layer_fwd`` (v3 or v4) for one layer's operands in the
    compute dtype: v4 takes the scale folded into U, W and b and the compute dtype itself."""
    if op.__name__.endswith("_v4"):
        U, W, b = ((t * scale).to(T.dtype).detach().requires_grad_(T.requires_grad) for t in (U, W_d, b_d))
        return (x, T, U, W, b, T.detach(), U.detach(), T.dtype, num_prefix, seq_dim, use_softmax)
    return (x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax)


def bwd_args(op, g, fwd_args, lse) -> tuple:
    """The arguments of ``op.rein_layer_bwd`` for a forward's ``op_args`` and its lse."""
    if op.__name__.endswith("_v4"):  # (g, x, W, b, Tc, Uc, lse, cdtype, ...)
        return (g, fwd_args[0], *fwd_args[3:7], lse, *fwd_args[7:])
    return (g, *fwd_args[:6], lse, *fwd_args[6:])


def make_layer(case: Case, seed: int) -> rein.ReinLayer:
    torch.manual_seed(seed)
    layer = rein.ReinLayer(
        case.L, case.C, 4, token_length=case.m, lora_dim=case.lora,
        use_softmax=case.softmax, zero_mlp_delta_f=case.zero_mlp, scale_init=case.scale,
    )
    with torch.no_grad():  # trained-looking values instead of the init's
        layer.mlp_token2feat.bias.uniform_(-0.5, 0.5)
        layer.mlp_delta_f.bias.uniform_(-0.5, 0.5)
        if case.zero_mlp:  # zero at init only: training moves W_d off zero
            bound = case.C ** -0.5
            layer.mlp_delta_f.weight.uniform_(-bound, bound)
        if case.token_scale is not None:
            assert case.lora is None, "token_scale sets full-rank tokens"
            layer.learnable_tokens.uniform_(-case.token_scale, case.token_scale)
    return layer


def make_x(case: Case, seed: int, device=DEVICE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    shape = (case.B, case.N, case.C) if case.batch_first else (case.N, case.B, case.C)
    x = torch.randn(shape, generator=g) * case.x_scale
    x.narrow(1 if case.batch_first else 0, 0, case.prefix).mul_(case.prefix_scale)
    return x.to(device)


def padded(t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The same values, living in the middle of a larger buffer: other random values
    before it, so that a kernel reading the wrong rows computes wrong (finite) numbers
    that a value check catches rather than crashing, and NaN after it, so that a read
    past the end shows even where the kernel multiplies it by a zero-padded operand."""
    n = t.numel()
    buf = torch.randn(3 * n + 8192, generator=torch.Generator().manual_seed(seed)).to(t.device, t.dtype)
    buf[2 * n + 4096:] = float("nan")
    out = buf[n + 4096: 2 * n + 4096].view(t.shape)
    out.copy_(t)
    return out


def guards_intact() -> None:
    """Every guard region behind a kernel's output still holds the poison (nothing wrote
    past it)."""
    for k, guard in enumerate(common.GUARDS):
        intact = torch.isnan(guard) if guard.is_floating_point() else guard == common.poison_value(guard.dtype)
        assert intact.all(), f"a kernel wrote past the end of output buffer {k}"
    common.GUARDS.clear()


def run(layer, x, g, fused: bool, batch_first: bool, prefix: int, layer_idx: int):
    """Forward and every gradient: (out, {name: grad}) with 'x' among the names."""
    layer.fused = fused
    x = x.detach().requires_grad_(True)
    out = layer(x, layer_idx, batch_first=batch_first, num_prefix_tokens=prefix)
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    params = [x] + [p for _, p in layer.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, params, g.to(out.dtype), allow_unused=True)
    return out.detach(), {
        n: (gr if gr is not None else torch.zeros_like(p)) for n, p, gr in zip(names, params, grads)
    }


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


def _term_sizes(ref_layer, x: torch.Tensor, g: torch.Tensor, case: Case) -> dict[str, float]:
    """For the parameter gradients that are sums of products which can cancel, the size
    of what is summed, from the float64 reference (as for dscale below): db_t = sum_j dV_j
    (over the m-1 value tokens), and with LoRA tokens T = A B, dA = dT B^T (over C) and
    dB = A^T dT (over m). A rounding error scales with the terms, not with a result they
    cancel to: a random fp16 draw (LoRA r = 1, db_t summed to 0.016 from terms of absolute
    sum 5.9) once exceeded a bound relative to max |db_t| by 2%."""
    T = ref_layer.get_tokens(case.layer).detach().requires_grad_(True)
    W_t, b_t = ref_layer.mlp_token2feat.weight.detach(), ref_layer.mlp_token2feat.bias.detach()
    V_bias = b_t.expand(case.m - 1, -1).clone().requires_grad_(True)  # its gradient is dV
    scale = ref_layer.scale.detach() if isinstance(ref_layer.scale, torch.Tensor) else ref_layer.scale
    out = rein_kernels.rein_layer_reference(
        x, T, W_t, V_bias, ref_layer.mlp_delta_f.weight.detach(), ref_layer.mlp_delta_f.bias.detach(), scale,
        batch_first=case.batch_first, num_prefix_tokens=case.prefix, use_softmax=case.softmax)
    dT, dV = torch.autograd.grad(out, (T, V_bias), g, allow_unused=True, materialize_grads=True)
    sizes = {"mlp_token2feat.bias": dV.abs().sum(0).max().item()}
    if case.lora is None:
        sizes["learnable_tokens"] = _logit_path_terms(ref_layer, x, g, case, T.detach())
    else:
        A = ref_layer.learnable_tokens_a[case.layer].detach().abs()
        Bm = ref_layer.learnable_tokens_b[case.layer].detach().abs()
        sizes["learnable_tokens_a"] = (dT.abs() @ Bm.t()).max().item()
        sizes["learnable_tokens_b"] = (A.t() @ dT.abs()).max().item()
    return sizes


def _logit_path_terms(ref_layer, x: torch.Tensor, g: torch.Tensor, case: Case, T: torch.Tensor) -> float:
    """The size of what dT's logit path, gz^T x, adds up: |gz|^T |x| with |gz| formed from
    |g| |U|^T (gz = p (gp - <p, gp>) c, gp = g U^T; gz = gp without softmax). A rounding
    error in gp (tf32 keeps 10 bits of g and U) scales with that, not with a dT whose
    terms cancel: a tf32 draw with one refined row and C = 5 exceeded a bound relative to
    max |dT| by 0.2%."""
    feats = (x if case.batch_first else x.transpose(0, 1))[:, case.prefix:].reshape(-1, case.C)
    gr = (g if case.batch_first else g.transpose(0, 1))[:, case.prefix:].reshape(-1, case.C)
    W_t, b_t = ref_layer.mlp_token2feat.weight.detach(), ref_layer.mlp_token2feat.bias.detach()
    scale = ref_layer.scale.detach() if isinstance(ref_layer.scale, torch.Tensor) else ref_layer.scale
    U = torch.nn.functional.linear(torch.nn.functional.linear(T[1:], W_t, b_t), ref_layer.mlp_delta_f.weight.detach())
    gp = gr.abs() @ (U * scale).abs().t()
    if case.softmax:
        c = case.C ** -0.5
        p = torch.softmax(feats @ T.t() * c, dim=-1)
        pgp = (p[:, 1:] * gp).sum(-1, keepdim=True)
        gz = torch.cat([p[:, :1] * pgp, p[:, 1:] * (gp + pgp)], dim=1) * c
    else:
        gz = torch.cat([torch.zeros_like(gp[:, :1]), gp], dim=1)
    return (gz.t() @ feats.abs()).max().item() if feats.numel() else 0.0


def check_case(case: Case, seed: int = 0) -> None:
    """Fused in case.dtype vs the float64 reference, bounded by torch's error in case.dtype.

    The float64 reference is evaluated on the same inputs and parameters the fused and
    torch runs get, i.e. already rounded to case.dtype: what is measured is the error
    of the computation, not of rounding its inputs. That matters for dscale, a sum over
    rows x C products that nearly cancel: rounding x, g and the weights to bf16 alone
    moves it by 5-20% (measured: 0.78 -> 0.91 on the no_softmax case), which a bound
    relative to |dscale| cannot absorb, and torch's own bf16 error only sometimes does.
    """
    base = make_layer(case, seed)
    x = make_x(case, seed)
    torch.manual_seed(seed + 2)
    g = torch.randn(x.shape)
    g.narrow(1 if case.batch_first else 0, 0, case.prefix).mul_(case.prefix_scale)
    args = (case.batch_first, case.prefix, case.layer)

    dt = DTYPE[case.dtype]
    x, g = x.to(dt), g.to(dt)
    low = copy.deepcopy(base).to(DEVICE, dt)
    ref_layer = copy.deepcopy(low).double()
    ref_out, ref_grads = run(ref_layer, x.double(), g.double().to(DEVICE), False, *args)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case.dtype == "tf32"
    common.POISON = True
    common.GUARDS.clear()
    try:
        out, grads = run(low, padded(x, seed), padded(g.to(DEVICE), seed + 1), True, *args)
        guards_intact()
        torch_out, torch_grads = run(low, x, g.to(DEVICE), False, *args)
    finally:
        common.POISON = False
        common.GUARDS.clear()
        torch.backends.cuda.matmul.allow_tf32 = tf32

    assert out.dtype == dt and out.shape == ref_out.shape
    tol = TOL[case.dtype]
    # The adapter's own contributions, out - x and dx - g, each bounded relative to its
    # own size: at scale 1e-3 a bound relative to |out| would hide the whole adapter.
    xd, gd = x.to(DEVICE).double(), g.to(DEVICE).double()
    checks = [("out - x", out.double() - xd, torch_out.double() - xd, ref_out - xd),
              ("dx - g", grads["x"].double() - gd, torch_grads["x"].double() - gd, ref_grads["x"] - gd)]
    checks += [(n, grads[n], torch_grads[n], ref_grads[n]) for n in ref_grads if n != "x"]
    # dscale = sum over refined rows of <g, y>: its rounding error scales with the sum of
    # the |g y| it adds up, which can be far larger than the (cancelling) result.
    scale_terms = None
    if isinstance(ref_layer.scale, torch.nn.Parameter):
        scale_terms = (gd * (ref_out - xd)).abs().sum().item() / abs(ref_layer.scale.item())
    terms = _term_sizes(ref_layer, x.to(DEVICE).double(), gd, case)
    # out and dx are stored in their dtype whole, the residual included: their rounding,
    # a few units of the last place of |out| or |dx|, shows in out - x and dx - g however
    # small the adapter's part (a GEMM that adds to the residual in place, as v4's do, may
    # round once per K block, as the CPU's BLAS does)
    whole = {"out - x": 4 * torch.finfo(dt).eps * ref_out.abs().max().item(),
             "dx - g": 4 * torch.finfo(dt).eps * ref_grads["x"].abs().max().item()}
    for name, got, theirs, ref in checks:
        assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten or overflow) in {case}"
        size = max(ref.abs().max().item(), 1e-6)
        if name == "scale" and scale_terms is not None:
            size = max(size, scale_terms)
        size = max(size, terms.get(name, 0.0))
        bound = 2 * _err(theirs, ref) + tol * size + whole.get(name, 0.0)
        err = _err(got, ref)
        assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} in {case}"
