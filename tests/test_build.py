"""How a run is built for GPUs and several processes, checked on the CPU: the training device's index,
batch norm over the global batch (timm's BatchNormAct2d kept whole), DDP on torch before 2.13, one
GPU per SLURM task, and the in-memory set's budget on an accelerator."""

import inspect

import pytest
import timm
import torch
from conftest import FAST, compose_cfg
from timm.layers import BatchNormAct2d, SyncBatchNormAct

import ssl_lab.build
from ssl_lab import distributed
from ssl_lab.build import build_model, build_step, pick_device, sync_batchnorm
from ssl_lab.data.datasets import ImageSet
from ssl_lab.data.loader import DEVICE_BUDGET, fits_on
from ssl_lab.errors import UserError


def test_the_training_device_has_an_index(monkeypatch) -> None:
    """`cuda` is picked as `cuda:<current>`: a tensor reports its device with the index, and
    torch.device("cuda", 0) != torch.device("cuda"), so the in-memory set's device cache never hit."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cuda") == torch.device("cuda", 0)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cpu") == torch.device("cpu")


def test_one_gpu_bound_per_task_is_cuda_0_whatever_the_local_rank() -> None:
    """SLURM's --gpus-per-task=1: each task sees one GPU, so local rank 3 is cuda:0, not cuda:3."""
    assert distributed.local_gpu(local=3, visible=1) == torch.device("cuda", 0)
    assert distributed.local_gpu(local=3, visible=4) == torch.device("cuda", 3)
    assert distributed.local_gpu(local=5, visible=4) == torch.device("cuda", 1)


def timm_cfg(name: str, *overrides: str):
    return compose_cfg([*FAST, f"backbone.name={name}", *overrides])


@pytest.mark.parametrize("mode", ["ssl_lab", "true"])
def test_sync_batchnorm_keeps_timm_batchnorm_activations(mode: str) -> None:
    """EfficientNet's 49 BatchNormAct2d layers: a plain SyncBatchNorm in their place drops their
    activation (outputs off by up to ~20). Converted, the network computes what it computed, in train
    and eval mode, and its state dict has the same keys (evaluation loads it into the unconverted one)."""
    cfg = timm_cfg("efficientnet_b0", f"trainer.sync_batchnorm={mode}")
    torch.manual_seed(0)
    one = build_model(cfg, torch.device("cpu"), world=1)
    torch.manual_seed(0)
    many = build_model(cfg, torch.device("cpu"), world=2)  # converted; no process group needed to build
    kinds = {type(m) for m in many.modules()}
    assert BatchNormAct2d not in kinds and distributed.SyncBatchNormAct in kinds
    assert not any(type(m) is torch.nn.BatchNorm2d for m in many.modules())
    assert many.state_dict().keys() == one.state_dict().keys()
    x = torch.randn(4, 3, 32, 32)
    for train in (False, True):  # without a process group the sync path is the plain one
        one.backbone.train(train), many.backbone.train(train)
        with torch.no_grad():
            torch.testing.assert_close(many.backbone(x), one.backbone(x), rtol=1e-5, atol=1e-5)


def test_torch_sync_batchnorm_goes_through_timms_converter() -> None:
    """trainer.sync_batchnorm=torch on GPUs: timm's converter keeps the activations too."""
    model = build_model(timm_cfg("efficientnet_b0"), torch.device("cpu")).eval()
    acts = {n: type(m.act) for n, m in model.named_modules() if type(m) is BatchNormAct2d}
    assert torch.nn.SiLU in acts.values()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.backbone(x)
    converted = sync_batchnorm(model, "torch", torch.device("cuda", 0))  # converts on the host
    modules = dict(converted.named_modules())
    assert {n: type(modules[n]) for n in acts} == dict.fromkeys(acts, SyncBatchNormAct)
    assert {n: type(modules[n].act) for n in acts} == acts
    with torch.no_grad():  # eval mode: torch's SyncBatchNorm needs no GPU and no group
        torch.testing.assert_close(converted.backbone(x), before, rtol=1e-5, atol=1e-5)


def test_torch_sync_batchnorm_on_cpu_is_a_one_line_error() -> None:
    model = build_model(timm_cfg("test_resnet"), torch.device("cpu"))
    with pytest.raises(UserError, match="sync_batchnorm=torch needs GPUs.*sync_batchnorm=ssl_lab"):
        sync_batchnorm(model, "torch", torch.device("cpu"))


class OwnBatchNorm(torch.nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_a_batchnorm_with_its_own_forward_is_refused_not_replaced() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), OwnBatchNorm(4))
    for mode in ("ssl_lab", "torch"):
        with pytest.raises(UserError, match=r"^1 is a .*OwnBatchNorm.*trainer.sync_batchnorm=false"):
            sync_batchnorm(model, mode, torch.device("cuda", 0))
    assert sync_batchnorm(model, "false", torch.device("cpu")) is model


def test_sync_batchnorm_mode_is_checked_where_it_is_defined() -> None:
    from ssl_lab.config import check_config

    for ok in ("ssl_lab", "torch", "false", "true"):
        check_config(compose_cfg([*FAST, f"trainer.sync_batchnorm={ok}"]))
    with pytest.raises(
        UserError, match="trainer.sync_batchnorm=nccl is not one of ssl_lab, torch, true, false"
    ):
        check_config(compose_cfg([*FAST, "trainer.sync_batchnorm=nccl"]))


class DDPBefore213:
    """DistributedDataParallel's signature in torch 2.4-2.12: no forward_sync_buffers."""

    def __init__(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True,
                 process_group=None, bucket_cap_mb=None, find_unused_parameters=False,
                 check_reduction=False, gradient_as_bucket_view=False, static_graph=False) -> None:  # fmt: skip
        self.module, self.broadcast_buffers = module, broadcast_buffers


class DDPFrom213(DDPBefore213):
    def __init__(self, module, device_ids=None, broadcast_buffers=None, forward_sync_buffers=None) -> None:
        self.module, self.broadcast_buffers, self.forward_sync_buffers = (
            module,
            broadcast_buffers,
            forward_sync_buffers,
        )


@pytest.mark.parametrize("ddp", [DDPBefore213, DDPFrom213])
def test_ddp_is_built_on_torch_before_and_after_2_13(monkeypatch, ddp) -> None:
    """torch 2.13 added forward_sync_buffers; on 2.4-2.12 passing it raised TypeError in every
    multi-process run. Before 2.13, broadcast_buffers=False (no 64 MB queue broadcast per step), and
    the buffers' sync at construction, which that switch also skips there, is done by hand."""
    broadcast = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", ddp)
    monkeypatch.setattr(torch.distributed, "broadcast", lambda t, src: broadcast.append((t, src)))
    cfg = compose_cfg([*FAST, "method=nnclr"])
    model = build_model(cfg, torch.device("cpu"), world=2)
    step = build_step(cfg, model, ssl_lab.build.instantiate(cfg.augment), 4, rank=0, world=2)
    assert isinstance(step.forward, ddp) and step.forward.module is model
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        assert step.forward.forward_sync_buffers is False and not broadcast
    else:
        assert step.forward.broadcast_buffers is False
        assert {id(t) for t, _ in broadcast} == {id(b) for b in model.buffers()}
        assert {src for _, src in broadcast} == {0}


def test_in_memory_sets_on_an_accelerator_follow_its_free_memory(monkeypatch) -> None:
    """Up to 2 GiB always; more when a quarter of the GPU's free memory holds it (STL-10: 2.7 GiB)."""
    stl10 = ImageSet(images=torch.zeros(1, dtype=torch.uint8).expand(int(2.7 * 2**30)))
    small = ImageSet(images=torch.zeros(10, 3, 8, 8, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * 2**30, 80 * 2**30))
    assert fits_on(stl10, torch.device("cuda", 0)) and fits_on(small, torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * 2**30, 80 * 2**30))
    assert not fits_on(stl10, torch.device("cuda", 0)) and fits_on(small, torch.device("cuda", 0))
    assert stl10.images.numel() > DEVICE_BUDGET
    assert fits_on(small, torch.device("meta")) and not fits_on(stl10, torch.device("meta"))
    assert not fits_on(ImageSet(files=[]), torch.device("cuda", 0))


def test_the_in_memory_copy_is_made_once_for_an_index_less_device() -> None:
    data = ImageSet(images=torch.zeros(10, 3, 8, 8, dtype=torch.uint8))
    first = data.on(torch.device("meta"))
    assert data.on(torch.device("meta"))[0] is first[0]


def test_efficientnet_is_a_timm_model_with_batchnorm_act() -> None:
    """The test above needs a backbone with BatchNormAct2d; this keeps it honest if timm changes."""
    net = timm.create_model("efficientnet_b0", num_classes=0)
    assert sum(type(m) is BatchNormAct2d for m in net.modules()) > 10
