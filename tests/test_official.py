"""Official Rein checkpoints: every key of the official list (fixture) is placed, strictly,
and the renamed decoder computes what mmdet's layers compute with the official tensors."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _tolerance import assert_sums_close

pytest.importorskip("transformers")

from rein import ReinLayer  # noqa: E402
from rein.backbones.timm_backbone import ReinBackbone  # noqa: E402
from rein.heads.mask2former import Mask2FormerHead  # noqa: E402
from rein.model import load_official_checkpoint  # noqa: E402
from rein.official import convert_official_state_dict  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "official_rein_dinov2_keys.txt"


def official_keys() -> dict[str, list[int]]:
    keys = {}
    for line in FIXTURE.read_text().splitlines():
        if line and not line.startswith("#"):
            k, shape = line.split(" ", 1)
            keys[k] = [int(s) for s in shape.strip("[]").split(",") if s]
    return keys


def random_official_state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in official_keys().items()}


class _Rein:
    """The part of ReinBackbone that loading uses, without building a 300M-parameter ViT."""

    def __init__(self, **kw):
        self.rein = ReinLayer(24, 1024, 16, lora_dim=16, **kw)

    load_rein_state_dict = ReinBackbone.load_rein_state_dict


def test_fixture_is_the_official_list():
    keys = official_keys()
    assert len(keys) == 303 and sum(k.startswith("decode_head.") for k in keys) == 292
    assert keys["decode_head.cls_embed.weight"] == [20, 256]
    assert keys["backbone.reins.learnable_tokens_a"] == [24, 100, 16]


def test_every_official_key_loads_strictly():
    state = random_official_state()
    bb, head = _Rein(), Mask2FormerHead([1024] * 4, 19)
    with torch.no_grad():  # poisoned: a parameter the file does not fill stays NaN
        for t in [*head.state_dict().values(), *bb.rein.state_dict().values()]:
            t.fill_(float("nan"))
    load_official_checkpoint(state, bb, head)
    for k, v in [*head.state_dict().items(), *bb.rein.state_dict().items()]:
        assert not v.isnan().any(), k
    torch.testing.assert_close(bb.rein.learnable_tokens_b, state["backbone.reins.learnable_tokens_b"])
    torch.testing.assert_close(bb.rein.scale, state["backbone.reins.scale"])
    hs = head.state_dict()
    torch.testing.assert_close(hs["class_predictor.weight"], state["decode_head.cls_embed.weight"])
    torch.testing.assert_close(hs["pixel_decoder.level_embed"], state["decode_head.pixel_decoder.level_encoding.weight"])
    torch.testing.assert_close(hs["transformer.level_embed.weight"], state["decode_head.level_embed.weight"])
    w = state["decode_head.transformer_decoder.layers.4.self_attn.attn.in_proj_weight"]
    torch.testing.assert_close(hs["transformer.decoder.layers.4.self_attn.k_proj.weight"], w[256:512])


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + "weight"], sd[p + "bias"])


def _ffn(x, sd, p):
    x1 = F.relu(F.linear(x, sd[p + "layers.0.0.weight"], sd[p + "layers.0.0.bias"]))
    return x + F.linear(x1, sd[p + "layers.1.weight"], sd[p + "layers.1.bias"])


def _mha(sd, p, q, k, v, mask=None, heads=8):
    """mmcv's MultiheadAttention (batch first), without its residual."""
    out = F.multi_head_attention_forward(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), q.shape[-1], heads,
        sd[p + "in_proj_weight"], sd[p + "in_proj_bias"], None, None, False, 0.0,
        sd[p + "out_proj.weight"], sd[p + "out_proj.bias"], training=False, attn_mask=mask, need_weights=False)[0]
    return out.transpose(0, 1)


def test_decoder_layer_computes_what_mmdets_does():
    """mmdet's Mask2FormerTransformerDecoderLayer, written here on the official tensors:
    masked cross-attention (positions on query and key, not value) -> norms.0 ->
    self-attention -> norms.1 -> FFN -> norms.2, against transformers' layer after loading."""
    state = random_official_state(1)
    for k in state:
        if "norms" in k or "in_proj" in k or "out_proj" in k or "ffn" in k:
            state[k] = state[k] * 0.1  # keep activations moderate
    head = Mask2FormerHead([1024] * 4, 19)
    load_official_checkpoint(state, _Rein(), head)
    sd = {k.removeprefix("decode_head.transformer_decoder.layers.3."): v for k, v in state.items()}
    B, Q, HW = 2, 11, 13
    g = torch.Generator().manual_seed(2)
    query, query_pos = torch.randn(B, Q, 256, generator=g), torch.randn(B, Q, 256, generator=g)
    mem, mem_pos = torch.randn(B, HW, 256, generator=g), torch.randn(B, HW, 256, generator=g)
    mask = torch.rand(B * 8, Q, HW, generator=g) < 0.3

    x = query + _mha(sd, "cross_attn.attn.", query + query_pos, mem + mem_pos, mem, mask)
    x = _ln(x, sd, "norms.0.")
    x = x + _mha(sd, "self_attn.attn.", x + query_pos, x + query_pos, x)
    x = _ln(x, sd, "norms.1.")
    want = _ln(_ffn(x, sd, "ffn."), sd, "norms.2.")

    layer = head.transformer.decoder.layers[3].eval()
    with torch.no_grad():
        got = layer(query.transpose(0, 1), 1, None, [None, mem_pos.transpose(0, 1), None], query_pos.transpose(0, 1),
                    [None, mem.transpose(0, 1), None], encoder_attention_mask=mask)[0].transpose(0, 1)
    # sums over the 256 channels (the attentions' 3 projections each, the output's), the
    # keys and the FFN's 2048 hidden channels
    assert_sums_close(got, want, terms=4 * 256 + HW + 2048)


def test_encoder_layer_norm_order_and_mask_mlp_as_mmdet():
    state = random_official_state(3)
    head = Mask2FormerHead([1024] * 4, 19)
    load_official_checkpoint(state, _Rein(), head)
    sd = {k.removeprefix("decode_head."): v for k, v in state.items()}
    # pixel-decoder encoder layer: attention -> norms.0 -> FFN -> norms.1 (the attention's
    # own four linears keep their names, so transformers' module stands in for mmcv's)
    layer = head.pixel_decoder.encoder.layers[2].eval()
    shapes = [(4, 4), (2, 2), (1, 1)]
    n = sum(h * w for h, w in shapes)
    x = torch.randn(1, n, 256)
    pos = torch.randn(1, n, 256)
    ref = torch.rand(1, n, 3, 2)
    with torch.no_grad():
        attn = layer.self_attn(hidden_states=x, attention_mask=None, encoder_hidden_states=x, position_embeddings=pos,
                               reference_points=ref, spatial_shapes_list=shapes)[0]
        p = "pixel_decoder.encoder.layers.2."
        want = _ln(_ffn(_ln(x + attn, sd, p + "norms.0."), sd, p + "ffn."), sd, p + "norms.1.")
        got = layer(x, None, position_embeddings=pos, reference_points=ref, spatial_shapes_list=shapes)[0]
    assert_sums_close(got, want, terms=256 + 1024)  # the FFN's sums over 256 and 1024 channels
    # mask_embed: Linear 0 -> ReLU -> Linear 2 -> ReLU -> Linear 4
    q = torch.randn(3, 256)
    h = F.relu(F.linear(q, sd["mask_embed.0.weight"], sd["mask_embed.0.bias"]))
    h = F.relu(F.linear(h, sd["mask_embed.2.weight"], sd["mask_embed.2.bias"]))
    want = F.linear(h, sd["mask_embed.4.weight"], sd["mask_embed.4.bias"])
    with torch.no_grad():
        got = head.transformer.decoder.mask_predictor.mask_embedder(q)
    assert_sums_close(got, want, terms=3 * 256)  # three Linears, each a sum over 256 channels


def test_what_does_not_fit_is_named(tmp_path):
    head = Mask2FormerHead([1024] * 4, 19)
    state = random_official_state()
    state["decode_head.some_new_layer.weight"] = torch.zeros(3)
    state["neck.conv.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"2 key\(s\).*decode_head.some_new_layer.weight.*neck.conv.weight"):
        load_official_checkpoint(state, _Rein(), head)
    state = random_official_state()
    del state["decode_head.querys2feat.bias"]
    with pytest.raises(ValueError, match=r"head \(decode_head.\*\).*missing keys \(1\): querys2feat.bias"):
        load_official_checkpoint(state, _Rein(), head)
    with pytest.raises(ValueError, match=r"Rein.*keys of another shape \(2\): learnable_tokens_a: file \(24, 100, 16\) vs "
                                         r"model \(24, 100, 8\)"):
        bb = _Rein()
        bb.rein = ReinLayer(24, 1024, 16, lora_dim=8)
        load_official_checkpoint(random_official_state(), bb, head)
    (tmp_path / "x.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="x.pth is not a PyTorch checkpoint file"):
        load_official_checkpoint(tmp_path / "x.pth", _Rein(), head)
    with pytest.raises(ValueError, match="not an official Rein checkpoint"):
        convert_official_state_dict({"backbone.blocks.0.norm1.weight": torch.zeros(3)})


class HistoryBuffer:
    """Stands for mmengine's logging objects that its checkpoints pickle."""

    def __init__(self):
        self.data = [1.0, 2.0]


def test_mmengine_file_with_frozen_backbone_is_split(tmp_path):
    """A file as mmengine saves it from generate_full_weights.py: {"state_dict": ...} with
    metadata that weights_only=True alone refuses (numpy scalars, mmengine's objects),
    read without running its code; the converted backbone weights go to the backbone."""
    np = pytest.importorskip("numpy")
    state = random_official_state()
    state["backbone.blocks.0.norm1.weight"] = torch.ones(1024)
    meta = {"seed": np.int64(42), "lr": np.float64(1e-4), "hist": np.arange(3), "hub": HistoryBuffer()}
    torch.save({"meta": meta, "message_hub": HistoryBuffer(), "state_dict": state}, tmp_path / "full.pth")
    with pytest.raises(Exception):  # what plain torch.load(weights_only=True) does with it
        torch.load(tmp_path / "full.pth", weights_only=True)
    from rein.official import read_official_checkpoint

    parts = convert_official_state_dict(read_official_checkpoint(tmp_path / "full.pth"))
    assert list(parts["backbone"]) == ["blocks.0.norm1.weight"]
    assert len(parts["rein"]) == 11 and len(parts["head"]) == 292 + 9 * 4  # q/k/v split: 2 keys -> 6 per layer


def test_building_from_python_names_the_arguments_not_the_flags(tmp_path):
    """rein.load_official_checkpoint(file, ...) reports bad input in its own keyword
    arguments' names; the command lines (same checks) name their flags."""
    import rein

    def fails(*args, says, **kw):
        with pytest.raises(ValueError) as e:
            rein.load_official_checkpoint(*args, device="cpu", **kw)
        assert says in str(e.value) and "--" not in str(e.value), str(e.value)

    fails(tmp_path / "none.pth", says=f"checkpoint {tmp_path / 'none.pth'} does not exist")
    torch.save({"state_dict": random_official_state()}, tmp_path / "rein_head.pth")
    fails(tmp_path / "rein_head.pth", says="pass its weights with backbone_checkpoint (e.g.")
    fails(tmp_path / "rein_head.pth", backbone_checkpoint=str(tmp_path / "nope.pth"),
          says=f"backbone_checkpoint {tmp_path / 'nope.pth'} does not exist")
    fails(tmp_path / "rein_head.pth", backbone_checkpoint=str(tmp_path / "rein_head.pth"), backbone_name="vit_nope",
          says="backbone_name 'vit_nope' is not a timm model name")
    fails(tmp_path / "rein_head.pth", backbone_checkpoint=str(tmp_path / "rein_head.pth"), crop=500,
          says="crop 500 is not a multiple of the backbone's 16-pixel patch; e.g. crop 496")
    import timm

    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    fails(tmp_path / "rein_head.pth", backbone_checkpoint=str(tmp_path / "resnet18.pth"), backbone_name="resnet18",
          says="backbone_name resnet18: not a backbone Rein can refine here")
