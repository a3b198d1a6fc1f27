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
    # drawn on the generator's device (a CPU generator can drive GPU tensors), then moved
    gen_device = generator.device if generator is not None else lo.device
    samples = torch.rand((lo.shape[0], n, lo.shape[1]), generator=generator, device=gen_device, dtype=lo.dtype)
    samples = samples.to(lo.device)
    # in place: for 40 samples of 50,000 boxes in 512-d the output alone is 4 GB, and every
    # temporary of that size costs as much again
    samples.mul_((hi - lo).unsqueeze(1)).add_(lo.unsqueeze(1))
    if renormalize:
        samples.div_(torch.linalg.vector_norm(samples, dim=-1, keepdim=True).clamp_min_(1e-12))
    return samples


# Every augmenter below takes training embeddings x (n, d), soft targets t (n, C) and a
# generator, and returns the *additional* rows (m, d) and their targets (m, C); the probe
# trains on the originals plus these.


def gaussian_noise(x, t, n_aug: int = 1, sigma: float = 0.1, generator=None):
    """x + ε, ε ~ N(0, σ²/d · I) (so ‖ε‖ ≈ σ), re-normalised; the label is kept."""
    gen_device = generator.device if generator is not None else x.device
    eps = torch.randn((n_aug, *x.shape), generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
    out = F.normalize(x.unsqueeze(0) + sigma / x.shape[1] ** 0.5 * eps, dim=-1)
    return out.reshape(-1, x.shape[1]), t.repeat(n_aug, 1)


def toward_prompts(x, labels, text, scale: float = 1.0, generator=None):
    """Text-anchored rows: normalise(x + u·t̂_y), u ~ U(0, scale) per row, t̂_y the unit class
    prompt of the row's label. Moving a row towards its class prompt adds the one direction
    a shifted domain keeps: what the class's name says."""
    u = torch.rand((len(x), 1), generator=generator).to(x) * scale
    return F.normalize(x + u * F.normalize(text, dim=-1)[labels], dim=-1)


def latent_mixup(x, t, n_aug: int = 1, alpha: float = 0.2, generator=None):
    """Mixup in the latent space: λx_i + (1-λ)x_j with λ ~ Beta(α, α), targets mixed alike."""
    import numpy as np

    n = len(x)
    # torch's Beta sampler takes no generator: seed a numpy one from ours instead
    seed = int(torch.randint(2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    xs, ts = [], []
    for _ in range(n_aug):
        j = torch.randperm(n, generator=generator).to(x.device)
        lam = torch.as_tensor(rng.beta(alpha, alpha, n), dtype=x.dtype, device=x.device).unsqueeze(1)
        xs.append(F.normalize(lam * x + (1 - lam) * x[j], dim=-1))
        ts.append(lam * t + (1 - lam) * t[j])
    return torch.cat(xs), torch.cat(ts)


def cross_domain_partners(labels: torch.Tensor, domains: torch.Tensor, n_aug: int = 1, generator=None) -> torch.Tensor:
    """For each row, ``n_aug`` partners drawn uniformly among the same-class rows of other
    domains; when its class has one domain, among the other rows of its class (itself when
    it is alone). Returns (n_aug, n) row indices. Vectorised: rows are sorted by (class,
    domain), so a row's candidates are its class's span minus its domain's (or its own) slot.
    """
    lab, dom = labels.cpu().long(), domains.cpu().long()
    n = len(lab)
    key = lab * (int(dom.max()) + 1 if n else 1) + dom
    order = torch.sort(key, stable=True).indices
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)  # position of each row in the sorted order

    def span(groups):  # first sorted position and size of each row's group
        _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        return starts[inverse], counts[inverse]

    class_start, class_size = span(lab)
    dom_start, dom_size = span(key)
    other = class_size - dom_size  # same-class rows of other domains
    fallback = other == 0
    # candidates: the class span without the row's domain block, or (fallback) without the row
    skip_start = torch.where(fallback, rank, dom_start)
    skip_size = torch.where(fallback, torch.ones_like(rank), dom_size)
    n_candidates = torch.where(fallback, class_size - 1, other)
    u = torch.rand((n_aug, n), generator=generator)
    k = class_start + (u * n_candidates).long().clamp(max=(n_candidates - 1).clamp(min=0))
    k = torch.where(k >= skip_start, k + skip_size, k)
    partners = order[k.clamp(max=max(0, n - 1))]
    alone = n_candidates == 0
    return torch.where(alone, torch.arange(n), partners)


def cross_domain_mix(x, t, labels, domains, n_aug: int = 1, generator=None):
    """Latent analogue of CDGA: interpolate each row with a same-class row of another
    training domain (any other same-class row when the class has one domain), λ ~ U(0, 1)."""
    partners = cross_domain_partners(labels, domains, n_aug, generator)
    lam = torch.rand((n_aug, len(x), 1), generator=generator).to(x.device, x.dtype)
    mixed = F.normalize(lam * x.unsqueeze(0) + (1 - lam) * x[partners.to(x.device)], dim=-1)
    return mixed.reshape(-1, x.shape[1]), t.repeat(n_aug, 1)


@torch.no_grad()
def box_samples(head, x, t, n_aug: int = 5, generator=None, renormalize: bool = True):
    """LARE stage 2: ``n_aug`` uniform samples inside each training row's box."""
    head.eval()
    lo, hi = head(x)
    s = sample_boxes(lo, hi, n_aug, generator, renormalize)  # (n, n_aug, d)
    return s.reshape(-1, x.shape[1]), t.repeat_interleave(n_aug, 0)


@torch.no_grad()
def dr_samples(dr, x, labels, n_aug: int = 1, batch_size: int = 256, generator=None):
    """LatentDR's degraded (soft labels) and restored (true labels) rows, dropout on,
    over ``n_aug`` shuffles of the training rows in batches of ``batch_size``."""
    xs, ts = [], []
    for _ in range(n_aug):
        order = torch.randperm(len(x), generator=generator).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            for z, target in dr.sample(x[idx], labels[idx]):
                xs.append(z)
                ts.append(target)
    return torch.cat(xs), torch.cat(ts)


@torch.no_grad()
def lads_samples(head, x, t):
    """LADS: one augmented row per target domain, normalise(f_aug_k(x))."""
    head.eval()
    fx = F.normalize(head(x), dim=-1)  # (n, K, d)
    return fx.reshape(-1, x.shape[1]), t.repeat_interleave(fx.shape[1], 0)
