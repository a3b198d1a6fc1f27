"""Shared fixtures: tiny images drawn in tmp_path, and a helper to build embed configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlaug.embed import EmbedConfig


def write_image(path: Path, seed: int, size: int = 40) -> Path:
    """A small seeded image; the format follows the suffix."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    arr[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_class_folder(root: Path, classes=("cat", "dog", "fox"), n=4, suffix=".png") -> Path:
    for c_i, c in enumerate(classes):
        for k in range(n):
            write_image(root / c / f"{k:03d}{suffix}", seed=100 * c_i + k)
    return root


def make_domain_folder(root: Path, domains=("photo", "sketch"), classes=("cat", "dog"), n=3) -> Path:
    for d_i, d in enumerate(domains):
        for c_i, c in enumerate(classes):
            for k in range(n):
                write_image(root / d / c / f"{k}.jpg", seed=1000 * d_i + 100 * c_i + k)
    return root


def tiny_config(source, out, **kw) -> EmbedConfig:
    """An EmbedConfig for the tiny random-weight model, quiet and in-process."""
    base = dict(
        source=str(source), out=str(out), model="vlaug-tiny", pretrained="none", workers=0,
        batch_size=4, progress=False, dtype="float32",
    )
    base.update(kw)
    return EmbedConfig(**base)


@pytest.fixture
def class_folder(tmp_path) -> Path:
    return make_class_folder(tmp_path / "src")


@pytest.fixture
def domain_folder(tmp_path) -> Path:
    return make_domain_folder(tmp_path / "src")
