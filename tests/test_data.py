"""Data sets: the built-in synthetic set, folders of images, CIFAR subsets, batch order."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_lab import UserError
from ssl_lab.data.datasets import DataSplits, ImageSet, cifar, hold_out, imagefolder, synthetic
from ssl_lab.data.loader import batches, epoch_order

CIFAR_ROOT = Path(os.environ.get("SSL_LAB_DATA", "~/.cache/ssl_lab")).expanduser() / "cifar10-jpeg"


def test_synthetic_is_deterministic_uint8_and_labelled() -> None:
    a, b = synthetic(num_train=300, num_test=100, seed=3), synthetic(num_train=300, num_test=100, seed=3)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape == (300, 3, 32, 32)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, synthetic(num_train=300, num_test=100, seed=4).train.images)
    assert set(a.memory.labels.tolist()) == set(range(10)) and a.num_classes == 10
    assert a.memory.images is a.train.images  # the held-out labels are -1 in train (online probe)
    assert set(a.train.labels.tolist()) == set(range(-1, 10))
    # colour images, not grey ones
    assert (a.train.images[:, 0].float() - a.train.images[:, 1].float()).abs().mean() > 5


def make_folder(root: Path, classes=("cat", "dog"), per_class=6, size=(40, 30)) -> None:
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", size, (100 * c, 10 * i, 50)).save(root / split / name / f"{i}.png")


def test_imagefolder_labels_resize_and_memory_modes(tmp_path: Path) -> None:
    make_folder(tmp_path)
    held = imagefolder(str(tmp_path), image_size=16, in_memory=True, num_workers=0)
    lazy = imagefolder(str(tmp_path), image_size=16, in_memory=False, num_workers=0)
    assert held.num_classes == 2 and held.train.images.shape == (12, 3, 16, 16)
    assert held.memory.labels.tolist() == [0] * 6 + [1] * 6
    assert lazy.train.images is None and len(lazy.train.files) == 12
    order = torch.arange(12)
    (x_held, y_held), *_ = batches(held.train, order, 12, drop_last=False)
    (x_lazy, y_lazy), *_ = batches(lazy.train, order, 12, drop_last=False, num_workers=0)
    assert torch.equal(x_held, x_lazy) and torch.equal(y_held, y_lazy)


def test_unlabelled_folder_has_no_knn(tmp_path: Path) -> None:
    for i in range(5):
        Image.new("RGB", (20, 20)).save(tmp_path / f"{i}.jpg")
    data = imagefolder(str(tmp_path), image_size=8, num_workers=0)
    assert data.memory is None and data.test is None and len(data.train) == 5


def test_missing_cifar_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"no cifar10 found \(looked in {tmp_path}.*data.download=true"):
        cifar("cifar10", str(tmp_path))


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    assert torch.equal(epoch_order(100, 0, 3), epoch_order(100, 0, 3))
    assert not torch.equal(epoch_order(100, 0, 3), epoch_order(100, 0, 4))
    assert sorted(epoch_order(100, 1, 0).tolist()) == list(range(100))


def test_drop_last() -> None:
    data = synthetic(num_train=50, num_test=10)
    sizes = [len(x) for x, _ in batches(data.train, torch.arange(50), 16, drop_last=True)]
    assert sizes == [16, 16, 16]


@pytest.mark.skipif(
    not CIFAR_ROOT.is_dir() and not os.environ.get("CI"), reason="CIFAR-10 JPEG tree not extracted"
)
def test_cifar10_jpeg_tree_subset() -> None:
    data = cifar("cifar10", str(CIFAR_ROOT.parent), limit_train=500, limit_test=200, num_workers=2)
    assert data.train.images.shape == (500, 3, 32, 32) and data.test.images.shape == (200, 3, 32, 32)
    assert data.num_classes == 10 and data.train.labels.max() == 9
    again = cifar("cifar10", str(CIFAR_ROOT.parent), limit_train=500, limit_test=200, num_workers=2)
    assert torch.equal(data.train.images, again.train.images)


def test_in_memory_data_is_gathered_on_the_accelerator() -> None:
    """On a GPU the uint8 set is copied to the device once and each batch is an on-device gather (no
    host copy per step); the meta device stands in for the GPU. The batches are those of the host path."""
    data = synthetic(num_train=64, num_test=8)
    order = epoch_order(64, 0, 0)
    meta = torch.device("meta")
    on_device = list(batches(data.train, order, 16, drop_last=True, rank=1, world_size=2, device=meta))
    host = list(batches(data.train, order, 16, drop_last=True, rank=1, world_size=2))
    assert len(on_device) == len(host) == 4
    for (images, labels), (host_images, host_labels) in zip(on_device, host):
        assert images.device == meta and labels.device == meta
        assert images.shape == host_images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.shape == host_labels.shape
    assert data.train.on(meta)[0] is data.train.on(meta)[0]  # copied once


def test_file_decoding_workers_persist_across_epochs(tmp_path: Path) -> None:
    """The training loop keeps one DataLoader (and its workers) per file-decoded set: each epoch gives it
    that epoch's batches, the same ones a fresh DataLoader would give."""
    make_folder(tmp_path)
    lazy = imagefolder(str(tmp_path), image_size=16, in_memory=False, num_workers=0)
    loaders = []
    for epoch in range(3):
        order = epoch_order(12, 0, epoch)
        kept = list(batches(lazy.train, order, 4, drop_last=True, num_workers=1, persistent=True))
        fresh = list(batches(lazy.train, order, 4, drop_last=True, num_workers=0))
        assert len(kept) == len(fresh) == 3
        for (a, la), (b, lb) in zip(kept, fresh):
            assert torch.equal(a, b) and torch.equal(la, lb)
        loaders.append(next(v for k, v in lazy.train.__dict__.items() if isinstance(k, tuple)))
    assert loaders[0] is loaders[1] is loaders[2] and loaders[0].persistent_workers


def ids(images: ImageSet) -> set[int]:
    """Each image's identity: its first pixels, unique among these synthetic ones."""
    return {hash(x[:, :4, :4].numpy().tobytes()) for x in images.images}


def test_validation_split_is_held_out_of_the_labelled_training_images_by_a_fixed_seed() -> None:
    data = synthetic(num_train=1000, num_test=200)
    memory, val, bank, test = map(ids, (data.memory, data.val, data.val_bank, data.test))
    assert len(memory) == 1000 and len(val) == 100 and len(bank) == 900  # default: 10 %
    assert val | bank == memory and not val & bank  # disjoint, and together every labelled image
    assert not val & test and not bank & test  # test stays out of selection
    assert data.train.images is data.memory.images  # pretraining still sees every training image
    assert (data.train.labels == -1).sum() == 100  # but the online linear probe not the held-out labels
    assert torch.equal(data.val.labels, synthetic(num_train=1000, num_test=200).val.labels)  # fixed
    torch.manual_seed(123)  # the run's own seed does not move it
    assert ids(synthetic(num_train=1000, num_test=200).val) == val
    assert len(synthetic(num_train=1000, num_test=200, val_size=250).val) == 250
    off = synthetic(num_train=1000, num_test=200, val_size=0)
    assert off.val is None and off.monitored()[1] == "test"
    held = synthetic(num_train=1000, num_test=200, val_in_pretraining=False)
    assert ids(held.train) == ids(held.val_bank) and ids(held.memory) == memory


def test_the_monitor_reads_validation_and_the_evaluation_every_labelled_image() -> None:
    data = synthetic(num_train=1000, num_test=200)
    splits, split = data.monitored()
    assert split == "val" and splits.memory is data.val_bank and splits.test is data.val
    assert len(data.memory) == 1000  # what eval protocols train on: the validation images included


def test_a_validation_split_that_leaves_too_few_images_is_refused() -> None:
    with pytest.raises(
        UserError, match=r"data.val_size=600 leaves 400 of data=synthetic's 1000 .*val_size<=500"
    ):
        synthetic(num_train=1000, num_test=200, val_size=600)
    unlabelled = DataSplits(
        ImageSet(images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8)), None, None, 0, [0], [1]
    )
    assert hold_out(unlabelled, None, "imagefolder") is unlabelled  # no labels: no split, no monitor


def make_wide_folder(root: Path, n: int = 6) -> None:
    """96x32 images: a red, a green and a blue third. Shrinking the short side to 32 and centre-cropping
    (the old decoding) leaves only green; crops drawn on the full image reach the red and blue thirds."""
    array = np.zeros((32, 96, 3), dtype=np.uint8)
    array[:, :32, 0] = array[:, 32:64, 1] = array[:, 64:, 2] = 255
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(array).save(root / split / c / f"{i}.png")


CROPS = (((0.02, 0.05), (3 / 4, 4 / 3), 16), ((0.5, 1.0), (3 / 4, 4 / 3), 24))


def test_large_images_are_cropped_from_the_full_image_before_resizing(tmp_path: Path) -> None:
    import torchvision.transforms.functional as TF

    from ssl_lab.data.augment import sample_crops
    from ssl_lab.data.loader import crop_seed

    make_wide_folder(tmp_path)
    data = imagefolder(str(tmp_path), image_size=32, num_workers=0)
    assert data.train.images is None  # auto: larger than image_size, so decoded (and cropped) per step
    order = epoch_order(12, 0, 5)
    seed = crop_seed(0, 5)
    (views, labels), *_ = batches(data.train, order, 12, drop_last=True, crops=CROPS, seed=seed)
    small, large = views
    assert small.shape == (12, 3, 16, 16) and large.shape == (12, 3, 24, 24) and small.dtype == torch.uint8
    full = Image.open(data.train.files[0]).convert("RGB")
    for j, i in enumerate(order.tolist()):  # each view: torchvision's resized_crop of the full image
        g = torch.Generator().manual_seed(seed + i)
        for view, (scale, ratio, size) in zip((small, large), CROPS):
            top, left, h, w = sample_crops(1, 32, 96, scale, ratio, g)[0].long().tolist()
            ref = TF.pil_to_tensor(TF.resized_crop(full, top, left, h, w, [size, size]))
            assert torch.equal(view[j], ref)
    dominant = small.float().mean(dim=(2, 3)).argmax(dim=1)  # the colour each small crop shows
    assert set(dominant.tolist()) == {0, 1, 2}  # red and blue thirds too, not only the centre


def test_worker_crops_do_not_depend_on_processes_workers_or_a_resume(tmp_path: Path) -> None:
    make_wide_folder(tmp_path)
    data = imagefolder(str(tmp_path), image_size=32, num_workers=0)
    order, seed = epoch_order(12, 1, 2), 77

    def views(**kw) -> list[torch.Tensor]:
        return [
            b[0][0]
            for b in batches(data.train, order[kw.pop("skip", 0) :], 4, True, crops=CROPS, seed=seed, **kw)
        ]

    whole = views()
    halves = [views(rank=r, world_size=2) for r in (0, 1)]
    for b, batch in enumerate(whole):  # rank 0 and rank 1 take the halves of each global batch
        assert torch.equal(batch, torch.cat([halves[0][b], halves[1][b]]))
    assert all(torch.equal(a, b) for a, b in zip(views(num_workers=2), whole))
    assert all(torch.equal(a, b) for a, b in zip(views(skip=4), whole[1:]))  # resumed after a batch


def test_evaluation_resizes_then_centre_crops_at_0_875(tmp_path: Path) -> None:
    import torchvision.transforms as T

    from ssl_lab.data.datasets import decode_image

    torch.manual_seed(0)
    path = tmp_path / "x.png"
    Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy()).save(path)
    reference = T.Compose([T.Resize(round(16 / 0.875)), T.CenterCrop(16), T.PILToTensor()])
    assert torch.equal(decode_image(path, 16), reference(Image.open(path).convert("RGB")))
    same_size = tmp_path / "y.png"
    Image.fromarray(torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy()).save(same_size)
    assert torch.equal(decode_image(same_size, 16), T.PILToTensor()(Image.open(same_size)))  # as it is
