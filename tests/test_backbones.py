"""ssl_lab/models/backbones.py: lightly's benchmark ResNet (no ReLU after the stem) and batch norm over
splits of the batch (lightly's SplitBatchNorm), against lightly's own classes."""

import pytest
import torch
import torch.nn as nn

from ssl_lab import distributed
from ssl_lab.errors import UserError
from ssl_lab.models.backbones import SplitBatchNorm2d, torchvision_resnet


def to_lightly_order(x: torch.Tensor, splits: int) -> torch.Tensor:
    """lightly's split j holds samples j, j+splits, ... (strided); ssl_lab's the j-th consecutive block."""
    n = x.shape[0]
    return x.view(splits, n // splits, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


@pytest.mark.parametrize("splits,batch", [(4, 32), (8, 16), (2, 6)])
def test_split_batchnorm_is_lightlys_on_the_same_splits(splits: int, batch: int) -> None:
    """Outputs in training, running statistics (averaged over the splits when evaluating) and outputs
    in evaluation equal lightly's SplitBatchNorm's, splits matched."""
    from lightly.models.batchnorm import SplitBatchNorm

    torch.manual_seed(splits)
    theirs, ours = SplitBatchNorm(6, splits), SplitBatchNorm2d(6, splits)
    with torch.no_grad():
        theirs.weight.normal_(), theirs.bias.normal_()
        ours.weight.copy_(theirs.weight), ours.bias.copy_(theirs.bias)
    for _ in range(3):
        x = torch.randn(batch, 6, 5, 5) * 3 + 1
        y_theirs = theirs(to_lightly_order(x, splits))
        y = ours(x)
        torch.testing.assert_close(to_lightly_order(y, splits), y_theirs, atol=1e-5, rtol=1e-5)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours.running_mean, theirs.running_mean[:6])
    torch.testing.assert_close(ours.running_var, theirs.running_var[:6])
    x = torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))


def test_each_split_is_normalised_by_its_own_statistics() -> None:
    norm = SplitBatchNorm2d(3, 2)
    x = torch.cat([torch.randn(4, 3, 2, 2), 10 + 5 * torch.randn(4, 3, 2, 2)])
    y = norm(x)
    for half in y.chunk(2):  # zero mean, unit variance within each split, not over the batch
        torch.testing.assert_close(half.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(half.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)


def test_the_splits_are_of_the_global_batch_on_several_processes(monkeypatch) -> None:
    """On 2 processes each holds half the splits of the global batch: its output is the 1-process
    output of its rows, and the running statistics are averaged over the processes (every process
    evaluates the same network)."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 4)
    single = SplitBatchNorm2d(3, 4)
    y_single = single(x)
    halves = []
    for rank in (0, 1):
        norm = SplitBatchNorm2d(3, 4)
        other = x[8:] if rank == 0 else x[:8]
        stats_other = SplitBatchNorm2d(3, 2)
        stats_other(other)  # what the other process adds to the mean of the statistics

        def mean(
            t: torch.Tensor, other=stats_other
        ) -> torch.Tensor:  # the all-reduce: the other's batch stats
            theirs = torch.cat([(other.running_mean - 0) / 0.1, (other.running_var - 0.9) / 0.1])
            return (t + theirs) / 2

        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "mean", mean)
        halves.append(norm(x[:8] if rank == 0 else x[8:]))
        monkeypatch.undo()
        torch.testing.assert_close(norm.running_mean, single.running_mean)
        torch.testing.assert_close(norm.running_var, single.running_var)
    torch.testing.assert_close(torch.cat(halves), y_single)


def test_splits_that_do_not_divide_the_batch_or_the_processes_are_one_line_errors(monkeypatch) -> None:
    with pytest.raises(UserError, match="backbone.bn_splits=4 .* batch of 6"):
        SplitBatchNorm2d(3, 4)(torch.randn(6, 3, 2, 2))
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(UserError, match="backbone.bn_splits=4 needs a multiple of the 3 processes"):
        SplitBatchNorm2d(3, 4)(torch.randn(8, 3, 2, 2))


def test_lightlys_benchmark_resnet_has_no_relu_after_the_stem_and_every_batchnorm_split() -> None:
    from lightly.models import ResNetGenerator

    ours = torchvision_resnet("resnet18", cifar_stem=True, stem_relu=False, bn_splits=8)
    theirs = nn.Sequential(*list(ResNetGenerator("resnet-18", num_splits=8).children())[:-1])
    kinds = lambda m: [type(x).__name__ for x in m.modules() if isinstance(x, nn.BatchNorm2d)]  # noqa: E731
    assert set(kinds(ours)) == {"SplitBatchNorm2d"} and set(kinds(theirs)) == {"SplitBatchNorm"}
    assert len(kinds(ours)) == len(kinds(theirs)) and isinstance(ours.relu, nn.Identity)
    assert {m.num_splits for m in ours.modules() if isinstance(m, SplitBatchNorm2d)} == {8}
    with pytest.raises(UserError, match="backbone.bn_splits=-1"):
        torchvision_resnet("resnet18", bn_splits=-1)


@pytest.mark.slow
def test_split_batchnorm_compiles_in_one_graph() -> None:
    """No graph break (so no host sync hidden in it on a GPU): torch.compile(fullgraph=True)."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3)
    compiled = torch.compile(SplitBatchNorm2d(4, 2), fullgraph=True)
    torch.testing.assert_close(compiled(x), SplitBatchNorm2d(4, 2)(x), atol=1e-5, rtol=1e-5)
