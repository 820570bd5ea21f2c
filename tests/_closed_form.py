"""The Rein layer and all its gradients in closed form, written from docs/maths.md alone.

Independent of ``rein_kernels.reference`` (no autograd, no module) and of the kernels'
algebra (it never forms U = V W_d^T): if the reference and the kernels were wrong the
same way, this still disagrees with both. Float64 in, float64 out.

For the refined rows X [R, C] of layer l, g = dL/dout on those rows, c = C^-1/2 (1
without softmax):
    z = X T^T,  p = softmax(c z) (or z),  V = T[1:] W_t^T + b_t,  d = p[:, 1:] V
    h = d + X,  y = h W_d^T + b_d,  out = X + scale y
    gy = scale g,  gh = gy W_d,  gp = [0 | gh V^T],  gz = p (gp - <p, gp>) c (or gp)
    dX = g + gh + gz T,  dscale = <g, y>,  dW_d = gy^T h,  db_d = sum gy
    dV = p[:, 1:]^T gh,  dW_t = dV^T T[1:],  db_t = sum dV,  dT = gz^T X + [0 ; dV W_t]
Prefix rows pass through: out = x, dx = g, and they add nothing to any gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rows_view(x: Tensor, batch_first: bool, num_prefix: int) -> tuple[Tensor, Tensor]:
    """x -> ([N, B, C] sequence-first copy, boolean mask [N] of refined positions)."""
    seq = x.permute(1, 0, 2) if batch_first else x
    refined = torch.arange(seq.shape[0], device=x.device) >= num_prefix
    return seq, refined


def closed_form(x, g, T, W_t, b_t, W_d, b_d, scale, *, batch_first, num_prefix, use_softmax):
    """(out, {"x", "T", "W_t", "b_t", "W_d", "b_d", "scale"}: gradients), float64."""
    x, g, T, W_t, b_t, W_d, b_d = (t.double() for t in (x, g, T, W_t, b_t, W_d, b_d))
    s = float(scale)
    seq, refined = rows_view(x, batch_first, num_prefix)
    gseq, _ = rows_view(g, batch_first, num_prefix)
    C = x.shape[-1]
    X = seq[refined].reshape(-1, C)
    G = gseq[refined].reshape(-1, C)
    c = C ** -0.5 if use_softmax else 1.0

    z = X @ T.T
    p = torch.softmax(c * z, dim=-1) if use_softmax else z
    V = T[1:] @ W_t.T + b_t
    d = p[:, 1:] @ V
    h = d + X
    y = h @ W_d.T + b_d
    out_rows = X + s * y

    gy = s * G
    gh = gy @ W_d
    gp = torch.cat([torch.zeros_like(p[:, :1]), gh @ V.T], dim=1)
    gz = p * (gp - (p * gp).sum(1, keepdim=True)) * c if use_softmax else gp
    dX = G + gh + gz @ T
    dV = p[:, 1:].T @ gh
    dT = gz.T @ X
    dT[1:] += dV @ W_t
    grads = {
        "T": dT, "W_t": dV.T @ T[1:], "b_t": dV.sum(0), "W_d": gy.T @ h, "b_d": gy.sum(0),
        "scale": (G * y).sum(),
    }

    out_seq, dx_seq = seq.clone(), gseq.clone()
    out_seq[refined] = out_rows.reshape(-1, *seq.shape[1:])
    dx_seq[refined] = dX.reshape(-1, *seq.shape[1:])
    back = (lambda t: t.permute(1, 0, 2)) if batch_first else (lambda t: t)
    grads["x"] = back(dx_seq)
    return back(out_seq), grads


def layer_grads(layer, layer_idx: int, grads: dict) -> dict:
    """Closed-form gradients of T, W_t, ... mapped onto a ReinLayer's parameter names
    (per-layer tokens, or LoRA factors T_l = A_l B_l: dA_l = dT B_l^T, dB_l = A_l^T dT)."""
    out = {
        "mlp_token2feat.weight": grads["W_t"], "mlp_token2feat.bias": grads["b_t"],
        "mlp_delta_f.weight": grads["W_d"], "mlp_delta_f.bias": grads["b_d"],
    }
    if isinstance(layer.scale, torch.nn.Parameter):
        out["scale"] = grads["scale"]
    dT = grads["T"]
    if layer.lora_dim:
        A, B = layer.learnable_tokens_a.double(), layer.learnable_tokens_b.double()
        dA, dB = torch.zeros_like(A), torch.zeros_like(B)
        dA[layer_idx] = dT @ B[layer_idx].T
        dB[layer_idx] = A[layer_idx].T @ dT
        out["learnable_tokens_a"], out["learnable_tokens_b"] = dA, dB
    else:
        full = torch.zeros_like(layer.learnable_tokens, dtype=torch.float64)
        full[layer_idx] = dT
        out["learnable_tokens"] = full
    return out
