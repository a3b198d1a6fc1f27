"""Metrics: accuracies, and alignment / uniformity of features (LatentDR eqs. 10, 11). Pure tensors."""

from __future__ import annotations

import torch


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Top-1 accuracy as a fraction; None for no rows."""
    return float((pred == labels).float().mean()) if len(labels) else None


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean over the classes present of each class's recall; None for no rows."""
    if not len(labels):
        return None
    recalls = [float((pred[labels == c] == c).float().mean()) for c in labels.unique()]
    return sum(recalls) / len(recalls)


def alignment(x: torch.Tensor, labels: torch.Tensor, max_pairs: int = 20000, generator=None) -> float:
    """E over same-class pairs of ‖f(x) − f(y)‖² (lower: classes tighter)."""
    i = torch.randint(len(x), (max_pairs,), generator=generator)
    j = torch.randint(len(x), (max_pairs,), generator=generator)
    same = (labels.cpu()[i] == labels.cpu()[j]) & (i != j)
    if not same.any():
        return float("nan")
    i, j = i[same].to(x.device), j[same].to(x.device)
    return float(((x[i] - x[j]) ** 2).sum(-1).mean())


def uniformity(x: torch.Tensor, t: float = 2.0, max_pairs: int = 20000, generator=None) -> float:
    """log E over pairs of exp(−t‖f(x) − f(y)‖²) (lower: features spread more evenly)."""
    i = torch.randint(len(x), (max_pairs,), generator=generator).to(x.device)
    j = torch.randint(len(x), (max_pairs,), generator=generator).to(x.device)
    keep = i != j
    d2 = ((x[i[keep]] - x[j[keep]]) ** 2).sum(-1)
    return float(torch.log(torch.exp(-t * d2).mean()))
