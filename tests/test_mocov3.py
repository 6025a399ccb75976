"""MoCo v3: the loss against the official formula and lightly, 1 vs 2 processes, the heads against the
official builder and lightly's heads, the teacher's update, a compiled step and a ViT step."""

import math

import hydra
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import FlatBackbone, compose_cfg
from lightly.loss import NTXentLoss
from lightly.models.modules import BYOLPredictionHead, MoCoProjectionHead
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule

from ssl_lab import distributed
from ssl_lab.methods.mocov3 import MoCoV3, moco_xent


def official_ctr(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """moco/builder.py's contrastive_loss written out on one process: for each i, -log of
    exp(q_i . k_i / T) over the sum over j of exp(q_i . k_j / T), all unit vectors; averaged over i,
    times 2T."""
    q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    terms = []
    for i in range(len(q)):
        scores = torch.stack([torch.dot(q[i], k[j]) / temperature for j in range(len(k))])
        terms.append(-(scores[i] - torch.log(torch.exp(scores).sum())))
    return torch.stack(terms).mean() * 2 * temperature


def lightly_moco_infonce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """lightly's MoCo loss (NTXentLoss with a memory bank: logits [q.k+, q.bank]) one query at a time,
    its bank holding the other keys of the batch: MoCo v3's N-way loss, times 2T."""
    n, dim = k.shape
    losses = []
    for i in range(n):
        criterion = NTXentLoss(temperature=temperature, memory_bank_size=(n - 1, dim))
        others = torch.cat([k[:i], k[i + 1 :]]).detach()
        criterion.memory_bank.bank = F.normalize(others, dim=1)  # lightly does not normalise the bank
        losses.append(criterion(q[i : i + 1], k[i : i + 1].detach()))
    return torch.stack(losses).mean() * 2 * temperature


@pytest.mark.parametrize("batch,dim,temperature", [(2, 3, 1.0), (16, 32, 0.2), (32, 8, 0.1)])
@pytest.mark.parametrize("gather", [False, True])
def test_the_loss_equals_the_official_formula_and_lightlys_moco_loss(
    batch: int, dim: int, temperature: float, gather: bool
) -> None:
    """With `gather` (world size 1 here) it takes the gathering code path."""
    torch.manual_seed(batch)
    q, k = torch.randn(batch, dim, requires_grad=True), torch.randn(batch, dim)
    ours = moco_xent(q, k, temperature, gather)
    (g_ours,) = torch.autograd.grad(ours, q)
    for reference in (official_ctr(q, k, temperature), lightly_moco_infonce(q, k, temperature)):
        (g_ref,) = torch.autograd.grad(reference, q)
        torch.testing.assert_close(ours, reference)
        torch.testing.assert_close(g_ours, g_ref)


def test_the_loss_is_not_lightlys_nt_xent() -> None:
    """NTXentLoss(memory_bank_size=0), which lightly suggests for MoCo v3 (lightly #1190), is the
    2N-way SimCLR loss: same-view negatives, keys as anchors too. A different number."""
    torch.manual_seed(0)
    q, k = torch.randn(16, 32), torch.randn(16, 32)
    ours = moco_xent(q, k, 0.2)
    assert not torch.allclose(ours, NTXentLoss(temperature=0.2)(q, k) * 0.4, atol=1e-3)


def test_the_loss_hand_computed() -> None:
    # Orthogonal unit queries equal to their keys at T=1: each row has its positive at cosine 1 and
    # N-1 = 2 others at 0, so each term is log(e + 2) - 1, times 2T = 2.
    z = torch.eye(3)
    assert moco_xent(z, z.clone(), 1.0).item() == pytest.approx(2 * (math.log(math.e + 2) - 1), abs=1e-6)


def test_the_keys_carry_no_gradient() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    g_q, g_k = torch.autograd.grad(moco_xent(q, k, 0.2), [q, k], allow_unused=True)
    assert g_q is not None and g_k is None

    model = small_mocov3()
    model.training_step([torch.randn(6, 16), torch.randn(6, 16)])["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(p.grad is not None for name in ("projector", "predictor")
               for p in getattr(model, name).parameters())  # fmt: skip


def test_two_processes_give_the_loss_and_gradient_of_one(monkeypatch) -> None:
    """Two processes simulated in one: each holds half the batch and gathers every key, without
    gradient. The mean of their losses (what DDP's averaged gradients follow) is the global batch's loss,
    and the gradient reaching the queries is the global one: each process's targets sit at its rank's
    offset."""
    torch.manual_seed(0)
    q, k = torch.randn(8, 4), torch.randn(8, 4)
    whole = q.clone().requires_grad_()
    single = moco_xent(whole, k, 0.2)
    (single_grad,) = torch.autograd.grad(single, whole)

    shared = q.clone().requires_grad_()
    keys = k.chunk(2)

    def no_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("keys are gathered without gradient")

    monkeypatch.setattr(distributed, "gather_with_grad", no_gather_with_grad)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    losses = []
    for rank in (0, 1):
        # all_gather: this process's own (normalised) keys, the other's as that one sent them
        def gather(local: torch.Tensor, rank: int = rank) -> torch.Tensor:
            assert not local.requires_grad
            return torch.cat([local if r == rank else F.normalize(keys[r], dim=1) for r in (0, 1)])

        monkeypatch.setattr(distributed, "gather", gather)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        losses.append(moco_xent(shared.chunk(2)[rank], keys[rank], 0.2, gather=True))
    mean = sum(losses) / 2
    (grad,) = torch.autograd.grad(mean, shared)
    torch.testing.assert_close(mean, single)
    torch.testing.assert_close(grad, single_grad)


def small_mocov3(**kwargs) -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(FlatBackbone(16), proj_hidden_dim=32, proj_output_dim=8, pred_hidden_dim=32, **kwargs)


@pytest.mark.parametrize("concat_views", [False, True])
def test_the_training_step_sums_both_directions(concat_views: bool) -> None:
    """ctr(q1, k2) + ctr(q2, k1), summed as in the official forward; q from the student's backbone,
    projector and predictor, k from the teacher's backbone and projector; views one pass each (the
    official code) or together."""
    model = small_mocov3(concat_views=concat_views)
    x1, x2 = torch.randn(12, 16), torch.randn(12, 16)
    student = lambda x: model.predictor(model.projector(model.backbone(x)))  # noqa: E731
    teacher = lambda x: model.teacher.projector(model.teacher.backbone(x))  # noqa: E731
    if concat_views:
        (q1, q2), (k1, k2) = student(torch.cat([x1, x2])).chunk(2), teacher(torch.cat([x1, x2])).chunk(2)
    else:
        (q1, q2), (k1, k2) = (student(x1), student(x2)), (teacher(x1), teacher(x2))
    reference = official_ctr(q1, k2.detach(), 0.2) + official_ctr(q2, k1.detach(), 0.2)
    out = model.training_step([x1, x2])
    torch.testing.assert_close(out["loss"], reference)
    assert set(out) == {"loss", "momentum"} and out["momentum"].item() == pytest.approx(0.99)


def layers(module: nn.Module) -> list[tuple]:
    """What a head is made of: each layer's type and parameter shapes (bias or not included)."""
    return [
        (type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
        for m in module.modules()
        if not list(m.children())
    ]


def official_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True):
    """moco/builder.py's MoCo._build_mlp, written out."""
    mlp: list[nn.Module] = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else mlp_dim
        dim2 = output_dim if i == num_layers - 1 else mlp_dim
        mlp.append(nn.Linear(dim1, dim2, bias=False))
        if i < num_layers - 1:
            mlp += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
        elif last_bn:
            mlp.append(nn.BatchNorm1d(dim2, affine=False))
    return nn.Sequential(*mlp)


def test_the_heads_are_the_official_ones_and_differ_from_lightlys_as_stated() -> None:
    resnet = MoCoV3(FlatBackbone(512))  # the paper's sizes: 4096 hidden, 256 out
    # MoCo_ResNet: projector _build_mlp(2, 512, 4096, 256), predictor _build_mlp(2, 256, 4096, 256, False)
    assert layers(resnet.projector) == layers(official_mlp(2, 512, 4096, 256))
    assert layers(resnet.predictor) == layers(official_mlp(2, 256, 4096, 256, last_bn=False))
    vit = MoCoV3(FlatBackbone(384), proj_layers=3)
    # MoCo_ViT: projector _build_mlp(3, 384, 4096, 256), predictor _build_mlp(2, 256, 4096, 256)
    assert layers(vit.projector) == layers(official_mlp(3, 384, 4096, 256))
    assert layers(vit.predictor) == layers(official_mlp(2, 256, 4096, 256))
    assert [type(m) for m in vit.predictor][-1] is nn.BatchNorm1d

    # lightly's MoCoProjectionHead(batch_norm=True), for v3: its last BN has a learnable scale and shift
    for model, n in ((resnet, 2), (vit, 3)):
        theirs = layers(MoCoProjectionHead(model.num_features, 4096, 256, num_layers=n, batch_norm=True))
        assert layers(model.projector)[:-1] == theirs[:-1]
        assert layers(model.projector)[-1] == ("BatchNorm1d", ())
        assert theirs[-1] == ("BatchNorm1d", ((256,), (256,)))
    # lightly's BYOLPredictionHead: the ResNet predictor's layers, but its last Linear has a bias
    theirs = layers(BYOLPredictionHead(256, 4096, 256))
    assert layers(resnet.predictor)[:-1] == theirs[:-1]
    assert layers(resnet.predictor)[-1] == ("Linear", ((256, 4096),))
    assert theirs[-1] == ("Linear", ((256, 4096), (256,)))


def test_the_teacher_follows_the_student_on_a_cosine_momentum() -> None:
    """After each optimizer step: teacher = tau teacher + (1 - tau) student on the backbone and
    projector, tau on lightly's cosine_schedule from 0.99 to 1 over the run's steps."""
    torch.manual_seed(0)
    backbone = nn.Linear(16, 16)  # a backbone with parameters
    backbone.num_features = 16
    model = MoCoV3(backbone, momentum=0.99, proj_hidden_dim=32, proj_output_dim=8, pred_hidden_dim=32)
    for name in ("backbone", "projector"):
        student, teacher = getattr(model, name), getattr(model.teacher, name)
        assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    reference = {name: [p.clone() for p in getattr(model.teacher, name).parameters()]
                 for name in ("backbone", "projector")}  # fmt: skip
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    total = 10
    for step in range(3):
        opt.zero_grad()
        model.training_step([torch.randn(8, 16), torch.randn(8, 16)])["loss"].backward()
        opt.step()
        model.after_step(step, total)
        tau = cosine_schedule(step, total, 0.99, 1.0)
        for name, params in reference.items():
            update_momentum(getattr(model, name), nn.ParameterList(params), m=tau)  # lightly's EMA
            for ours, theirs in zip(getattr(model.teacher, name).parameters(), params):
                torch.testing.assert_close(ours, theirs)
        assert model.teacher.momentum.item() == pytest.approx(tau)
    assert not any(torch.equal(a, b) for a, b in zip(model.projector.parameters(), model.teacher.projector.parameters()))  # fmt: skip
    model.after_step(total - 1, total)
    assert model.teacher.momentum.item() == 1.0  # the last step's teacher stops moving


def test_the_training_step_compiles_without_a_graph_break() -> None:
    """fullgraph=True fails on any graph break: on a GPU each one is a host sync in the step. aot_eager
    traces forward and backward as inductor does, without its code generation (~30 s on a CPU; the
    inductor compile of every method is test_methods.py's)."""
    model = small_mocov3()
    x = torch.randn(8, 16)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")([x, x + 0.1 * torch.randn_like(x)])
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["momentum"].item() == pytest.approx(0.99)


def test_a_vit_builds_and_takes_a_step() -> None:
    """vit_tiny (4x4 patches at 32 px) with the ViT heads (3-layer projector, predictor ending in BN)
    and the frozen patch embedding: one optimizer step moves everything but the patch embedding."""
    cfg = compose_cfg(["method=mocov3", "backbone=vit_tiny", "method.proj_layers=3",
                       "method.freeze_patch_embed=true", "method.proj_hidden_dim=256",
                       "method.pred_hidden_dim=256"])  # fmt: skip
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.method, backbone=hydra.utils.instantiate(cfg.backbone))
    patch = [p.clone() for p in model.backbone.patch_embed.parameters()]
    assert patch and not any(p.requires_grad for p in model.backbone.patch_embed.parameters())
    blocks = [p.clone() for p in model.backbone.blocks[0].parameters()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(4, 3, 32, 32)
    loss = model.training_step([x, x.flip(-1)])["loss"]
    loss.backward()
    opt.step()
    model.after_step(0, 10)
    assert torch.isfinite(loss) and model(x).shape == (4, model.num_features)
    assert all(torch.equal(a, b) for a, b in zip(patch, model.backbone.patch_embed.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(blocks, model.backbone.blocks[0].parameters()))


def test_the_teacher_stays_frozen_through_the_batch_norm_conversion() -> None:
    """Several processes: build_model converts the batch norms (new parameters), then the optimizer
    and DDP take the parameter groups."""
    model = small_mocov3()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    model = distributed.SyncBatchNorm.convert(model)
    assert isinstance(model.teacher.projector[1], distributed.SyncBatchNorm)
    assert [n for n, _ in model.param_groups()[0]["params"]] == trainable
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_freeze_patch_embed_needs_a_vit() -> None:
    with pytest.raises(ValueError, match="has no patch_embed"):
        MoCoV3(FlatBackbone(16), freeze_patch_embed=True)


@pytest.mark.parametrize("recipe", ["cifar10_mocov3", "cifar10_mocov3_vit"])
def test_the_recipes_hold_their_references_settings(recipe: str) -> None:
    cfg = compose_cfg([f"experiment={recipe}"])
    m = cfg.method
    assert (m.temperature, m.momentum, m.proj_hidden_dim, m.proj_output_dim, m.pred_hidden_dim) == (
        0.2, 0.99, 4096, 256, 4096,
    )  # fmt: skip
    if recipe == "cifar10_mocov3":  # solo-learn's bash_files/pretrain/cifar/mocov3.sh at bbf2d7e
        assert cfg.backbone.name == "resnet18" and cfg.backbone.cifar_stem and m.proj_layers == 2
        assert (cfg.optimizer.base_lr, cfg.optimizer.weight_decay, cfg.batch_size) == (0.3, 1e-6, 256)
        assert cfg.augment.views[1].solarize_p == 0.2
    else:  # main_moco.py's ViT-Small command
        assert cfg.backbone.name == "vit_small_patch16_224" and m.proj_layers == 3 and m.freeze_patch_embed
        assert (cfg.optimizer.base_lr, cfg.optimizer.weight_decay) == (1.5e-4, 0.1)
        assert cfg.optimizer.weight_decay_end is None  # constant weight decay
        assert (cfg.epochs, cfg.scheduler.warmup_epochs) == (300, 40)
