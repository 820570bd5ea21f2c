"""The Mask2Former head: built on transformers' parts as the official config describes it,
linked to Rein's queries (which receive gradient from it), mmseg's ground truth and
semantic inference, mmdet's initialisation, the recipe's weight-decay groups."""
import math

import pytest
import torch

from _tolerance import assert_sums_close

pytest.importorskip("transformers")
pytest.importorskip("scipy")
pytest.importorskip("timm")

from rein import ReinBackbone  # noqa: E402
from rein.heads import build_head  # noqa: E402
from rein.heads.mask2former import Mask2FormerHead, per_class_masks  # noqa: E402
from rein.train.config import SMALL_MASK2FORMER  # noqa: E402
from rein.model import Segmentor  # noqa: E402
from rein.train.optim import param_groups  # noqa: E402

SMALL = dict(SMALL_MASK2FORMER, query_dims=32, num_points=256)


def _model(seed=0, tokens=7, criterion="static"):
    torch.manual_seed(seed)
    bb = ReinBackbone.from_timm("vit_small_patch14_dinov2", img_size=64, patch_size=8, depth=2, fused=False,
                                token_length=tokens, query_dims=SMALL["query_dims"])
    with torch.no_grad():
        chans = [f.shape[1] for f in bb(torch.zeros(1, 3, 64, 64))[0]]
    return Segmentor(bb, build_head("mask2former", chans, 19, criterion=criterion, **SMALL)).train()


def _labels(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lbl = torch.randint(0, 6, (b, size, size), generator=g)
    lbl[:, :5] = 255
    return lbl


def test_official_sizes():
    """The default head is the official config's: 6 deformable encoder layers, 9 decoder
    layers, 10 predictions, K + 1 classes, FFN widths 1024 / 2048."""
    head = Mask2FormerHead([1024] * 4, 19)
    assert len(head.pixel_decoder.encoder.layers) == 6
    assert len(head.transformer.decoder.layers) == 9
    assert head.pixel_decoder.encoder.layers[0].fc1.out_features == 1024
    assert head.transformer.decoder.layers[0].fc1.out_features == 2048
    assert head.class_predictor.out_features == 20
    assert head.criterion.num_points == 12544 and head.criterion.empty_weight[-1] == 0.1
    assert not any(k.startswith("criterion") for k in head.state_dict())
    assert not hasattr(head.transformer, "queries_embedder")  # Rein's queries replace the learned ones


def test_rein_queries_receive_gradient_from_the_head():
    """The head's loss reaches Rein's query path (transform, merge, the tokens) through
    both links: the query position embedding and querys2feat."""
    model = _model()
    out = model(torch.randn(2, 3, 64, 64))
    assert len(out["class_logits"]) == SMALL["decoder_layers"] + 1
    assert out["class_logits"][0].shape == (2, 7, 20) and out["mask_logits"][0].shape == (2, 7, 16, 16)
    model.head.loss(out, _labels()).backward()
    rein = model.backbone.rein
    for name in ("transform.weight", "merge.weight", "learnable_tokens_a", "learnable_tokens_b"):
        g = dict(rein.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    assert model.head.querys2feat.weight.grad.abs().sum() > 0

    # the position-embedding link alone also carries gradient (querys2feat frozen at zero)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.head.querys2feat.weight.zero_()
    model.head.loss(model(torch.randn(2, 3, 64, 64)), _labels()).backward()
    assert rein.merge.weight.grad.abs().sum() > 0


def test_loss_is_finite_without_any_labelled_pixel():
    model = _model()
    loss = model.head.loss(model(torch.randn(2, 3, 64, 64)), torch.full((2, 64, 64), 255))
    assert torch.isfinite(loss)
    loss.backward()


def test_mask_count_is_mmdets_with_an_image_without_labels():
    """mmdet's mask count: per image num_pos = max(number of masks, 1) (its
    MaskSamplingResult), summed over the batch; the loss's mask and dice terms are divided
    by it. An image with no labelled pixel adds 1 (where counting 0 made those terms
    (n + e) / n times mmdet's). Here for transformers' criterion; the static one's count is
    tested in tests/test_mask2former_loss.py."""
    model = _model(criterion="transformers")
    labels = _labels()
    labels[1] = 255  # the second crop has no labelled pixel
    counts = []
    real = model.head.criterion.get_num_masks

    def spy(class_labels, device):
        counts.append(real(class_labels, device))
        return counts[-1]

    model.head.criterion.get_num_masks = spy
    model.head.loss(model(torch.randn(2, 3, 64, 64)), labels)
    assert {c.item() for c in counts} == {len(torch.unique(labels[0][labels[0] != 255])) + 1}
    assert real([torch.arange(0), torch.arange(0)], torch.device("cpu")).item() == 2


def test_ground_truth_masks_as_mmseg():
    lbl = torch.tensor([[[0, 3, 255], [3, 3, 255]], [[255, 255, 255], [255, 255, 255]]])
    classes, masks = per_class_masks(lbl)
    assert classes[0].tolist() == [0, 3] and classes[1].numel() == 0
    assert masks[0].tolist() == [[[1, 0, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 0]]]
    assert masks[1].shape == (0, 2, 3)


def test_scores_are_fp32_under_autocast():
    model = _model().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 3, 64, 64)).dtype == torch.float32


def test_semantic_scores_as_mmseg_predict():
    """scores[b, k] = sum_q softmax(class_q)[k] * sigmoid(mask_q resized to the input),
    the no-object column dropped: written out here per query."""
    model = _model().eval()
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        scores = model(img)
        model.train()
        raw = model(img)
    cls, masks = raw["class_logits"][-1][0], raw["mask_logits"][-1][0]
    up = torch.nn.functional.interpolate(masks[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    want = sum(cls[q].softmax(-1)[:19, None, None] * up[q].sigmoid()[None] for q in range(cls.shape[0]))
    assert scores.shape == (1, 19, 64, 64)
    # sums over the queries, the softmax's over the classes, the resize's over 4 neighbours
    assert_sums_close(scores[0], want, terms=cls.shape[0] + cls.shape[1] + 4)


def test_initialisation_as_mmdet():
    """mmcv's deformable attention init (offsets on one ray per head, point i at i + 1,
    uniform attention), the decoder's level embedding N(0, 1), no uninitialised memory."""
    head = Mask2FormerHead([48] * 4, 19, **SMALL)
    attn = head.pixel_decoder.encoder.layers[0].self_attn
    H, L, P = attn.n_heads, attn.n_levels, attn.n_points
    bias = attn.sampling_offsets.bias.view(H, L, P, 2)
    for h in range(H):
        t = 2 * math.pi * h / H
        d = torch.tensor([math.cos(t), math.sin(t)])
        d = d / d.abs().max()
        for p in range(P):
            torch.testing.assert_close(bias[h, 1, p], d * (p + 1))
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0
    for name, p in head.named_parameters():
        assert torch.isfinite(p).all() and p.abs().max() < 100, name
    assert 0.5 < head.pixel_decoder.level_embed.std() < 2
    # the decoder's self-attention as one nn.MultiheadAttention: xavier_normal over the packed
    # [3C, C] projection (std sqrt(2 / 4C)), zero biases
    big = Mask2FormerHead([64] * 4, 19)
    sa = big.transformer.decoder.layers[0].self_attn
    w = torch.cat([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight])
    assert abs(w.std().item() / math.sqrt(2 / (4 * 256)) - 1) < 0.02
    for proj in (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj):
        assert proj.bias.abs().sum() == 0


def test_weight_decay_groups_as_the_official_optimizer():
    """No decay: Rein's tokens and scale, every norm, the decoder's level embedding. Decay:
    the rest, including the pixel decoder's level encoding (the official custom key
    "level_embed" does not match it)."""
    model = _model()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert "head.transformer.level_embed.weight" in no and "head.pixel_decoder.level_embed" in yes
    assert {"backbone.rein.scale", "backbone.rein.learnable_tokens_a"} <= no
    assert "head.transformer.decoder.layernorm.weight" in no and "head.pixel_decoder.input_projections.0.1.weight" in no
    assert "head.querys2feat.weight" in yes and "head.class_predictor.bias" in yes


def test_bad_configurations_are_clear():
    with pytest.raises(ValueError, match="multiple of 32"):
        Mask2FormerHead([48] * 4, 19, query_dims=48)
    with pytest.raises(ValueError, match="4 feature maps"):
        Mask2FormerHead([48] * 3, 19)
    head = Mask2FormerHead([48] * 4, 19, **SMALL)
    feats = [torch.randn(1, 48, s, s) for s in (16, 8, 4, 2)]
    with pytest.raises(ValueError, match="link_token_to_query"):
        head(feats, None)
    with pytest.raises(ValueError, match=r"\[m, 32\]"):
        head(feats, torch.randn(5, 64))
    with pytest.raises(ValueError, match="replaced by the real 'mask2former'"):
        build_head("query", [48] * 4, 19)


def _num_masks_worker(rank, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        head = Mask2FormerHead([48] * 4, 19, criterion="transformers", **SMALL)
        labels = [torch.arange(3), torch.arange(0)] if rank == 0 else [torch.arange(1), torch.arange(0)]
        n = head.criterion.get_num_masks(labels, torch.device("cpu"))
        assert n.item() == 3.0, n  # ((3 + 1) + (1 + 1)) / 2, on both processes: an empty image counts 1

        # one all-reduce per loss call, not one per prediction (transformers' default)
        reduced, real = [], dist.all_reduce
        dist.all_reduce = lambda t, *a, **k: reduced.append(t.clone()) or real(t, *a, **k)
        torch.manual_seed(rank)
        feats = [torch.randn(1, 48, s, s) for s in (16, 8, 4, 2)]
        out = head(feats, torch.randn(7, SMALL["query_dims"]))
        lbl = torch.randint(0, 3 + rank, (1, 64, 64))
        head.loss(out, lbl).backward()
        dist.all_reduce = real
        assert len(out["class_logits"]) == SMALL["decoder_layers"] + 1 > 2
        assert len(reduced) == 1 and reduced[0].item() == len(torch.unique(lbl)), reduced
        assert head.criterion._num_masks is None  # nothing kept for the next call

        # the static criterion: one all-reduce of the same count, averaged over the processes
        static = Mask2FormerHead([48] * 4, 19, criterion="static", **SMALL)
        lbl = torch.full((2, 64, 64), 255)
        for c in range(3 if rank == 0 else 1):
            lbl[0, c] = c
        reduced, used, matched_loss = [], [], static.criterion.matched_loss
        static.criterion.matched_loss = lambda *a: used.append(a[-1].item()) or matched_loss(*a)
        dist.all_reduce = lambda t, *a, **k: reduced.append(t.clone()) or real(t, *a, **k)
        static.loss(static([f.repeat(2, 1, 1, 1) for f in feats], torch.randn(7, SMALL["query_dims"])), lbl).backward()
        dist.all_reduce = real
        assert [t.item() for t in reduced] == [4.0 if rank == 0 else 2.0], reduced  # 3 classes + an empty image
        assert used == [3.0], used  # their mean
    finally:
        dist.destroy_process_group()


def test_number_of_masks_is_averaged_over_processes(tmp_path):
    """mmdet's reduce_mean of the mask count (transformers does it only through accelerate),
    once per loss call."""
    torch.multiprocessing.spawn(_num_masks_worker, args=(str(tmp_path / "pg"),), nprocs=2)


def test_forward_has_no_host_sync_in_training():
    """transformers' encoder layer tests isfinite(...).all() in training, and before 5.24 its
    decoder compares a layerdrop draw on the host in each layer: host syncs and graph breaks
    that mmdet's layers do not have. The head keeps those modules in eval mode (their
    dropouts are 0), so the forward compiles to one graph in training."""
    torch.manual_seed(0)
    head = build_head("mask2former", [32] * 4, 5, **dict(SMALL, encoder_layers=2)).train()
    assert head.training and not any(layer.training for layer in head.pixel_decoder.encoder.layers)
    assert not head.transformer.decoder.training
    feats = [torch.randn(2, 32, s, s) for s in (16, 8, 4, 2)]
    explained = torch._dynamo.explain(head)(feats, torch.randn(7, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
