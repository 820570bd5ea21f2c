"""Mask2Former with Rein-linked queries: the published Rein head, on HuggingFace
transformers' Mask2Former parts (no mmcv, no mmdet).

The official head is mmdet's ``Mask2FormerHead`` as ``ReinMask2FormerHead`` with
``replace_query_feat=True`` (config ``configs/_base_/models/rein_dinov2_mask2former.py``
of ``w1oves/Rein``). Here:

* pixel decoder: transformers' ``Mask2FormerPixelDecoder``, the same network as mmdet's
  ``MSDeformAttnPixelDecoder``: the stride 32/16/8 maps projected to 256 channels (1x1
  conv + GroupNorm(32)), 6 multi-scale deformable-attention encoder layers over them (8
  heads, 3 levels, 4 points, FFN 1024), then one FPN step to stride 4 and the 1x1
  mask-feature projection;
* transformer decoder: transformers' ``Mask2FormerTransformerModule`` (9 masked-attention
  layers: cross-attention, self-attention, FFN 2048, each followed by LayerNorm; the level
  embedding; the sine position encoding), its learned queries removed. Rein links its
  tokens to the queries instead: the query position embedding of every layer is Rein's
  queries q [m, 256] themselves, and the initial query features are
  ``querys2feat(q)``, a Linear(256, 256);
* class predictor Linear(256, K + 1) (the last class is "no object") and the mask MLP,
  applied to the normalised queries before the first layer and after each: 10 predictions;
* loss: on all 10 predictions, Hungarian matching
  (costs: class 2.0 as -p(class), sigmoid BCE 5.0 and dice 5.0 on 12544 random points),
  then cross-entropy x 2.0 with no-object weight 0.1, and sigmoid BCE x 5.0 and dice x 5.0
  on 12544 points (3x oversampled, 75% chosen by uncertainty) per matched mask. The ground
  truth is one binary mask per class present in the crop (label 255 belongs to none);
  the mask losses are divided by the number of masks averaged over the processes, each
  image counting at least one (an image without a labelled pixel counts 1), as mmdet does.
  ``criterion="static"`` (the default) computes it on fixed shapes, so that it can be
  captured in CUDA graphs (``rein.heads.mask2former_loss``): on CUDA, with fewer classes
  than queries, the matching runs on the device too (scipy's assignment, to the bit) and
  the whole loss is one graph; ``matcher="host"`` keeps scipy on the host between two;
  ``criterion="transformers"`` is transformers' ``Mask2FormerLoss`` with mmdet's mask
  count: the same loss, its random points drawn in other shapes;
* semantic scores: the last prediction's masks resized bilinearly to the input, then
  sum over queries of softmax(class)[:-1] x sigmoid(mask) (mmseg's ``predict``).

``load_official_checkpoint`` (``rein.official``) maps an official checkpoint's
``decode_head.*`` onto this module.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

try:
    from transformers.models.mask2former.modeling_mask2former import (
        Mask2FormerConfig,
        Mask2FormerLoss,
        Mask2FormerMaskedAttentionDecoder,
        Mask2FormerPixelDecoder,
        Mask2FormerPixelDecoderEncoderLayer,
        Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
        Mask2FormerTransformerModule,
    )
except ImportError as e:  # transformers (and scipy, for the matching) come with the "train" extra
    raise ImportError("the mask2former head needs transformers and scipy: pip install transformers scipy "
                      "(or pip install -e '.[train]')") from e

from .light import IGNORE_INDEX
from .mask2former_loss import LOSS_WEIGHTS, StaticMask2FormerLoss, mean_over_processes

CRITERIA = ("static", "transformers")


def hf_config(num_classes: int, dims: int = 256, num_heads: int = 8, encoder_layers: int = 6,
              decoder_layers: int = 9, encoder_ffn_dims: int = 1024, decoder_ffn_dims: int = 2048,
              num_points: int = 12544) -> Mask2FormerConfig:
    """The official head's settings as a transformers config (``decoder_layers`` there
    counts one more than the layers it builds)."""
    return Mask2FormerConfig(
        num_labels=num_classes, hidden_dim=dims, feature_size=dims, mask_feature_size=dims,
        num_attention_heads=num_heads, encoder_layers=encoder_layers, decoder_layers=decoder_layers + 1,
        encoder_feedforward_dim=encoder_ffn_dims, dim_feedforward=decoder_ffn_dims, dropout=0.0, pre_norm=False,
        enforce_input_projection=False, common_stride=4, feature_strides=[4, 8, 16, 32],
        no_object_weight=0.1, class_weight=LOSS_WEIGHTS["loss_cross_entropy"], mask_weight=LOSS_WEIGHTS["loss_mask"],
        dice_weight=LOSS_WEIGHTS["loss_dice"], train_num_points=num_points, oversample_ratio=3.0,
        importance_sample_ratio=0.75, use_auxiliary_loss=True)


class _ReinQueryDecoder(Mask2FormerTransformerModule):
    """transformers' masked-attention decoder module without its learned queries
    (``queries_embedder``, ``queries_features``): ``forward`` takes them."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__(config.hidden_dim, config)
        del self.queries_embedder, self.queries_features

    def forward(self, multi_scale_features, mask_features: Tensor, query_pos: Tensor, query_feat: Tensor):
        # Mask2FormerTransformerModule.forward with the queries given ([m, B, C], sequence first)
        pos, feats, sizes = [], [], []
        for i in range(self.num_feature_levels):
            f = multi_scale_features[i]
            sizes.append(f.shape[-2:])
            pos.append(self.position_embedder(f.shape, f.device, f.dtype, None).flatten(2).permute(2, 0, 1))
            f = self.input_projections[i](f).flatten(2) + self.level_embed.weight[i][None, :, None]
            feats.append(f.permute(2, 0, 1))
        return self.decoder(inputs_embeds=query_feat, multi_stage_positional_embeddings=pos,
                            pixel_embeddings=mask_features, encoder_hidden_states=feats,
                            query_position_embeddings=query_pos, feature_size_list=sizes, return_dict=True)


class _AlwaysEval:
    """A transformers module kept in eval mode, whatever the head's mode: every dropout in
    the head is 0 (as in the official config), so eval mode changes nothing but the
    training-only host work below."""

    def train(self, mode: bool = True):
        return super().train(False)


class _EncoderLayer(_AlwaysEval, Mask2FormerPixelDecoderEncoderLayer):
    """The deformable encoder layer: in training transformers tests
    ``isfinite(hidden_states).all()`` and clamps, a host sync (and a graph break under
    torch.compile) in each of the 6 layers that mmdet's layer does not have."""


class _Decoder(_AlwaysEval, Mask2FormerMaskedAttentionDecoder):
    """The masked-attention decoder: in training transformers' layerdrop (0 here) draws a
    random number per layer, and before 5.24 compares it on the host in each of the 9 layers
    (a sync and a graph break)."""


class _Criterion(Mask2FormerLoss):
    """transformers' Mask2FormerLoss, with the number of masks counted as mmdet counts it
    (at least one per image) and averaged over the processes by torch.distributed
    (transformers does it only through accelerate), as mmdet does:
    once per loss call, where transformers' forward would form it again for each of the
    auxiliary predictions (an all-reduce each)."""

    _num_masks: Tensor | None = None  # the count of the call in progress

    def forward(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels,
                auxiliary_predictions=None):
        outer = self._num_masks is None
        if outer:
            self._num_masks = self.get_num_masks(class_labels, class_labels[0].device)
        try:
            return super().forward(masks_queries_logits, class_queries_logits, mask_labels, class_labels,
                                   auxiliary_predictions=auxiliary_predictions)
        finally:
            if outer:
                self._num_masks = None

    def get_num_masks(self, class_labels, device) -> Tensor:
        if self._num_masks is not None:
            return self._num_masks
        # mmdet's MaskSamplingResult: num_pos = max(number of masks, 1) per image, so an
        # image without a labelled pixel counts 1
        return mean_over_processes(torch.tensor(float(sum(max(len(c), 1) for c in class_labels)), device=device))


def _caffe2_xavier(conv: nn.Conv2d) -> None:
    nn.init.kaiming_uniform_(conv.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _deformable_attention_init(m: Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention) -> None:
    """mmcv's MultiScaleDeformableAttention.init_weights: the sampling offsets start on rays
    (one direction per head, point i at distance i + 1), attention uniform."""
    nn.init.zeros_(m.sampling_offsets.weight)
    theta = torch.arange(m.n_heads, dtype=torch.float32) * (2.0 * math.pi / m.n_heads)
    grid = torch.stack([theta.cos(), theta.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(m.n_heads, 1, 1, 2).repeat(1, m.n_levels, m.n_points, 1)
    for i in range(m.n_points):
        grid[:, :, i, :] *= i + 1
    with torch.no_grad():
        m.sampling_offsets.bias.copy_(grid.view(-1))
    nn.init.zeros_(m.attention_weights.weight)
    nn.init.zeros_(m.attention_weights.bias)
    for lin in (m.value_proj, m.output_proj):
        nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(lin.bias)


def per_class_masks(labels: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """mmseg's ground truth for Mask2Former: per image, the classes present (ignore 255
    excluded) and one binary mask per class, at the labels' resolution."""
    classes, masks = [], []
    for lbl in labels:
        c = torch.unique(lbl)
        c = c[c != IGNORE_INDEX]
        classes.append(c.long())
        masks.append((lbl[None] == c[:, None, None]).float())
    return classes, masks


class Mask2FormerHead(nn.Module):
    """The published head (module docstring). ``in_channels``: the four feature maps'
    channels (strides 4, 8, 16, 32); ``query_dims``: the head's width, which must equal
    Rein's ``query_dims`` (256 in the recipe); the number of queries is Rein's
    ``token_length``. The defaults are the official config; ``num_points`` sets the
    points sampled per mask for the matching and the loss (12544 there); ``criterion``
    the loss's implementation (module docstring); ``matcher`` where the static loss
    matches (``StaticMask2FormerLoss``: "auto", "device" or "host")."""

    def __init__(self, in_channels: list[int], num_classes: int, query_dims: int = 256, num_heads: int = 8,
                 encoder_layers: int = 6, decoder_layers: int = 9, encoder_ffn_dims: int = 1024,
                 decoder_ffn_dims: int = 2048, num_points: int = 12544, criterion: str = "static",
                 matcher: str = "auto"):
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(f"criterion {criterion!r}: choose one of {', '.join(CRITERIA)}")
        if len(in_channels) != 4:
            raise ValueError(f"Mask2FormerHead needs 4 feature maps (strides 4, 8, 16, 32), got {len(in_channels)}")
        if query_dims % 32:
            raise ValueError(f"query_dims {query_dims}: must be a multiple of 32 (GroupNorm with 32 groups)")
        config = hf_config(num_classes, query_dims, num_heads, encoder_layers, decoder_layers, encoder_ffn_dims,
                           decoder_ffn_dims, num_points)
        self.num_classes, self.dims = num_classes, query_dims
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=list(in_channels))
        for layer in self.pixel_decoder.encoder.layers:
            layer.__class__ = _EncoderLayer
            layer.train(False)
        self.transformer = _ReinQueryDecoder(config)
        self.transformer.decoder.__class__ = _Decoder
        self.transformer.decoder.train(False)
        self.querys2feat = nn.Linear(query_dims, query_dims)
        self.class_predictor = nn.Linear(query_dims, num_classes + 1)
        if criterion == "static":
            self.criterion = StaticMask2FormerLoss(num_classes, num_points, matcher=matcher)
        else:
            self.criterion = _Criterion(config, weight_dict=LOSS_WEIGHTS)
            # the no-object class weight is a constant of the loss, not a parameter to save
            self.criterion.register_buffer("empty_weight", self.criterion.empty_weight, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """As mmdet's Mask2FormerHead.init_weights (with MSDeformAttnPixelDecoder's and
        mmcv's MultiScaleDeformableAttention's); the class, mask and querys2feat linears
        keep PyTorch's default initialisation, as there."""
        pd = self.pixel_decoder
        for proj in pd.input_projections:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        for seq in (*pd.lateral_convolutions, *pd.output_convolutions):
            _caffe2_xavier(seq[0])
        _caffe2_xavier(pd.mask_projection)
        nn.init.normal_(pd.level_embed, 0.0, 1.0)
        for p in pd.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for m in pd.encoder.modules():
            if isinstance(m, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
                _deformable_attention_init(m)
        for layer in self.transformer.decoder.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_normal_(p)
            # mmdet's self-attention is an nn.MultiheadAttention: one packed [3C, C]
            # projection drawn at once (its xavier scale), every attention bias zero
            sa = layer.self_attn
            packed = torch.empty(3 * self.dims, self.dims)
            nn.init.xavier_normal_(packed)
            for proj, w in zip((sa.q_proj, sa.k_proj, sa.v_proj), packed.chunk(3)):
                proj.weight.copy_(w)
            for proj in (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj):
                nn.init.zeros_(proj.bias)

    def forward(self, features: list[Tensor], queries: Tensor | None) -> dict[str, tuple[Tensor, ...]]:
        """``{"class_logits": 10 x [B, m, K+1], "mask_logits": 10 x [B, m, H/4, W/4]}``, the
        prediction before the first decoder layer and after each."""
        if queries is None:
            raise ValueError("the mask2former head needs Rein's queries: build the backbone with "
                             "link_token_to_query=True")
        if queries.dim() != 2 or queries.shape[-1] != self.dims:
            raise ValueError(f"Rein's queries must be [m, {self.dims}] (query_dims = the head's), "
                             f"got {tuple(queries.shape)}")
        # fp32 inputs: the sine position encodings are built in the features' dtype (under
        # autocast the convolutions and attention still run in the autocast dtype)
        pd = self.pixel_decoder([f.float() for f in features], return_dict=True)
        B = features[0].shape[0]
        query_pos = queries.unsqueeze(1).expand(-1, B, -1)  # [m, B, C]: transformers' layout
        dec = self.transformer(pd.multi_scale_features, pd.mask_features, query_pos, self.querys2feat(query_pos))
        return {"class_logits": tuple(self.class_predictor(h.transpose(0, 1)) for h in dec.intermediate_hidden_states),
                "mask_logits": tuple(dec.masks_queries_logits)}

    def repeated_layers(self) -> list[list[nn.Module]]:
        """The layers the head repeats, by kind, for regional compilation
        (``rein.train.step.compile_regions``): the pixel decoder's encoder layers, the
        decoder's layers, and its mask predictor (called before the first layer and after
        each)."""
        decoder = self.transformer.decoder
        return [list(self.pixel_decoder.encoder.layers), list(decoder.layers), [decoder.mask_predictor]]

    def loss(self, out: dict, labels: Tensor) -> Tensor:
        if isinstance(self.criterion, StaticMask2FormerLoss):
            return self.criterion(out["class_logits"], out["mask_logits"], labels)
        classes, masks = per_class_masks(labels)
        cls = [c.float() for c in out["class_logits"]]
        msk = [m.float() for m in out["mask_logits"]]
        aux = [{"class_queries_logits": c, "masks_queries_logits": m} for c, m in zip(cls[:-1], msk[:-1])]
        terms = self.criterion(msk[-1], cls[-1], masks, classes, auxiliary_predictions=aux)
        return sum(LOSS_WEIGHTS[k.rstrip("_0123456789")] * v for k, v in terms.items())

    def captured_loss(self, **compile_kw):
        """``loss`` torch.compiled (``mode="reduce-overhead"``: CUDA graphs): one graph with
        the matching on the device, two around it on the host
        (``StaticMask2FormerLoss.compiled``); None for the transformers criterion, whose
        shapes change with the classes present."""
        if not isinstance(self.criterion, StaticMask2FormerLoss):
            return None
        run = self.criterion.compiled(**compile_kw)
        return lambda out, labels: run(out["class_logits"], out["mask_logits"], labels)

    def scores(self, out: dict, size) -> Tensor:
        """[B, K, H, W] at the input's ``size``: sum over queries of softmax(class)[:-1] x
        sigmoid(mask), the masks resized to ``size`` first (mmseg's predict)."""
        logits = out["class_logits"][-1]
        with torch.autocast(logits.device.type, enabled=False):  # scores in fp32, under autocast too
            cls = logits.float().softmax(-1)[..., :-1]
            masks = F.interpolate(out["mask_logits"][-1].float(), size=tuple(size), mode="bilinear",
                                  align_corners=False).sigmoid()
            return torch.einsum("bqk,bqhw->bkhw", cls, masks)
