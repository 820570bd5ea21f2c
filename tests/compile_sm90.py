"""Compile every GPU kernel variant for sm_90 (H100/H200) without a GPU.

    python tests/compile_sm90.py [v4] [v3] [assign]        (TRITON_INTERPRET must be unset)

Triton's own ptxas turns each kernel into a cubin ahead of time, so a kernel that would
fail to compile shows up on a CPU-only machine. Every config autotuning may pick (each
kernel's list for the dtype's path: tensor cores, or FMA for fp32 with tf32 off) must,
in every dtype, both as the published shapes specialise (aligned) and for odd C:
fit the 227 KB of shared memory a Hopper block may use, compile without register
spills (ptxas' report: ``regs <N> spills <S> B``, S = spill stores + spill loads per
thread), and, for v3's GEMM's bf16/fp16/tf32 dots, use Hopper's wgmma (v4's GEMMs are
cuBLAS'). Prints one line per variant; exits non-zero on any failure.
"""
import contextlib
import io
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024
# (x dtype, parameter dtype, PRECISION): fp32 with and without tf32, fp16, bf16, and
# fp32 features with bf16 parameters (autocast over an fp32 residual stream)
DTYPES = [("fp32", "fp32", "ieee"), ("fp32", "fp32", "tf32"), ("fp16", "fp16", "tf32"),
          ("bf16", "bf16", "tf32"), ("fp32", "bf16", "tf32")]


# What a launch at the published shapes specialises on: 16-byte aligned tensors (torch's
# allocations) and C, and with it every row stride, a multiple of 16 (384 to 1536).
ALIGNED = {"C", "sa", "so", "sx", "sg", "sb1k", "sb1n", "sdx", "sw0"}


def compile_one(kernel, types, constexprs, config, aligned):
    """(compiled kernel, ptxas' registers, spill bytes) of one variant, compiled afresh so
    that ptxas runs and reports (its log goes to stdout, captured here). ``aligned``: the
    specialisation of the published shapes; otherwise none (odd C, as the tests use)."""
    jit = kernel
    sig = {n: types.get(n, "constexpr") for n in jit.arg_names}
    consts = {**constexprs, **config.kwargs}
    div16 = [["tt.divisibility", 16]]
    attrs = {(jit.arg_names.index(n),): div16 for n, t in sig.items()
             if n in ALWAYS16 or (aligned and (t.startswith("*") or n in ALIGNED))}
    src = ASTSource(fn=jit, signature=sig, constexprs={(jit.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    log = io.StringIO()
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        k = triton.compile(src, target=TARGET, options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return (k, *ptxas_usage(log.getvalue()))


def ptxas_usage(log: str) -> tuple[int, int]:
    """(registers, spill stores + spill loads in bytes) from ptxas -v's report."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spills:
        raise RuntimeError(f"no ptxas usage report in: {log[-500:]!r}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def jobs_v3(xd, pd, prec):
    import rein_kernels.rein_layer as op

    ints = dict(R="i32", S1="i32", C="i32", K2="i32", M="i32", num_prefix="i32", n_slots="i32",
                n_slots_r="i32", n_slots_n="i32",
                **{n: "i64" for n in ("sa", "sa2", "so", "sx", "sb1k", "sb1n", "sg", "sp", "sxc", "sgs")})
    gemm_types = dict(A=f"*{xd}", A2=f"*{pd}", B1=f"*{pd}", B2=f"*{pd}", BIAS=f"*{pd}", SCALE="*fp32",
                      OUT=f"*{xd}", XS=f"*{pd}", PARTIAL="*fp32", **ints)
    logit_types = dict(X=f"*{xd}", G=f"*{xd}", T=f"*{pd}", U=f"*{pd}", BD=f"*{pd}", SCALE="*fp32", LSE="*fp32",
                       P1=f"*{pd}", GZ=f"*{pd}", XC=f"*{pd}", GS=f"*{pd}", PARTIAL="*fp32", c_scale="fp32", **ints)
    jobs = []
    # each config list with the alignments its launcher chooses it for (_gemm_path, _logits_path)
    gemm_paths = [("tc", (True,)), ("tc_odd", (False,))] if prec == "tf32" else [("fma", (True, False))]
    if pd != "fp32":
        logits_paths = [("tc", (True, False))]
    elif prec == "tf32":
        logits_paths = [("tc", (True,)), ("small", (False,))]
    else:
        logits_paths = [("small", (True, False))]
    for gpath, alignments in gemm_paths:
        for cfg in op.GEMM_GPU_CONFIGS[gpath]:
            for backward in (False, True):  # forward: bias, W_d^T; backward: W_d, the dscale shares
                consts = dict(SEQ_DIM=1, B1_T=not backward, BACKWARD=backward, PRECISION=prec,
                              SLOT_R=op.SLOT_R, SLOT_N=op.SLOT_N)
                jobs += [("v3 gemm", op._gemm_kernel, gemm_types, consts, cfg, a) for a in alignments]
    for lpath, alignments in logits_paths:
        for cfg in op.LOGITS_GPU_CONFIGS[lpath]:
            for backward in (False, True):
                for softmax in (True, False):
                    consts = dict(SEQ_DIM=0, USE_SOFTMAX=softmax, BACKWARD=backward, WRITE_X=backward and xd != pd,
                                  PRECISION=prec, BLOCK_M=128, SLOT_R=op.SLOT_R)
                    jobs += [("v3 logits", op._logits_kernel, logit_types, consts, cfg, a) for a in alignments]
    return jobs


# v4's specialisation: its padded sizes are multiples of 16 whatever C and m are
ALWAYS16 = {"Cp", "Kf", "Mp"}


def jobs_v4(xd, pd, prec):
    """The row kernels, forward and backward, with and without softmax. ``pd`` is the
    compute dtype; under autocast (pd bf16 with fp32 features) the parameter operands stay
    fp32 (their master dtype) and the kernels cast them."""
    import rein_kernels.rein_layer_v4 as op

    od = "fp32" if xd != pd else xd  # out: promote(x, compute dtype)
    md = "fp32" if (xd, pd) == ("fp32", "bf16") else pd  # W and b (T and U come in pd)
    ints = dict(R="i32", S1="i32", C="i32", M="i32", Cp="i32", Kf="i32", Mp="i32", num_prefix="i32",
                c_scale="fp32", **{n: "i64" for n in ("sx", "so", "sg", "sdx", "sw0", "sw1")})
    fwd_types = dict(X=f"*{xd}", T=f"*{pd}", U=f"*{pd}", W=f"*{md}", BIAS=f"*{md}", OUT=f"*{od}", A=f"*{pd}",
                     BT=f"*{pd}", LSE="*fp32", **ints)
    bwd_types = dict(X=f"*{xd}", G=f"*{od}", T=f"*{pd}", U=f"*{pd}", W=f"*{md}", LSE="*fp32", DX=f"*{od}",
                     W1=f"*{pd}", BB=f"*{pd}", **ints)
    # each config list with the alignments its launcher chooses it for (_path)
    paths = [("tc", (True,)), ("tc_odd", (False,))] if prec == "tf32" else [("small", (True, False))]
    jobs = []
    for path, alignments in paths:
        for name, kernel, types, cfgs in (("v4 rows fwd", op._rows_fwd_kernel, fwd_types, op.ROWS_FWD_GPU_CONFIGS),
                                          ("v4 rows bwd", op._rows_bwd_kernel, bwd_types, op.ROWS_BWD_GPU_CONFIGS)):
            for cfg in cfgs[path]:
                for softmax in (True, False):
                    consts = dict(SEQ_DIM=0, USE_SOFTMAX=softmax, PRECISION=prec, BLOCK_M=128)
                    jobs += [(name, kernel, types, consts, cfg, aligned) for aligned in alignments]
    return jobs


def jobs_assign():
    """The matching kernel (``rein_kernels/assignment.py``) on the loss' fp32 costs, for the
    published recipe's 100 queries and 19 classes, for 65 and for 200 queries and 150
    classes; it has one config (one warp) and no dtype path."""
    import rein_kernels.assignment as op

    types = dict(COST="*fp32", PRESENT="*i8", QUERY_OF="*i64", CLASS_OF="*i64", B="i32", Q="i32", K="i32",
                 sp="i32", sq="i32", sk="i32")
    cfg = triton.Config({}, num_warps=1, num_stages=1)
    return [("assign", op._lsap_kernel, types, dict(BLOCK_Q=bq, BLOCK_K=bk), cfg, aligned)
            for bq, bk in ((128, 32), (128, 128), (256, 256)) for aligned in (True, False)]


def main() -> int:
    versions = sys.argv[1:] or ["v4", "v3", "assign"]
    failures = n = 0
    for xd, pd, prec in DTYPES:
        jobs = [j for v in versions if v != "assign" for j in {"v4": jobs_v4, "v3": jobs_v3}[v](xd, pd, prec)]
        if "assign" in versions and (xd, pd, prec) == DTYPES[0]:
            jobs += jobs_assign()
        for name, kernel, types, consts, cfg, aligned in jobs:
            n += 1
            label = (f"{name:9s} x={xd} params={pd} {prec:4s} {'aligned  ' if aligned else 'unaligned'} {consts} "
                     f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}")
            try:
                k, regs, spills = compile_one(kernel, types, consts, cfg, aligned)
            except Exception as e:  # report every variant, not just the first failure
                failures += 1
                print(f"FAIL {label}: {type(e).__name__}: {str(e)[:300]}")
                continue
            shared = k.metadata.shared
            wgmma = "wgmma" in k.asm["ptx"]
            problems = []
            if shared > SHARED_LIMIT:
                problems.append(f"shared memory {shared} B > {SHARED_LIMIT}")
            if name.endswith("gemm") and prec == "tf32" and not wgmma:
                problems.append("no wgmma in the GEMM")
            if spills:
                problems.append(f"{spills} B of register spills")
            failures += bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} {label}: regs {regs} spills {spills} B shared {shared} B "
                  f"wgmma {wgmma} {'; '.join(problems)}", flush=True)
    print(f"{n} variants, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
