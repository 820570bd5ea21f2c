"""The segmentor every command uses (a ReinBackbone and a head), built from a run's
configuration, and loaded from a checkpoint ``rein.train`` wrote or from an official
Rein checkpoint (whose keys ``rein.official`` converts).

Errors a user can fix are UsageErrors naming the input as the caller names it: the
Python API's argument names by default (``API_NAMES``), the commands' flags where the
commands pass them (``rein.cli.FLAG_NAMES``).
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

import rein_kernels

from .backbones import ReinBackbone
from .checkpoints import CheckpointError, checkpoint_kind, load_tensors, misfit
from .data import CLASSES
from .errors import UsageError
from .heads import build_head
from .official import convert_official_state_dict, load_official_weights, official_state

# The official configs resample DINOv2's 14-pixel patches to 16.
OFFICIAL_PATCH_SIZE = 16
# How errors name load_model's inputs: the Python API's argument names.
API_NAMES = {"checkpoint": "checkpoint", "backbone_checkpoint": "backbone_checkpoint",
             "backbone": "backbone_name", "crop": "crop"}


def check_backbone(name: str, patch_size: int, crop: int, names: dict | None = None) -> None:
    """``name`` is a timm model name and ``crop`` a multiple of its patch (or stride).
    ``names``: what the caller calls "backbone" and "crop" (default: the flags)."""
    import timm

    n = {"backbone": "--backbone", "crop": "--crop", **(names or {})}

    if not timm.is_model(name):
        import difflib

        from .backbones.dinov3 import missing_model_hint

        near = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(near)}?)" if near else " (see timm.list_models())"
        raise UsageError(f"{n['backbone']} {name!r} is not a timm model name{missing_model_hint(name) or hint}")
    stride = 32 if name.startswith("convnext") else patch_size
    if crop < stride or crop % stride:
        raise UsageError(f"{n['crop']} {crop} is not a multiple of the backbone's {stride}-pixel "
                         f"{'stride' if stride == 32 else 'patch'}; e.g. {n['crop']} {max(stride, crop // stride * stride)}")


def backfill(saved: dict) -> dict:
    """A saved run configuration with the flags added since it was written set to what
    that run did: before --conversion existed, checkpoints were converted as timm does; before
    head_kwargs, every head had its default size; before --precision, --amp meant bf16 and
    its absence fp32."""
    saved = dict(saved)
    saved.setdefault("conversion", "timm")
    saved.setdefault("head_kwargs", {})
    saved.setdefault("precision", "bf16" if saved.pop("amp", False) else "fp32")
    return saved


def _features_and_queries(out):
    """ReinBackbone returns (features, queries), or features alone without queries."""
    return out if isinstance(out, tuple) else (out, None)


class Segmentor(nn.Module):
    """Backbone + head. In training mode ``forward`` gives the head's raw output (for
    ``head.loss``), in eval mode the class scores [B, K, h, w] (``head.scores``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images):
        out = self.head(*_features_and_queries(self.backbone(images)))
        return out if self.training else self.head.scores(out, images.shape[-2:])


def build_model(args, device, checkpoint_flag: str = "--checkpoint", backbone_flag: str = "--backbone") -> Segmentor:
    """Backbone (from ``args.checkpoint``), Rein and head as the run's flags say; with
    ``args.init_from_official``, Rein and the head (and, when the file carries it and no
    --checkpoint was given, the frozen backbone: recorded in ``args.checkpoint`` so that
    resumed runs and prediction rebuild the same one) from an official checkpoint."""
    torch.manual_seed(args.seed)
    head_kwargs = dict(args.head_kwargs)
    rein_kwargs = {"link_token_to_query": args.head != "light"}
    if args.head != "light":  # the head's width is Rein's query width
        rein_kwargs["query_dims"] = head_kwargs.setdefault("query_dims", 256)
    try:
        bb = ReinBackbone.from_timm(args.backbone, checkpoint=args.checkpoint, img_size=args.crop,
                                    patch_size=args.patch_size, fused=args.fused, conversion=args.conversion,
                                    **rein_kwargs, **args.timm_kwargs)
    except TypeError as e:  # a timm model of a family ReinBackbone does not wrap (e.g. a ResNet)
        raise UsageError(f"{backbone_flag} {args.backbone}: not a backbone Rein can refine here; use a ViT "
                         f"(DINOv2, CLIP, EVA02), SAM or ConvNeXt model ({e})") from None
    except (FileNotFoundError, ValueError) as e:
        if args.checkpoint is None:
            raise
        raise UsageError(_about(checkpoint_flag, args.checkpoint, e)) from None
    bb = bb.to(device)
    try:
        head = build_head(args.head, bb.feature_info.channels(), len(CLASSES), **head_kwargs)
    except (ValueError, ImportError) as e:  # a checkpoint of a removed head; transformers missing
        raise UsageError(f"--head {args.head}: {e}") from None
    if getattr(args, "init_from_official", None):
        try:
            had_backbone = load_official_weights(args.init_from_official, bb, head,
                                                 load_backbone=args.checkpoint is None)
        except ValueError as e:
            raise UsageError(_about("--init-from-official", args.init_from_official, e)) from None
        if had_backbone and args.checkpoint is None:
            args.checkpoint = args.init_from_official
    return Segmentor(bb, head).to(device)


def _about(flag: str, path, error: Exception) -> str:
    """An error about the file a flag names, as one line that names both once."""
    if isinstance(error, (CheckpointError, FileNotFoundError)):  # its message starts with the file
        return f"{flag} {error}"
    return f"{flag} {path}: {error}"


def load_model(checkpoint: str, backbone_checkpoint: str | None, device: torch.device, fused: bool,
               official: dict | None = None, names: dict | None = None):
    """The trained model (backbone + Rein + head) and its configuration, from a checkpoint
    ``rein.train`` wrote or, when ``official`` is given (``{"backbone": timm name, "crop":
    ...}``), also from an official Rein checkpoint: the recipe's model (Mask2Former head,
    official weight conversion) with that backbone. ``fused``: Rein's kernels where they
    can run on ``device``. Errors (UsageError) name the inputs as ``names`` does (default
    ``API_NAMES``; the commands pass their flags)."""
    n = {**API_NAMES, **(names or {})}
    path = Path(checkpoint)
    if path.is_dir():
        hint = f"; did you mean {path / 'checkpoint.pth'}?" if (path / "checkpoint.pth").is_file() else ""
        raise UsageError(f"{n['checkpoint']} {path} is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise UsageError(f"{n['checkpoint']} {path} does not exist")
    try:
        ck = load_tensors(path)
    except CheckpointError as e:
        raise UsageError(_about(n["checkpoint"], path, e)) from None
    kind = checkpoint_kind(ck)
    if kind == "backbone":
        raise UsageError(f"{n['checkpoint']} {path} holds backbone weights (timm/DINOv2 names), not a Rein "
                         f"checkpoint: pass it as {n['backbone_checkpoint']}")
    is_ours = kind == "rein.train"
    if is_ours:
        config = backfill(ck["config"])
    elif official is not None:
        try:
            state = official_state(ck)
            has_backbone = bool(convert_official_state_dict(state)["backbone"])
        except ValueError as e:
            raise UsageError(f"{n['checkpoint']} {path}: neither a rein.train checkpoint nor an official Rein one ({e})") \
                from None
        if backbone_checkpoint is None and not has_backbone:
            raise UsageError(f"{n['checkpoint']} {path} is an official Rein checkpoint without the frozen backbone: "
                             f"pass its weights with {n['backbone_checkpoint']} (e.g. dinov2_vitl14_pretrain.pth)")
        check_backbone(official["backbone"], OFFICIAL_PATCH_SIZE, official["crop"], n)
        # the frozen backbone from backbone_checkpoint, or from the file already read
        config = dict(backbone=official["backbone"], crop=official["crop"], patch_size=OFFICIAL_PATCH_SIZE,
                      head="mask2former", head_kwargs={}, timm_kwargs={}, conversion="official", seed=0,
                      checkpoint=None)
    else:
        raise UsageError(f"{n['checkpoint']} {path} is not a checkpoint rein.train wrote")
    if backbone_checkpoint is not None:
        if not Path(backbone_checkpoint).is_file():
            raise UsageError(f"{n['backbone_checkpoint']} {backbone_checkpoint} does not exist (or is not a file)")
        config["checkpoint"] = backbone_checkpoint
    if config.get("checkpoint") and not Path(config["checkpoint"]).is_file():
        raise UsageError(f"the run's backbone weights {config['checkpoint']} are missing: pass them with "
                         f"{n['backbone_checkpoint']}")
    config["fused"] = fused and rein_kernels.is_available(torch.empty(0, device=device))
    config["init_from_official"] = None  # Rein and the head come from the checkpoint itself
    # which flags the configuration overrides (the commands say so)
    config["checkpoint_kind"] = "rein.train" if is_ours else "official"
    args = argparse.Namespace(**config)
    try:
        model = build_model(args, device, checkpoint_flag=n["backbone_checkpoint"] if backbone_checkpoint else
                            "the run's backbone --checkpoint", backbone_flag=n["backbone"])
    except UsageError as e:
        raise UsageError(f"{e}{'' if is_ours else _other_backbone_hint(state, official['backbone'], n)}") from None
    try:
        if is_ours:
            load_trained(model, ck)
        else:
            load_official_weights(state, model.backbone, model.head, load_backbone=backbone_checkpoint is None)
    except ValueError as e:
        if is_ours:
            raise UsageError(f"{n['checkpoint']} {path} does not fit the model it describes: {e}") from None
        raise UsageError(f"{n['checkpoint']} {path}: {e}{_other_backbone_hint(state, official['backbone'], n)}") \
            from None
    return model.eval(), args


def load_trained(model: Segmentor, ck: dict) -> None:
    """Rein's and the head's weights of a ``rein.train`` checkpoint into the model its
    configuration builds; a ValueError says in one line what does not fit."""
    rein = {k.removeprefix("rein."): v for k, v in ck["rein"].items()}
    problems = [f"{part}: {p}" for part, p in (("Rein", misfit(rein, model.backbone.rein.state_dict())),
                                                ("head", misfit(ck["head"], model.head.state_dict()))) if p]
    if problems:
        raise ValueError("; ".join(problems))
    device = next(model.parameters()).device
    model.backbone.load_rein_state_dict({k: v.to(device) for k, v in ck["rein"].items()})
    model.head.load_state_dict(ck["head"])


def _other_backbone_hint(state: dict, backbone: str, n: dict) -> str:
    """For an official checkpoint that does not fit: the size of the ViT its Rein was
    trained on (from its tokens), so that the user can pick the backbone."""
    b = state.get("backbone.reins.learnable_tokens_b", state.get("backbone.reins.learnable_tokens"))
    if b is None or b.dim() != 3:
        return ""
    return (f". Its Rein refines a {b.shape[0]}-block, {b.shape[-1]}-wide backbone: if {backbone} is not that, "
            f"pass the right one with {n['backbone']}")


def load_official_checkpoint(path_or_state, backbone=None, head=None, load_backbone: bool = True, *,
                             backbone_checkpoint: str | None = None, backbone_name: str = "vit_large_patch14_dinov2",
                             crop: int = 512, device=None, fused: bool = True):
    """Load an official Rein checkpoint (a file or its state dict) into a ``ReinBackbone``
    and a ``Mask2FormerHead`` built with the same sizes (for the published DINOv2-L
    checkpoints: ``ReinBackbone.from_timm("vit_large_patch14_dinov2", lora_dim=16)`` and
    ``Mask2FormerHead([1024] * 4, 19)``), strictly: every key is placed and every
    parameter filled, or a ValueError names what does not fit. Frozen backbone weights in
    the file (``generate_full_weights.py``) are loaded too (unless ``load_backbone=False``);
    otherwise load them from the DINOv2 file with ``from_timm(checkpoint=...)``. Returns
    whether the file carried the frozen backbone.

    With a file and no modules, builds the model instead and returns it, in eval mode:
    ``model = rein.load_official_checkpoint("dinov2_rein_and_head.pth",
    backbone_checkpoint="dinov2_vitl14_pretrain.pth")``, the recipe's model
    (``backbone_name``, ``crop``, the Mask2Former head, the official weight conversion);
    ``model(images)`` gives class scores [B, 19, H, W] for one window."""
    if backbone is None and head is None:
        if isinstance(path_or_state, Mapping):
            raise TypeError("load_official_checkpoint: building the model needs the checkpoint file; to load a "
                            "state dict, pass the backbone and head to load it into")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return load_model(str(path_or_state), backbone_checkpoint, dev, fused,
                          official=dict(backbone=backbone_name, crop=crop))[0]
    if backbone is None or head is None:
        raise TypeError("load_official_checkpoint: give both backbone and head, or neither (to build the model)")
    return load_official_weights(path_or_state, backbone, head, load_backbone)
