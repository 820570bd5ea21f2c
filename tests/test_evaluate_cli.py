"""``python -m rein.evaluate``: the metrics training writes, for a rein.train checkpoint and
for an official Rein checkpoint (mmseg names), and one-line errors for bad input."""
import argparse
import json

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("transformers")

from rein.data import FolderDataset  # noqa: E402
from rein.evaluate import main  # noqa: E402
from rein.inference import EVAL_SCALE  # noqa: E402
from rein.metrics import evaluate  # noqa: E402
from rein.model import build_model  # noqa: E402
from rein.official import _head_key  # noqa: E402
from rein.train.config import SMALL_MASK2FORMER  # noqa: E402
from rein.train.loop import main as train  # noqa: E402

from test_official import official_keys  # noqa: E402
from test_train import FAST, make_fixtures  # noqa: E402

SMALL_VIT = "vit_small_patch14_dinov2"


@pytest.fixture(autouse=True)
def native_scale(monkeypatch):
    """The fixtures' 40x24 images at their own size (the official test resize would blow
    them up to 1024x512: hundreds of windows on a CPU); the resize has its own tests."""
    for kind in ("cityscapes", "bdd100k"):  # scaled by crop / 512 = 1/8 in these tests
        monkeypatch.setitem(EVAL_SCALE, kind, (320, 192))


def _recipe_args():
    """build_model's flags for the recipe's model (full Mask2Former head) on a ViT-S."""
    return argparse.Namespace(backbone=SMALL_VIT, crop=64, patch_size=16, head="mask2former", head_kwargs={},
                              timm_kwargs={}, conversion="official", seed=3, checkpoint=None, fused=False)


def _small_args(depth: int, seed: int):
    """build_model's flags for a shallow ViT-S with the CPU-sized Mask2Former."""
    return argparse.Namespace(backbone=SMALL_VIT, crop=64, patch_size=8, head="mask2former",
                              head_kwargs=dict(SMALL_MASK2FORMER), timm_kwargs={"depth": depth},
                              conversion="official", seed=seed, checkpoint=None, fused=False)


def _official_file(model, path):
    """``model``'s weights under the official names (the fixture's; fewer layers for a
    smaller head), as an mmengine file with the frozen backbone inside, as the official
    generate_full_weights.py writes. (Renamed by the mapping itself: these tests are about
    the commands; tests/test_official.py checks the mapping against mmdet's layers.)"""
    rein, head = model.backbone.rein.state_dict(), model.head.state_dict()
    state = {}
    for k in official_keys():
        if k.startswith("backbone.reins."):
            state[k] = rein[k.removeprefix("backbone.reins.")]
            continue
        names = list(_head_key(k.removeprefix("decode_head."), torch.zeros(3)))
        if all(n in head for n in names):
            state[k] = torch.cat([head[n] for n in names]) if len(names) == 3 else head[names[0]]
    state.update({f"backbone.{k}": v for k, v in model.backbone.backbone.state_dict().items()})
    torch.save({"meta": {"note": "test"}, "state_dict": state}, path)


def test_official_checkpoint_evaluates_as_the_model_it_holds(tmp_path):
    roots = make_fixtures(tmp_path / "data")
    model = build_model(_recipe_args(), torch.device("cpu"))
    with torch.no_grad():
        model.backbone.rein.scale.fill_(0.5)  # Rein's refinement visible in the features
    _official_file(model, tmp_path / "official.pth")
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(tmp_path / "official.pth"), "--backbone", SMALL_VIT, "--crop", "64",
                 "--target", f"cityscapes={roots['cityscapes']}", "--out", str(out), "--device", "cpu",
                 "--no-fused"]) == 0
    got = json.loads((out / "metrics.json").read_text())
    want = evaluate(model.eval(), FolderDataset("cityscapes", roots["cityscapes"], "val"), 64, torch.device("cpu"))
    assert got == {"cityscapes": json.loads(json.dumps(want))}
    assert (out / "samples" / "cityscapes.png").stat().st_size > 1000
    # the same in Python: rein.load_official_checkpoint(path) builds the model it holds
    import rein

    loaded = rein.load_official_checkpoint(tmp_path / "official.pth", backbone_name=SMALL_VIT, crop=64,
                                           device="cpu", fused=False)
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(img), model(img), rtol=0, atol=0)


def test_train_checkpoint_evaluates_and_bad_input_is_one_line(tmp_path, capsys):
    roots = make_fixtures(tmp_path / "data")
    run = tmp_path / "run"
    assert train(["--max-iters", "1", "--out", str(run), *FAST]) == 0
    out = tmp_path / "eval"
    common = ["--target", f"cityscapes={roots['cityscapes']}", "--target", f"bdd100k={roots['bdd100k']}",
              "--device", "cpu", "--no-fused"]
    assert main(["--checkpoint", str(run / "checkpoint.pth"), "--out", str(out), *common]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"cityscapes", "bdd100k"} and all(0 <= m["mIoU"] <= 100 for m in metrics.values())
    capsys.readouterr()

    def fails(*argv, says):
        assert main([*argv, "--out", str(tmp_path / "x"), *common]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err

    fails("--checkpoint", str(tmp_path / "none.pth"), says="does not exist")
    fails("--checkpoint", str(run), says=f"is a folder, not a checkpoint file; did you mean {run / 'checkpoint.pth'}")
    (tmp_path / "text.pth").write_text("hello")
    fails("--checkpoint", str(tmp_path / "text.pth"), says=f"--checkpoint {tmp_path / 'text.pth'} is not a PyTorch "
                                                         "checkpoint file")
    cut = tmp_path / "cut.pth"
    cut.write_bytes((run / "checkpoint.pth").read_bytes()[:5000])
    fails("--checkpoint", str(cut), says=f"--checkpoint {cut} is truncated or corrupt (download or save it again)")
    import timm

    vit = tmp_path / "vit.pth"
    torch.save(timm.create_model(SMALL_VIT, depth=1, img_size=64, patch_size=8).state_dict(), vit)
    fails("--checkpoint", str(vit), says=f"--checkpoint {vit} holds backbone weights (timm/DINOv2 names), not a "
                                         "Rein checkpoint: pass it as --backbone-checkpoint")
    ck = torch.load(run / "checkpoint.pth", weights_only=True)
    ck["config"]["timm_kwargs"] = {"depth": 2}  # a configuration its Rein weights do not fit
    torch.save(ck, tmp_path / "other.pth")
    fails("--checkpoint", str(tmp_path / "other.pth"),
          says=f"--checkpoint {tmp_path / 'other.pth'} does not fit the model it describes: Rein: keys of another "
               "shape (2): learnable_tokens_a: file (4, 100, 16) vs model (2, 100, 16), learnable_tokens_b")
    torch.save({"state_dict": {"backbone.reins.scale": torch.ones(()),
                               "decode_head.querys2feat.weight": torch.ones(2, 2)}}, tmp_path / "bare.pth")
    fails("--checkpoint", str(tmp_path / "bare.pth"), says="--backbone-checkpoint")
    fails("--checkpoint", str(tmp_path / "bare.pth"), "--backbone-checkpoint", str(tmp_path / "nope.pth"),
          says=f"--backbone-checkpoint {tmp_path / 'nope.pth'} does not exist")
    with pytest.raises(SystemExit) as e:  # a required flag missing: one line too
        main(["--checkpoint", "x", "--out", "y"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("rein-evaluate: the following arguments are required: --target") and err.count("\n") == 1
    fails("--checkpoint", str(tmp_path / "bare.pth"), "--backbone-checkpoint", str(run / "checkpoint.pth"),
          "--backbone", "vit_lrage_patch14_dinov2", says="did you mean vit_large_patch14_dinov2")
    assert main(["--checkpoint", str(run / "checkpoint.pth"), "--out", str(tmp_path / "y"), "--device", "cpu",
                 "--target", f"cityscapes={tmp_path / 'nowhere'}"]) == 2
    assert "missing folder" in capsys.readouterr().err


def test_init_from_official_starts_from_the_files_weights(tmp_path, capsys):
    from rein.errors import UsageError

    args = _small_args(depth=2, seed=5)
    source = build_model(args, torch.device("cpu"))
    _official_file(source, tmp_path / "official.pth")
    with pytest.raises(TypeError, match="needs the checkpoint file"):
        import rein

        rein.load_official_checkpoint({"backbone.reins.scale": torch.ones(())})
    args.seed, args.init_from_official = 6, str(tmp_path / "official.pth")
    started = build_model(args, torch.device("cpu"))
    for part in ("head", "backbone"):
        want, got = getattr(source, part).state_dict(), getattr(started, part).state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v), k
    # the frozen backbone came from the file: the run's configuration says so, and a
    # rebuild from it (resume, prediction) loads the same weights
    assert args.checkpoint == str(tmp_path / "official.pth")
    args.init_from_official, args.seed = None, 7
    rebuilt = build_model(args, torch.device("cpu"))
    for k, v in source.backbone.backbone.state_dict().items():
        assert torch.equal(rebuilt.backbone.backbone.state_dict()[k], v), k
    args.checkpoint, args.init_from_official = None, str(tmp_path / "official.pth")
    args.head_kwargs = dict(SMALL_MASK2FORMER, decoder_layers=2)  # a model the file does not fit
    with pytest.raises(UsageError, match=r"--init-from-official .*unexpected keys \(\d+\): transformer.decoder.layers.2"):
        build_model(args, torch.device("cpu"))
    assert train(["--head", "light", "--init-from-official", str(tmp_path / "official.pth"),
                  "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "needs --head mask2former" in capsys.readouterr().err


def test_official_checkpoint_of_another_backbone_says_to_pass_backbone(tmp_path, capsys):
    roots = make_fixtures(tmp_path / "data")
    _official_file(build_model(_recipe_args(), torch.device("cpu")), tmp_path / "official.pth")
    assert main(["--checkpoint", str(tmp_path / "official.pth"), "--backbone", "vit_base_patch14_dinov2",
                 "--crop", "64", "--target", f"cityscapes={roots['cityscapes']}", "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--no-fused"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "12-block, 384-wide backbone" in err and "--backbone" in err, err


def test_resume_after_init_from_official_with_the_same_command(tmp_path):
    """The run took its frozen backbone from the official file: resuming with the command
    that started it continues (nothing to add)."""
    _official_file(build_model(_small_args(depth=4, seed=0), torch.device("cpu")), tmp_path / "official.pth")
    cmd = ["--head", "mask2former", "--init-from-official", str(tmp_path / "official.pth"), "--max-iters", "2",
           "--ckpt-interval", "1", "--out", str(tmp_path / "run"), *FAST]
    assert train([*cmd, "--stop-at", "1"]) == 0
    assert train([*cmd, "--resume"]) == 0
    assert torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)["iteration"] == 2


def test_synthetic_checkpoint_evaluates_as_its_run_did_and_ignored_flags_are_named(tmp_path, capsys):
    """--target synthetic: the synthetic default run's validation domains, the metrics that
    run wrote. --crop and --backbone describe official checkpoints only: given with a
    rein.train checkpoint, a line says they are ignored."""
    run = tmp_path / "run"
    assert train(["--max-iters", "1", "--out", str(run), *FAST]) == 0
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(run / "checkpoint.pth"), "--target", "synthetic", "--out", str(out),
                 "--device", "cpu", "--no-fused", "--crop", "100", "--backbone", "vit_base_patch14_dinov2"]) == 0
    assert json.loads((out / "metrics.json").read_text()) == json.loads((run / "metrics.json").read_text())
    printed = capsys.readouterr()
    ck = run / "checkpoint.pth"
    assert printed.err.splitlines() == [
        f"rein-evaluate: WARNING: --backbone vit_base_patch14_dinov2 is ignored: {ck} is a rein.train checkpoint, "
        f"built as its run's configuration says (--backbone {SMALL_VIT})",
        f"rein-evaluate: WARNING: --crop 100 is ignored: {ck} is a rein.train checkpoint, built as its run's "
        "configuration says (--crop 64)"], printed.err
    assert "rein-evaluate: precision fp32, fp32 throughout; on cpu a run stays fp32" in printed.out
