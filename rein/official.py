"""Official Rein checkpoints (mmseg format, ``w1oves/Rein``) on this library's modules.

An official checkpoint holds ``backbone.reins.*`` (Rein: the same names as
``rein.ReinLayer``'s, so they map one to one) and ``decode_head.*`` (mmdet's
Mask2FormerHead as ``ReinMask2FormerHead``), and, when made by the official
``generate_full_weights.py``, also the converted frozen backbone as ``backbone.<name>``
(DINOv2's names, which timm reads). ``convert_official_state_dict`` renames every key to
this library's (``rein.*`` for ``ReinBackbone.load_rein_state_dict``, the
``Mask2FormerHead`` names, the backbone's), splitting the decoder self-attention's packed
``in_proj`` into transformers' q/k/v projections; a key it cannot place is an error that
names it. ``load_official_weights`` loads the result strictly into modules built with
the same sizes (``rein.model`` builds them).

The official key list this follows is ``tests/fixtures/official_rein_dinov2_keys.txt``
(how it was derived is written at its top).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from .checkpoints import flat_state, listing, load_tensors, misfit

# mmdet/mmcv name (after "decode_head.") -> this library's Mask2FormerHead name; each
# pattern is followed by the parameter's own name (weight, bias), kept as it is.
_HEAD_RULES = [(re.compile(p + r"(?P<tail>weight|bias)"), r) for p, r in [
    (r"pixel_decoder\.input_convs\.(\d+)\.conv\.", r"pixel_decoder.input_projections.\1.0."),
    (r"pixel_decoder\.input_convs\.(\d+)\.gn\.", r"pixel_decoder.input_projections.\1.1."),
    (r"pixel_decoder\.encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.",
     r"pixel_decoder.encoder.layers.\1.self_attn.\2."),
    (r"pixel_decoder\.encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"pixel_decoder.encoder.layers.\1.fc1."),
    (r"pixel_decoder\.encoder\.layers\.(\d+)\.ffn\.layers\.1\.", r"pixel_decoder.encoder.layers.\1.fc2."),
    (r"pixel_decoder\.encoder\.layers\.(\d+)\.norms\.0\.", r"pixel_decoder.encoder.layers.\1.self_attn_layer_norm."),
    (r"pixel_decoder\.encoder\.layers\.(\d+)\.norms\.1\.", r"pixel_decoder.encoder.layers.\1.final_layer_norm."),
    (r"pixel_decoder\.lateral_convs\.0\.conv\.", r"pixel_decoder.adapter_1.0."),
    (r"pixel_decoder\.lateral_convs\.0\.gn\.", r"pixel_decoder.adapter_1.1."),
    (r"pixel_decoder\.output_convs\.0\.conv\.", r"pixel_decoder.layer_1.0."),
    (r"pixel_decoder\.output_convs\.0\.gn\.", r"pixel_decoder.layer_1.1."),
    (r"pixel_decoder\.mask_feature\.", r"pixel_decoder.mask_projection."),
    # mmdet's decoder layer: cross-attention -> norms.0 -> self-attention -> norms.1 -> FFN -> norms.2
    (r"transformer_decoder\.layers\.(\d+)\.cross_attn\.attn\.in_proj_", r"transformer.decoder.layers.\1.cross_attn.in_proj_"),
    (r"transformer_decoder\.layers\.(\d+)\.(cross_attn|self_attn)\.attn\.out_proj\.",
     r"transformer.decoder.layers.\1.\2.out_proj."),
    (r"transformer_decoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.", r"transformer.decoder.layers.\1.fc1."),
    (r"transformer_decoder\.layers\.(\d+)\.ffn\.layers\.1\.", r"transformer.decoder.layers.\1.fc2."),
    (r"transformer_decoder\.layers\.(\d+)\.norms\.0\.", r"transformer.decoder.layers.\1.cross_attn_layer_norm."),
    (r"transformer_decoder\.layers\.(\d+)\.norms\.1\.", r"transformer.decoder.layers.\1.self_attn_layer_norm."),
    (r"transformer_decoder\.layers\.(\d+)\.norms\.2\.", r"transformer.decoder.layers.\1.final_layer_norm."),
    (r"transformer_decoder\.post_norm\.", r"transformer.decoder.layernorm."),
    (r"level_embed\.", r"transformer.level_embed."),
    (r"cls_embed\.", r"class_predictor."),
    (r"mask_embed\.0\.", r"transformer.decoder.mask_predictor.mask_embedder.0.0."),
    (r"mask_embed\.2\.", r"transformer.decoder.mask_predictor.mask_embedder.1.0."),
    (r"mask_embed\.4\.", r"transformer.decoder.mask_predictor.mask_embedder.2.0."),
    (r"querys2feat\.", r"querys2feat."),
]]
# packed q/k/v of nn.MultiheadAttention -> transformers' separate projections
_SELF_ATTN_IN_PROJ = re.compile(r"transformer_decoder\.layers\.(\d+)\.self_attn\.attn\.in_proj_(weight|bias)")


def _head_key(name: str, value: Tensor) -> dict[str, Tensor] | None:
    if name == "pixel_decoder.level_encoding.weight":  # an nn.Embedding there, a Parameter here
        return {"pixel_decoder.level_embed": value}
    m = _SELF_ATTN_IN_PROJ.fullmatch(name)
    if m:
        layer, kind = m.groups()
        q, k, v = value.chunk(3, dim=0)
        return {f"transformer.decoder.layers.{layer}.self_attn.{p}_proj.{kind}": t
                for p, t in zip("qkv", (q, k, v))}
    for pattern, repl in _HEAD_RULES:
        m = pattern.fullmatch(name)
        if m:
            return {m.expand(repl) + m["tail"]: value}
    return None


def official_state(ck) -> dict[str, Tensor]:
    """The flat state dict of a loaded official checkpoint (mmengine's ``state_dict``
    wrapper removed, DDP's ``module.`` prefix dropped)."""
    if not isinstance(ck, Mapping):
        raise ValueError(f"the file holds a {type(ck).__name__}, not a state dict")
    return flat_state(ck)


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """``official_state`` of a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (or is not a file)")
    return official_state(load_tensors(path))


def convert_official_state_dict(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{"rein": ..., "head": ..., "backbone": ...}``: an official state dict in this
    library's names (``backbone`` is empty unless the file carries the frozen weights).
    Raises ValueError naming every key that has no place here."""
    out: dict[str, dict[str, Tensor]] = {"rein": {}, "head": {}, "backbone": {}}
    unplaced = []
    for k, v in state.items():
        if k.startswith("backbone.reins."):
            out["rein"]["rein." + k.removeprefix("backbone.reins.")] = v
        elif k.startswith("decode_head."):
            mapped = _head_key(k.removeprefix("decode_head."), v)
            if mapped is None:
                unplaced.append(k)
            else:
                out["head"].update(mapped)
        elif k.startswith("backbone."):
            out["backbone"][k.removeprefix("backbone.")] = v
        else:
            unplaced.append(k)
    if unplaced:
        raise ValueError(f"{len(unplaced)} key(s) of the official checkpoint have no place in this library's Rein "
                         f"backbone and Mask2Former head: {listing(sorted(unplaced), 3)}")
    if not out["rein"] or not out["head"]:
        raise ValueError("not an official Rein checkpoint: it needs backbone.reins.* and decode_head.* keys, found "
                         f"{len(out['rein'])} and {len(out['head'])}")
    return out


def _check_fits(state: Mapping[str, Tensor], module: torch.nn.Module, what: str) -> None:
    problem = misfit(state, module.state_dict())
    if problem:
        raise ValueError(f"the official checkpoint's {what} does not fit this model: {problem}")


def load_official_weights(path_or_state, backbone, head, load_backbone: bool = True) -> bool:
    """Load an official Rein checkpoint (a file or its state dict) into a ``ReinBackbone``
    and a ``Mask2FormerHead`` built with the same sizes, strictly: every key is placed
    and every parameter filled, or a ValueError names what does not fit. Frozen backbone
    weights in the file (``generate_full_weights.py``) are loaded too (unless
    ``load_backbone=False``). Returns whether the file carried the frozen backbone.
    (``rein.load_official_checkpoint`` also builds the model.)"""
    from .backbones.timm_backbone import load_timm_checkpoint

    state = path_or_state if isinstance(path_or_state, Mapping) else read_official_checkpoint(path_or_state)
    parts = convert_official_state_dict(state)
    rein = {k.removeprefix("rein."): v for k, v in parts["rein"].items()}
    _check_fits(rein, backbone.rein, "Rein (backbone.reins.*)")
    _check_fits(parts["head"], head, "head (decode_head.*)")
    if parts["backbone"] and load_backbone:
        load_timm_checkpoint(backbone.backbone, parts["backbone"], conversion="official")
    backbone.load_rein_state_dict(parts["rein"], strict=True)
    head.load_state_dict(parts["head"], strict=True)
    return bool(parts["backbone"])
