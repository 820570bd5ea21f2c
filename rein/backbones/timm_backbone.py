"""Rein on timm backbones: a frozen timm model with one shared ReinLayer after every block.

timm builds and runs the backbone (``forward_intermediates``); Rein is a forward hook on
each block that refines the block's output in place of it.
Because the hook is part of the block's call, timm's own activation checkpointing
(``set_grad_checkpointing``) recomputes block + Rein together, and compiling a block
(``rein.train``'s regional compile) compiles the Rein layer with it.

One forward pass forms the fused layers' operands once (``ReinLayer.layer_operands``: one
batched GEMM for all layers; on the reference path, all layers' tokens) and binds each
layer's to its block for the pass; every block shares one hook, which takes them from the
block it runs on. The hook thus reads no per-block Python constant, so torch.compile
compiles one block for all of them, and a compiled forward sees the operands formed once,
as an eager one does. Inside activation checkpointing nothing is bound (a block's replay
in the backward must repeat its forward's operations): each layer forms its own
operands, by its index.

Layouts handled by the hooks:
  * ViT-like (DINOv2 with or without registers, CLIP, EVA02, DINOv3): [B, N, C] tokens,
    the model's prefix tokens (cls, registers) pass through;
  * SAM (``VisionTransformerSAM``): NHWC maps, no prefix tokens;
  * ConvNeXt: NCHW block outputs; as the official ReinsConvNeXt, one ReinLayer per
    stage with one layer per block (the index counting within the stage), applied after
    every block; their queries summed. (The official model also normalises each output
    stage with mmpretrain's per-stage LayerNorm, which timm's ConvNeXt does not have.)
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..checkpoints import CheckpointError, checkpoint_kind, flat_state, load_tensors, misfit
from ..layer import ReinLayer, _saved_tensor_hooks_active

TARGET_STRIDES = (4, 8, 16, 32)


def _family(model: nn.Module) -> str:
    name = type(model).__name__
    if name == "VisionTransformerSAM":
        return "sam"
    if name == "ConvNeXt":
        return "convnext"
    if hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens"):
        return "vit"
    raise TypeError(
        f"unsupported timm model class {name}: ReinBackbone handles VisionTransformer "
        "(DINOv2, CLIP), Eva (EVA02), VisionTransformerSAM and ConvNeXt"
    )


def default_out_indices(num_blocks: int) -> list[int]:
    """Evenly spread levels with the last block last: (7, 11, 15, 23) for 24 blocks."""
    if num_blocks >= 6:
        return [num_blocks // 3 - 1, num_blocks // 2 - 1, 2 * num_blocks // 3 - 1, num_blocks - 1]
    return [max(0, num_blocks - 4 + i) for i in range(4)]


def _official_applies(model: nn.Module, state: Mapping[str, Tensor]) -> bool:
    """The official Rein converter exists for DINOv2 (release files carry ``mask_token``;
    timm's own files are known by the model's architecture) and for EVA02; OpenAI CLIP
    files get the official CLIP backbone's resizes (``official_resize_clip``); other CLIP
    files and SAM have no official counterpart, so timm's conversion it is."""
    arch = str(getattr(model, "pretrained_cfg", {}).get("architecture", ""))
    return "mask_token" in state or "dinov2" in arch or type(model).__name__ == "Eva"


def load_timm_checkpoint(model: nn.Module, path_or_state: str | Mapping[str, Tensor],
                         conversion: str = "official") -> None:
    """Load a checkpoint in timm's format or in the original release format (DINOv2's
    ``dinov2_vit*14_pretrain.pth``, with ``mask_token`` / ``register_tokens``; EVA02's;
    Meta's DINOv3 ``dinov3_vit*16_pretrain_*.pth``, see ``dinov3.py``;
    OpenAI CLIP's state dict; the frozen backbone inside an official full-weights Rein
    checkpoint) into a timm model. Patch kernel and position grid are resampled to the model's:
    ``conversion="official"`` (default) as the official Rein converter does for DINOv2
    and EVA02 (plain bicubic, see ``convert.py``), so that released Rein weights see the
    features they were trained on, and as the official CLIP backbone does for OpenAI CLIP
    files (``visual.*``: bicubic kernel, bilinear grid); ``"timm"`` with timm's ``checkpoint_filter_fn``
    (pseudo-inverse kernel resize, antialiased grid), which is also what other families
    get. timm's filter then maps the key names. Raises ValueError (CheckpointError, naming
    the file first, for a file) for a file torch cannot read, one that holds another kind
    of checkpoint, and one that does not fit (in one line: counts and first keys, all of
    them in a file it names)."""
    from .convert import CONVERSIONS, official_resize, official_resize_clip
    from .dinov3 import is_meta_dinov3, meta_state, pin_rope_periods

    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion must be one of {CONVERSIONS}, got {conversion!r}")
    name, error = "the state dict", ValueError
    if not isinstance(path_or_state, Mapping):
        name, error = str(path_or_state), CheckpointError
        if not os.path.isfile(path_or_state):
            raise FileNotFoundError(f"{name} does not exist (or is not a file)")
        path_or_state = load_tensors(path_or_state)
        if checkpoint_kind(path_or_state) == "rein.train":
            raise error(f"{name} is a rein.train checkpoint (Rein and head weights), not a backbone's weights: "
                        "give it to rein.evaluate or rein.predict as --checkpoint, or continue its run with "
                        "rein.train --resume")
        if not isinstance(path_or_state, Mapping):
            raise error(f"{name} holds a {type(path_or_state).__name__}, not a state dict")
    state = flat_state(path_or_state)
    if any(k.startswith("decode_head.") for k in state):
        # an official Rein checkpoint with the frozen backbone (generate_full_weights.py):
        # its backbone.* weights, already converted, Rein's own left out
        state = {k.removeprefix("backbone."): v for k, v in state.items()
                 if k.startswith("backbone.") and not k.startswith("backbone.reins.")}
        if not state:
            raise error(f"{name} is an official Rein checkpoint without the frozen backbone's weights: give the "
                        "backbone's own (e.g. dinov2_vitl14_pretrain.pth)")
    periods = None
    if is_meta_dinov3(state):  # Meta's DINOv3 release layout: what timm's converter leaves out (dinov3.py)
        try:
            state, periods = meta_state(state, model)
        except ValueError as e:
            raise error(f"{name} does not fit {type(model).__name__}: {e}") from None
    if conversion == "official" and hasattr(model, "patch_embed"):
        patch, grid = tuple(model.patch_embed.proj.weight.shape[-2:]), tuple(model.patch_embed.grid_size)
        if "visual.conv1.weight" in state:
            state = official_resize_clip(state, patch, grid)
        elif _official_applies(model, state):
            state = official_resize(state, patch, grid)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as e:  # a foreign file can break the converter itself
            raise error(f"{name} does not fit {type(model).__name__}: conversion failed ({e})") from e
    problem = misfit(state, model.state_dict())
    if problem:
        raise error(f"{name} does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state, strict=True)
    if periods is not None:
        try:
            pin_rope_periods(model, periods)
        except ValueError as e:
            raise error(f"{name} does not fit {type(model).__name__}: {e}") from None


class _RefineHook:
    """The forward hook all blocks share: a block's output, refined by Rein. An object
    rather than a closure, so that deepcopy and pickle carry it over to the copy of the
    backbone."""

    def __init__(self, owner: "ReinBackbone"):
        self.owner = owner

    def __call__(self, module, args, out):
        return self.owner._refine(out, module)


class ReinBackbone(nn.Module):
    """A frozen timm backbone refined by Rein after every block.

    ``forward(images)`` returns ``(features, queries)``: four NCHW maps at strides 4, 8,
    16 and 32 made from the ``out_indices`` blocks (bilinear resampling, as the recipe
    does), and the Rein queries [m, Q] (``features`` alone without
    ``link_token_to_query``). As a timm feature extractor describes its maps,
    ``feature_info`` (``.channels()``, ``.reduction()``, ``.module_name()``, and a dict
    per map) and ``num_features`` (the last map's channels) describe them, so heads from
    other libraries can read their widths without a forward pass.
    """

    def __init__(self, backbone: nn.Module, rein: nn.Module, out_indices: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.rein = rein
        self.family = _family(backbone)
        # outputs: block indices (stage indices for ConvNeXt)
        n = len(self.backbone.stages) if self.family == "convnext" else len(self.backbone.blocks)
        out_indices = [i + n if i < 0 else i for i in out_indices]
        if len(out_indices) != 4 or any(not 0 <= i < n for i in out_indices):
            raise ValueError(f"out_indices must be 4 {'stage' if self.family == 'convnext' else 'block'} "
                             f"indices in [0, {n}), got {list(out_indices)}")
        self.out_indices = list(out_indices)
        from timm.models import FeatureInfo

        if self.family == "convnext":
            chans, names = [backbone.feature_info[i]["num_chs"] for i in out_indices], "stages"
        else:
            chans, names = [backbone.embed_dim] * 4, "blocks"
        self.feature_info = FeatureInfo([dict(num_chs=c, reduction=r, module=f"backbone.{names}.{i}")
                                         for c, r, i in zip(chans, TARGET_STRIDES, out_indices)], (0, 1, 2, 3))
        self.num_features = chans[-1]
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        hook = _RefineHook(self)
        for key, blk in self._blocks():
            # the block's layer index (ConvNeXt: stage, index in the stage), and the operands
            # bound to it for one forward pass (None outside one)
            blk._rein_key, blk._rein_operands = key, None
        self._hooks = [blk.register_forward_hook(hook) for _, blk in self._blocks()]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_timm(
        cls,
        name: str,
        checkpoint: str | None = None,
        img_size: int = 512,
        patch_size: int = 16,
        out_indices: Sequence[int] | None = None,
        token_length: int = 100,
        lora_dim: int | None = 16,
        query_dims: int = 256,
        fused: bool = True,
        link_token_to_query: bool = True,
        conversion: str = "official",
        **timm_kwargs,
    ) -> "ReinBackbone":
        """Build timm's ``name`` (``pretrained=False``: nothing downloads), optionally load a
        local checkpoint, freeze it and insert Rein. ``img_size``/``patch_size`` apply to
        ViT-like models (DINOv2's 14-pixel patches are resampled to 16); ConvNeXt ignores them.
        ``conversion``: how a release checkpoint's patch kernel and position grid are
        resampled, "official" (the official Rein converter's, default) or "timm"
        (see ``load_timm_checkpoint``)."""
        import timm

        kwargs = dict(timm_kwargs)
        if not name.startswith("convnext"):
            kwargs.setdefault("img_size", img_size)
            kwargs.setdefault("patch_size", patch_size)
            if not name.startswith("samvit"):
                kwargs.setdefault("dynamic_img_size", True)
        if not timm.is_model(name):
            from .dinov3 import missing_model_hint

            raise ValueError(f"{name!r} is not a timm model name{missing_model_hint(name)}")
        model = timm.create_model(name, pretrained=False, **kwargs)
        if checkpoint is not None:
            load_timm_checkpoint(model, checkpoint, conversion)
        family = _family(model)
        rein_kw = dict(token_length=token_length, lora_dim=lora_dim, query_dims=query_dims, fused=fused,
                       link_token_to_query=link_token_to_query)
        if family == "convnext":
            # one ReinLayer per stage with a layer per block, as the official ReinsConvNeXt
            dims = [info["num_chs"] for info in model.feature_info]
            rein = nn.ModuleList(ReinLayer(len(stage.blocks), c, 4, **rein_kw) for stage, c in zip(model.stages, dims))
            out_indices = list(range(len(dims))) if out_indices is None else out_indices
        else:
            C = model.embed_dim
            rein = ReinLayer(len(model.blocks), C, patch_size, **rein_kw)
            out_indices = default_out_indices(len(model.blocks)) if out_indices is None else out_indices
        return cls(model, rein, out_indices)

    def _blocks(self) -> list:
        """(hook key, block) for every block Rein refines: the block index, or for ConvNeXt
        (stage, block index within the stage), as the official ReinsConvNeXt counts."""
        if self.family == "convnext":
            return [((s, b), blk) for s, stage in enumerate(self.backbone.stages) for b, blk in enumerate(stage.blocks)]
        return list(enumerate(self.backbone.blocks))

    # ------------------------------------------------------------------ forward

    def _refine(self, x: Tensor, blk: nn.Module) -> Tensor:
        if self.family == "vit":
            return self._rein_call(self.rein, x, blk, batch_first=True, num_prefix_tokens=self.backbone.num_prefix_tokens)
        if self.family == "sam":  # NHWC
            B, H, W, C = x.shape
            y = self._rein_call(self.rein, x.reshape(B, H * W, C), blk, batch_first=True, num_prefix_tokens=0)
            return y.reshape(B, H, W, C)
        B, C, H, W = x.shape  # convnext block: NCHW, its stage's ReinLayer, its index in the stage
        stage, block = blk._rein_key
        y = self.rein[stage](x.flatten(2).transpose(1, 2), block, batch_first=True, has_cls_token=False)
        return y.transpose(1, 2).reshape(B, C, H, W)

    @staticmethod
    def _rein_call(layer: ReinLayer, x: Tensor, blk: nn.Module, **kw) -> Tensor:
        """Layer ``blk``'s Rein on x: with the operands bound to the block (the fused
        layer's for x's compute dtype, or the reference's tokens), else by the layer's own
        call."""
        bound = blk._rein_operands
        if bound is not None:
            cdtype, operands = bound
            if cdtype is None:
                return layer.apply_tokens(x, operands, **kw)
            if layer.compute_dtype(x) == cdtype:
                return layer.apply_operands(x, operands, cdtype, **kw)
        return layer(x, blk._rein_key, **kw)

    def queries(self) -> Tensor | None:
        if self.family == "convnext":
            qs = [r.queries() for r in self.rein if r.link_token_to_query]
            return torch.stack(qs).sum(0) if qs else None
        return self.rein.queries() if self.rein.link_token_to_query else None

    def forward(self, images: Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if self.family != "convnext":  # ConvNeXt takes any size; a ViT cuts whole patches
            ph, pw = self.backbone.patch_embed.patch_size
            if H % ph or W % pw:
                raise ValueError(f"images of {H}x{W} pixels do not fit the backbone's {ph}x{pw}-pixel patches: "
                                 f"pad or resize them to multiples, e.g. {-(-H // ph) * ph}x{-(-W // pw) * pw}")
        unique = sorted(set(self.out_indices))
        bound = self._bind_operands(images)
        try:
            with self._rein_prepared():
                maps = self.backbone.forward_intermediates(
                    images, indices=unique, norm=False, stop_early=True,
                    output_fmt="NCHW", intermediates_only=True,
                )
        finally:
            if bound:
                for _, blk in self._blocks():
                    blk._rein_operands = None
        by_index = dict(zip(unique, maps))
        features = []
        for level, idx in enumerate(self.out_indices):
            f = by_index[idx]
            scale = (H / f.shape[-2]) / TARGET_STRIDES[level]
            if scale != 1:
                f = F.interpolate(f, scale_factor=scale, mode="bilinear", align_corners=False)
            features.append(f)
        q = self.queries()
        return (features, q) if q is not None else features

    def _bind_operands(self, images: Tensor) -> bool:
        """Form the operands of all Rein layers once and bind each to its block, for one
        forward pass of a ViT-like backbone: (compute dtype, the fused layer's operands),
        or (None, the layer's tokens) on the reference path. Not inside activation
        checkpointing (see the module's docstring), nor where the fused path was asked for
        and cannot run (the layer's own call says so); returns whether it bound them."""
        layer = self.rein
        # (torch.compile traces no saved-tensor hooks, and cannot ask for them)
        hooks = not torch.compiler.is_compiling() and _saved_tensor_hooks_active()
        if self.family == "convnext" or hooks or (
                torch.is_grad_enabled() and getattr(self.backbone, "grad_checkpointing", False)):
            return False
        dev = images.device.type
        cdtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else layer.mlp_delta_f.weight.dtype
        if layer.fused_available(images, cdtype):
            bound = [(cdtype, operands) for operands in layer.layer_operands(cdtype)]
        elif not layer.fused:
            bound = [(None, T) for T in layer.get_tokens(-1).unbind(0)]
        else:
            return False
        for (_, blk), b in zip(self._blocks(), bound):
            blk._rein_operands = b
        return True

    def _rein_prepared(self) -> contextlib.AbstractContextManager:
        """ConvNeXt's per-stage layers: operands formed once for the whole pass
        (``ReinLayer.prepared``; layers inside activation checkpointing form their own),
        except inside torch.compile, which cannot trace the block's context variable."""
        if self.family != "convnext" or torch.compiler.is_compiling():
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for layer in self.rein:
            stack.enter_context(layer.prepared())
        return stack

    # ------------------------------------------------------------------ training state

    def train(self, mode: bool = True) -> "ReinBackbone":
        """Only Rein trains: the backbone stays frozen and in eval mode (no dropout, no drop-path)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint each (block + Rein) pair: timm's checkpointing wraps the block call,
        and Rein runs inside it as the block's forward hook."""
        self.backbone.set_grad_checkpointing(enable)

    def print_trainable_parameters(self) -> None:
        """PEFT's summary line: the parameters that train (Rein's), all of them, and the share."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def rein_state_dict(self) -> dict[str, Tensor]:
        """Rein's parameters only (no backbone weights), keys prefixed ``rein.``."""
        return {f"rein.{k}": v for k, v in self.rein.state_dict().items()}

    def load_rein_state_dict(self, state: Mapping[str, Tensor], strict: bool = True):
        inner = {k.removeprefix("rein."): v for k, v in state.items() if k.startswith("rein.")}
        if strict and len(inner) != len(state):
            extra = sorted(k for k in state if not k.startswith("rein."))
            raise ValueError(f"not Rein parameters: {extra[:10]}")
        return self.rein.load_state_dict(inner, strict=strict)
