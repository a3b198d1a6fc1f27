"""LADS (Dunlap et al.) baseline: one augmentation network per target domain.

f_aug_k: d -> 384 -> d (ReLU) for each target prompt set k. Loss, for each k:

    α · (1 − cos(normalise(f(x) − x), normalise(t_target[y] − t_source[y])))
    + (1 − α) · CE(cos(normalise(f(x)), class prompts) / temperature, y)

averaged over the target domains. Paper: α = 0.5, AdamW, 50 epochs, batch 256, keep the
epoch with the lowest validation loss. vlaug's choices: the class prompts of the CE term
are the cache's ``classes`` prompt set, and the logits use the same temperature (0.01) as
the box head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlaug.zero_shot import TEMPERATURE, zero_shot_logits


@dataclass(frozen=True)
class LADSConfig:
    embed_dim: int = 0  # d of the cached embeddings; 0 until bound to a cache (:meth:`bind`)
    targets: tuple[str, ...] = field(default_factory=tuple)  # target prompt set names, one f_aug each
    source: str = ""  # source prompt set name
    hidden: int = 384  # width of each f_aug
    alpha: float = 0.5  # weight of the domain-alignment term
    temperature: float = TEMPERATURE  # logits = cos / temperature in the class-consistency term

    # the paper's training schedule (vlaug train-box --epochs / --batch-size override it)
    EPOCHS: ClassVar[int] = 50
    BATCH_SIZE: ClassVar[int] = 256

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("targets is empty: LADS needs at least one target prompt set.")
        if not self.source:
            raise ValueError("source is empty: LADS needs the prompt set of the training domain.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha == {self.alpha}, must be in [0, 1].")
        if self.temperature <= 0 or self.hidden < 1:
            raise ValueError(f"temperature == {self.temperature} must be > 0 and hidden == {self.hidden} >= 1.")

    def bind(self, embed_dim: int, n_classes: int) -> "LADSConfig":
        """This config for a cache of ``embed_dim``-d embeddings."""
        return replace(self, embed_dim=embed_dim)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


class LADSHead(nn.Module):
    """(n, d) embeddings -> (n, K, d) raw outputs of the K augmentation networks.

    Example::

        head = LADSHead(LADSConfig(embed_dim=512, targets=("sketch", "painting"), source="photo"))
        fx = head(z)                                             # (n, 2, 512)
        loss, parts = lads_loss(z, fx, class_text, directions, y)
        augmented = torch.nn.functional.normalize(fx, dim=-1)    # what stage 3 adds
    """

    def __init__(self, config: LADSConfig):
        super().__init__()
        if config.embed_dim < 1:
            raise ValueError("LADSConfig.embed_dim == 0: bind the config to a cache first (config.bind(embed_dim, n_classes)).")
        self.config = config
        d = config.embed_dim
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(d, config.hidden), nn.ReLU(), nn.Linear(config.hidden, d)) for _ in config.targets
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.stack([net(z) for net in self.nets], dim=1)


def domain_directions(source_text: torch.Tensor, target_texts: torch.Tensor) -> torch.Tensor:
    """normalise(t_target − t_source) per class: (K, C, d) from (C, d) and (K, C, d)."""
    return F.normalize(target_texts - source_text.unsqueeze(0), dim=-1)


def lads_loss(
    z: torch.Tensor,
    fx: torch.Tensor,
    class_text: torch.Tensor,
    directions: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = TEMPERATURE,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LADS's loss averaged over the K targets.

    Args:
        z: (n, d) original embeddings; fx: (n, K, d) outputs of the K networks.
        class_text: (C, d) class prompt embeddings; directions: (K, C, d) from
            :func:`domain_directions`; labels: (n,).
    """
    n, k, _ = fx.shape
    moved = F.normalize(fx - z.unsqueeze(1), dim=-1)  # (n, K, d)
    wanted = directions[:, labels].transpose(0, 1)  # (n, K, d)
    alignment = (1 - (moved * wanted).sum(-1)).mean()
    logits = zero_shot_logits(fx.reshape(n * k, -1), class_text, temperature)
    consistency = F.cross_entropy(logits, labels.repeat_interleave(k))
    loss = alpha * alignment + (1 - alpha) * consistency
    return loss, {"alignment": alignment.detach(), "consistency": consistency.detach()}
