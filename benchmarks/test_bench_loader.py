"""The training data path: images per second through the training loader (decode, random
resize, crop, flip, photometric jitter, normalise) for GTAV-sized PNGs, with 1 and 2
worker processes. Loading is CPU work, so this number is meaningful on a CPU; compare it
with the GPU step rate it must feed (RESULTS.md: about 10 steps/s of batch 4 for
DINOv2-L at 512 on an H200, i.e. ~40 images/s)."""
import numpy as np
import pytest
import torch
from PIL import Image

from rein.train.data import FolderDataset, TrainBatches, train_loader

H, W, N_FILES, BATCH, ITERS = 1052, 1914, 8, 4, 6


@pytest.fixture(scope="module")
def gtav(tmp_path_factory):
    root = tmp_path_factory.mktemp("gtav")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    for i in range(N_FILES):  # smooth content with noise: compresses like a rendered frame
        img = np.stack([(xx * 0.1 + yy * 0.05 + 17 * i) % 255, (xx * 0.03) % 255, (yy * 0.07) % 255], -1)
        img = (img + rng.integers(0, 30, img.shape)).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"{i:05d}.png")
        lbl = np.array([7, 8, 11, 21, 23, 26], dtype=np.uint8)[(xx // 300 + yy // 300) % 6]
        Image.fromarray(lbl, mode="L").save(root / "labels" / f"{i:05d}.png")
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_loader_images_per_second(benchmark, gtav, workers):
    ds = FolderDataset("gtav", gtav, "train", uint8=True)  # as rein.train reads a training split
    batches = TrainBatches(ds, BATCH, 512, seed=0)

    def epoch():
        n = 0
        with train_loader(batches, 0, ITERS, workers, pin_memory=False) as loader:
            for images, labels in loader:
                assert images.shape == (BATCH, 3, 512, 512) and labels.shape == (BATCH, 512, 512)
                n += images.shape[0]
        return n

    benchmark.group = "loader, GTAV-sized PNGs (1914x1052), crop 512"
    n = benchmark.pedantic(epoch, rounds=2, warmup_rounds=0)
    rate = n / benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = round(rate, 1)
    print(f"\nloader: {workers} worker(s): {rate:.1f} images/s")
    assert n == BATCH * ITERS and torch.isfinite(torch.tensor(rate))
