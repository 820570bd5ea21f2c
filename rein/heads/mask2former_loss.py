"""The Mask2Former loss on static shapes: the loss of transformers' ``Mask2FormerLoss``
(mmdet's, in the official config), laid out so that everything but the Hungarian matching
is a fixed sequence of device operations on fixed shapes, which torch.compile traces as
one graph per stage and a CUDA graph replays.

Shapes: L predictions (the one before the first decoder layer and one after each), B
images, Q queries, K classes, N points per mask. The ground truth is one mask per class
id, ``t[b, k] = [label == k]`` (label 255 in none), for every class: a class absent from
an image has an empty mask and takes no part in matching or loss. That fixed layout (K
slots, not the classes present) is what keeps every shape static.

1. ``costs`` (device, no gradient): per prediction l and image b, N points drawn
   uniformly, shared by all queries and classes (as transformers' matcher), the masks
   sampled there bilinearly (m for a query's logits, t for a class's mask), and

       C[l, b, q, k] = 5 · (<softplus(-m), t> + <softplus(m), 1 - t>) / N
                     - 2 · softmax(c[l, b, q])[k]
                     + 5 · (1 - (2 <σ(m), t> + 1) / (Σ σ(m) + Σ t + 1)),

   NaN and ±inf replaced by the largest float; and ``present[b, k]``.
2. ``match`` (host): scipy's ``linear_sum_assignment`` of C[l, b] over the classes
   present, copied in as one int64 tensor; or ``match_on_device``: the same assignment, to
   the bit, from ``rein_kernels.assign`` (scipy's algorithm in its float64 arithmetic, one
   launch for all L x B problems), with no copy and no wait for the device, so that the
   whole loss is one graph. Either way: ``query_of[l, b, k]`` (the query matched to
   class k), ``matched[l, b, k]``, ``class_of[l, b, q]`` (K: no object) and the mask
   count n = Σ_b max(classes present in b, 1), averaged over the processes (mmdet's
   count of matched masks, with at least as many queries as classes present).
3. ``matched_loss`` (device, differentiable), per prediction l:

       CE_l   = Σ_{b,q} w[y] · -log softmax(c[l, b, q])[y] / Σ_{b,q} w[y],  y = class_of[l, b, q],
                w = 1 for a class, 0.1 for no object;
       mask_l = Σ_{b,k matched} mean_points BCE(m, t) / n,
       dice_l = Σ_{b,k matched} (1 - (2 Σ σ(m) t + 1) / (Σ σ(m) + Σ t + 1)) / n,

   m the logits of the query matched to class k, sampled (with t) at N points per pair:
   3N drawn uniformly, the 0.75 N with the smallest |m| kept, 0.25 N more drawn. The
   loss is Σ_l 2 CE_l + 5 mask_l + 5 dice_l. Unmatched slots are computed too and
   selected away: the mask terms cost L x B x K pairs of points (760 at batch 4 and the 19
   classes of every protocol here), whatever the classes present.

The random points are drawn in other shapes than transformers' (one draw for all
predictions and images): the loss equals transformers' in distribution, and given the
same points it equals it value for value and gradient for gradient
(tests/test_mask2former_loss.py).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from rein_kernels.assignment import assign, assign_reference

# mmdet's loss weights in the official config (also the matching costs' weights)
LOSS_WEIGHTS = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def mean_over_processes(count: Tensor) -> Tensor:
    """A mask count averaged over the processes (mmdet's reduce_mean)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count


def _sample(x: Tensor, points: Tensor) -> Tensor:
    """``x`` [n, c, h, w] bilinearly at ``points`` [n, p, 2] in [0, 1]² (x, y), zero
    outside, as transformers' ``sample_point``: [n, c, p]."""
    return F.grid_sample(x, 2.0 * points[:, :, None] - 1.0, align_corners=False)[..., 0]


MATCHERS = ("auto", "device", "host")


class StaticMask2FormerLoss(nn.Module):
    """The Mask2Former loss (module docstring) for ``num_classes`` classes; ``num_points``
    per mask (12544 in the official config). ``forward`` runs the three stages;
    ``compiled(**kw)`` returns the same function compiled: one graph with the matching on
    the device, else the two device stages around the host's matching. ``matcher``: where
    the matching runs: "host" (scipy, as the official code), "device" (``assign``: the same
    assignment; needs fewer classes than queries and a device the kernels run on), or
    "auto" (the default: the device on CUDA when there are fewer classes than queries,
    else the host)."""

    def __init__(self, num_classes: int, num_points: int = 12544, no_object_weight: float = 0.1,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75, matcher: str = "auto"):
        super().__init__()
        if matcher not in MATCHERS:
            raise ValueError(f"matcher {matcher!r}: choose one of {', '.join(MATCHERS)}")
        self.num_classes, self.num_points, self.matcher = num_classes, num_points, matcher
        self.oversampled = int(num_points * oversample_ratio)
        self.uncertain = int(importance_sample_ratio * num_points)
        weight = torch.ones(num_classes + 1)
        weight[-1] = no_object_weight
        self.register_buffer("empty_weight", weight, persistent=False)

    def forward(self, class_logits: list[Tensor], mask_logits: list[Tensor], labels: Tensor) -> Tensor:
        """``class_logits``: L x [B, Q, K + 1]; ``mask_logits``: L x [B, Q, h, w];
        ``labels``: [B, H, W] class ids, 255 ignored. Returns the weighted loss."""
        if self.matches_on_device(class_logits[0]):
            return self._on_device(class_logits, mask_logits, labels)
        return self._run(self.costs, self.match, self.matched_loss, class_logits, mask_logits, labels)

    def matches_on_device(self, class_logits: Tensor) -> bool:
        """Whether the matching runs on the device for predictions like ``class_logits``
        [B, Q, K + 1] (``matcher``)."""
        if self.matcher == "auto":
            return class_logits.device.type == "cuda" and self.num_classes < class_logits.shape[1]
        return self.matcher == "device"

    def compiled(self, **kw):
        """``forward`` torch.compiled (``mode="reduce-overhead"``: replayed as CUDA graphs):
        with the matching on the device, the whole loss as one graph; on the host, the two
        device stages as two graphs, the matching between them."""
        whole = torch.compile(self._on_device, **kw)
        staged = functools.partial(self._run, torch.compile(self.costs, **kw), self.match,
                                   torch.compile(self.matched_loss, **kw))

        def loss(class_logits, mask_logits, labels):
            if self.matches_on_device(class_logits[0]):
                return whole(class_logits, mask_logits, labels)
            return staged(class_logits, mask_logits, labels)
        return loss

    def _on_device(self, class_logits, mask_logits, labels) -> Tensor:
        return self._run(self.costs, self.match_on_device, self.matched_loss, class_logits, mask_logits, labels)

    def _run(self, costs, match, matched_loss, class_logits, mask_logits, labels) -> Tensor:
        shape = (len(class_logits), *class_logits[0].shape[:2])
        packed = match(costs(class_logits, mask_logits, labels), shape)
        return matched_loss(class_logits, mask_logits, labels, packed, mean_over_processes(packed[-1].float()))

    def _targets(self, labels: Tensor) -> Tensor:
        """[B, K, H, W] float: one mask per class id."""
        ids = torch.arange(self.num_classes, device=labels.device)
        return (labels[:, None] == ids[:, None, None]).float()

    @torch.no_grad()
    def costs(self, class_logits, mask_logits, labels) -> Tensor:
        """The matching costs [L, B, Q, K] and ``present`` [B, K], flat in one fp32 tensor."""
        L, B, N = len(mask_logits), mask_logits[0].shape[0], self.num_points
        points = torch.rand(L, B, N, 2, device=labels.device)
        m = torch.stack([_sample(x.float(), p) for x, p in zip(mask_logits, points)])  # [L, B, Q, N]
        targets = self._targets(labels)
        present = targets.flatten(2).amax(-1) > 0
        # every class mask at all L point sets of its image at once: [L, B, K, N]
        t = _sample(targets, points.transpose(0, 1).reshape(B, L * N, 2)).view(B, -1, L, N).permute(2, 0, 1, 3)
        bce = (F.softplus(-m) @ t.transpose(-1, -2) + F.softplus(m) @ (1 - t).transpose(-1, -2)) / N
        s = m.sigmoid()
        dice = 1 - (2 * s @ t.transpose(-1, -2) + 1) / (s.sum(-1)[..., None] + t.sum(-1)[..., None, :] + 1)
        prob = torch.stack(class_logits).float().softmax(-1)[..., :-1]
        cost = LOSS_WEIGHTS["loss_mask"] * bce - LOSS_WEIGHTS["loss_cross_entropy"] * prob \
            + LOSS_WEIGHTS["loss_dice"] * dice
        big = torch.finfo(cost.dtype).max
        cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)
        return torch.cat([cost.flatten(), present.flatten().float()])  # one copy out

    def match(self, costs: Tensor, shape: tuple[int, int, int]) -> Tensor:
        """The Hungarian matching on the host, for ``costs`` (from ``costs``) of ``shape``
        (L, B, Q): one copy out, scipy's ``linear_sum_assignment`` per problem
        (``assign_reference``), one copy in: ``query_of`` [L, B, K], ``matched`` [L, B, K],
        ``class_of`` [L, B, Q] and the mask count, flat in one int64 tensor on the costs'
        device."""
        packed = self._packed(costs.cpu(), shape, assign_reference)
        if costs.device.type == "cuda":
            packed = packed.pin_memory()
        return packed.to(costs.device, non_blocking=True)

    def match_on_device(self, costs: Tensor, shape: tuple[int, int, int]) -> Tensor:
        """``match``'s result, computed where the costs are (``rein_kernels.assign``): no
        copy, no wait for the device."""
        return self._packed(costs, shape, assign)

    def _packed(self, costs: Tensor, shape: tuple[int, int, int], solve) -> Tensor:
        """``match``'s packing of the assignment ``solve`` (``assign`` or scipy's) finds
        for the L x B problems in ``costs``; a class is matched where a query has it (all
        present ones, with fewer classes than queries)."""
        (L, B, Q), K = shape, self.num_classes
        present = costs[L * B * Q * K:].view(B, K) > 0
        query_of, class_of = solve(costs[:L * B * Q * K].view(L * B, Q, K), present)
        matched = torch.zeros(L * B, K + 1, dtype=torch.int64, device=costs.device).scatter_(1, class_of, 1)[:, :K]
        count = present.sum(1).clamp_min(1).sum().view(1)
        return torch.cat([query_of.flatten(), matched.flatten(), class_of.flatten(), count])

    def matched_loss(self, class_logits, mask_logits, labels, packed: Tensor, num_masks: Tensor) -> Tensor:
        """The loss given the matching (``packed``, from ``match``) and the mask count."""
        L, (B, Q, h, w), K, N = len(mask_logits), mask_logits[0].shape, self.num_classes, self.num_points
        query_of, matched, class_of = packed[:-1].split([L * B * K, L * B * K, L * B * Q])
        query_of, matched, class_of = query_of.view(L, B, K), matched.view(L, B, K) > 0, class_of.view(L, B, Q)

        logp = torch.stack(class_logits).float().log_softmax(-1)
        nll = -logp.gather(-1, class_of[..., None])[..., 0]
        weight = self.empty_weight[class_of]
        ce = (weight * nll).sum((1, 2)) / weight.sum((1, 2))

        # the mask logits of the query matched to each class: [L * B * K, 1, h, w]
        pred = torch.stack([x.gather(1, i[:, :, None, None].expand(B, K, h, w))
                            for x, i in zip(mask_logits, query_of)]).float().view(L * B * K, 1, h, w)
        with torch.no_grad():
            points = torch.rand(L * B * K, self.oversampled, 2, device=labels.device)
            keep = _sample(pred, points)[:, 0].abs().topk(self.uncertain, dim=1, largest=False).indices
            points = torch.cat([points.gather(1, keep[..., None].expand(-1, -1, 2)),
                                torch.rand(L * B * K, N - self.uncertain, 2, device=labels.device)], 1)
            # each class mask at its L pairs' points: [B * K, 1, H, W] at [B * K, L * N]
            per_class = points.view(L, B * K, N, 2).transpose(0, 1).reshape(B * K, L * N, 2)
            t = _sample(self._targets(labels).flatten(0, 1)[:, None], per_class).view(B * K, L, N).transpose(0, 1)
            t = t.reshape(L * B * K, N)
        m = _sample(pred, points)[:, 0]
        bce = F.binary_cross_entropy_with_logits(m, t, reduction="none").mean(-1).view(L, B, K)
        s = m.sigmoid()
        dice = (1 - (2 * (s * t).sum(-1) + 1) / (s.sum(-1) + t.sum(-1) + 1)).view(L, B, K)
        mask_loss = torch.where(matched, bce, 0).sum((1, 2)) / num_masks
        dice_loss = torch.where(matched, dice, 0).sum((1, 2)) / num_masks
        return (LOSS_WEIGHTS["loss_cross_entropy"] * ce + LOSS_WEIGHTS["loss_mask"] * mask_loss
                + LOSS_WEIGHTS["loss_dice"] * dice_loss).sum()
