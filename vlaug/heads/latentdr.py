"""LatentDR (Liu et al.): sample-aware latent degradation and restoration.

- Degradation D: one transformer layer across the batch. ``sa``: self-attention over the
  other samples; ``pool``: each sample averages a random subset of the batch (each other
  sample kept with probability ``pool_fraction``). Dropout 0.5. It maps z -> z_d, whose
  label is the soft label ỹ = mean of the batch's one-hot labels.
- Restoration R: one cross-attention layer, queries from z_d, keys/values from the
  original batch z. It maps z_d -> z_r, whose label is the true label.
- One classifier g shared by the three terms: CE(g(z), y) + CE(g(z_d), ỹ) + CE(g(z_r), y).

Paper defaults: SA dim-head = dim-ff = d/4; Pool dim-head = d/32, dim-ff = d/8;
post-norm (eq. 12), pre-norm (eq. 13) for long-tailed data. Ablations (Table 2):
``mode`` d (degradation only), r (restoration of the clean batch only), dr (both);
``degrade`` gaussian (z_d = z + N(0, σ²) instead of the attention layer).

vlaug's choices where the paper is silent: 4 heads; z_d and z_r are L2-normalised (so
they live on the same sphere as the cached embeddings and can be fed to stage 3's
probes); the layers and g see embeddings scaled by √d (unit variance per dimension);
attention scores are divided by √dim_head (the transformer's scaling; eq. 9 writes none:
``scaled_attention=False`` follows it); restoration attends to the *other* samples of the
batch, as the paper's Alg. 1 does (``restore_from="all"`` also lets a query see its own
clean latent, which turns restoration into copying); randomness (dropout, pool subsets,
noise) comes from torch's global generator, which the training stage seeds once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlaug.choices import DR_DEGRADES, DR_MODES, DR_NORMS

KINDS = ("sa", "pool")  # the degradation layer of dr-sa / dr-pool heads


@dataclass(frozen=True)
class LatentDRConfig:
    embed_dim: int = 0  # d of the cached embeddings; 0 until bound to a cache (:meth:`bind`)
    n_classes: int = 2  # classes of the shared classifier g
    kind: str = "sa"  # sa: self-attention degradation | pool: random-subset average pooling
    heads: int = 4  # attention heads (the paper does not say)
    dim_head: int = 0  # per-head width; 0 = paper default (d/4 for sa, d/32 for pool)
    dim_ff: int = 0  # feed-forward width; 0 = paper default (d/4 for sa, d/8 for pool)
    dropout: float = 0.5  # in the degradation and restoration layers
    norm: str = "post"  # post (eq. 12) | pre (eq. 13, long-tail variant)
    mode: str = "dr"  # dr | d (degradation only) | r (restoration only)
    degrade: str = "attention"  # attention | gaussian (noise ablation)
    noise_std: float = 0.1  # σ of the gaussian degradation
    pool_fraction: float = 0.5  # pool: probability that another sample joins the average
    # restoration's keys/values: "others" (the paper's Alg. 1: the other samples of the batch)
    # or "all" (also the query's own clean latent, vlaug's first choice: restoring is then
    # copying the answer)
    restore_from: str = "others"
    scaled_attention: bool = True  # scores / √dim_head (the transformer's scaling; the paper's eq. 9 has none)

    # vlaug's training schedule (the paper trains end to end with the backbone)
    EPOCHS: ClassVar[int] = 100
    BATCH_SIZE: ClassVar[int] = 256

    def __post_init__(self):
        for name, value, allowed in (("kind", self.kind, KINDS), ("mode", self.mode, DR_MODES),
                                     ("degrade", self.degrade, DR_DEGRADES), ("norm", self.norm, DR_NORMS),
                                     ("restore_from", self.restore_from, ("others", "all"))):
            if value not in allowed:
                raise ValueError(f"{name} == {value!r}, must be one of {allowed}.")
        if self.dim_head < 0 or self.dim_ff < 0:
            raise ValueError(f"dim_head == {self.dim_head} and dim_ff == {self.dim_ff}, must be >= 0 (0: the paper's).")
        if self.embed_dim < 0 or self.n_classes < 2 or self.heads < 1:
            raise ValueError(f"embed_dim == {self.embed_dim}, n_classes == {self.n_classes}, heads == {self.heads}; "
                             "need embed_dim >= 0, n_classes >= 2, heads >= 1.")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 < self.pool_fraction <= 1.0 or self.noise_std < 0:
            raise ValueError(f"dropout == {self.dropout} must be in [0, 1), pool_fraction == {self.pool_fraction} "
                             f"in (0, 1], noise_std == {self.noise_std} >= 0.")
        d = self.embed_dim
        if not d:
            return  # unbound: the paper's widths are resolved once d is known
        if self.dim_head == 0:  # resolve the paper's defaults so checkpoints record real values
            object.__setattr__(self, "dim_head", max(1, d // 4 if self.kind == "sa" else d // 32))
        if self.dim_ff == 0:
            object.__setattr__(self, "dim_ff", max(1, d // 4 if self.kind == "sa" else d // 8))

    def bind(self, embed_dim: int, n_classes: int) -> "LatentDRConfig":
        """This config for a cache of ``embed_dim``-d embeddings and ``n_classes`` classes (g has at least 2)."""
        return replace(self, embed_dim=embed_dim, n_classes=max(2, n_classes))

    def to_dict(self) -> dict:
        return asdict(self)


class BatchAttention(nn.Module):
    """Attention across the batch: each of the n query rows mixes the m key/value rows.

    ``pool=True`` replaces the attention weights by a uniform average over a random
    subset of the other rows (LatentDR's Pool degradation).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, pool: bool = False, pool_fraction: float = 0.5,
                 scaled: bool = True):
        super().__init__()
        self.heads, self.dim_head, self.pool, self.pool_fraction = heads, dim_head, pool, pool_fraction
        self.scale = dim_head**-0.5 if scaled else 1.0
        inner = heads * dim_head
        if not pool:
            self.to_q = nn.Linear(dim, inner, bias=False)
            self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        n, m, h, dh = queries.shape[0], keys.shape[0], self.heads, self.dim_head
        v = self.to_v(keys).view(m, h, dh).transpose(0, 1)  # (h, m, dh)
        if self.pool:
            keep = torch.rand(n, m, device=keys.device) < self.pool_fraction
            if exclude_self and n == m and m > 1:
                keep = keep & ~torch.eye(n, dtype=torch.bool, device=keys.device)
            keep = keep | ~keep.any(1, keepdim=True)  # a row that drew nobody averages everyone
            # (out of place, so that torch.func.vmap batches it: the joint methods' configurations)
            weights = (keep / keep.sum(1, keepdim=True)).to(v.dtype).expand(h, n, m)
        else:
            q = self.to_q(queries).view(n, h, dh).transpose(0, 1)  # (h, n, dh)
            k = self.to_k(keys).view(m, h, dh).transpose(0, 1)
            scores = q @ k.transpose(1, 2) * self.scale  # (h, n, m)
            if exclude_self and n == m and m > 1:
                scores = scores.masked_fill(torch.eye(n, dtype=torch.bool, device=scores.device), float("-inf"))
            weights = scores.softmax(-1)
        out = self.attn_drop(weights) @ v  # (h, n, dh)
        return self.to_out(out.transpose(0, 1).reshape(n, h * dh))


class BatchLayer(nn.Module):
    """One transformer layer whose 'sequence' is the batch: attention + feed-forward."""

    def __init__(self, dim: int, dim_ff: int, attention: BatchAttention, dropout: float, norm: str):
        super().__init__()
        self.attention, self.norm = attention, norm
        self.ff = nn.Sequential(nn.Linear(dim, dim_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim_ff, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        if self.norm == "post":  # eq. 12: x = LN(x + Attn(x)); x = LN(x + FF(x))
            x = self.norm1(x + self.drop(self.attention(x, memory, exclude_self)))
            return self.norm2(x + self.drop(self.ff(x)))
        # eq. 13 (pre-norm): x = x + Attn(LN(x)); x = x + FF(LN(x))
        x = x + self.drop(self.attention(self.norm1(x), self.norm1(memory), exclude_self))
        return x + self.drop(self.ff(self.norm2(x)))


def soft_labels(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """ỹ: the batch mean of one-hot labels, the same (n_classes,) row for every sample."""
    return F.one_hot(labels, n_classes).float().mean(0, keepdim=True).expand(len(labels), n_classes)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -Σ_c target_c · log softmax(logits)_c."""
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


class LatentDR(nn.Module):
    """Degradation D, restoration R and the shared classifier g.

    Example::

        dr = LatentDR(LatentDRConfig(embed_dim=512, n_classes=40, kind="sa"))
        out = dr(z, y)                     # z: (n, 512) normalised, y: (n,)
        loss, parts = latentdr_loss(out, y, mode="dr")
        (z_d, y_soft), (z_r, y_true) = dr.sample(z, y)   # augmentations for a probe
    """

    def __init__(self, config: LatentDRConfig):
        super().__init__()
        if config.embed_dim < 1:
            raise ValueError("LatentDRConfig.embed_dim == 0: bind the config to a cache first (config.bind(embed_dim, n_classes)).")
        self.config = c = config
        d = c.embed_dim
        if c.mode in ("dr", "d") and c.degrade == "attention":
            attn = BatchAttention(d, c.heads, c.dim_head, c.dropout, pool=c.kind == "pool", pool_fraction=c.pool_fraction,
                                  scaled=c.scaled_attention)
            self.degrader = BatchLayer(d, c.dim_ff, attn, c.dropout, c.norm)
        if c.mode in ("dr", "r"):
            restore_attn = BatchAttention(d, c.heads, c.dim_head, c.dropout, scaled=c.scaled_attention)
            self.restorer = BatchLayer(d, c.dim_ff, restore_attn, c.dropout, c.norm)
        self.classifier = nn.Linear(d, c.n_classes)
        # Unit-norm embeddings have per-dimension scale 1/√d; g (and the attention layers)
        # see them scaled by √d, the scale nn.Linear's initialisation and LayerNorm assume.
        self.input_scale = float(d) ** 0.5

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """g: (n, d) normalised embeddings -> (n, n_classes) logits."""
        return self.classifier(z * self.input_scale)

    def degrade(self, z: torch.Tensor) -> torch.Tensor:
        """z -> z_d (normalised)."""
        if self.config.degrade == "gaussian":
            return F.normalize(z + self.config.noise_std * torch.randn_like(z), dim=-1)
        x = z * self.input_scale
        return F.normalize(self.degrader(x, x, exclude_self=True), dim=-1)

    def restore(self, z_d: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """z_d -> z_r (normalised): queries from z_d, keys and values from the clean batch z
        (without the query's own row unless ``restore_from`` is "all")."""
        others = self.config.restore_from == "others"  # Alg. 1: from the other samples of the batch
        return F.normalize(self.restorer(z_d * self.input_scale, z * self.input_scale, exclude_self=others), dim=-1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of g on z, z_d and z_r (those the mode uses) and the soft labels ỹ."""
        mode = self.config.mode
        out = {"logits": self.classify(z)}
        z_d = self.degrade(z) if mode in ("dr", "d") else None
        if z_d is not None:
            out["logits_d"] = self.classify(z_d)
            out["soft_labels"] = soft_labels(labels, self.config.n_classes)
        if mode in ("dr", "r"):
            out["logits_r"] = self.classify(self.restore(z_d if z_d is not None else z, z))
        return out

    @torch.no_grad()
    def sample(self, z: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Augmented (embeddings, targets) pairs with dropout active: (z_d, ỹ) and/or (z_r, one-hot y).

        Targets are (n, n_classes) probability rows, so degraded samples carry soft labels.
        """
        was_training = self.training
        self.train()
        try:
            pairs = []
            z_d = self.degrade(z) if self.config.mode in ("dr", "d") else None
            if z_d is not None:
                pairs.append((z_d, soft_labels(labels, self.config.n_classes)))
            if self.config.mode in ("dr", "r"):
                z_r = self.restore(z_d if z_d is not None else z, z)
                pairs.append((z_r, F.one_hot(labels, self.config.n_classes).float()))
            return pairs
        finally:
            self.train(was_training)


def latentdr_loss(out: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(g(z), y) + CE(g(z_d), ỹ) + CE(g(z_r), y), with the terms the model's mode produced."""
    parts = {"ce": F.cross_entropy(out["logits"], labels)}
    if "logits_d" in out:
        parts["ce_d"] = soft_cross_entropy(out["logits_d"], out["soft_labels"])
    if "logits_r" in out:
        parts["ce_r"] = F.cross_entropy(out["logits_r"], labels)
    loss = sum(parts.values())
    return loss, {k: v.detach() for k, v in parts.items()}
