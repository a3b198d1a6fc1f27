"""Gaussian discriminant analysis on embeddings: class statistics in one pass, the shrinkage
GDA classifier, and the Mahalanobis distance that gates input-adaptive ensembles. Pure tensors.

Every class is a Gaussian with its own mean μ_c and one covariance Σ shared by all classes,
estimated from the training rows and shrunk towards a multiple of the identity (Ledoit and
Wolf 2004; Σ_α = (1 − α)·S + α·(tr S / d)·I), since d is often close to or above the number
of rows. The Bayes rule of that model is linear:

    logit_c(x) = x·Σ_α⁻¹μ_c − ½·μ_cᵀΣ_α⁻¹μ_c + log π_c

so a GDA classifier is a :class:`~vlaug.probe.LinearProbe` like every other method's. On CLIP
features it is a strong few-shot classifier (Wang et al. 2024, "A Hard-to-Beat Baseline for
Training-free CLIP-based Adaptation", ICLR), and it needs one pass over the rows: the
statistics are sums, so a cache streamed from disk costs one read.

The same model gives an input's distance from the training distribution: the Mahalanobis
distance to the nearest class mean (Lee et al. 2018, "A Simple Unified Framework for
Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

# shrinkage values tried on the validation rows (α = 0 is left out: S is singular when d >= n)
SHRINKAGE_GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ABSENT_CLASS_BIAS = -1e4  # the bias of a class with no training row: never predicted


@dataclass
class ClassStatistics:
    """Sums over rows: per-class counts (C,) and feature sums (C, d), and Σ x xᵀ (d, d), in float64."""

    counts: torch.Tensor
    sums: torch.Tensor
    second: torch.Tensor

    @classmethod
    def of(cls, blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], n_classes: int, dim: int,
           device: torch.device | str = "cpu") -> "ClassStatistics":
        """From ``(x, targets)`` blocks: targets are (m,) labels or (m, C) soft targets, a
        row counting towards each class by its target's mass (a mixed row is split)."""
        counts = torch.zeros(n_classes, dtype=torch.float64, device=device)
        sums = torch.zeros(n_classes, dim, dtype=torch.float64, device=device)
        second = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        for x, t in blocks:  # products in float32 per block (fast), sums in float64
            x = x.float()
            t = torch.nn.functional.one_hot(t, n_classes).float() if t.dim() == 1 else t.float()
            counts += t.sum(0).double()
            sums += (t.T @ x).double()
            second += (x.T @ x).double()
        return cls(counts, sums, second)

    @property
    def means(self) -> torch.Tensor:
        """(C, d) class means (zeros for a class with no row)."""
        return self.sums / self.counts.clamp(min=1e-12)[:, None]

    def covariance(self) -> torch.Tensor:
        """The pooled within-class covariance S = (Σ x xᵀ − Σ_c n_c μ_c μ_cᵀ) / n."""
        mu = self.means
        n = float(self.counts.sum())
        return (self.second - (mu.T * self.counts) @ mu) / max(n, 1.0)


def shrunk_inverses(cov: torch.Tensor, alphas: Iterable[float]) -> list[torch.Tensor]:
    """Σ_α⁻¹ for each shrinkage α, from one eigendecomposition of ``cov``."""
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp(min=0)
    scale = float(evals.mean())
    out = []
    for a in alphas:
        inv = 1.0 / ((1 - a) * evals + a * scale).clamp(min=1e-12 * max(scale, 1e-30))
        out.append((evecs * inv) @ evecs.T)
    return out


def gda_weights(stats: ClassStatistics, precision: torch.Tensor, priors: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GDA classifier as (d, C) weights and (C,) biases for the precision Σ_α⁻¹;
    ``priors`` (C,) sums to 1 (None: the training rows' class frequencies)."""
    mu = stats.means
    W = precision @ mu.T
    present = stats.counts > 0
    if priors is None:
        priors = stats.counts / stats.counts.sum().clamp(min=1e-12)
    priors = priors.to(stats.counts)
    b = -0.5 * (mu.T * W).sum(0) + torch.log(priors.clamp(min=1e-12))
    W = torch.where(present[None], W, torch.zeros_like(W))
    b = torch.where(present, b, torch.full_like(b, ABSENT_CLASS_BIAS))
    return W, b


def mahalanobis(x: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(n,) squared Mahalanobis distance of each row of ``x`` to its nearest class mean."""
    x = x.to(precision.dtype)
    xp = x @ precision
    d2 = (xp * x).sum(1, keepdim=True) - 2 * xp @ means.T + ((means @ precision) * means).sum(1)[None]
    return d2.min(1).values.clamp(min=0)
