"""Stage-2 heads and their losses: pure tensors in, tensors out (no files, no CLI)."""

from vlaug.heads.box import BoxConfig, BoxHead, box_center, box_log_volume, box_loss, zero_shot_logits
from vlaug.heads.lads import LADSConfig, LADSHead, domain_directions, lads_loss
from vlaug.heads.latentdr import LatentDR, LatentDRConfig, latentdr_loss, soft_cross_entropy, soft_labels

__all__ = [
    "BoxConfig", "BoxHead", "box_center", "box_log_volume", "box_loss", "zero_shot_logits",
    "LADSConfig", "LADSHead", "domain_directions", "lads_loss",
    "LatentDR", "LatentDRConfig", "latentdr_loss", "soft_cross_entropy", "soft_labels",
]
