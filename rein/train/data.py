"""The training feed: the batch of every iteration, a pure function of (seed, iteration,
rank), built by DataLoader worker processes."""
from __future__ import annotations

import signal

import torch

from ..data import DataError, augment_official, normalize
from ..data import FolderDataset  # noqa: F401  (benchmarks/test_bench_loader.py imports it from here)


class TrainBatches(torch.utils.data.Dataset):
    """Item ``it``: this process's share of the global batch of iteration ``it`` (normalised
    images [b, 3, crop, crop], labels [b, crop, crop]), a pure function of (seed, it, rank).
    Any DataLoader worker, any process under torchrun and a resumed run build exactly the
    same batch. A file that cannot be read gives ``{"error": message}`` instead of raising,
    so the training loop can save its state and name the file."""

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
        except DataError as e:
            return {"error": str(e)}
        return torch.stack(imgs), torch.stack(lbls)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    # Ctrl-C reaches every process of the terminal's group, and a scheduler's SIGTERM may:
    # the training process stops the run between iterations and saves, which a worker
    # killed by the same signal would turn into a DataLoader error.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_loader(batches: TrainBatches, start: int, stop: int, workers: int, pin_memory: bool):
    """Batches of iterations start..stop-1 in order, built by ``workers`` processes (0: in
    this one; they leave SIGINT and SIGTERM to it), pinned for an asynchronous copy to the
    GPU, prefetched ahead."""
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start, stop), num_workers=workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if workers else None,
        worker_init_fn=_leave_stop_signals_to_the_trainer)
