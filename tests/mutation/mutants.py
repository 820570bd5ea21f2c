"""Planted bugs: each one an exact text edit (``old`` must occur exactly once in ``file``).

Realistic kernel, launcher, layer and reference bugs; ``run.py`` applies one at a time,
runs the CPU suite's kernel tests and reverts. Add one whenever a bug is found that the
suite missed, before fixing the suite.
"""
K = "rein_kernels/rein_layer.py"
R = "rein_kernels/reference.py"
I = "rein_kernels/__init__.py"
L = "rein/layer.py"


def m(id, file, old, new, why):
    return dict(id=id, edits=[(file, old, new)], why=why)


def both(id, edits, why):
    """One bug planted in several places at once (reference and kernels wrong alike)."""
    return dict(id=id, edits=edits, why=why)


MUTANTS = [
    # ---- row kernel: logits, softmax, lse
    m("lse-no-max", K, "lse = s_max + tl.log(tl.sum(tl.exp(s - s_max[:, None]), axis=1))",
      "lse = tl.log(tl.sum(tl.exp(s), axis=1))", "lse without subtracting the row max"),
    m("softmax-scale", K, "num_prefix, C ** -0.5 if use_softmax else 1.0,",
      "num_prefix, C ** -0.25 if use_softmax else 1.0,", "wrong softmax temperature"),
    m("gz-no-scale", K, "gz = p * (gp - tl.sum(p * gp, axis=1)[:, None]) * c_scale",
      "gz = p * (gp - tl.sum(p * gp, axis=1)[:, None])", "softmax backward without c"),
    m("gz-sign", K, "gz = p * (gp - tl.sum(p * gp, axis=1)[:, None]) * c_scale",
      "gz = p * (gp + tl.sum(p * gp, axis=1)[:, None]) * c_scale", "softmax backward sign"),
    m("bwd-p-no-lse", K, "p = tl.exp(s - lse[:, None])", "p = tl.exp(s - tl.max(s, axis=1)[:, None])",
      "p recomputed without the normaliser"),
    m("lse-store-max", K, "tl.store(LSE + rows, lse, mask=in_range)", "tl.store(LSE + rows, s_max, mask=in_range)",
      "saves the row max instead of lse"),
    m("u-null-token", K, "u_ok = col_ok & (cols >= 1)", "u_ok = col_ok & (cols >= 0)",
      "the null token gets a value"),
    m("u-row-shift", K, "uk = tl.load(U + (cols[None, :] - 1) * C + ks[:, None]",
      "uk = tl.load(U + (cols[None, :]) * C + ks[:, None]", "U row j-1 feeds column j"),
    m("p1-col-shift", K, "p1_ptrs = P1 + rows[:, None] * (M - 1) + (cols[None, :] - 1)",
      "p1_ptrs = P1 + rows[:, None] * (M - 1) + (cols[None, :])", "P1 column offset"),
    m("p1-row-stride", K, "p1_ptrs = P1 + rows[:, None] * (M - 1) + (cols[None, :] - 1)",
      "p1_ptrs = P1 + rows[:, None] * M + (cols[None, :] - 1)", "P1 row stride"),
    m("p-prefix-unmasked", K, "    p = tl.where(refined[:, None], p, 0.0)\n", "",
      "prefix rows leak into P1 and the weight gradients"),
    m("gz-prefix-unmasked", K, "gz = tl.where(refined[:, None], gp, 0.0)", "gz = gp",
      "no-softmax gz' not zeroed on prefix rows"),
    m("share-sign", K, "share = tl.sum(p * gp, axis=1) - tl.sum(gz.to(tl.float32) * z, axis=1)",
      "share = tl.sum(p * gp, axis=1) + tl.sum(gz.to(tl.float32) * z, axis=1)", "dscale row share sign"),
    m("z-acc-reset", K, "z = tl.dot(xk.to(tk.dtype), tk, z, input_precision=PRECISION)",
      "z = tl.dot(xk.to(tk.dtype), tk, input_precision=PRECISION)", "logits keep only the last K chunk"),
    m("gp-acc-reset", K, "gp = tl.dot(gk.to(uk.dtype), uk, gp, input_precision=PRECISION)",
      "gp = tl.dot(gk.to(uk.dtype), uk, input_precision=PRECISION)", "gp keeps only the last K chunk"),
    m("k-mask-short", K, "        ks = k0 + tl.arange(0, BLOCK_K)\n        k_ok = ks < C\n        xk",
      "        ks = k0 + tl.arange(0, BLOCK_K)\n        k_ok = ks < C - 1\n        xk", "drops the last channel"),
    m("block-m-short", K, "return max(16, triton.next_power_of_2(M))", "return max(16, triton.next_power_of_2(M - 1))",
      "too few token columns when m - 1 is a power of two"),
    # ---- row addressing
    m("row-i0-i1", K, "    i0 = rows // S1\n    i1 = rows % S1", "    i1 = rows // S1\n    i0 = rows % S1",
      "row index decomposition swapped"),
    m("seq-dim-swap", K, "seq = i1 if SEQ_DIM == 1 else i0", "seq = i0 if SEQ_DIM == 1 else i1",
      "prefix taken along the wrong dimension"),
    m("prefix-off-by-one", K, "return X + i0 * sx0 + i1 * sx1, in_range, in_range & (seq >= num_prefix)",
      "return X + i0 * sx0 + i1 * sx1, in_range, in_range & (seq > num_prefix)", "one prefix row too many"),
    m("int32-rows-logits", K, "    pid = tl.program_id(0)\n    rows = pid.to(tl.int64) * BLOCK_R",
      "    pid = tl.program_id(0)\n    rows = pid * BLOCK_R", "int32 row offsets in the row kernel"),
    m("int32-rows-gemm", K, "rows = pid_r.to(tl.int64) * BLOCK_R", "rows = pid_r * BLOCK_R",
      "int32 row offsets in the GEMM"),
    # ---- GEMM kernel
    m("gemm-acc-reset", K, "acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)",
      "acc = tl.dot(a.to(b.dtype), b, input_precision=PRECISION)", "GEMM keeps only the last K chunk of x W"),
    m("gemm-k2-short", K, "        k_ok = ks < K2\n", "        k_ok = ks < K2 - 1\n", "drops the last token"),
    m("gemm-no-bias", K, "acc += tl.load(BIAS + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]",
      "acc += 0.0 * tl.load(BIAS + ns, mask=n_ok, other=0.0).to(tl.float32)[None, :]", "b_d dropped"),
    m("gemm-no-scale", K, "out = tl.where(refined[:, None], res + scale * acc, res)",
      "out = tl.where(refined[:, None], res + acc, res)", "scale dropped"),
    m("gemm-prefix-refined", K, "out = tl.where(refined[:, None], res + scale * acc, res)",
      "out = res + scale * acc", "prefix rows refined"),
    m("gemm-store-mask", K, "tl.store(o_rows[:, None] + ns[None, :], out.to(OUT.dtype.element_ty), mask=tile_ok)",
      "tl.store(o_rows[:, None] + ns[None, :], out.to(OUT.dtype.element_ty), mask=in_range[:, None])",
      "stores past the last channel"),
    m("dscale-share-residual", K, "share = tl.sum(tl.where(refined[:, None], acc * xt, 0.0), axis=1)",
      "share = tl.sum(tl.where(refined[:, None], acc * res, 0.0), axis=1)", "dscale share against g, not x"),
    m("dscale-share-prefix", K, "share = tl.sum(tl.where(refined[:, None], acc * xt, 0.0), axis=1)",
      "share = tl.sum(acc * xt, axis=1)", "dscale share counts prefix rows"),
    m("partial-index", K, "tl.store(PARTIAL + pid_r * tl.num_programs(1) + pid_n, tl.sum(share, axis=0))",
      "tl.store(PARTIAL + pid_r + pid_n, tl.sum(share, axis=0))", "dscale shares overwrite each other"),
    # ---- launchers and the backward's torch part
    m("fwd-wd-untransposed", K, "_launch_gemm(xv, sd, P1, W_d.t(), U, b_d, scale, out, num_prefix)",
      "_launch_gemm(xv, sd, P1, W_d, U, b_d, scale, out, num_prefix)", "forward uses W_d, not W_d^T"),
    m("bwd-wd-transposed", K, "_launch_gemm(gv, sd, GZ, W_d, T, None, scale, dx, num_prefix, x=xv, partial=part_gemm)",
      "_launch_gemm(gv, sd, GZ, W_d.t(), T, None, scale, dx, num_prefix, x=xv, partial=part_gemm)",
      "backward uses W_d^T"),
    m("b1-strides-swapped", K, "A.stride(0), A.stride(1), out.stride(0), out.stride(1), B1.stride(0), B1.stride(1),",
      "A.stride(0), A.stride(1), out.stride(0), out.stride(1), B1.stride(1), B1.stride(0),", "B1 strides swapped"),
    m("g-view-unpaired", K, "gv, _, _ = _row_view(g, seq_dim, swap=swapped)", "gv, _, _ = _row_view(g, seq_dim)",
      "g's rows not ordered as x's"),
    m("dscale-no-bias-term", K, "dscale = part_gemm.sum() + part_rows.sum() + (b_d.float() * g_sum).sum()",
      "dscale = part_gemm.sum() + part_rows.sum()", "dscale misses <b_d, sum g>"),
    m("dscale-no-row-share", K, "dscale = part_gemm.sum() + part_rows.sum() + (b_d.float() * g_sum).sum()",
      "dscale = part_gemm.sum() + (b_d.float() * g_sum).sum()", "dscale misses the row kernel's shares"),
    m("gsum-prefix", K, "        g_sum = g_sum - Gp.sum(0, dtype=torch.float32)\n", "",
      "db_d counts prefix rows"),
    m("xtg-prefix", K, "        XtG = XtG - Gp.t().to(cd) @ _prefix_rows(xv, sd, num_prefix).to(cd)\n", "",
      "dW_d counts prefix rows"),
    m("du-unscaled", K, "(s * PtG.float()).to(U.dtype),", "PtG.float().to(U.dtype),", "dU without scale"),
    m("dt-from-g", K, "dT = GZ.t() @ X2", "dT = GZ.t() @ G2", "dT against g, not x"),
    m("dwd-transposed", K, "(s * XtG.float()).to(W_d.dtype),", "(s * XtG.float().t()).to(W_d.dtype),",
      "dW_d transposed"),
    m("dbd-unscaled", K, "(s * g_sum).to(b_d.dtype),", "g_sum.to(b_d.dtype),", "db_d without scale"),
    m("precision-always-tf32", K, "    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:\n        return \"ieee\"\n",
      "", "fp32 dots ignore the tf32 switch"),
    m("out-dtype-x", K, "out = _new(torch.empty_like(xv, dtype=torch.promote_types(x.dtype, T.dtype)))",
      "out = _new(torch.empty_like(xv))", "out keeps x's dtype (the bug found natively)"),
    m("bwd-autocast-guard", K, "    with torch.autocast(x.device.type, enabled=False):\n        return _backward(",
      "    if True:\n        return _backward(", "backward recast by an enclosing autocast region"),
    # ---- functional layer, module, reference
    m("u-from-wrong-tokens", I, "U = F.linear(F.linear(T[1:], W_t, b_t), W_d).contiguous()",
      "U = F.linear(F.linear(T[:-1], W_t, b_t), W_d).contiguous()", "U from the wrong tokens"),
    m("u-no-bias", I, "U = F.linear(F.linear(T[1:], W_t, b_t), W_d).contiguous()",
      "U = F.linear(F.linear(T[1:], W_t), W_d).contiguous()", "mlp_token2feat's bias dropped"),
    m("autocast-ignored", I, "        return torch.get_autocast_dtype(dev)\n", "        return x.dtype\n",
      "the compute dtype ignores autocast"),
    m("has-cls-inverted", L, "num_prefix_tokens = 1 if has_cls_token else 0",
      "num_prefix_tokens = 0 if has_cls_token else 1", "has_cls_token inverted"),
    m("lora-layer-0", L, "return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]",
      "return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[0]", "LoRA tokens of the wrong layer"),
    m("lora-all-layers", L, "            return self.learnable_tokens_a @ self.learnable_tokens_b\n",
      "            return self.learnable_tokens_a @ self.learnable_tokens_b[:1]\n", "queries from layer 0's B only"),
    m("ref-softmax-scale", R, "attn = attn * (T.shape[-1] ** -0.5)", "attn = attn * (T.shape[-1] ** -0.25)",
      "reference softmax temperature (the kernel's is right)"),
    m("ref-null-token", R, 'delta = torch.einsum("nbm,mc->nbc", attn[:, :, 1:], F.linear(T[1:, :], W_t, b_t))',
      'delta = torch.einsum("nbm,mc->nbc", attn[:, :, :-1], F.linear(T[1:, :], W_t, b_t))',
      "reference drops the wrong token"),
    m("ref-no-residual-in-delta", R, "delta = F.linear(delta + feats, W_d, b_d)", "delta = F.linear(delta, W_d, b_d)",
      "reference: mlp_delta_f(d) instead of mlp_delta_f(d + x)"),
    both("both-softmax-scale", [
        (K, "num_prefix, C ** -0.5 if use_softmax else 1.0,", "num_prefix, C ** -0.25 if use_softmax else 1.0,"),
        (R, "attn = attn * (T.shape[-1] ** -0.5)", "attn = attn * (T.shape[-1] ** -0.25)")],
        "the same wrong temperature in the reference and the kernels"),
    both("both-no-token-bias", [
        (I, "U = F.linear(F.linear(T[1:], W_t, b_t), W_d).contiguous()",
         "U = F.linear(F.linear(T[1:], W_t), W_d).contiguous()"),
        (R, 'F.linear(T[1:, :], W_t, b_t))', 'F.linear(T[1:, :], W_t))')],
        "mlp_token2feat's bias dropped in the reference and the kernels"),
]
