"""Fused Rein vs the float64 reference: forward and every gradient, on fresh random inputs.

On CPU the real kernels run through Triton's interpreter (fp32, fp16; bf16 arithmetic
is wrong in the interpreter). On a GPU they run natively in fp32, tf32, fp16 and bf16.
"""
import dataclasses
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rein_kernels
import rein_kernels._common as common
from _parity import DEVICE, DTYPE, Case, check_case, guards_intact, make_layer, make_x, padded, run
from rein_kernels.rein_layer_v4 import row_layout

ON_GPU = torch.cuda.is_available()
GPU_ONLY = pytest.mark.skipif(
    not ON_GPU, reason="needs a GPU: the interpreter ignores tf32 and computes bf16 wrongly")
# fp32 and fp16 everywhere; tf32 and bf16 natively only.
DTYPES = ["fp32", "fp16"] + (["tf32", "bf16"] if ON_GPU else [])
DTYPE_PARAMS = ["fp32", "fp16", pytest.param("tf32", marks=GPU_ONLY), pytest.param("bf16", marks=GPU_ONLY)]

# Named cases: each one pins a feature; sizes are odd or prime on purpose
# (C not a multiple of 16, m not a power of two, rows not a multiple of any block).
CASES = {
    "default": Case(),
    "seq_first": Case(batch_first=False),
    "no_cls": Case(prefix=0),
    "registers": Case(prefix=5, N=17),
    "no_softmax": Case(softmax=False, scale=0.05),
    "lora": Case(lora=3),
    "lora_seq_first_no_softmax": Case(lora=8, batch_first=False, softmax=False, scale=0.05),
    "zero_mlp_delta_f": Case(zero_mlp=True),
    "negative_scale": Case(scale=-1.7),
    "tiny_scale": Case(scale=1e-3),
    "one_token": Case(m=1),
    "two_tokens": Case(m=2),
    "wide": Case(C=131, m=33, N=9, B=3),
    "single_row": Case(B=1, N=2),
    "only_prefix": Case(N=1),
    "last_layer": Case(layer=2),
    # scaled logits of 100 and more (x ~ 100, trained-size tokens): an lse without the
    # row max overflows; and far past that, a softmax that is one-hot to fp32 precision
    "large_logits": Case(x_scale=100.0, token_scale=1.0),
    "one_hot": Case(x_scale=300.0, token_scale=1.0, m=5, prefix=2),
    # register tokens 50x the patch tokens (their g too): subtracting their share from a
    # GEMM over all rows would cancel catastrophically in fp16/bf16
    "large_registers": Case(prefix=5, N=17, prefix_scale=50.0),
}


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("name", list(CASES))
def test_parity_named(name, dtype, kernels):
    # a seed per case, the same in every process (str hashes are salted per process)
    check_case(dataclasses.replace(CASES[name], dtype=dtype), seed=zlib.crc32(name.encode()) % 1000)


@st.composite
def cases(draw, dtype):
    # Every draw exercises the whole layer: at least one refined row and at least one
    # value token (m = 1 and all-prefix inputs are named cases above).
    prefix = draw(st.integers(0, 3))
    return Case(
        B=draw(st.integers(1, 3)),
        N=draw(st.integers(prefix + 1, 19)),
        C=draw(st.sampled_from([5, 16, 17, 37, 50, 67, 97])),
        m=draw(st.sampled_from([2, 3, 7, 11, 20, 33])),
        L=2,
        layer=draw(st.integers(0, 1)),
        lora=draw(st.sampled_from([None, None, 1, 4, 9])),
        batch_first=draw(st.booleans()),
        prefix=prefix,
        softmax=draw(st.booleans()),
        zero_mlp=draw(st.booleans()),
        scale=draw(st.sampled_from([1e-3, 0.05, 0.37, 1.0, -2.0])),
        dtype=dtype,
    )


# One test per dtype, so that parallel workers share the draws: natively each draw
# compiles new kernel specialisations (a few seconds each), and 60 draws in one test
# outlasted a 190 s window on an H200.
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_parity_random(dtype, data, seed):
    case = data.draw(cases(dtype))
    if not case.softmax and case.dtype in ("fp16", "bf16"):
        # Without softmax p = z is unbounded; keep the raw logits in fp16 range.
        case = dataclasses.replace(case, scale=min(abs(case.scale), 0.05))
    # the default kernels (v4) in either layout of their row kernels
    with row_layout(streamed=data.draw(st.booleans(), label="streamed")):
        check_case(case, seed)


def _one_config(stream_k: int):
    """Both row kernels, every path, pinned to one tile (16 rows, 32 columns; 16 in the
    interpreter) in one layout."""
    import triton

    import rein_kernels.rein_layer_v4 as op

    bk = 16 if common.INTERPRET else 32
    cfg = triton.Config({"BLOCK_R": 16, "BLOCK_K": bk, "STREAM_K": stream_k}, num_warps=4, num_stages=1)
    saved = [(t, t.configs, t.cache) for table in (op._ROWS_FWD, op._ROWS_BWD) for t in table.values()]
    for t, _, _ in saved:
        t.configs, t.cache = [cfg], {}
    return saved


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("name", ["registers", "seq_first", "wide", "no_softmax", "lora"])
def test_row_layouts_agree_to_the_bit(name, dtype, monkeypatch):
    """v4's two row-kernel layouts with the same tiles write every element once, from the
    same values: the forward and every gradient are equal to the last bit, on poisoned
    outputs with guard regions. (Different tiles, which the autotuner may pick per layout
    as it picks among tiles of one layout, round the null token's logit, summed per tile,
    differently in the last bits; the parity suite bounds that.)"""
    monkeypatch.setattr(rein_kernels, "KERNELS", "v4")
    case = dataclasses.replace(CASES[name], dtype=dtype)
    seed = zlib.crc32(name.encode()) % 1000
    dt = DTYPE[dtype]
    layer = make_layer(case, seed).to(DEVICE, dt)
    x = make_x(case, seed).to(dt)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dt)
    results = []
    for stream_k in (0, 32):
        saved = _one_config(stream_k)
        common.POISON = True
        try:
            results.append(run(layer, padded(x, seed), padded(g, seed + 1), True, case.batch_first, case.prefix,
                               case.layer))
            guards_intact()
        finally:
            common.POISON = False
            common.GUARDS.clear()
            for t, cfgs, cache in saved:
                t.configs, t.cache = cfgs, cache
    (out_f, grads_f), (out_s, grads_s) = results
    assert torch.isfinite(out_f).all() and torch.equal(out_f, out_s)
    assert grads_f.keys() == grads_s.keys()
    for k in grads_f:
        assert torch.isfinite(grads_f[k]).all() and torch.equal(grads_f[k], grads_s[k]), k
