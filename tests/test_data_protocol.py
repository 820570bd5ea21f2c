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


# ------------------------------------------------------------------ Mapillary at half size
# The official protocol evaluates Mapillary on the files its converter writes
# (w1oves/Rein tools/convert_datasets/mapillary_resize.py, run on the train-id labels that
# mapillary2cityscape.py writes): stated here from that file, for one image and its label.


def official_converter(src_img, src_lbl, dst_img, dst_lbl):
    """mapillary_resize.py's resize_half on one pair: each file opened with PIL as it is
    (no mode conversion), the half size taken by floor division of the image's size, the
    image resampled with Image.BICUBIC and saved to a .jpg path with PIL's defaults, the
    label resampled with Image.NEAREST to the same size and saved to a .png path."""
    from PIL import Image

    im = Image.open(src_img)
    size = (im.size[0] // 2, im.size[1] // 2)
    im.resize(size, resample=Image.BICUBIC).save(dst_img)
    Image.open(src_lbl).resize(size, resample=Image.NEAREST).save(dst_lbl)


# v1.2 ids of the test label and their train ids (road, sidewalk, building, sky, car,
# unlabeled), as mapillary2cityscape.py --train_id writes them
V12_TO_TRAIN = {13: 0, 15: 1, 17: 2, 27: 10, 55: 13, 65: 255}


def street_like(path, size=(301, 203)):
    """A small camera-like JPEG (quality 95): smooth gradients, periodic texture, noise and
    sharp-edged blocks, odd width and height (the floor division shows); and its v1.2 label."""
    from PIL import Image

    W, H = size
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    rng = np.random.default_rng(7)
    img = np.stack([110 + 70 * np.sin(x / 6.3) + 30 * np.cos(y / 4.1),
                    120 + 60 * np.sin((x + 2 * y) / 13.0) + 0.2 * y,
                    90 + 50 * np.cos(x * y / 800.0) + 0.3 * x], -1) + rng.normal(0, 10, (H, W, 3))
    img[70:130, 90:210] = (205, 40, 45)    # a car-like block
    img[:40] = (135, 180, 230) + rng.normal(0, 3, (40, W, 3))   # sky
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)
    lbl = np.full((H, W), 17, np.uint8)
    lbl[:40], lbl[150:] = 27, 13
    lbl[150:, :60], lbl[70:130, 90:210], lbl[195:, 250:] = 15, 55, 65
    return lbl


def _mapillary_root(root, n=2):
    """Original v1.2 layout: validation/images/*.jpg, validation/labels/*.png."""
    from PIL import Image

    (root / "validation/images").mkdir(parents=True)
    (root / "validation/labels").mkdir(parents=True)
    for i in range(n):
        lbl = street_like(root / f"validation/images/m{i}.jpg", size=(301 - 2 * i, 203 + i))
        Image.fromarray(lbl, mode="L").save(root / f"validation/labels/m{i}.png")
    return root


def _run_official(root, out):
    """The official pipeline's files: labels to train ids, then mapillary_resize.py."""
    from PIL import Image

    (out / "val_img").mkdir(parents=True)
    (out / "val_label").mkdir(parents=True)
    (out / "train_ids").mkdir()
    for img in sorted((root / "validation/images").glob("*.jpg")):
        v12 = np.asarray(Image.open(root / f"validation/labels/{img.stem}.png"))
        train = np.vectorize(V12_TO_TRAIN.get)(v12).astype(np.uint8)
        Image.fromarray(train, mode="L").save(out / "train_ids" / f"{img.stem}.png")
        official_converter(img, out / "train_ids" / f"{img.stem}.png", out / "val_img" / f"{img.stem}.jpg",
                           out / "val_label" / f"{img.stem}.png")


def test_mapillary_validation_is_the_official_converters_jpeg_byte_for_byte(tmp_path):
    import cv2
    from PIL import Image

    from rein.data import FolderDataset
    from rein.data.images import official_half_jpeg

    root = _mapillary_root(tmp_path / "mapillary")
    _run_official(root, tmp_path / "official")
    ds = FolderDataset("mapillary", root, "val")
    ds.check()
    plain = FolderDataset("mapillary", root, "val", mapillary_half="plain")
    for i, (img_path, _) in enumerate(ds.pairs):
        written = tmp_path / "official/val_img" / img_path.name
        assert official_half_jpeg(img_path) == written.read_bytes()
        want = np.array(Image.open(written).convert("RGB"))
        # mmseg's LoadImageFromFile decodes with OpenCV: the same pixels
        assert np.array_equal(cv2.imread(str(written))[..., ::-1], want)
        img, lbl = ds[i]
        assert img.shape[1:] == want.shape[:2] == ((203 + i) // 2, (301 - 2 * i) // 2)
        assert torch.equal((img * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(want))
        official_lbl = np.asarray(Image.open(tmp_path / "official/val_label" / f"{img_path.stem}.png"))
        assert np.array_equal(lbl.numpy(), official_lbl)
        # the re-encode is not a rounding detail: the plain halving differs visibly
        plain_img = plain[i][0]
        assert torch.equal(plain[i][1], lbl)
        assert (plain_img - img).abs().max() * 255 > 20 and ((plain_img - img).abs() > 0).float().mean() > 0.3
        with Image.open(img_path) as im:  # plain: PIL bicubic to (W // 2, H // 2), nothing else
            halved = np.array(im.convert("RGB").resize(((301 - 2 * i) // 2, (203 + i) // 2), Image.BICUBIC))
        assert torch.equal((plain_img * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(halved))


def test_the_official_converters_output_is_read_as_it_is(tmp_path):
    import shutil

    from rein.data import FolderDataset
    from rein.errors import DataError

    originals = _mapillary_root(tmp_path / "originals")
    root = tmp_path / "mapillary"
    _run_official(originals, root / "half")  # the official README's data/mapillary/half/{val_img,val_label}
    shutil.rmtree(root / "half/train_ids")
    from_originals = FolderDataset("mapillary", originals, "val")
    for where in (root, root / "half"):  # the root, or the converter's output folder itself
        ds = FolderDataset("mapillary", where, "val")
        ds.check()
        assert ds.half is None and [p.name for p, _ in ds.pairs] == ["m0.jpg", "m1.jpg"]
        for i in range(2):  # not halved again, labels read as train ids: what rein halves itself
            assert torch.equal(ds[i][0], from_originals[i][0]) and torch.equal(ds[i][1], from_originals[i][1])
    with pytest.raises(DataError, match="drop --mapillary-half plain"):
        FolderDataset("mapillary", root, "val", mapillary_half="plain")
    # beside the originals, the converter's files are read (the same pixels); plain halves the originals
    shutil.copytree(originals / "validation", root / "validation")
    assert torch.equal(FolderDataset("mapillary", root, "val")[0][0], from_originals[0][0])
    assert FolderDataset("mapillary", root, "val", mapillary_half="plain").half == "plain"
    # the converter's output in place of the original layout would be halved again and its
    # train ids read as v1.2 ids: refused in one line that says what to give
    moved = tmp_path / "moved"
    shutil.copytree(root / "half/val_img", moved / "validation/images")
    shutil.copytree(root / "half/val_label", moved / "validation/labels")
    with pytest.raises(DataError, match=r"^mapillary: label .*m0.png holds 255, which no Mapillary v1.2 label does"
                                        r".*half/val_img and half/val_label"):
        FolderDataset("mapillary", moved, "val").check()
