"""Shared fixtures: tiny images drawn in tmp_path, and a helper to build embed configs."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlaug.embed import EmbedConfig

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    """The suite runs the same in any launch context.

    - A shell that ignores SIGINT (``trap '' INT``, ``nohup``, a background job of a script)
      hands that to pytest and, through exec, to every process a test starts: a test that
      interrupts its child with Ctrl-C would find it deaf. A Python-level handler is reset
      to the default at exec, so the children start with the ordinary SIGINT.
    - The processes tests start (``python -m vlaug``, the plot worker) import the vlaug under
      test, whatever is installed and wherever pytest was started from.
    - matplotlib writes its configuration and font cache in a folder of the run's own (an
      absent or read-only $HOME otherwise leaves a folder in /tmp per process), removed at
      the end.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    config._vlaug_mpl = tempfile.mkdtemp(prefix="vlaug-tests-mpl-")
    os.environ["MPLCONFIGDIR"] = config._vlaug_mpl


def pytest_unconfigure(config):
    if getattr(config, "_vlaug_mpl", None):
        shutil.rmtree(config._vlaug_mpl, ignore_errors=True)


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


def synthetic_clusters(n_per_class=30, d=32, n_classes=4, noise=0.3, seed=0, domains=("",)):
    """Separable unit-norm clusters around random class centres (which double as text embeddings).

    Returns (x (n, d) float32, labels (n,), domains (n,) str, centres (n_classes, d)).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    xs, ys, ds = [], [], []
    for dom_i, dom in enumerate(domains):
        shift = rng.standard_normal(d) * 0.2 * dom_i  # a domain shift, as between photo and sketch
        for c in range(n_classes):
            x = centres[c] + shift + noise * rng.standard_normal((n_per_class, d)) / np.sqrt(d) * 3
            xs.append(x)
            ys += [c] * n_per_class
            ds += [dom] * n_per_class
    x = np.concatenate(xs).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.asarray(ys), np.asarray(ds), centres.astype(np.float32)


def write_synthetic_cache(path, model="synthetic", n_per_class=30, d=32, n_classes=4, seed=0, domains=("photo", "sketch"),
                          prompt_sets=("photo", "sketch")):
    """A feature cache of synthetic clusters written with vlaug's own cache writer."""
    from vlaug import cache

    x, y, doms, centres = synthetic_clusters(n_per_class, d, n_classes, seed=seed, domains=domains)
    classes = [f"class{c}" for c in range(n_classes)]
    rows = {"id": [f"img{i}" for i in range(len(x))], "path": [f"/x/{i}.jpg" for i in range(len(x))],
            "label": y.tolist(), "class_name": [classes[c] for c in y], "domain": doms.tolist(), "split": [""] * len(x)}
    cache.write_part(path, "part-00000.parquet", rows, x, "float32")
    rng = np.random.default_rng(seed + 1)
    texts = {"classes": centres}
    for name in prompt_sets:
        t = centres + 0.3 * rng.standard_normal(centres.shape).astype(np.float32)
        texts[name] = t / np.linalg.norm(t, axis=1, keepdims=True)
    cache.write_texts(path, texts, classes)
    m = cache.CacheManifest(model=model, pretrained="none", embed_dim=d, dtype="float32", classes=classes,
                            domains=sorted(set(domains) - {""}), templates=["a photo of a {}."],
                            prompt_sets={n: [f"a {n} of a {{}}."] for n in prompt_sets}, parts=["part-00000.parquet"],
                            n_images=len(x), seed=0, complete=True)
    cache.write_manifest(path, m)
    return path
