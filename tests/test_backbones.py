"""ReinBackbone over timm models: pyramid, frozen backbone, Rein-only checkpoints,
and loading checkpoints in timm's and in DINOv2's release format."""
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.layers import resample_abs_pos_embed, resample_patch_embed  # noqa: E402

from _parity import DEVICE  # noqa: E402
from rein.backbones import ReinBackbone, default_out_indices  # noqa: E402

IMG = 64
# ViT-S sized members of each family, kept shallow so the interpreter stays quick.
FAMILIES = {
    "dinov2": ("vit_small_patch14_dinov2", dict(depth=4)),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(depth=4)),
    "eva02": ("eva02_small_patch14_224", dict(depth=4)),
    "clip": ("vit_base_patch16_clip_224", dict(depth=4, embed_dim=384, num_heads=6)),
    "sam": ("samvit_base_patch16", dict(depth=4, embed_dim=384, num_heads=6, window_size=2,
                                        global_attn_indexes=(1, 3))),
    "convnext": ("convnext_atto", {}),
}
if timm.is_model("vit_small_patch16_dinov3"):  # DINOv3 (timm >= 1.0.20): 4 registers, RoPE
    FAMILIES["dinov3"] = ("vit_small_patch16_dinov3", dict(depth=4, embed_dim=128, num_heads=2))


def build(family, fused=True, **kw):
    name, timm_kw = FAMILIES[family]
    torch.manual_seed(0)
    return ReinBackbone.from_timm(name, img_size=IMG, token_length=7, lora_dim=4, fused=fused,
                                  **{**timm_kw, **kw}).to(DEVICE)


def plain_timm(bb, family):
    """The same backbone without Rein: a fresh timm model with the same weights."""
    name, timm_kw = FAMILIES[family]
    kw = dict(timm_kw)
    if family != "convnext":
        kw.update(img_size=IMG, patch_size=16)
        if family != "sam":
            kw["dynamic_img_size"] = True
    model = timm.create_model(name, pretrained=False, **kw).eval().to(DEVICE)
    model.load_state_dict(bb.backbone.state_dict())
    return model


def rein_layers(bb):
    return list(bb.rein) if bb.family == "convnext" else [bb.rein]


def test_default_out_indices():
    assert default_out_indices(24) == [7, 11, 15, 23]
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(4) == [0, 1, 2, 3]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zero_scale_gives_timm_features(family):
    bb = build(family)
    for r in rein_layers(bb):
        r.scale.data.zero_()
    ref_model = plain_timm(bb, family)
    images = torch.randn(2, 3, IMG, IMG + 16, device=DEVICE)  # non-square
    with torch.no_grad():
        feats, queries = bb(images)
        ref = ref_model.forward_intermediates(images, indices=sorted(set(bb.out_indices)), norm=False,
                                              output_fmt="NCHW", intermediates_only=True)
    ref = dict(zip(sorted(set(bb.out_indices)), ref))
    H, W = images.shape[-2:]
    assert [f.shape[-2:] for f in feats] == [(H // s, W // s) for s in (4, 8, 16, 32)]
    assert torch.equal(feats[2], ref[bb.out_indices[2]])  # stride 16: timm's own map
    for level, stride in enumerate((4, 8, 16, 32)):
        m = ref[bb.out_indices[level]]
        factor = (H / m.shape[-2]) / stride
        expected = m if factor == 1 else F.interpolate(m, scale_factor=factor, mode="bilinear", align_corners=False)
        torch.testing.assert_close(feats[level], expected)
    assert queries.shape == (7, 256)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_rein_trains(family):
    bb = build(family)
    bb.train()
    assert bb.training and not bb.backbone.training
    assert all(not m.training for m in bb.backbone.modules())
    before = {k: v.clone() for k, v in bb.backbone.state_dict().items()}
    trainable = [p for p in bb.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for r in rein_layers(bb) for p in r.parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    feats, queries = bb(torch.randn(2, 3, IMG, IMG, device=DEVICE))
    (sum(f.square().mean() for f in feats) + queries.square().mean()).backward()
    assert all(p.grad is None for p in bb.backbone.parameters())
    for r in rein_layers(bb):
        tok_grad = r.learnable_tokens_a.grad
        # every block up to the deepest output level (every block of every ConvNeXt stage,
        # each with its own layer of its stage's ReinLayer) gets a gradient on its own tokens
        last = max(bb.out_indices) if family != "convnext" else r.num_layers - 1
        assert all(tok_grad[l].abs().sum() > 0 for l in range(last + 1))
        assert r.mlp_delta_f.weight.grad.abs().sum() > 0
    if family == "convnext":  # as the official ReinsConvNeXt: a layer per block of the stage
        assert [r.num_layers for r in bb.rein] == [len(s.blocks) for s in bb.backbone.stages]
    opt.step()
    after = bb.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", ["dinov2_reg", "sam", "convnext"])
def test_fused_and_reference_paths_agree(family):
    """Compared on what Rein adds: at the init's scale 1e-3 it moves the features by
    ~1e-3, so a bound on the features themselves would hide a missing adapter."""
    fused, ref, off = build(family, fused=True), build(family, fused=False), build(family, fused=False)
    ref.load_state_dict(fused.state_dict())
    off.load_state_dict(fused.state_dict())
    for r in rein_layers(off):
        r.scale.data.zero_()
    images = torch.randn(1, 3, IMG, IMG, device=DEVICE)
    with torch.no_grad():
        (f1, q1), (f2, q2), (f0, _) = fused(images), ref(images), off(images)
    for a, b, base in zip(f1, f2, f0):
        delta = b - base
        assert delta.abs().max() > 1e-5  # Rein does move the features
        torch.testing.assert_close(a - base, delta, rtol=0, atol=1e-3 * delta.abs().max().item())
    torch.testing.assert_close(q1, q2)


def test_deepcopy_and_pickle_keep_their_own_rein(tmp_path):
    import copy

    bb = build("dinov2")
    images = torch.randn(1, 3, IMG, IMG, device=DEVICE)
    with torch.no_grad():
        before = bb(images)[0][2]
        twin = copy.deepcopy(bb)
        twin.rein.scale.fill_(3.0)  # must change the copy only
        assert torch.equal(bb(images)[0][2], before)
        assert not torch.allclose(twin(images)[0][2], before)
        torch.save(twin, tmp_path / "whole.pt")
        again = torch.load(tmp_path / "whole.pt", weights_only=False)
        torch.testing.assert_close(again(images)[0][2], twin(images)[0][2])


def test_rein_only_checkpoint_roundtrip(tmp_path):
    bb = build("dinov2")
    sd = bb.rein_state_dict()
    assert sd.keys() == {f"rein.{k}" for k in bb.rein.state_dict()}
    torch.save(sd, tmp_path / "rein.pth")
    other = build("dinov2")
    with torch.no_grad():
        other.rein.scale.fill_(5.0)
    other.load_rein_state_dict(torch.load(tmp_path / "rein.pth", map_location=DEVICE))
    for k, v in bb.rein.state_dict().items():
        assert torch.equal(v, other.rein.state_dict()[k])
    with pytest.raises(ValueError, match="not Rein parameters"):
        other.load_rein_state_dict({**sd, "backbone.cls_token": torch.zeros(1)})


def _dinov2_release_state(registers: bool):
    """A checkpoint in the DINOv2 release layout, written from a timm model (patch 14)."""
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    torch.manual_seed(1)
    src = timm.create_model(name, pretrained=False, img_size=70, depth=4)  # 5 x 5 patches
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    C = sd["cls_token"].shape[-1]
    if registers:  # release: cls and registers apart, pos_embed includes the cls position
        pos0 = torch.randn(1, 1, C)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - pos0
        sd["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
    sd["mask_token"] = torch.randn(1, C)
    return sd


def _official_converter(release):
    """The official Rein converter (tools/convert_models/convert_dinov2_*.py), as
    docs/official_rein_reading.md (section 1) states it: plain bicubic F.interpolate, align_corners=False, no
    antialias, no gain fix; patch kernel 14 -> 16; position grid to the model's (5 x 5 ->
    4 x 4 here), the cls position kept."""
    w = F.interpolate(release["patch_embed.proj.weight"].float(), size=(16, 16), mode="bicubic",
                      align_corners=False)
    pos = release["pos_embed"]
    C = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, 5, 5, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, C)
    return w, pos[:, :1], grid


@pytest.mark.parametrize("registers", [False, True])
def test_official_conversion_is_the_official_converter_bit_for_bit(tmp_path, registers):
    release = _dinov2_release_state(registers)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(release, path)
    bb = build("dinov2_reg" if registers else "dinov2", checkpoint=str(path))  # default: official
    got = {k: v.cpu() for k, v in bb.backbone.state_dict().items()}
    w, cls_pos, grid = _official_converter(release)
    assert torch.equal(got["patch_embed.proj.weight"], w)
    if registers:  # timm keeps no cls position: it folds it into the cls token, as before
        assert torch.equal(got["cls_token"], release["cls_token"] + cls_pos)
        assert torch.equal(got["pos_embed"], grid)
    else:
        assert torch.equal(got["pos_embed"], torch.cat([cls_pos, grid], dim=1))
    # and it is not what timm's own conversion gives
    timm_bb = build("dinov2_reg" if registers else "dinov2", checkpoint=str(path), conversion="timm")
    assert not torch.allclose(timm_bb.backbone.patch_embed.proj.weight.cpu(), w)


@pytest.mark.parametrize("registers", [False, True])
def test_official_conversion_of_timm_format_dinov2_files(registers):
    """timm's own DINOv2 files (no mask_token) get the official resizes too; a register
    model's file has no cls position in its grid."""
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    torch.manual_seed(2)
    src = timm.create_model(name, pretrained=False, img_size=70, depth=4).state_dict()  # 5 x 5 patches
    bb = build("dinov2_reg" if registers else "dinov2", checkpoint=src)
    got = {k: v.cpu() for k, v in bb.backbone.state_dict().items()}
    w = F.interpolate(src["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.equal(got["patch_embed.proj.weight"], w)
    pos = src["pos_embed"]
    C, prefix = pos.shape[-1], 0 if registers else 1
    grid = pos[:, prefix:].reshape(1, 5, 5, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, C)
    assert torch.equal(got["pos_embed"], torch.cat([pos[:, :prefix], grid], dim=1))


def test_official_conversion_of_eva02_release_files(tmp_path):
    """An EVA02 file as released (wrapped in "model", with the MIM mask_token): the
    official convert_eva2_512x512.py's resizes (plain bicubic kernel and grid, the cls
    position kept), bit for bit; not timm's."""
    torch.manual_seed(3)
    src = timm.create_model("eva02_small_patch14_224", pretrained=False, img_size=70, depth=4).state_dict()
    release = {**src, "mask_token": torch.randn(1, 1, src["cls_token"].shape[-1])}
    torch.save({"model": release}, tmp_path / "eva02_S_pt.pt")
    got = {k: v.cpu() for k, v in build("eva02", checkpoint=str(tmp_path / "eva02_S_pt.pt")).backbone.state_dict().items()}
    w = F.interpolate(src["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    pos = src["pos_embed"]
    C = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, 5, 5, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, C)
    assert torch.equal(got["patch_embed.proj.weight"], w)
    assert torch.equal(got["pos_embed"], torch.cat([pos[:, :1], grid], dim=1))
    assert torch.equal(got["blocks.2.mlp.fc2.weight"], src["blocks.2.mlp.fc2.weight"])
    timm_bb = build("eva02", checkpoint=str(tmp_path / "eva02_S_pt.pt"), conversion="timm")
    assert not torch.allclose(timm_bb.backbone.patch_embed.proj.weight.cpu(), w)


def _openai_clip_state(model) -> dict:
    """A timm CLIP ViT's weights under OpenAI's names (the inverse of timm's
    _convert_openai_clip), as in OpenAI's ViT-L-14.pt state dict."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "cls_token":
            out["visual.class_embedding"] = v[0, 0]
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
        elif k == "head.weight":
            out["visual.proj"] = v.t()
        elif k == "head.bias":
            continue
        else:
            k = (k.replace("patch_embed.proj", "conv1").replace("blocks.", "transformer.resblocks.")
                 .replace("norm_pre", "ln_pre").replace("attn.qkv.", "attn.in_proj_").replace("attn.proj", "attn.out_proj")
                 .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj").replace(".norm1", ".ln_1")
                 .replace(".norm2", ".ln_2"))
            out["visual." + ("ln_post." + k[5:] if k.startswith("norm.") else k)] = v
    return out


def test_official_conversion_of_openai_clip_files():
    """OpenAI CLIP weights as the official CLIP backbone loads them: conv1 bicubic 14 -> 16,
    the position grid bilinear (class position kept), no antialias; bit for bit."""
    name, kw = FAMILIES["clip"]
    torch.manual_seed(4)
    src_model = timm.create_model(name, pretrained=False, img_size=70, patch_size=14, **kw)
    state = _openai_clip_state(src_model)
    got = {k: v.cpu() for k, v in build("clip", checkpoint=state).backbone.state_dict().items()}
    w = F.interpolate(state["visual.conv1.weight"], size=(16, 16), mode="bicubic", align_corners=False)
    pos = state["visual.positional_embedding"]
    C = pos.shape[-1]
    grid = pos[1:].reshape(1, 5, 5, C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(16, C)
    assert torch.equal(got["patch_embed.proj.weight"], w)
    assert torch.equal(got["pos_embed"][0], torch.cat([pos[:1], grid]))
    assert torch.equal(got["cls_token"].flatten(), state["visual.class_embedding"])
    assert torch.equal(got["blocks.1.attn.qkv.weight"], state["visual.transformer.resblocks.1.attn.in_proj_weight"])
    timm_bb = build("clip", checkpoint=state, conversion="timm")
    assert not torch.allclose(timm_bb.backbone.pos_embed.cpu(), got["pos_embed"])


def test_conversion_flag_is_checked():
    with pytest.raises(ValueError, match="conversion must be one of"):
        build("dinov2", checkpoint=_dinov2_release_state(False), conversion="nearest")


@pytest.mark.parametrize("registers", [False, True])
def test_dinov2_release_checkpoint_loads(tmp_path, registers):
    release = _dinov2_release_state(registers)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(release, path)
    fam = "dinov2_reg" if registers else "dinov2"
    bb = build(fam, checkpoint=str(path), conversion="timm")
    got = {k: v.cpu() for k, v in bb.backbone.state_dict().items()}
    for k, v in release.items():
        if k.startswith("blocks.") or k.startswith("norm."):
            assert torch.equal(got[k], v), k  # block weights bit-identical
    w16 = resample_patch_embed(release["patch_embed.proj.weight"], [16, 16], interpolation="bicubic", antialias=True)
    torch.testing.assert_close(got["patch_embed.proj.weight"], w16)
    if registers:
        torch.testing.assert_close(got["cls_token"], release["cls_token"] + release["pos_embed"][:, :1])
        torch.testing.assert_close(got["reg_token"], release["register_tokens"])
        pos = resample_abs_pos_embed(release["pos_embed"][:, 1:], (4, 4), (5, 5), num_prefix_tokens=0,
                                     interpolation="bicubic", antialias=True)
    else:
        pos = resample_abs_pos_embed(release["pos_embed"], (4, 4), (5, 5), num_prefix_tokens=1,
                                     interpolation="bicubic", antialias=True)
    torch.testing.assert_close(got["pos_embed"], pos)
    feats, _ = bb(torch.randn(1, 3, IMG, IMG, device=DEVICE))
    assert all(torch.isfinite(f).all() for f in feats)


def test_wrong_checkpoints_name_the_keys(tmp_path):
    release = _dinov2_release_state(False)
    missing = dict(release)
    del missing["blocks.1.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks\.1\.attn\.qkv\.weight"):
        build("dinov2", checkpoint=missing)
    extra = {**release, "blocks.9.attn.qkv.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): blocks\.9\.attn\.qkv\.weight"):
        build("dinov2", checkpoint=extra)
    other = timm.create_model("vit_base_patch16_clip_224", pretrained=False, depth=4, img_size=64)
    with pytest.raises(ValueError, match=r"keys of another shape \(\d+\): blocks\.0\.attn\.proj\.bias: file \(768,\) vs "
                                         r"model \(384,\)") as e:
        build("dinov2", checkpoint=other.state_dict())
    listed = str(e.value).rsplit("all listed in ", 1)[1]  # the full list: every key of another shape
    assert "blocks.3.attn.qkv.weight: file (2304, 768) vs model (1152, 384)" in open(listed).read()
    torch.save(release, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): blocks\.4"):
        build("dinov2", checkpoint=str(tmp_path / "ok.pth"), depth=6)
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match=r"notes\.txt is not a PyTorch checkpoint file$"):
        build("dinov2", checkpoint=str(tmp_path / "notes.txt"))
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth does not exist"):
        build("dinov2", checkpoint=str(tmp_path / "nowhere.pth"))


@pytest.mark.parametrize("family", ["dinov2", "sam", "convnext"])
def test_feature_info_and_num_features_describe_the_maps_as_timm_does(family):
    """timm's feature-extractor conventions: feature_info's channels and reductions are
    those of the maps forward returns, its modules exist; num_features is the last map's
    width."""
    bb = build(family)
    with torch.no_grad():
        feats, _ = bb(torch.zeros(1, 3, IMG, IMG + 32, device=DEVICE))
    info = bb.feature_info
    assert info.channels() == [f.shape[1] for f in feats] and bb.num_features == feats[-1].shape[1]
    assert info.reduction() == [4, 8, 16, 32] == [IMG // f.shape[-2] for f in feats]
    assert info[0]["num_chs"] == feats[0].shape[1] and len(info.module_name()) == 4
    modules = dict(bb.named_modules())
    assert all(name in modules for name in info.module_name())
    if family == "convnext":
        assert info.channels() == [40, 80, 160, 320]


def test_print_trainable_parameters_as_peft(capsys):
    bb = build("dinov2")
    trainable = sum(p.numel() for p in bb.rein.parameters() if p.requires_grad)
    total = sum(p.numel() for p in bb.parameters())
    bb.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")
    assert 0 < trainable < total


def test_bad_out_indices_and_images():
    with pytest.raises(ValueError, match=r"out_indices must be 4 block indices in \[0, 4\)"):
        build("dinov2", out_indices=[0, 1, 2, 4])
    bb = build("dinov2")
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        bb(torch.randn(3, IMG, IMG, device=DEVICE))
    with pytest.raises(ValueError, match=r"^images of 60x70 pixels do not fit the backbone's 16x16-pixel patches: "
                                         r"pad or resize them to multiples, e\.g\. 64x80$"):
        bb(torch.randn(1, 3, 60, 70, device=DEVICE))
