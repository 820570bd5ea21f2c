"""Sliding-window evaluation sees every pixel: a perfect predictor scores 100.00 mIoU on
any image size (the official protocol: crop 512, stride 341), as mmseg's slide inference."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rein.data import CLASSES, MEAN, STD
from rein.inference import slide_scores, window_starts
from rein.metrics import ConfusionMatrix, evaluate

K = len(CLASSES)


class Oracle(nn.Module):
    """Reads the label written into channel 0 of the (normalised) image: one-hot scores at
    the window's own resolution, i.e. a perfect predictor of whatever window it is given."""

    def forward(self, x):
        label = (x[:, 0] * STD[0, 0, 0] + MEAN[0, 0, 0]).mul(255).round().long().clamp(0, K - 1)
        return F.one_hot(label, K).permute(0, 3, 1, 2).float()


class Counting(Oracle):
    """The oracle, noting the size of every window it is given in ``seen``."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def forward(self, x):
        self.seen.append(x.shape[-2:])
        return super().forward(x)


def test_window_starts_are_mmseg_grid():
    assert window_starts(720, 512, 341) == [0, 208]
    assert window_starts(1280, 512, 341) == [0, 341, 682, 768]
    assert window_starts(512, 512, 341) == [0]
    assert window_starts(1024, 512, 341) == [0, 341, 512]
    with pytest.raises(ValueError):
        window_starts(100, 512, 341)


@pytest.mark.parametrize("crop,stride", [(512, 341), (96, 64), (40, 40)])
@pytest.mark.parametrize("H,W", [(720, 1280), (1052, 1914), (1024, 2048), (517, 33)])
def test_perfect_predictor_scores_100(H, W, crop, stride):
    gen = torch.Generator().manual_seed(H * W)
    # blocks of 8x8 pixels with random classes: every window sees several classes
    label = torch.randint(0, K, (1, (H + 7) // 8, (W + 7) // 8), generator=gen)
    label = label.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :H, :W]
    img = ((label.float() / 255 - MEAN[0]) / STD[0])[:, None].expand(1, 3, H, W)
    seen = []
    pred = slide_scores(Counting(seen), img, crop, stride).argmax(1)
    assert pred.shape == (1, H, W)
    assert all(s == (crop, crop) for s in seen)
    cm = ConfusionMatrix()
    cm.update(pred[0], label[0])
    assert cm.summary()["mIoU"] == 100.0
    assert torch.equal(pred, label)


def test_evaluate_through_the_dataset_path():
    class Images:
        def __init__(self):
            gen = torch.Generator().manual_seed(0)
            self.items = []
            for H, W in [(720, 1280), (517, 33)]:
                lbl = torch.randint(0, K, (H // 4 + 1, W // 4 + 1), generator=gen)
                lbl = lbl.repeat_interleave(4, 0).repeat_interleave(4, 1)[:H, :W]
                img = (lbl.float() / 255)[None].expand(3, H, W)
                self.items.append((img, lbl))

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    model = Oracle()
    metrics = evaluate(model, Images(), 512, "cpu")
    assert metrics["mIoU"] == 100.0
    assert all(v in (None, 100.0) for v in metrics["per_class"].values())


def test_official_test_resize():
    from rein.data import fit_scale
    from rein.inference import EVAL_SCALE

    assert fit_scale(1024, 2048, EVAL_SCALE["cityscapes"]) == (512, 1024)
    assert fit_scale(1052, 1914, EVAL_SCALE["gtav"]) == (704, 1280)
    assert fit_scale(720, 1280, EVAL_SCALE["bdd100k"]) == (720, 1280)
    assert fit_scale(1512, 2016, EVAL_SCALE["mapillary"]) == (512, 683)


def test_predict_resizes_then_returns_full_resolution_labels():
    from rein.inference import predict

    # two halves of different classes: exact at full resolution after a down- and up-resize
    H, W = 1052, 1914
    label = torch.zeros(H, W, dtype=torch.long)
    label[:, W // 2:] = 7
    img = label.to(torch.uint8)[None].expand(3, H, W)  # pixels the oracle reads back as labels
    seen = []
    pred = predict(Counting(seen), img, 512, scale=(1280, 720))
    assert pred.shape == (H, W)
    assert (pred == label).float().mean() > 0.999  # only the border column may blur
    assert len(seen) == 2 * 4  # windows over 704 x 1280 (not 3 x 6 over 1052 x 1914)


# mmseg's data preprocessor, in grey levels
MMSEG_MEAN, MMSEG_STD = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])


def _mmseg_test_input(pixels: np.ndarray, scale: tuple[int, int]) -> np.ndarray:
    """mmseg's test pipeline, written from its statement: ``Resize(scale, keep_ratio=True)``
    is mmcv's ``imrescale``: f = min(max(scale) / max(h, w), min(scale) / min(h, w)), the
    new size (int(w * f + 0.5), int(h * f + 0.5)), and ``cv2.resize`` of the uint8 H x W x
    3 pixels to it, INTER_LINEAR (OpenCV's fixed-point bilinear, its result rounded to
    uint8); then the data preprocessor's (x - mean) / std. Returns [h, w, 3] float64."""
    import cv2

    h, w = pixels.shape[:2]
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    resized = cv2.resize(pixels, (int(w * f + 0.5), int(h * f + 0.5)), interpolation=cv2.INTER_LINEAR)
    return (resized.astype(np.float64) - MMSEG_MEAN) / MMSEG_STD


@pytest.mark.parametrize("scale", [(96, 48), (260, 140)], ids=["down", "up"])
def test_model_input_is_mmsegs_resize_of_the_uint8_pixels(scale):
    """The image is resized as uint8 pixels and rounded before it is normalised, as mmseg
    does (the normalised image resized in floats differs by up to half a grey level,
    which moved logits by up to 0.43 on an official checkpoint)."""
    pytest.importorskip("cv2")
    from rein.inference import model_input

    pixels = np.random.default_rng(0).integers(0, 256, (70, 130, 3), dtype=np.uint8)
    want = _mmseg_test_input(pixels, scale)
    for img in (torch.from_numpy(pixels).permute(2, 0, 1), torch.from_numpy(pixels).permute(2, 0, 1) / 255):
        got = model_input(img, scale)[0].permute(1, 2, 0).double().numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    grey = got * MMSEG_STD + MMSEG_MEAN
    np.testing.assert_allclose(grey, grey.round(), atol=1e-3)  # rounded before normalising


def test_predict_gives_the_model_mmsegs_input():
    pytest.importorskip("cv2")
    from rein.inference import predict

    pixels = np.random.default_rng(1).integers(0, 256, (70, 130, 3), dtype=np.uint8)
    windows = []

    class Recorder(nn.Module):
        def forward(self, x):
            windows.append(x.clone())
            return torch.zeros(x.shape[0], K, *x.shape[-2:])

    assert predict(Recorder(), torch.from_numpy(pixels).permute(2, 0, 1), 96, scale=(96, 48)).shape == (70, 130)
    assert len(windows) == 1  # 48 x 89, padded to one 96 window
    got = windows[0][0, :, :48, :89].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, _mmseg_test_input(pixels, (96, 48)), rtol=0, atol=1e-5)


def test_official_scales_and_strides_at_512_and_1024():
    """The 512 configs' test resizes (ACDC at half resolution, 960x540) and stride 341; the
    1024 Cityscapes -> ACDC config's (2048x1024, 1920x1080) and stride 683."""
    from rein.data import fit_scale
    from rein.inference import eval_scale

    assert eval_scale("acdc-night", 512) == (960, 540) and eval_scale("cityscapes", 512) == (1024, 512)
    assert eval_scale("cityscapes", 1024) == (2048, 1024) and eval_scale("acdc-fog", 1024) == (1920, 1080)
    assert eval_scale("synthetic", 512) is None
    assert fit_scale(1080, 1920, eval_scale("acdc-rain", 512)) == (540, 960)
    for crop, stride in ((512, 341), (1024, 683)):
        seen = []
        slide_scores(Counting(seen), torch.zeros(1, 3, crop, crop + stride), crop)
        assert len(seen) == 2  # exactly one stride apart: the second window ends at the border
        seen.clear()
        slide_scores(Counting(seen), torch.zeros(1, 3, crop, crop + stride + 1), crop)
        assert len(seen) == 3
