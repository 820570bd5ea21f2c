"""The Rein layer in plain PyTorch: the ground truth for every test and the fallback path.

This follows the reference implementation op for op (docs/maths.md, "The forward
pass of layer l"), so that it reproduces its numbers, its dtype promotion under autocast
and its NaN behaviour. It runs in any dtype, float64 included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rein_layer_reference(
    x: Tensor,
    T: Tensor,
    W_t: Tensor,
    b_t: Tensor,
    W_d: Tensor,
    b_d: Tensor,
    scale: Tensor | float,
    *,
    batch_first: bool = False,
    num_prefix_tokens: int = 1,
    use_softmax: bool = True,
) -> Tensor:
    """Refine ``x`` with the tokens ``T`` of one layer.

    x: [B, N, C] if ``batch_first`` else [N, B, C]. The first ``num_prefix_tokens``
    tokens of every sequence (cls, registers) pass through untouched.
    T: [m, C]; (W_t, b_t) is ``mlp_token2feat``, (W_d, b_d) is ``mlp_delta_f``.

        z = x T^T,  p = softmax(z C^-1/2) (or p = z),  V = T[1:] W_t^T + b_t
        out = x + scale * ((p[1:] V + x) W_d^T + b_d)
    """
    feats = x.permute(1, 0, 2) if batch_first else x  # [N, B, C], as the reference
    prefix, feats = torch.tensor_split(feats, [num_prefix_tokens], dim=0)
    attn = torch.einsum("nbc,mc->nbm", feats, T)
    if use_softmax:
        attn = attn * (T.shape[-1] ** -0.5)
        attn = F.softmax(attn, dim=-1)
    delta = torch.einsum("nbm,mc->nbc", attn[:, :, 1:], F.linear(T[1:, :], W_t, b_t))
    delta = F.linear(delta + feats, W_d, b_d)
    feats = feats + delta * scale
    if num_prefix_tokens:
        feats = torch.cat([prefix, feats], dim=0)
    return feats.permute(1, 0, 2) if batch_first else feats


def rein_queries_reference(
    T_all: Tensor, W_q: Tensor, b_q: Tensor, W_m: Tensor, b_m: Tensor
) -> Tensor:
    """Queries for a query-based head from the tokens of all L layers, T_all [L, m, C].

    Tall = transform(T_all) [L, m, Q] -> [m, Q, L]; cat(max_L, mean_L, last layer) -> [m, 3Q];
    queries = merge(cat) [m, Q].
    """
    t = F.linear(T_all, W_q, b_q).permute(1, 2, 0)
    L = t.shape[-1]
    t = torch.cat(
        [F.max_pool1d(t, kernel_size=L), F.avg_pool1d(t, kernel_size=L), t[:, :, -1:]], dim=-1
    )
    return F.linear(t.flatten(-2, -1), W_m, b_m)
