"""eval=distill: SimCLRv2's third stage. A student (the pretrained architecture, or a smaller backbone)
learns from scratch on the unlabelled training images to match the fine-tuned teacher's softened
predictions: loss = -sum_y softmax(teacher / T) log softmax(student / T) (Chen et al. 2020b, eq. 3).

The teacher is `finetune_<pct>.pt` in the run dir, written by eval=finetune with the same
`label_fraction` (or any such file given as `teacher=<path>`): chain `eval_after=[finetune,distill]`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssl_lab import checkpoint
from ssl_lab.config import CONF_DIR, LabelFraction, NonNegativeFloat, PositiveFloat, PositiveInt
from ssl_lab.errors import UserError
from ssl_lab.eval.common import EvalContext, fit, percent, test_accuracy, train_augment
from ssl_lab.eval.finetune import classifier


def load_teacher(ctx: EvalContext, path: Path) -> nn.Module:
    state = checkpoint.load(path)
    backbone = instantiate(state["config"]["backbone"])
    teacher = classifier(backbone, backbone.num_features, state["num_classes"])
    teacher.load_state_dict(state["model"])
    if state["num_classes"] != ctx.data.num_classes:
        raise UserError(
            f"teacher {path} predicts {state['num_classes']} classes but data has {ctx.data.num_classes}; "
            "distil on the data set the teacher was fine-tuned on"
        )
    return teacher.to(ctx.device).eval().requires_grad_(False)


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


def evaluate(
    ctx: EvalContext,
    label_fraction: LabelFraction = 0.1,
    teacher: str | None = None,
    student: str | None = None,
    temperature: PositiveFloat = 1.0,
    epochs: PositiveInt = 30,
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
    teacher_net = load_teacher(ctx, path)
    backbone = student_backbone(ctx, student)
    student_net = classifier(backbone, backbone.num_features, ctx.data.num_classes).to(ctx.device)
    student_net = student_net.to(memory_format=torch.channels_last) if ctx.channels_last else student_net
    student_net.train()

    def loss_fn(x: torch.Tensor, _labels: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            target = F.softmax(teacher_net(x).float() / temperature, dim=1)
        log_p = F.log_softmax(student_net(x).float() / temperature, dim=1)
        return -(target * log_p).sum(dim=1).mean()

    unlabelled = ctx.data.train  # labels, where the split has them, are not used
    fit(ctx, list(student_net.parameters()), unlabelled, loss_fn, epochs, batch_size, base_lr, weight_decay,
        augment=train_augment(ctx), desc="distillation")  # fmt: skip
    student_result = test_accuracy(ctx, student_net)
    teacher_result = test_accuracy(ctx, teacher_net)
    return {
        f"eval/{name}_top1": student_result["top1"],
        f"eval/{name}_top5": student_result["top5"],
        f"eval/{name}_teacher_top1": teacher_result["top1"],
        f"eval/{name}_student_params": sum(p.numel() for p in student_net.parameters()),
    }
