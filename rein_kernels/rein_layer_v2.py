"""The fused Rein layer, kernels v2 (2026-11-28): kept selectable (``REIN_KERNELS=v2``) until a
GPU run has measured v3 (``rein_layer.py``) beside it. Custom ops ``rein::layer_fwd_v2`` and
``rein::layer_bwd_v2``.

Math (docs/maths.md). For every refined row x (length C) of layer l, with tokens
T [m, C], c = C^-1/2 (1 without softmax), W_d, b_d = mlp_delta_f and
U = mlp_token2feat(T[1:]) W_d^T [m-1, C] (an input, formed from the parameters by
``rein_kernels.prepare``: per call, or once per forward pass for all layers):

    z   = x T^T                         [m]
    p   = softmax(c z) = exp(c z - lse) (p = z without softmax)
    out = x + scale * (x W_d^T + p[1:] U + b_d)

Forward = two launches:
  * ``_rein_logits_kernel`` (FORWARD): z, the softmax and lse per row; writes p[1:]
    as P1 [rows, m-1] and lse [rows] (fp32).
  * ``_rein_gemm_kernel``: out = x + scale * ([x | P1] @ [W_d^T ; U] + b_d), one GEMM
    whose K runs over C and then m-1, with the residual in the epilogue.
Only x, lse and the parameters are saved for backward. Nothing of size [rows, C]
besides x and out touches memory.

Backward, g = dL/dout, with p recomputed from the saved lse:
    gp'  = g U^T  (gp'[0] = 0)                 (gp = scale * gp')
    gz'  = p (gp' - <p, gp'>) c                (gz' = gp' without softmax; gz = scale * gz')
    dx   = g + scale * (g W_d + gz' T)         (``_rein_gemm_kernel`` with K = C + m)
    dT   = scale * gz'^T x                     (logit path; the value path reaches T
                                                through U by autograd)
    dU   = scale * P1^T g
    dW_d = scale * g^T x                       (direct path; the U path adds the rest)
    db_d = scale * sum_rows(g)
    dscale = <W_d, g^T x> + <b_d, sum_rows(g)> + <U, P1^T g>
           = sum_r (<g_r W_d + gz'_r T, x_r> - <gz'_r, z_r> + <p_r, gp'_r>) + <b_d, sum_rows(g)>
  * ``_rein_logits_kernel`` (BACKWARD) recomputes p and writes gz' [rows, m], P1 and
    per-program fp32 shares of sum_r <p_r, gp'_r> - <gz'_r, z_r>.
  * ``_rein_gemm_kernel`` forms dx and per-tile fp32 shares of sum_r <acc_r, x_r>.
  * the [C, C], [m, C] weight-gradient reductions over all rows are torch.matmul (cuBLAS).

Rows. The op takes x as a 3-D tensor [S0, S1, C] of any strides and ``seq_dim``, the
dimension that holds the sequence; the first ``num_prefix`` positions of that dimension
pass through (out = x, dx = g) and add nothing to any parameter gradient. The
launchers order rows as memory does (the outer-strided dimension first) and view them as
a [rows, C] matrix with one row stride: free when rows are evenly spaced in memory, one
copy otherwise. The kernels read every operand as blocks of such matrices (block
pointers, int64 strides; row offsets into [rows, m] buffers are int64 too), so
rows * C > 2^31 is fine.

Dtypes. The dot operands are cast to the parameters' dtype (the compute dtype, e.g.
bf16 under autocast) and accumulate in fp32; softmax, lse and the epilogue are fp32.
out has the dtype the reference's promotion gives, promote(x, compute dtype): x's own
without autocast, fp32 for bf16 features under fp16 autocast. dx has x's dtype. The
weight-gradient GEMMs run in the compute dtype, as autocast runs the reference's.
fp32 dots follow ``torch.backends.cuda.matmul.allow_tf32``.
"""
from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from ._common import as_dtype as _as
from ._common import configs as _configs
from ._common import fma_or_tc as _path
from ._common import min_block as _min_block
from ._common import new as _new
from ._common import precision as _precision
from ._common import refined_rows as _refined_rows
from ._common import row_view as _row_view
from ._common import rows as _rows

# Configs, from ptxas' report for sm_90 (tests/compile_sm90.py): every one compiles
# without register spills in every dtype, for aligned (published C) and odd shapes.
# Tensor-core dots (bf16, fp16, tf32) and fp32 FMA dots (tf32 off) differ in what fits
# in registers, so each kernel has a config list per path.
LOGITS_GPU_CONFIGS = {
    "tc": [triton.Config({"BLOCK_R": 64, "BLOCK_K": 32}, num_warps=8, num_stages=s) for s in (3, 4)],
    "fma": [triton.Config({"BLOCK_R": 32, "BLOCK_K": bk}, num_warps=8, num_stages=s) for bk, s in ((32, 3), (16, 2))],
}
GEMM_GPU_CONFIGS = {
    "tc": [triton.Config({"BLOCK_R": br, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
           for br, bn, bk, w, s in [(64, 128, 64, 4, 4), (64, 128, 32, 4, 4), (64, 256, 32, 8, 3)]],
    "fma": [triton.Config({"BLOCK_R": br, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for br, bn, bk, w, s in [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 8, 3), (64, 64, 16, 4, 3)]],
}
_LOGITS_INTERP = triton.Config({"BLOCK_R": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)
_GEMM_INTERP = triton.Config({"BLOCK_R": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)


@triton.jit
def _rein_logits_kernel(
    X, G, T, U, LSE, P1, GZ, PARTIAL,
    R, S1, C, M,
    sx, sg,
    num_prefix, c_scale,
    SEQ_DIM: tl.constexpr, USE_SOFTMAX: tl.constexpr, BACKWARD: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per block of rows: z = x T^T, the softmax, and (BACKWARD) gz'.

    Token 0 (the null token: in the softmax, no value) is kept apart as z0 [rows], and
    tokens 1..m-1 as z [rows, m-1], so that z's columns line up with P1 = p[1:] and with
    the rows of U: every tile is a plain block of a dense matrix.
    FORWARD writes lse = logsumexp(c [z0 | z]) (fp32) and P1 = p[1:].
    BACKWARD reads lse, recomputes p = exp(c z - lse), accumulates gp' = g U^T (the null
    token's gp' is 0) and writes P1, gz' = p (gp' - <p, gp'>) c into GZ [rows, m] (column
    0 the null token's), and this program's share of dscale, the sum over its rows of
    <p, gp'> - <gz', [z0 | z]>, into PARTIAL[pid] (fp32; gz' as rounded for the GEMM that
    consumes it). Prefix rows write zeros to P1 and GZ, so that the weight-gradient GEMMs
    over all rows see them as absent.
    """
    pid = tl.program_id(0)
    r0 = pid * BLOCK_R
    in_range, refined = _refined_rows(r0, R, S1, num_prefix, SEQ_DIM, BLOCK_R)
    x_bp = tl.make_block_ptr(X, (R, C), (sx, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    # T^T of the value tokens: column j is token j + 1
    t_bp = tl.make_block_ptr(T + C, (C, M - 1), (1, C), (0, 0), (BLOCK_K, BLOCK_M), (0, 1))
    ks = tl.arange(0, BLOCK_K)
    z = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    z0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    if BACKWARD:
        g_bp = tl.make_block_ptr(G, (R, C), (sg, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
        u_bp = tl.make_block_ptr(U, (C, M - 1), (1, C), (0, 0), (BLOCK_K, BLOCK_M), (0, 1))
        gp = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        tk = tl.load(t_bp, boundary_check=(0, 1), padding_option="zero")
        xk = tl.load(x_bp, boundary_check=(0, 1), padding_option="zero").to(tk.dtype)
        t0 = tl.load(T + k0 + ks, mask=k0 + ks < C, other=0.0)
        z = tl.dot(xk, tk, z, input_precision=PRECISION)
        z0 += tl.sum(xk.to(tl.float32) * t0.to(tl.float32)[None, :], axis=1)
        x_bp = tl.advance(x_bp, (0, BLOCK_K))
        t_bp = tl.advance(t_bp, (BLOCK_K, 0))
        if BACKWARD:
            uk = tl.load(u_bp, boundary_check=(0, 1), padding_option="zero")
            gk = tl.load(g_bp, boundary_check=(0, 1), padding_option="zero").to(uk.dtype)
            gp = tl.dot(gk, uk, gp, input_precision=PRECISION)
            g_bp = tl.advance(g_bp, (0, BLOCK_K))
            u_bp = tl.advance(u_bp, (BLOCK_K, 0))

    col_ok = tl.arange(0, BLOCK_M) < M - 1
    rows = r0 + tl.arange(0, BLOCK_R)
    if USE_SOFTMAX:
        s = tl.where(col_ok[None, :], z * c_scale, float("-inf"))
        s0 = z0 * c_scale
        if BACKWARD:
            lse = tl.load(LSE + rows, mask=in_range, other=0.0)
        else:
            s_max = tl.maximum(tl.max(s, axis=1), s0)
            lse = s_max + tl.log(tl.sum(tl.exp(s - s_max[:, None]), axis=1) + tl.exp(s0 - s_max))
            tl.store(LSE + rows, lse, mask=in_range)
        p = tl.exp(s - lse[:, None])
        p0 = tl.exp(s0 - lse)
    else:
        p = z
        p0 = z0
    p = tl.where(refined[:, None], p, 0.0)
    p1_bp = tl.make_block_ptr(P1, (R, M - 1), (M - 1, 1), (r0, 0), (BLOCK_R, BLOCK_M), (1, 0))
    tl.store(p1_bp, p.to(P1.dtype.element_ty), boundary_check=(0, 1))
    if BACKWARD:
        pgp = tl.sum(p * gp, axis=1)
        if USE_SOFTMAX:
            gz = (p * (gp - pgp[:, None]) * c_scale).to(GZ.dtype.element_ty)
            gz0 = tl.where(refined, -p0 * pgp * c_scale, 0.0).to(GZ.dtype.element_ty)
        else:
            gz = tl.where(refined[:, None], gp, 0.0).to(GZ.dtype.element_ty)
            gz0 = tl.zeros([BLOCK_R], dtype=GZ.dtype.element_ty)
        share = pgp - tl.sum(gz.to(tl.float32) * z, axis=1) - gz0.to(tl.float32) * z0
        tl.store(PARTIAL + pid, tl.sum(tl.where(in_range, share, 0.0), axis=0))
        gz_bp = tl.make_block_ptr(GZ + 1, (R, M - 1), (M, 1), (r0, 0), (BLOCK_R, BLOCK_M), (1, 0))
        tl.store(gz_bp, gz, boundary_check=(0, 1))
        tl.store(GZ + rows.to(tl.int64) * M, gz0, mask=in_range)


@triton.jit
def _rein_gemm_kernel(
    A, A2, B1, B2, BIAS, SCALE, OUT, X, PARTIAL,
    R, S1, C, K2,
    sa, so, sx, sb1k, sb1n,
    num_prefix,
    SEQ_DIM: tl.constexpr, B1_T: tl.constexpr, HAS_BIAS: tl.constexpr, DSCALE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT = A + scale * (A @ B1 + A2 @ B2 + bias) on refined rows, OUT = A on prefix rows.

    A [rows, C] (row stride sa; also the residual), B1 [C, C] (strides sb1k, sb1n; B1_T
    when it is a transposed view, so W_d^T needs no copy), A2 [rows, K2] and B2 [K2, C]
    contiguous. Forward: A = x, B1 = W_d^T, A2 = P1, B2 = U, bias = b_d. Backward: A = g,
    B1 = W_d, A2 = gz', B2 = T, no bias; both give the output of one K = C + K2 GEMM plus
    the residual. Every operand is a block of a dense matrix (block pointers advanced
    along K), so no per-element address tensor is built.
    DSCALE (backward) also writes this tile's sum over refined rows of
    <acc, x> = <g W_d, x> + <gz', z> to PARTIAL, fp32: with the row kernel's shares,
    dscale = <W_d, g^T x> + <U, P1^T g> + ... accumulates in fp32 from fp32 partials.
    """
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    r0 = pid_r * BLOCK_R
    n0 = pid_n * BLOCK_N
    a_bp = tl.make_block_ptr(A, (R, C), (sa, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    if B1_T:
        b_bp = tl.make_block_ptr(B1, (C, C), (sb1k, sb1n), (0, n0), (BLOCK_K, BLOCK_N), (0, 1))
    else:
        b_bp = tl.make_block_ptr(B1, (C, C), (sb1k, sb1n), (0, n0), (BLOCK_K, BLOCK_N), (1, 0))
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for _ in range(0, C, BLOCK_K):
        b = tl.load(b_bp, boundary_check=(0, 1), padding_option="zero")
        a = tl.load(a_bp, boundary_check=(0, 1), padding_option="zero").to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_bp = tl.advance(a_bp, (0, BLOCK_K))
        b_bp = tl.advance(b_bp, (BLOCK_K, 0))
    a2_bp = tl.make_block_ptr(A2, (R, K2), (K2, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    b2_bp = tl.make_block_ptr(B2, (K2, C), (C, 1), (0, n0), (BLOCK_K, BLOCK_N), (1, 0))
    for _ in range(0, K2, BLOCK_K):
        a2 = tl.load(a2_bp, boundary_check=(0, 1), padding_option="zero")
        b2 = tl.load(b2_bp, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
        a2_bp = tl.advance(a2_bp, (0, BLOCK_K))
        b2_bp = tl.advance(b2_bp, (BLOCK_K, 0))

    ns = n0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(BIAS + ns, mask=ns < C, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(SCALE).to(tl.float32)
    _, refined = _refined_rows(r0, R, S1, num_prefix, SEQ_DIM, BLOCK_R)
    res_bp = tl.make_block_ptr(A, (R, C), (sa, 1), (r0, n0), (BLOCK_R, BLOCK_N), (1, 0))
    res = tl.load(res_bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    out = tl.where(refined[:, None], res + scale * acc, res)
    out_bp = tl.make_block_ptr(OUT, (R, C), (so, 1), (r0, n0), (BLOCK_R, BLOCK_N), (1, 0))
    tl.store(out_bp, out.to(OUT.dtype.element_ty), boundary_check=(0, 1))
    if DSCALE:
        x_bp = tl.make_block_ptr(X, (R, C), (sx, 1), (r0, n0), (BLOCK_R, BLOCK_N), (1, 0))
        xt = tl.load(x_bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
        share = tl.sum(tl.where(refined[:, None], acc * xt, 0.0), axis=1)
        tl.store(PARTIAL + pid_r * tl.num_programs(1) + pid_n, tl.sum(share, axis=0))


def _tuned(kernel, configs, interp, key):
    return {path: triton.autotune(configs=_configs(cfgs, interp), key=key, reset_to_zero=["PARTIAL"])(kernel)
            for path, cfgs in configs.items()}


_LOGITS = _tuned(_rein_logits_kernel, LOGITS_GPU_CONFIGS, _LOGITS_INTERP, ["C", "M", "BACKWARD"])
_GEMM = _tuned(_rein_gemm_kernel, GEMM_GPU_CONFIGS, _GEMM_INTERP, ["C", "K2"])


# ----------------------------------------------------------------------------- launchers


def _block_m(M: int) -> int:
    """Columns of the row kernel's tiles: the m - 1 value tokens, a power of two >= 16."""
    return max(16, triton.next_power_of_2(M - 1))


_UNREAD: dict[torch.device, Tensor] = {}


def _unread_slot(device) -> Tensor:
    """The forward launches' PARTIAL: a kernel argument they never write or read (only
    autotuning zeroes it), one per device for the life of the process rather than an
    allocation per call."""
    slot = _UNREAD.get(device)
    if slot is None:
        slot = _UNREAD[device] = torch.zeros(1, device=device, dtype=torch.float32)
    return slot


def _launch_logits(x2, g2, S1, seq_dim, T, U, lse, P1, GZ, num_prefix, use_softmax, partial=None):
    """Forward (g2 None: writes lse, P1) or backward (reads lse; writes P1, GZ, partial).
    x2, g2: [R, C] row views."""
    R, C = x2.shape
    M = T.shape[0]
    backward = g2 is not None
    g = g2 if backward else x2

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]),)

    if partial is None:
        partial = _unread_slot(x2.device)
    precision = _precision(T.dtype)
    _LOGITS[_path(precision)][grid](
        x2, g, T, U, lse, P1, GZ if backward else P1, partial,
        R, S1, C, M,
        x2.stride(0), g.stride(0),
        num_prefix, C ** -0.5 if use_softmax else 1.0,
        SEQ_DIM=seq_dim, USE_SOFTMAX=use_softmax, BACKWARD=backward,
        PRECISION=precision, BLOCK_M=_block_m(M),
    )


def _launch_gemm(A, S1, seq_dim, A2, B1, B2, bias, scale, out, num_prefix, x=None, partial=None):
    """Forward (x None) or backward (x given: also writes the dscale shares to partial).
    A, out, x: [R, C] row views."""
    R, C = A.shape
    K2 = A2.shape[1]

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(C, meta["BLOCK_N"]))

    xs = x if x is not None else A
    if partial is None:
        partial = _unread_slot(A.device)
    precision = _precision(B2.dtype)
    _GEMM[_path(precision)][grid](
        A, A2, B1, B2, bias if bias is not None else B2, scale, out, xs, partial,
        R, S1, C, K2,
        A.stride(0), out.stride(0), xs.stride(0), B1.stride(0), B1.stride(1),
        num_prefix,
        SEQ_DIM=seq_dim, B1_T=B1.stride(0) < B1.stride(1), HAS_BIAS=bias is not None, DSCALE=x is not None,
        PRECISION=precision,
    )


def _forward(x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax):
    xv, sd, swapped = _row_view(x, seq_dim)
    S1 = xv.shape[1]
    x2 = _rows(xv)
    R, M = x2.shape[0], T.shape[0]
    out = _new(torch.empty(R, x2.shape[1], device=x.device, dtype=torch.promote_types(x.dtype, T.dtype)))
    # Without softmax lse is never read; zeros keep the op deterministic.
    if use_softmax:
        lse = _new(torch.empty(R, device=x.device, dtype=torch.float32))
    else:
        lse = torch.zeros(R, device=x.device, dtype=torch.float32)
    P1 = _new(torch.empty(R, M - 1, device=x.device, dtype=T.dtype))
    if R:
        _launch_logits(x2, None, S1, sd, T, U, lse, P1, None, num_prefix, use_softmax)
        _launch_gemm(x2, S1, sd, P1, W_d.t(), U, b_d, scale, out, num_prefix)
    out = out.view(xv.shape)
    if swapped:
        out = out.transpose(0, 1)
    return out, lse


def _backward(g, x, T, U, W_d, b_d, scale, lse, num_prefix, seq_dim, use_softmax):
    xv, sd, swapped = _row_view(x, seq_dim)
    gv, _, _ = _row_view(g, seq_dim, swap=swapped)
    S1 = xv.shape[1]
    x2, g2 = _rows(xv), _rows(gv)
    R, C = x2.shape
    M = T.shape[0]
    dx = _new(torch.empty(R, C, device=x.device, dtype=x.dtype))
    P1 = _new(torch.empty(R, M - 1, device=x.device, dtype=T.dtype))
    GZ = _new(torch.empty(R, M, device=x.device, dtype=T.dtype))
    # The kernels' fp32 dscale shares, one buffer for both launches. Zeros: a config with
    # fewer programs leaves its other slots at 0.
    n_rows = triton.cdiv(R, _min_block(_LOGITS, "BLOCK_R"))
    n_gemm = triton.cdiv(R, _min_block(_GEMM, "BLOCK_R")) * triton.cdiv(C, _min_block(_GEMM, "BLOCK_N"))
    partials = torch.zeros(n_rows + n_gemm, device=x.device, dtype=torch.float32)
    if R:
        _launch_logits(x2, g2, S1, sd, T, U, lse, P1, GZ, num_prefix, use_softmax, partials[:n_rows])
        _launch_gemm(g2, S1, sd, GZ, W_d, T, None, scale, dx, num_prefix, x=x2, partial=partials[n_rows:])
    dx = dx.view(xv.shape)
    if swapped:
        dx = dx.transpose(0, 1)

    # Weight gradients: plain GEMMs over all rows, in the compute dtype (T's), as autocast
    # runs the reference's. Prefix rows are zero in P1 and GZ, and are zeroed in G2 (a copy
    # of g: made by the cast when g is not in the compute dtype), and g_sum sums the refined
    # rows only: nothing is subtracted afterwards, which would cancel badly when prefix
    # tokens are large.
    cd = T.dtype
    G2 = g2.to(cd, copy=True) if num_prefix else _as(g2, cd)
    if num_prefix:
        G2.view(xv.shape).narrow(sd, 0, num_prefix).zero_()
    g_sum = gv.narrow(sd, num_prefix, xv.shape[sd] - num_prefix).sum((0, 1), dtype=torch.float32)
    X2 = _as(x2, cd)
    XtG = G2.t() @ X2                                    # [C, C]: sum over refined rows of g_r^T x_r
    PtG = P1.t() @ G2                                    # [m-1, C]
    dT = GZ.t() @ X2                                     # [m, C]
    s = _as(scale, torch.float32)
    # dscale = <W_d, g^T x> + <U, P1^T g> + <b_d, sum_rows(g)>, from the kernels' fp32
    # shares rather than from XtG and PtG rounded to x's dtype.
    dscale = partials.sum() + torch.dot(_as(b_d, torch.float32), g_sum)
    return (
        dx,
        _as(s * _as(dT, torch.float32), T.dtype),
        _as(s * _as(PtG, torch.float32), U.dtype),
        _as(s * _as(XtG, torch.float32), W_d.dtype),
        _as(s * g_sum, b_d.dtype),
        _as(dscale, scale.dtype),
    )


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("rein::layer_fwd_v2", mutates_args=())
def rein_layer_fwd_v2(
    x: Tensor, T: Tensor, U: Tensor, W_d: Tensor, b_d: Tensor, scale: Tensor,
    num_prefix: int, seq_dim: int, use_softmax: bool,
) -> tuple[Tensor, Tensor]:
    """out = x + scale * (x W_d^T + p[1:] U + b_d) and the per-row lse (see module doc)."""
    return _forward(x, T.contiguous(), U.contiguous(), W_d, b_d.contiguous(), scale, num_prefix, seq_dim,
                    use_softmax)


@rein_layer_fwd_v2.register_fake
def _(x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax):
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, T.dtype))
    lse = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("rein::layer_bwd_v2", mutates_args=())
def rein_layer_bwd_v2(
    g: Tensor, x: Tensor, T: Tensor, U: Tensor, W_d: Tensor, b_d: Tensor, scale: Tensor,
    lse: Tensor, num_prefix: int, seq_dim: int, use_softmax: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``rein::layer_fwd_v2`` for (x, T, U, W_d, b_d, scale) (see module doc)."""
    # Every dtype is chosen explicitly inside; autocast must not recast the GEMMs.
    with torch.autocast(x.device.type, enabled=False):
        return _backward(g, x, T.contiguous(), U.contiguous(), W_d, b_d.contiguous(), scale, lse, num_prefix,
                         seq_dim, use_softmax)


@rein_layer_bwd_v2.register_fake
def _(g, x, T, U, W_d, b_d, scale, lse, num_prefix, seq_dim, use_softmax):
    return (
        torch.empty_like(x), torch.empty_like(T), torch.empty_like(U),
        torch.empty_like(W_d), torch.empty_like(b_d), torch.empty_like(scale),
    )


def _setup_context(ctx, inputs, output):
    x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax = inputs
    ctx.save_for_backward(x, T, U, W_d, b_d, scale, output[1])
    ctx.args = (num_prefix, seq_dim, use_softmax)
    # lse is the op's own residual, not a result: it takes no gradient, and autograd
    # materialises no zeros for it
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, g, _g_lse):
    if g is None:  # out's gradient undefined (an upstream node returned none for it)
        return (None,) * 9
    x, T, U, W_d, b_d, scale, lse = ctx.saved_tensors
    grads = rein_layer_bwd_v2(g, x, T, U, W_d, b_d, scale, lse, *ctx.args)
    return (*grads, None, None, None)


rein_layer_fwd_v2.register_autograd(_autograd_backward, setup_context=_setup_context)
