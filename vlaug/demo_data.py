"""The bundled demo data set: 5 shape classes x 3 domains, drawn from a seeded generator.

``data/shapes/`` in the repository holds the images this module draws
(``python data/generate.py`` re-creates them). The domains differ in style the way
DomainNet's do: ``photo`` (shaded shapes on textured backgrounds, JPEG), ``sketch``
(black outlines on white, PNG) and ``painting`` (flat colours over brush strokes, JPEG).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "cross", "square", "star", "triangle")
DOMAINS = ("painting", "photo", "sketch")
SIZE = 64


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        pts = [(math.cos(angle + k * math.pi / 2 + math.pi / 4), math.sin(angle + k * math.pi / 2 + math.pi / 4)) for k in range(4)]
    elif kind == "triangle":
        pts = [(math.cos(angle + k * 2 * math.pi / 3 - math.pi / 2), math.sin(angle + k * 2 * math.pi / 3 - math.pi / 2)) for k in range(3)]
    elif kind == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = angle + k * math.pi / 5 - math.pi / 2
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif kind == "cross":
        w = 0.33
        base = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        c, s = math.cos(angle), math.sin(angle)
        pts = [(x * c - y * s, x * s + y * c) for x, y in base]
    else:
        raise ValueError(kind)
    return [(cx + r * x, cy + r * y) for x, y in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, geom, fill, outline, width: int) -> None:
    cx, cy, r, angle = geom
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        pts = _polygon(kind, cx, cy, r, angle)
        if fill is not None:
            draw.polygon(pts, fill=fill)
        if outline is not None:
            draw.line(pts + [pts[0]], fill=outline, width=width, joint="curve")


def draw_image(kind: str, domain: str, rng: np.random.Generator) -> Image.Image:
    """One 64x64 RGB image of shape ``kind`` in the style of ``domain``."""
    s = SIZE
    geom = (s / 2 + rng.uniform(-8, 8), s / 2 + rng.uniform(-8, 8), rng.uniform(14, 22), rng.uniform(0, 2 * math.pi))
    color = tuple(int(v) for v in rng.integers(40, 230, 3))
    if domain == "photo":
        # smooth gradient background with sensor-like noise; shaded shape with a soft shadow
        yy, xx = np.mgrid[0:s, 0:s] / s
        c0, c1 = rng.integers(60, 200, 3), rng.integers(60, 200, 3)
        bg = c0 * (1 - xx[..., None] * 0.5 - yy[..., None] * 0.5) + c1 * (xx[..., None] * 0.5 + yy[..., None] * 0.5)
        bg = np.clip(bg + rng.normal(0, 6, bg.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(bg, "RGB")
        shadow = Image.new("L", (s, s), 0)
        _draw_shape(ImageDraw.Draw(shadow), kind, (geom[0] + 3, geom[1] + 3, geom[2], geom[3]), 140, None, 1)
        img.paste((20, 20, 20), mask=shadow.filter(ImageFilter.GaussianBlur(2)))
        _draw_shape(ImageDraw.Draw(img), kind, geom, color, tuple(max(0, c - 50) for c in color), 2)
        return img.filter(ImageFilter.SMOOTH)
    if domain == "sketch":
        img = Image.new("RGB", (s, s), (250, 250, 245))
        draw = ImageDraw.Draw(img)
        for _ in range(2):  # two slightly offset strokes, as a hand would draw
            jitter = (geom[0] + rng.uniform(-1.5, 1.5), geom[1] + rng.uniform(-1.5, 1.5), geom[2] * rng.uniform(0.95, 1.05), geom[3])
            _draw_shape(draw, kind, jitter, None, (30, 30, 30), int(rng.integers(1, 3)))
        return img
    if domain == "painting":
        img = Image.new("RGB", (s, s), tuple(int(v) for v in rng.integers(150, 255, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(25):  # brush strokes
            x, y = rng.uniform(0, s, 2)
            w, h = rng.uniform(6, 20), rng.uniform(2, 6)
            draw.ellipse([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(100, 255, 3)))
        _draw_shape(draw, kind, geom, color, (0, 0, 0), 3)
        return img.quantize(colors=12, dither=Image.Dither.NONE).convert("RGB").filter(ImageFilter.ModeFilter(3))
    raise ValueError(f"unknown domain {domain!r}")


def generate(out: str | Path, n_per_class: int = 20, seed: int = 0) -> int:
    """Write ``out/DOMAIN/CLASS/NNN.{jpg,png}``; returns the number of images written."""
    out = Path(out)
    n = 0
    for d_i, domain in enumerate(DOMAINS):
        for c_i, kind in enumerate(CLASSES):
            rng = np.random.default_rng([seed, d_i, c_i])
            folder = out / domain / kind
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n_per_class):
                img = draw_image(kind, domain, rng)
                if domain == "sketch":
                    img.save(folder / f"{k:03d}.png", optimize=True)
                else:
                    img.save(folder / f"{k:03d}.jpg", quality=85)
                n += 1
    return n
