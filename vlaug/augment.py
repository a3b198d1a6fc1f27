"""Augmenters: sample new (embedding, label) pairs from trained heads. Pure tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_boxes(
    lo: torch.Tensor,
    hi: torch.Tensor,
    n: int,
    generator: torch.Generator | None = None,
    renormalize: bool = True,
) -> torch.Tensor:
    """Draw ``n`` points uniformly inside each box, independently per dimension.

    Args:
        lo, hi: (N, d) corners (in any order per dimension: a point is lo + u·(hi − lo)
            with u ~ U[0, 1)).
        n: samples per box (LARE: 3 for CIFAR-100, 5 for CUB, 40 for DomainNet).
        generator: the source of randomness (same generator state -> same samples).
        renormalize: L2-normalise the samples (vlaug's default: probes train on the unit
            sphere where the cached embeddings live; the paper does not say).

    Returns:
        (N, n, d) samples.

    Example::

        lo, hi = box_head(z)
        x = sample_boxes(lo, hi, 40, torch.Generator().manual_seed(0))   # (N, 40, d)
    """
    if n < 1:
        raise ValueError(f"n == {n}, must be >= 1.")
    if lo.shape != hi.shape or lo.dim() != 2:
        raise ValueError(f"lo and hi must both be (N, d); got {tuple(lo.shape)} and {tuple(hi.shape)}.")
    u = torch.rand((lo.shape[0], n, lo.shape[1]), generator=generator, device=lo.device, dtype=lo.dtype)
    samples = torch.addcmul(lo.unsqueeze(1), u, (hi - lo).unsqueeze(1))
    return F.normalize(samples, dim=-1) if renormalize else samples
