"""Batches of uint8 images in a seeded order that depends only on (seed, epoch), so a resumed run
sees exactly the batches the uninterrupted run would have seen."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ssl_lab.data.datasets import FileDataset, ImageSet, ViewCrop, collate_decoded
from ssl_lab.errors import UserError

DEVICE_BUDGET = 2 * 2**30  # bytes of uint8 images always allowed on an accelerator
DEVICE_SHARE = 0.25  # or up to this share of the accelerator's free memory (STL-10's 2.7 GiB on a large GPU)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def augment_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's augmentation stream on the training device (the views, MAE's masks)."""
    return seed * 100_003 + epoch + 7


def crop_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's crops drawn by the decoding workers; image i's generator is seeded with
    crop_seed + i, so its crops depend on (seed, epoch, image) only: not on the number of processes,
    the workers, or where a resumed run restarted."""
    return ((seed * 1_000_003 + epoch) * 4_294_967_311) % 2**62


def batches(
    data: ImageSet,
    indices: torch.Tensor,
    batch_size: int,
    drop_last: bool,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    persistent: bool = False,
    crops: Sequence[ViewCrop] | None = None,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor | None]]:
    """(uint8 images, labels or None) for consecutive chunks of `indices` of `batch_size` (global):
    each process takes its contiguous slice of every global batch. With an accelerator `device`, an
    in-memory set of up to DEVICE_BUDGET bytes is held there and batches are gathered on it: no copy
    from the host per step. For a file-decoded set, `persistent` keeps its decoding workers from one
    call (epoch) to the next instead of starting new ones each time, and `crops` makes its workers
    decode training views: a tuple of one uint8 batch per view, each cropped from the full image with
    the generator seeded `seed + index` (`crop_seed`)."""
    on_device = device is not None and device.type != "cpu" and fits_on(data, device)
    if on_device:
        indices = indices.to(device)
    chunks = list(indices.split(batch_size))
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    if world_size > 1:
        local = batch_size // world_size
        chunks = [c[rank * local : (rank + 1) * local] for c in chunks]
    if on_device:
        images, labels = data.on(device)
        for idx in chunks:
            yield images[idx], None if labels is None else labels[idx]
        return
    if data.images is not None:
        for idx in chunks:
            images = data.images[idx]
            yield (images.pin_memory() if pin_memory else images), _labels(data, idx)
        return
    crops = tuple(crops) if crops else None
    seeds = seed if crops else None
    if persistent and num_workers > 0:
        loader = persistent_loader(data, num_workers, pin_memory, crops)
        loader.batch_sampler.chunks, loader.batch_sampler.seed = chunks, seeds  # this epoch's
    else:
        loader = torch.utils.data.DataLoader(
            FileDataset(data.files, data.image_size, crops), batch_sampler=EpochBatches(chunks, seeds),
            num_workers=num_workers, collate_fn=collate_decoded, pin_memory=pin_memory,
        )  # fmt: skip
    for idx, (images, errors) in zip(chunks, loader):
        if errors:
            raise UserError(errors[0])
        yield images, _labels(data, idx)


def fits_on(data: ImageSet, device: torch.device) -> bool:
    """Whether the in-memory set is (or may be) held on the accelerator: up to DEVICE_BUDGET bytes, or
    DEVICE_SHARE of its free memory, asked once (the copy, once made, is kept)."""
    if data.images is None:
        return False
    if data.on_device() is not None:
        return True
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    return data.images.numel() <= max(DEVICE_BUDGET, DEVICE_SHARE * free)


class EpochBatches:
    """A batch sampler whose batches are set per epoch: a persistent DataLoader reads it afresh each
    time it is iterated. With a `seed`, each index comes with its crop generator's seed."""

    def __init__(self, chunks: list[torch.Tensor], seed: int | None = None) -> None:
        self.chunks, self.seed = chunks, seed

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int]]]:
        if self.seed is None:
            return (c.tolist() for c in self.chunks)
        return ([(i, self.seed + i) for i in c.tolist()] for c in self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def persistent_loader(
    data: ImageSet, num_workers: int, pin_memory: bool, crops: tuple[ViewCrop, ...] | None = None
) -> torch.utils.data.DataLoader:
    """One DataLoader per image set (and settings) whose workers live from epoch to epoch."""
    key = ("_loader", num_workers, pin_memory, crops)
    if key not in data.__dict__:
        data.__dict__[key] = torch.utils.data.DataLoader(
            FileDataset(data.files, data.image_size, crops), batch_sampler=EpochBatches([]), num_workers=num_workers,
            collate_fn=collate_decoded, pin_memory=pin_memory, persistent_workers=True,
        )  # fmt: skip
    return data.__dict__[key]


def _labels(data: ImageSet, idx: torch.Tensor) -> torch.Tensor | None:
    return data.labels[idx] if data.labels is not None else None
