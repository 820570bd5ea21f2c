"""The fused Rein layer, kernels v4: Triton for what is row-wise, cuBLAS for the GEMMs.

Math (docs/maths.md). For every refined row x (length C) of layer l, with tokens T [m, C],
c = C^-1/2 (1 without softmax), W_d, b_d = mlp_delta_f, s = scale and the scaled
operands that ``rein_kernels.prepare`` forms from the parameters (per call, or once per
forward pass for all layers):

    W = s W_d  [C, C],   b = s b_d  [C],   U = (T[1:] W_t^T + b_t) W^T  [m-1, C]

    z   = x T^T                          [m]
    p   = softmax(c z) = exp(c z - lse)  (p = z without softmax)
    out = x + x W^T + p[1:] U + b        = x + s (x W_d^T + p[1:] V W_d^T + b_d)

The scale lives in the operands, not in the op: its gradient, <W_d, dW> + <U/s, dU> +
<b_d, db>, is what autograd makes of the multiplications in ``prepare``, once per forward
pass inside ``ReinLayer.prepared()``, so the op needs no reduction over rows for it.

The op takes T, U, W and b in one dtype, their master dtype (fp32 for fp32 parameters under
autocast), the tokens and U again in the compute dtype ``cdtype`` (Tc, Uc: the same tensors
without autocast; formed once per forward pass, so that every program's token tiles are
16-bit), and cdtype itself (autocast's, or the parameters' own). The kernels read Tc, Uc,
W and b and cast every GEMM operand to cdtype as they write it, so no cast pass runs
outside them; the gradients of T, U, W and b come back in the master dtype from
fp32-accumulating GEMMs (one rounding, no per-layer cast). T and U themselves are never
read: they carry the gradients' dtype.

Forward = two launches:
  * ``_rows_fwd_kernel``: z, the softmax and lse per row; writes OUT = x (the residual,
    in out's dtype) and A = [x | p[1:] | 1] [rows, Cp + mp] in cdtype (prefix rows: zeros);
    extra programs of the same launch pack Bt = [W | U^T | b] [C, Cp + mp] in cdtype.
  * cuBLAS: OUT += A Bt^T (addmm in place, fp32 accumulation, out in its own dtype).
Backward, g = dL/dout, with p recomputed from the saved lse:

    gp  = g U^T                         (gp[0] = 0: the null token has no value)
    gz  = p (gp - <p, gp>) c            (gz = gp without softmax)
    dx  = g + g W + gz T
    dT  = gz^T x                        (the logit path; the value path reaches T through U)
    dW  = g^T x,  dU = p[1:]^T g,  db = sum_rows(g)      (refined rows only)

  * ``_rows_bwd_kernel``: streams x and g; writes DX = g and
    W1 = [G | GZ | XC | P1a] [rows, 2 (Cp + mp)] in cdtype: G = g, GZ = gz (column 0 the
    null token's), XC = x, P1a = [p[1:] | 1] (prefix rows: zeros); extra programs pack
    Bb = [W ; T] [Cp + mp, C] in cdtype.
  * cuBLAS: DX += [G | GZ] Bb (addmm in place), and every weight gradient from one GEMM
    in the master dtype, [G | GZ]^T [XC | P1a] = [[dW, dU^T | db], [dT, (unused)]]: g's
    columns against x's give dW and against P1a's give dU^T (the column of ones: db), gz's
    against x's give dT; the unused corner is [m, m], 1% of the FLOPs, and the GEMM has the
    m columns of [dU ; db] (m - 1 and the ones) in the same waves of output tiles as dW's.

Per layer that is 5 launches; nothing else touches [rows, C]. Bytes and FLOPs at vitl-512
(R = 4,100 rows, C = 1,024, m = 100, Cp + mp = 1,136; x and g fp32, cdtype bf16):
  forward rows  reads x 16.8 MB, writes OUT 16.8 MB and A 9.3 MB             (bandwidth)
  forward GEMM  2 R C (Cp + mp) = 9.5 GFLOP; reads A, OUT, writes OUT        (tensor cores)
  backward rows reads x, g 33.6 MB, writes DX 16.8 MB and W1 18.6 MB         (bandwidth)
  backward GEMMs dx 9.5, the weight gradients 2 R (Cp + mp)^2 = 10.6 GFLOP
Rates measured on an H200 (benchmarks/NOTES.md): cuBLAS bf16 ~600 TFLOP/s at these shapes
with K a multiple of 16 (K = C + m - 1 = 1,123 ran 4.6x slower, hence Cp and mp), copy
bandwidth 4.27 TB/s.

Each row kernel has two layouts, chosen by its config (STREAM_K), so the autotuner picks by
timing: "fused", one program per block of rows that both reduces over C (z, gp) and writes
the streamed columns (OUT, A's x; DX, G, XC) as it reads them; "streamed", the block's row
program only reads and reduces, and stream programs beside it, each a chunk of STREAM_K
columns, read the same rows again (from L2) and write the streamed columns. With the same
tiles (BLOCK_R, BLOCK_K) the results are the same to the bit: every element is written once,
from the same value, in either layout. Different tiles (any two configs the autotuner may
pick, layout or not) round the null token's logit, summed per BLOCK_K tile, differently in
the last bits.

Rows and layouts as in v3: the op takes x [S0, S1, C] of any strides and ``seq_dim``; the
first ``num_prefix`` positions of the sequence pass through (out = x, dx = g) and add
nothing to any gradient; rows are read in memory order as one [rows, C] matrix (one copy
only when rows are not evenly spaced). Column paddings (C..Cp, m..mp) are written as zeros,
so that no GEMM ever reads an unwritten element.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

import triton
import triton.language as tl

from ._common import AUTOTUNE, INTERPRET, aligned16, configs, new, precision, refined_rows, row_view, rows

# Row kernels: they stream x (and g) once and compute two skinny products against the m
# tokens, whose tiles every program reads again from L2 (2 m C bytes a program in 16 bits),
# so the tiles trade programs in flight against those reads and the token tiles' registers.
# "tc": tensor-core dots (16-bit compute dtype, or tf32) on operands aligned as the published
# shapes are; "tc_odd": the same for odd C or strides, where the wider tiles spill; "small":
# fp32 with tf32 off (FMA dots). The backward holds two accumulators and four operand
# tiles, so its lists use 8 warps but one (4 warps: ptxas held some 8-warp variants of 16-row
# blocks to 128 registers and spilled). Two layouts of the launch: STREAM_K = 0, each block of
# rows one program that also writes the streamed columns (measured on the H200 at 2.6x and
# 4.4x the bandwidth bound at vitl-512: 129 programs of 32 rows, one per multiprocessor,
# each walking all of C); STREAM_K > 0, the row program only reads and cdiv(Cp, STREAM_K)
# programs per block write the streamed columns beside it, many more programs in flight
# for x (and g) read a second time, from L2. Every config compiles for sm_90 without
# register spills in every dtype its path serves (tests/compile_sm90.py); the autotuner
# picks among them on the GPU; the first of each list (the measured one) is what runs
# with REIN_AUTOTUNE=0.
def _configs(*tiles):
    assert all(sk % bk == 0 for _, bk, _, _, sk in tiles), "a stream program walks whole BLOCK_K tiles"
    return [triton.Config({"BLOCK_R": br, "BLOCK_K": bk, "STREAM_K": sk}, num_warps=w, num_stages=s)
            for br, bk, w, s, sk in tiles]


ROWS_FWD_GPU_CONFIGS = {
    "tc": _configs((32, 64, 4, 3, 0), (16, 64, 4, 3, 0), (32, 128, 8, 3, 0), (64, 64, 8, 3, 0),
                   (32, 64, 4, 3, 256), (64, 64, 8, 3, 256), (32, 128, 8, 3, 512)),
    "tc_odd": _configs((16, 32, 4, 2, 0), (32, 32, 4, 2, 0), (32, 32, 8, 2, 0), (32, 32, 4, 2, 128)),
    "small": _configs((16, 32, 4, 2, 0), (16, 32, 4, 2, 128)),
}
ROWS_BWD_GPU_CONFIGS = {
    "tc": _configs((32, 32, 8, 3, 0), (16, 128, 8, 2, 0), (16, 32, 4, 3, 0),
                   (32, 32, 8, 3, 256), (16, 64, 8, 2, 256), (64, 32, 8, 2, 256)),
    "tc_odd": _configs((16, 32, 8, 2, 0), (16, 16, 8, 2, 128)),
    "small": _configs((16, 32, 8, 2, 0), (16, 16, 8, 2, 128)),
}
# The interpreter's tiles are small, so that the CPU tests' small shapes still span several
# row programs, pack programs and column chunks; one config per layout (a launch takes the
# first; ``row_layout`` picks either).
ROWS_INTERP = (triton.Config({"BLOCK_R": 16, "BLOCK_K": 16, "STREAM_K": 0}, num_warps=4, num_stages=1),
               triton.Config({"BLOCK_R": 16, "BLOCK_K": 16, "STREAM_K": 32}, num_warps=4, num_stages=1))


def _pad16(n: int) -> int:
    """n rounded up to 16 elements: cuBLAS' fast kernels want K and the row strides
    multiples of 8 (16-byte aligned in bf16); 16 keeps fp32 rows 64-byte aligned too."""
    return -(-n // 16) * 16


def _block_m(M: int) -> int:
    """Columns of the row kernels' token tiles: m, a power of two >= 16 (>= _pad16(m))."""
    return max(16, triton.next_power_of_2(M))


@triton.jit
def _rows_fwd_kernel(
    X, T, U, W, BIAS, OUT, A, BT, LSE,
    R, S1, C, M, Cp, Kf,
    sx, so, sw0, sw1,
    num_prefix, c_scale,
    SEQ_DIM: tl.constexpr, USE_SOFTMAX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, STREAM_K: tl.constexpr,
):
    """Per block of BLOCK_R rows, a row program: z = x T^T (token 0 apart as z0, tokens 1..m-1
    as z's columns, so that they line up with U's rows), the softmax, lse (fp32; 0 without
    softmax) and A's columns [p[1:] | 1 | 0] from Cp; and the streamed columns: OUT = x (out's
    dtype, every row) and A's columns [x | 0] to Cp in the GEMM dtype (prefix rows of A all
    zero). STREAM_K = 0: the row program streams them as it reads x. STREAM_K > 0: they
    are left to cdiv(Cp, STREAM_K) stream programs per block, which follow its row program
    (so x is read from L2 the second time), and the row program only reads. The programs
    after all blocks': BLOCK_R rows n each of Bt = [W[n, :] | 0 | U[:, n] | b[n] | 0] [C, Kf],
    so that OUT += A Bt^T adds x W^T + p[1:] U + b on refined rows."""
    pid = tl.program_id(0)
    per_block = _progs_per_block(Cp, STREAM_K)
    n_row_progs = tl.cdiv(R, BLOCK_R) * per_block
    CD = A.dtype.element_ty
    if pid < n_row_progs:
        r0 = (pid // per_block) * BLOCK_R
        chunk = pid % per_block - 1  # -1: the row program
        in_range, refined = refined_rows(r0, R, S1, num_prefix, SEQ_DIM, BLOCK_R)
        if chunk < 0:
            _fwd_row_program(X, T, OUT, A, LSE, R, C, M, Cp, Kf, sx, so, c_scale, r0, in_range, refined,
                             USE_SOFTMAX, PRECISION, BLOCK_M, BLOCK_R, BLOCK_K, STREAM_K == 0)
        else:
            k0 = chunk * STREAM_K
            x_bp = tl.make_block_ptr(X, (R, C), (sx, 1), (r0, k0), (BLOCK_R, BLOCK_K), (1, 0))
            o_bp = tl.make_block_ptr(OUT, (R, C), (so, 1), (r0, k0), (BLOCK_R, BLOCK_K), (1, 0))
            a_bp = tl.make_block_ptr(A, (R, Cp), (Kf, 1), (r0, k0), (BLOCK_R, BLOCK_K), (1, 0))
            for _ in range(0, STREAM_K, BLOCK_K):  # past Cp: loads give zeros, stores drop
                xr = tl.load(x_bp, boundary_check=(0, 1), padding_option="zero")
                tl.store(o_bp, xr.to(OUT.dtype.element_ty), boundary_check=(0, 1))
                tl.store(a_bp, tl.where(refined[:, None], xr.to(CD), 0.0).to(CD), boundary_check=(0, 1))
                x_bp = tl.advance(x_bp, (0, BLOCK_K))
                o_bp = tl.advance(o_bp, (0, BLOCK_K))
                a_bp = tl.advance(a_bp, (0, BLOCK_K))
    else:
        ks = tl.arange(0, BLOCK_K)
        n = (pid - n_row_progs) * BLOCK_R + tl.arange(0, BLOCK_R)
        nin = n < C
        b = tl.load(BIAS + n, mask=nin, other=0.0).to(tl.float32)
        for k0 in range(0, Kf, BLOCK_K):
            kk = k0 + ks
            j = kk - Cp  # U's row (token j + 1), or b at j = m - 1
            w = tl.load(W + n[:, None] * sw0 + kk[None, :] * sw1, mask=nin[:, None] & (kk < C)[None, :], other=0.0)
            u = tl.load(U + j[None, :] * C + n[:, None], mask=nin[:, None] & ((j >= 0) & (j < M - 1))[None, :],
                        other=0.0)
            v = w.to(tl.float32) + u.to(tl.float32) + tl.where((j == M - 1)[None, :], b[:, None], 0.0)
            tl.store(BT + n[:, None] * Kf + kk[None, :], v.to(CD), mask=nin[:, None] & (kk < Kf)[None, :])


@triton.jit
def _progs_per_block(Cp, STREAM_K: tl.constexpr):
    """Programs per block of rows: its row program, and its stream programs (STREAM_K > 0)."""
    if STREAM_K > 0:
        return 1 + tl.cdiv(Cp, STREAM_K)
    else:
        return 1


@triton.jit
def _fwd_row_program(X, T, OUT, A, LSE, R, C, M, Cp, Kf, sx, so, c_scale, r0, in_range, refined,
                     USE_SOFTMAX: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, STREAMS: tl.constexpr):
    """The forward's row program for rows r0 .. r0 + BLOCK_R (see ``_rows_fwd_kernel``);
    STREAMS: it also writes OUT and A's x columns."""
    CD = A.dtype.element_ty
    ks = tl.arange(0, BLOCK_K)
    rws = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
    js = tl.arange(0, BLOCK_M)
    # block pointers: the token tiles' addresses are not held per element in registers
    x_bp = tl.make_block_ptr(X, (R, C), (sx, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    o_bp = tl.make_block_ptr(OUT, (R, C), (so, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    a_bp = tl.make_block_ptr(A, (R, Cp), (Kf, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    # T^T of the value tokens: column j is token j + 1
    t_bp = tl.make_block_ptr(T + C, (C, M - 1), (1, C), (0, 0), (BLOCK_K, BLOCK_M), (0, 1))
    z = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    z0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, Cp, BLOCK_K):
        kk = k0 + ks
        xr = tl.load(x_bp, boundary_check=(0, 1), padding_option="zero")
        xk = xr.to(CD)
        tk = tl.load(t_bp, boundary_check=(0, 1), padding_option="zero").to(CD)
        t0 = tl.load(T + kk, mask=kk < C, other=0.0).to(CD)
        z = tl.dot(xk, tk, z, input_precision=PRECISION)
        z0 += tl.sum(xk.to(tl.float32) * t0.to(tl.float32)[None, :], axis=1)
        if STREAMS:
            tl.store(o_bp, xr.to(OUT.dtype.element_ty), boundary_check=(0, 1))
            tl.store(a_bp, tl.where(refined[:, None], xk, 0.0).to(CD), boundary_check=(0, 1))
            o_bp = tl.advance(o_bp, (0, BLOCK_K))
            a_bp = tl.advance(a_bp, (0, BLOCK_K))
        x_bp = tl.advance(x_bp, (0, BLOCK_K))
        t_bp = tl.advance(t_bp, (BLOCK_K, 0))
    if USE_SOFTMAX:
        sz = tl.where((js < M - 1)[None, :], z * c_scale, float("-inf"))
        s0 = z0 * c_scale
        s_max = tl.maximum(tl.max(sz, axis=1), s0)
        lse = s_max + tl.log(tl.sum(tl.exp(sz - s_max[:, None]), axis=1) + tl.exp(s0 - s_max))
        p = tl.exp(sz - lse[:, None])
    else:  # lse is never read without softmax; zeros keep the op deterministic
        lse = tl.zeros([BLOCK_R], dtype=tl.float32)
        p = z
    tl.store(LSE + rws, lse, mask=in_range)
    p = tl.where(refined[:, None] & (js < M - 1)[None, :], p, 0.0)
    p = tl.where(((js == M - 1)[None, :]) & refined[:, None], 1.0, p)
    tl.store(A + rws[:, None] * Kf + Cp + js[None, :], p.to(CD),
             mask=in_range[:, None] & (js < Kf - Cp)[None, :])


@triton.jit
def _rows_bwd_kernel(
    X, G, T, U, W, LSE, DX, W1, BB,
    R, S1, C, M, Cp, Mp,
    sx, sg, sdx, sw0, sw1,
    num_prefix, c_scale,
    SEQ_DIM: tl.constexpr, USE_SOFTMAX: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, STREAM_K: tl.constexpr,
):
    """Per block of BLOCK_R rows, a row program: recomputes p = exp(c z - lse) (p = z without
    softmax) and accumulates gp = g U^T as it reads x and g, then writes W1's (row stride
    2 (Cp + Mp), GEMM dtype, prefix rows all zero) GZ = [gz0 | gz | 0] at Cp (gz = p (gp -
    <p, gp>) c, gz0 = -p0 <p, gp> c; gz = gp, gz0 = 0 without softmax) and P1a = [p[1:] | 1 |
    0] at 2 Cp + Mp; and the streamed columns: DX = g (every row), W1's G = g at column 0
    and XC = x at Cp + Mp. STREAM_K = 0: the row program streams them as it reads; STREAM_K
    > 0: cdiv(Cp, STREAM_K) stream programs per block do, after its row program (as in the
    forward). The programs after all blocks': BLOCK_R rows k each of Bb = [W ; 0 ; T ; 0]
    [Cp + Mp, C], so that DX += [G | GZ] Bb gives g + g W + gz T."""
    pid = tl.program_id(0)
    per_block = _progs_per_block(Cp, STREAM_K)
    n_row_progs = tl.cdiv(R, BLOCK_R) * per_block
    CD = W1.dtype.element_ty
    K1 = 2 * (Mp + Cp)
    if pid < n_row_progs:
        r0 = (pid // per_block) * BLOCK_R
        chunk = pid % per_block - 1  # -1: the row program
        in_range, refined = refined_rows(r0, R, S1, num_prefix, SEQ_DIM, BLOCK_R)
        if chunk < 0:
            _bwd_row_program(X, G, T, U, LSE, DX, W1, R, C, M, Cp, Mp, sx, sg, sdx, c_scale, r0, in_range, refined,
                             USE_SOFTMAX, PRECISION, BLOCK_M, BLOCK_R, BLOCK_K, STREAM_K == 0)
        else:
            k0 = chunk * STREAM_K
            x_bp = tl.make_block_ptr(X, (R, C), (sx, 1), (r0, k0), (BLOCK_R, BLOCK_K), (1, 0))
            g_bp = tl.make_block_ptr(G, (R, C), (sg, 1), (r0, k0), (BLOCK_R, BLOCK_K), (1, 0))
            d_bp = tl.make_block_ptr(DX, (R, C), (sdx, 1), (r0, k0), (BLOCK_R, BLOCK_K), (1, 0))
            gw_bp = tl.make_block_ptr(W1, (R, Cp), (K1, 1), (r0, k0), (BLOCK_R, BLOCK_K), (1, 0))
            xw_bp = tl.make_block_ptr(W1 + Cp + Mp, (R, Cp), (K1, 1), (r0, k0), (BLOCK_R, BLOCK_K), (1, 0))
            for _ in range(0, STREAM_K, BLOCK_K):  # past Cp: loads give zeros, stores drop
                xk = tl.load(x_bp, boundary_check=(0, 1), padding_option="zero").to(CD)
                gr = tl.load(g_bp, boundary_check=(0, 1), padding_option="zero")
                tl.store(d_bp, gr.to(DX.dtype.element_ty), boundary_check=(0, 1))
                tl.store(gw_bp, tl.where(refined[:, None], gr.to(CD), 0.0).to(CD), boundary_check=(0, 1))
                tl.store(xw_bp, tl.where(refined[:, None], xk, 0.0).to(CD), boundary_check=(0, 1))
                x_bp = tl.advance(x_bp, (0, BLOCK_K))
                g_bp = tl.advance(g_bp, (0, BLOCK_K))
                d_bp = tl.advance(d_bp, (0, BLOCK_K))
                gw_bp = tl.advance(gw_bp, (0, BLOCK_K))
                xw_bp = tl.advance(xw_bp, (0, BLOCK_K))
    else:
        ks = tl.arange(0, BLOCK_K)
        k = (pid - n_row_progs) * BLOCK_R + tl.arange(0, BLOCK_R)
        t_row = k - Cp
        for n0 in range(0, C, BLOCK_K):
            nn = n0 + ks
            nin = nn < C
            w = tl.load(W + k[:, None] * sw0 + nn[None, :] * sw1, mask=(k < C)[:, None] & nin[None, :], other=0.0)
            t = tl.load(T + t_row[:, None] * C + nn[None, :],
                        mask=((t_row >= 0) & (t_row < M))[:, None] & nin[None, :], other=0.0)
            v = w.to(tl.float32) + t.to(tl.float32)
            tl.store(BB + k[:, None] * C + nn[None, :], v.to(CD), mask=(k < Cp + Mp)[:, None] & nin[None, :])


@triton.jit
def _bwd_row_program(X, G, T, U, LSE, DX, W1, R, C, M, Cp, Mp, sx, sg, sdx, c_scale, r0, in_range, refined,
                     USE_SOFTMAX: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, STREAMS: tl.constexpr):
    """The backward's row program for rows r0 .. r0 + BLOCK_R (see ``_rows_bwd_kernel``);
    STREAMS: it also writes DX, G and XC."""
    CD = W1.dtype.element_ty
    ks = tl.arange(0, BLOCK_K)
    rws = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
    js = tl.arange(0, BLOCK_M)
    K1 = 2 * (Mp + Cp)
    w1 = W1 + rws[:, None] * K1
    x_bp = tl.make_block_ptr(X, (R, C), (sx, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    g_bp = tl.make_block_ptr(G, (R, C), (sg, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    d_bp = tl.make_block_ptr(DX, (R, C), (sdx, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    gw_bp = tl.make_block_ptr(W1, (R, Cp), (K1, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    xw_bp = tl.make_block_ptr(W1 + Cp + Mp, (R, Cp), (K1, 1), (r0, 0), (BLOCK_R, BLOCK_K), (1, 0))
    t_bp = tl.make_block_ptr(T + C, (C, M - 1), (1, C), (0, 0), (BLOCK_K, BLOCK_M), (0, 1))
    u_bp = tl.make_block_ptr(U, (C, M - 1), (1, C), (0, 0), (BLOCK_K, BLOCK_M), (0, 1))
    z = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    z0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    gp = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, Cp, BLOCK_K):
        kk = k0 + ks
        xk = tl.load(x_bp, boundary_check=(0, 1), padding_option="zero").to(CD)
        gr = tl.load(g_bp, boundary_check=(0, 1), padding_option="zero")
        gk = gr.to(CD)
        tk = tl.load(t_bp, boundary_check=(0, 1), padding_option="zero").to(CD)
        t0 = tl.load(T + kk, mask=kk < C, other=0.0).to(CD)
        uk = tl.load(u_bp, boundary_check=(0, 1), padding_option="zero").to(CD)
        z = tl.dot(xk, tk, z, input_precision=PRECISION)
        z0 += tl.sum(xk.to(tl.float32) * t0.to(tl.float32)[None, :], axis=1)
        gp = tl.dot(gk, uk, gp, input_precision=PRECISION)
        if STREAMS:
            tl.store(d_bp, gr.to(DX.dtype.element_ty), boundary_check=(0, 1))
            tl.store(gw_bp, tl.where(refined[:, None], gk, 0.0).to(CD), boundary_check=(0, 1))
            tl.store(xw_bp, tl.where(refined[:, None], xk, 0.0).to(CD), boundary_check=(0, 1))
            d_bp = tl.advance(d_bp, (0, BLOCK_K))
            gw_bp = tl.advance(gw_bp, (0, BLOCK_K))
            xw_bp = tl.advance(xw_bp, (0, BLOCK_K))
        x_bp = tl.advance(x_bp, (0, BLOCK_K))
        g_bp = tl.advance(g_bp, (0, BLOCK_K))
        t_bp = tl.advance(t_bp, (BLOCK_K, 0))
        u_bp = tl.advance(u_bp, (BLOCK_K, 0))
    if USE_SOFTMAX:
        lse = tl.load(LSE + rws, mask=in_range, other=0.0)
        p = tl.exp(tl.where((js < M - 1)[None, :], z * c_scale, float("-inf")) - lse[:, None])
        p0 = tl.exp(z0 * c_scale - lse)
    else:
        p = z
        p0 = z0
    p = tl.where(refined[:, None] & (js < M - 1)[None, :], p, 0.0)
    pgp = tl.sum(p * gp, axis=1)
    if USE_SOFTMAX:
        gz = p * (gp - pgp[:, None]) * c_scale
        gz0 = tl.where(refined, -p0 * pgp * c_scale, 0.0)
    else:
        gz = tl.where(refined[:, None], gp, 0.0)
        gz0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    gz = tl.where((js < M - 1)[None, :], gz, 0.0)
    cols = in_range[:, None] & (js < Mp)[None, :]
    p1a = tl.where(((js == M - 1)[None, :]) & refined[:, None], 1.0, p)
    tl.store(w1 + 2 * Cp + Mp + js[None, :], p1a.to(CD), mask=cols)
    # GZ: token j + 1's gz at column j + 1, the null token's at column 0
    tl.store(w1 + Cp + 1 + js[None, :], gz.to(CD), mask=in_range[:, None] & (js + 1 < Mp)[None, :])
    tl.store(W1 + rws * K1 + Cp, gz0.to(CD), mask=in_range)


def _tuned(kernel, configs_by_path):
    return {path: triton.autotune(configs=configs(cfgs, ROWS_INTERP[0]), key=["C", "M"])(kernel)
            for path, cfgs in configs_by_path.items()}


_ROWS_FWD = _tuned(_rows_fwd_kernel, ROWS_FWD_GPU_CONFIGS)
_ROWS_BWD = _tuned(_rows_bwd_kernel, ROWS_BWD_GPU_CONFIGS)


@contextlib.contextmanager
def row_layout(streamed: bool):
    """Inside, both row kernels take only the configs of one layout (STREAM_K > 0, or 0):
    the tests check each layout's results, and the kernel probe times each. The autotuners
    pick afresh among them, and pick again after."""
    saved = []
    for table, gpu in ((_ROWS_FWD, ROWS_FWD_GPU_CONFIGS), (_ROWS_BWD, ROWS_BWD_GPU_CONFIGS)):
        for path, tuner in table.items():
            saved.append((tuner, tuner.configs, tuner.cache))
            chosen = [c for c in (ROWS_INTERP if INTERPRET else gpu[path]) if (c.kwargs["STREAM_K"] > 0) == streamed]
            tuner.configs, tuner.cache = (chosen if AUTOTUNE else chosen[:1]), {}
    try:
        yield
    finally:
        for tuner, cfgs, cache in saved:
            tuner.configs, tuner.cache = cfgs, cache


# ----------------------------------------------------------------------------- GEMMs

# torch >= 2.8 has fp32-output GEMMs of fp16/bf16 operands (``out_dtype``), on CUDA only.
HAS_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype_out")


def _register_cpu_out_dtype() -> None:
    """The CPU kernels torch lacks for ``aten::mm.dtype`` and ``aten::addmm.dtype_out``
    (16-bit operands, fp32 result), so that the CPU tests run the GEMM calls the GPU runs:
    the operands upcast, which gives the same exact products and fp32 sums. Registered only
    where torch has none."""
    if not HAS_OUT_DTYPE:
        return
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    lib = torch.library.Library("aten", "IMPL")
    if not has("aten::mm.dtype", "CPU"):
        lib.impl("mm.dtype", lambda a, b, out_dtype: torch.mm(a.to(out_dtype), b.to(out_dtype)), "CPU")
    if not has("aten::addmm.dtype_out", "CPU"):
        def addmm_dtype_out(self, a, b, out_dtype, *, beta=1, alpha=1, out):
            return torch.addmm(self.to(out_dtype), a.to(out_dtype), b.to(out_dtype), beta=beta, alpha=alpha, out=out)
        lib.impl("addmm.dtype_out", addmm_dtype_out, "CPU")
    _LIBS.append(lib)


_LIBS: list = []  # keeps the registrations alive
_register_cpu_out_dtype()


def _mm(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a @ b in ``dtype``, accumulated in fp32, rounded once."""
    if a.dtype == dtype:
        return torch.mm(a, b)
    if HAS_OUT_DTYPE and dtype == torch.float32:
        return torch.mm(a, b, out_dtype=dtype)
    return torch.mm(a.float(), b.float()).to(dtype) if HAS_OUT_DTYPE else torch.mm(a, b).to(dtype)


def _addmm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b in place (cuBLAS' beta = 1: acc is read once in the GEMM's epilogue and
    written once, no separate pass), in acc's dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif HAS_OUT_DTYPE and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(torch.mm(a, b))


# ----------------------------------------------------------------------------- launchers


def _path(cdtype: torch.dtype, C: int, *ts: Tensor) -> str:
    """Which config list a launch on the [rows, C] operands ts takes."""
    if precision(cdtype) == "ieee":
        return "small"
    return "tc" if C % 16 == 0 and aligned16(*ts) else "tc_odd"


def _direct(kernel):
    return kernel


def _grid(R: int, Cp: int, pack_rows: int):
    """Per block of rows its row program and stream programs, then the programs that pack a
    GEMM operand of ``pack_rows`` rows."""
    def grid(meta):
        per_block = 1 + (triton.cdiv(Cp, meta["STREAM_K"]) if meta["STREAM_K"] else 0)
        return (triton.cdiv(R, meta["BLOCK_R"]) * per_block + triton.cdiv(pack_rows, meta["BLOCK_R"]),)
    return grid


def _fwd_rows(x2, S1, sd, T, U, W, b, cdtype, num_prefix, use_softmax, out_dtype, launch=_direct):
    """The forward row kernel on the [R, C] row view x2 (R > 0): (OUT = x, A, Bt, lse)."""
    R, C = x2.shape
    M = T.shape[0]
    Cp, Kf = _pad16(C), _pad16(C) + _pad16(M)
    dev = x2.device
    out = new(torch.empty(R, C, device=dev, dtype=out_dtype))
    lse = new(torch.empty(R, device=dev, dtype=torch.float32))
    A = new(torch.empty(R, Kf, device=dev, dtype=cdtype))
    Bt = new(torch.empty(C, Kf, device=dev, dtype=cdtype))
    launch(_ROWS_FWD[_path(cdtype, C, x2, out)])[_grid(R, Cp, C)](
        x2, T, U, W, b, out, A, Bt, lse,
        R, S1, C, M, Cp, Kf,
        x2.stride(0), out.stride(0), W.stride(0), W.stride(1),
        num_prefix, C ** -0.5 if use_softmax else 1.0,
        SEQ_DIM=sd, USE_SOFTMAX=use_softmax, PRECISION=precision(cdtype), BLOCK_M=_block_m(M),
    )
    return out, A, Bt, lse


def _forward(x, T, U, W, b, cdtype, num_prefix, seq_dim, use_softmax, launch=_direct):
    """(out, lse). T, U: the tokens and U in the compute dtype (the op's Tc, Uc); ``launch``
    wraps each kernel before its launch (torch.library.wrap_triton for the triton_op)."""
    xv, sd, swapped = row_view(x, seq_dim)
    x2 = rows(xv)
    out_dtype = torch.promote_types(x.dtype, cdtype)
    if x2.shape[0]:
        out, A, Bt, lse = _fwd_rows(x2, xv.shape[1], sd, T, U, W, b, cdtype, num_prefix, use_softmax, out_dtype,
                                    launch)
        _addmm_(out, A, Bt.t())
    else:
        out = torch.empty(x2.shape, device=x.device, dtype=out_dtype)
        lse = torch.empty(0, device=x.device, dtype=torch.float32)
    out = out.view(xv.shape)
    if swapped:
        out = out.transpose(0, 1)
    return out, lse


def _bwd_rows(x2, g2, S1, sd, T, U, W, lse, cdtype, num_prefix, use_softmax, launch=_direct):
    """The backward row kernel on the [R, C] row views x2 and g2 (R > 0): (DX = g, W1, Bb)."""
    R, C = x2.shape
    M, dev = T.shape[0], x2.device
    Cp, Mp = _pad16(C), _pad16(M)
    # DX accumulates in g's dtype (out's, promote(x, cdtype)), the GEMM adding to it in place
    dx = new(torch.empty(R, C, device=dev, dtype=g2.dtype))
    W1 = new(torch.empty(R, 2 * (Mp + Cp), device=dev, dtype=cdtype))
    Bb = new(torch.empty(Cp + Mp, C, device=dev, dtype=cdtype))
    launch(_ROWS_BWD[_path(cdtype, C, x2, g2, dx)])[_grid(R, Cp, Cp + Mp)](
        x2, g2, T, U, W, lse, dx, W1, Bb,
        R, S1, C, M, Cp, Mp,
        x2.stride(0), g2.stride(0), dx.stride(0), W.stride(0), W.stride(1),
        num_prefix, C ** -0.5 if use_softmax else 1.0,
        SEQ_DIM=sd, USE_SOFTMAX=use_softmax, PRECISION=precision(cdtype), BLOCK_M=_block_m(M),
    )
    return dx, W1, Bb


def _bwd_gemms(dx, W1, Bb, C, M, pdtype):
    """The backward's two cuBLAS GEMMs on the row kernel's operands: DX += [G | GZ] Bb in
    place; D = [G | GZ]^T [XC | P1a] [Cp + Mp, Cp + Mp] in ``pdtype`` (``_weight_grads``
    reads the gradients off it)."""
    K = _pad16(C) + _pad16(M)
    GGZ = W1[:, :K]
    _addmm_(dx, GGZ, Bb)
    return _mm(GGZ.t(), W1[:, K:], pdtype)


def _weight_grads(D: Tensor, C: int, m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dT, dU, dW, db) as views of D = [G | GZ]^T [XC | P1a]: rows 0..C are g's columns
    and Cp.. gz's (the null token's first), columns 0..C x's and Cp.. P1a's (p[1:], then the
    ones)."""
    Cp = _pad16(C)
    return D[Cp: Cp + m, :C], D[:C, Cp: Cp + m - 1].t(), D[:C, :C], D[:C, Cp + m - 1]


def _backward(g, x, T, U, W, b, lse, cdtype, num_prefix, seq_dim, use_softmax, launch=_direct):
    """(dx, D = [[dW, dU^T | db], [dT, .]] [Cp + mp, Cp + mp] in W's dtype): the op returns
    the GEMM's result whole (a custom op's results may not be views of each other);
    ``_weight_grads`` slices it. T, U: in the compute dtype (Tc, Uc)."""
    xv, sd, swapped = row_view(x, seq_dim)
    gv, _, _ = row_view(g, seq_dim, swap=swapped)
    x2, g2 = rows(xv), rows(gv)
    R, C = x2.shape
    M, pdtype = T.shape[0], W.dtype
    if R:
        dx, W1, Bb = _bwd_rows(x2, g2, xv.shape[1], sd, T, U, W, lse, cdtype, num_prefix, use_softmax, launch)
        D = _bwd_gemms(dx, W1, Bb, C, M, pdtype)
    else:
        dx = torch.empty(g2.shape, device=x.device, dtype=g.dtype)
        D = torch.zeros(_pad16(C) + _pad16(M), _pad16(C) + _pad16(M), device=x.device, dtype=pdtype)
    dx = dx.view(xv.shape)
    if swapped:
        dx = dx.transpose(0, 1)
    return dx.to(x.dtype), D


# ----------------------------------------------------------------------------- custom ops


def _check_operands(T: Tensor, U: Tensor, W: Tensor, b: Tensor, Tc: Tensor, Uc: Tensor, cdtype) -> None:
    if not (T.dtype == U.dtype == W.dtype == b.dtype and Tc.dtype == Uc.dtype == cdtype
            and T.shape == Tc.shape and U.shape == Uc.shape):
        raise TypeError(f"rein::layer_fwd_v4: T, U, W and b must share one dtype (the parameters' own) and Tc, Uc "
                        f"be T and U in the compute dtype {cdtype}, got {T.dtype}, {U.dtype}, {W.dtype}, {b.dtype}, "
                        f"{Tc.dtype} {tuple(Tc.shape)}, {Uc.dtype} {tuple(Uc.shape)}; rein_kernels.prepare forms them")


def _register(register, suffix: str, launch):
    """The op pair ``rein::layer_fwd_v4{suffix}`` / ``rein::layer_bwd_v4{suffix}`` with its
    autograd: a torch.library custom op (opaque to torch.compile) or a triton_op (torch >=
    2.6: traced by torch.compile, so Inductor launches the kernels and sees the GEMMs)."""

    @register(f"rein::layer_fwd_v4{suffix}", mutates_args=())
    def fwd(
        x: Tensor, T: Tensor, U: Tensor, W: Tensor, b: Tensor, Tc: Tensor, Uc: Tensor, cdtype: torch.dtype,
        num_prefix: int, seq_dim: int, use_softmax: bool,
    ) -> tuple[Tensor, Tensor]:
        """out = x + x W^T + p[1:] U + b and the per-row lse (see the module's docstring)."""
        _check_operands(T, U, W, b, Tc, Uc, cdtype)
        # the kernels read Tc, Uc and b with unit strides (W: any strides)
        return _forward(x, Tc.contiguous(), Uc.contiguous(), W, b.contiguous(), cdtype, num_prefix, seq_dim,
                        use_softmax, launch)

    @register(f"rein::layer_bwd_v4{suffix}", mutates_args=())
    def bwd(
        g: Tensor, x: Tensor, W: Tensor, b: Tensor, Tc: Tensor, Uc: Tensor, lse: Tensor, cdtype: torch.dtype,
        num_prefix: int, seq_dim: int, use_softmax: bool,
    ) -> tuple[Tensor, Tensor]:
        """Gradients of ``rein::layer_fwd_v4``: (dx, D), D holding dT, dU, dW and db in W's dtype
        (``_weight_grads``)."""
        # every dtype is chosen explicitly inside; autocast must not recast the GEMMs
        with torch.autocast(x.device.type, enabled=False):
            return _backward(g, x, Tc.contiguous(), Uc.contiguous(), W, b.contiguous(), lse, cdtype, num_prefix,
                             seq_dim, use_softmax, launch)

    if register is torch.library.custom_op:
        @fwd.register_fake
        def _(x, T, U, W, b, Tc, Uc, cdtype, num_prefix, seq_dim, use_softmax):
            out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cdtype))
            lse = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
            return out, lse

        @bwd.register_fake
        def _(g, x, W, b, Tc, Uc, lse, cdtype, num_prefix, seq_dim, use_softmax):
            K = _pad16(W.shape[0]) + _pad16(Tc.shape[0])
            return torch.empty_like(x), W.new_empty(K, K)

    def backward(ctx, g, _g_lse):
        if g is None:  # out's gradient undefined (an upstream node returned none for it)
            return (None,) * 11
        x, W, b, Tc, Uc, lse = ctx.saved_tensors
        dx, D = bwd(g, x, W, b, Tc, Uc, lse, *ctx.args)
        # Tc and Uc are T and U in another dtype: their gradients are T's and U's
        return (dx, *_weight_grads(D, W.shape[0], Tc.shape[0])) + (None,) * 6

    fwd.register_autograd(backward, setup_context=_setup_context)
    return fwd, bwd


def _setup_context(ctx, inputs, output):
    x, T, U, W, b, Tc, Uc, cdtype, num_prefix, seq_dim, use_softmax = inputs
    ctx.save_for_backward(x, W, b, Tc, Uc, output[1])
    ctx.args = (cdtype, num_prefix, seq_dim, use_softmax)
    # lse is the op's own residual, not a result: it takes no gradient, and autograd
    # materialises no zeros for it
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


rein_layer_fwd, rein_layer_bwd = _register(torch.library.custom_op, "", _direct)
# torch.library.triton_op came with torch 2.6; older versions keep the custom op alone
HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
if HAS_TRITON_OP:
    rein_layer_fwd_t, rein_layer_bwd_t = _register(torch.library.triton_op, "_t", torch.library.wrap_triton)
