"""BatchFormer (Hou et al.) baseline: a transformer encoder layer across the batch and a
classifier shared by the original and the batch-mixed features. Training only: at test
time the classifier sees the original features alone.

vlaug's choices (as for LatentDR): 4 heads, dim-head = dim-ff = d/4, dropout 0.5,
post-norm, embeddings scaled by √d inside.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlaug.heads.latentdr import BatchAttention, BatchLayer


@dataclass(frozen=True)
class BatchFormerConfig:
    embed_dim: int = 512
    n_classes: int = 2
    heads: int = 4
    dim_head: int = 0  # 0: d/4
    dim_ff: int = 0  # 0: d/4
    dropout: float = 0.5

    def __post_init__(self):
        if self.dim_head == 0:
            object.__setattr__(self, "dim_head", max(1, self.embed_dim // 4))
        if self.dim_ff == 0:
            object.__setattr__(self, "dim_ff", max(1, self.embed_dim // 4))

    def to_dict(self) -> dict:
        return asdict(self)


class BatchFormer(nn.Module):
    def __init__(self, config: BatchFormerConfig):
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        self.layer = BatchLayer(d, c.dim_ff, BatchAttention(d, c.heads, c.dim_head, c.dropout), c.dropout, "post")
        self.classifier = nn.Linear(d, c.n_classes)
        self.input_scale = float(d) ** 0.5

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z * self.input_scale)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the original and of the batch-mixed features."""
        x = z * self.input_scale
        mixed = F.normalize(self.layer(x, x), dim=-1)
        return self.classify(z), self.classify(mixed)


def batchformer_loss(out: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor):
    """CE on the original features + CE on the mixed ones (same labels)."""
    ce, ce_mixed = F.cross_entropy(out[0], labels), F.cross_entropy(out[1], labels)
    return ce + ce_mixed, {"ce": ce.detach(), "ce_mixed": ce_mixed.detach()}
