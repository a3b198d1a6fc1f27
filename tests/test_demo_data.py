from pathlib import Path

import numpy as np
from PIL import Image

from vlaug import demo_data
from vlaug.demo import bundled_data_dir
from vlaug.sources import load_source

REPO_DATA = Path(__file__).resolve().parent.parent / "data" / "shapes"


def test_bundled_data_is_what_the_generator_draws(tmp_path):
    n = demo_data.generate(tmp_path / "shapes")
    assert n == 300
    drawn = sorted(p.relative_to(tmp_path / "shapes").as_posix() for p in (tmp_path / "shapes").rglob("*.*"))
    bundled = sorted(p.relative_to(REPO_DATA).as_posix() for p in REPO_DATA.rglob("*.*"))
    assert drawn == bundled
    for rel in ("sketch/star/004.png", "photo/circle/000.jpg"):
        a = np.asarray(Image.open(tmp_path / "shapes" / rel), dtype=np.int16)
        b = np.asarray(Image.open(REPO_DATA / rel), dtype=np.int16)
        assert np.abs(a - b).mean() < 2.0  # same drawing; JPEG encoders may differ by a level or two


def test_bundled_data_layout_and_size():
    assert bundled_data_dir() == REPO_DATA
    src = load_source(REPO_DATA)
    assert src.layout == "domain-class"
    assert src.classes == list(demo_data.CLASSES) and src.domains == list(demo_data.DOMAINS)
    assert len(src.records) == 300
    assert sum(p.stat().st_size for p in REPO_DATA.rglob("*") if p.is_file()) < 5 * 2**20


def test_domains_look_different():
    rng = np.random.default_rng(0)
    means = {d: np.asarray(demo_data.draw_image("star", d, rng), dtype=float).mean() for d in demo_data.DOMAINS}
    assert means["sketch"] > 200  # white paper
    assert len({round(m) for m in means.values()}) == 3
