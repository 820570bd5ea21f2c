"""``python -m rein.train`` / ``rein-train``: train Rein + a head on a source domain, report
mIoU on every target domain.

With no data flags it trains on the package's procedurally generated street scenes
(source style -> overcast, night and fog styles) with a small random-weight ViT, so it
runs anywhere in minutes; those numbers show the pipeline working, not Rein's accuracy.
With ``--source gtav=PATH --target cityscapes=PATH ...`` it follows the published recipe:
DINOv2-L/16, 512 crops, batch 4, 40k iterations, AdamW (lr 1e-4, weight decay 0.05, none
on tokens, scale and norms), poly decay (power 0.9) with no warm-up, the official data
augmentation and sliding-window evaluation protocol.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import rein_kernels

from ..checkpoints import CheckpointError, checkpoint_kind, load_tensors
from ..cli import USER_ERRORS, device_from_flag, report, resolve_precision, use_precision
from ..data import datasets_from, synthetic_train, synthetic_validation
from ..errors import UsageError
from ..inference import run_test_scale
from ..metrics import evaluate_targets
from ..model import backfill, build_model, load_trained
from .config import PRECISION_MEANS, SYNTHETIC, parse_args, resume_mismatches, validate, warnings_for
from .data import LESS_MEMORY, TrainBatches, train_loader
from .matcher import matches_on_device, set_matcher
from .optim import load_optimizer_state, lr_at, make_optimizer, set_lr
from .step import Step, autocast_for, captured_step, release_compiled, run_compiled, why_uncaptured


def build_data(args):
    if args.synthetic:
        return synthetic_train(args.crop), synthetic_validation(args.crop)
    train, *vals = datasets_from([(args.source, "train", "--source"), *((t, "val", "--target") for t in args.target)],
                                 mapillary_half=args.mapillary_half)
    return train, vals


def _save(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: an interruption never leaves half a checkpoint


def _plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training loss")
    ax.set_title("Rein training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _setup_distributed(args):
    device = device_from_flag(args.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    # Only rank 0 evaluates, the others wait at a barrier: a sliding-window evaluation of
    # ViT-L on three targets outlasts the default 10-minute collective timeout.
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
    return rank, world, dev


def _load_resume(args, out: Path):
    """The checkpoint to resume from (None without --resume), after checking that the flags
    that shape the model and the schedule are the ones it was trained with."""
    if not args.resume:
        return None
    path = out / "checkpoint.pth"
    if not path.is_file():
        raise UsageError(f"--resume but no checkpoint at {path}")
    try:
        ck = load_tensors(path)
    except CheckpointError as e:
        raise UsageError(f"--resume: {e}") from None
    if checkpoint_kind(ck) != "rein.train":
        raise UsageError(f"--resume: {path} is not a checkpoint rein.train wrote; give another --out")
    saved = backfill(ck["config"])
    if (args.checkpoint is None and args.init_from_official is not None
            and saved.get("init_from_official") == args.init_from_official
            and saved.get("checkpoint") == args.init_from_official):
        args.checkpoint = saved["checkpoint"]  # the run took its backbone from that file
    diff = resume_mismatches(saved, args)
    if diff and not args.force_resume:
        raise UsageError(f"--resume with flags that change the run: {'; '.join(diff)}. Use the checkpoint's "
                         "flags, another --out, or add --force-resume to continue anyway")
    return ck


class _Interrupted(Exception):
    """A stop signal that came while the trainer waited for a batch."""


class _StopRequests:
    """The handler of SIGINT and SIGTERM while training: it notes the signal's number in
    ``caught``, and the loop stops between two iterations, with a resumable checkpoint, on
    every process alike. Every signal is noted, none kills: torchrun passes the one it gets
    on to its workers, which a second default handler would stop mid-step. While the
    trainer waits for a batch (``waiting``), which a loader worker may take long to build,
    or never deliver, the wait is cut short (raising ``_Interrupted``, once)."""

    def __init__(self):
        self.caught: list[int] = []
        self.waiting = False

    def __call__(self, signum, frame):
        self.caught.append(signum)
        if self.waiting:
            self.waiting = False
            raise _Interrupted


@contextlib.contextmanager
def _stop_requests():
    """SIGINT and SIGTERM handled by a ``_StopRequests``, which this yields. SIGCHLD keeps
    its default action meanwhile: DataLoader's handler would raise in the middle of a step
    when a loader worker dies; the trainer learns of it when it next waits for a batch
    (within 5 s), between two steps, where a checkpoint can be saved."""
    stops = _StopRequests()
    previous = {s: signal.signal(s, stops) for s in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield stops
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _next_batch(batches, stops: _StopRequests):
    """The next batch; ``{"error": (what happened, what to do)}`` for one that could not be
    built (a bad file, no memory) or a loader worker that died; None when a stop signal
    came meanwhile."""
    try:
        try:
            stops.waiting = True
            return next(batches)
        finally:
            stops.waiting = False
    except _Interrupted:
        return None
    except RuntimeError as e:  # what DataLoader raises when a worker process is gone
        if not str(e).startswith("DataLoader worker (pid"):
            raise
        return {"error": (f"a data loading process ended ({e}; the system may have run out of memory)",
                          LESS_MEMORY)}


def _train(args, steps: Step, eager: Step, opt, train_set, rank, world, device, start, losses, checkpoint,
           main_proc):
    """The training iterations (``steps``: the step's functions, compiled or captured where
    they are; ``eager``: the same uncompiled, which the first iterations fall back to if
    compiling or recording fails). Returns (a batch that could not be loaded: (what happened,
    what to do), the signal that asked to stop), both None when every iteration ran; after
    either, a resumable checkpoint is saved at the iteration it stopped at."""
    from tqdm import tqdm

    batches = TrainBatches(train_set, args.batch_size, args.crop, args.seed, rank, world)
    waited = total = 0.0
    # the loader first: its first workers set DataLoader's SIGCHLD handler, which _stop_requests sets aside
    with train_loader(batches, start, args.max_iters, args.workers, pin_memory=device.type == "cuda") as loader, \
            _stop_requests() as stops:
        bar = tqdm(range(start, args.max_iters), initial=start, total=args.max_iters, disable=not main_proc,
                   desc="train", dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        for it in bar:
            t0 = time.perf_counter()
            batch = _next_batch(loader, stops)
            t1 = time.perf_counter()
            error, signum = _agree(batch["error"] if isinstance(batch, dict) else None, max(stops.caught, default=0),
                                   world, device)
            if error is not None or signum:  # on some process: keep what was trained
                checkpoint(it)
                bar.close()
                return error, signum or None
            images, labels = (t.to(device, non_blocking=True) for t in batch)
            # like the batch, the step's own randomness (Mask2Former's point sampling) is a
            # function of (seed, iteration, rank), so a resumed run repeats the uninterrupted one
            torch.manual_seed((args.seed * 1_000_003 + it) * 4096 + rank)
            set_lr(opt, lr_at(it, args))
            if steps is eager:
                loss = eager.run(images, labels, opt, args, device)
            else:
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs are free
                steps, loss = run_compiled(steps, eager, it - start, images, labels, opt, args, device, main_proc)
            value = loss.detach() / world
            if world > 1:
                dist.all_reduce(value)
            losses.append(float(value))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"loss became {losses[-1]} at iteration {it}")
            waited += t1 - t0
            total += time.perf_counter() - t0
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_at(it, args):.2e}", data=f"{waited / total:.0%}")
            done = it + 1
            if done % args.ckpt_interval == 0 or done == args.max_iters:
                checkpoint(done)
            if args.stop_at is not None and done >= args.stop_at:
                break
    bar.close()
    if main_proc and total:
        print(f"rein-train: {waited / total:.0%} of the step time was spent waiting for data "
              f"({args.workers} loader workers)")
    return None, None


def _agree(error: tuple[str, str] | None, signum: int, world: int, device) -> tuple[tuple[str, str] | None, int]:
    """A data error and a stop signal (0: none) on any process, known to every process, so
    that all stop together and rank 0, which saves and reports, can name the file and the
    signal: one collective per iteration."""
    if world == 1:
        return error, signum
    flags = torch.tensor([error is not None, signum], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    signum = int(flags[1])
    if not flags[0]:
        return None, signum
    errors = [None] * world
    dist.all_gather_object(errors, error)
    return next(e for e in errors if e is not None), signum


def _resume_command(argv: list[str], world: int) -> str:
    """The command line that continues this run: its own, with --resume."""
    launcher = ["python", "-m", "rein.train"] if world == 1 else [
        "torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)}", "-m", "rein.train"]
    return shlex.join(launcher + argv + ([] if "--resume" in argv else ["--resume"]))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, __doc__)
    out = Path(args.out)
    # what rein.predict resizes to by default: recorded, so it holds whatever later versions change
    args.test_scale = run_test_scale(vars(args))
    try:
        validate(args)
        rank, world, device = _setup_distributed(args)
        args.precision, precision_why = resolve_precision(args.precision, device)
        train_set, val_sets = build_data(args)
        if args.batch_size > len(train_set):  # it would only repeat images, at the memory cost of a larger batch
            raise UsageError(f"--batch-size {args.batch_size} is more than the {len(train_set)} images of the "
                             f"training set ({train_set.name}); give at most {len(train_set)}")
        ck = _load_resume(args, out)
        if args.fused and not rein_kernels.is_available(torch.empty(0, device=device)):
            if rank == 0:
                print(f"rein-train: Rein's fused kernels need a CUDA GPU; on {device.type} this run uses the "
                      "PyTorch reference path (same numbers, slower)")
            args.fused = False
        # bf16: the frozen weights cast once, before they reach the device, so that a large
        # backbone is never there in fp32 beside its copy (ViT-7B: 27 GB + 13 GB)
        bf16 = args.precision == "bf16"
        model = build_model(args, torch.device("cpu") if bf16 else device)
        if bf16:
            model.backbone.backbone.to(torch.bfloat16)
            model.to(device)
        set_matcher(model, args.matcher, device)
        if ck is not None:
            try:
                load_trained(model, ck)
            except ValueError as e:
                raise UsageError(f"--resume: {out / 'checkpoint.pth'} does not fit the model its flags describe: "
                                 f"{e}") from None
    except USER_ERRORS as e:
        if dist.is_available() and dist.is_initialized():  # every process stops here alike
            dist.destroy_process_group()
        return report("rein-train", e)
    main_proc = rank == 0
    if main_proc:
        for note in warnings_for(args):
            print(f"rein-train: WARNING: {note}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        if args.synthetic:
            print("rein-train: SYNTHETIC data (procedurally generated by this package, no downloads) and a "
                  f"random-weight {args.backbone} (depth {SYNTHETIC['depth']}, patch {args.patch_size}): the "
                  "numbers show the pipeline working, not Rein's accuracy.")
        print(f"rein-train: {train_set.name} -> {', '.join(v.name for v in val_sets)}; {args.max_iters} iters, "
              f"batch {args.batch_size}, crop {args.crop}, {args.backbone}, head {args.head}, "
              f"{'fused' if args.fused else 'reference'} Rein, device {device}, {world} process(es), "
              f"{args.workers} loader workers")
        print(f"rein-train: precision {args.precision}, {PRECISION_MEANS[args.precision]}; {precision_why}")

    model.train()  # (in bf16 the frozen weights are bf16 already: autocast does not recast them)
    use_precision(args.precision, device)
    if args.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    why_not = why_uncaptured(args, device, world)
    opt = make_optimizer(model, args, device)
    start, losses = 0, []
    if ck is not None:
        load_optimizer_state(opt, ck["optimizer"])
        start, losses = ck["iteration"], list(ck["losses"])
        if main_proc:
            print(f"rein-train: resumed at iteration {start} of {args.max_iters} from {out / 'checkpoint.pth'}")
            was = backfill(ck["config"])["precision"]
            if was != args.precision:
                print(f"rein-train: the first {start} iterations ran in {was}, the rest in {args.precision}")
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = model
    eager = steps = Step(wrapped, model.head.loss, opt.step)
    if why_not is None:
        steps = captured_step(model, wrapped, opt)
    elif args.compile:
        steps = eager._replace(forward=torch.compile(wrapped))
    on_device = matches_on_device(model, device)
    if main_proc:
        if args.head == "mask2former":
            print("rein-train: Hungarian matching " + ("on the device (scipy's assignment, in one Triton launch)"
                                                       if on_device else "on the host (scipy)"))
        print("rein-train: training step " + (
            "captured: torch.compile (reduce-overhead) replays the forward and backward and the loss"
            + (" (all but the matching, on the host)" if args.head == "mask2former" and not on_device else "")
            + " as CUDA graphs, the fused AdamW after them; the first iterations compile and record"
            if why_not is None else f"uncaptured: {why_not}"))

    def checkpoint(it):
        if main_proc:
            _save(out / "checkpoint.pth", {
                "rein": model.backbone.rein_state_dict(), "head": model.head.state_dict(),
                "optimizer": opt.state_dict(), "iteration": it, "losses": losses,
                "config": {k: v for k, v in vars(args).items() if k not in ("resume", "force_resume", "stop_at")}})

    t0 = time.time()
    bad_data, signum = _train(args, steps, eager, opt, train_set, rank, world, device, start, losses,
                              checkpoint, main_proc)
    if bad_data is not None or signum is not None:
        if main_proc:
            why, then = bad_data if bad_data is not None else (f"stopped by {signal.Signals(signum).name}",
                                                               "continue")
            print(f"rein-train: {why}. Saved a resumable checkpoint at iteration {len(losses)} of {args.max_iters} "
                  f"in {out / 'checkpoint.pth'}; {then} with: {_resume_command(argv, world)}", file=sys.stderr)
        if world > 1:
            dist.destroy_process_group()
        return 2 if bad_data is not None else 128 + signum  # as a shell reports a process the signal ended
    if args.stop_at is not None and len(losses) < args.max_iters:
        if world > 1:
            dist.destroy_process_group()
        return 0

    failed = []
    if why_not is None or args.compile:
        release_compiled(opt, model)  # the training graphs' memory, before evaluation records its own
    if main_proc:
        failed = evaluate_targets(model, val_sets, args.crop, device, out, lambda: autocast_for(args, device),
                                  cuda_graphs=args.cuda_graphs is not False)
        _plot_losses(losses, out / "loss.png")
        print(f"rein-train: {args.max_iters - start} iterations in {time.time() - t0:.0f} s; wrote "
              f"{out / 'checkpoint.pth'} (Rein + head only), {out / 'metrics.json'}, {out / 'loss.png'}, "
              f"{out / 'samples'}/")
        for msg in failed:
            print(f"rein-train: evaluation stopped on a bad file: {msg}. The other domains' metrics and the "
                  "trained checkpoint are saved", file=sys.stderr)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 2 if failed else 0
