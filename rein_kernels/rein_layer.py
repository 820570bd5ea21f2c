"""The fused Rein layer, kernels v3: Triton kernels, launchers and the ``rein::`` custom ops.

Math (docs/maths.md). For every refined row x (length C) of layer l, with tokens
T [m, C], c = C^-1/2 (1 without softmax), W_d, b_d = mlp_delta_f and
U = mlp_token2feat(T[1:]) W_d^T [m-1, C] (an input, formed from the parameters by
``rein_kernels.prepare``: per call, or once per forward pass for all layers):

    z   = x T^T                         [m]
    p   = softmax(c z) = exp(c z - lse) (p = z without softmax)
    out = x + scale * (x W_d^T + p[1:] U + b_d)

Forward = two launches:
  * ``_logits_kernel`` (FORWARD): z, the softmax and lse per row; writes p[1:] as P1
    [rows, m-1] and lse [rows] (fp32).
  * ``_gemm_kernel``: out = x + scale * ([x | P1] @ [W_d^T ; U] + b_d), one GEMM whose K
    runs over C and then m-1, with the residual in the epilogue.
Only x, lse and the parameters are saved for backward.

Backward, g = dL/dout, s = scale, with p recomputed from the saved lse:
    gp'  = g U^T  (gp'[0] = 0)                 (gp = s gp')
    gz'  = p (gp' - <p, gp'>) c                (gz' = gp' without softmax; gz = s gz')
    dx   = g + s g W_d + gz T
    dT   = gz^T x                              (logit path; the value path reaches T
                                                through U by autograd)
    dU   = p[1:]^T (s g)
    dW_d = (s g)^T x                           (direct path; the U path adds the rest)
    db_d = sum_rows(s g)
    dscale = sum_r <g_r, y_r> = sum_r (<g_r W_d, x_r> + <p_r, gp'_r> + <g_r, b_d>)
             (y = x W_d^T + p[1:] U + b_d, the refined rows' update before scaling)
Four launches and three cuBLAS GEMMs, none of them a cast or a separate pass over g or x:
  * ``_logits_kernel`` (BACKWARD) reads x and g once each (in their own dtype, cast in
    registers) and writes, besides gz = s gz' [rows, m] (column 0 the null token's), the
    operands of the weight-gradient GEMMs in the compute dtype: Gs = s g with prefix rows
    zeroed, x itself when it is not already in the compute dtype, and P1a = [p[1:] | 1]
    [rows, m] whose last column (1 on refined rows) turns dU's GEMM into db_d as well; and
    per-program fp32 shares of sum_r <p_r, gp'_r> + <g_r, b_d>.
  * ``_gemm_kernel`` (BACKWARD): dx = g + s (g W_d) + gz T, one K = C + m GEMM (s applied
    between its two K ranges), and per-tile fp32 shares of sum_r <g_r W_d, x_r>.
  * cuBLAS: dT = gz^T x, [dU ; db_d] = P1a^T Gs, dW_d = Gs^T x, in the compute dtype with
    fp32 accumulation; dscale is the sum of the shares (one reduction).
The shares' slots are laid out for blocks of SLOT_R rows (and SLOT_N columns); a program
with a larger block writes its share into its first slot and zeros into the others, so the
buffer needs no zeroing launch and the sum is deterministic.

Rows. The op takes x as a 3-D tensor [S0, S1, C] of any strides and ``seq_dim``, the
dimension that holds the sequence; the first ``num_prefix`` positions of that dimension
pass through (out = x, dx = g) and add nothing to any parameter gradient. The
launchers order rows as memory does (the outer-strided dimension first) and view them as
a [rows, C] matrix with one row stride: free when rows are evenly spaced in memory, one
copy otherwise. The kernels read every operand as blocks of such matrices (block
pointers, int64 strides), so rows * C > 2^31 is fine.

Dtypes. T, U, W_d and b_d share one dtype, the compute dtype (bf16 under autocast). The
dot operands are cast to it in registers and accumulate in fp32; softmax, lse, the
shares and the epilogue are fp32. out has the dtype the reference's promotion gives,
promote(x, compute dtype); dx has x's dtype; the parameter gradients their parameters'.
fp32 dots follow ``torch.backends.cuda.matmul.allow_tf32``.
"""
from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from ._common import aligned16, as_dtype, configs, new, precision, refined_rows, row_view, rows

# Configs, from ptxas' report for sm_90 (tests/compile_sm90.py): every one compiles without
# register spills in every dtype its path serves, within Hopper's shared memory.
# Row kernel: it streams x (and g) once, so it needs enough programs to keep every
# multiprocessor reading (v2's 64-row tiles gave 64 programs at 4096 rows for 132
# multiprocessors; 32 rows give 128, 16 rows 256). "tc": tensor-core dots over 16-bit
# parameters, or fp32 ones (tf32) whose rows are 16-element aligned; "small": fp32
# parameters otherwise (FMA dots with tf32 off, or tf32 at odd C), where larger tiles spill.
# GEMM: "tc" for operands the published shapes align to 16 elements (128 x 128 tiles: a
# 4096 x 1024 output in 256 programs); "tc_odd" keeps v2's smaller tiles for odd C, where
# those spill; "fma" for fp32 with tf32 off.
LOGITS_GPU_CONFIGS = {
    "tc": [triton.Config({"BLOCK_R": br, "BLOCK_K": bk}, num_warps=w, num_stages=s)
           for br, bk, w, s in [(32, 16, 8, 3), (64, 32, 8, 3), (16, 64, 8, 3)]],
    "small": [triton.Config({"BLOCK_R": br, "BLOCK_K": bk}, num_warps=w, num_stages=s)
              for br, bk, w, s in [(32, 16, 8, 2), (16, 16, 8, 3)]],
}
GEMM_GPU_CONFIGS = {
    "tc": [triton.Config({"BLOCK_R": br, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
           for br, bn, bk, w, s in [(128, 128, 64, 8, 3), (64, 256, 32, 8, 3), (64, 128, 32, 4, 4)]],
    "tc_odd": [triton.Config({"BLOCK_R": br, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for br, bn, bk, w, s in [(64, 128, 32, 4, 4), (64, 256, 32, 8, 3)]],
    "fma": [triton.Config({"BLOCK_R": br, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for br, bn, bk, w, s in [(64, 128, 32, 8, 3), (64, 64, 32, 8, 3), (64, 64, 16, 4, 3)]],
}
# The interpreter's blocks span two share slots in each direction, so that the CPU tests
# exercise the slot layout a GPU's larger blocks use.
_LOGITS_INTERP = triton.Config({"BLOCK_R": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
_GEMM_INTERP = triton.Config({"BLOCK_R": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
# The dscale shares' slots: one per SLOT_R rows (row kernel) and per SLOT_R x SLOT_N tile
# (GEMM), the smallest blocks any config may use; a program with a larger block writes its
# share into its first slot and zeros into the others.
SLOT_R = SLOT_N = 16
assert all(c.kwargs["BLOCK_R"] % SLOT_R == 0 for cs in LOGITS_GPU_CONFIGS.values() for c in cs)
assert all(c.kwargs["BLOCK_R"] % SLOT_R == 0 and c.kwargs["BLOCK_N"] % SLOT_N == 0
           for cs in GEMM_GPU_CONFIGS.values() for c in cs)


@triton.jit
def _store_share(PARTIAL, slot, n_slots, share, SLOTS: tl.constexpr):
    """This program's share into slot ``slot`` and zeros into its SLOTS - 1 followers
    (within n_slots): every slot of the buffer is written whatever the block size."""
    offs = tl.arange(0, SLOTS)
    tl.store(PARTIAL + slot + offs, tl.where(offs == 0, share, 0.0), mask=slot + offs < n_slots)


@triton.jit
def _logits_kernel(
    X, G, T, U, BD, SCALE, LSE, P1, GZ, XC, GS, PARTIAL,
    R, S1, C, M, n_slots,
    sx, sg, sp, sxc, sgs,
    num_prefix, c_scale,
    SEQ_DIM: tl.constexpr, USE_SOFTMAX: tl.constexpr, BACKWARD: tl.constexpr, WRITE_X: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, SLOT_R: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per block of rows: z = x T^T, the softmax, and (BACKWARD) gz and the GEMM operands.

    Token 0 (the null token: in the softmax, no value) is kept apart as z0 [rows], and
    tokens 1..m-1 as z [rows, m-1], so that z's columns line up with P1 = p[1:] and with
    the rows of U: every tile is a plain block of a dense matrix. P1 and GZ have row
    stride sp (m rounded up to 16).
    FORWARD writes lse = logsumexp(c [z0 | z]) (fp32; 0 without softmax) and P1 = p[1:].
    BACKWARD reads lse, recomputes p = exp(c z - lse), accumulates gp' = g U^T and
    <g, b_d> while it streams x and g, writes Gs = s g (prefix rows 0) to GS and, when
    WRITE_X, x in the compute dtype to XC; then P1a = [p[1:] | 1] [rows, m] to P1, gz =
    s p (gp' - <p, gp'>) c to GZ [rows, m] (column 0 the null token's), and this program's
    share of dscale, sum over its refined rows of <p, gp'> + <g, b_d> (fp32), to PARTIAL.
    Prefix rows write zeros to P1, GZ and GS, so that the weight-gradient GEMMs over all
    rows see them as absent.
    """
    pid = tl.program_id(0)
    r0 = pid * BLOCK_R
    in_range, refined = refined_rows(r0, R, S1, num_prefix, SEQ_DIM, BLOCK_R)
    x_bp = tl.make_block_ptr(X, (R, C), (sx, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    # T^T of the value tokens: column j is token j + 1
    t_bp = tl.make_block_ptr(T + C, (C, M - 1), (1, C), (0, 0), (BLOCK_K, BLOCK_M), (0, 1))
    ks = tl.arange(0, BLOCK_K)
    z = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    z0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    if BACKWARD:
        s = tl.load(SCALE).to(tl.float32)
        g_bp = tl.make_block_ptr(G, (R, C), (sg, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
        gs_bp = tl.make_block_ptr(GS, (R, C), (sgs, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
        xc_bp = tl.make_block_ptr(XC, (R, C), (sxc, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
        u_bp = tl.make_block_ptr(U, (C, M - 1), (1, C), (0, 0), (BLOCK_K, BLOCK_M), (0, 1))
        gp = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
        gb = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        tk = tl.load(t_bp, boundary_check=(0, 1), padding_option="zero")
        xk = tl.load(x_bp, boundary_check=(0, 1), padding_option="zero").to(tk.dtype)
        t0 = tl.load(T + k0 + ks, mask=k0 + ks < C, other=0.0)
        z = tl.dot(xk, tk, z, input_precision=PRECISION)
        z0 += tl.sum(xk.to(tl.float32) * t0.to(tl.float32)[None, :], axis=1)
        x_bp = tl.advance(x_bp, (0, BLOCK_K))
        t_bp = tl.advance(t_bp, (BLOCK_K, 0))
        if BACKWARD:
            if WRITE_X:
                tl.store(xc_bp, xk, boundary_check=(0, 1))
                xc_bp = tl.advance(xc_bp, (0, BLOCK_K))
            uk = tl.load(u_bp, boundary_check=(0, 1), padding_option="zero")
            gk = tl.load(g_bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
            gp = tl.dot(gk.to(uk.dtype), uk, gp, input_precision=PRECISION)
            bk = tl.load(BD + k0 + ks, mask=k0 + ks < C, other=0.0).to(tl.float32)
            gb += tl.sum(gk * bk[None, :], axis=1)
            tl.store(gs_bp, tl.where(refined[:, None], gk * s, 0.0).to(GS.dtype.element_ty), boundary_check=(0, 1))
            g_bp = tl.advance(g_bp, (0, BLOCK_K))
            gs_bp = tl.advance(gs_bp, (0, BLOCK_K))
            u_bp = tl.advance(u_bp, (BLOCK_K, 0))

    cols = tl.arange(0, BLOCK_M)
    rows_ = r0 + tl.arange(0, BLOCK_R)
    if USE_SOFTMAX:
        sz = tl.where((cols < M - 1)[None, :], z * c_scale, float("-inf"))
        s0 = z0 * c_scale
        if BACKWARD:
            lse = tl.load(LSE + rows_, mask=in_range, other=0.0)
        else:
            s_max = tl.maximum(tl.max(sz, axis=1), s0)
            lse = s_max + tl.log(tl.sum(tl.exp(sz - s_max[:, None]), axis=1) + tl.exp(s0 - s_max))
            tl.store(LSE + rows_, lse, mask=in_range)
        p = tl.exp(sz - lse[:, None])
        p0 = tl.exp(s0 - lse)
    else:
        if not BACKWARD:  # lse is never read without softmax; zeros keep the op deterministic
            tl.store(LSE + rows_, tl.zeros([BLOCK_R], dtype=tl.float32), mask=in_range)
        p = z
        p0 = z0
    p = tl.where(refined[:, None], p, 0.0)
    if not BACKWARD:
        p1_bp = tl.make_block_ptr(P1, (R, M - 1), (sp, 1), (r0, 0), (BLOCK_R, BLOCK_M), (1, 0))
        tl.store(p1_bp, p.to(P1.dtype.element_ty), boundary_check=(0, 1))
    else:
        # column m - 1 (past the value tokens) is 1 on refined rows: P1a^T Gs sums Gs there
        ones = (cols == M - 1)[None, :] & refined[:, None]
        p1_bp = tl.make_block_ptr(P1, (R, M), (sp, 1), (r0, 0), (BLOCK_R, BLOCK_M), (1, 0))
        tl.store(p1_bp, tl.where(ones, 1.0, p).to(P1.dtype.element_ty), boundary_check=(0, 1))
        pgp = tl.sum(p * gp, axis=1)
        if USE_SOFTMAX:
            gz = p * (gp - pgp[:, None]) * c_scale
            gz0 = tl.where(refined, -p0 * pgp * c_scale, 0.0)
        else:
            gz = tl.where(refined[:, None], gp, 0.0)
            gz0 = tl.zeros([BLOCK_R], dtype=tl.float32)
        gz_bp = tl.make_block_ptr(GZ + 1, (R, M - 1), (sp, 1), (r0, 0), (BLOCK_R, BLOCK_M), (1, 0))
        tl.store(gz_bp, (gz * s).to(GZ.dtype.element_ty), boundary_check=(0, 1))
        tl.store(GZ + rows_.to(tl.int64) * sp, (gz0 * s).to(GZ.dtype.element_ty), mask=in_range)
        share = tl.sum(tl.where(refined, pgp + gb, 0.0), axis=0)
        _store_share(PARTIAL, pid * (BLOCK_R // SLOT_R), n_slots, share, BLOCK_R // SLOT_R)


@triton.jit
def _gemm_kernel(
    A, A2, B1, B2, BIAS, SCALE, OUT, XS, PARTIAL,
    R, S1, C, K2, n_slots_r, n_slots_n,
    sa, sa2, so, sx, sb1k, sb1n,
    num_prefix,
    SEQ_DIM: tl.constexpr, B1_T: tl.constexpr, BACKWARD: tl.constexpr, PRECISION: tl.constexpr,
    SLOT_R: tl.constexpr, SLOT_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One GEMM with K = C + K2 and the residual A in the epilogue, on refined rows
    (OUT = A on prefix rows).

    Forward: OUT = A + s (A @ B1 + A2 @ B2 + bias), A = x, B1 = W_d^T, A2 = P1, B2 = U.
    Backward: OUT = A + s (A @ B1) + A2 @ B2, A = g, B1 = W_d, A2 = gz (already scaled),
    B2 = T; and this tile's share of dscale, sum over refined rows of <(A @ B1)_r, x_r>
    (x read from XS), into PARTIAL's slot grid [rows / SLOT_R, C / SLOT_N] (fp32).
    A [rows, C] (row stride sa), B1 [C, C] (strides sb1k, sb1n; B1_T when it is a
    transposed view, so W_d^T needs no copy), A2 [rows, K2] (row stride sa2), B2 [K2, C]
    contiguous. A's tiles are cast in registers to B1's dtype.
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

    _, refined = refined_rows(r0, R, S1, num_prefix, SEQ_DIM, BLOCK_R)
    scale = tl.load(SCALE).to(tl.float32)
    if BACKWARD:
        x_bp = tl.make_block_ptr(XS, (R, C), (sx, 1), (r0, n0), (BLOCK_R, BLOCK_N), (1, 0))
        xt = tl.load(x_bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
        share = tl.sum(tl.sum(tl.where(refined[:, None], acc * xt, 0.0), axis=1), axis=0)
        SR: tl.constexpr = BLOCK_R // SLOT_R
        SN: tl.constexpr = BLOCK_N // SLOT_N
        sr = pid_r * SR + tl.arange(0, SR)
        sn = pid_n * SN + tl.arange(0, SN)
        first = (tl.arange(0, SR) == 0)[:, None] & (tl.arange(0, SN) == 0)[None, :]
        tl.store(PARTIAL + sr[:, None] * n_slots_n + sn[None, :], tl.where(first, share, 0.0),
                 mask=(sr[:, None] < n_slots_r) & (sn[None, :] < n_slots_n))
        acc = acc * scale

    a2_bp = tl.make_block_ptr(A2, (R, K2), (sa2, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    b2_bp = tl.make_block_ptr(B2, (K2, C), (C, 1), (0, n0), (BLOCK_K, BLOCK_N), (1, 0))
    for _ in range(0, K2, BLOCK_K):
        a2 = tl.load(a2_bp, boundary_check=(0, 1), padding_option="zero")
        b2 = tl.load(b2_bp, boundary_check=(0, 1), padding_option="zero")
        acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
        a2_bp = tl.advance(a2_bp, (0, BLOCK_K))
        b2_bp = tl.advance(b2_bp, (BLOCK_K, 0))

    ns = n0 + tl.arange(0, BLOCK_N)
    if not BACKWARD:
        acc += tl.load(BIAS + ns, mask=ns < C, other=0.0).to(tl.float32)[None, :]
        acc = acc * scale
    res_bp = tl.make_block_ptr(A, (R, C), (sa, 1), (r0, n0), (BLOCK_R, BLOCK_N), (1, 0))
    res = tl.load(res_bp, boundary_check=(0, 1), padding_option="zero").to(tl.float32)
    out = tl.where(refined[:, None], res + acc, res)
    out_bp = tl.make_block_ptr(OUT, (R, C), (so, 1), (r0, n0), (BLOCK_R, BLOCK_N), (1, 0))
    tl.store(out_bp, out.to(OUT.dtype.element_ty), boundary_check=(0, 1))


def _tuned(kernel, configs_by_path, interp, key):
    return {path: triton.autotune(configs=configs(cfgs, interp), key=key)(kernel)
            for path, cfgs in configs_by_path.items()}


_LOGITS = _tuned(_logits_kernel, LOGITS_GPU_CONFIGS, _LOGITS_INTERP, ["C", "M", "BACKWARD", "WRITE_X"])
_GEMM = _tuned(_gemm_kernel, GEMM_GPU_CONFIGS, _GEMM_INTERP, ["C", "K2", "BACKWARD"])


# ----------------------------------------------------------------------------- launchers


def _block_m(M: int) -> int:
    """Columns of the row kernel's tiles: m (the m - 1 value tokens and, backward, P1a's
    column of ones), a power of two >= 16."""
    return max(16, triton.next_power_of_2(M))


def _stride_m(M: int) -> int:
    """Row stride of P1 and GZ: m rounded up to 16 elements, so their rows are 16-byte
    aligned for the GEMM's loads and cuBLAS (the padding is never read)."""
    return -(-M // 16) * 16


def _gemm_path(prec: str, C: int, *ts: Tensor) -> str:
    if prec == "ieee":
        return "fma"
    return "tc" if C % 16 == 0 and aligned16(*ts) else "tc_odd"


def _logits_path(prec: str, C: int, T: Tensor, *ts: Tensor) -> str:
    if T.element_size() == 2 or (prec == "tf32" and C % 16 == 0 and aligned16(*ts)):
        return "tc"
    return "small"


def _direct(kernel):
    return kernel


def _launch_logits(x2, S1, seq_dim, T, U, lse, P1, num_prefix, use_softmax, launch,
                   g2=None, b_d=None, scale=None, GZ=None, XC=None, GS=None, partial=None):
    """Forward (g2 None: writes lse, P1) or backward (reads lse; writes P1a, GZ, GS, XC
    unless it is x2 itself, and the shares). x2, g2 and the outputs: [R, *] row views."""
    R, C = x2.shape
    M = T.shape[0]
    backward = g2 is not None
    if not backward:  # arguments the forward never touches
        g2 = XC = GS = x2
        GZ, b_d, scale, partial = P1, T, lse, lse
    write_x = backward and XC is not x2

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]),)

    prec = precision(T.dtype)
    launch(_LOGITS[_logits_path(prec, C, T, x2, g2, XC, GS)])[grid](
        x2, g2, T, U, b_d, scale, lse, P1, GZ, XC, GS, partial,
        R, S1, C, M, partial.numel(),
        x2.stride(0), g2.stride(0), P1.stride(0), XC.stride(0), GS.stride(0),
        num_prefix, C ** -0.5 if use_softmax else 1.0,
        SEQ_DIM=seq_dim, USE_SOFTMAX=use_softmax, BACKWARD=backward, WRITE_X=write_x,
        PRECISION=prec, BLOCK_M=_block_m(M), SLOT_R=SLOT_R,
    )


def _launch_gemm(A, S1, seq_dim, A2, K2, B1, B2, bias, scale, out, num_prefix, launch, xs=None, partial=None,
                 n_slots=(1, 1)):
    """Forward (xs None) or backward (xs given: also writes the dscale shares to partial).
    A, out, xs: [R, C] row views; A2: [R, >= K2] row view."""
    R, C = A.shape
    backward = xs is not None
    if not backward:
        xs, partial = A, scale

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(C, meta["BLOCK_N"]))

    prec = precision(B2.dtype)
    launch(_GEMM[_gemm_path(prec, C, A, out, xs, A2)])[grid](
        A, A2, B1, B2, bias if bias is not None else B2, scale, out, xs, partial,
        R, S1, C, K2, *n_slots,
        A.stride(0), A2.stride(0), out.stride(0), xs.stride(0), B1.stride(0), B1.stride(1),
        num_prefix,
        SEQ_DIM=seq_dim, B1_T=B1.stride(0) < B1.stride(1), BACKWARD=backward, PRECISION=prec,
        SLOT_R=SLOT_R, SLOT_N=SLOT_N,
    )


def _forward(x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax, launch=_direct):
    """(out, lse); ``launch`` wraps each kernel before its launch (torch.library.wrap_triton
    for the triton_op registration)."""
    xv, sd, swapped = row_view(x, seq_dim)
    S1 = xv.shape[1]
    x2 = rows(xv)
    R, M = x2.shape[0], T.shape[0]
    out = new(torch.empty(R, x2.shape[1], device=x.device, dtype=torch.promote_types(x.dtype, T.dtype)))
    lse = new(torch.empty(R, device=x.device, dtype=torch.float32))
    P1 = new(torch.empty(R, _stride_m(M), device=x.device, dtype=T.dtype))
    if R:
        _launch_logits(x2, S1, sd, T, U, lse, P1, num_prefix, use_softmax, launch)
        _launch_gemm(x2, S1, sd, P1, M - 1, W_d.t(), U, b_d, scale, out, num_prefix, launch)
    out = out.view(xv.shape)
    if swapped:
        out = out.transpose(0, 1)
    return out, lse


def _backward(g, x, T, U, W_d, b_d, scale, lse, num_prefix, seq_dim, use_softmax, launch=_direct):
    """(dx, dT, [dU ; db_d], dW_d, dscale): dU and db_d are the rows of one GEMM's result,
    which the op returns whole (a custom op's results may not be views of each other)."""
    xv, sd, swapped = row_view(x, seq_dim)
    gv, _, _ = row_view(g, seq_dim, swap=swapped)
    S1 = xv.shape[1]
    x2, g2 = rows(xv), rows(gv)
    R, C = x2.shape
    M, cd, dev = T.shape[0], T.dtype, x.device
    dx = new(torch.empty(R, C, device=dev, dtype=x.dtype))
    XC = new(torch.empty(R, C, device=dev, dtype=cd)) if x2.dtype != cd else x2
    GS = new(torch.empty(R, C, device=dev, dtype=cd))
    P1 = new(torch.empty(R, _stride_m(M), device=dev, dtype=cd))
    GZ = new(torch.empty(R, _stride_m(M), device=dev, dtype=cd))
    # the dscale shares' slots: the row kernel's n_r, then the GEMM's n_r x n_n grid
    n_r, n_n = triton.cdiv(R, SLOT_R), triton.cdiv(C, SLOT_N)
    partials = new(torch.empty(n_r + n_r * n_n, device=dev, dtype=torch.float32))
    if R:
        _launch_logits(x2, S1, sd, T, U, lse, P1, num_prefix, use_softmax, launch,
                       g2=g2, b_d=b_d, scale=scale, GZ=GZ, XC=XC, GS=GS, partial=partials[:n_r])
        _launch_gemm(g2, S1, sd, GZ, M, W_d, T, None, scale, dx, num_prefix, launch,
                     xs=XC, partial=partials[n_r:], n_slots=(n_r, n_n))
    dx = dx.view(xv.shape)
    if swapped:
        dx = dx.transpose(0, 1)
    dT = GZ[:, :M].t() @ XC
    dUb = P1[:, :M].t() @ GS
    dW_d = GS.t() @ XC
    return dx, dT, dUb, dW_d, as_dtype(partials.sum(), scale.dtype)


# ----------------------------------------------------------------------------- custom ops


def _check_operands(T: Tensor, U: Tensor, W_d: Tensor, b_d: Tensor) -> None:
    if not T.dtype == U.dtype == W_d.dtype == b_d.dtype:
        raise TypeError(f"rein::layer_fwd: T, U, W_d and b_d must share one dtype (the compute dtype), got "
                        f"{T.dtype}, {U.dtype}, {W_d.dtype}, {b_d.dtype}; rein_kernels.prepare forms them")


def _register(register, suffix: str, launch):
    """The op pair ``rein::layer_fwd{suffix}`` / ``rein::layer_bwd{suffix}`` with its autograd:
    a torch.library custom op (opaque to torch.compile) or a triton_op (torch >= 2.6: traced
    by torch.compile, so Inductor launches the kernels itself; its fake implementation comes
    from tracing the same body)."""

    @register(f"rein::layer_fwd{suffix}", mutates_args=())
    def fwd(
        x: Tensor, T: Tensor, U: Tensor, W_d: Tensor, b_d: Tensor, scale: Tensor,
        num_prefix: int, seq_dim: int, use_softmax: bool,
    ) -> tuple[Tensor, Tensor]:
        """out = x + scale * (x W_d^T + p[1:] U + b_d) and the per-row lse (see module doc)."""
        _check_operands(T, U, W_d, b_d)
        # the kernels read T, U and b_d with unit strides (W_d: any strides)
        return _forward(x, T.contiguous(), U.contiguous(), W_d, b_d.contiguous(), scale, num_prefix, seq_dim,
                        use_softmax, launch)

    @register(f"rein::layer_bwd{suffix}", mutates_args=())
    def bwd(
        g: Tensor, x: Tensor, T: Tensor, U: Tensor, W_d: Tensor, b_d: Tensor, scale: Tensor,
        lse: Tensor, num_prefix: int, seq_dim: int, use_softmax: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Gradients of ``rein::layer_fwd``: (dx, dT, [dU ; db_d] [m, C], dW_d, dscale)."""
        # Every dtype is chosen explicitly inside; autocast must not recast the GEMMs.
        with torch.autocast(x.device.type, enabled=False):
            return _backward(g, x, T.contiguous(), U.contiguous(), W_d, b_d.contiguous(), scale, lse, num_prefix,
                             seq_dim, use_softmax, launch)

    if register is torch.library.custom_op:
        @fwd.register_fake
        def _(x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax):
            out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, T.dtype))
            lse = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
            return out, lse

        @bwd.register_fake
        def _(g, x, T, U, W_d, b_d, scale, lse, num_prefix, seq_dim, use_softmax):
            return (torch.empty_like(x), torch.empty_like(T), torch.empty_like(T), torch.empty_like(W_d),
                    torch.empty_like(scale))

    def backward(ctx, g, _g_lse):
        if g is None:  # out's gradient undefined (an upstream node returned none for it)
            return (None,) * 9
        x, T, U, W_d, b_d, scale, lse = ctx.saved_tensors
        dx, dT, dUb, dW_d, dscale = bwd(g, x, T, U, W_d, b_d, scale, lse, *ctx.args)
        m = T.shape[0]
        return dx, dT, dUb[: m - 1], dW_d, dUb[m - 1], dscale, None, None, None

    fwd.register_autograd(backward, setup_context=_setup_context)
    return fwd, bwd


def _setup_context(ctx, inputs, output):
    x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax = inputs
    ctx.save_for_backward(x, T, U, W_d, b_d, scale, output[1])
    ctx.args = (num_prefix, seq_dim, use_softmax)
    # lse is the op's own residual, not a result: it takes no gradient, and autograd
    # materialises no zeros for it
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


rein_layer_fwd, rein_layer_bwd = _register(torch.library.custom_op, "", _direct)
# torch.library.triton_op came with torch 2.6; older versions keep the custom op alone
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
if HAS_TRITON_OP:
    rein_layer_fwd_t, rein_layer_bwd_t = _register(torch.library.triton_op, "_t", torch.library.wrap_triton)
