"""The training feed: the batch of every iteration, a pure function of (seed, iteration,
rank), built by DataLoader worker processes."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading

import torch

from ..data import DataError, augment_official, normalize
from ..data import FolderDataset  # noqa: F401  (benchmarks/test_bench_loader.py imports it from here)


# What to do when loading runs out of memory: --workers can change on resuming, a
# change of --batch-size changes the run (so --resume asks for --force-resume)
LESS_MEMORY = "lower --workers, or --batch-size with --force-resume, then continue"


class TrainBatches(torch.utils.data.Dataset):
    """Item ``it``: this process's share of the global batch of iteration ``it`` (normalised
    images [b, 3, crop, crop], labels [b, crop, crop]), a pure function of (seed, it, rank).
    Any DataLoader worker, any process under torchrun and a resumed run build exactly the
    same batch. A file that cannot be read, or a batch that does not fit in memory, gives
    ``{"error": (what happened, what to do)}`` instead of raising, so the training loop can
    save its state and say what to change."""

    def __init__(self, dataset, batch_size: int, crop: int, seed: int, rank: int = 0, world: int = 1):
        self.dataset, self.batch_size, self.crop, self.seed = dataset, batch_size, crop, seed
        self.rank, self.per = rank, batch_size // world

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, it: int):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + it)
        idx = torch.randint(0, len(self.dataset), (self.batch_size,), generator=gen).tolist()
        seeds = torch.randint(0, 2**62, (self.batch_size,), generator=gen).tolist()
        lo, hi = self.rank * self.per, (self.rank + 1) * self.per
        imgs, lbls = [], []
        try:
            for i, s in zip(idx[lo:hi], seeds[lo:hi]):
                img, lbl = self.dataset[i]
                img, lbl = augment_official(img, lbl, self.crop, torch.Generator().manual_seed(s))
                imgs.append(normalize(img))
                lbls.append(lbl)
            batch = torch.stack(imgs), torch.stack(lbls)
        except DataError as e:
            return {"error": (str(e), "fix the file, then continue")}
        except MemoryError:
            return {"error": (f"out of memory building the batch of iteration {it} ({self.per} images of "
                              f"{self.crop}x{self.crop}; each loader worker builds up to 4 ahead)", LESS_MEMORY)}
        return batch


def _worker_init(trainer_alive, trainer_end, worker_id: int) -> None:
    # Ctrl-C reaches every process of the terminal's group, and a scheduler's SIGTERM may:
    # the training process stops the run between iterations and saves, which a worker
    # killed by the same signal would turn into a DataLoader error. So the workers ignore
    # both, and end when the trainer closes its end of a pipe (or ends itself), whatever
    # they are doing: DataLoader's own shutdown would wait for a batch in progress, then
    # send a SIGTERM they ignore.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    trainer_end.close()  # this process's copy (a forked worker has one): the trainer's alone keeps it open
    threading.Thread(target=_end_with, args=(trainer_alive,), daemon=True).start()


def _end_with(trainer_alive) -> None:
    with contextlib.suppress(EOFError):
        trainer_alive.recv()  # nothing is ever sent: this returns when the trainer's end closes
    os._exit(0)  # status 0: DataLoader's check of its workers takes it for an orderly end


@contextlib.contextmanager
def train_loader(batches: TrainBatches, start: int, stop: int, workers: int, pin_memory: bool):
    """An iterator over the batches of iterations start..stop-1 in order, built by
    ``workers`` processes (0: in this one; they leave SIGINT and SIGTERM to it), pinned
    for an asynchronous copy to the GPU, prefetched ahead. On leaving the block, or when
    this process ends, the workers end at once, even in the middle of a batch."""
    # (a pipe, not an Event: setting a multiprocessing Event waits for every process that
    # waits on it, and a killed worker never answers)
    pipe = torch.multiprocessing.Pipe(duplex=False) if workers else ()
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, stop), num_workers=workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if workers else None,
        worker_init_fn=functools.partial(_worker_init, *pipe) if workers else None)
    try:
        yield iter(loader)
    finally:
        for end in pipe:
            end.close()
