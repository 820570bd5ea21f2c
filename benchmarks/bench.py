"""Workloads, providers, the floor and the measurements shared by the pytest-benchmark
suite and the one-shot GPU script (benchmarks/README.md says what they mean).

Providers: ``eager`` (the reference, fused=False), ``compile`` (torch.compile of that
reference), ``fused`` (this library's kernels, v3) and ``fused-v2`` (the v2 kernels, kept
until a GPU run has compared them). Passes: ``fwd`` and ``fwd+bwd`` (gradients for x and
every Rein parameter, as in training). Dtypes: ``fp32`` (matmuls follow
``torch.backends.cuda.matmul.allow_tf32``; the GPU script allows tf32, as the published
recipe's torch does by default for cuDNN and users commonly do for matmul) and ``bf16``
(torch.autocast over an fp32 residual stream). Modes: ``call`` (one layer called alone,
its parameter operands formed per call) and ``stack`` (all L layers chained inside
``ReinLayer.prepared()``, as a backbone runs them; times are per layer, total / L).

Times: ``median_ms`` is do_bench's CUDA-event median of the call as issued from Python
(host overhead included); ``graph_ms`` the same call captured once in a CUDA graph and
replayed: device time alone, the kernels' figure; ``host_ms`` wall time per call of
unsynchronised calls.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass

import torch

import rein
import rein_kernels


@dataclass(frozen=True)
class Workload:
    name: str
    backbone: str
    C: int
    L: int
    batch: int
    image: int
    m: int = 100
    r: int = 16
    patch: int = 16

    @property
    def tokens_per_image(self) -> int:
        return (self.image // self.patch) ** 2

    @property
    def rows(self) -> int:
        """Refined rows per layer (the cls token passes through)."""
        return self.batch * self.tokens_per_image


WORKLOADS = {
    w.name: w
    for w in [
        Workload("vits-512", "vit_small_patch14_dinov2", 384, 12, 4, 512),
        Workload("vitb-512", "vit_base_patch14_dinov2", 768, 12, 4, 512),
        Workload("vitl-512", "vit_large_patch14_dinov2", 1024, 24, 4, 512),
        Workload("vitl-1024", "vit_large_patch14_dinov2", 1024, 24, 2, 1024),
        Workload("vitg-512", "vit_giant_patch14_dinov2", 1536, 40, 4, 512),
        Workload("vitl-512-b16", "vit_large_patch14_dinov2", 1024, 24, 16, 512),
        Workload("vit7b-512", "vit_7b_patch16_dinov3", 4096, 40, 4, 512),
    ]
}
# Small enough for a CPU: eager vs compile only (the fused kernels need a GPU to be timed).
CPU_WORKLOAD = Workload("cpu-tiny", "vit_small_patch14_dinov2", 64, 2, 2, 128)

PROVIDERS = ("eager", "compile", "fused", "fused-v2")
MODES = ("call", "stack")
# "bf16": autocast over an fp32 residual stream (frozen weights in fp32); "bf16x": autocast
# over a bf16 one (frozen weights cast to bf16, as the library's training defaults do)
DTYPES = ("fp32", "bf16", "bf16x")
PASSES = ("fwd", "fwd+bwd")


def flops(w: Workload, pass_: str) -> float:
    """benchmarks/README.md: per layer and row, fwd ~ 2C(C + 2m), fwd+bwd ~ 2C(3C + 7m)."""
    per_row = 2 * w.C * (w.C + 2 * w.m) if pass_ == "fwd" else 2 * w.C * (3 * w.C + 7 * w.m)
    return float(w.rows * per_row)


def min_bytes(w: Workload, pass_: str, elt: int) -> float:
    """Each input read once, each output written once: x, out (+ g, x again, dx) and the
    two [C, C] weights (+ their gradients in fp32)."""
    act = (2 if pass_ == "fwd" else 5) * w.rows * w.C * elt
    weights = 2 * w.C * w.C * elt + (0 if pass_ == "fwd" else 2 * w.C * w.C * 4)
    return float(act + weights)


def floor_ms(w: Workload, pass_: str, dtype: str, ceilings: dict) -> float:
    peak = ceilings["tf32_tflops"] if dtype == "fp32" else ceilings["bf16_tflops"]
    elt = 4 if dtype == "fp32" else 2
    return 1e3 * max(flops(w, pass_) / (peak * 1e12), min_bytes(w, pass_, elt) / (ceilings["copy_gbps"] * 1e9))


class Case:
    """One (workload, provider, dtype, pass, mode) on one device, ready to call repeatedly."""

    def __init__(self, w: Workload, provider: str, dtype: str, pass_: str, device: str, n_inputs: int = 4,
                 mode: str = "call"):
        self.w, self.provider, self.dtype, self.pass_, self.device, self.mode = w, provider, dtype, pass_, device, mode
        self.n_layers = w.L if mode == "stack" else 1
        self.kernels = "v2" if provider == "fused-v2" else "v3"
        torch.manual_seed(0)
        self.layer = rein.ReinLayer(w.L, w.C, w.patch, token_length=w.m, lora_dim=w.r,
                                    scale_init=0.1, fused=provider.startswith("fused")).to(device)
        self.params = [p for p in self.layer.parameters()]
        n = w.tokens_per_image + 1
        # several input sets, rotated, so inputs that fit in L2 are not timed from cache
        x_dtype = torch.bfloat16 if dtype == "bf16x" else torch.float32
        self.xs = [torch.randn(w.batch, n, w.C, device=device, dtype=x_dtype, requires_grad=pass_ != "fwd")
                   for _ in range(n_inputs)]
        self.g = torch.randn(w.batch, n, w.C, device=device)
        self.i = 0
        fn = self._forward
        if provider == "compile":
            torch._dynamo.reset()
            fn = torch.compile(fn)
        self.fn = fn

    def _forward(self, x):
        if self.mode == "call":
            return self.layer(x, 0, batch_first=True, has_cls_token=True)
        # torch.compile forms each layer's operands itself (prepared() is a no-op there)
        with self.layer.prepared() if self.provider != "compile" else contextlib.nullcontext():
            for i in range(self.w.L):
                x = self.layer(x, i, batch_first=True, has_cls_token=True)
        return x

    def autocast(self):
        if self.dtype.startswith("bf16"):
            return torch.autocast(self.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self):
        """One forward (without autograd) or one forward + backward (dx and every grad)."""
        x = self.xs[self.i % len(self.xs)]
        self.i += 1
        kernels, rein_kernels.KERNELS = rein_kernels.KERNELS, self.kernels
        try:
            if self.pass_ == "fwd":
                with torch.no_grad(), self.autocast():
                    return self.fn(x)
            with self.autocast():
                out = self.fn(x)
            return out, torch.autograd.grad(out, [x] + self.params, self.g.to(out.dtype), allow_unused=True)
        finally:
            rein_kernels.KERNELS = kernels

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def run_synced(self):
        self()
        self.sync()

    def saved_bytes(self) -> tuple[int, int]:
        """Bytes the autograd graph keeps for backward of one forward (unique storages):
        (all, all but the parameters' own storages)."""
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
            return t

        x = self.xs[0].detach().requires_grad_(True)
        kernels, rein_kernels.KERNELS = rein_kernels.KERNELS, self.kernels
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.autocast():
                self.fn(x)
        finally:
            rein_kernels.KERNELS = kernels
        params = {p.untyped_storage().data_ptr() for p in self.params}
        total = sum(seen.values())
        return total, total - sum(n for ptr, n in seen.items() if ptr in params)


def median_ms(fn, device: str, warmup_ms: float = 50, rep_ms: float = 300, cpu_runs: int = 20) -> float:
    """Median time of fn in ms: CUDA events via triton's do_bench on a GPU; a host clock
    on a CPU, where there is nothing asynchronous to hide."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    for _ in range(3):
        fn()
    times = []
    for _ in range(cpu_runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mem_mb(fn, device: str, relative: bool = True) -> float | None:
    """Peak device memory of one call of fn, in MiB (above what was allocated before the
    call when ``relative``); None on a CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if relative else 0
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def warm_up_on_side_stream(fn, n: int = 3) -> None:
    """n calls of fn on a side stream, as CUDA graph capture wants before it records
    (compile, autotuning and lazy initialisation done, on a stream other than the default)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)


def graph_ms(case: Case, warmup_ms: float = 50, rep_ms: float = 300) -> float:
    """Device time of one call, ms: captured once in a CUDA graph (after warm-up on a side
    stream, compile and autotuning done) and replayed, so no host work is timed."""
    import triton.testing

    warm_up_on_side_stream(case)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        case()
    return triton.testing.do_bench(g.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def host_ms(fn, n: int = 50) -> float:
    """Wall time per call of n calls of fn issued without synchronising, ms (CUDA): close to
    the call's event time, the host sets the pace; well under it, the device."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / n


def measure(w: Workload, provider: str, dtype: str, pass_: str, device: str, ceilings: dict | None,
            mode: str = "call") -> dict:
    """One row: times per layer (a stack's totals divided by L), the floor, peak memory and
    the bytes saved for backward (of the whole call)."""
    case = Case(w, provider, dtype, pass_, device, mode=mode)
    case.run_synced()  # compile / autotune outside the timing
    per = case.n_layers
    row = dict(workload=w.name, dtype=dtype, provider=provider, mode=mode, **{"pass": pass_})
    row["median_ms"] = median_ms(case, device) / per
    row["median_ms_repeat"] = median_ms(case, device) / per  # time twice: the spread is the noise
    if device == "cuda":
        row["host_ms"] = host_ms(case, n=max(5, 50 // per)) / per
        try:
            row["graph_ms"] = graph_ms(case) / per
            row["graph_ms_repeat"] = graph_ms(case) / per
        except Exception as e:  # a provider that cannot be captured: say why, keep the row
            row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    row["floor_ms"] = floor_ms(w, pass_, dtype, ceilings) if ceilings else None
    row["peak_mem_mb"] = peak_mem_mb(case, device)
    # (a stack under saved-tensor hooks would form every layer's operands itself: call mode only)
    row["saved_bytes"], row["saved_bytes_no_params"] = (
        case.saved_bytes() if pass_ == "fwd+bwd" and mode == "call" else (None, None))
    return row


def workload_dict(w: Workload) -> dict:
    return asdict(w) | {"rows": w.rows}
