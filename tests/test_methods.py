"""Losses and heads against lightly's reference implementations and a hand-computed case."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import METHODS, FlatBackbone
from lightly.loss import NTXentLoss
from lightly.models.modules import NNMemoryBankModule
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_lab import distributed
from ssl_lab.methods.base import Draw, Method
from ssl_lab.methods.nnclr import NNCLR, SupportSet, nn_xent
from ssl_lab.methods.parts import nt_xent
from ssl_lab.methods.simclr import SimCLR

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("batch,dim,temperature", [(2, 3, 0.5), (16, 128, 0.1), (64, 32, 0.2)])
def test_nt_xent_equals_lightly(batch: int, dim: int, temperature: float) -> None:
    torch.manual_seed(batch)
    z0 = torch.randn(batch, dim, requires_grad=True)
    z1 = torch.randn(batch, dim, requires_grad=True)
    ours = nt_xent(z0, z1, temperature)
    g_ours = torch.autograd.grad(ours, [z0, z1])
    ref = NTXentLoss(temperature=temperature)(z0, z1)
    g_ref = torch.autograd.grad(ref, [z0, z1])
    torch.testing.assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


def test_nt_xent_hand_computed() -> None:
    # Two orthogonal unit vectors, each view identical: every row has its positive at cosine 1 and
    # two negatives at cosine 0, so the loss is -log(e / (e + 2)).
    z = torch.eye(2)
    assert nt_xent(z, z.clone(), temperature=1.0).item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-6)
    # Scale does not matter (cosine similarity), a perfectly separated batch at low temperature -> ~0.
    assert nt_xent(3 * z, z, temperature=0.01).item() == pytest.approx(0.0, abs=1e-6)


def small_nnclr(**kwargs) -> NNCLR:
    model = NNCLR(
        FlatBackbone(16), queue_size=64, proj_hidden_dim=32, proj_output_dim=8, pred_hidden_dim=32, **kwargs
    )
    model.support.queue.copy_(torch.randn(64, 8))
    return model


def test_nnclr_lightly_loss_equals_lightly() -> None:
    """`loss=lightly`, the loss ssl_lab had before `loss=paper` became the default."""
    torch.manual_seed(0)
    model = small_nnclr(loss="lightly")
    bank = NNMemoryBankModule(size=(64, 8))
    bank.bank = model.support.queue.clone()
    x0, x1 = torch.randn(12, 16), torch.randn(12, 16)

    # lightly's NNCLR example, with our heads: look up both neighbours, then enqueue z1.
    z0, z1 = model.projector(torch.cat([x0, x1])).chunk(2)
    p0, p1 = model.predictor(torch.cat([z0, z1])).chunk(2)
    nn0 = bank(z0, update=False)
    nn1 = bank(z1, update=True)
    criterion = NTXentLoss(temperature=0.1)
    ref = 0.5 * (criterion(nn0, p1) + criterion(nn1, p0))

    ours = model.training_step([x0, x1])["loss"]
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(model.support.queue, bank.bank)


def papers_loss(neighbours: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Dwibedi et al. 2021, eq. 1, written out: for each i, -log of exp(NN(z_i) . p_i / T) over the sum
    of exp(NN(z_i) . p_k / T) over the batch's k, all unit vectors; averaged over i."""
    neighbours = neighbours / neighbours.norm(dim=1, keepdim=True)
    p = p / p.norm(dim=1, keepdim=True)
    terms = []
    for i in range(len(neighbours)):
        scores = torch.stack([torch.dot(neighbours[i], p[k]) / temperature for k in range(len(p))])
        terms.append(-(scores[i] - torch.log(torch.exp(scores).sum())))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("gather", [False, True])
def test_nnclr_paper_loss_equals_the_papers_formula(gather: bool) -> None:
    """The default loss, symmetrised over the views: 0.5 (L(NN(z0), p1) + L(NN(z1), p0)).
    With `gather` (world size 1 here) it takes the gathering code path."""
    torch.manual_seed(0)
    model = small_nnclr(gather_distributed=gather)
    queue = model.support.queue.clone()
    x0, x1 = torch.randn(12, 16), torch.randn(12, 16)

    z0, z1 = model.projector(torch.cat([x0, x1])).chunk(2)
    p0, p1 = model.predictor(torch.cat([z0, z1])).chunk(2)
    cosine = F.normalize(torch.cat([z0, z1]), dim=1) @ F.normalize(queue, dim=1).T
    nn0, nn1 = queue[cosine.argmax(1)].chunk(2)
    ref = 0.5 * (papers_loss(nn0, p1, 0.1) + papers_loss(nn1, p0, 0.1))

    ours = model.training_step([x0, x1])["loss"]
    torch.testing.assert_close(ours, ref)
    # and it is not lightly's loss on the same inputs
    assert not torch.allclose(ours, 0.5 * (NTXentLoss(0.1)(nn0, p1) + NTXentLoss(0.1)(nn1, p0)))


def test_nnclr_paper_loss_over_two_processes_equals_one(monkeypatch) -> None:
    """Two processes simulated in one: each holds half the batch and gathers every prediction. The
    mean of their losses is the global batch's loss, and the gradient reaching the predictions (what
    DDP then averages) is the global one: each process's targets sit at its rank's offset."""
    torch.manual_seed(0)
    neighbours, p = torch.randn(8, 4), torch.randn(8, 4)
    whole = p.clone().requires_grad_()
    single = nn_xent(neighbours, whole, 0.2)
    (single_grad,) = torch.autograd.grad(single, whole)

    shared = p.clone().requires_grad_()
    parts = shared.chunk(2)
    losses = []
    for rank in (0, 1):
        # all_gather: this process's own (normalised) predictions, the other's as that one sent them
        def gather(local: torch.Tensor, rank: int = rank) -> torch.Tensor:
            return torch.cat([local if r == rank else F.normalize(parts[r], dim=1) for r in (0, 1)])

        monkeypatch.setattr(distributed, "gather_with_grad", gather)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        losses.append(nn_xent(neighbours.chunk(2)[rank], parts[rank], 0.2, gather=True))
    mean = sum(losses) / 2
    (grad,) = torch.autograd.grad(mean, shared)
    torch.testing.assert_close(mean, single)
    torch.testing.assert_close(grad, single_grad)


def test_nnclr_loss_is_checked_by_the_config_check() -> None:
    from conftest import compose_cfg

    from ssl_lab.config import check_config
    from ssl_lab.errors import UserError

    check_config(compose_cfg(["method=nnclr", "method.loss=lightly"]))
    with pytest.raises(UserError, match="method.loss=simclr is not one of paper, lightly"):
        check_config(compose_cfg(["method=nnclr", "method.loss=simclr"]))


def test_nnclr_neighbour_comes_from_queue_before_update_and_has_no_gradient() -> None:
    torch.manual_seed(0)
    model = NNCLR(FlatBackbone(8), queue_size=32, proj_hidden_dim=16, proj_output_dim=4, pred_hidden_dim=16)
    before = model.support.queue.clone()
    z = torch.randn(5, 4, requires_grad=True)
    neighbours = model.support.nearest(z)
    assert not neighbours.requires_grad
    # every neighbour is a row of the queue as it was, and the closest one by cosine similarity
    sims = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(before, dim=1).T
    torch.testing.assert_close(neighbours, before[sims.argmax(1)])

    loss = model.training_step([torch.randn(6, 8), torch.randn(6, 8)])["loss"]
    loss.backward()
    assert model.support.queue.grad is None
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_support_set_is_fifo() -> None:
    support = SupportSet(size=5, dim=1)
    support.push(torch.tensor([[1.0], [2.0], [3.0]]))
    assert support.queue[:3, 0].tolist() == [1.0, 2.0, 3.0] and support.ptr.item() == 3
    support.push(torch.tensor([[4.0], [5.0], [6.0]]))  # wraps: 6 replaces the oldest (1)
    assert support.queue[:, 0].tolist() == [6.0, 2.0, 3.0, 4.0, 5.0] and support.ptr.item() == 1
    assert "support.queue" in NNCLR(FlatBackbone(4), queue_size=8, proj_hidden_dim=8, proj_output_dim=4,
                                    pred_hidden_dim=8).state_dict()  # fmt: skip


def test_simclr_head_shapes_and_loss_decreases() -> None:
    torch.manual_seed(0)
    model = SimCLR(FlatBackbone(16), temperature=0.5)
    assert model.projector[0].in_features == 16 and model.projector[-1].out_features == 128
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(32, 16)
    losses = []
    for _ in range(30):
        loss = model.training_step([x + 0.05 * torch.randn_like(x), x + 0.05 * torch.randn_like(x)])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


# SimCLR's projection head as it was before `proj_layers`: checkpoints saved then must still load.
SIMCLR_HEAD_KEYS = [
    "projector.0.weight",
    "projector.1.weight",
    "projector.1.bias",
    "projector.1.running_mean",
    "projector.1.running_var",
    "projector.1.num_batches_tracked",
    "projector.3.weight",
    "projector.3.bias",
]


def test_simclr_default_head_is_unchanged() -> None:
    model = SimCLR(FlatBackbone(16))
    assert list(model.state_dict()) == SIMCLR_HEAD_KEYS
    assert [type(m) for m in model.projector] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert model.projector[0].bias is None and model.projector[3].bias is not None
    assert list(SimCLR(FlatBackbone(16), proj_layers=2).state_dict()) == SIMCLR_HEAD_KEYS


def test_simclr_v2_head_has_three_layers_with_bn_on_each() -> None:
    torch.manual_seed(0)
    model = SimCLR(FlatBackbone(16), proj_layers=3, proj_output_dim=8)
    kinds = [type(m) for m in model.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    # the middle layers are as wide as the backbone (SimCLRv2), no Linear has a bias (BN follows)
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 16), (16, 16), (16, 8)]
    assert all(m.bias is None for m in linears)

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 16)
    loss = model.training_step([x + 0.05 * torch.randn_like(x), x + 0.05 * torch.randn_like(x)])["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    opt.step()


def test_every_method_is_one_file_and_one_yaml() -> None:
    shared = {"__init__", "base", "parts", "masks"}  # what every method may use
    files = {p.stem for p in (ROOT / "ssl_lab" / "methods").glob("*.py")} - shared
    configs = {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    assert files == configs
    import importlib

    for name in files:
        module = importlib.import_module(f"ssl_lab.methods.{name}")
        assert any(
            isinstance(v, type) and issubclass(v, Method) and v is not Method for v in vars(module).values()
        )


@pytest.mark.parametrize("loss_fn", [nt_xent, nn_xent])
def test_the_loss_is_fp32_under_bf16_autocast(loss_fn) -> None:
    """Under autocast a .float() before the loss is not enough (autocast re-casts the matmul): at
    T=0.1 bf16 logits are resolved to ~0.05. The loss must equal the fp32 one."""
    torch.manual_seed(0)
    z0, z1 = torch.randn(64, 128), torch.randn(64, 128)
    reference = loss_fn(z0, z1, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(z0, z1, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)


def test_the_nearest_neighbour_is_found_in_fp32_under_bf16_autocast() -> None:
    """Two support-set entries closer in cosine than bf16 can tell apart: the nearer one must win."""
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(1, 256), dim=1)
    far = torch.nn.functional.normalize(z + 0.002 * torch.randn(1, 256), dim=1)
    near = torch.nn.functional.normalize(z + 0.001 * torch.randn(1, 256), dim=1)
    support = SupportSet(2, 256)
    support.queue.copy_(torch.cat([far, near]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = support.nearest(z)
    torch.testing.assert_close(found, near)


def small_method(method: str) -> tuple[Method, list[torch.Tensor]]:
    """conf/method/<method>.yaml on a tiny timm ResNet with narrow heads, and the views it asks for."""
    import hydra
    from conftest import compose_cfg, method_args

    cfg = compose_cfg(["backbone=timm", "backbone.name=test_resnet", *method_args(method)])
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.method, backbone=hydra.utils.instantiate(cfg.backbone))
    views = model.views(
        Draw(
            lambda size=32, **changes: torch.randn(8, 3, size, size),
            lambda *shape: torch.rand(8, *shape),
            lambda *shape: torch.rand(*shape),
        )
    )
    return model, views


def one_step(model: Method, forward, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """What the runner does around a step (epoch = step // 40), without an optimizer."""
    model.set_progress(step, steps_per_epoch=40, total_steps=400)
    out = forward(views)
    out["loss"].backward()
    model.after_backward(step, step // 40)
    model.after_step(step, 400)
    return out


class NoTensorsFromPythonData(TorchDispatchMode):
    """Fails on aten.lift_fresh: a tensor made from Python numbers, which on a GPU is copied from the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
            raise AssertionError("a tensor made from Python data in the training step (a host-to-GPU copy)")
        return func(*args, **(kwargs or {}))


def test_the_spy_sees_a_tensor_made_from_python_data() -> None:
    x = torch.zeros(3, 3)
    with NoTensorsFromPythonData():
        x.masked_fill(torch.eye(3, dtype=torch.bool), float("-inf"))  # a scalar argument: no copy
        with pytest.raises(AssertionError, match="Python data"):
            x[torch.arange(3), torch.arange(3)] = float("-inf")


@pytest.mark.parametrize("method", METHODS)
def test_the_training_step_never_syncs_the_host(method: str, monkeypatch) -> None:
    """Every method's step and hooks, with the calls that wait for a GPU (.item(), bool(), nonzero(),
    .tolist()) made to fail: torch 2.14's Dynamo captures an .item() without a graph break, so the
    compile test below would not see it. And no tensor made from Python data (`torch.tensor(...)`,
    `x[i] = float(...)`: aten.lift_fresh): on a GPU it is a copy from the host that syncs it, as
    NT-Xent's `logits[rows, own] = -inf` did twice a step on an H200 (benchmarks/README.md)."""

    def host_sync(*args, **kwargs):
        raise AssertionError("a host sync in the training step")

    model, views = small_method(method)
    for name in ("item", "__bool__", "nonzero", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_sync)
    with NoTensorsFromPythonData():
        out = one_step(model, model, views, step=3)
    monkeypatch.undo()
    assert torch.isfinite(out["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_the_training_step_compiles_without_a_graph_break(method: str) -> None:
    """Every method, on the views it asks for: fullgraph=True fails on any graph break, and the
    progress the runner sets between steps (epoch 0, then 1) must not recompile it. aot_eager:
    Dynamo's capture and AOTAutograd's tracing without Inductor's code generation (graph breaks are
    Dynamo's, whatever the backend)."""
    model, views = small_method(method)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in (0, 40):
            out = one_step(model, compiled, views, step)
            assert torch.isfinite(out["loss"]) and all(v.dim() == 0 for v in out.values())


class CountingBackbone(nn.Module):
    num_features = 3

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return x.mean(dim=(2, 3))


@pytest.mark.parametrize("concat,calls", [(True, [8, 12]), (False, [4, 4, 4, 4, 4])])
def test_views_of_equal_size_share_a_backbone_pass(concat: bool, calls: list[int]) -> None:
    """Multi-crop: 2 global + 3 local views are 2 passes, not 5; the outputs in view order."""
    backbone = CountingBackbone()
    method = Method(backbone, concat_views=concat)
    views = [torch.randn(4, 3, 8, 8) for _ in range(2)] + [torch.randn(4, 3, 4, 4) for _ in range(3)]
    out = method.embed_views(views, nn.Identity())
    assert backbone.calls == calls
    for view, embedding in zip(views, out):
        torch.testing.assert_close(embedding, view.mean(dim=(2, 3)))
