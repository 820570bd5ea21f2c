"""FSDP2 for a ReinBackbone.

``fully_shard`` cannot shard 0-dim parameters, and Rein's ``scale`` must stay 0-dim for
the reference's checkpoints to load. ``fully_shard_rein_backbone`` shards every backbone
block and the Rein parameters, leaves ``scale`` replicated (FSDP's ``ignored_params``),
and averages its gradient across ranks itself. Plain DDP needs none of this:
``DistributedDataParallel(backbone)`` works as is, without ``find_unused_parameters``.
"""
from __future__ import annotations

import torch.distributed as dist
from torch import nn


def _scales(rein: nn.Module) -> list[nn.Parameter]:
    layers = rein if isinstance(rein, nn.ModuleList) else [rein]
    return [r.scale for r in layers if isinstance(getattr(r, "scale", None), nn.Parameter)]


def fully_shard_rein_backbone(model: nn.Module, **fsdp_kwargs) -> nn.Module:
    """Apply FSDP2 to a ReinBackbone in place: each backbone block, then the whole model."""
    from torch.distributed.fsdp import fully_shard

    scales = set(_scales(model.rein))
    for _, block in model._blocks():
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, ignored_params=scales, **fsdp_kwargs)
    world = dist.get_world_size()

    def average(p: nn.Parameter) -> None:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)

    for p in scales:
        p.register_post_accumulate_grad_hook(average)
    return model
