"""A folder of ImageNet-sized JPEGs for timing the decoding path, made on the spot (no download).

    python benchmarks/jpeg_folder.py /tmp/jpegs                 # 1,536 train + 256 val images, 10 classes
    python -m ssl_lab.bench data=imagefolder data.root=/tmp/jpegs data.image_size=224 ...

Images of 375-640 px (ImageNet's usual sizes), quality 90, ~80 KB each as ImageNet's are: a smooth random
colour field (upscaled 8x8 noise) plus pixel noise, so that the decoder has an ImageNet-like amount of
detail to read. Seeded: the same folder every time. Time spent decoding depends on the file's size and
detail, not on what it shows, so this stands in for real photographs in a speed measurement only.
Written by one process per core (each image seeded by its split and index, so the folder does not
depend on their number).
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((500, 375), (375, 500), (500, 333), (640, 480))


def write_image(path: Path, seed: tuple[int, ...]) -> None:
    rng = np.random.default_rng(seed)
    w, h = SIZES[rng.integers(len(SIZES))]
    field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write_folder(
    root: Path,
    train: int = 1536,
    val: int = 256,
    classes: int = 10,
    seed: int = 0,
    workers: int | None = None,
) -> None:
    jobs = []
    for s, (split, n) in enumerate((("train", train), ("val", val))):
        for i in range(n):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{i}.jpg", (seed, s, i)))
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        list(pool.map(write_image, *zip(*jobs), chunksize=16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="where to write train/ and val/ (created)")
    parser.add_argument("--train", type=int, default=1536, help="training images")
    parser.add_argument("--val", type=int, default=256, help="validation images")
    args = parser.parse_args()
    write_folder(args.root, args.train, args.val)
    files = list(args.root.rglob("*.jpg"))
    size = sum(f.stat().st_size for f in files) / len(files) / 1e3
    print(f"{len(files)} JPEGs under {args.root}, {size:.0f} KB on average")


if __name__ == "__main__":
    main()
