"""The recipe's optimizer: AdamW's parameter groups, its learning-rate schedule, and its
state across runs (and across its implementations)."""
from __future__ import annotations

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float):
    """AdamW groups as the recipe: no decay on Rein's tokens and scale, on normalisation
    layers and on the Mask2Former decoder's level embedding; everything else (weights and
    biases) decays. (The official custom key "level_embed" does not match the pixel
    decoder's level encoding, so that one decays, there and here.)"""
    norm_types = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
    plain = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (id(p) in plain or "learnable_tokens" in name or name.rsplit(".", 1)[-1] == "scale"
                or name == "head.transformer.level_embed.weight"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, args, device) -> torch.optim.Optimizer:
    """AdamW as the recipe (betas 0.9/0.999, eps 1e-8): its fused CUDA kernel on a GPU, the
    multi-tensor (foreach) one elsewhere. The captured step runs it as it is, between the
    replayed graphs: torch.compile does not trace the fused kernel, and compiling the
    multi-tensor one instead (capturable, its learning rate a device tensor) made the
    largest graph of the step, a quarter of its compile time (benchmarks/NOTES.md)."""
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, **impl)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state, keeping this optimizer's implementation (fused
    on a GPU, foreach elsewhere): a GPU run resumes a CPU run's checkpoint and the other way
    round, and so does a checkpoint of an earlier version's captured step (capturable
    AdamW, its learning rate saved as a number); the step counts go where this
    implementation keeps them (on the parameters' device where it is fused)."""
    keep = [{k: g[k] for k in ("fused", "foreach", "capturable")} for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, kept in zip(opt.param_groups, keep):
        g.update(kept, lr=float(g["lr"]))
        for p in g["params"]:  # torch placed them by the saved implementation: place them by this one
            if "step" in opt.state.get(p, {}):
                on_device = g["capturable"] or g["fused"]
                opt.state[p]["step"] = opt.state[p]["step"].to(p.device if on_device else "cpu", torch.float32)


def lr_at(it: int, args) -> float:
    """Linear warm-up over ``warmup_iters``, then poly decay to 0 with power 0.9 (the
    published config's PolyLR; it has no warm-up: ``--warmup-iters 0`` reproduces that)."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.lr * (1 - progress) ** 0.9
