"""LARE's box embedding (Sakurai et al.): f_Box maps an image embedding to a box.

f_Box: R^d -> R^2d gives two corners X⁻ and X⁺, each L2-normalised. The loss is

    (1 - α) · L_BV + α · (L_CC⁻ + L_CC⁺ + L_CC) / 3

with L_BV = X⁻ · X⁺ (the corners' inner product: minimising it pushes them apart, so
the box grows) and each L_CC the cross-entropy of the zero-shot logits of a corner (or of
the centre) against the class text embeddings.

Where the paper is silent, vlaug chooses (and names the choice in every checkpoint):
- architecture: a two-layer MLP (d -> hidden -> 2d, GELU) whose output is an offset
  added to the input embedding before normalisation (``residual=True``);
- initialisation: the last layer's weights near zero and its bias ``(−r·u, +r·u)`` for a
  random unit direction u and ``r = init_width`` = 0.5, so every box starts with corners
  at inner product ≈ 0.6 around its point. A box that starts at a point (r = 0, vlaug's
  first choice) sits where the volume term's gradient vanishes: how far it grew then
  depended on how many optimiser steps the cache allowed (inner product 0.996 after 100
  steps on 384 rows, −0.97 on a large cache), not on α;
- the classification logits are cosine similarities divided by ``temperature`` = 0.1. With
  CLIP's 0.01 a corner needs only a tiny component along its class prompt to be classified
  with certainty, so the loss is lowest for nearly antipodal corners at every α (inner
  product −0.95 to −0.99 for α from 0.1 to 0.9: α only acted logarithmically) and box
  samples classified worse than the points; at 0.1 the minimum moves smoothly with α
  (−0.99, −0.86, −0.64, −0.32, +0.33 for α = 0.1 … 0.9 on a CLIP-like simulation, the same
  on 400 and 20,000 training rows). Useful α: about 0.1–0.7; at 0.9 the boxes can shrink
  back to points;
- the centre is (X⁻ + X⁺) / 2 re-normalised before its cosine logits are taken (with cosine
  logits, whether it is re-normalised makes no difference);
- L_BV and the cross-entropies are averaged over the batch;
- α = 0.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlaug.zero_shot import zero_shot_logits


@dataclass(frozen=True)
class BoxConfig:
    embed_dim: int = 0  # d of the cached embeddings; 0 until bound to a cache (:meth:`bind`)
    hidden: int = 0  # width of f_Box's hidden layer; 0 = 2·embed_dim
    residual: bool = True  # corners = normalise(z + offset)
    init_width: float = 0.5  # offsets start at (−r·u, +r·u), u a random unit direction: a box, not a point
    alpha: float = 0.5  # weight of the classification terms against the box volume
    temperature: float = 0.1  # classification logits = cos / temperature (not CLIP's 0.01: see the module docstring)

    # the paper's training schedule (vlaug train-box --epochs / --batch-size override it)
    EPOCHS: ClassVar[int] = 100
    BATCH_SIZE: ClassVar[int] = 512

    def __post_init__(self):
        if self.embed_dim < 0 or self.hidden < 0:
            raise ValueError(f"embed_dim == {self.embed_dim} and hidden == {self.hidden}, must be >= 0.")
        if self.hidden == 0 and self.embed_dim:  # resolved here so that checkpoints record the real width
            object.__setattr__(self, "hidden", 2 * self.embed_dim)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha == {self.alpha}, must be in [0, 1].")
        if self.temperature <= 0 or self.init_width < 0:
            raise ValueError(f"temperature == {self.temperature} must be > 0 and init_width == {self.init_width} >= 0.")

    def bind(self, embed_dim: int, n_classes: int) -> "BoxConfig":
        """This config for a cache of ``embed_dim``-d embeddings (defaults resolved)."""
        return replace(self, embed_dim=embed_dim)

    def to_dict(self) -> dict:
        return asdict(self)


class BoxHead(nn.Module):
    """f_Box: (n, d) embeddings -> corners (lo, hi), each (n, d) and L2-normalised.

    Example::

        head = BoxHead(BoxConfig(embed_dim=512))
        lo, hi = head(z)                                  # z: (n, 512), normalised
        loss, parts = box_loss(lo, hi, text, y, alpha=0.5, temperature=0.01)
        samples = vlaug.augment.sample_boxes(lo, hi, n=5) # (n, 5, 512)
    """

    def __init__(self, config: BoxConfig):
        super().__init__()
        if config.embed_dim < 1:
            raise ValueError("BoxConfig.embed_dim == 0: bind the config to a cache first (config.bind(embed_dim, n_classes)).")
        self.config = config
        d = config.embed_dim
        self.net = nn.Sequential(nn.Linear(d, config.hidden), nn.GELU(), nn.Linear(config.hidden, 2 * d))
        if config.residual:
            # Start from a real box around the point: at lo == hi the gradient of the
            # corners' inner product vanishes (it is at its maximum), and a box grown from
            # there ends wherever the optimiser's step count leaves it.
            nn.init.normal_(self.net[-1].weight, std=1e-4)
            u = F.normalize(torch.randn(d), dim=0)  # from torch's generator, which the training stage seeds
            with torch.no_grad():
                self.net[-1].bias.copy_(torch.cat([-config.init_width * u, config.init_width * u]))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(z)  # (n, 2d)
        lo, hi = out.chunk(2, dim=-1)
        if self.config.residual:
            lo, hi = z + lo, z + hi
        return F.normalize(lo, dim=-1), F.normalize(hi, dim=-1)


def box_center(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(lo + hi) / 2, re-normalised."""
    return F.normalize((lo + hi) / 2, dim=-1)


def box_loss(
    lo: torch.Tensor,
    hi: torch.Tensor,
    text: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LARE's loss (1-α)·L_BV + α·(L_CC⁻ + L_CC⁺ + L_CC)/3, averaged over the batch.

    Args:
        lo, hi: (n, d) normalised corners.
        text: (C, d) class text embeddings.
        labels: (n,) class indices.

    Returns:
        the loss and its parts ``bv``, ``cc_lo``, ``cc_hi``, ``cc_center`` (detached).
    """
    bv = (lo * hi).sum(-1).mean()
    cc_lo = F.cross_entropy(zero_shot_logits(lo, text, temperature), labels)
    cc_hi = F.cross_entropy(zero_shot_logits(hi, text, temperature), labels)
    cc_center = F.cross_entropy(zero_shot_logits(box_center(lo, hi), text, temperature), labels)
    loss = (1 - alpha) * bv + alpha * (cc_lo + cc_hi + cc_center) / 3
    parts = {"bv": bv, "cc_lo": cc_lo, "cc_hi": cc_hi, "cc_center": cc_center}  # bv: the mean corner inner product
    return loss, {k: v.detach() for k, v in parts.items()}


def box_log_volume(lo: torch.Tensor, hi: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(n,) log-volume of each box: Σ_d log |hi_d - lo_d| (LARE's Table 4 ranks classes by it)."""
    return torch.log((hi - lo).abs() + eps).sum(-1)
