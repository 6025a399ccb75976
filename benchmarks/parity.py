"""ssl_lab's training step fed with either ssl_lab's batched augmentation or lightly's own per-sample
transforms: one thing changed at a time, to find where a gap to lightly's examples comes from.

    python benchmarks/parity.py experiment=lightly_mocov2 data.limit_train=10000 seed=0 --views lightly
    python benchmarks/parity.py experiment=lightly_mocov2 data.limit_train=10000 seed=0 --views ssl_lab
    python benchmarks/parity.py ... --views lightly --lightly-blur 0      # lightly's views without blur
    python benchmarks/parity.py experiment=lightly_mocov2 ... --views lightly --loop lightly   # lightly's example

`--loop lightly` trains lightly's example instead of ssl_lab's step (MoCo, BYOL, SimSiam, Barlow Twins,
VICReg): lightly's heads and loss, and for the teacher methods update_momentum before each step with the
momentum of the epoch (cosine_schedule), as examples/pytorch/<method>.py does, on the same data, views
and kNN.

Everything but the views is the runner's: the model and step from ssl_lab.build, the data subset and its
epoch order, the schedule; the kNN at the end is the runner's eval=knn (k 200, T 0.1, the labelled
training subset as the bank, the test split as the queries). `--views lightly` runs the experiment's
lightly transform (LIGHTLY_VIEWS) in 2 DataLoader workers on PIL images, as lightly's examples do. A test-only
path: it imports lightly (the dev extra). Prints one JSON line; experiments/README.md records them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from hydra.utils import instantiate
from PIL import Image

from ssl_lab.build import Prefetch, build_model, build_step, pick_device
from ssl_lab.config import check_config, compose
from ssl_lab.data.loader import augment_seed, batches, epoch_order
from ssl_lab.eval.knn import knn_accuracy


def lightly_views(experiment: str, blur: float | None):
    """The lightly transform of the example that `experiment` reproduces (blur p overridden if given)."""
    from lightly import transforms as T

    kwargs = {} if blur is None else {"gaussian_blur": blur}
    if experiment == "lightly_mocov2":
        return T.MoCoV2Transform(input_size=32, **kwargs)
    if experiment == "lightly_simsiam":
        return T.SimSiamTransform(input_size=32, **kwargs)
    if experiment == "lightly_vicreg":
        return T.VICRegTransform(input_size=32, **kwargs)
    if experiment == "lightly_simclr":  # the example turns the blur off
        return T.SimCLRTransform(input_size=32, gaussian_blur=0.0 if blur is None else blur)
    if experiment == "lightly_nnclr":
        return T.SimCLRTransform(input_size=32, **kwargs)
    if experiment in ("lightly_byol", "lightly_barlowtwins"):
        blur = 0.0 if blur is None else blur
        return T.BYOLTransform(
            view_1_transform=T.BYOLView1Transform(input_size=32, gaussian_blur=blur),
            view_2_transform=T.BYOLView2Transform(input_size=32, gaussian_blur=blur),
        )
    raise SystemExit(f"no lightly transform known for experiment={experiment}")


def lightly_step(experiment: str, model, cfg, steps_per_epoch: int, momentum: str = "epoch"):
    """The training step of lightly's examples/pytorch/<method>.py for MoCo, BYOL, SimSiam, Barlow Twins
    and VICReg, with lightly's heads and losses, on ssl_lab's (same-architecture) backbone, whose evaluated
    network the kNN then reads. The teacher methods call update_momentum before each step with the
    momentum of the epoch (cosine_schedule(epoch, epochs, 0.996, 1)), as the examples do; SGD 0.06."""
    import copy

    from lightly import loss as L
    from lightly.models import modules as M
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    backbone, width = model.backbone, model.num_features
    method = experiment.removeprefix("lightly_")
    if method == "mocov2":  # moco.py
        heads = {"projection": M.MoCoProjectionHead(width, 512, 128)}
        criterion = L.NTXentLoss(memory_bank_size=(4096, 128))
    elif method == "byol":  # byol.py
        heads = {"projection": M.BYOLProjectionHead(width, 1024, 256), "prediction": M.BYOLPredictionHead(256, 1024, 256)}  # fmt: skip
        criterion = L.NegativeCosineSimilarity()
    elif method == "simsiam":  # simsiam.py
        heads = {"projection": M.SimSiamProjectionHead(width, 512, 128), "prediction": M.SimSiamPredictionHead(128, 64, 128)}  # fmt: skip
        criterion = L.NegativeCosineSimilarity()
    elif method == "barlowtwins":  # barlowtwins.py
        heads = {"projection": M.BarlowTwinsProjectionHead(width, 2048, 2048)}
        criterion = L.BarlowTwinsLoss()
    elif method == "vicreg":  # vicreg.py
        heads = {"projection": M.heads.VICRegProjectionHead(width, 2048, 2048, num_layers=2)}
        criterion = L.VICRegLoss()
    else:
        raise SystemExit(f"--loop lightly: no lightly example known for experiment={experiment}")
    heads = {name: head.to(next(backbone.parameters()).device) for name, head in heads.items()}
    student = torch.nn.Sequential(backbone, torch.nn.Flatten(1), heads["projection"])
    teacher = None
    if method in ("mocov2", "byol"):
        teacher = copy.deepcopy(student)
        deactivate_requires_grad(teacher)
    parameters = [*backbone.parameters(), *(p for head in heads.values() for p in head.parameters())]
    optimizer = torch.optim.SGD(parameters, lr=0.06)
    steps = iter(range(10**9))

    def step(views, epoch):
        i = next(steps)  # per step over all the run's steps, as ssl_lab's MomentumTeacher
        if teacher is not None:
            m = (
                cosine_schedule(epoch, cfg.epochs, 0.996, 1)
                if momentum == "epoch"
                else cosine_schedule(i, cfg.epochs * steps_per_epoch, 0.996, 1)
            )
            update_momentum(student, teacher, m=m)
        x0, x1 = views
        if method == "mocov2":
            loss = criterion(student(x0), teacher(x1).detach())
        elif method == "byol":
            p0, p1 = heads["prediction"](student(x0)), heads["prediction"](student(x1))
            z0, z1 = teacher(x0).detach(), teacher(x1).detach()
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        elif method == "simsiam":
            z0, z1 = student(x0), student(x1)
            p0, p1 = heads["prediction"](z0), heads["prediction"](z1)
            loss = 0.5 * (criterion(z0.detach(), p1) + criterion(z1.detach(), p0))
        else:
            loss = criterion(student(x0), student(x1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return {"loss": loss.detach()}

    return step


class PILViews(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, order: torch.Tensor, transform) -> None:
        self.images, self.order, self.transform = images, order, transform

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.images[self.order[i]].permute(1, 2, 0).numpy())
        return tuple(self.transform(image)[:2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--views", choices=("ssl_lab", "lightly"), required=True)
    parser.add_argument(
        "--lightly-blur", type=float, default=None, help="lightly's blur p (default: the example's)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loop", choices=("ssl_lab", "lightly"), default="ssl_lab")
    parser.add_argument("--lightly-momentum", choices=("epoch", "step"), default="epoch",
                        help="lightly's loop: the EMA momentum's cosine per epoch (the example) or per step (ssl_lab's)")  # fmt: skip
    args = parser.parse_intermixed_args()
    cfg = compose("train", [*args.overrides, "logger=none"])
    check_config(cfg)
    experiment = next(o.split("=", 1)[1] for o in args.overrides if o.startswith("experiment="))
    device = pick_device(cfg.trainer.device)
    torch.manual_seed(cfg.seed)
    data = instantiate(cfg.data, num_workers=cfg.trainer.num_workers)
    model = build_model(cfg, device)
    steps_per_epoch = len(data.train) // cfg.batch_size
    step = build_step(cfg, model, instantiate(cfg.augment).to(device), steps_per_epoch)
    transform = lightly_views(experiment, args.lightly_blur) if args.views == "lightly" else None
    example_step = None
    if args.loop == "lightly":
        if transform is None:
            raise SystemExit("--loop lightly: with --views lightly only (lightly's example on its own views)")
        example_step = lightly_step(experiment, model, cfg, steps_per_epoch, args.lightly_momentum)
    start, i = time.perf_counter(), 0
    for epoch in range(cfg.epochs):
        model.train()
        order = epoch_order(len(data.train), cfg.seed, epoch)
        if transform is None:
            rng = torch.Generator(device).manual_seed(augment_seed(cfg.seed, epoch))  # the runner's stream
            loader = batches(data.train, order, cfg.batch_size, drop_last=True, device=device)
            for views, _ in Prefetch(step, loader, rng, device):
                out = step.train_on(views, i)
                i += 1
        else:
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # the workers' seeds
            loader = torch.utils.data.DataLoader(
                PILViews(data.train.images, order, transform), batch_size=cfg.batch_size, drop_last=True,
                num_workers=args.workers,
            )  # fmt: skip
            for views in loader:
                layout = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
                views = [v.to(device).contiguous(memory_format=layout) for v in views]
                out = step.train_on(views, i) if example_step is None else example_step(views, epoch)
                i += 1
        print(f"epoch {epoch + 1}/{cfg.epochs} loss {out['loss'].item():.4f} ({time.perf_counter() - start:.0f} s)",
              flush=True)  # fmt: skip
    top1 = knn_accuracy(model, data, 200, 0.1, device=device, batch_size=512, autocast_dtype=None,
                        channels_last=cfg.trainer.channels_last, num_workers=0)["top1"]  # fmt: skip
    print(json.dumps({"experiment": experiment, "views": args.views, "loop": args.loop, "lightly_blur": args.lightly_blur,
                      "lightly_momentum": args.lightly_momentum,
                      "overrides": args.overrides, "knn_top1": round(top1, 2), "loss": round(out["loss"].item(), 4),
                      "seconds": round(time.perf_counter() - start)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
