"""Training health: signs of collapse that show long before a kNN figure comes out low.

At every log step (trainer.log_every) the runner passes the step's first view through the evaluated
network (the one evaluation reads: the student's backbone, DINO's teacher's), in eval mode and without
gradients, and logs two figures of those features, averaged over the processes (each process scores its
own share of the batch):

- `train/feature_std`: the std over the batch of the l2-normalised features, averaged over the
  dimensions (lightly's `std_of_l2_normalized`). 0 when every image maps to one point; about
  1/sqrt(dim) when the features spread over the sphere (0.044 for a ResNet-18's 512).
- `train/feature_rank`: the effective rank of the batch's features (RankMe, Garrido et al. 2023, eq. 1):
  exp of the entropy of the singular values normalised to sum to 1. At most min(batch, dim); it falls
  to ~1 on a collapse to a point, and to a few when the features collapse onto a few directions
  (dimensional collapse), which the std does not show.

Teacher methods log their teacher's entropy themselves (`train/teacher_entropy`, DINO's): near 0 when
the teacher puts every image on one prototype, log K when it is uniform.

`train/grad_norm` (the global gradient norm before any clipping, logged by the runner's step) and the
stop on non-finite gradients are in ssl_lab.build.TrainStep. docs/health.md shows healthy and collapsing
runs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def feature_std(z: torch.Tensor) -> torch.Tensor:
    """The std over the batch of the l2-normalised rows of `z` [n, d], averaged over d (lightly's
    std_of_l2_normalized)."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


def effective_rank(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe (Garrido et al. 2023, eq. 1): exp(-sum p_k log p_k) with p_k = sigma_k / ||sigma||_1 + eps,
    sigma the singular values of `z` [n, d] (not centred, as the paper)."""
    sigma = torch.linalg.svdvals(z.float())
    p = sigma / sigma.sum().clamp(min=torch.finfo(sigma.dtype).tiny) + eps
    return torch.exp(-(p * p.log()).sum())


@torch.no_grad()
def health(
    encoder: nn.Module, images: torch.Tensor, autocast_dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """`feature_std` and `feature_rank` of the features of `images` by `encoder` in eval mode: no batch
    statistics updated and no dropout drawn, so the training is the same with the signals on or off.
    Each module's mode is restored after."""
    modes = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    try:
        device, dtype = images.device.type, autocast_dtype
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            z = encoder(images).float()
    finally:
        for module, training in modes:
            module.training = training
    return {"feature_std": feature_std(z), "feature_rank": effective_rank(z)}
