"""How long a checkpoint blocks the training thread: checkpoint.save (write + fsync) against
checkpoint.Writer.save (copy off the device, write in a background thread), on one state, in one run.

    python benchmarks/checkpoint.py [--rounds 5]

Measured figures: benchmarks/README.md ("Checkpoints").
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ssl_lab import checkpoint
from ssl_lab.methods.simclr import SimCLR
from ssl_lab.models.backbones import torchvision_resnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = SimCLR(torchvision_resnet("resnet18", cifar_stem=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()  # the momentum buffers exist, as in training
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    weights_mb = sum(t.numel() * t.element_size() for t in state["model"].values()) / 2**20
    plain, background = [], []
    writer = checkpoint.Writer()
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):  # taking turns, so a disturbance hits both
            start = time.perf_counter()
            checkpoint.save(state, Path(tmp) / "plain.pt")
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            writer.save(state, Path(tmp) / "background.pt")
            background.append(time.perf_counter() - start)
            writer.wait()
    a, b = statistics.median(plain) * 1e3, statistics.median(background) * 1e3
    print(f"ResNet-18 SimCLR + SGD momentum ({weights_mb:.0f} MB of weights), median of {args.rounds}: "
          f"training thread blocked {a:.0f} ms by checkpoint.save, {b:.0f} ms by Writer.save ({a / b:.1f}x less)")  # fmt: skip


if __name__ == "__main__":
    main()
