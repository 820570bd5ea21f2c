"""ReinLayer as a drop-in: names, counts, initialisation, checkpoints, queries, fallback."""
import math
import warnings

import pytest
import torch

import rein
import rein.layer
import rein_kernels
from _parity import DEVICE
from _tolerance import assert_sums_close

PUBLISHED = dict(num_layers=24, embed_dims=1024, patch_size=16)


def test_published_parameter_counts():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(rein.LoRAReins(lora_dim=16, **PUBLISHED)) == 2_990_081
    assert count(rein.Reins(**PUBLISHED)) == 5_016_065
    assert count(rein.ReinLayer(**PUBLISHED, lora_dim=16)) == 2_990_081


def _reference_shapes(L, m, C, Q, lora=None, zero_mlp=False):
    """The reference implementation's state_dict (docs/maths.md's table), as name -> shape."""
    shapes = {
        "mlp_token2feat.weight": (C, C), "mlp_token2feat.bias": (C,),
        "mlp_delta_f.weight": (C, C), "mlp_delta_f.bias": (C,),
        "transform.weight": (Q, C), "transform.bias": (Q,),
        "merge.weight": (Q, 3 * Q), "merge.bias": (Q,),
    }
    if not zero_mlp:
        shapes["scale"] = ()
    if lora:
        shapes["learnable_tokens_a"] = (L, m, lora)
        shapes["learnable_tokens_b"] = (L, lora, C)
    else:
        shapes["learnable_tokens"] = (L, m, C)
    return shapes


@pytest.mark.parametrize("lora", [None, 4])
@pytest.mark.parametrize("zero_mlp", [False, True])
def test_reference_checkpoint_loads_strict_and_matches(lora, zero_mlp):
    """A checkpoint in the reference's layout loads with strict=True; fused == reference."""
    L, m, C, Q = 3, 7, 19, 8
    gen = torch.Generator().manual_seed(3)
    ckpt = {k: torch.randn(s, generator=gen) * 0.3 for k, s in
            _reference_shapes(L, m, C, Q, lora, zero_mlp).items()}
    layer = rein.ReinLayer(L, C, 4, query_dims=Q, token_length=m, lora_dim=lora,
                           zero_mlp_delta_f=zero_mlp)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ckpt.items()}
    layer.load_state_dict(ckpt, strict=True)
    layer.to(DEVICE)
    x = torch.randn(2, 9, C, generator=gen).to(DEVICE)
    out_fused = layer(x, 2, batch_first=True)
    layer.fused = False
    out_ref = layer(x, 2, batch_first=True)
    assert_sums_close(out_fused, out_ref, terms=C + m)  # the GEMMs' sums over channels and tokens


def test_init_follows_reference():
    C, p, r = 40, 16, 4
    torch.manual_seed(0)
    full = rein.Reins(2, C, p, token_length=5)
    v = math.sqrt(6 / (3 * p * p + C))
    assert full.learnable_tokens.abs().max() <= v
    assert full.learnable_tokens.abs().max() > 0.8 * v
    assert full.scale.item() == pytest.approx(1e-3)
    lora = rein.LoRAReins(lora_dim=r, num_layers=2, embed_dims=C, patch_size=p, token_length=5)
    v = math.sqrt(6 / (3 * p * p + math.sqrt(C * r)))
    for t in (lora.learnable_tokens_a, lora.learnable_tokens_b):
        assert 0.8 * v < t.abs().max() <= v
    zero = rein.Reins(2, C, p, token_length=5, zero_mlp_delta_f=True)
    assert zero.scale == 1.0 and "scale" not in zero.state_dict()
    assert zero.mlp_delta_f.weight.abs().sum() == 0 and zero.mlp_delta_f.bias.abs().sum() == 0
    # the same seed gives the same weights whichever path is chosen
    torch.manual_seed(0)
    again = rein.Reins(2, C, p, token_length=5, fused=False)
    for (k, a), (_, b) in zip(full.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_lora_tokens_are_products():
    layer = rein.LoRAReins(lora_dim=3, num_layers=2, embed_dims=10, patch_size=4, token_length=5)
    A, B = layer.learnable_tokens_a.double(), layer.learnable_tokens_b.double()
    # fp32 products of rank-3 factors: sums of 3 terms
    assert_sums_close(layer.get_tokens(1).double(), A[1] @ B[1], terms=3)
    everything = layer.get_tokens(-1).double()  # all layers at once: what the queries use
    assert everything.shape == (2, 5, 10)
    for l in range(2):
        assert_sums_close(everything[l], A[l] @ B[l], terms=3, name=f"layer {l}")
        assert_sums_close(layer.get_tokens(l), layer.get_tokens(-1)[l], terms=3, name=f"layer {l}")


def test_lora_queries_use_every_layers_tokens():
    L, m, C, Q = 3, 5, 12, 8
    layer = rein.ReinLayer(L, C, 4, query_dims=Q, token_length=m, lora_dim=2)
    T = torch.stack([layer.learnable_tokens_a[l] @ layer.learnable_tokens_b[l] for l in range(L)])
    t = layer.transform(T)  # [L, m, Q]
    cat = torch.stack([t.max(0).values, t.mean(0), t[-1]], dim=-1)  # [m, Q, 3]
    # sums over the rank, the channels, the layers (the mean) and the merged 3 Q
    assert_sums_close(layer.queries(), layer.merge(cat.flatten(-2)), terms=2 + C + L + 3 * Q)


def test_return_auto_queries():
    L, m, C, Q = 3, 5, 12, 8
    layer = rein.ReinLayer(L, C, 4, query_dims=Q, token_length=m)
    feats = [torch.randn(1, C, 2, 2)]
    out, q = layer.return_auto(feats)
    assert out is feats and q.shape == (m, Q)
    t = layer.transform(layer.learnable_tokens)  # [L, m, Q]
    cat = torch.stack([t.max(0).values, t.mean(0), t[-1]], dim=-1)  # [m, Q, 3]
    assert_sums_close(q, layer.merge(cat.flatten(-2)), terms=C + L + 3 * Q)  # the channels, layers, merged 3 Q
    layer.link_token_to_query = False
    assert layer.return_auto(feats) is feats


def test_prefix_tokens_pass_through_bitwise():
    layer = rein.ReinLayer(2, 21, 4, token_length=6, scale_init=0.5).to(DEVICE)
    x = torch.randn(3, 10, 21, device=DEVICE)
    for fused in (True, False):
        layer.fused = fused
        out = layer(x, 0, batch_first=True, num_prefix_tokens=4)
        assert torch.equal(out[:, :4], x[:, :4])
        assert not torch.allclose(out[:, 4:], x[:, 4:])


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(rein_kernels, "is_available", lambda x, dtype=None: False)
    monkeypatch.setattr(rein.layer, "_warned_fallback", set())
    layer = rein.ReinLayer(2, 16, 4, token_length=5)
    x = torch.randn(2, 7, 16)
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch reference"):
        out = layer(x, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x, 1)
    # the fallback computes the layer: against the closed form, not the reference itself
    from _closed_form import closed_form

    d = layer.double()
    want, _ = closed_form(x, torch.zeros_like(x), d.get_tokens(0), d.mlp_token2feat.weight, d.mlp_token2feat.bias,
                          d.mlp_delta_f.weight, d.mlp_delta_f.bias, d.scale,
                          batch_first=False, num_prefix=1, use_softmax=True)
    assert_sums_close(out.double(), want, terms=16 + 5)  # fp32 sums over the channels and tokens


def test_fused_active_says_which_path_the_last_call_ran(monkeypatch):
    """None before any call; True after a call the kernels ran (natively, or in the
    interpreter here); False after a reference call, asked for or fallen back to."""
    layer = rein.ReinLayer(2, 16, 4, token_length=5).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    assert layer.fused_active is None
    layer(x, 0)
    assert layer.fused_active is True
    layer.fused = False
    layer(x, 0)
    assert layer.fused_active is False
    layer.fused = True
    monkeypatch.setattr(rein_kernels, "is_available", lambda x, dtype=None: False)  # e.g. a CPU, no interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback's one warning: its own test
        layer(x, 1)
    assert layer.fused_active is False


def test_noncontiguous_inputs_match_reference(kernels):
    """Every kernel version and row layout on x views whose row strides differ from g's
    (dense) ones."""
    C, m = 19, 6
    layer = rein.ReinLayer(2, C, 4, token_length=m, scale_init=0.4).to(DEVICE)
    big = torch.randn(4, 11, 2 * C, device=DEVICE)
    square = torch.randn(6, 6, C, device=DEVICE)
    views = {
        # first: a transposed square view, so that g's rows paired with the wrong x rows
        # give wrong values (a non-square one could read out of bounds instead)
        "transposed_square": square.transpose(0, 1),
        "row_stride": big[:, :, :C],            # rows strided, channels dense
        "batch_slice": big[::2, :, C:],         # gaps between sequences
        "channel_stride": big[:, :, ::2][..., :C],  # channels strided: one explicit copy
        "transposed": big[:, :, :C].transpose(0, 1),
    }
    params = [p for p in layer.parameters() if p.requires_grad]
    for name, x in views.items():
        x = x.detach().requires_grad_(True)
        g = torch.randn(x.shape, device=DEVICE)
        results = []
        for fused in (True, False):
            layer.fused = fused
            out = layer(x, 1, batch_first=True)
            results.append((out, torch.autograd.grad(out, [x] + params, g, allow_unused=True)))
        (out, grads), (ref, ref_grads) = results
        assert_sums_close(out, ref, terms=C + m, name=name)  # sums over the channels and tokens
        rows = x.shape[0] * x.shape[1]
        for k, (a, b) in enumerate(zip(grads, ref_grads)):
            if b is None:
                assert a is None, (name, k)
                continue
            # the weight gradients also sum over the rows; the scale's over rows x channels
            terms = rows * C if b.dim() == 0 else rows + C + m
            assert_sums_close(a, b, terms=terms, name=f"{name}, gradient {k}")


def test_noncontiguous_parameters_match_reference():
    """The functional API takes parameters that are views (a transposed T, transposed
    weights, strided biases): the kernels must read them as the values they are."""
    gen = torch.Generator().manual_seed(4)
    C, m = 19, 6

    def r(*s):
        return (torch.randn(*s, generator=gen) * 0.4).to(DEVICE)

    x = r(3, 7, C)
    views = dict(
        T=r(C, m).t(),                    # [m, C] with column-major strides
        W_t=r(C, C).t(), b_t=r(2 * C)[::2],
        W_d=r(C, C).t(), b_d=r(3 * C)[1::3],
        scale=r(2)[1],
    )
    assert not any(v.is_contiguous() for k, v in views.items() if k != "scale")
    leaves = {k: v.detach().requires_grad_(True) for k, v in views.items()}
    g = r(*x.shape)
    kw = dict(batch_first=True, num_prefix_tokens=1, use_softmax=True)
    results = []
    for fn in (rein_kernels.rein_layer_fused, rein_kernels.rein_layer_reference):
        xg = x.clone().requires_grad_(True)
        out = fn(xg, *leaves.values(), **kw)
        results.append((out, torch.autograd.grad(out, [xg, *leaves.values()], g)))
    (out, grads), (ref, ref_grads) = results
    assert_sums_close(out, ref, terms=C + m)  # sums over the channels and tokens
    rows = x.shape[0] * x.shape[1]
    for name, a, b in zip(["x", *leaves], grads, ref_grads):
        # the weight gradients also sum over the rows; the scale's over rows x channels
        assert_sums_close(a, b, terms=rows * C if name == "scale" else rows + C + m, name=name)


def test_fused_saves_only_x_and_one_fp32_per_row():
    """Saved for backward: x itself, lse (fp32, one per row) and parameter-sized tensors;
    nothing of size [rows, m] or [rows, C] besides x."""
    B, N, C, m = 3, 41, 24, 11
    layer = rein.ReinLayer(2, C, 4, token_length=m, lora_dim=3).to(DEVICE)
    x = torch.randn(B, N, C, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x, 1, batch_first=True)
    rows = B * N
    big = [t for t in saved if t.numel() >= rows]
    assert any(t.data_ptr() == x.data_ptr() and t.shape == x.shape for t in big)
    lse = [t for t in big if t.dtype == torch.float32 and t.shape == (rows,)]
    assert len(lse) == 1
    others = {tuple(t.shape) for t in saved if t.data_ptr() != x.data_ptr() and t is not lse[0]}
    # T, U, W_d, b_d, scale and what autograd keeps to form T and U from the parameters
    parameter_sized = {(m, C), (m - 1, C), (C, C), (C,), (), (m, 3), (3, C)}
    assert others <= parameter_sized, others - parameter_sized


def test_functional_api_matches_reference_and_checks_input():
    g = torch.Generator().manual_seed(7)
    C, m = 19, 6

    def r(*s):
        return (torch.randn(*s, generator=g) * 0.4).to(DEVICE)

    args = (r(5, 3, C), r(m, C), r(C, C), r(C), r(C, C), r(C), r(()))
    kw = dict(batch_first=False, num_prefix_tokens=2, use_softmax=True)
    assert_sums_close(rein_kernels.rein_layer_fused(*args, **kw), rein_kernels.rein_layer_reference(*args, **kw),
                      terms=C + m)  # sums over the channels and tokens
    with pytest.raises(ValueError, match="rank 3"):
        rein_kernels.rein_layer_fused(args[0][0], *args[1:], **kw)
    with pytest.raises(TypeError, match="x is torch.float16"):
        rein_kernels.rein_layer_fused(args[0].half(), *args[1:], **kw)


def test_precision_follows_the_tf32_switch(monkeypatch, kernels):
    """The interpreter ignores input_precision, so this stands in for the GPU: fp32 dots
    are "ieee" (with the FMA path's configs) unless torch allows tf32, and every launch
    passes that choice on."""
    from _counting import LAUNCHES
    from rein_kernels._common import precision

    op = kernels
    seen = []
    for name in LAUNCHES[op.__name__]:
        tuned = dict(getattr(op, name))
        for path, real in tuned.items():
            class Spy:
                configs = real.configs

                def __getitem__(self, grid, real=real, name=name, path=path):
                    def launch(*args, **kw):
                        seen.append((name, path, kw["PRECISION"]))
                        return real[grid](*args, **kw)
                    return launch

            tuned[path] = Spy()
        monkeypatch.setattr(op, name, tuned)
    layer = rein.ReinLayer(1, 16, 4, token_length=5).to(DEVICE)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow, want in ((False, "ieee"), (True, "tf32")):
            torch.backends.cuda.matmul.allow_tf32 = allow
            assert precision(torch.float32) == want
            assert precision(torch.float16) == precision(torch.bfloat16) == "tf32"
            seen.clear()
            x = torch.randn(2, 5, 16, device=DEVICE, requires_grad=True)
            layer(x, 0, batch_first=True).sum().backward()
            # which config list each kernel takes for fp32 parameters (C = 16: aligned)
            if kernels.__name__.endswith("_v4"):
                path = "small" if want == "ieee" else "tc"
                expected = [("_ROWS_FWD", path, want), ("_ROWS_BWD", path, want)]
            else:
                paths = ("small", "fma") if want == "ieee" else ("tc", "tc")
                expected = [("_LOGITS", paths[0], want), ("_GEMM", paths[1], want)] * 2
            assert sorted(seen) == sorted(expected), seen
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_undefined_gradient_of_out_gives_none_not_a_crash():
    """A node between the layer and the loss may return no gradient for out: the fused
    backward then returns none (lse takes no gradient, so nothing is materialised)."""
    class Drop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    layer = rein.ReinLayer(2, 16, 4, token_length=5).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE, requires_grad=True)
    (Drop.apply(layer(x, 0, batch_first=True)).sum() + x.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # only the direct term
    assert layer.scale.grad is None and layer.learnable_tokens.grad is None
