"""The official Rein training pipeline (mmseg transforms of the GTAV config), stated in
the tests from the config and mmseg's definitions."""
import numpy as np
import pytest
import torch

from rein.data import IGNORE, MEAN, augment_official, normalize, official_scales
from rein.data.transforms import _crop_box, _photometric, _short_edge_size

pytest.importorskip("cv2")


def test_scales_are_the_configs_list():
    # RandomChoiceResize(scales=[int(512 * x * 0.1) for x in range(5, 21)])
    assert official_scales(512) == [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024]
    assert official_scales(1024)[0] == 512 and official_scales(1024)[-1] == 2048


def test_short_edge_resize_keeps_ratio_and_caps_the_long_edge():
    assert _short_edge_size(1052, 1914, 512, 2048) == (512, 932)
    assert _short_edge_size(1914, 1052, 512, 2048) == (932, 512)
    assert _short_edge_size(100, 1000, 1024, 2048) == (205, 2048)  # 10240 capped to 2048


def test_crop_redraws_until_no_class_dominates():
    lbl = np.zeros((1000, 1000), dtype=np.uint8)       # class 0 everywhere ...
    lbl[:, 900:] = 5                                   # ... but a strip of class 5 at the right
    lbl[:, 950:] = IGNORE                              # and unlabelled pixels beyond it
    rng = np.random.default_rng(0)
    boxes = [_crop_box(lbl, 200, rng) for _ in range(50)]
    for y, x in boxes:
        assert 0 <= y <= 800 and 0 <= x <= 800
    # most accepted crops reach the strip: a crop of class 0 alone has ratio 1 >= 0.75
    good = [x for _, x in boxes if x + 200 > 900 and np.mean(lbl[:, x:x + 200] == 0) / np.mean(
        lbl[:, x:x + 200] != IGNORE) < 0.75]
    assert len(good) > 25


def test_photometric_distortion_is_seeded_and_stays_uint8():
    img = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    a = _photometric(img.copy(), np.random.default_rng(7))
    b = _photometric(img.copy(), np.random.default_rng(7))
    assert a.dtype == np.uint8 and a.shape == img.shape and np.array_equal(a, b)
    # four steps, each with probability 1/2: about 1 draw in 16 leaves the image as it is
    unchanged = sum(np.array_equal(_photometric(img.copy(), np.random.default_rng(s)), img) for s in range(400))
    assert 10 <= unchanged <= 45


def test_augment_crops_pads_and_is_a_function_of_its_seed():
    img = torch.rand(3, 300, 420)
    img = (img * 255).round() / 255  # decoded images are exact multiples of 1/255
    lbl = torch.randint(0, 19, (300, 420))
    out1 = augment_official(img, lbl, 512, torch.Generator().manual_seed(3))
    out2 = augment_official(img, lbl, 512, torch.Generator().manual_seed(3))
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    for seed in range(6):
        im, lb = augment_official(img, lbl, 512, torch.Generator().manual_seed(seed))
        assert im.shape == (3, 512, 512) and lb.shape == (512, 512)
        pad = lb == IGNORE  # labels here have no 255: every 255 is padding
        if pad.any():
            assert torch.allclose(normalize(im)[:, pad], torch.zeros(1)), "padding normalises to 0"
            assert torch.allclose(im[:, pad], MEAN.view(3, 1).expand(3, int(pad.sum())))
        assert set(lb[~pad].unique().tolist()) <= set(range(19))
