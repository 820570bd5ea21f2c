"""The Mask2Former loss on static shapes (``rein.heads.mask2former_loss``) against
transformers' ``Mask2FormerLoss`` (the head's ``criterion="transformers"``): given the same
random points, the same matching, loss and gradients; one graph per device stage and no
recompiles as the classes present change; far fewer host operations. The matching on the
device gives the host's, and with it the loss is one graph."""
import collections

import pytest
import torch

from _counting import Count
from _tolerance import assert_sums_close

pytest.importorskip("transformers")
pytest.importorskip("scipy")

from rein.heads.mask2former import Mask2FormerHead  # noqa: E402
from rein.heads.mask2former_loss import StaticMask2FormerLoss  # noqa: E402

K, POINTS = 19, 97  # the recipe's classes; a prime number of points
# A gradient sums over the sampled points (4 bilinear neighbours each, and the dice loss's
# sums over the points) and the classes
TERMS = 5 * POINTS + K + 1


# where the matching kernel runs: natively on a GPU, else through the interpreter
KERNELS = "cuda" if torch.cuda.is_available() else "cpu"


def _predictions(L=4, B=3, Q=7, h=11, w=13, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    cls = [(2 * torch.randn(B, Q, K + 1, generator=g)).to(device).requires_grad_() for _ in range(L)]
    msk = [(3 * torch.randn(B, Q, h, w, generator=g)).to(device).requires_grad_() for _ in range(L)]
    return cls, msk


def _labels(B=3, H=44, W=52, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lbl = torch.randint(0, classes, (B, H, W), generator=g) * 3 % K  # ids spread over 0..18
    lbl[:, :5] = 255
    lbl[-1] = 255  # an image without a labelled pixel
    return lbl


@pytest.fixture
def same_points(monkeypatch):
    """torch.rand returns, for any shape [..., n, 2], one fixed set of n points repeated:
    both implementations then sample every mask at the same points, however their draws
    are shaped."""
    real, cache = torch.rand, {}

    def rand(*size, device=None, **kw):
        size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        n = size[-2]
        if n not in cache:
            cache[n] = real(n, 2, generator=torch.Generator().manual_seed(n))
        return cache[n].to(device).expand(size).contiguous()

    monkeypatch.setattr(torch, "rand", rand)


def _heads(tokens):
    torch.manual_seed(0)
    kw = dict(query_dims=32, num_heads=4, encoder_layers=1, decoder_layers=3, encoder_ffn_dims=64,
              decoder_ffn_dims=64, num_points=POINTS)
    return (Mask2FormerHead([16] * 4, K, criterion="static", **kw),
            Mask2FormerHead([16] * 4, K, criterion="transformers", **kw))


@pytest.mark.parametrize("queries", [7, 3])  # more queries than classes present, and fewer
def test_equals_transformers_given_the_same_points(same_points, queries):
    static, reference = _heads(queries)
    cls, msk = _predictions(Q=queries)
    labels = _labels()
    out = {"class_logits": tuple(cls), "mask_logits": tuple(msk)}
    got = static.loss(out, labels)
    grads = torch.autograd.grad(got, cls + msk)
    want = reference.loss(out, labels)
    want_grads = torch.autograd.grad(want, cls + msk)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)  # a sum of positive terms: relative
    for i, (a, b) in enumerate(zip(grads, want_grads)):
        assert_sums_close(a, b, terms=TERMS, name=f"gradient {i}")
        assert b.abs().sum() > 0  # every prediction takes part


def test_matching_equals_transformers(same_points):
    """The matched pairs of every prediction and image are transformers' matcher's."""
    static, reference = _heads(7)
    cls, msk = _predictions()
    labels = _labels()
    L, B, Q = len(cls), cls[0].shape[0], cls[0].shape[1]
    packed = static.criterion.match(static.criterion.costs(cls, msk, labels), (L, B, Q))
    query_of, matched, class_of = packed[:-1].split([L * B * K, L * B * K, L * B * Q])
    query_of, matched, class_of = query_of.view(L, B, K), matched.view(L, B, K), class_of.view(L, B, Q)
    classes = [torch.unique(lbl[lbl != 255]) for lbl in labels]
    masks = [(lbl[None] == c[:, None, None]).float() for lbl, c in zip(labels, classes)]
    for i in range(L):
        pairs = reference.criterion.matcher(msk[i].detach(), cls[i].detach(), masks, classes)
        for b, (q, j) in enumerate(pairs):
            k = classes[b][j]
            assert matched[i, b].nonzero().flatten().tolist() == sorted(k.tolist())
            assert query_of[i, b, k].tolist() == q.tolist()
            assert class_of[i, b, q].tolist() == k.tolist()
            assert (class_of[i, b] < K).sum() == len(q)  # every other query: no object
    # mmdet's mask count: max(classes present, 1) per image, the empty image counting 1
    assert packed[-1].item() == sum(max(len(c), 1) for c in classes) == len(classes[0]) + len(classes[1]) + 1


def test_is_random_where_transformers_is():
    """Without the fixed points the two draw their points differently, so the values differ
    a little, and a repeated call differs (its points are fresh): nothing is cached."""
    static, reference = _heads(7)
    cls, msk = _predictions()
    out = {"class_logits": tuple(cls), "mask_logits": tuple(msk)}
    labels = _labels()
    a, b, ref = static.loss(out, labels).item(), static.loss(out, labels).item(), reference.loss(out, labels).item()
    assert a != b and a == pytest.approx(ref, rel=0.05) and b == pytest.approx(ref, rel=0.05)


def test_device_stages_are_one_graph_each_and_compile_once():
    """With the matching on the host, each device stage is one graph without a break, and 20 steps with different classes
    present (1 to 19, and none) compile each stage once: every shape is static."""
    from torch._dynamo.testing import CompileCounter

    loss = StaticMask2FormerLoss(K, POINTS, matcher="host")
    cls, msk = _predictions()
    labels = _labels()
    packed = loss.match(loss.costs(cls, msk, labels), (len(cls), *cls[0].shape[:2]))
    n = packed[-1].float()
    for stage, args in ((loss.costs, (cls, msk, labels)), (loss.matched_loss, (cls, msk, labels, packed, n))):
        explained = torch._dynamo.explain(stage)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

    torch._dynamo.reset()
    counter = CompileCounter()
    run = loss.compiled(backend=counter)
    g = torch.Generator().manual_seed(1)
    for step in range(20):
        lbl = torch.randint(0, step + 1, labels.shape, generator=g) if step < 19 else torch.full_like(labels, 255)
        value = run(cls, msk, lbl)
        assert torch.isfinite(value)
    assert counter.frame_count == 2, counter.frame_count  # costs and matched_loss, once each
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("matcher", ["host", "device"])
def test_inductor_compiled_stages_equal_eager(same_points, matcher):
    """The stages as Inductor compiles them (the default backend, as the captured step uses
    it, here generating C++; with the matching on the device, one graph calling the
    matching op): the same loss and gradients as eager, given the same points (the patched
    torch.rand is traced into the graphs as a constant)."""
    torch._dynamo.reset()
    device = KERNELS if matcher == "device" else "cpu"
    loss = StaticMask2FormerLoss(K, POINTS, matcher=matcher).to(device)
    cls, msk = _predictions(L=2, B=2, Q=23, device=device)
    labels = _labels(B=2).to(device)
    got = loss.compiled()(cls, msk, labels)
    grads = torch.autograd.grad(got, cls + msk)
    want = loss(cls, msk, labels)
    want_grads = torch.autograd.grad(want, cls + msk)
    torch._dynamo.reset()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for i, (a, b) in enumerate(zip(grads, want_grads)):
        assert_sums_close(a, b, terms=TERMS, name=f"gradient {i}")


def test_host_operations_do_not_grow_with_the_classes_present():
    """Dispatcher calls of one loss forward + backward (10 predictions, batch 4, 12 classes
    present per image): a fixed number for the static loss, against a number that grows with
    predictions x images x classes for transformers'. Counted when written (torch 2.14, CPU):
    378 against 3,805; 399 since the host matching packs as the device one does, in torch."""
    static, reference = _heads(7)
    cls, msk = _predictions(L=10, B=4)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 12, (4, 44, 52), generator=g)
    out = {"class_logits": tuple(cls), "mask_logits": tuple(msk)}
    counts = []
    for head in (static, reference):
        calls = collections.Counter()
        with Count(calls, collections.Counter(), {"on": True}):
            head.loss(out, labels).backward()
        counts.append(sum(calls.values()))
    print("dispatcher calls per loss (static, transformers):", counts)
    assert counts[0] * 5 < counts[1], counts
    assert counts[0] <= 450, counts


def test_bad_criterion_is_clear():
    with pytest.raises(ValueError, match="criterion 'mmdet': choose one of static, transformers"):
        Mask2FormerHead([16] * 4, K, criterion="mmdet")


def _packed(loss, cls, msk, labels, on_device: bool):
    costs = loss.costs(cls, msk, labels)
    shape = (len(cls), *cls[0].shape[:2])
    return (loss.match_on_device if on_device else loss.match)(costs, shape)


@pytest.mark.parametrize("queries", [23, 20])  # more queries than classes (19), and one more
def test_device_matching_equals_the_hosts(same_points, queries):
    """``match_on_device`` (``rein_kernels.assign``) packs what ``match`` (scipy) packs, for
    labels with a few classes, all 19, and none; and the loss and its gradients follow."""
    loss = StaticMask2FormerLoss(K, POINTS, matcher="device").to(KERNELS)
    cls, msk = _predictions(B=3, Q=queries, device=KERNELS)
    g = torch.Generator().manual_seed(2)
    labels = _labels()
    labels[1] = torch.randint(0, K, labels[1].shape, generator=g)  # every class present
    labels = labels.to(KERNELS)
    packed = _packed(loss, cls, msk, labels, on_device=True)
    assert torch.equal(packed, _packed(loss, cls, msk, labels, on_device=False))
    assert packed[-1].item() == len(labels[0].unique()) - 1 + K + 1  # the 255s are no class
    assert packed.device == labels.device
    got = loss(cls, msk, labels)
    loss.matcher = "host"
    want = loss(cls, msk, labels)
    assert torch.equal(got, want)


def test_matcher_choice():
    """"auto" matches on the device only on CUDA with fewer classes than queries; a bad name
    is a clear error."""
    cls = torch.zeros(2, 23, K + 1)
    assert not StaticMask2FormerLoss(K, POINTS).matches_on_device(cls)  # a CPU tensor
    assert StaticMask2FormerLoss(K, POINTS, matcher="device").matches_on_device(cls)
    assert not StaticMask2FormerLoss(K, POINTS, matcher="host").matches_on_device(cls)
    if torch.cuda.is_available():
        assert StaticMask2FormerLoss(K, POINTS).matches_on_device(cls.cuda())
        assert not StaticMask2FormerLoss(K, POINTS).matches_on_device(cls[:, :K].cuda())
    with pytest.raises(ValueError, match="matcher 'gpu': choose one of auto, device, host"):
        StaticMask2FormerLoss(K, POINTS, matcher="gpu")
    assert Mask2FormerHead([16] * 4, K, query_dims=32, num_heads=4, encoder_layers=1, decoder_layers=1,
                           matcher="host").criterion.matcher == "host"


def test_device_matched_loss_is_one_graph_and_compiles_once():
    """With the matching on the device the loss has no host stage: one graph without a
    break, compiled once over steps with 1, 2, 7 and 19 classes present, and none."""
    from torch._dynamo.testing import CompileCounter

    loss = StaticMask2FormerLoss(K, POINTS, matcher="device").to(KERNELS)
    cls, msk = _predictions(L=2, B=2, Q=23, device=KERNELS)
    labels = _labels(B=2).to(KERNELS)
    explained = torch._dynamo.explain(loss._on_device)(cls, msk, labels)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

    torch._dynamo.reset()
    counter = CompileCounter()
    run = loss.compiled(backend=counter)
    g = torch.Generator().manual_seed(1)
    for classes in (1, 2, 7, 19, 0):
        lbl = torch.randint(0, classes, labels.shape, generator=g) if classes else torch.full_like(labels, 255)
        assert torch.isfinite(run(cls, msk, lbl))
    assert counter.frame_count == 1, counter.frame_count
    torch._dynamo.reset()
