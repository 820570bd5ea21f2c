"""DINOv3 as a Rein backbone: Meta's release layout loaded strictly through timm's converter
(every key placed or accounted for), the attention bias and RoPE periods as Meta's model
applies them, register tokens passed through Rein, training with both heads on a DINOv3
of reduced depth and width, and the per-size numbers the README states."""
import pytest
import torch

timm = pytest.importorskip("timm")
if not timm.is_model("vit_small_patch16_dinov3"):
    pytest.skip(f"timm {timm.__version__} has no DINOv3 models", allow_module_level=True)

from _parity import DEVICE  # noqa: E402
from rein.backbones import ReinBackbone  # noqa: E402
from rein.backbones.timm_backbone import load_timm_checkpoint  # noqa: E402
from rein.checkpoints import CheckpointError  # noqa: E402

TINY = dict(depth=2, embed_dim=64, num_heads=2)  # head dim 32: 8 RoPE periods


def meta_state_dict(depth, dim, heads, ffn="mlp", ffn_ratio=4.0, align=8, qkv_bias=True, local_cls_norm=False,
                    seed=0):
    """Keys and shapes of Meta's ``DinoVisionTransformer`` (facebookresearch/dinov3,
    dinov3/models/vision_transformer.py with the hub's settings), written out: cls token,
    4 ``storage_tokens``, ``mask_token``, a 16-pixel ``patch_embed.proj``, the RoPE periods
    (base 100, ``head_dim // 4`` of them, kept in bfloat16), per block ``norm1``,
    ``attn.qkv`` (with ``bias`` and ``bias_mask``: both zero in the released files),
    ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1/fc2`` or SwiGLU ``mlp.w1/w2/w3``
    (hidden width aligned as its ``SwiGLUFFN``), ``ls2.gamma``; the final ``norm``; and
    ``local_cls_norm`` for the 7B (used on local crops in pretraining only)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    head_dim = dim // heads
    sd = {"cls_token": r(1, 1, dim), "storage_tokens": r(1, 4, dim), "mask_token": torch.zeros(1, dim),
          "patch_embed.proj.weight": r(dim, 3, 16, 16), "patch_embed.proj.bias": r(dim),
          "rope_embed.periods": (100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))).to(torch.bfloat16)}
    hidden = int(dim * ffn_ratio)
    if ffn != "mlp":
        d = int(hidden * 2 / 3)
        hidden = d + (-d % align)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": r(dim), b + "norm1.bias": r(dim), b + "attn.qkv.weight": r(3 * dim, dim),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim), b + "ls1.gamma": r(dim),
                   b + "norm2.weight": r(dim), b + "norm2.bias": r(dim), b + "ls2.gamma": r(dim)})
        if qkv_bias:
            sd.update({b + "attn.qkv.bias": torch.zeros(3 * dim), b + "attn.qkv.bias_mask": torch.zeros(3 * dim)})
        if ffn == "mlp":
            sd.update({b + "mlp.fc1.weight": r(hidden, dim), b + "mlp.fc1.bias": r(hidden),
                       b + "mlp.fc2.weight": r(dim, hidden), b + "mlp.fc2.bias": r(dim)})
        else:
            sd.update({b + "mlp.w1.weight": r(hidden, dim), b + "mlp.w1.bias": r(hidden),
                       b + "mlp.w2.weight": r(hidden, dim), b + "mlp.w2.bias": r(hidden),
                       b + "mlp.w3.weight": r(dim, hidden), b + "mlp.w3.bias": r(dim)})
    sd.update({"norm.weight": r(dim), "norm.bias": r(dim)})
    if local_cls_norm:
        sd.update({"local_cls_norm.weight": r(dim), "local_cls_norm.bias": r(dim)})
    return sd


# Meta name -> timm's Eva name, for the keys that are model tensors (stated here, not
# taken from timm: the code under test uses timm's converter)
RENAMES = [("storage_tokens", "reg_token"), ("ls1.gamma", "gamma_1"), ("ls2.gamma", "gamma_2"),
           ("mlp.w1.", "mlp.fc1_g."), ("mlp.w2.", "mlp.fc1_x."), ("mlp.w3.", "mlp.fc2.")]
# Meta keys with no tensor of their own in timm's model: pretraining only (mask token, the
# 7B's local-crop norm), checked and pinned (RoPE periods), zero (the qkv biases)
NOT_PLACED = ("mask_token", "rope_embed.periods", "attn.qkv.bias", "attn.qkv.bias_mask", "local_cls_norm.")


def timm_name(meta_key):
    for a, b in RENAMES:
        meta_key = meta_key.replace(a, b)
    return meta_key


@pytest.mark.parametrize("name,meta_kw", [
    ("vit_small_patch16_dinov3", dict(ffn="mlp", ffn_ratio=4.0, qkv_bias=True)),            # ViT-S/B/L
    ("vit_7b_patch16_dinov3", dict(ffn="swiglu64", ffn_ratio=3.0, align=64, qkv_bias=False,  # ViT-7B
                                   local_cls_norm=True)),
])
def test_meta_release_layout_loads_strictly_every_key_placed(tmp_path, name, meta_kw):
    dims = dict(depth=2, embed_dim=128, num_heads=2) if "7b" in name else TINY
    model = timm.create_model(name, pretrained=False, img_size=64, **dims)
    timm_periods = model.rope.periods.clone()
    sd = meta_state_dict(dims["depth"], dims["embed_dim"], dims["num_heads"], **meta_kw)
    torch.save(sd, tmp_path / "dinov3_meta.pth")
    load_timm_checkpoint(model, str(tmp_path / "dinov3_meta.pth"))  # strict, or it raises

    got = model.state_dict()
    placed = {timm_name(k): k for k in sd if not any(s in k for s in NOT_PLACED)}
    assert set(placed) == set(got), "every model tensor comes from exactly one file key, and the reverse"
    for k, meta_k in placed.items():
        assert torch.equal(got[k], sd[meta_k].to(got[k].dtype)), k
    # RoPE: the file's periods (bfloat16 values), not timm's float32 ones, and kept through a cast
    want = sd["rope_embed.periods"].float()
    assert torch.equal(model.rope.periods, want) and not torch.equal(timm_periods, want)
    torch.testing.assert_close(timm_periods, want, rtol=2 ** -8, atol=0)  # the same up to bf16 rounding
    model.to(torch.bfloat16)
    assert model.rope.periods.dtype == torch.float32 and torch.equal(model.rope.periods, want)


def test_qkv_bias_is_the_one_meta_applies(tmp_path):
    """Meta's attention adds qkv.bias * bias_mask; timm's _qkvb models get exactly that
    (its converter alone would take the unmasked bias), and a model without q/v biases
    refuses a non-zero one rather than dropping it."""
    C = TINY["embed_dim"]
    sd = meta_state_dict(TINY["depth"], C, TINY["num_heads"])
    for i in range(TINY["depth"]):
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.randn(3 * C)
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(C), torch.zeros(C), torch.ones(C)])
    model = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, img_size=64, **TINY)
    load_timm_checkpoint(model, sd)
    for i in range(TINY["depth"]):
        bias = sd[f"blocks.{i}.attn.qkv.bias"]
        assert torch.equal(model.blocks[i].attn.q_bias, bias[:C]) and torch.equal(model.blocks[i].attn.v_bias,
                                                                                   bias[2 * C:])
    released = dict(sd, **{f"blocks.{i}.attn.qkv.bias_mask": torch.zeros(3 * C) for i in range(TINY["depth"])})
    load_timm_checkpoint(model, released)  # a zero mask: no bias at all, whatever the bias holds
    assert all(not b.attn.q_bias.any() and not b.attn.v_bias.any() for b in model.blocks)
    plain = timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=64, **TINY)
    load_timm_checkpoint(plain, released)
    torch.save(sd, tmp_path / "biased.pth")
    with pytest.raises(CheckpointError, match=r"biased.pth does not fit Eva: blocks.0.attn.qkv.bias: .*non-zero "
                                              r"query/value biases.*_qkvb variant"):
        load_timm_checkpoint(plain, str(tmp_path / "biased.pth"))


def test_periods_of_another_rope_are_refused():
    sd = meta_state_dict(TINY["depth"], TINY["embed_dim"], TINY["num_heads"])
    sd["rope_embed.periods"] = sd["rope_embed.periods"] * 1.1
    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, img_size=64, **TINY)
    with pytest.raises(ValueError, match="another RoPE configuration"):
        load_timm_checkpoint(model, sd)


def test_registers_pass_through_rein_as_prefix_tokens():
    """Rein refines the patch tokens of every block and passes the cls token and the 4
    registers through unchanged (the count taken from timm's model); with Rein's scale at
    zero the backbone is timm's own, RoPE included (tests/test_backbones.py, family dinov3)."""
    torch.manual_seed(0)
    bb = ReinBackbone.from_timm("vit_small_patch16_dinov3", img_size=64, token_length=7, lora_dim=4,
                                **TINY).to(DEVICE)
    assert bb.backbone.num_prefix_tokens == 5 == 1 + bb.backbone.reg_token.shape[1]
    bb.rein.scale.data.fill_(0.5)
    seen = {}
    for i, blk in enumerate(bb.backbone.blocks):  # the block's own output, and after Rein
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("raw", i), out.clone()), prepend=True)
        blk.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("rein", i), out.clone()))
    with torch.no_grad():
        bb(torch.randn(2, 3, 64, 80, device=DEVICE))
    for i in range(len(bb.backbone.blocks)):
        raw, refined = seen["raw", i], seen["rein", i]
        assert raw.shape == (2, 5 + 4 * 5, TINY["embed_dim"])
        assert torch.equal(refined[:, :5], raw[:, :5])
        assert ((refined[:, 5:] - raw[:, 5:]).abs().amax(-1) > 0).all(), "every patch token is refined"


@pytest.mark.parametrize("head", ["light", "mask2former"])
def test_a_reduced_dinov3_trains_with_each_head_fused(tmp_path, monkeypatch, capsys, head):
    """``rein.train --backbone vit_small_patch16_dinov3`` on the synthetic job, timm's
    architecture at reduced depth and width (random weights), Rein's fused kernels (on a
    CPU through Triton's interpreter)."""
    import rein_kernels
    from rein.train.config import SYNTHETIC
    from rein.train.loop import main

    if not rein_kernels.is_available(torch.empty(0, device=DEVICE)):
        pytest.skip("the fused kernels cannot run here")
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: create(name, **(
        dict(kw, **TINY) if name == "vit_small_patch16_dinov3" else kw)))
    monkeypatch.setitem(SYNTHETIC, "val_size", 2)  # evaluation is not what is tested here
    out = tmp_path / head
    assert main(["--backbone", "vit_small_patch16_dinov3", "--head", head, "--max-iters", "2", "--crop", "64",
                 "--batch-size", "2", "--workers", "0", "--fused", "--device", DEVICE, "--out", str(out)]) == 0
    assert "fused Rein" in capsys.readouterr().out
    ck = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ck["config"]["backbone"] == "vit_small_patch16_dinov3" and ck["iteration"] == 2
    assert ck["rein"]["rein.learnable_tokens_a"].shape[0] == TINY["depth"]
    assert all(torch.isfinite(torch.tensor(ck["losses"])))


# The README's DINOv3 table, per size: blocks, width, Rein's trainable parameters (m = 100
# tokens, rank 16, queries 256), the Mask2Former head's, the frozen backbone's
SIZES = {
    "vit_small_patch16_dinov3": (12, 384, 684_033, 19_924_436, 21_586_944),
    "vit_base_patch16_dinov3": (12, 768, 1_741_569, 20_317_652, 85_641_216),
    "vit_large_patch16_dinov3": (24, 1024, 2_990_081, 20_579_796, 303_079_424),
    "vit_huge_plus_patch16_dinov3": (32, 1280, 4_510_721, 20_841_940, 840_509_440),
    "vit_7b_patch16_dinov3": (40, 4096, 37_493_761, 23_725_524, 6_716_030_976),
}


@pytest.mark.parametrize("name", list(SIZES))
def test_the_readme_counts_per_size(name):
    pytest.importorskip("transformers")
    from rein.heads import build_head

    with torch.device("meta"):  # shapes only: no memory, no initialisation worth the name
        bb = ReinBackbone.from_timm(name, img_size=512, patch_size=16, fused=False)
        head = build_head("mask2former", bb.feature_info.channels(), 19)
    blocks, C, rein, m2f, frozen = SIZES[name]
    assert (len(bb.backbone.blocks), bb.backbone.embed_dim, bb.backbone.num_prefix_tokens) == (blocks, C, 5)
    assert sum(p.numel() for p in bb.rein.parameters() if p.requires_grad) == rein
    assert sum(p.numel() for p in head.parameters() if p.requires_grad) == m2f
    assert sum(p.numel() for p in bb.backbone.parameters()) == frozen


def test_meta_files_go_through_backbone_checkpoint_in_training_too():
    from rein.train.config import parse_args

    args = parse_args(["--source", "gtav=/data/gtav", "--backbone", "vit_7b_patch16_dinov3",
                       "--backbone-checkpoint", "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth"])
    assert args.checkpoint == "dinov3_vit7b16_pretrain_lvd1689m-a955f4ea.pth" and args.patch_size == 16


def test_a_timm_without_dinov3_is_one_line(monkeypatch):
    from rein.errors import UsageError
    from rein.model import check_backbone

    monkeypatch.setattr(timm, "is_model", lambda name: False)
    with pytest.raises(UsageError, match=r"^--backbone 'vit_7b_patch16_dinov3' is not a timm model name; timm "
                                         r"\S+ has no DINOv3 models: they need timm >= 1\.0\.20"):
        check_backbone("vit_7b_patch16_dinov3", 16, 512)
    with pytest.raises(ValueError, match="has no DINOv3 models"):
        ReinBackbone.from_timm("vit_7b_patch16_dinov3")
