"""End-to-end training step, eager vs fused (GPU: the vitl-512 recipe; CPU: a tiny ViT, eager only)."""
import pytest
import torch

from e2e import TrainStep

ON_GPU = torch.cuda.is_available()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["eager", "fused"])
def test_train_step(benchmark, provider, dtype):
    if not ON_GPU and provider == "fused":
        pytest.skip("fused kernels are timed only on a GPU (CPU runs them in Triton's interpreter)")
    if not ON_GPU and dtype == "bf16":
        pytest.skip("bf16 timings on a CPU say nothing about the GPU recipe")
    kw = {} if ON_GPU else dict(backbone="vit_small_patch14_dinov2", img=64, batch=2, depth=4)
    step = TrainStep(provider == "fused", dtype, "cuda" if ON_GPU else "cpu", **kw)
    sync = torch.cuda.synchronize if ON_GPU else (lambda: None)

    def run():
        loss = step()
        sync()
        return loss

    run()
    benchmark.group = f"e2e {dtype}"
    loss = benchmark.pedantic(run, rounds=10 if ON_GPU else 5, warmup_rounds=2)
    assert torch.isfinite(loss)
