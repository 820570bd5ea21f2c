"""rein.predict: label-id, colour and overlay PNGs from a trained checkpoint; the sample
pictures training writes; clear errors."""
import numpy as np
import pytest
import torch

pytest.importorskip("timm")
from PIL import Image  # noqa: E402

from rein.data import LABEL_IDS, PALETTE, colorize  # noqa: E402
from rein.predict import main  # noqa: E402
from rein.train.loop import main as train  # noqa: E402
from test_train import FAST, make_fixtures  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train(["--max-iters", "2", "--out", str(out), *FAST]) == 0
    return out


def test_training_writes_sample_pictures(trained):
    pics = sorted(p.name for p in (trained / "samples").glob("*.png"))
    assert pics == ["synthetic-fog.png", "synthetic-night.png", "synthetic-overcast.png", "synthetic-source.png"]
    assert all((trained / "samples" / p).stat().st_size > 5000 for p in pics)


def test_predict_writes_label_ids_colours_and_overlays(trained, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (70, 90)), ("b.jpg", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(imgs / name)
    out = tmp_path / "pred"
    assert main(["--checkpoint", str(trained / "checkpoint.pth"), "--images", str(imgs), "--out", str(out),
                 "--device", "cpu", "--no-fused"]) == 0
    for stem, size in (("a", (70, 90)), ("b", (64, 64))):
        ids = np.asarray(Image.open(out / "labelIds" / f"{stem}.png"))
        color = np.asarray(Image.open(out / "color" / f"{stem}.png"))
        assert ids.shape == size and color.shape == (*size, 3)
        assert set(np.unique(ids)) <= set(LABEL_IDS[:19].tolist())
        train_ids = np.searchsorted(LABEL_IDS[:19], ids)  # label ids are sorted: invert them
        assert np.array_equal(colorize(train_ids), color)
        assert np.asarray(Image.open(out / "overlay" / f"{stem}.png")).shape == (*size, 3)
    assert "2 image(s)" in capsys.readouterr().out


def test_reloaded_model_is_the_trained_one(trained):
    """The model predict rebuilds from the checkpoint scores what training measured."""
    import json

    from rein.data import synthetic_validation
    from rein.metrics import evaluate
    from rein.model import load_model

    model, config = load_model(str(trained / "checkpoint.pth"), None, torch.device("cpu"), fused=False)
    val = synthetic_validation(config.crop)[2]  # night
    assert evaluate(model, val, config.crop, "cpu") == json.loads((trained / "metrics.json").read_text())[val.name]


def test_outputs_never_overwrite_each_other(trained, tmp_path):
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for rel in ("a.png", "a.jpg", "sub/a.png"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(imgs / rel)
    out = imgs / "pred"  # inside the input folder: a rerun must not read its own outputs
    for _ in range(2):
        assert main(["--checkpoint", str(trained / "checkpoint.pth"), "--images", str(imgs), "--out", str(out),
                     "--device", "cpu", "--no-fused"]) == 0
    got = sorted(p.relative_to(out / "labelIds").as_posix() for p in (out / "labelIds").rglob("*.png"))
    assert got == ["a_jpg.png", "a_png.png", "sub/a.png"]


def test_label_ids_as_the_cityscapes_scripts_find_them(trained, tmp_path):
    """cityscapesscripts finds the prediction of city_seq_frame as the one file in the
    prediction tree matching "city_seq_frame*.png": labelIds/ holds exactly one per image,
    in the images' city folders."""
    import fnmatch
    import os

    imgs = tmp_path / "leftImg8bit" / "val"
    for city, frame in (("aachen", "000000_000019"), ("lindau", "000001_000019")):
        (imgs / city).mkdir(parents=True)
        Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(imgs / city / f"{city}_{frame}_leftImg8bit.png")
    out = tmp_path / "pred"
    assert main(["--checkpoint", str(trained / "checkpoint.pth"), "--images", str(imgs), "--out", str(out),
                 "--device", "cpu", "--no-fused"]) == 0
    walk = [(root, names) for root, _, names in os.walk(out / "labelIds")]
    for pattern in ("aachen_000000_000019*.png", "lindau_000001_000019*.png"):
        hits = [os.path.join(r, n) for r, names in walk for n in names if fnmatch.fnmatch(n, pattern)]
        assert len(hits) == 1, hits


def test_palette_and_label_ids_are_cityscapes():
    assert PALETTE.shape == (19, 3) and tuple(PALETTE[0]) == (128, 64, 128) and tuple(PALETTE[13]) == (0, 0, 142)
    assert LABEL_IDS[:19].tolist() == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


@pytest.mark.parametrize("extra,needle", [
    (["--images", "/nowhere"], "--images /nowhere: no such file or folder"),
    (["--scale", "big"], "--scale 'big'"),
    (["--checkpoint", __file__], f"--checkpoint {__file__} is not a PyTorch checkpoint file"),
])
def test_predict_bad_input_is_one_line(trained, tmp_path, capsys, extra, needle):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    argv = ["--checkpoint", str(trained / "checkpoint.pth"), "--images", str(tmp_path), "--out",
            str(tmp_path / "o"), "--device", "cpu", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_predict_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"")
    assert main(["--checkpoint", str(tmp_path / "none.pth"), "--images", str(tmp_path), "--out",
                 str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {tmp_path / 'none.pth'} does not exist" in err and len(err.strip().splitlines()) == 1


def test_predict_names_a_non_image_before_loading_any_model(tmp_path, capsys):
    """A named file that is not an image is reported at once, not after the model loaded
    (the checkpoint here does not even exist)."""
    (tmp_path / "notes.txt").write_text("not a picture")
    assert main(["--checkpoint", str(tmp_path / "none.pth"), "--images", str(tmp_path / "notes.txt"),
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt: not an image file (expected .bmp" in err and len(err.strip().splitlines()) == 1


def _scales_used(monkeypatch) -> list:
    """The test resize rein.predict passes to the inference, call by call."""
    import rein.predict

    seen, real = [], rein.predict.predict

    def spy(model, img, crop, scale=None, **kw):
        seen.append(scale)
        return real(model, img, crop, scale, **kw)

    monkeypatch.setattr(rein.predict, "predict", spy)
    return seen


def test_predict_defaults_to_the_scale_the_run_was_evaluated_at(tmp_path, capsys, monkeypatch):
    """A run evaluated on Cityscapes at crop 64 records that test scale (128 x 64); rein.predict
    resizes to it by default and says so; --scale native keeps each image's size; a
    checkpoint from before the record, the same from its configuration."""
    roots = make_fixtures(tmp_path / "data")
    run = tmp_path / "run"
    assert train(["--source", f"gtav={roots['gtav']}", "--target", f"cityscapes={roots['cityscapes']}",
                  "--head", "light", "--max-iters", "1", "--out", str(run), *FAST]) == 0
    ck = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ck["config"]["test_scale"] == {"domain": "cityscapes", "scale": [128, 64]}
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((70, 90, 3), dtype=np.uint8)).save(imgs / "a.png")
    seen = _scales_used(monkeypatch)
    common = ["--images", str(imgs), "--out", str(tmp_path / "pred"), "--device", "cpu", "--no-fused"]
    capsys.readouterr()
    assert main(["--checkpoint", str(run / "checkpoint.pth"), *common]) == 0
    says = "rein-predict: each image resized keeping its ratio to fit 128x64, the test scale of cityscapes at crop 64"
    assert capsys.readouterr().out.startswith(says)
    assert main(["--checkpoint", str(run / "checkpoint.pth"), *common, "--scale", "native"]) == 0
    assert capsys.readouterr().out.startswith("rein-predict: each image at its own size (--scale native)")
    del ck["config"]["test_scale"]
    torch.save(ck, tmp_path / "older.pth")
    assert main(["--checkpoint", str(tmp_path / "older.pth"), *common]) == 0
    assert capsys.readouterr().out.startswith(says)
    assert seen == [(128, 64), None, (128, 64)]
    assert np.asarray(Image.open(tmp_path / "pred" / "labelIds" / "a.png")).shape == (70, 90)


def test_predict_default_scale_of_synthetic_and_official_checkpoints(trained, tmp_path, capsys, monkeypatch):
    import argparse

    from rein.predict import _scale

    assert torch.load(trained / "checkpoint.pth", weights_only=True)["config"]["test_scale"] == {
        "domain": "synthetic", "scale": None}
    seen = _scales_used(monkeypatch)
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert main(["--checkpoint", str(trained / "checkpoint.pth"), "--images", str(tmp_path / "a.png"), "--out",
                 str(tmp_path / "o"), "--device", "cpu", "--no-fused"]) == 0
    assert capsys.readouterr().out.startswith("rein-predict: each image at its own size, as synthetic was evaluated")
    assert seen == [None]
    official = argparse.Namespace(backbone="vit_large_patch14_dinov2", crop=1024)  # load_model's, no "source"
    assert _scale(None, official)[0] == (2048, 1024)  # the official protocol's Cityscapes scale at 1024
