"""Zero-shot classification with class text embeddings: the one definition of its logits.

The logits are cosine similarities between image embeddings and class text embeddings,
divided by a temperature. vlaug's default, 0.01, is CLIP's learned logit scale of 100; it
is used by the box and LADS losses, by stage 3's zero-shot method and by the zero-shot
side of ensembles, and each of them records the value it used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TEMPERATURE = 0.01  # CLIP's logit scale of 100


def zero_shot_weights(text: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """The zero-shot classifier as linear weights: (d, C) with x @ W = cos(x, text) / temperature
    for unit-norm x."""
    return F.normalize(text, dim=-1).T / temperature


def zero_shot_logits(x: torch.Tensor, text: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Cosine similarity of (n, d) points with (C, d) class text embeddings, / temperature: (n, C)."""
    return F.normalize(x, dim=-1) @ F.normalize(text, dim=-1).T / temperature
