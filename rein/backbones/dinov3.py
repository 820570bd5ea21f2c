"""DINOv3 ViTs (Simeoni et al., 2025) as Rein backbones, ViT-S/16 to ViT-7B/16: timm's
``vit_*_patch16_dinov3`` models (class ``Eva``: a cls token and 4 register tokens before the
patches, which Rein passes through as prefix tokens; RoPE inside every attention, no
position table, so any image size of whole patches runs without resampling anything), and
Meta's released ``dinov3_vit*16_pretrain_*.pth`` files.

Meta's key layout is converted by timm's own converter (``timm.models.eva.checkpoint_filter_fn``:
``storage_tokens`` -> ``reg_token``, ``ls1.gamma`` -> ``gamma_1``, SwiGLU's ``w1/w2/w3`` ->
``fc1_g/fc1_x/fc2``, pretraining-only keys dropped). Two things it leaves out are done here
first (``meta_state``), so that the model computes what Meta's does:

* the attention bias Meta's model applies is ``qkv.bias * qkv.bias_mask`` (zero in every
  released file): a model with query/value biases (timm's ``_qkvb`` variants) gets exactly
  that, and a model without them refuses a non-zero one instead of dropping it;
* RoPE: Meta's files carry the periods their model ran with (``rope_embed.periods``, values
  rounded to bfloat16), timm computes its own in float32. The file's are kept
  (``pin_rope_periods``: also through a cast of the model to bfloat16, which makes timm
  recompute them), once they are found to be timm's up to that rounding (a file made for
  another RoPE configuration is refused).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from torch import Tensor

# the first timm release with the DINOv3 models
TIMM_DINOV3 = "1.0.20"


def missing_model_hint(name: str) -> str:
    """What to say when timm does not know ``name``: for a DINOv3 name, that this timm predates it."""
    if "dinov3" not in name:
        return ""
    import timm

    return (f"; timm {timm.__version__} has no DINOv3 models: they need timm >= {TIMM_DINOV3} "
            f"(pip install -U 'timm>={TIMM_DINOV3}')")


def is_meta_dinov3(state: Mapping[str, Tensor]) -> bool:
    """A state dict in Meta's DINOv3 layout (its register tokens are ``storage_tokens``;
    Sapiens2 files share that name but not the attention's)."""
    return "storage_tokens" in state and "blocks.0.attn.qkv.weight" in state


def _has_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def meta_state(state: Mapping[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], Tensor | None]:
    """A Meta-format DINOv3 state dict made ready for timm's converter: each
    ``blocks.N.attn.qkv.bias`` replaced by the bias Meta's attention applies (times
    ``bias_mask``), or removed when ``model`` has no query/value biases and that bias is
    zero where it would act (the key third of it only shifts every logit of a query
    alike, which softmax ignores); and the RoPE periods taken out, to be pinned after
    loading (``pin_rope_periods``). Raises ValueError for a non-zero bias ``model`` has
    no place for."""
    out = dict(state)
    for key in [k for k in out if k.endswith("attn.qkv.bias")]:
        bias = out[key]
        mask = out.pop(f"{key}_mask", None)
        if mask is not None:
            bias = bias * mask.to(bias.dtype)
        if _has_parameter(model, key.replace("qkv.bias", "q_bias")):
            out[key] = bias  # timm splits it into q_bias and v_bias
            continue
        third = bias.shape[0] // 3
        query_value = torch.cat([bias[:third], bias[2 * third:]]).float()
        if not bool(torch.isfinite(query_value).all()) or bool(query_value.abs().max() > 0):
            arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
            raise ValueError(f"{key}: Meta's attention adds non-zero query/value biases, which {arch} has no "
                             "place for; use its _qkvb variant (e.g. vit_base_patch16_dinov3_qkvb)")
        del out[key]
    return out, out.pop("rope_embed.periods", None)


class _Periods:
    """A checkpoint's RoPE periods, standing in for timm's ``_compute_periods`` (called at
    init and again after a cast to a low-precision dtype), so that the model keeps them."""

    def __init__(self, periods: Tensor):
        self.periods = periods.detach().float().cpu().clone()

    def __call__(self, device="cpu", dtype=torch.float32) -> Tensor:
        return self.periods.to(device=device, dtype=dtype)


def pin_rope_periods(model: nn.Module, periods: Tensor) -> None:
    """The RoPE of ``model`` runs with ``periods`` (a Meta file's): checked to be timm's own
    up to bfloat16 rounding, then set and kept. Raises ValueError otherwise."""
    rope = getattr(model, "rope", None)
    have = getattr(rope, "periods", None)
    if not isinstance(have, Tensor) or have.shape != periods.shape:
        got = None if not isinstance(have, Tensor) else tuple(have.shape)
        raise ValueError(f"rope_embed.periods has shape {tuple(periods.shape)} but this timm's DINOv3 RoPE has "
                         f"{got}: the file is for another model, or timm needs an update (>= {TIMM_DINOV3})")
    want = have.detach().float().cpu()
    rel = float(((periods.float().cpu() - want) / want).abs().max())
    if rel > 2 ** -8:
        raise ValueError(f"rope_embed.periods differs from timm's RoPE periods by up to {rel:.2%}, more than "
                         "bfloat16 rounding: the file was made for another RoPE configuration")
    rope._compute_periods = _Periods(periods)
    if hasattr(rope, "_init_buffers"):
        rope._init_buffers()  # periods (and any cached table) from the file's
    else:
        with torch.no_grad():
            rope.periods.copy_(periods)
