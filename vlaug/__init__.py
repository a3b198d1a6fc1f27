"""vlaug: latent augmentation for classifiers on frozen vision-language embeddings.

Stage 1 (``vlaug embed``) turns images into a Parquet feature cache; later stages read
that cache. The public API re-exports the functions a library user needs.
"""

from vlaug._version import __version__

from vlaug.errors import (
    CacheError,
    CacheLockedError,
    CacheMismatchError,
    CheckpointError,
    EmbedFailuresError,
    EncoderError,
    SourceError,
    UsageError,
    VlaugError,
)

__all__ = [
    "__version__",
    "CacheError",
    "CacheLockedError",
    "CacheMismatchError",
    "CheckpointError",
    "EmbedFailuresError",
    "EncoderError",
    "SourceError",
    "UsageError",
    "VlaugError",
    "EmbedConfig",
    "embed_source",
    "read_cache",
    "read_manifest",
    "load_source",
    "load_encoder",
    "load_head",
    "TrainConfig",
    "train_head",
    "fit_linear_probe",
    "save_probe",
    "load_probe",
]


def __getattr__(name):
    # Lazy imports keep `import vlaug` (and `vlaug --help`) fast: torch loads only when used.
    if name in ("EmbedConfig", "embed_source"):
        from vlaug import embed as _embed

        return getattr(_embed, name)
    if name in ("read_cache", "read_manifest"):
        from vlaug import cache as _cache

        return getattr(_cache, name)
    if name == "load_source":
        from vlaug.sources import load_source

        return load_source
    if name == "load_encoder":
        from vlaug.encoders import load_encoder

        return load_encoder
    if name == "load_head":
        from vlaug.checkpoint import load_head

        return load_head
    if name == "fit_linear_probe":
        from vlaug.probe import fit_linear_probe

        return fit_linear_probe
    if name in ("save_probe", "load_probe"):
        from vlaug import checkpoint as _checkpoint

        return getattr(_checkpoint, name)
    if name in ("TrainConfig", "train_head"):
        from vlaug import train as _train

        return getattr(_train, name)
    raise AttributeError(f"module 'vlaug' has no attribute {name!r}")
