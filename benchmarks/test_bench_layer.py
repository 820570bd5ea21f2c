"""pytest-benchmark suite: one Rein layer, every named workload x provider x dtype x pass.

    pytest benchmarks/ --benchmark-only

On a GPU every named workload runs for eager, compile and fused. On a CPU a tiny
workload runs eager vs compile in fp32 so the suite is exercised honestly; the fused
kernels are skipped there (the interpreter's speed means nothing).
"""
import pytest
import torch

from bench import CPU_WORKLOAD, DTYPES, PASSES, PROVIDERS, WORKLOADS, Case, floor_ms

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
WORKLOAD_LIST = list(WORKLOADS.values()) if ON_GPU else [CPU_WORKLOAD]


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", WORKLOAD_LIST, ids=lambda w: w.name)
def test_rein_layer(benchmark, workload, provider, dtype, pass_, gpu_ceilings):
    if not ON_GPU and provider.startswith("fused"):
        pytest.skip("fused kernels are timed only on a GPU (CPU runs them in Triton's interpreter)")
    if not ON_GPU and dtype.startswith("bf16"):
        pytest.skip("bf16 timings on a CPU say nothing about the GPU recipe; fp32 exercises the suite")
    if ON_GPU:
        torch.backends.cuda.matmul.allow_tf32 = True
    case = Case(workload, provider, dtype, pass_, DEVICE)
    case.run_synced()  # compile and autotune before timing
    benchmark.group = f"{workload.name} {dtype} {pass_}"
    benchmark.pedantic(case.run_synced, rounds=30 if ON_GPU else 10, warmup_rounds=3)
    out = case()
    assert torch.isfinite(out if pass_ == "fwd" else out[0]).all()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if ON_GPU else "cpu",
        rows=workload.rows,
        floor_ms=floor_ms(workload, pass_, dtype, gpu_ceilings) if gpu_ceilings else None,
    )
    if pass_ == "fwd+bwd":
        benchmark.extra_info["saved_bytes"], benchmark.extra_info["saved_bytes_no_params"] = case.saved_bytes()
