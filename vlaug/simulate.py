"""Simulated latents for tests, benchmarks and examples: small generators with a known
structure (pure numpy; torch tensors where a caller trains on them directly)."""

from __future__ import annotations

import numpy as np
import torch


def clip_like(n: int, d: int, n_classes: int, seed: int = 0):
    """(x (n, d) float32, labels, class prompts (C, d)): CLIP-like unit-norm latents. Class
    prompts share a direction (prompt-prompt cosine ≈ 0.75), images share a modality-gap
    direction, image-to-own-prompt cosine ≈ 0.3; the prompts depend only on (d, C)."""
    rt = np.random.default_rng(123)
    g = rt.standard_normal(d)
    g /= np.linalg.norm(g)
    gap = rt.standard_normal(d)
    gap -= (gap @ g) * g
    gap /= np.linalg.norm(gap)
    e = rt.standard_normal((n_classes, d))
    text = 0.87 * g + 0.5 * e / np.linalg.norm(e, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    centres = rt.standard_normal((n_classes, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    r = np.random.default_rng(seed)
    y = r.integers(0, n_classes, n)
    x = 0.3 * text[y] + 0.6 * gap + 0.35 * centres[y] + 0.6 * r.standard_normal((n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y, text.astype(np.float32)


def planted(n: int, seed: int, d: int = 16, minority: float = 0.08):
    """(x, labels, rare mask): class 0 with a rare pattern of ``minority`` of its rows."""
    r = np.random.default_rng(seed)
    y = r.integers(0, 2, n)
    rare = (y == 0) & (r.random(n) < minority)
    x = 0.35 * r.standard_normal((n, d))
    x[:, 0] += np.where(y == 0, 1.0, -1.0)
    x[rare, 0] = -0.6 + 0.35 * r.standard_normal(rare.sum())
    x[rare, 1] += 2.0
    return torch.tensor(x / 3, dtype=torch.float32), torch.tensor(y), torch.tensor(rare)
