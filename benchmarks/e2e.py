"""End-to-end training step: timm DINOv2 ViT-L/16 at 512x512, batch 4 (random weights),
frozen backbone, Rein after every block, a head (``light``, or the recipe's ``mask2former``
on transformers' parts), its loss, an AdamW step.

Rows (benchmarks/README.md): like for like (eager vs fused Rein, everything else equal), and
``SETTINGS``: the official setting (fp32, the eager reference Rein, nothing captured)
against this library's defaults for a GPU (``rein.train``'s captured step: bf16 frozen
weights under autocast, fused Rein, the forward and backward and the loss's device stages
compiled by torch.compile's "reduce-overhead" mode and replayed as CUDA graphs, the
Mask2Former matching on the host between them, the fused AdamW after) and against the strongest
free alternative (the same with the reference Rein); ``library-forward-graphs`` is the
previous default (only the forward and backward captured, loss and fused AdamW between the
graphs), and ``library-transformers-loss`` the Mask2Former head with transformers' loss.
``measure_evaluation`` times the sliding-window evaluation of one image, replayed from a
recorded graph against called as it is. Each row records the step time (CUDA-event
median), the host time per step (wall time of unsynchronised steps: near the step time,
the host sets the pace), peak memory allocated (for captured steps an underestimate:
graphs keep their memory in private pools) and the memory the caching allocator holds,
and what a forward leaves allocated for its backward.
"""
from __future__ import annotations

import contextlib
import time
from argparse import Namespace

import torch

import rein
import rein_kernels
from bench import host_ms, median_ms, no_phase, peak_mem_mb, warm_up_on_side_stream
from rein.heads import build_head
from rein.inference import slide_scores
from rein.model import Segmentor
from rein.train.optim import make_optimizer
from rein.train.step import WARM_STEPS, captured_step

LIBRARY = dict(fused=True, dtype="bf16", bf16_weights=True, train_step=True, kernels="v4")
# ``criterion``: the Mask2Former head's loss (static, its default, or transformers'), as
# the official setting and the previous default ran it; ``matcher``: where the static loss
# matches (its default "auto": on the GPU, so that the loss is one graph; "host": scipy
# between two graphs, as before 2026-12-06)
SETTINGS = {
    "official": dict(fused=False, dtype="fp32", criterion="transformers"),
    "library": LIBRARY,
    "compile-reference": dict(LIBRARY, fused=False),
    "library-forward-graphs": dict(fused=True, dtype="bf16", bf16_weights=True, compile="reduce-overhead",
                                   fused_adamw=True, criterion="transformers"),
    "library-transformers-loss": dict(LIBRARY, criterion="transformers"),
    "library-host-matching": dict(LIBRARY, matcher="host"),
    "library-v3": dict(LIBRARY, kernels="v3"),
    # the whole model compiled as one graph (the captured step before regional compilation)
    "library-whole": dict(LIBRARY, train_step={"regional": False}),
    "library-triton-op": dict(LIBRARY, registration="triton_op"),
    # like for like, nothing captured
    "fused-bf16": dict(fused=True, dtype="bf16", bf16_weights=True, fused_adamw=True, kernels="v4"),
    "eager-bf16": dict(fused=False, dtype="bf16", bf16_weights=True, fused_adamw=True),
    # the whole step (forward, loss, backward, optimizer) as one CUDA graph (the Mask2Former
    # loss with its matching on the GPU); without and with Inductor's kernels
    "library-graph": dict(fused=True, dtype="bf16", bf16_weights=True, fused_adamw=True, capture=True),
    "library-compile-graph": dict(fused=True, dtype="bf16", bf16_weights=True, fused_adamw=True, capture=True,
                                  compile=True),
}


# Training-step workloads other than vitl-512 (bench.WORKLOADS' names): what their backbone
# needs on one GPU. ``build_on_device``: random weights made on the GPU, not on the host.
STEP_WORKLOADS = {
    "vit7b-512": dict(backbone="vit_7b_patch16_dinov3", bf16_weights=True, grad_checkpointing=True,
                      build_on_device=True),
}


def build_segmentor(fused: bool, device: str, backbone: str = "vit_large_patch14_dinov2", img: int = 512,
                    num_classes: int = 19, head: str = "light", head_kwargs: dict | None = None,
                    criterion: str | None = None, matcher: str | None = None, build_on_device: bool = False,
                    **timm_kwargs) -> Segmentor:
    """A timm backbone (random weights, patch 16) with Rein after every block, and a head
    (``criterion``, ``matcher``: the Mask2Former head's loss and where it matches; None:
    their defaults)."""
    torch.manual_seed(0)
    if head != "light":  # Rein's tokens are the head's queries, of its width
        timm_kwargs.update(link_token_to_query=True, query_dims=(head_kwargs or {}).get("query_dims", 256))
        chosen = {k: v for k, v in (("criterion", criterion), ("matcher", matcher)) if v}
        head_kwargs = dict(head_kwargs or {}, **chosen)
    with torch.device(device) if build_on_device else contextlib.nullcontext():
        model = rein.ReinBackbone.from_timm(backbone, img_size=img, patch_size=16, fused=fused, **timm_kwargs)
    model = model.to(device)
    head = build_head(head, model.feature_info.channels(), num_classes, **(head_kwargs or {}))
    return Segmentor(model, head.to(device))


class TrainStep:
    def __init__(self, fused: bool, dtype: str, device: str, img: int = 512, batch: int = 4, num_classes: int = 19,
                 bf16_weights: bool = False, compile: bool | str = False, fused_adamw: bool = False,
                 kernels: str | None = None, capture: bool = False, registration: str = "custom_op",
                 train_step: bool | dict = False, grad_checkpointing: bool = False, **model_kwargs):
        self.device, self.dtype, self.registration = device, dtype, registration
        self.kernels = kernels or rein_kernels.KERNELS
        segmentor = build_segmentor(fused, device, img=img, num_classes=num_classes, **model_kwargs)
        self.model, self.head = segmentor.backbone, segmentor.head
        if bf16_weights:
            self.model.backbone.to(torch.bfloat16)
        if grad_checkpointing:  # each (block + Rein) recomputed in the backward, as --grad-checkpointing
            self.model.set_grad_checkpointing(True)
        self.model.train()
        self.head.train()
        self.graph = self.steps = None
        mode = compile if isinstance(compile, str) else None
        self.forward = torch.compile(self._forward, mode=mode) if compile else self._forward
        if train_step:  # rein.train's captured step, its optimizer included (a dict: other compile settings)
            self.args = Namespace(lr=1e-4, weight_decay=0.05, precision="bf16" if dtype == "bf16" else "fp32")
            self.opt = make_optimizer(segmentor, self.args, torch.device(device))
            self.steps = captured_step(segmentor, segmentor, self.opt, **(train_step if train_step is not True else {}))
        else:
            params = [p for p in self.model.parameters() if p.requires_grad] + list(self.head.parameters())
            self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05,
                                         **({"fused": True} if fused_adamw else {}),
                                         **({"capturable": True} if capture else {}))
        self.images = torch.randn(batch, 3, img, img, device=device)
        self.labels = torch.randint(0, num_classes, (batch, img, img), device=device)

    def _forward(self, images):
        feats, queries = self.model(images)
        return self.head(feats, queries)

    @contextlib.contextmanager
    def _kernels(self):
        saved = rein_kernels.KERNELS, rein_kernels.REGISTRATION
        rein_kernels.KERNELS, rein_kernels.REGISTRATION = self.kernels, self.registration
        try:
            yield
        finally:
            rein_kernels.KERNELS, rein_kernels.REGISTRATION = saved

    def loss(self):
        """The forward under autocast (bf16), the loss outside it, as ``rein.train``."""
        ctx = torch.autocast(self.device, dtype=torch.bfloat16) if self.dtype == "bf16" else contextlib.nullcontext()
        with self._kernels():
            with ctx:
                out = self.forward(self.images)
            return self.head.loss(out, self.labels)

    def __call__(self):
        if self.steps is not None:
            torch.compiler.cudagraph_mark_step_begin()
            with self._kernels():
                return self.steps.run(self.images, self.labels, self.opt, self.args, torch.device(self.device))
        if self.graph is not None:
            self.graph.replay()
            return self.static_loss
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def capture(self) -> None:
        """Record the whole step as one CUDA graph (PyTorch's whole-network capture): warm-up
        steps on a side stream (compile, autotuning, the optimizer's state), then one step
        captured with the gradients unset, so that the backward allocates them inside the
        graph and every replay writes them in place; later calls replay it."""
        warm_up_on_side_stream(self)
        self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_loss = self.loss()
            self.static_loss.backward()
            self.opt.step()
        self.graph = graph


def held_after_forward_mb(step: TrainStep, device: str) -> float | None:
    """Memory a forward leaves allocated for its backward (activations, casts), MiB: with
    the peak, it tells saved tensors from backward transients. None on a CPU or for a
    captured step (its memory is the graph's pool)."""
    if device != "cuda" or step.graph is not None or step.steps is not None:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    loss = step.loss()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    del loss
    return held / 2**20


def measure_evaluation(head: str, dtype: str, device: str, cuda_graphs: bool, size=(512, 1024), crop: int = 512,
                       phase=no_phase, **model_kwargs) -> dict:
    """Sliding-window class scores and labels of one image at the Cityscapes test protocol
    (2048 x 1024 resized to 1024 x 512: 3 windows of 512, stride 341; the input given
    resized, the labels at that size), fused Rein, fp32 or
    bf16 autocast (``rein.evaluate``'s ``--amp``), every window a replay of one recorded
    graph (``cuda_graphs``, the default) or the model called as it is. ``phase(name)``:
    building, compiling (the two calls before the timing: Triton's compile and tuning, the
    window graph's recording), measuring."""
    phase("building")
    model = build_segmentor(True, device, img=crop, head=head, **model_kwargs).eval()
    image = torch.randn(1, 3, *size, device=device)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def run():
        with ctx:
            return slide_scores(model, image, crop, cuda_graphs=cuda_graphs).argmax(1)

    phase("compiling")
    for _ in range(2):  # record the graph (and tune the kernels) outside the timing
        run()
    phase("measuring")
    row = dict(workload=f"eval-{size[1]}x{size[0]}", provider="window-graph" if cuda_graphs else "uncaptured",
               dtype=dtype, head=head, median_ms=median_ms(run, device, warmup_ms=300, rep_ms=1500, cpu_runs=3))
    row["host_ms"] = host_ms(run, n=10) if device == "cuda" else None
    return row


def first_steps(fused: bool, dtype: str, device: str, phase=no_phase, **kw) -> tuple[TrainStep, dict]:
    """The step built (``building``), its first call timed to its end (``compiling``:
    torch.compile's compile, Triton's compile and tuning, the first run) and the calls
    that follow until it replays (``recording``: reduce-overhead mode records its CUDA
    graphs at the second call and replays from the third, ``WARM_STEPS`` in all). The
    whole-step graph rows (``capture``) record inside their first call (``capture()``) and
    run ``WARM_STEPS`` replays after it. Returns the step and the seconds:
    ``build_s``, ``first_step_s``, ``record_s`` and ``ttfs_s`` (first step + record: the
    time to the first replayed step)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    phase("building")
    t0 = time.perf_counter()
    step = TrainStep(fused, dtype, device, **kw)
    sync()
    phase("compiling")
    t1 = time.perf_counter()
    if kw.get("capture"):
        step.capture()
    else:
        step()
    sync()
    phase("recording")
    t2 = time.perf_counter()
    for _ in range(WARM_STEPS if kw.get("capture") else WARM_STEPS - 1):
        step()
    sync()
    t3 = time.perf_counter()
    return step, dict(build_s=t1 - t0, first_step_s=t2 - t1, record_s=t3 - t2, ttfs_s=t3 - t1)


def time_to_first_step(fused: bool, dtype: str, device: str, provider: str | None = None, phase=no_phase,
                       **kw) -> dict:
    """The seconds of ``first_steps`` alone, nothing measured after them (gpu_check's
    ``ttfs`` rows: a fresh process, torch.compile's on-disk caches as the row finds them)."""
    step, seconds = first_steps(fused, dtype, device, phase=phase, **kw)
    del step
    return dict(provider=provider or ("fused" if fused else "eager"), dtype=dtype, head=kw.get("head", "light"),
                **seconds)


def measure(fused: bool, dtype: str, device: str, provider: str | None = None, phase=no_phase, **kw) -> dict:
    # compile, autotune and record the graphs outside the timing
    step, seconds = first_steps(fused, dtype, device, phase=phase, **kw)
    phase("measuring")
    # a training step takes tens of ms: a longer warm-up and window than one layer
    row = dict(provider=provider or ("fused" if fused else "eager"), dtype=dtype, head=kw.get("head", "light"),
               **seconds,
               median_ms=median_ms(step, device, warmup_ms=500, rep_ms=2000, cpu_runs=5),
               peak_mem_mb=peak_mem_mb(step, device, relative=False),
               held_after_forward_mb=held_after_forward_mb(step, device))
    row["median_ms_repeat"] = median_ms(step, device, warmup_ms=500, rep_ms=2000, cpu_runs=5)
    row["host_ms"] = host_ms(step, n=10) if device == "cuda" else None
    # CUDA graphs keep their memory in private pools, which the allocated peak does not
    # count between replays: the memory held by the caching allocator bounds it from above
    row["reserved_mb"] = torch.cuda.memory_reserved() / 2**20 if device == "cuda" else None
    del step
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def measure_workload(name: str, setting: str = "fused-bf16", head: str = "light", device: str = "cuda",
                     **overrides) -> dict:
    """The training step of ``STEP_WORKLOADS[name]`` in ``SETTINGS[setting]`` (default: bf16,
    fused Rein, uncaptured; "library" captures it), as one row of ``measure``; ``overrides``
    change either (e.g. ``grad_checkpointing=False``)."""
    kw = {**SETTINGS[setting], **STEP_WORKLOADS[name], **overrides}
    fused, dtype = kw.pop("fused"), kw.pop("dtype")
    return dict(workload=name, **measure(fused, dtype, device, provider=setting, head=head, **kw))
