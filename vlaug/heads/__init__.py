"""Stage-2 heads and their losses: pure tensors in, tensors out (no files, no CLI).

:data:`HEADS` is the registry of head kinds: each kind's config class (its options,
defaults, checks and training schedule) and module class. A config is built without
knowing the cache and bound to it (``config.bind(embed_dim, n_classes)``) by the stage
that trains the head.
"""

from __future__ import annotations

from dataclasses import fields

from vlaug.choices import HEAD_KINDS
from vlaug.heads.box import BoxConfig, BoxHead, box_center, box_log_volume, box_loss
from vlaug.heads.lads import LADSConfig, LADSHead, domain_directions, lads_loss
from vlaug.heads.latentdr import LatentDR, LatentDRConfig, latentdr_loss, soft_cross_entropy, soft_labels
from vlaug.zero_shot import zero_shot_logits

HeadConfig = BoxConfig | LatentDRConfig | LADSConfig
# kind -> (config class, module class); the kinds are vlaug.choices.HEAD_KINDS
HEADS = {
    "box": (BoxConfig, BoxHead),
    "dr-sa": (LatentDRConfig, LatentDR),
    "dr-pool": (LatentDRConfig, LatentDR),
    "lads": (LADSConfig, LADSHead),
}  # tests/test_heads.py checks that its keys are HEAD_KINDS


def head_kind(config: HeadConfig) -> str:
    """The kind (``box``, ``dr-sa``, ``dr-pool``, ``lads``) a head config builds."""
    if isinstance(config, LatentDRConfig):
        return f"dr-{config.kind}"
    return "box" if isinstance(config, BoxConfig) else "lads"


def make_head_config(kind: str, **options) -> HeadConfig:
    """The config of a ``kind`` head with ``options`` (its fields; the rest keep their defaults).

    Raises:
        ValueError: an unknown kind, an option the kind does not have, or a value its checks refuse.
    """
    if kind not in HEADS:
        raise ValueError(f"head kind {kind!r}, must be one of {HEAD_KINDS}.")
    cls = HEADS[kind][0]
    known = {f.name for f in fields(cls)} - {"embed_dim", "n_classes", "kind"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{kind} heads have no option {unknown}; they take {sorted(known)}.")
    if cls is LatentDRConfig:
        options["kind"] = kind.removeprefix("dr-")
    return cls(**options)


__all__ = [
    "HEADS", "HeadConfig", "head_kind", "make_head_config",
    "BoxConfig", "BoxHead", "box_center", "box_log_volume", "box_loss", "zero_shot_logits",
    "LADSConfig", "LADSHead", "domain_directions", "lads_loss",
    "LatentDR", "LatentDRConfig", "latentdr_loss", "soft_cross_entropy", "soft_labels",
]
