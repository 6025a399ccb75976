"""eval=finetune: SimCLRv2's semi-supervised fine-tuning (Chen, Kornblith, Swersky, Norouzi and Hinton
2020b, "Big Self-Supervised Models are Strong Semi-Supervised Learners"; google-research/simclr).

The whole network is fine-tuned on a class-balanced `label_fraction` of the labelled train images
(0.01 / 0.1 / 1.0: the papers' 1 % / 10 % / 100 %), fixed by `subset_seed` alone so that every run and
every method sees the same images. As in SimCLRv2 the network is the backbone plus the first
`from_head_layer` Linear-BN-ReLU layers of the method's projection head (1: "fine-tune from the first
layer of the projection head"; 0: from the backbone, as SimCLRv1), then a zero-initialised linear
classifier (`--zero_init_logits_layer`). Random resized crop + flip; every labelled image once per
epoch; `epochs=null` is the paper's for the fraction: 60 below 10 % of the labels (its 1 %), 30 from
10 % (its 10 % and 100 %). Unlike the paper (LARS, lr 0.005 x sqrt(batch) at batch 1024, no weight
decay), the optimiser is `common.sgd_cosine`'s SGD.

The fine-tuned network is saved as `finetune_<pct>.pt` in the run dir, with what rebuilds it (the
pretraining config, `from_head_layer`, the subset): the teacher of eval=distill.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_lab import checkpoint
from ssl_lab.config import LabelFraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from ssl_lab.errors import UserError
from ssl_lab.eval.common import EvalContext, fit, percent, test_accuracy, train_augment


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of `fraction` of the images of every class (at least one per class), drawn with
    `seed`: the same labels and seed always give the same subset."""
    if not 0 < fraction <= 1:
        raise UserError(f"eval.label_fraction={fraction} must be in (0, 1], e.g. 0.01, 0.1 or 1.0")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique(sorted=True):
        members = (labels == c).nonzero()[:, 0]
        take = max(1, math.floor(fraction * len(members) + 0.5))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


def paper_epochs(label_fraction: float) -> int:
    """SimCLRv2's fine-tuning epochs: 60 with 1 % of the labels, 30 with 10 % and 100 %."""
    return 60 if label_fraction < 0.1 else 30


def head_layers(model: nn.Module, n: int) -> tuple[nn.Sequential, int]:
    """A copy of the first `n` hidden layers (Linear-BN-ReLU, up to the n-th activation) of the method's
    projection head on its evaluated network (`model.encoder_head`), and their output width. n=0: none,
    the backbone's width."""
    if n == 0:
        return nn.Sequential(), model.num_features
    layers = list(model.encoder_head or [])
    relus = [i for i, layer in enumerate(layers) if isinstance(layer, nn.ReLU | nn.GELU)]
    if len(relus) < n:
        raise UserError(
            f"eval.from_head_layer={n}, but the {getattr(model, 'name', 'method')} projection head has "
            f"{len(relus)} hidden layer(s); choose 0 (the backbone){f' to {len(relus)}' if relus else ''}"
        )
    kept = layers[: relus[n - 1] + 1]
    width = next(layer.out_features for layer in reversed(kept) if isinstance(layer, nn.Linear))
    return copy.deepcopy(nn.Sequential(*kept)), width


def finetune_network(model: nn.Module, from_head_layer: int, num_classes: int) -> nn.Sequential:
    """backbone -> the head's first `from_head_layer` layers -> a zero-initialised linear classifier,
    all copies: `model` (the pretrained Method) stays as it was."""
    head, width = head_layers(model, from_head_layer)
    classifier = nn.Linear(width, num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    backbone = copy.deepcopy(model.encoder)
    return nn.Sequential(OrderedDict(backbone=backbone, head=head, classifier=classifier))


def evaluate(
    ctx: EvalContext,
    label_fraction: LabelFraction = 0.1,
    subset_seed: int = 0,
    from_head_layer: NonNegativeInt = 1,
    epochs: PositiveInt | None = None,
    batch_size: PositiveInt = 256,
    base_lr: PositiveFloat = 0.05,
    weight_decay: NonNegativeFloat = 0.0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    save: bool = True,
) -> dict[str, float]:
    memory = ctx.data.memory
    labelled = memory.select(balanced_subset(memory.labels, label_fraction, subset_seed))
    if from_head_layer > 0 and ctx.model.encoder_head is None:
        print(f"{ctx.model.name} has no projection head: fine-tuning from the backbone", flush=True)
        from_head_layer = 0
    net = finetune_network(ctx.model, from_head_layer, ctx.data.num_classes).to(ctx.device)
    net = net.to(memory_format=torch.channels_last) if ctx.channels_last else net
    net.train()

    def loss_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(x), labels)

    name = f"finetune_{percent(label_fraction)}"
    if epochs is None:
        epochs = paper_epochs(label_fraction)
        print(
            f"fine-tuning for {epochs} epochs: SimCLRv2's for {label_fraction * 100:g} % of the labels",
            flush=True,
        )
    fit(ctx, list(net.parameters()), labelled, loss_fn, epochs, batch_size, base_lr, weight_decay,
        augment=train_augment(ctx, crop_scale), desc=f"fine-tune on {len(labelled)} labels")  # fmt: skip
    result = test_accuracy(ctx, net)
    if save:
        state = {"model": net.state_dict(), "config": ctx.pretrain_config, "num_classes": ctx.data.num_classes,
                 "from_head_layer": from_head_layer, "label_fraction": label_fraction,
                 "subset_seed": subset_seed, "labelled_images": len(labelled), "epochs": epochs}  # fmt: skip
        checkpoint.save(state, ctx.run_dir / f"{name}.pt")
    return {f"eval/{name}_top1": result["top1"], f"eval/{name}_top5": result["top5"],
            f"eval/{name}_labels": len(labelled)}  # fmt: skip
