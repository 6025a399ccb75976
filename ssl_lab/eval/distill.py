"""eval=distill: SimCLRv2's third stage (Chen et al. 2020b, "Big Self-Supervised Models are Strong
Semi-Supervised Learners", sec. 2, "Self-training / knowledge distillation via unlabeled examples").
A student (the pretrained architecture, or a smaller backbone) learns from scratch on the unlabelled
training images to match the fine-tuned teacher's tempered predictions:

    L_distill = -sum_x sum_y P_T(y | x; T) log P_S(y | x; T),  P(y | x; T) = softmax(logits / T)

Teacher and student see the same random resized crop + flip of each image; the teacher stays fixed.
With `alpha` > 0 a cross entropy on the labelled subset the teacher was fine-tuned on joins in, the
paper's weighted combination L = alpha L_CE + (1 - alpha) L_distill (the paper's formula calls
1 - alpha what is `alpha` here); alpha=0, distillation on unlabelled images alone, is the paper's
main setting. The student is a backbone + a linear classifier: the paper's students exclude the
projection head.

The teacher is `finetune_<pct>.pt` in the run dir, written by eval=finetune with the same
`label_fraction` (or any such file given as `teacher=<path>`): chain `eval_after=[finetune,distill]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssl_lab import checkpoint
from ssl_lab.config import CONF_DIR, LabelFraction, NonNegativeFloat, PositiveFloat, PositiveInt, Probability
from ssl_lab.data.augment import Augment
from ssl_lab.data.datasets import ImageSet
from ssl_lab.errors import UserError
from ssl_lab.eval.common import EvalContext, epoch_batches, fit, percent, test_accuracy, train_augment
from ssl_lab.eval.finetune import balanced_subset, finetune_network


def load_teacher(ctx: EvalContext, path: Path) -> tuple[nn.Module, dict]:
    """The fine-tuned network of `path` (fixed, in eval mode) and its checkpoint's other entries."""
    state = checkpoint.load(path)
    if "from_head_layer" not in state:
        raise UserError(f"{path} was written by an older eval=finetune; run eval=finetune again")
    if state["num_classes"] != ctx.data.num_classes:
        raise UserError(
            f"teacher {path} predicts {state['num_classes']} classes but data has {ctx.data.num_classes}; "
            "distil on the data set the teacher was fine-tuned on"
        )
    config = state.pop("config")
    method = instantiate(config["method"], backbone=instantiate(config["backbone"]))
    teacher = finetune_network(method, state["from_head_layer"], state["num_classes"])
    teacher.load_state_dict(state.pop("model"))
    teacher = teacher.to(ctx.device).eval().requires_grad_(False)
    return (teacher.to(memory_format=torch.channels_last) if ctx.channels_last else teacher), state


def student_backbone(ctx: EvalContext, name: str | None) -> nn.Module:
    """A freshly initialised backbone: the pretrained run's architecture, or conf/backbone/<name>.yaml."""
    if name is None:
        return instantiate(ctx.pretrain_config["backbone"])
    path = CONF_DIR / "backbone" / f"{name}.yaml"
    if not path.exists():
        options = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise UserError(f"eval.student={name} is not a backbone option; choose one of: {options}")
    # the option's interpolations (e.g. cifar_stem: ${data.small_images}) resolve against the run's config
    root = OmegaConf.create({**ctx.pretrain_config, "backbone": OmegaConf.load(path)})
    return instantiate(root.backbone)


def labelled_batches(
    ctx: EvalContext, images: ImageSet, batch_size: int, augment: Augment
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Augmented labelled batches, epoch after epoch, for as long as they are asked for."""
    generator = torch.Generator(ctx.device).manual_seed(ctx.seed + 2)
    epoch = 0
    while True:
        for uint8, labels in epoch_batches(ctx, images, epoch, batch_size):
            x = ctx.prepare(augment(uint8.to(ctx.device, non_blocking=True), generator))
            yield x, labels.to(ctx.device, non_blocking=True)
        epoch += 1


def evaluate(
    ctx: EvalContext,
    label_fraction: LabelFraction = 0.1,
    teacher: str | None = None,
    student: str | None = None,
    temperature: PositiveFloat = 1.0,
    alpha: Probability = 0.0,
    epochs: PositiveInt = 400,
    batch_size: PositiveInt = 256,
    base_lr: PositiveFloat = 0.1,
    weight_decay: NonNegativeFloat = 1.0e-4,
) -> dict[str, float]:
    name = f"distill_{percent(label_fraction)}"
    path = Path(teacher).expanduser() if teacher else ctx.run_dir / f"finetune_{percent(label_fraction)}.pt"
    if not path.exists():
        raise UserError(
            f"eval=distill needs a fine-tuned teacher and {path} does not exist: run eval=finetune "
            f"eval.label_fraction={label_fraction} on this checkpoint first (or chain "
            "eval_after=[finetune,distill]), or set eval.teacher=<finetune_*.pt>"
        )
    teacher_net, teacher_state = load_teacher(ctx, path)
    backbone = student_backbone(ctx, student)
    student_net = nn.Sequential(backbone, nn.Linear(backbone.num_features, ctx.data.num_classes))
    student_net = student_net.to(ctx.device)
    student_net = student_net.to(memory_format=torch.channels_last) if ctx.channels_last else student_net
    student_net.train()
    augment = train_augment(ctx)
    labelled = None
    if alpha > 0:  # the teacher's own labelled subset
        memory = ctx.data.memory
        subset = balanced_subset(memory.labels, teacher_state["label_fraction"], teacher_state["subset_seed"])
        labelled = labelled_batches(ctx, memory.select(subset), batch_size, augment)

    def loss_fn(x: torch.Tensor, _labels: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            target = F.softmax(teacher_net(x).float() / temperature, dim=1)
        log_p = F.log_softmax(student_net(x).float() / temperature, dim=1)
        loss = -(target * log_p).sum(dim=1).mean()
        if labelled is not None:
            x_labelled, y = next(labelled)
            loss = (1 - alpha) * loss + alpha * F.cross_entropy(student_net(x_labelled).float(), y)
        return loss

    unlabelled = ctx.data.train  # labels, where the split has them, are not used
    fit(ctx, list(student_net.parameters()), unlabelled, loss_fn, epochs, batch_size, base_lr, weight_decay,
        augment=augment, desc="distillation")  # fmt: skip
    student_result = test_accuracy(ctx, student_net)
    teacher_result = test_accuracy(ctx, teacher_net)
    return {
        f"eval/{name}_top1": student_result["top1"],
        f"eval/{name}_top5": student_result["top5"],
        f"eval/{name}_teacher_top1": teacher_result["top1"],
        f"eval/{name}_student_params": sum(p.numel() for p in student_net.parameters()),
    }
