"""The Mask2Former matching on the device: scipy's linear sum assignment, batched, in its
arithmetic, so that the loss needs no host round trip and replays as one CUDA graph.

The loss (``rein.heads.mask2former_loss``) matches, in each of its P = L x B problems
(prediction l, image b), every class present in image b to a distinct query, at the least
summed cost: mmdet's and transformers' matcher call ``scipy.optimize.linear_sum_assignment``
on the [Q, K'] costs of the Q queries and the K' classes present. On the host that is,
every step, a copy out, a wait for the device, P scipy calls and a copy back.
``assign(cost, present)`` solves the P problems in one launch, one program each, and
returns scipy's answer: not an optimal assignment, the one scipy picks, ties included.

What scipy does (``rectangular_lsap.cpp``, Crouse's shortest augmenting path; the
reference beside the kernel, ``assign_reference``, calls scipy itself). With fewer
columns than rows it solves the transpose, so (K' < Q) its rows i are the classes present,
in increasing order, and its columns j the queries; c[i, j] the cost in float64 (exact
from float32). Duals u (rows) and v (columns) start at 0; ``row4col``, ``col4row`` at -1.
For each row r in turn, a Dijkstra search from r:

    spc[j] = inf for every j; remaining = [Q-1, ..., 1, 0] (the scan order); m = 0; i = r
    until a free column is reached:
        mark row i visited (SR)
        for j in remaining, in order:
            d = ((m + c[i, j]) - u[i]) - v[j]                  (float64, left to right)
            if d < spc[j]: spc[j] = d, path[j] = i
            pick j if spc[j] < lowest, or spc[j] == lowest and column j is free
        m = lowest; mark the picked column visited (SC); it leaves `remaining`, the last
        entry taking its place; if it is free it is the sink, else i = row4col[it]
    u[r] += m; u[i] += m - spc[col4row[i]] for the other visited rows;
    v[j] -= m - spc[j] for the visited columns
    augment from the sink along ``path`` back to r (row4col, col4row swapped on the way).

The kernel keeps the columns as one vector of BLOCK_Q lanes and the rows as one of
BLOCK_K, and does the scan as vector operations: the distances and the relaxation
element-wise, the pick from reductions. Which column a sequential scan picks: the first,
in scan order, at the lowest distance, unless a free column at that distance comes later,
then the last such. The scan order is tracked as each column's position in
``remaining`` (-1 once it left): the removed position takes the last one's column. A
row reached through column j has spc[col4row[i]] = spc[j], the distance j was picked at,
kept per row when it is picked (not gathered after: a [rows, columns] gather spills). Every
float64 operation is scipy's, in scipy's order (no reassociation, no fused multiply-add:
there are only additions and comparisons), so the assignment is scipy's to the bit.

It needs K < Q (every class present gets a query; scipy solves the untransposed problem
when K' >= Q, which this kernel does not do) and finite costs (the loss replaces NaN and
infinities by the largest float first, as the host matching did); both loops are bounded
(a search takes a column per step, a path a row per hop), so no input can hang it. Work per problem:
K' searches of at most K' steps each, every step a few reductions over Q lanes; at the
published recipe (P = 40, Q = 100, K = 19) 40 programs of up to 190 steps.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

import triton
import triton.language as tl

from ._common import new


@triton.jit
def _at(vec, lanes, idx):
    """vec[idx] of an integer vector: the one lane where lanes == idx."""
    return tl.sum(tl.where(lanes == idx, vec, 0), axis=0)


@triton.jit
def _at_f(vec, lanes, idx):
    """vec[idx] of a float vector, its bits kept (a max over one lane and -inf's)."""
    return tl.max(tl.where(lanes == idx, vec, -float("inf")), axis=0)


@triton.jit
def _lsap_kernel(COST, PRESENT, QUERY_OF, CLASS_OF, B, Q, K, sp, sq, sk,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """One problem p: COST[p] [Q, K] (strides sp, sq, sk), the classes of PRESENT[p % B];
    writes QUERY_OF[p] [K] (0 for a class absent) and CLASS_OF[p] [Q] (K for no class)."""
    p = tl.program_id(0)
    cols = tl.arange(0, BLOCK_Q)  # scipy's columns: the queries
    rows = tl.arange(0, BLOCK_K)  # scipy's rows: the classes
    col_in = cols < Q
    cost = COST + p.to(tl.int64) * sp
    zero = tl.sum(tl.zeros([BLOCK_Q], tl.float64), axis=0)  # a float64 scalar for loop-carried values
    u = tl.zeros([BLOCK_K], tl.float64)
    v = tl.zeros([BLOCK_Q], tl.float64)
    spc = tl.full([BLOCK_Q], float("inf"), tl.float64)
    path = tl.full([BLOCK_Q], -1, tl.int32)
    row4col = tl.full([BLOCK_Q], -1, tl.int32)
    col4row = tl.full([BLOCK_K], -1, tl.int32)
    for r in range(0, K):
        if tl.load(PRESENT + (p % B) * K + r) != 0:
            # the shortest augmenting path from row r
            spc = tl.full([BLOCK_Q], float("inf"), tl.float64)
            seen_row = rows < 0
            seen_col = cols < 0
            spc_of_row = tl.zeros([BLOCK_K], tl.float64)  # spc[col4row[i]] of each row reached
            pos = tl.where(col_in, Q - 1 - cols, -1)  # position in scipy's `remaining`; -1: left
            n = Q
            i = r
            m = zero
            sink = r - r - 1
            while (sink < 0) & (n > 0):  # n: columns left; every step takes one
                seen_row = seen_row | (rows == i)
                c = tl.load(cost + cols * sq + i * sk, mask=col_in, other=0.0).to(tl.float64)
                left = pos >= 0
                d = m + c - _at_f(u, rows, i) - v
                closer = left & (d < spc)
                path = tl.where(closer, i, path)
                spc = tl.where(closer, d, spc)
                lowest = tl.min(tl.where(left, spc, float("inf")), axis=0)
                tie = left & (spc == lowest)
                free_tie = tie & (row4col < 0)
                last_free = tl.max(tl.where(free_tie, pos, -1), axis=0)
                first = tl.min(tl.where(tie, pos, BLOCK_Q), axis=0)
                at = tl.where(last_free >= 0, last_free, first)
                j = _at(cols, pos, at)
                m = lowest
                owner = _at(row4col, cols, j)
                sink = tl.where(owner < 0, j, -1)
                # the row reached through column j: spc[j] (= lowest, final now j has left) is its
                # spc[col4row[i]] in the dual update
                spc_of_row = tl.where((rows == owner) & (owner >= 0), lowest, spc_of_row)
                i = tl.where(owner < 0, i, owner)
                seen_col = seen_col | (cols == j)
                n -= 1
                pos = tl.where(pos == n, at, pos)  # the last entry fills the picked one's place
                pos = tl.where(cols == j, -1, pos)
            # the duals
            u = tl.where(rows == r, u + m, u)
            u = tl.where(seen_row & (rows != r), u + (m - spc_of_row), u)
            v = tl.where(seen_col, v - (m - spc), v)
            # augment along the path, from the sink back to row r
            j = sink
            more = sink >= 0
            hops = 0
            while more:  # at most one hop per row (bounded, so that no input can hang the kernel)
                i = _at(path, cols, j)
                row4col = tl.where(cols == j, i, row4col)
                j_next = _at(col4row, rows, i)
                col4row = tl.where(rows == i, j, col4row)
                j = j_next
                hops += 1
                more = (i != r) & (hops < K)
    tl.store(QUERY_OF + p * K + rows, tl.where(col4row >= 0, col4row, 0).to(tl.int64), mask=rows < K)
    tl.store(CLASS_OF + p * Q + cols, tl.where(row4col >= 0, row4col, K).to(tl.int64), mask=col_in)


def _check(cost: Tensor, present: Tensor) -> None:
    if cost.dim() != 3 or not cost.is_floating_point():
        raise ValueError(f"cost must be a float tensor [P, Q, K], got {cost.dtype} {tuple(cost.shape)}")
    P, Q, K = cost.shape
    if present.dim() != 2 or present.shape[1] != K or (present.shape[0] and P % present.shape[0]):
        raise ValueError(f"present must be [B, K] with K = {K} and B dividing P = {P}, got {tuple(present.shape)}")
    if K >= Q:
        raise ValueError(f"the device matching needs fewer classes than queries (scipy solves K' >= Q "
                         f"untransposed), got K = {K}, Q = {Q}: match on the host")
    if present.device != cost.device:
        raise ValueError(f"cost and present on different devices: {cost.device}, {present.device}")


@torch.library.custom_op("rein::assign", mutates_args=())
def assign(cost: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """scipy's ``linear_sum_assignment`` of every class present against the queries, for P
    problems at once (module docstring): ``cost`` [P, Q, K] float (finite), problem p
    the image p % B of ``present`` [B, K] (bool). Returns ``query_of`` [P, K] int64, the
    query matched to class k (0 where k is absent), and ``class_of`` [P, Q] int64, the
    class matched to query q (K for none). Needs K < Q."""
    _check(cost, present)
    P, Q, K = cost.shape
    query_of = new(cost.new_empty(P, K, dtype=torch.int64))
    class_of = new(cost.new_empty(P, Q, dtype=torch.int64))
    if P:
        # one warp: every step is a chain of reductions over Q lanes, which a warp does with
        # shuffles alone
        _lsap_kernel[(P,)](cost, present.to(torch.int8).contiguous(), query_of, class_of, present.shape[0], Q, K,
                           *cost.stride(), BLOCK_Q=triton.next_power_of_2(Q),
                           BLOCK_K=triton.next_power_of_2(K), num_warps=1)
    return query_of, class_of


@assign.register_fake
def _(cost, present):
    P, Q, K = cost.shape
    return cost.new_empty(P, K, dtype=torch.int64), cost.new_empty(P, Q, dtype=torch.int64)


def assign_reference(cost: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """What ``assign`` computes, from scipy itself: for each problem, ``linear_sum_assignment``
    of the [Q, K'] costs of the classes present (any K', also K' >= Q: then Q classes get a
    query and the others none). The Mask2Former loss's host matching."""
    from scipy.optimize import linear_sum_assignment

    P, Q, K = cost.shape
    c, pres = cost.detach().cpu().double().numpy(), present.cpu().numpy().astype(bool)
    query_of, class_of = np.zeros((P, K), np.int64), np.full((P, Q), K, np.int64)
    for p in range(P):
        cols = np.flatnonzero(pres[p % pres.shape[0]])
        q, j = linear_sum_assignment(c[p][:, cols])
        query_of[p, cols[j]], class_of[p, q] = q, cols[j]
    return torch.from_numpy(query_of).to(cost.device), torch.from_numpy(class_of).to(cost.device)
