"""Data sets as uint8 image tensors: held in memory when small, decoded by workers when not.

Every loader returns `DataSplits`: the pretraining images, and for labelled data the labelled
training images, a validation split held out of them (what the kNN monitor and sweeps select on) and
the test split (only the final evaluation reads it), with the normalisation statistics of the data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ssl_lab.config import NonNegativeFloat, NonNegativeInt, PositiveInt
from ssl_lab.data.augment import sample_crops
from ssl_lab.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


@dataclass
class ImageSet:
    """Images of one split: `images` (uint8 [N,3,H,W]) when in memory, else `files` decoded on demand."""

    images: torch.Tensor | None = None
    files: list[Path] | None = None
    labels: torch.Tensor | None = None
    image_size: int = 32

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.files)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The in-memory images (and labels) on `device`, copied once and kept (uint8: CIFAR-10's
        50,000 images are 150 MB)."""
        cached = self.on_device()
        # `cuda` and `cuda:0` are unequal devices; compare with the index a tensor there reports
        if cached is None or cached[0].device != torch.empty(0, device=device).device:
            labels = self.labels.to(device) if self.labels is not None else None
            cached = self.__dict__["_on_device"] = (self.images.to(device), labels)
        return cached

    def on_device(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The copy `on` made, if any."""
        return self.__dict__.get("_on_device")

    def select(self, idx: torch.Tensor) -> ImageSet:
        """The images (and labels) at `idx`."""
        return ImageSet(
            images=self.images[idx] if self.images is not None else None,
            files=[self.files[i] for i in idx] if self.files is not None else None,
            labels=self.labels[idx] if self.labels is not None else None,
            image_size=self.image_size,
        )


@dataclass
class DataSplits:
    train: ImageSet  # what pretraining sees (no labels used)
    memory: ImageSet | None  # all labelled training images: the final evaluation's training set
    test: ImageSet | None  # the final evaluation's test set; never used for selection
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    val: ImageSet | None = None  # held out of `memory` by a fixed seed: the kNN monitor's queries
    val_bank: ImageSet | None = None  # `memory` without `val`: the kNN monitor's bank

    def monitored(self) -> tuple[DataSplits, str] | None:
        """The splits the kNN monitor uses, as (memory=bank, test=queries), and its metric's prefix:
        validation when there is a split, else (data.val_size=0) test, named as such."""
        if self.memory is None:
            return None
        if self.val is not None:
            return replace(self, memory=self.val_bank, test=self.val), "val"
        return self, "test"


VAL_SEED = 2  # the validation split's own seed (train/test subsets use 0 and 1): the same across runs


def validation_rows(n: int, val_size: int | None, name: str) -> torch.Tensor | None:
    """Which of `n` labelled training images form the validation split (sorted; None: no split):
    `val_size` of them (None: 10 %), chosen by a fixed seed so that every run, whatever its own seed,
    validates on the same images."""
    if val_size == 0:
        return None
    size = max(1, n // 10) if val_size is None else val_size
    if size > n // 2:
        raise UserError(
            f"data.val_size={size} leaves {n - size} of data={name}'s {n} labelled training images for "
            f"the kNN bank; use data.val_size<={n // 2}, or 0 for no validation split"
        )
    return torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SEED))[:size].sort().values


def without_labels(labels: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """`labels` with those at `rows` set to -1: images the online linear probe must not train on."""
    if rows is None:
        return labels
    hidden = labels.clone()
    hidden[rows] = -1
    return hidden


def hold_out(splits: DataSplits, val_size: int | None, name: str, in_pretraining: bool = True) -> DataSplits:
    """`splits` with `val_size` labelled training images held out as the validation split
    (`validation_rows`). `in_pretraining=False` also keeps them out of pretraining, when `train` is the
    labelled set; with them in it, their labels in `train` are -1, so that the online linear probe
    does not train on the images it is scored on."""
    memory = splits.memory
    if memory is None:
        return splits
    n = len(memory)
    rows = validation_rows(n, val_size, name)
    if rows is None:
        return splits
    keep = torch.ones(n, dtype=torch.bool)
    keep[rows] = False
    val, bank = memory.select(rows), memory.select(keep.nonzero().flatten())
    train = splits.train
    if not in_pretraining:
        if train is not memory:
            raise UserError(
                f"data.val_in_pretraining=false: data={name} pretrains on more than its labelled images; "
                "keep data.val_in_pretraining=true"
            )
        train = bank
    elif train is memory:
        train = replace(train, labels=without_labels(train.labels, rows))
    return replace(splits, train=train, val=val, val_bank=bank)


def _subset(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def _limited(images: ImageSet, limit: int | None, seed: int) -> ImageSet:
    idx = _subset(len(images), limit, seed)
    return images if idx is None else images.select(idx)


# ----------------------------------------------------------------------------- decoding image files


EVAL_CROP = 0.875  # the standard evaluation crop: resize the short side to size / 0.875, centre-crop size

# A view's geometry, drawn by the decoding workers on the full image: (crop_scale, crop_ratio, size).
ViewCrop = tuple[tuple[float, float], tuple[float, float], int]


def open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; remove or replace the file") from None


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_image(path: Path, size: int) -> torch.Tensor:
    """uint8 [3,size,size], the evaluation transform: an image of that size as it is; any other has its
    short side resized to size / EVAL_CROP and is centre-cropped to size (torchvision's Resize +
    CenterCrop on the PIL image: Resize(256) + CenterCrop(224) for ImageNet)."""
    im = open_rgb(path)
    if im.size != (size, size):
        im = TF.center_crop(TF.resize(im, round(size / EVAL_CROP), TF.InterpolationMode.BILINEAR), size)
    return to_tensor(im)


def crop_views(im: Image.Image, crops: Sequence[ViewCrop], g: torch.Generator) -> list[torch.Tensor]:
    """The training views' random resized crops of the full decoded image: each box drawn as
    torchvision's RandomResizedCrop draws it (`sample_crops`) from `g`, then cropped and resized as its
    resized_crop does a PIL image (bilinear, antialiased)."""
    views = []
    for scale, ratio, size in crops:
        top, left, h, w = sample_crops(1, im.height, im.width, scale, ratio, g)[0].long().tolist()
        views.append(
            to_tensor(TF.resized_crop(im, top, left, h, w, [size, size], TF.InterpolationMode.BILINEAR))
        )
    return views


class FileDataset(torch.utils.data.Dataset):
    """Decodes files in DataLoader workers; errors travel back as text so the main process can
    report them in one line (an exception raised in a worker arrives wrapped in its traceback).

    Indexed by `i`: the evaluation transform (`decode_image`). With `crops`, indexed by `(i, seed)`:
    the training views of image i, cropped from the full image by a generator seeded with `seed`."""

    def __init__(self, files: list[Path], size: int, crops: Sequence[ViewCrop] | None = None) -> None:
        self.files, self.size, self.crops = files, size, crops

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], str]:
        if isinstance(key, tuple):
            i, seed = key
            try:
                views = crop_views(open_rgb(self.files[i]), self.crops, torch.Generator().manual_seed(seed))
                return tuple(views), ""
            except UserError as e:
                return tuple(torch.zeros(3, s, s, dtype=torch.uint8) for *_, s in self.crops), str(e)
        try:
            return decode_image(self.files[key], self.size), ""
        except UserError as e:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), str(e)


def collate_decoded(batch: list[tuple]) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], list[str]]:
    """Images [B,3,H,W], or for training views a tuple of one such batch per view; and the errors."""
    errors = [b[1] for b in batch if b[1]]
    if isinstance(batch[0][0], tuple):
        return tuple(torch.stack(view) for view in zip(*(b[0] for b in batch))), errors
    return torch.stack([b[0] for b in batch]), errors


def decode_all(files: list[Path], size: int, num_workers: int) -> torch.Tensor:
    """Decode every file into one uint8 tensor, in parallel workers."""
    loader = torch.utils.data.DataLoader(
        FileDataset(files, size), batch_size=256, num_workers=num_workers, collate_fn=collate_decoded
    )
    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    start = 0
    for images, errors in loader:
        if errors:
            raise UserError(errors[0])
        out[start : start + len(images)] = images
        start += len(images)
    return out


def find_images(folder: Path, labelled: bool) -> tuple[list[Path], torch.Tensor | None, list[str]]:
    """Image files under `folder`; with `labelled`, the first sub-folder names are the classes
    (sorted, as torchvision's ImageFolder)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}; point data.root at a folder of images"
        )
    if not labelled:
        return files, None, []
    classes = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    if not classes:
        raise UserError(
            f"{folder} has no class sub-folders, so there are no labels; "
            "put images in <split>/<class>/ folders or set data.labelled=false"
        )
    index = {c: i for i, c in enumerate(classes)}
    files = [p for p in files if len(p.relative_to(folder).parts) > 1]
    labels = torch.tensor([index[p.relative_to(folder).parts[0]] for p in files])
    return files, labels, classes


def all_of_size(files: list[Path], size: int, sample: int = 32) -> bool:
    """Whether the images are size x size already (a seeded sample of them; PIL reads only headers)."""
    idx = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:sample]
    for i in idx.tolist():
        try:
            with Image.open(files[i]) as im:
                if im.size != (size, size):
                    return False
        except (OSError, ValueError):
            return False  # decoding per step reports it in one line
    return True


def folder_split(
    folder: Path, size: int, labelled: bool, limit: int | None, seed: int, in_memory: bool, workers: int
) -> tuple[ImageSet, list[str]]:
    files, labels, classes = find_images(folder, labelled)
    split = _limited(ImageSet(files=files, labels=labels, image_size=size), limit, seed)
    if in_memory:
        split = ImageSet(images=decode_all(split.files, size, workers), labels=split.labels, image_size=size)
    return split, classes


# ----------------------------------------------------------------------------- the data sets


def synthetic(
    image_size: PositiveInt = 32,
    num_train: PositiveInt = 10000,
    num_test: PositiveInt = 2000,
    num_classes: PositiveInt = 10,
    seed: int = 0,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
    limit_train: PositiveInt | None = None,
    limit_test: PositiveInt | None = None,
    val_size: NonNegativeInt | None = None,
    val_in_pretraining: bool = True,
    **_: object,
) -> DataSplits:
    from ssl_lab.data.synthetic import make_synthetic

    num_train, num_test = min(num_train, limit_train or num_train), min(num_test, limit_test or num_test)
    x_train, y_train, x_test, y_test = make_synthetic(num_train, num_test, image_size, num_classes, seed)
    train = ImageSet(images=x_train, labels=y_train, image_size=image_size)
    test = ImageSet(images=x_test, labels=y_test, image_size=image_size)
    return hold_out(
        DataSplits(train, train, test, num_classes, mean, std), val_size, "synthetic", val_in_pretraining
    )


def _missing(what: str, looked: list[Path], how: str) -> UserError:
    return UserError(f"no {what} found (looked in {', '.join(map(str, looked))}); {how}")


def cifar(
    name: str,
    root: str,
    download: bool = False,
    image_size: PositiveInt = 32,
    limit_train: PositiveInt | None = None,
    limit_test: PositiveInt | None = None,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
    num_workers: NonNegativeInt = 2,
    val_size: NonNegativeInt | None = None,
    val_in_pretraining: bool = True,
    **_: object,
) -> DataSplits:
    """CIFAR-10/100 from torchvision's format (downloadable) or an ImageFolder tree with train/ and test/."""
    import torchvision

    base = Path(root).expanduser()
    tv_class, tv_dir = {
        "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py"),
        "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python"),
    }[name]
    looked = [base, base / name, base / f"{name}-jpeg"]
    for folder in looked:
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            train, classes = folder_split(
                folder / "train", image_size, True, limit_train, 0, True, num_workers
            )
            test, _ = folder_split(folder / "test", image_size, True, limit_test, 1, True, num_workers)
            splits = DataSplits(train, train, test, len(classes), mean, std)
            return hold_out(splits, val_size, name, val_in_pretraining)
    tv_root = next((f for f in looked if (f / tv_dir).is_dir()), base)
    if not (tv_root / tv_dir).is_dir() and not download:
        raise _missing(
            name,
            looked,
            f"set data.root=<dir> (or SSL_LAB_DATA) to a folder holding {tv_dir}/ or train/ and test/ "
            "class folders, or add data.download=true",
        )
    splits = []
    for train_split, limit, seed in ((True, limit_train, 0), (False, limit_test, 1)):
        ds = tv_class(str(tv_root), train=train_split, download=download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        full = ImageSet(images=images, labels=torch.tensor(ds.targets), image_size=32)
        splits.append(_limited(full, limit, seed))
    splits = DataSplits(splits[0], splits[0], splits[1], len(ds.classes), mean, std)
    return hold_out(splits, val_size, name, val_in_pretraining)


def stl10(
    root: str,
    download: bool = False,
    image_size: PositiveInt = 96,
    limit_train: PositiveInt | None = None,
    limit_test: PositiveInt | None = None,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.25, 0.25, 0.25),
    val_size: NonNegativeInt | None = None,
    val_in_pretraining: bool = True,
    **_: object,
) -> DataSplits:
    """Pretrain on train+unlabeled (105k images, the validation images among them: unlabelled there);
    the labelled train split is the evaluation's training set, and the validation split comes from it."""
    import torchvision

    base = Path(root).expanduser()
    if not (base / "stl10_binary").is_dir() and not download:
        raise _missing(
            "STL-10",
            [base],
            "set data.root=<dir> (or SSL_LAB_DATA) holding stl10_binary/, or add data.download=true",
        )

    def split(name: str, limit: int | None, seed: int) -> ImageSet:
        ds = torchvision.datasets.STL10(str(base), split=name, download=download)
        labels = torch.from_numpy(ds.labels).long() if name != "unlabeled" else None
        return _limited(ImageSet(images=torch.from_numpy(ds.data), labels=labels, image_size=96), limit, seed)

    memory, test = split("train", None, 0), split("test", limit_test, 1)
    unlabeled = split("unlabeled", None, 0)
    # the labelled images first, the validation split's labels hidden, then the unlabelled (-1)
    held_out = validation_rows(len(memory), val_size, "stl10")
    labels = torch.cat([without_labels(memory.labels, held_out), torch.full((len(unlabeled),), -1)])
    train = _limited(
        ImageSet(images=torch.cat([memory.images, unlabeled.images]), labels=labels, image_size=96),
        limit_train, 0,
    )  # fmt: skip
    return hold_out(DataSplits(train, memory, test, 10, mean, std), val_size, "stl10", val_in_pretraining)


def imagefolder(
    root: str,
    image_size: PositiveInt = 64,
    labelled: bool = True,
    in_memory: bool | str = "auto",
    max_memory_gb: NonNegativeFloat = 8,
    limit_train: PositiveInt | None = None,
    limit_test: PositiveInt | None = None,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    num_workers: NonNegativeInt = 2,
    val_size: NonNegativeInt | None = None,
    val_in_pretraining: bool = True,
    **_: object,
) -> DataSplits:
    """root/train + root/test (or root/val) of class folders; or any folder of images (no labels)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(f"data.root={base} is not a directory; point data.root at a folder of images")
    test_dir = next((base / d for d in ("test", "val") if (base / d).is_dir()), None)
    train_dir = base / "train" if (base / "train").is_dir() else base
    labelled = labelled and test_dir is not None
    files, _, _ = find_images(train_dir, False)
    if in_memory == "auto":  # held only when that loses nothing: larger images are cropped from the full
        n = min(len(files), limit_train or len(files))  # image by the decoding workers every step
        in_memory = n * 3 * image_size**2 <= max_memory_gb * 2**30 and all_of_size(files, image_size)
    train, classes = folder_split(train_dir, image_size, labelled, limit_train, 0, in_memory, num_workers)
    if not labelled:
        return DataSplits(train, None, None, 0, mean, std)
    test, _ = folder_split(test_dir, image_size, True, limit_test, 1, in_memory, num_workers)
    splits = DataSplits(train, train, test, len(classes), mean, std)
    return hold_out(splits, val_size, "imagefolder", val_in_pretraining)
