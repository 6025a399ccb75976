"""Several processes (gloo on CPU) against one: the gathered NT-Xent, and training itself."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_lab.methods.simclr import nt_xent

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gathered_loss(rank: int, port: int, z0: torch.Tensor, z1: torch.Tensor, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    n = z0.shape[0] // WORLD
    local0 = z0[rank * n : (rank + 1) * n].clone().requires_grad_()
    local1 = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = nt_xent(local0, local1, temperature=0.3, gather=True)
    loss.backward()
    out[rank] = (loss.detach(), local0.grad, local1.grad)
    dist.destroy_process_group()


def test_gathered_nt_xent_equals_single_process_loss_and_gradients() -> None:
    torch.manual_seed(0)
    z0, z1 = torch.randn(8, 16), torch.randn(8, 16)
    full0, full1 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    single = nt_xent(full0, full1, temperature=0.3)
    single.backward()

    out = mp.Manager().dict()
    mp.spawn(_gathered_loss, args=(free_port(), z0, z1, out), nprocs=WORLD, join=True)
    # Each process's loss is the mean over its rows; their mean is the global loss.
    torch.testing.assert_close(sum(out[r][0] for r in range(WORLD)) / WORLD, single.detach())
    # A process's embeddings get gradient from every process's loss (through the gather); DDP then
    # averages over processes, which is the single-process gradient of the global mean.
    n = 8 // WORLD
    for r in range(WORLD):
        torch.testing.assert_close(out[r][1] / WORLD, full0.grad[r * n : (r + 1) * n])
        torch.testing.assert_close(out[r][2] / WORLD, full1.grad[r * n : (r + 1) * n])


def test_without_gather_each_process_sees_only_its_own_negatives() -> None:
    """The bug class the gather prevents: the loss on one process's half differs from the global one."""
    torch.manual_seed(0)
    z0, z1 = torch.randn(8, 16), torch.randn(8, 16)
    halves = (nt_xent(z0[:4], z1[:4], 0.3) + nt_xent(z0[4:], z1[4:], 0.3)) / 2
    assert not torch.allclose(halves, nt_xent(z0, z1, 0.3))


if __name__ == "__main__":
    pytest.main([__file__])


def _sync_bn(rank: int, port: int, x: torch.Tensor, state: dict, out: dict) -> None:
    from ssl_lab.distributed import SyncBatchNorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    net = SyncBatchNorm.convert(bn_net())
    net.load_state_dict(state)
    n = x.shape[0] // WORLD
    local = x[rank * n : (rank + 1) * n].clone().requires_grad_()
    y = net(local)
    (y * loss_weights((n * WORLD, *y.shape[1:]))[rank * n : (rank + 1) * n]).sum().backward()
    out[rank] = (y.detach(), local.grad, net[1].weight.grad, net[1].running_mean, net[1].running_var)
    dist.destroy_process_group()


def loss_weights(global_shape: tuple[int, ...]) -> torch.Tensor:
    """Fixed weights over the global batch, so that the loss is not symmetric in the samples."""
    return torch.arange(torch.Size(global_shape).numel()).view(global_shape).float().sin()


def bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


def test_sync_batchnorm_on_gloo_equals_one_process_on_the_global_batch() -> None:
    net = bn_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 3, 6, 6) * 3 + 1
    full = x.clone().requires_grad_()
    y = net(full)
    (y * loss_weights(y.shape)).sum().backward()

    out = mp.Manager().dict()
    mp.spawn(_sync_bn, args=(free_port(), x, state, out), nprocs=WORLD, join=True)
    n = 8 // WORLD
    for r in range(WORLD):
        y_r, grad_x, grad_w, running_mean, running_var = out[r]
        torch.testing.assert_close(y_r, y.detach()[r * n : (r + 1) * n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grad_x, full.grad[r * n : (r + 1) * n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(running_mean, net[1].running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(running_var, net[1].running_var, atol=1e-5, rtol=1e-5)
    # each process holds its part of the weight gradient; DDP's all-reduce sums/averages them
    summed = sum(out[r][2] for r in range(WORLD))
    torch.testing.assert_close(summed, net[1].weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "nnclr"])
def test_two_processes_train_like_one(method: str, tmp_path) -> None:
    """torchrun with 2 CPU processes (gloo) and 1 process, same global batch, seed and data: the same
    losses step by step and the same final weights, to float tolerance. NNCLR only for its first
    steps: its nearest-neighbour argmax turns float-level differences into different neighbours once
    the support set holds near-identical early embeddings, after which the runs drift apart."""
    import subprocess
    import sys

    from conftest import FAST

    from ssl_lab import checkpoint
    from ssl_lab.loggers import read_metrics

    args = [
        *FAST,
        f"method={method}",
        "epochs=1",
        "trainer.log_every=1",
        "trainer.progress=false",
        "logger=none",
    ]
    runs = {}
    for procs in (1, 2):
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
        ]
        result = subprocess.run(
            [*launcher, "-m", "ssl_lab.train", *args, f"hydra.run.dir=run{procs}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs[procs] = tmp_path / f"run{procs}"
    losses = {p: [r["train/loss"] for r in read_metrics(d) if "train/loss" in r] for p, d in runs.items()}
    assert len(losses[1]) == 8
    steps = 8 if method == "simclr" else 3
    torch.testing.assert_close(
        torch.tensor(losses[2][:steps]), torch.tensor(losses[1][:steps]), rtol=1e-5, atol=1e-5
    )
    if method == "simclr":
        one, two = (checkpoint.load(runs[p] / "final.pt")["model"] for p in (1, 2))
        for key in one:
            torch.testing.assert_close(two[key].float(), one[key].float(), rtol=1e-3, atol=1e-3, msg=key)
    assert not any((runs[2] / ".hydra").glob("*rank*"))  # only rank 0 wrote the run dir
