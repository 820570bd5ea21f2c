"""Inference by the official test protocol: each image resized as mmseg's test pipeline
does, sliding-window class scores, scores resized back to the image, argmax.

``slide_scores`` places windows the way mmseg's ``slide_inference`` does: a start every
``stride`` pixels, the last window clamped to the border, scores of overlapping windows
averaged, so that every pixel is predicted by at least one window. ``predict`` follows
the official test pipelines: the uint8 image resized keeping its ratio to fit (1024, 512)
(Cityscapes, Mapillary), (1280, 720) (GTAV, BDD100K) or (960, 540) (ACDC), slide 512 /
stride 341 there (twice the sizes, 1024 / 683, at crop 1024), scores resized back to
the image's full resolution.
"""
from __future__ import annotations

import sys
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .data import fit_scale, normalize, rescale

# The official test pipelines of the 512-crop configs resize each image, keeping its
# ratio, to fit this (long, short) scale before the sliding window; labels stay at full
# resolution. The 1024-crop configs (Cityscapes -> ACDC) use twice these scales.
EVAL_SCALE = {"cityscapes": (1024, 512), "mapillary": (1024, 512), "gtav": (1280, 720), "bdd100k": (1280, 720),
              **{f"acdc-{c}": (960, 540) for c in ("fog", "night", "rain", "snow")}}
# The official sliding-window strides (test_cfg) by crop; other crops use 2/3 of the crop.
SLIDE_STRIDE = {512: 341, 1024: 683}


def eval_scale(kind: str | None, crop: int) -> tuple[int, int] | None:
    """The official test resize for a dataset kind at a training crop (None: keep the
    image as it is, e.g. the synthetic domains). Scaled with the crop: (2048, 1024) for
    Cityscapes and (1920, 1080) for ACDC at 1024, as the official 1024 configs; for the
    kinds no official 1024 config evaluates, the same rule."""
    base = EVAL_SCALE.get(kind)
    return None if base is None else (round(base[0] * crop / 512), round(base[1] * crop / 512))


def run_test_scale(config) -> dict:
    """The test resize of the first domain a checkpoint's run was evaluated on, as
    ``{"domain": kind, "scale": [long, short] or None}`` (None: each image at its own
    size): the first --target of a rein.train run; the synthetic domains (evaluated at
    their own size) without --source; Cityscapes, the official protocol's first target,
    for a run without --target and for an official checkpoint (a configuration with no
    "source")."""
    if "source" in config and config["source"] is None:
        return {"domain": "synthetic", "scale": None}
    kind = (config.get("target") or ["cityscapes"])[0].split("=", 1)[0].strip().lower()
    scale = eval_scale(kind, config["crop"])
    return {"domain": kind, "scale": list(scale) if scale else None}


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start of every window along one axis of length ``size`` (>= crop): mmseg's grid,
    ceil((size - crop) / stride) + 1 windows, the last one ending at the border."""
    if size < crop or not 0 < stride <= crop:
        raise ValueError(f"need size >= crop and 0 < stride <= crop, got {size}, {crop}, {stride}")
    n = (size - crop + stride - 1) // stride + 1
    return [min(i * stride, size - crop) for i in range(n)]


class WindowGraph:
    """``model(window)`` for windows of one shape, recorded once as a CUDA graph and replayed
    for every window: the host issues one replay instead of the forward's hundreds of
    launches. Recorded after two warm-up calls on a side stream (Triton's autotuning, lazy
    initialisation), under the caller's autocast and grad modes; parameters are read where
    they live, so in-place updates (training, load_state_dict) are seen. The result is the
    graph's own buffer, overwritten by the next replay."""

    def __init__(self, model: nn.Module, example: Tensor):
        self.input = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(self.input)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = model(self.input)

    def __call__(self, window: Tensor) -> Tensor:
        self.input.copy_(window)
        self.graph.replay()
        return self.output


# per model: {(window shape, dtype, autocast, training, parameters' addresses): WindowGraph or
# None where recording failed}
_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def window_runner(model: nn.Module, window: Tensor, cuda_graphs: bool = True):
    """What runs ``model`` on windows like ``window``: a replayed ``WindowGraph`` on CUDA
    (recorded at the first window of its kind), else the model itself. Where recording
    fails, one line says why and the model runs as it is."""
    if not (cuda_graphs and window.is_cuda):
        return model
    dev = window.device.type
    key = (tuple(window.shape), window.dtype, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev),
           model.training, tuple(p.data_ptr() for p in model.parameters()))
    graphs = _GRAPHS.setdefault(model, {})
    if key not in graphs:
        try:
            graphs[key] = WindowGraph(model, window)
        except Exception as e:  # an op that cannot be captured: say so once, run uncaptured
            print(f"rein: sliding-window inference runs uncaptured ({type(e).__name__}: {str(e)[:200]})",
                  file=sys.stderr)
            graphs[key] = None
    return graphs[key] or model


@torch.no_grad()
def slide_scores(model: nn.Module, img: torch.Tensor, crop: int, stride: int | None = None,
                 cuda_graphs: bool = True) -> torch.Tensor:
    """Class scores [B, K, H, W] for normalised images [B, 3, H, W]: windows of ``crop``
    every ``stride`` (default: the official test_cfg, 341 for 512 and 683 for 1024), scores of
    overlapping windows averaged. Images smaller than one window are padded at the
    bottom and right and the padding is cut off again. On CUDA every window is a replay
    of one recorded graph (``cuda_graphs=False``: the model is called as it is)."""
    stride = stride or SLIDE_STRIDE.get(crop, max(1, crop * 2 // 3))
    _, _, H, W = img.shape
    x = F.pad(img, (0, max(0, crop - W), 0, max(0, crop - H)))
    Hp, Wp = x.shape[-2:]
    scores = count = None
    run = window_runner(model, x[:, :, :crop, :crop], cuda_graphs)
    for y in window_starts(Hp, crop, stride):
        for x0 in window_starts(Wp, crop, stride):
            out = run(x[:, :, y:y + crop, x0:x0 + crop])
            out = F.interpolate(out.float(), size=(crop, crop), mode="bilinear", align_corners=False)
            if scores is None:
                scores = torch.zeros(out.shape[0], out.shape[1], Hp, Wp, device=out.device)
                count = torch.zeros(1, 1, Hp, Wp, device=out.device)
            scores[:, :, y:y + crop, x0:x0 + crop] += out
            count[:, :, y:y + crop, x0:x0 + crop] += 1
    assert count.min() > 0, "a pixel no window covered"
    return (scores / count)[:, :, :H, :W]


def model_input(img: Tensor, scale: tuple[int, int] | None) -> Tensor:
    """The model's input for one image [3, H, W] (uint8, or float in [0, 1]), as mmseg's
    test pipeline makes it: resized keeping its ratio to fit ``scale`` on its uint8
    pixels (``rein.data.rescale``; None: as it is), then normalised. Returns [1, 3, h, w]."""
    if scale is not None and fit_scale(*img.shape[-2:], scale) != tuple(img.shape[-2:]):
        img = rescale(img, scale)
    pixels = img.float() / 255 if img.dtype == torch.uint8 else img
    return normalize(pixels)[None]


@torch.no_grad()
def predict(model: nn.Module, img: Tensor, crop: int, scale: tuple[int, int] | None = None,
            stride: int | None = None, device: torch.device | str = "cpu", cuda_graphs: bool = True) -> Tensor:
    """Labels [H, W] of one image [3, H, W] (uint8, or float in [0, 1]) at its own
    resolution, by the official test protocol: the model's input as mmseg's test
    pipeline makes it (``model_input``), slide-window scores there on ``device``, resized
    back bilinearly, argmax."""
    H, W = img.shape[-2:]
    scores = slide_scores(model, model_input(img, scale).to(device), crop, stride, cuda_graphs)
    if scores.shape[-2:] != (H, W):
        scores = F.interpolate(scores, size=(H, W), mode="bilinear", align_corners=False)
    return scores.argmax(1)[0]
