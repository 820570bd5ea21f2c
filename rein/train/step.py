"""One training step (forward, loss, backward, optimizer step): as it is, compiled, or
captured in CUDA graphs, and why a run is not captured."""
from __future__ import annotations

import sys
from typing import Callable, NamedTuple

import torch

from ..cli import autocast


def autocast_for(args, device):
    """bf16 autocast where the run's precision is bf16. (``args.amp``: the settings of
    benchmarks/e2e.py, written before --precision replaced --amp.)"""
    precision = getattr(args, "precision", None) or ("bf16" if getattr(args, "amp", False) else "fp32")
    return autocast(precision, device)


def why_uncaptured(args, device, world) -> str | None:
    """Why the training step runs uncaptured (None: it is captured). CUDA graphs are the
    default on CUDA (``--no-cuda-graphs`` turns them off); elsewhere, and under torchrun,
    where DDP's gradient all-reduce would run inside the captured backward, the step runs
    as it is and the reason is printed."""
    if args.cuda_graphs is False:
        return "--no-cuda-graphs"
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA GPU (this run is on {device.type})"
    if world > 1:
        return "CUDA graphs are not used under torchrun yet (DDP all-reduces gradients inside the backward)"
    return None


class Step(NamedTuple):
    """The functions of one training step: the model's forward, the head's loss, the
    optimizer's step."""
    forward: Callable
    loss: Callable
    opt_step: Callable

    def run(self, images, labels, opt, args, device) -> torch.Tensor:
        with autocast_for(args, device):
            out = self.forward(images)
        loss = self.loss(out, labels)  # this process's share; DDP averages the gradients
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_step()
        return loss


# torch.compile's reduce-overhead mode compiles at the first call, runs a warm-up at the
# first and records the CUDA graphs at a later one: failures show within these iterations
WARM_STEPS = 3


def captured_step(model, wrapped, opt, **compile_kw) -> Step:
    """The forward (and its backward), the loss's device stages and the AdamW step,
    compiled in reduce-overhead mode (the default ``compile_kw``): each replayed as CUDA
    graphs."""
    compile_kw = compile_kw or {"mode": "reduce-overhead"}
    loss = model.head.captured_loss(**compile_kw) or model.head.loss
    return Step(torch.compile(wrapped, **compile_kw), loss, torch.compile(opt.step, **compile_kw))


def run_compiled(steps: Step, eager: Step, done: int, images, labels, opt, args, device, main_proc):
    """One compiled (or captured) step; within the first ``WARM_STEPS`` iterations, a
    failure to compile or record falls back to the eager step, with one line saying why."""
    try:
        return steps, steps.run(images, labels, opt, args, device)
    except Exception as e:  # torch.compile and CUDA graphs raise many kinds: the step itself must go on
        if done >= WARM_STEPS:
            raise
        if main_proc:
            print(f"rein-train: the compiled training step failed ({type(e).__name__}: {str(e)[:200]}); "
                  "continuing uncaptured (--no-cuda-graphs skips the attempt)", file=sys.stderr)
        release_compiled(opt)
        return eager, eager.run(images, labels, opt, args, device)


def release_compiled(opt) -> None:
    """Free what compiling and recording the step holds: the gradients (which a replayed
    backward keeps in its graphs' memory), the compiled code, the CUDA graphs and their
    memory pools. After a fallback, and when training ends, before evaluation."""
    opt.zero_grad(set_to_none=True)
    torch.compiler.reset()
