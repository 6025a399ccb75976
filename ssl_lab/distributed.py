"""Process-group facts and collectives in one place. Everything that writes (console, files, W&B)
asks `is_main()`.

Single-process runs need no process group. Under torchrun, or `srun`/submitit on SLURM (one task per
GPU), the environment names rank and world, and `init()` joins the group: NCCL (with gloo for CPU tensors)
on GPUs, gloo on CPU. Every helper makes its tensors on `collective_device()`.
`spawn()` starts the processes itself, for a sweep job that trains on several (trainer.nproc_per_node).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import uuid
import warnings
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from timm.layers import BatchNormAct2d

# torch.distributed.nn.functional is deprecated in favour of the functional collectives, whose
# autograd support is private API in torch 2.14; these collectives are public and correct.
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional", category=FutureWarning)


# Fixed for the life of a process: a compiled step takes them as constants (torch.compile before 2.5
# cannot trace the look-up in os.environ that they make without a process group).
@torch.compiler.assume_constant_result
def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(launch_env().get("RANK", 0))


@torch.compiler.assume_constant_result
def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(launch_env().get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(launch_env().get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def launch_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): torchrun's own
    when it launched us, else mapped from SLURM's when `srun` or submitit started one task per GPU.
    Only a job step's tasks count (SLURM_STEP_NUM_TASKS): the batch script itself runs with
    SLURM_NTASKS set too, and a plain `python` there is one process."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in environ}
    job_id = int(environ.get("SLURM_JOB_ID", 0))
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": first_host(
            environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        ),
        # one port per job, so that two jobs on one node do not meet; torchrun's default is 29500
        "MASTER_PORT": environ.get("MASTER_PORT", str(20000 + job_id % 20000)),
    }


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (what `scontrol show hostnames | head -1` prints, without
    needing scontrol): `gpu[003-005,9],cpu1` -> `gpu003`, `node[1-2]-ib` -> `node1-ib`,
    `rack[1-2]-gpu[07-08]` -> `rack1-gpu07`. Each bracket of the first host expression gives its first
    value, zero padding kept."""
    first = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())  # up to the first comma outside brackets
    if not first:
        return "127.0.0.1"
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first.group(0))


_collective_device = torch.device("cpu")


def init(device: torch.device, timeout_s: float | None = None) -> torch.device:
    """Join the process group when launched with several processes; returns this process's device
    (its own GPU, by local rank). On GPUs the group has both backends ("cpu:gloo,cuda:nccl"), so a
    stray CPU tensor cannot crash a run, and `device_id` binds NCCL to the GPU so it fails fast.
    A collective that waits longer than `timeout_s` (a dead peer) fails instead of hanging."""
    global _collective_device
    if device.type == "cuda" and world_size() > 1:
        device = local_gpu()
    if world_size() > 1 and not dist.is_initialized():
        os.environ.update(launch_env())  # under SLURM: the env:// rendezvous reads these
        options: dict[str, Any] = {}
        if timeout_s:
            options["timeout"] = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device, **options)
        else:
            dist.init_process_group("gloo", **options)
    _collective_device = device
    return device


def local_gpu(local: int | None = None, visible: int | None = None) -> torch.device:
    """This process's GPU: its local rank among the GPUs it sees. With one GPU bound per task
    (SLURM's --gpus-per-task=1, CUDA_VISIBLE_DEVICES set per process) every process sees one GPU,
    cuda:0, whatever its local rank."""
    local = local_rank() if local is None else local
    visible = torch.cuda.device_count() if visible is None else visible
    return torch.device("cuda", local % max(visible, 1))


def collective_device() -> torch.device:
    """Where the helpers below put the tensors they make: the process group's device (its GPU under
    NCCL), so that no collective gets a tensor on another device."""
    return _collective_device


def spawn(fn: Callable[..., Any], args: tuple, nproc: int) -> Any:
    """Run `fn(*args)` in `nproc` new processes on this machine that form a process group (what
    `torchrun --standalone --nproc_per_node=nproc` does, but from inside a Python process, so that a
    Hydra sweep job can train on several processes); returns rank 0's result. A process that fails
    ends the others, and this raises torch's ChildFailedError."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"ssl_lab-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port
        max_restarts=0,
    )
    # torch logs a worker's failure with a traceback of its own monitoring code; the caller reports it
    quiet = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.CRITICAL)
    try:
        return elastic_launch(config, fn)(*args)[0]
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel, which averages the gradients, without its per-step buffer
    broadcast: every process's buffers are already equal (batch norm over the global batch, NNCLR's
    queue fed from every process), and broadcasting them would move a 64 MB queue each step. torch
    2.13 renamed the switch (forward_sync_buffers=False still syncs the buffers once, at construction);
    on older torch, broadcast_buffers=False skips that sync too, so it is done here."""
    ddp = torch.nn.parallel.DistributedDataParallel
    device_ids = [device.index] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(model, device_ids=device_ids, forward_sync_buffers=False)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return ddp(model, device_ids=device_ids, broadcast_buffers=False)


def shutdown(together: bool = False) -> None:
    """Leave the process group; `together` (a run that ended well on every process), after a barrier:
    a process that tore its group down while another was still wrapping up (rank 0 writes the last
    checkpoint and the summary) left that one's gloo threads waiting, and its exit hung (torch 2.4,
    most runs; cf. pytorch#75097). Not after a failure, which may have ended on one process only: a
    barrier there could meet another process's training collective."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x`, concatenated in rank order; gradients flow back to every rank's part."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward, each rank's part of the gradient summed over ranks: a
    reduce-scatter on GPUs (NCCL), an all-reduce and a slice on CPU tensors (gloo has no
    reduce-scatter). Chosen by the tensor's device: torch.distributed.nn's own all_gather picks its
    reduce-scatter only when the backend's name is exactly "nccl", which "cpu:gloo,cuda:nccl" is not."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        n = grad.shape[0] // world_size()
        if grad.device.type == "cuda":
            out = grad.new_empty((n, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad[rank() * n : (rank() + 1) * n]


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def shard(total: int, process: int | None = None) -> range:
    """A process's contiguous share of `total` rows (ceil(total / world) each, the last ones fewer);
    this process's unless `process` says which."""
    process = rank() if process is None else process
    per = -(-total // world_size())
    return range(min(process * per, total), min((process + 1) * per, total))


@torch.no_grad()
def gather_shards(x: torch.Tensor, total: int) -> torch.Tensor:
    """Every process's `shard(total)` rows of a tensor, in order: [total, ...] on every process."""
    if world_size() == 1:
        return x
    padded = x.new_zeros((len(shard(total, 0)), *x.shape[1:]))  # the first share is the largest
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([part[: len(shard(total, r))] for r, part in enumerate(parts)])


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm over the whole global batch on any device and backend (torch's SyncBatchNorm is
    GPU-only; this one also runs on gloo/CPU, so CPU runs on N processes match one process).

    Per-channel sums, sums of squares and counts are all-reduced with their gradients, so every
    process normalises with the statistics of the global batch and gets its share of the gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        # Statistics in fp32 whatever autocast hands in (bf16 sums lose them), of x shifted by the
        # running mean (the same on every process), so E[d^2] - E[d]^2 does not cancel when the mean
        # is large against the spread. One all-reduce, and no host sync.
        xf = x.float()
        shift = self.running_mean.detach().float() if self.track_running_stats else xf.new_zeros(channels)
        d = xf - shift.view(shape)
        count = torch.full((1,), x.numel() / channels, device=x.device, dtype=torch.float32)
        stats = dist_nn.all_reduce(torch.cat([d.sum(dims), (d * d).sum(dims), count]))
        n = stats[-1]
        d_mean = stats[:channels] / n
        var = (stats[channels : 2 * channels] / n - d_mean**2).clamp(min=0)
        mean = d_mean + shift
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1 / (self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
                self.num_batches_tracked.add_(1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    @classmethod
    def convert(cls, module: torch.nn.Module) -> torch.nn.Module:
        """`module` with every batch norm replaced, parameters and buffers kept (the state dict's keys
        too, and which parameters train: a frozen teacher stays frozen): plain BatchNorm{1,2,3}d by this
        class, timm's BatchNormAct2d by SyncBatchNormAct, which keeps its activation. Other batch norms with a forward of their own must be refused before
        (`foreign_batchnorms`): replacing them would change what the network computes."""
        if getattr(module, "splits_global_batch", False):  # SplitBatchNorm2d: world-invariant as it is
            return module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            args = (
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
            )
            if type(module) is BatchNormAct2d:
                sync: torch.nn.Module = SyncBatchNormAct(*args, drop=module.drop, act=module.act)
            else:
                sync = cls(*args)
            sync.load_state_dict(module.state_dict())
            for name, param in module.named_parameters(recurse=False):
                sync.get_parameter(name).requires_grad_(param.requires_grad)
            return sync.to(next(module.buffers(), torch.empty(0)).device).train(module.training)
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


class SyncBatchNormAct(SyncBatchNorm):
    """timm's BatchNormAct2d (batch norm, then its dropout and activation, e.g. in EfficientNet,
    RegNet, MobileNetV3) over the global batch; `drop` and `act` keep their names, so the state dict
    reads as the original's."""

    def __init__(self, *args: Any, drop: torch.nn.Module, act: torch.nn.Module) -> None:
        super().__init__(*args)
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def foreign_batchnorms(module: torch.nn.Module) -> list[tuple[str, type]]:
    """Batch norms that neither converter can replace faithfully: subclasses with a forward of their
    own (timm's BatchNormAct2d, which both know, excepted). Each as (name, class)."""
    plain = torch.nn.modules.batchnorm._BatchNorm.forward
    synced = (SyncBatchNorm, torch.nn.SyncBatchNorm)  # already over the global batch (timm's too)
    return [
        (name, type(m))
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and type(m).forward is not plain
        and type(m) is not BatchNormAct2d
        and not isinstance(m, synced)
        and not getattr(m, "splits_global_batch", False)
    ]


def total(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over processes (a copy on the group's device; `x` itself on one process)."""
    if world_size() == 1:
        return x
    x = x.detach().to(collective_device(), copy=True)
    dist.all_reduce(x)
    return x


def mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over processes (for logging: each process's loss is over its own rows)."""
    return x if world_size() == 1 else total(x) / world_size()


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True on every process if it is true on any: ranks stop (signal, NaN) at the same step. A host
    sync: call it at log steps, not every step."""
    value = torch.as_tensor(flag).to(collective_device(), torch.int32).reshape(())
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process died (gloo reports a reset or
    closed connection as a RuntimeError, NCCL a DistBackendError)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return False
    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(s in text for s in ("gloo", "NCCL", "Connection"))
    )


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
