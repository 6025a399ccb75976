"""Process-group facts in one place. Everything that writes (console, files, W&B) asks `is_main()`.

Single-process runs need no process group; under torchrun the environment names rank and world.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0
