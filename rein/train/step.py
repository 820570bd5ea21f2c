"""One training step (forward, loss, backward, optimizer step): as it is, compiled, or
captured in CUDA graphs, and why a run is not captured."""
from __future__ import annotations

import functools
import os
import sys
import time
import types
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from ..cli import autocast


def autocast_for(args, device):
    """bf16 autocast where the run's precision is bf16."""
    return autocast(args.precision, device)


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


def captured_step(model, wrapped, opt, regional: bool = True, **compile_kw) -> Step:
    """The forward (and its backward) and the loss's device stages compiled in
    reduce-overhead mode (the default ``compile_kw``): each replayed as CUDA graphs; the
    AdamW step runs as it is (``make_optimizer``: the fused AdamW on a GPU). ``regional``:
    the forward's repeated layers are compiled one kind at a time (``compile_regions``),
    else the whole model is one graph."""
    compile_kw = compile_kw or {"mode": "reduce-overhead"}
    compile_cache_dir()
    loss = model.head.captured_loss(**compile_kw) or model.head.loss
    forward = wrapped if regional and compile_regions(model, **compile_kw) else torch.compile(wrapped, **compile_kw)
    return Step(forward, loss, opt.step)


def compile_regions(model, **compile_kw) -> bool:
    """Regional compilation of a ViT-like ``Segmentor``: each backbone block (Rein inside it,
    as its forward hook) compiled on its own, Rein's operands for all layers compiled whole,
    and the head's repeated layers (``head.repeated_layers()``: Mask2Former's encoder and
    decoder layers and its mask predictor) compiled the same way, or the head whole where it
    has none; the glue between them (patch embedding, resampling the feature maps, the
    head's projections) runs as it is. Modules of one kind share their code and differ in
    nothing but tensors (``rein.ReinBackbone`` binds each layer's operands to its block), so
    torch.compile compiles one and reuses it for all (a 24-block model compiles as fast as a
    4-block one; the 9 decoder layers compile once per feature level), and in
    reduce-overhead mode each region replays as a CUDA graph that takes the previous one's
    outputs without a copy. Returns False (nothing compiled) for other backbones.
    ``release_compiled`` undoes it."""
    bb = model.backbone
    if getattr(bb, "family", None) not in ("vit", "sam"):
        return False
    # one compiled function per kind of module: the module is an argument (its parameters
    # become graph inputs), so one graph serves all of its kind; a module's own call runs
    # it in place of Module.__call__ (whose hooks would be separate frames)
    block = torch.compile(_block_and_rein, **compile_kw)
    blocks = [blk for _, blk in bb._blocks()]
    for blk in blocks:
        blk._compiled_call_impl = functools.partial(block, bb, blk)
    kinds = getattr(model.head, "repeated_layers", list)()
    if kinds:
        # each kind's calls differ in shape (the decoder's three feature levels): one graph
        # per shape, not a graph generalised over them
        head = [m for kind in kinds for m in _share_one_graph(kind, **{**compile_kw, "dynamic": False})]
    else:
        model.head._compiled_call_impl = torch.compile(model.head._call_impl, **compile_kw)
        head = [model.head]
    bb.rein.layer_operands = torch.compile(bb.rein.layer_operands, **compile_kw)
    model._compiled_regions = [*blocks, *head]
    return True


def _share_one_graph(modules, **compile_kw) -> list:
    """``modules`` (of one class) called through one compiled function, with a code object
    of its own: torch.compile keeps a code object's graphs together, at most
    ``torch._dynamo.config.recompile_limit`` (8) of them, so the head's kinds (7 graphs in
    all) must not share one."""
    code = _forward_of.__code__.replace(co_name=f"_forward_of_{type(modules[0]).__name__}")
    call = torch.compile(types.FunctionType(code, _forward_of.__globals__), **compile_kw)
    for m in modules:
        m._compiled_call_impl = functools.partial(call, m)
    return list(modules)


def _forward_of(module, *args, **kwargs):
    return module.forward(*args, **kwargs)


def _block_and_rein(backbone, blk, *args, **kwargs):
    """One backbone block and the Rein layer after it: what the block's forward hook does
    (``ReinBackbone._refine``), as one frame for torch.compile."""
    return backbone._refine(blk.forward(*args, **kwargs), blk)


def compile_cache_dir() -> Path:
    """Where torch.compile keeps what it compiled (Inductor's FX graph and AOTAutograd
    caches, the kernels), so that a second run on the same machine starts in seconds:
    TORCHINDUCTOR_CACHE_DIR when set, else ~/.cache/rein-kernels/torch-compile (set here,
    for this process), instead of Inductor's default under /tmp, which a reboot empties."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not folder:
        folder = os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path.home() / ".cache" / "rein-kernels" / "torch-compile")
    return Path(folder)


_compile_started: list[float] = []


def run_compiled(steps: Step, eager: Step, done: int, images, labels, opt, args, device, main_proc):
    """One compiled (or captured) step; within the first ``WARM_STEPS`` iterations, a
    failure to compile or record falls back to the eager step, with one line saying why.
    The first iteration says that it compiles, the last of them how long it took."""
    if done == 0 and main_proc:
        _compile_started[:] = [time.time()]
        print(f"rein-train: compiling the training step, first run only (cache: {compile_cache_dir()})",
              file=sys.stderr, flush=True)
    try:
        loss = steps.run(images, labels, opt, args, device)
        if done == WARM_STEPS - 1 and main_proc and _compile_started:
            float(loss)  # the recorded step has run
            print(f"rein-train: training step compiled and recorded in {time.time() - _compile_started[0]:.0f} s",
                  file=sys.stderr, flush=True)
        return steps, loss
    except Exception as e:  # torch.compile and CUDA graphs raise many kinds: the step itself must go on
        if done >= WARM_STEPS:
            raise
        if main_proc:
            print(f"rein-train: the compiled training step failed ({type(e).__name__}: {str(e)[:200]}); "
                  "continuing uncaptured (--no-cuda-graphs skips the attempt)", file=sys.stderr)
        release_compiled(opt, eager.forward)
        return eager, eager.run(images, labels, opt, args, device)


def release_compiled(opt, model=None) -> None:
    """Free what compiling and recording the step holds: the gradients (which a replayed
    backward keeps in its graphs' memory), the compiled code and regions, the CUDA graphs
    and their memory pools. After a fallback, and when training ends, before evaluation."""
    opt.zero_grad(set_to_none=True)
    for module in getattr(model, "_compiled_regions", ()):
        module._compiled_call_impl = None
    rein = getattr(getattr(model, "backbone", None), "rein", None)
    if isinstance(rein, torch.nn.Module) and "layer_operands" in vars(rein):
        del rein.layer_operands
    if hasattr(model, "_compiled_regions"):
        model._compiled_regions = ()
    torch.compiler.reset()
