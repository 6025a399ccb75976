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
