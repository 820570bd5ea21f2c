"""The training command on bad input: one clear line naming the flag or file, exit code 2,
nothing half-written, and nothing lost when a bad file turns up mid-run."""
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
from PIL import Image  # noqa: E402

from rein.train.loop import main  # noqa: E402
from test_train import FAST, make_fixtures  # noqa: E402

TINY = ["--backbone", "vit_small_patch14_dinov2", "--head", "light"]  # the flags are under test, not the head


def run(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("rein-train:") and "WARNING" not in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("argv,needles", [
    (["--backbone", "vit_tiny_not_a_model"], ["--backbone", "not a timm model name"]),
    (["--crop", "60"], ["--crop 60", "multiple", "8-pixel patch"]),
    (["--checkpoint", "/nowhere/weights.pth"], ["--checkpoint /nowhere/weights.pth", "does not exist"]),
])
def test_bad_flags_fail_before_writing(tmp_path, capsys, argv, needles):
    out = tmp_path / "o"
    rc, _, err = run(capsys, "--max-iters", "1", "--out", str(out), *FAST, *argv)
    assert rc == 2
    _one_line_error(err, *needles)
    assert not out.exists()


def _unwritable_outs(tmp_path) -> list[Path]:
    """--out folders that cannot be made: under a regular file, and (where there is one)
    in a virtual file system, which even root cannot write."""
    (tmp_path / "file").write_text("keep me")
    return [tmp_path / "file" / "out"] + [Path(p) for p in ("/proc/rein-out",) if Path("/proc/self").exists()]


@pytest.mark.parametrize("command", ["rein.train", "rein.evaluate", "rein.predict"])
def test_out_that_cannot_be_made_is_one_line_in_every_command(tmp_path, capsys, command):
    import importlib

    main_of = importlib.import_module(command + (".loop" if command == "rein.train" else "")).main
    prog = command.replace(".", "-")
    extra = {"rein.train": FAST, "rein.evaluate": ["--checkpoint", "x.pth", "--target", "synthetic"],
             "rein.predict": ["--checkpoint", "x.pth", "--images", str(tmp_path)]}[command]
    for out in _unwritable_outs(tmp_path):
        assert main_of([*extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: --out {out}") and "Traceback" not in err, err
    assert (tmp_path / "file").read_text() == "keep me"


def test_out_check_leaves_nothing_behind(tmp_path, capsys):
    """Whether --out can be made is tried by making it: a later bad flag leaves no folder."""
    out = tmp_path / "a" / "b"
    rc, _, err = run(capsys, "--max-iters", "1", "--out", str(out), *FAST, "--backbone", "vit_tiny_not_a_model")
    assert rc == 2 and not (tmp_path / "a").exists(), err


@pytest.mark.parametrize("argv,says", [
    (["--lr", "-1"], "--lr -1.0: give a learning rate above 0"),
    (["--lr", "nan"], "--lr nan: give a learning rate above 0"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: give 0 or more"),
    (["--ckpt-interval", "0"], "--ckpt-interval 0: give 1 or more iterations"),
    (["--ckpt-interval", "-1"], "--ckpt-interval -1: give 1 or more iterations"),
    (["--warmup-iters", "-1"], "--warmup-iters -1: give 0 to --max-iters (300)"),
    (["--warmup-iters", "301"], "--warmup-iters 301: give 0 to --max-iters (300)"),
    (["--seed", "-1"], "--seed -1: give 0 to 4294967295"),
    (["--workers", "-1"], "--workers -1: give 0"),
    (["--max-iters", "0"], "--max-iters 0: give 1 or more"),
    (["--batch-size", "0"], "--batch-size 0: give 1 or more"),
    (["--crop", "4"], "--crop 4: give at least one 8-pixel patch"),
])
def test_flags_out_of_range_are_one_line(capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        run(capsys, *argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rein-train: {says}") and err.count("\n") == 1, err


def test_batch_larger_than_the_training_set(tmp_path, capsys):
    out = tmp_path / "o"
    rc, _, err = run(capsys, "--max-iters", "1", "--out", str(out), *FAST, "--batch-size", "100000")
    assert rc == 2
    _one_line_error(err, "--batch-size 100000 is more than the 400 images of the training set", "at most 400")
    assert not out.exists()


def test_out_naming_a_file(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    rc, _, err = run(capsys, "--max-iters", "1", "--out", str(f), *FAST)
    assert rc == 2
    _one_line_error(err, f"--out {f} is a file")
    assert f.read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_cuda_without_gpu(tmp_path, capsys):
    rc, _, err = run(capsys, "--max-iters", "1", "--out", str(tmp_path / "o"), *FAST, "--device", "cuda")
    assert rc == 2
    _one_line_error(err, "--device cuda", "no CUDA GPU", "--device cpu")


def test_checkpoint_that_is_text_or_has_wrong_keys(tmp_path, capsys):
    roots = make_fixtures(tmp_path / "data")
    base = ["--source", f"gtav={roots['gtav']}", *TINY, "--max-iters", "1", "--out", str(tmp_path / "o"), *FAST]
    text = tmp_path / "weights.pth"
    text.write_text("this is not a checkpoint")
    rc, _, err = run(capsys, *base, "--checkpoint", str(text))
    assert rc == 2
    _one_line_error(err, f"--checkpoint {text} is not a PyTorch checkpoint file")
    wrong = tmp_path / "wrong.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, wrong)
    rc, _, err = run(capsys, *base, "--checkpoint", str(wrong))
    assert rc == 2
    _one_line_error(err, f"--checkpoint {wrong} does not fit VisionTransformer", "missing keys", "keys of another shape")
    assert not (tmp_path / "o").exists()


def test_checkpoint_files_that_cannot_serve_say_why(tmp_path, capsys):
    """A cut-short file, this library's own training checkpoint and the weights of another
    ViT size, given as the backbone's --checkpoint; a cut-short checkpoint to --resume."""
    import timm

    run_dir = tmp_path / "run"
    assert main(["--max-iters", "1", "--out", str(run_dir), *FAST]) == 0
    ours, cut, vitb = run_dir / "checkpoint.pth", tmp_path / "cut.pth", tmp_path / "vitb.pth"
    cut.write_bytes(ours.read_bytes()[:5000])
    torch.save(timm.create_model("vit_base_patch14_dinov2", depth=4, img_size=64, patch_size=8).state_dict(), vitb)
    capsys.readouterr()
    base = ["--max-iters", "1", "--out", str(tmp_path / "o"), *FAST]
    for ck, says in ((cut, f"--checkpoint {cut} is truncated or corrupt (download or save it again)"),
                     (ours, f"--checkpoint {ours} is a rein.train checkpoint (Rein and head weights), not a "
                            "backbone's weights: give it to rein.evaluate or rein.predict as --checkpoint"),
                     (vitb, f"--checkpoint {vitb} does not fit VisionTransformer: keys of another shape (")):
        rc, _, err = run(capsys, *base, "--checkpoint", str(ck))
        assert rc == 2
        _one_line_error(err, says)
    assert len(err.strip()) < 500, err  # a ViT-B file on a ViT-S: 50 keys of another shape, summarised
    listed = Path(err.strip().rsplit("all listed in ", 1)[1]).read_text()
    assert "blocks.3.attn.qkv.weight: file (2304, 768) vs model (1152, 384)" in listed
    assert not (tmp_path / "o").exists()
    ours.write_bytes(cut.read_bytes())
    rc, _, err = run(capsys, "--max-iters", "1", "--resume", "--out", str(run_dir), *FAST)
    assert rc == 2
    _one_line_error(err, f"--resume: {ours} is truncated or corrupt")


def test_matplotlib_missing_fails_at_start(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, _, err = run(capsys, "--max-iters", "1", "--out", str(tmp_path / "o"), *FAST)
    assert rc == 2
    _one_line_error(err, "matplotlib is needed", "pip install")
    assert not (tmp_path / "o").exists()


def test_resume_refuses_flags_that_change_the_run(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = ["--ckpt-interval", "1", *FAST, "--out", out]
    assert main(["--max-iters", "4", "--stop-at", "2", *common]) == 0
    rc, _, err = run(capsys, "--max-iters", "6", "--resume", *common)
    assert rc == 2
    _one_line_error(err, "--resume", "--max-iters 4 -> 6", "--force-resume")
    rc, _, err = run(capsys, "--max-iters", "4", "--resume", "--head", "mask2former", *common)
    assert rc == 2
    _one_line_error(err, "--head 'light' -> 'mask2former'")
    assert torch.load(Path(out) / "checkpoint.pth", weights_only=True)["iteration"] == 2  # untouched
    assert main(["--max-iters", "6", "--resume", "--force-resume", *common]) == 0
    assert torch.load(Path(out) / "checkpoint.pth", weights_only=True)["iteration"] == 6


def test_real_data_warns_about_random_backbone_and_missing_target(tmp_path, capsys):
    roots = make_fixtures(tmp_path / "data")
    rc, _, err = run(capsys, "--source", f"gtav={roots['gtav']}", *TINY, "--max-iters", "1",
                     "--out", str(tmp_path / "o"), *FAST)
    assert rc == 0
    assert "WARNING: no --checkpoint" in err and "RANDOM initialisation" in err
    assert "WARNING: no --target" in err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text()) == {}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_training_image_saves_a_checkpoint_and_names_the_file(tmp_path, capsys):
    roots = make_fixtures(tmp_path / "data")
    for p in (roots["gtav"] / "images").glob("*.png"):
        _truncate(p)  # headers intact: only decoding finds it, at iteration 0
    out = tmp_path / "o"
    args = ["--source", f"gtav={roots['gtav']}", *TINY, "--max-iters", "3", "--out", str(out), *FAST]
    rc, _, err = run(capsys, *args)
    assert rc == 2
    _one_line_error(err, "cannot read image", str(roots["gtav"] / "images"), "--resume")
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ck["iteration"] == 0
    make_fixtures(tmp_path / "data")  # the files are fixed: the run resumes and finishes
    assert main([*args, "--resume"]) == 0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 3


def test_unknown_label_found_mid_run(tmp_path, capsys):
    """Ids are sampled before training (every other file here); the rest is checked as it loads."""
    roots = make_fixtures(tmp_path / "data")
    lbl = np.asarray(Image.open(roots["gtav"] / "labels" / "00000.png"))
    img = Image.open(roots["gtav"] / "images" / "00000.png")
    bad = lbl.copy()
    bad[0, 0] = 200
    for i in range(2, 70):
        img.save(roots["gtav"] / "images" / f"{i:05d}.png")
        Image.fromarray(bad if i % 2 else lbl, mode="L").save(roots["gtav"] / "labels" / f"{i:05d}.png")
    out = tmp_path / "o"
    rc, _, err = run(capsys, "--source", f"gtav={roots['gtav']}", *TINY, "--max-iters", "6", "--out", str(out),
                     *FAST)
    assert rc == 2
    _one_line_error(err, "unknown ids [200]", "Saved a resumable checkpoint")
    assert (out / "checkpoint.pth").exists()


def test_bad_target_file_keeps_the_training_and_other_domains(tmp_path, capsys):
    roots = make_fixtures(tmp_path / "data")
    bad = next((roots["cityscapes"] / "leftImg8bit" / "val").glob("*/*.png"))
    _truncate(bad)
    out = tmp_path / "o"
    rc, _, err = run(capsys, "--source", f"gtav={roots['gtav']}", "--target", f"cityscapes={roots['cityscapes']}",
                     "--target", f"bdd100k={roots['bdd100k']}", *TINY, "--max-iters", "2", "--out", str(out), *FAST)
    assert rc == 2
    _one_line_error(err, "evaluation stopped on a bad file", str(bad))
    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: json.loads would take NaN too,
    assert "NaN" not in (out / "metrics.json").read_text()   # so check the text
    assert metrics["cityscapes"]["mIoU"] is None and str(bad) in metrics["cityscapes"]["error"]
    assert isinstance(metrics["bdd100k"]["mIoU"], float)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 2


@pytest.mark.parametrize("workers", ["0", "1"])
def test_batch_out_of_memory_saves_and_says_what_to_do(tmp_path, capsys, monkeypatch, workers):
    """Building a batch runs out of memory (in a loader worker, or in the training process
    without one): one line saying what to lower, and a resumable checkpoint."""
    import rein.train.data

    def no_memory(img):
        raise MemoryError

    monkeypatch.setattr(rein.train.data, "normalize", no_memory)  # forked workers inherit it
    out = tmp_path / "o"
    rc, _, err = run(capsys, "--max-iters", "3", "--out", str(out), *FAST[:-1], workers)
    assert rc == 2
    _one_line_error(err, "out of memory building the batch of iteration 0 (2 images of 64x64",
                    "Saved a resumable checkpoint at iteration 0 of 3", "lower --workers, or --batch-size with "
                    "--force-resume, then continue with: python -m rein.train")
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 0


def test_loader_worker_killed_mid_run_saves_and_says_so(tmp_path, capsys, monkeypatch):
    """A loader worker killed (as the kernel's out-of-memory killer does) while the trainer
    computes: noticed when it next waits for a batch, between two steps, where it saves.
    (Which: the batches the worker had built before may die with it, unsent.)"""
    import rein.train.data

    real = rein.train.data.TrainBatches.__getitem__

    def dies_at_2(self, it):
        if it == 2 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, it)

    monkeypatch.setattr(rein.train.data.TrainBatches, "__getitem__", dies_at_2)
    out = tmp_path / "o"
    rc, _, err = run(capsys, "--max-iters", "4", "--out", str(out), *FAST[:-1], "1")
    assert rc == 2
    _one_line_error(err, "a data loading process ended (DataLoader worker (pid", "Saved a resumable checkpoint at "
                    "iteration ", "lower --workers")
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert f"at iteration {ck['iteration']} of 4" in err and ck["iteration"] == len(ck["losses"]) <= 2


def test_loader_workers_give_the_same_run(tmp_path):
    """Batches are a function of (seed, iteration, rank) alone: 1 or 2 worker processes give
    the same losses bit for bit, and a run interrupted and resumed with workers too. In the
    main process (0 workers) torch's reductions use more threads, so the images differ in
    the last bit: the losses agree to 1e-6."""
    def losses(out):
        return torch.load(out / "checkpoint.pth", weights_only=True)["losses"]

    common = ["--max-iters", "4", "--ckpt-interval", "2", *FAST]
    runs = {w: tmp_path / f"w{w}" for w in (0, 1, 2)}
    for w, out in runs.items():
        assert main([*common, "--out", str(out), "--workers", str(w)]) == 0
    assert losses(runs[1]) == losses(runs[2])
    assert losses(runs[0]) == pytest.approx(losses(runs[2]), rel=1e-6)
    resumed = tmp_path / "resumed"
    assert main([*common, "--out", str(resumed), "--workers", "2", "--stop-at", "2"]) == 0
    assert main([*common, "--out", str(resumed), "--workers", "2", "--resume"]) == 0
    assert losses(resumed) == losses(runs[2])


def test_precision_bf16_by_default_on_cuda_and_fp32_on_a_cpu(capsys):
    """--precision as parsed (--amp its former name) and as resolved for a device type:
    CUDA runs bf16 unless told, a CPU run stays fp32 whatever it is told, saying why."""
    from rein.cli import resolve_precision
    from rein.train.config import parse_args

    assert parse_args([]).precision is None
    assert parse_args(["--amp"]).precision == "bf16"
    assert parse_args(["--precision", "tf32"]).precision == "tf32"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_precision(None, cuda) == ("bf16", "the default on CUDA, the fastest; --precision fp32 is the "
                                                     "official setting")
    for flag in ("bf16", "tf32", "fp32"):
        assert resolve_precision(flag, cuda) == (flag, f"--precision {flag}")
    precision, why = resolve_precision(None, cpu)
    assert precision == "fp32" and why.startswith("on cpu a run stays fp32: bf16 autocast there is slow")
    for flag in ("bf16", "tf32"):
        precision, why = resolve_precision(flag, cpu)
        assert precision == "fp32" and why.startswith(f"--precision {flag} applies on CUDA only"), why
    with pytest.raises(SystemExit):
        run(capsys, "--precision", "fp16")
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_a_cpu_run_says_it_stays_fp32(tmp_path, capsys):
    rc, out, _ = run(capsys, "--max-iters", "1", "--out", str(tmp_path / "o"), *FAST, "--amp")
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith("rein-train: precision")]
    assert lines == ["rein-train: precision fp32, fp32 throughout; --precision bf16 applies on CUDA only: on cpu a "
                     "run stays fp32, as bf16 autocast there is slow and fp32 is the official setting"], out
    assert out.index("rein-train: precision") < out.index("rein-train: training step")  # among the first lines
    assert torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=True)["config"]["precision"] == "fp32"


def test_bf16_keeps_frozen_weights_in_bf16_and_checkpointing_runs(tmp_path, monkeypatch):
    """What bf16 does to the model (on CUDA; here forced on the CPU): the frozen backbone's
    weights in bf16, what trains in fp32, and fp32 in the checkpoint."""
    import rein.train.loop as loop

    seen = {}
    real_optimizer = loop.make_optimizer

    def spy(model, args, device):  # called once the model is ready to train
        seen["backbone"] = {p.dtype for p in model.backbone.backbone.parameters()}
        seen["trained"] = {p.dtype for p in model.parameters() if p.requires_grad}
        seen["checkpointing"] = model.backbone.backbone.grad_checkpointing
        return real_optimizer(model, args, device)

    monkeypatch.setattr(loop, "make_optimizer", spy)
    monkeypatch.setattr(loop, "resolve_precision", lambda flag, device: ("bf16", "forced by the test"))
    out = tmp_path / "o"
    assert main(["--max-iters", "2", "--out", str(out), *FAST, "--grad-checkpointing"]) == 0
    assert seen == {"backbone": {torch.bfloat16}, "trained": {torch.float32}, "checkpointing": True}
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert all(v.dtype == torch.float32 for k, v in ck["rein"].items() if v.is_floating_point())


def test_checkpoints_that_recorded_amp_resume_and_evaluate(tmp_path, capsys):
    """Checkpoints written before --precision recorded --amp: they resume (saying in which
    precision the iterations ran) and evaluate."""
    from rein.evaluate import main as evaluate

    out = tmp_path / "run"
    common = ["--max-iters", "2", "--ckpt-interval", "1", *FAST, "--out", str(out)]
    assert main([*common, "--stop-at", "1"]) == 0
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    del ck["config"]["precision"]
    ck["config"]["amp"] = True
    torch.save(ck, out / "checkpoint.pth")
    capsys.readouterr()
    rc, printed, _ = run(capsys, *common, "--resume")
    assert rc == 0 and "rein-train: the first 1 iterations ran in bf16, the rest in fp32" in printed, printed
    ck["config"]["amp"] = False
    torch.save(ck, tmp_path / "old.pth")
    assert evaluate(["--checkpoint", str(tmp_path / "old.pth"), "--target", "synthetic", "--out",
                     str(tmp_path / "eval"), "--device", "cpu", "--no-fused"]) == 0


def test_resume_of_a_run_from_before_the_conversion_flag(tmp_path, capsys):
    """Checkpoints written before --conversion existed were converted as timm does: resuming
    one with the new default must be refused as a change, not silently switch."""
    out = tmp_path / "run"
    common = ["--ckpt-interval", "1", *FAST, "--out", str(out)]
    assert main(["--max-iters", "4", "--stop-at", "2", *common]) == 0
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    del ck["config"]["conversion"]
    torch.save(ck, out / "checkpoint.pth")
    rc, _, err = run(capsys, "--max-iters", "4", "--resume", *common)
    assert rc == 2
    _one_line_error(err, "--conversion 'timm' -> 'official'")
    assert main(["--max-iters", "4", "--resume", "--conversion", "timm", *common]) == 0


def test_unsupported_backbone_family(tmp_path, capsys):
    rc, _, err = run(capsys, "--max-iters", "1", "--out", str(tmp_path / "o"), *FAST, "--backbone", "resnet18")
    assert rc == 2
    _one_line_error(err, "--backbone resnet18", "not a backbone Rein can refine")


@pytest.mark.parametrize("head", ["light", "mask2former"])
@pytest.mark.parametrize("training", [True, False])
def test_model_compiles_without_graph_breaks(head, training):
    """What the captured step compiles (--compile, and CUDA graphs' reduce-overhead mode):
    backbone, Rein's custom op (the fused kernels, through the interpreter here) and either
    head, in one graph, in training (the step) and in evaluation (the sliding window). The
    loss runs between graphs (the Mask2Former matcher works on the host)."""
    from rein.model import build_model
    from rein.train.config import parse_args

    args = parse_args(["--crop", "64", "--fused", "--head", head])
    model = build_model(args, torch.device("cpu")).train(training)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


@pytest.mark.parametrize("matcher", ["host", pytest.param("device", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU's step: on a GPU the kernel runs natively in test_assignment.py"))])
def test_captured_step_compiles_once_whatever_the_classes(matcher):
    """20 training steps of the published head whose labels hold 1 to 19 classes, and
    none (4 of them, 1, 10 and 19 classes and none, with the matching kernel interpreted
    on the CPU): each compiled part of the captured step is compiled once, with no graph break:
    Rein's tokens, the backbone's blocks (one graph for all), the head's repeated layers (one
    graph for the 6 encoder layers, one per feature level for the 9 decoder layers and for
    the mask predictor) and the loss: its two device stages with the matching on the host,
    one graph with it on the device; the AdamW step, whose learning rate changes every
    step, runs as it is."""
    from torch._dynamo.testing import CompileCounter

    from rein.model import build_model
    from rein.train.config import parse_args
    from rein.train.matcher import set_matcher
    from rein.train.optim import lr_at, make_optimizer, set_lr
    from rein.train.step import captured_step

    torch._dynamo.reset()  # graphs other tests compiled from the same code count against its limit
    args = parse_args(["--crop", "64", "--no-fused", "--head", "mask2former", "--max-iters", "20"])
    cpu = torch.device("cpu")
    model = build_model(args, cpu).train()
    set_matcher(model, matcher, cpu)
    opt = make_optimizer(model, args, cpu)
    counter = CompileCounter()
    steps = captured_step(model, model, opt, backend=counter)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    for step in range(20) if matcher == "host" else (0, 9, 18, 19):
        classes = torch.randperm(19, generator=gen)[: 1 + step % 19]
        labels = classes[torch.randint(0, len(classes), (2, 64, 64), generator=gen)]
        if step == 19:
            labels[:] = 255
        set_lr(opt, lr_at(step, args))
        assert torch.isfinite(steps.run(images, labels, opt, args, cpu))
    frames = 11 if matcher == "host" else 10
    assert (counter.frame_count, counter.op_count > 0) == (frames, True), counter.frame_count
    assert steps.opt_step == opt.step  # as it is, not compiled
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(19, args))


def _compiled_regionally(args, images):
    """The model ``args`` builds, on the CPU, with the captured step's regional compile (a
    counting backend) and its forward run twice on ``images``: (model, its optimizer, the
    compiled forward's output, the frames compiled)."""
    from torch._dynamo.testing import CompileCounter

    from rein.model import build_model
    from rein.train.optim import make_optimizer
    from rein.train.step import captured_step

    cpu = torch.device("cpu")
    torch._dynamo.reset()
    model = build_model(args, cpu).train()
    opt = make_optimizer(model, args, cpu)
    counter = CompileCounter()
    steps = captured_step(model, model, opt, backend=counter)
    for _ in range(2):
        compiled = steps.forward(images)
    return model, opt, compiled, counter.frame_count


@pytest.mark.parametrize("fused", [True, False])
def test_regional_compile_does_not_grow_with_depth(fused):
    """The captured step compiles the backbone's blocks one at a time (``compile_regions``):
    with Rein's operands (or, on the reference path, its tokens) bound to each block, one
    compiled block serves all of them, so a 12-block backbone compiles the frames a 4-block
    one does; and the regionally compiled model computes what the model does. Released,
    the model runs uncompiled again."""
    from rein.train.config import parse_args
    from rein.train.step import release_compiled

    frames = {}
    for depth in (4, 12):
        args = parse_args(["--crop", "32", "--fused" if fused else "--no-fused"])
        args.timm_kwargs = {"depth": depth}
        images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(depth))
        model, opt, compiled, frames[depth] = _compiled_regionally(args, images)
        release_compiled(opt, model)
        assert all(blk._compiled_call_impl is None for blk in model.backbone.backbone.blocks)
        torch.testing.assert_close(compiled, model(images), rtol=1e-5, atol=1e-5)
    assert frames[4] == frames[12] and frames[4] >= 2, frames  # blocks, Rein's operands, the head


def test_regional_compile_of_the_head_does_not_grow_with_depth():
    """The Mask2Former head's repeated layers compiled as regions: a head of 2 encoder and
    3 decoder layers compiles the frames the published 6 and 9 do (one graph for the
    encoder layers, one per feature level for the decoder layers and the mask predictor),
    and computes what the head does; released, it runs uncompiled again."""
    from rein.train.config import parse_args
    from rein.train.step import release_compiled

    frames = {}
    for encoder_layers, decoder_layers in ((2, 3), (6, 9)):
        args = parse_args(["--crop", "64", "--no-fused", "--head", "mask2former"])
        args.timm_kwargs = {"depth": 2}
        args.head_kwargs = {"encoder_layers": encoder_layers, "decoder_layers": decoder_layers}
        images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(decoder_layers))
        model, opt, compiled, frames[decoder_layers] = _compiled_regionally(args, images)
        regions = model.head.repeated_layers()
        assert len(regions[0]) == encoder_layers and len(regions[1]) == decoder_layers
        assert all(m._compiled_call_impl is not None for kind in regions for m in kind)
        release_compiled(opt, model)
        assert all(m._compiled_call_impl is None for kind in regions for m in kind)
        assert len(compiled["mask_logits"]) == decoder_layers + 1
        torch.testing.assert_close(compiled, model(images), rtol=1e-4, atol=1e-4)
    # Rein's operands, the blocks, 1 + 3 + 3 in the head
    assert frames[3] == frames[9] and frames[9] >= 7, frames


def test_compiled_step_says_it_compiles_and_how_long_it_took(capsys, monkeypatch, tmp_path):
    """The first compiled iteration says that it compiles and where torch.compile's cache
    lives (~/.cache/rein-kernels/torch-compile unless TORCHINDUCTOR_CACHE_DIR says
    otherwise), the last warm-up iteration how long compiling and recording took; the
    iterations after say nothing."""
    from argparse import Namespace

    from rein.train.step import WARM_STEPS, Step, compile_cache_dir, run_compiled

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / ".cache" / "rein-kernels" / "torch-compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = Step(model, lambda out, labels: (out - labels).square().mean(), opt.step)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    said = []
    for done in range(WARM_STEPS + 2):
        run_compiled(step, step, done, x, y, opt, Namespace(precision="fp32"), torch.device("cpu"), True)
        said.append(capsys.readouterr().err)
    assert f"compiling the training step, first run only (cache: {tmp_path / 'mine'})" in said[0]
    assert "compiled and recorded in" in said[WARM_STEPS - 1]
    assert not any(said[1:WARM_STEPS - 1]) and not any(said[WARM_STEPS:])


def test_training_step_capture_and_its_fallbacks(capsys, monkeypatch):
    """Captured on CUDA by default; the reason printed where not (another device, torchrun,
    --no-cuda-graphs); a compiled step that fails to compile or record (at its first call,
    or at a later warm-up call, where CUDA graphs are recorded) runs uncaptured from then
    on, with one line saying why, after freeing what compiling held (compiled code, CUDA
    graphs); a failure after the warm-up is raised."""
    from argparse import Namespace

    from rein.train.step import WARM_STEPS, Step, run_compiled, why_uncaptured

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert why_uncaptured(Namespace(cuda_graphs=None), cuda, 1) is None
    assert why_uncaptured(Namespace(cuda_graphs=True), cuda, 1) is None
    assert "--no-cuda-graphs" in why_uncaptured(Namespace(cuda_graphs=False), cuda, 1)
    assert "need a CUDA GPU" in why_uncaptured(Namespace(cuda_graphs=None), cpu, 1)
    assert "torchrun" in why_uncaptured(Namespace(cuda_graphs=None), cuda, 2)

    def broken(*args):
        raise RuntimeError("cannot record")

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eager = Step(model, lambda out, labels: (out - labels).square().mean(), opt.step)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(model.weight.grad))
    for failing in (eager._replace(forward=broken), eager._replace(opt_step=broken)):
        for done in range(WARM_STEPS):
            before = model.weight.detach().clone()
            want = eager.loss(model(x), y)
            used, loss = run_compiled(failing, eager, done, x, y, opt, Namespace(precision="fp32"), cpu, True)
            assert used is eager and torch.equal(loss, want)
            assert not torch.equal(model.weight, before)  # the step was taken, once
            assert "continuing uncaptured" in capsys.readouterr().err
            assert resets.pop() is None and not resets  # reset once, the gradients released first
        with pytest.raises(RuntimeError, match="cannot record"):
            run_compiled(failing, eager, WARM_STEPS, x, y, opt, Namespace(precision="fp32"), cpu, True)


@pytest.mark.parametrize("into", ["cpu", "cuda"])
@pytest.mark.parametrize("first", ["capturable", "fused", "foreach"])
def test_resume_across_optimizer_implementations(first, into):
    """A checkpoint's optimizer state, saved by a CPU run (foreach), a GPU run (fused) or an
    earlier version's captured step (capturable, its learning rate a tensor, saved as a
    number), loads into the optimizer this machine builds, which keeps its own
    implementation and step-count device, and continues exactly as the first would have.
    ``into="cuda"``: the optimizer ``make_optimizer`` builds for a GPU (fused AdamW, which
    runs on the CPU too). Eagerly, capturable AdamW needs a GPU: it runs compiled here, as
    it did in the captured step."""
    import copy
    from argparse import Namespace
    from types import SimpleNamespace

    from rein.train.optim import load_optimizer_state, make_optimizer, param_groups, set_lr

    cpu = torch.device("cpu")
    args = Namespace(lr=1e-2, weight_decay=0.05)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4))
    x = torch.randn(8, 5)

    def step(opt, lr):
        if isinstance(opt.param_groups[0]["lr"], torch.Tensor):
            for g in opt.param_groups:
                g["lr"].fill_(lr)
        else:
            set_lr(opt, lr)
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        (torch.compile(opt.step, backend="eager") if opt.param_groups[0]["capturable"] else opt.step)()

    impl = {"capturable": {"foreach": True, "capturable": True}, "fused": {"fused": True},
            "foreach": {"foreach": True}}[first]
    lr = torch.tensor(args.lr) if first == "capturable" else args.lr
    a = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8, **impl)
    step(a, 1e-2)
    state = copy.deepcopy(a.state_dict())  # as saved: the optimizer's own tensors change in place
    for g in state["param_groups"]:  # as the earlier version saved it
        g["lr"] = float(g["lr"])
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    step(a, 5e-3)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(saved)
    b = make_optimizer(model, args, cpu if into == "cpu" else SimpleNamespace(type="cuda"))
    load_optimizer_state(b, state)
    foreach_fused = (True, None) if into == "cpu" else (None, True)
    for g in b.param_groups:
        assert (g["foreach"], g["fused"], g["capturable"], type(g["lr"])) == (*foreach_fused, False, float)
        assert g["lr"] == pytest.approx(1e-2)
    for p, st in b.state.items():
        assert st["step"].device == cpu and st["step"].dtype == torch.float32
    step(b, 5e-3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.slow
def test_bad_file_under_torchrun_stops_every_process(tmp_path):
    """Only one process's share of the batch holds the bad file: every process stops at the
    same iteration (none waits in a collective), rank 0 names the file and saves."""
    import os
    import subprocess

    roots = make_fixtures(tmp_path / "data")
    _truncate(roots["gtav"] / "images" / "00001.png")
    out = tmp_path / "o"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29519", "-m", "rein.train", "--source", f"gtav={roots['gtav']}", *TINY,
                           "--max-iters", "20", "--out", str(out), *FAST, "--batch-size", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "cannot read image" in proc.stderr and "00001.png" in proc.stderr, proc.stderr[-2000:]
    assert "Saved a resumable checkpoint" in proc.stderr
    assert (out / "checkpoint.pth").exists()


def test_flag_errors_are_one_line(capsys):
    """argparse's own errors too: one line naming the flag, exit 2, no usage block."""
    for argv, says in ((["--target", "cityscapes=/x"], "--target needs --source"),
                       (["--max-iters", "abc"], "argument --max-iters: invalid int value: 'abc'")):
        with pytest.raises(SystemExit) as e:
            run(capsys, *argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("rein-train: ") and says in err and err.count("\n") == 1, err


def test_dataset_specs_name_their_flag(tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), *FAST]
    rc, _, err = run(capsys, "--source", "acdc=/x", *out)
    assert rc == 2
    _one_line_error(err, "--source acdc=/x: unknown dataset kind 'acdc'", "acdc-fog")
    rc, _, err = run(capsys, "--source", "gtav=/x", "--target", "/data/cityscapes", *out)
    assert rc == 2
    _one_line_error(err, "--target /data/cityscapes: expected KIND=PATH")


# ------------------------------------------------------------------ Ctrl-C and SIGTERM

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = r"\| *[1-9]\d*/400 "  # tqdm's bar once an iteration is done: the stop handlers are in place


def _start(cmd: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """``cmd`` in its own process group, as a terminal runs a command (Ctrl-C signals the
    whole group: the trainer and its loader workers); its stderr collected as it comes."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    proc.reader = reader
    return proc, err


def _interrupt_when(proc: subprocess.Popen, err: list[str], pattern: str, timeout: float = 600) -> str:
    """Ctrl-C once ``pattern`` shows on stderr; returns all of stderr after the exit (the
    group is killed if it does not exit)."""
    deadline = time.monotonic() + timeout
    try:
        while not re.search(pattern, "".join(err)):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    proc.reader.join(timeout=10)
    proc.stdout.close()
    return "".join(err)


def test_ctrl_c_saves_a_resumable_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    flags = ["--max-iters", "400", "--ckpt-interval", "400", "--out", str(out), *FAST[:-1], "1"]  # 1 loader worker
    proc, err = _start([sys.executable, "-m", "rein.train", *flags])
    stderr = _interrupt_when(proc, err, PROGRESS)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("rein-train:")]
    assert len(lines) == 1, stderr[-3000:]
    m = re.fullmatch(r"rein-train: stopped by SIGINT\. Saved a resumable checkpoint at iteration (\d+) of 400 in "
                     r"(\S+); continue with: (.+)", lines[0])
    assert m and m[2] == str(out / "checkpoint.pth"), lines[0]
    n, command = int(m[1]), shlex.split(m[3])
    ck = torch.load(out / "checkpoint.pth", weights_only=True)
    assert 1 <= n < 400 and ck["iteration"] == len(ck["losses"]) == n
    assert command == ["python", "-m", "rein.train", *flags, "--resume"]
    resumed = subprocess.run([sys.executable, *command[1:], "--stop-at", str(n + 1)], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"rein-train: resumed at iteration {n} of 400 from {out / 'checkpoint.pth'}\n" in resumed.stdout


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_process_at_one_iteration(tmp_path):
    """torchrun passes the signal on to its workers: each stops at the same iteration (one
    collective a step), none dies mid-step, rank 0 saves and says how to continue."""
    out = tmp_path / "run"
    flags = ["--max-iters", "400", "--ckpt-interval", "400", "--out", str(out), *FAST]
    proc, err = _start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523",
                        "-m", "rein.train", *flags])
    stderr = _interrupt_when(proc, err, PROGRESS)
    assert proc.returncode != 0
    m = re.search(r"rein-train: stopped by SIG(INT|TERM)\. Saved a resumable checkpoint at iteration (\d+) of 400 "
                  r"in \S+; continue with: torchrun --nproc_per_node=2 -m rein\.train .*--resume\n", stderr)
    assert m, stderr[-3000:]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == int(m[2]) >= 1
    assert stderr.count("Saved a resumable checkpoint") == 1


# A run whose loader worker never delivers batch 1 (it sleeps instead: a hung file system,
# a decoder stuck on a file): the trainer waits for it after its first step.
STUCK_LOADER = """
import sys, time
import torch
import rein.train.data

real = rein.train.data.TrainBatches.__getitem__

def stuck(self, it):
    if it >= 1 and torch.utils.data.get_worker_info() is not None:
        time.sleep(3600)
    return real(self, it)

rein.train.data.TrainBatches.__getitem__ = stuck
from rein.train.loop import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_ends_a_run_waiting_on_a_stuck_loader_within_seconds(tmp_path, signum):
    """SIGTERM to the trainer alone (as a scheduler or `kill` sends it), or SIGINT to the
    whole group (Ctrl-C): the wait is cut short, a resumable checkpoint saved, and every
    process of the run gone within seconds, the stuck worker included."""
    out = tmp_path / "run"
    flags = ["--max-iters", "400", "--out", str(out), *FAST[:-1], "1"]
    proc, err = _start([sys.executable, "-c", STUCK_LOADER, *flags])
    try:
        deadline = time.monotonic() + 600
        while "loss=" not in "".join(err):  # the first step's loss: the trainer then waits for batch 1
            assert proc.poll() is None and time.monotonic() < deadline, "".join(err)[-3000:]
            time.sleep(0.2)
        time.sleep(1)
        sent = time.monotonic()
        if signum == signal.SIGTERM:
            os.kill(proc.pid, signum)
        else:
            os.killpg(proc.pid, signum)
        proc.wait(timeout=30)
        took = time.monotonic() - sent
        while True:  # the worker too
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() - sent < 30, "a process of the run outlived it"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.reader.join(timeout=10)
    proc.stdout.close()
    stderr = "".join(err)
    assert proc.returncode == 128 + signum and "Traceback" not in stderr, stderr[-3000:]
    assert took < 10, took
    assert (f"rein-train: stopped by {signal.Signals(signum).name}. Saved a resumable checkpoint at iteration 1 of "
            "400") in stderr, stderr[-3000:]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 1


def test_matcher_flag_errors_are_one_line_before_writing(tmp_path, capsys, monkeypatch):
    """--matcher chooses where the Mask2Former loss matches: with another head, and for the
    device where the kernels cannot run, it is a one-line error before anything is written."""
    import rein_kernels

    out = tmp_path / "o"
    rc, _, err = run(capsys, "--max-iters", "1", "--out", str(out), *FAST, "--matcher", "host")
    assert rc == 2 and not out.exists()
    _one_line_error(err, "--matcher host", "--head light has no matching")
    monkeypatch.setattr(rein_kernels, "is_available", lambda x, compute_dtype=None: False)
    rc, _, err = run(capsys, "--max-iters", "1", "--out", str(out), *FAST, "--head", "mask2former",
                     "--matcher", "device")
    assert rc == 2 and not out.exists()
    _one_line_error(err, "--matcher device", "needs a CUDA GPU (this run is on cpu)", "use --matcher host or auto")


def test_matcher_device_needs_fewer_classes_than_queries():
    from rein.errors import UsageError
    from rein.model import build_model
    from rein.train.config import parse_args
    from rein.train.matcher import matches_on_device, set_matcher

    cpu = torch.device("cpu")
    kernels = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU's: the interpreter
    model = build_model(parse_args(["--crop", "64", "--no-fused", "--head", "mask2former"]), cpu)
    assert not matches_on_device(model, cpu)  # auto: the host, off CUDA
    set_matcher(model, "device", kernels)
    assert model.head.criterion.matcher == "device" and matches_on_device(model, kernels)
    model.backbone.rein.token_length = 19
    with pytest.raises(UsageError, match="--matcher device needs fewer classes than queries, got 19 classes and 19"):
        set_matcher(model, "device", kernels)
    # ConvNeXt: one Rein per stage, their tokens the queries
    model = build_model(parse_args(["--crop", "64", "--no-fused", "--head", "mask2former", "--backbone",
                                    "convnext_atto"]), cpu)
    assert not matches_on_device(model, cpu)
    set_matcher(model, "device", kernels)
    assert matches_on_device(model, kernels)
