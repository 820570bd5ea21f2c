"""Compile every GPU kernel variant for sm_90 (H100/H200) without a GPU.

    python tests/compile_sm90.py        (TRITON_INTERPRET must be unset)

Triton's own ptxas turns each kernel into a cubin ahead of time, so a kernel that would
fail to compile shows up on a CPU-only machine. The first config of each kernel (the one
REIN_AUTOTUNE=0 uses) must fit the 227 KB of shared memory a Hopper block may use for
every dtype; a later config that does not is reported as one autotuning will discard.
It also checks that the GEMM kernel's bf16/fp16/tf32 dots use Hopper's wgmma. Prints one
line per variant; exits non-zero on any failure.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import rein_kernels.rein_layer as op  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024
# (x dtype, parameter dtype, PRECISION): fp32 with and without tf32, fp16, bf16, and
# fp32 features with bf16 parameters (autocast over an fp32 residual stream)
DTYPES = [("fp32", "fp32", "ieee"), ("fp32", "fp32", "tf32"), ("fp16", "fp16", "tf32"),
          ("bf16", "bf16", "tf32"), ("fp32", "bf16", "tf32")]


def compile_one(kernel, types, constexprs, config):
    jit = kernel.fn
    sig = {n: types.get(n, "constexpr") for n in jit.arg_names}
    consts = {**constexprs, **config.kwargs}
    src = ASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=TARGET, options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def main() -> int:
    failures = 0
    for xd, pd, prec in DTYPES:
        gemm_configs = op.GEMM_GPU_CONFIGS if (xd, pd) == ("bf16", "bf16") else op.GEMM_GPU_CONFIGS[:1]
        logit_configs = op.LOGITS_GPU_CONFIGS if (xd, pd) == ("bf16", "bf16") else op.LOGITS_GPU_CONFIGS[:1]
        ints = dict(R="i64", S1="i32", C="i32", K2="i32", M="i32", num_prefix="i32",
                    **{n: "i64" for n in ("sa0", "sa1", "so0", "so1", "sb1k", "sb1n", "sx0", "sx1", "sg0", "sg1")})
        gemm_types = dict(A=f"*{xd}", A2=f"*{pd}", B1=f"*{pd}", B2=f"*{pd}", BIAS=f"*{pd}", SCALE="*fp32",
                          OUT=f"*{xd}", X=f"*{xd}", PARTIAL="*fp32", **ints)
        logit_types = dict(X=f"*{xd}", G=f"*{xd}", T=f"*{pd}", U=f"*{pd}", LSE="*fp32", P1=f"*{pd}", GZ=f"*{pd}",
                           PARTIAL="*fp32", c_scale="fp32", **ints)
        jobs = []
        for cfg in gemm_configs:
            for backward in (False, True):  # forward: bias; backward: the dscale shares
                jobs.append(("gemm", op._rein_gemm_kernel, gemm_types,
                             dict(SEQ_DIM=1, HAS_BIAS=not backward, DSCALE=backward, PRECISION=prec), cfg))
        for cfg in logit_configs:
            for backward in (False, True):
                for softmax in (True, False):
                    jobs.append(("logits", op._rein_logits_kernel, logit_types,
                                 dict(SEQ_DIM=0, USE_SOFTMAX=softmax, BACKWARD=backward, PRECISION=prec,
                                      BLOCK_M=128), cfg))
        for name, kernel, types, consts, cfg in jobs:
            label = f"{name:6s} x={xd} params={pd} {prec:4s} {consts} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
            try:
                k = compile_one(kernel, types, consts, cfg)
            except Exception as e:  # report every variant, not just the first failure
                failures += 1
                print(f"FAIL {label}: {type(e).__name__}: {str(e)[:300]}")
                continue
            shared = k.metadata.shared
            wgmma = "wgmma" in k.asm["ptx"]
            problems, note = [], ""
            first = cfg is (op.GEMM_GPU_CONFIGS if name == "gemm" else op.LOGITS_GPU_CONFIGS)[0]
            if shared > SHARED_LIMIT:
                if first:
                    problems.append(f"shared memory {shared} B > {SHARED_LIMIT} in the first config")
                else:
                    note = "(too much shared memory: autotuning discards it)"
            if name == "gemm" and prec == "tf32" and not wgmma:
                problems.append("no wgmma in the GEMM")
            failures += bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} {label}: shared {shared} B, wgmma {wgmma} "
                  f"{'; '.join(problems)}{note}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
