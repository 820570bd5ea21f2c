"""The fused Rein layer: Triton kernels, launchers and the ``rein::`` custom ops.

Math (REIN_SPEC.md). For every refined row x (length C) of layer l, with tokens
T [m, C], c = C^-1/2 (1 without softmax), W_d, b_d = mlp_delta_f and
U = mlp_token2feat(T[1:]) W_d^T [m-1, C] (formed once per call from parameters):

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
launchers order rows as memory does (the outer-strided dimension first), so that the
row-major [rows, C] views the weight GEMMs need are free for dense inputs. Offsets are
int64 so rows * C > 2^31 is fine.

Dtypes. The dot operands are cast to the parameters' dtype (the compute dtype, e.g.
bf16 under autocast) and accumulate in fp32; softmax, lse and the epilogue are fp32.
out has the dtype the reference's promotion gives, promote(x, compute dtype): x's own
without autocast, fp32 for bf16 features under fp16 autocast. dx has x's dtype. The
weight-gradient GEMMs run in the compute dtype, as autocast runs the reference's.
fp32 dots follow ``torch.backends.cuda.matmul.allow_tf32``.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set this: every buffer a kernel must fill starts as NaN, so unwritten elements
# show, and is followed by a NaN guard region (kept in GUARDS) that must stay NaN, so
# that a write past the end fails a test instead of corrupting the heap.
POISON = False
GUARDS: list[Tensor] = []


def _new(t: Tensor) -> Tensor:
    """``t`` (freshly allocated, dense) as is, or under POISON a NaN-filled copy of its
    layout at the front of a buffer twice its size plus 4096 elements."""
    if not POISON:
        return t
    n = t.numel()
    buf = torch.full((2 * n + 4096,), float("nan"), dtype=t.dtype, device=t.device)
    GUARDS.append(buf[n:])
    return buf.as_strided(t.shape, t.stride())


# REIN_AUTOTUNE=0 pins each kernel to its first GPU config: the parity suite runs many
# shapes, and autotuning each would cost more than the checks themselves.
AUTOTUNE = os.environ.get("REIN_AUTOTUNE", "1") != "0"


def _configs(gpu_configs, interp_config):
    # Several configs fail in the interpreter, and autotuning there only costs time.
    if INTERPRET:
        return [interp_config]
    return gpu_configs if AUTOTUNE else gpu_configs[:1]


LOGITS_GPU_CONFIGS = [
    triton.Config({"BLOCK_R": br, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for br, bk, w, s in [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 4)]
]
GEMM_GPU_CONFIGS = [
    triton.Config({"BLOCK_R": br, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for br, bn, bk, w, s in [
        (128, 128, 32, 8, 4),
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 3),
    ]
]
_LOGITS_CONFIGS = _configs(
    LOGITS_GPU_CONFIGS, triton.Config({"BLOCK_R": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1))
_GEMM_CONFIGS = _configs(
    GEMM_GPU_CONFIGS, triton.Config({"BLOCK_R": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1))


@triton.jit
def _row_pointers(X, rows, S1, sx0, sx1, R, num_prefix, SEQ_DIM: tl.constexpr):
    """Row r of the [S0, S1] row grid -> (pointer to x[r, 0], row in range, row refined)."""
    i0 = rows // S1
    i1 = rows % S1
    seq = i1 if SEQ_DIM == 1 else i0
    in_range = rows < R
    return X + i0 * sx0 + i1 * sx1, in_range, in_range & (seq >= num_prefix)


@triton.autotune(configs=_LOGITS_CONFIGS, key=["C", "M", "BACKWARD"], reset_to_zero=["PARTIAL"])
@triton.jit
def _rein_logits_kernel(
    X, G, T, U, LSE, P1, GZ, PARTIAL,
    R, S1, C, M,
    sx0, sx1, sg0, sg1,
    num_prefix, c_scale,
    SEQ_DIM: tl.constexpr, USE_SOFTMAX: tl.constexpr, BACKWARD: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Per block of rows: z = x T^T, the softmax, and (BACKWARD) gz'.

    FORWARD writes lse = logsumexp(c z) (fp32) and P1 = p[1:].
    BACKWARD reads lse, recomputes p = exp(c z - lse), accumulates gp' = g U^T
    (U row j-1 feeds column j; column 0, the null token, gets 0) and writes
    P1 = p[1:] and gz' = p (gp' - <p, gp'>) c, the softmax backward, and this
    program's share of dscale, sum over its rows of <p, gp'> - <gz', z>, into
    PARTIAL[pid] (fp32; gz' as rounded for the GEMM that consumes it).
    Prefix rows write zeros to P1 and gz' so that the weight-gradient GEMMs over
    all rows see them as absent.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    x_rows, in_range, refined = _row_pointers(X, rows, S1, sx0, sx1, R, num_prefix, SEQ_DIM)
    if BACKWARD:
        g_rows, _, _ = _row_pointers(G, rows, S1, sg0, sg1, R, num_prefix, SEQ_DIM)
    cols = tl.arange(0, BLOCK_M)
    col_ok = cols < M
    u_ok = col_ok & (cols >= 1)
    z = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    gp = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        xk = tl.load(x_rows[:, None] + ks[None, :], mask=in_range[:, None] & k_ok[None, :], other=0.0)
        tk = tl.load(T + cols[None, :] * C + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        z = tl.dot(xk.to(tk.dtype), tk, z, input_precision=PRECISION)
        if BACKWARD:
            gk = tl.load(g_rows[:, None] + ks[None, :], mask=in_range[:, None] & k_ok[None, :], other=0.0)
            uk = tl.load(U + (cols[None, :] - 1) * C + ks[:, None], mask=u_ok[None, :] & k_ok[:, None], other=0.0)
            gp = tl.dot(gk.to(uk.dtype), uk, gp, input_precision=PRECISION)

    if USE_SOFTMAX:
        s = tl.where(col_ok[None, :], z * c_scale, float("-inf"))
        if BACKWARD:
            lse = tl.load(LSE + rows, mask=in_range, other=0.0)
        else:
            s_max = tl.max(s, axis=1)
            lse = s_max + tl.log(tl.sum(tl.exp(s - s_max[:, None]), axis=1))
            tl.store(LSE + rows, lse, mask=in_range)
        p = tl.exp(s - lse[:, None])
    else:
        p = z
    p = tl.where(refined[:, None], p, 0.0)
    p1_ptrs = P1 + rows[:, None] * (M - 1) + (cols[None, :] - 1)
    tl.store(p1_ptrs, p.to(P1.dtype.element_ty), mask=in_range[:, None] & u_ok[None, :])
    if BACKWARD:
        if USE_SOFTMAX:
            gz = p * (gp - tl.sum(p * gp, axis=1)[:, None]) * c_scale
        else:
            gz = tl.where(refined[:, None], gp, 0.0)
        gz = gz.to(GZ.dtype.element_ty)
        gz_ptrs = GZ + rows[:, None] * M + cols[None, :]
        tl.store(gz_ptrs, gz, mask=in_range[:, None] & col_ok[None, :])
        share = tl.sum(p * gp, axis=1) - tl.sum(gz.to(tl.float32) * z, axis=1)
        tl.store(PARTIAL + pid, tl.sum(tl.where(in_range, share, 0.0), axis=0))


@triton.autotune(configs=_GEMM_CONFIGS, key=["C", "K2"], reset_to_zero=["PARTIAL"])
@triton.jit
def _rein_gemm_kernel(
    A, A2, B1, B2, BIAS, SCALE, OUT, X, PARTIAL,
    R, S1, C, K2,
    sa0, sa1, so0, so1, sb1k, sb1n, sx0, sx1,
    num_prefix,
    SEQ_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, DSCALE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """OUT = A + scale * (A @ B1 + A2 @ B2 + bias) on refined rows, OUT = A on prefix rows.

    A [rows, C] (strided, also the residual), B1 [C, C] (strides sb1k, sb1n, so W_d^T
    needs no copy), A2 [rows, K2] and B2 [K2, C] contiguous. Forward: A = x,
    B1 = W_d^T, A2 = P1, B2 = U, bias = b_d. Backward: A = g, B1 = W_d, A2 = gz',
    B2 = T, no bias; both give the output of one K = C + K2 GEMM plus the residual.
    DSCALE (backward) also writes this tile's sum over refined rows of
    <acc, x> = <g W_d, x> + <gz', z> to PARTIAL, fp32: with the row kernel's shares,
    dscale = <W_d, g^T x> + <U, P1^T g> + ... accumulates in fp32 from fp32 partials.
    """
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    a_rows, in_range, refined = _row_pointers(A, rows, S1, sa0, sa1, R, num_prefix, SEQ_DIM)
    o_rows, _, _ = _row_pointers(OUT, rows, S1, so0, so1, R, num_prefix, SEQ_DIM)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < C
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < C
        a = tl.load(a_rows[:, None] + ks[None, :], mask=in_range[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(B1 + ks[:, None].to(tl.int64) * sb1k + ns[None, :] * sb1n,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
    for k0 in range(0, K2, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K2
        a2 = tl.load(A2 + rows[:, None] * K2 + ks[None, :], mask=in_range[:, None] & k_ok[None, :], other=0.0)
        b2 = tl.load(B2 + ks[:, None] * C + ns[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a2, b2, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(SCALE).to(tl.float32)
    tile_ok = in_range[:, None] & n_ok[None, :]
    res = tl.load(a_rows[:, None] + ns[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    out = tl.where(refined[:, None], res + scale * acc, res)
    tl.store(o_rows[:, None] + ns[None, :], out.to(OUT.dtype.element_ty), mask=tile_ok)
    if DSCALE:
        x_rows, _, _ = _row_pointers(X, rows, S1, sx0, sx1, R, num_prefix, SEQ_DIM)
        xt = tl.load(x_rows[:, None] + ns[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        share = tl.sum(tl.where(refined[:, None], acc * xt, 0.0), axis=1)
        tl.store(PARTIAL + pid_r * tl.num_programs(1) + pid_n, tl.sum(share, axis=0))


# ----------------------------------------------------------------------------- launchers


def _row_view(t: Tensor, seq_dim: int, swap: bool | None = None) -> tuple[Tensor, int, bool]:
    """View t [S0, S1, C] with the outer-strided dimension first, so rows follow memory
    order; returns (view, its seq_dim, swapped). ``swap`` forces the choice made for x."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if swap is None:
        swap = t.stride(0) < t.stride(1)
    if swap:
        return t.transpose(0, 1), 1 - seq_dim, True
    return t, seq_dim, False


def _rows_2d(t: Tensor) -> Tensor:
    """[S0, S1, C] -> [S0 * S1, C]; free for a dense row view, one copy otherwise."""
    return t.reshape(-1, t.shape[-1])


def _prefix_rows(t: Tensor, seq_dim: int, num_prefix: int) -> Tensor:
    return _rows_2d(t.narrow(seq_dim, 0, num_prefix))


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's tf32 switch; other dtypes take Triton's default ("tf32",
    which only affects fp32 operands)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_m(M: int) -> int:
    return max(16, triton.next_power_of_2(M))


def _partials(n: int, device) -> Tensor:
    # zeros: a config with fewer programs leaves the other slots at 0
    return torch.zeros(max(n, 1), device=device, dtype=torch.float32)


def _min_block(configs, name: str) -> int:
    return min(c.kwargs[name] for c in configs)


def _launch_logits(xv, gv, seq_dim, T, U, lse, P1, GZ, num_prefix, use_softmax, partial=None):
    """Forward (gv None: writes lse, P1) or backward (reads lse; writes P1, GZ, partial)."""
    S0, S1, C = xv.shape
    R, M = S0 * S1, T.shape[0]
    backward = gv is not None
    g = gv if backward else xv

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]),)

    if partial is None:  # forward: a slot nobody reads (autotuning zeroes it)
        partial = _partials(1, xv.device)
    _rein_logits_kernel[grid](
        xv, g, T, U, lse, P1, GZ if backward else P1, partial,
        R, S1, C, M,
        xv.stride(0), xv.stride(1), g.stride(0), g.stride(1),
        num_prefix, C ** -0.5 if use_softmax else 1.0,
        SEQ_DIM=seq_dim, USE_SOFTMAX=use_softmax, BACKWARD=backward,
        PRECISION=_precision(T.dtype), BLOCK_M=_block_m(M),
    )


def _launch_gemm(A, seq_dim, A2, B1, B2, bias, scale, out, num_prefix, x=None, partial=None):
    """Forward (x None) or backward (x given: also writes the dscale shares to partial)."""
    R = A.shape[0] * A.shape[1]
    C = A.shape[2]
    K2 = A2.shape[1]

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_R"]), triton.cdiv(C, meta["BLOCK_N"]))

    xs = x if x is not None else A
    if partial is None:  # forward: a slot nobody reads (autotuning zeroes it)
        partial = _partials(1, A.device)
    _rein_gemm_kernel[grid](
        A, A2, B1, B2, bias if bias is not None else B2, scale, out, xs, partial,
        R, A.shape[1], C, K2,
        A.stride(0), A.stride(1), out.stride(0), out.stride(1), B1.stride(0), B1.stride(1),
        xs.stride(0), xs.stride(1),
        num_prefix,
        SEQ_DIM=seq_dim, HAS_BIAS=bias is not None, DSCALE=x is not None, PRECISION=_precision(B2.dtype),
    )


def _forward(x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax):
    xv, sd, swapped = _row_view(x, seq_dim)
    R, M = xv.shape[0] * xv.shape[1], T.shape[0]
    out = _new(torch.empty_like(xv, dtype=torch.promote_types(x.dtype, T.dtype)))
    # Without softmax lse is never read; zeros keep the op deterministic.
    if use_softmax:
        lse = _new(torch.empty(R, device=x.device, dtype=torch.float32))
    else:
        lse = torch.zeros(R, device=x.device, dtype=torch.float32)
    P1 = _new(torch.empty(R, M - 1, device=x.device, dtype=T.dtype))
    if R:
        _launch_logits(xv, None, sd, T, U, lse, P1, None, num_prefix, use_softmax)
        _launch_gemm(xv, sd, P1, W_d.t(), U, b_d, scale, out, num_prefix)
    if swapped:
        out = out.transpose(0, 1)
    return out, lse


def _backward(g, x, T, U, W_d, b_d, scale, lse, num_prefix, seq_dim, use_softmax):
    xv, sd, swapped = _row_view(x, seq_dim)
    gv, _, _ = _row_view(g, seq_dim, swap=swapped)
    S0, S1, C = xv.shape
    R, M = S0 * S1, T.shape[0]
    dx = _new(torch.empty_like(xv))
    P1 = _new(torch.empty(R, M - 1, device=x.device, dtype=T.dtype))
    GZ = _new(torch.empty(R, M, device=x.device, dtype=T.dtype))
    part_rows = _partials(triton.cdiv(R, _min_block(_LOGITS_CONFIGS, "BLOCK_R")), x.device)
    part_gemm = _partials(triton.cdiv(R, _min_block(_GEMM_CONFIGS, "BLOCK_R"))
                          * triton.cdiv(C, _min_block(_GEMM_CONFIGS, "BLOCK_N")), x.device)
    if R:
        _launch_logits(xv, gv, sd, T, U, lse, P1, GZ, num_prefix, use_softmax, part_rows)
        _launch_gemm(gv, sd, GZ, W_d, T, None, scale, dx, num_prefix, x=xv, partial=part_gemm)
    if swapped:
        dx = dx.transpose(0, 1)

    # Weight gradients: plain GEMMs over all rows, in the compute dtype (T's), as autocast
    # runs the reference's. Prefix rows are zero in P1 and GZ; for g^T x they are subtracted.
    cd = T.dtype
    X2, G2 = _rows_2d(xv).to(cd), _rows_2d(gv).to(cd)
    XtG = G2.t() @ X2                                    # [C, C]: sum_r g_r^T x_r
    g_sum = _rows_2d(gv).sum(0, dtype=torch.float32)
    if num_prefix:
        Gp = _prefix_rows(gv, sd, num_prefix)
        XtG = XtG - Gp.t().to(cd) @ _prefix_rows(xv, sd, num_prefix).to(cd)
        g_sum = g_sum - Gp.sum(0, dtype=torch.float32)
    PtG = P1.t() @ G2                                    # [m-1, C]
    dT = GZ.t() @ X2                                     # [m, C]
    s = scale.to(torch.float32)
    # dscale = <W_d, g^T x> + <U, P1^T g> + <b_d, sum_rows(g)>, from the kernels' fp32
    # shares rather than from XtG and PtG rounded to x's dtype.
    dscale = part_gemm.sum() + part_rows.sum() + (b_d.float() * g_sum).sum()
    return (
        dx,
        (s * dT.float()).to(T.dtype),
        (s * PtG.float()).to(U.dtype),
        (s * XtG.float()).to(W_d.dtype),
        (s * g_sum).to(b_d.dtype),
        dscale.to(scale.dtype),
    )


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("rein::layer_fwd", mutates_args=())
def rein_layer_fwd(
    x: Tensor, T: Tensor, U: Tensor, W_d: Tensor, b_d: Tensor, scale: Tensor,
    num_prefix: int, seq_dim: int, use_softmax: bool,
) -> tuple[Tensor, Tensor]:
    """out = x + scale * (x W_d^T + p[1:] U + b_d) and the per-row lse (see module doc)."""
    return _forward(x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax)


@rein_layer_fwd.register_fake
def _(x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax):
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, T.dtype))
    lse = x.new_empty(x.shape[0] * x.shape[1], dtype=torch.float32)
    return out, lse


@torch.library.custom_op("rein::layer_bwd", mutates_args=())
def rein_layer_bwd(
    g: Tensor, x: Tensor, T: Tensor, U: Tensor, W_d: Tensor, b_d: Tensor, scale: Tensor,
    lse: Tensor, num_prefix: int, seq_dim: int, use_softmax: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``rein::layer_fwd`` for (x, T, U, W_d, b_d, scale) (see module doc)."""
    # Every dtype is chosen explicitly inside; autocast must not recast the GEMMs.
    with torch.autocast(x.device.type, enabled=False):
        return _backward(g, x, T, U, W_d, b_d, scale, lse, num_prefix, seq_dim, use_softmax)


@rein_layer_bwd.register_fake
def _(g, x, T, U, W_d, b_d, scale, lse, num_prefix, seq_dim, use_softmax):
    return (
        torch.empty_like(x), torch.empty_like(T), torch.empty_like(U),
        torch.empty_like(W_d), torch.empty_like(b_d), torch.empty_like(scale),
    )


def _setup_context(ctx, inputs, output):
    x, T, U, W_d, b_d, scale, num_prefix, seq_dim, use_softmax = inputs
    ctx.save_for_backward(x, T, U, W_d, b_d, scale, output[1])
    ctx.args = (num_prefix, seq_dim, use_softmax)


def _autograd_backward(ctx, g, _g_lse):
    x, T, U, W_d, b_d, scale, lse = ctx.saved_tensors
    grads = rein_layer_bwd(g, x, T, U, W_d, b_d, scale, lse, *ctx.args)
    return (*grads, None, None, None)


rein_layer_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)
