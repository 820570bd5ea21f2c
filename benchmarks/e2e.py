"""End-to-end training step: timm DINOv2 ViT-L/16 at 512x512, batch 4 (random weights),
frozen backbone, Rein after every block, a light head, cross-entropy, AdamW step.

Two kinds of rows (PERFORMANCE.md): like for like (eager vs fused Rein, everything else
equal), and the headline, ``SETTINGS``: the official setting (fp32, the eager reference
Rein, no compile, plain AdamW) against this library's defaults for a GPU (bf16 frozen
weights under autocast, fused Rein, torch.compile, fused AdamW)."""
from __future__ import annotations

import contextlib
import time

import torch

import rein
from bench import median_ms, peak_mem_mb
from rein.heads import build_head


SETTINGS = {
    "official": dict(fused=False, dtype="fp32"),
    # forward + loss captured by torch.compile's CUDA graphs (mode="reduce-overhead")
    "library": dict(fused=True, dtype="bf16", bf16_weights=True, compile="reduce-overhead", fused_adamw=True),
    # the strongest free alternative: the reference Rein, compiled and captured the same way
    "compile-reference": dict(fused=False, dtype="bf16", bf16_weights=True, compile="reduce-overhead",
                              fused_adamw=True),
}


class TrainStep:
    def __init__(self, fused: bool, dtype: str, device: str, backbone: str = "vit_large_patch14_dinov2",
                 img: int = 512, batch: int = 4, num_classes: int = 19, bf16_weights: bool = False,
                 compile: bool | str = False, fused_adamw: bool = False, **timm_kwargs):
        torch.manual_seed(0)
        self.device, self.dtype = device, dtype
        self.model = rein.ReinBackbone.from_timm(backbone, img_size=img, patch_size=16, fused=fused,
                                                 **timm_kwargs).to(device)
        chans = [f.shape[1] for f in self.model(torch.zeros(1, 3, 32, 32, device=device))[0]]
        self.head = build_head("light", chans, num_classes).to(device)
        if bf16_weights:
            self.model.backbone.to(torch.bfloat16)
        self.model.train()
        self.head.train()
        params = [p for p in self.model.parameters() if p.requires_grad] + list(self.head.parameters())
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **({"fused": True} if fused_adamw else {}))
        mode = compile if isinstance(compile, str) else None
        self.forward = torch.compile(self._forward, mode=mode) if compile else self._forward
        self.images = torch.randn(batch, 3, img, img, device=device)
        self.labels = torch.randint(0, num_classes, (batch, img, img), device=device)

    def _forward(self, images):
        feats, _ = self.model(images)
        return self.head(feats)

    def loss(self):
        ctx = torch.autocast(self.device, dtype=torch.bfloat16) if self.dtype == "bf16" else contextlib.nullcontext()
        with ctx:
            return self.head.loss(self.forward(self.images), self.labels)

    def __call__(self):
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


def host_ms(step: TrainStep, device: str, n: int = 10) -> float | None:
    """Wall time per step of n steps issued without synchronising, ms: close to the step's
    event time, the step is bound by the host; well under it, by the device."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / n


def held_after_forward_mb(step: TrainStep, device: str) -> float | None:
    """Memory a forward leaves allocated for its backward (activations, casts), MiB: with
    the peak, it tells saved tensors from backward transients. None on a CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    loss = step.loss()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    del loss
    return held / 2**20


def measure(fused: bool, dtype: str, device: str, provider: str | None = None, **kw) -> dict:
    step = TrainStep(fused, dtype, device, **kw)
    step()  # compile and autotune outside the timing
    # a training step takes a few hundred ms: a longer warm-up and window than one layer
    row = dict(provider=provider or ("fused" if fused else "eager"), dtype=dtype,
               median_ms=median_ms(step, device, warmup_ms=1000, rep_ms=3000, cpu_runs=5),
               peak_mem_mb=peak_mem_mb(step, device, relative=False),
               held_after_forward_mb=held_after_forward_mb(step, device))
    row["median_ms_repeat"] = median_ms(step, device, warmup_ms=1000, rep_ms=3000, cpu_runs=5)
    row["host_ms"] = host_ms(step, device)
    del step
    if device == "cuda":
        torch.cuda.empty_cache()
    return row
