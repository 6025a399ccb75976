"""Batches of uint8 images in a seeded order that depends only on (seed, epoch), so a resumed run
sees exactly the batches the uninterrupted run would have seen."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ssl_lab.data.datasets import FileDataset, ImageSet, collate_decoded
from ssl_lab.errors import UserError

DEVICE_BUDGET = 2 * 2**30  # bytes of uint8 images held on an accelerator (larger sets: pinned host copies)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


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
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(uint8 images, labels or None) for consecutive chunks of `indices` of `batch_size` (global):
    each process takes its contiguous slice of every global batch. With an accelerator `device`, an
    in-memory set of up to DEVICE_BUDGET bytes is held there and batches are gathered on it: no copy
    from the host per step."""
    on_device = (
        device is not None and device.type != "cpu" and data.images is not None
        and data.images.numel() <= DEVICE_BUDGET
    )  # fmt: skip
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
    loader = torch.utils.data.DataLoader(
        FileDataset(data.files, data.image_size),
        batch_sampler=[c.tolist() for c in chunks],
        num_workers=num_workers,
        collate_fn=collate_decoded,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    for idx, (images, errors) in zip(chunks, loader):
        if errors:
            raise UserError(errors[0])
        yield images, _labels(data, idx)


def _labels(data: ImageSet, idx: torch.Tensor) -> torch.Tensor | None:
    return data.labels[idx] if data.labels is not None else None
