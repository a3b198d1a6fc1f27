"""Simulated latents for tests, benchmarks, examples and the demo: small generators with a
known structure (pure numpy; torch tensors where a caller trains on them directly).

:func:`shifted_domains` is the shift benchmark's CLIP-like embedding space with domain
shift (``benchmarks/shift_benchmark.py`` runs every method on it; ``vlaug demo`` probes
it). An image of class y in domain k is normalise(a·g_img + β·(u_y + κ_k·Σ_c ξ_c u_c) +
γ·(v_y^k + κ_v·Σ_c ζ_c v_c^k) + δ·m_k + σ·ε), with ξ, ζ ~ N(0, 1), ε ~ N(0, I/d) and every
direction orthonormal unless d is too small. u_c are the class directions the text tower
shares (class prompt t_c = normalise(b·g_txt + sqrt(1-b²)·u_c + jitter)); v_c^k are
image-only "appearance" directions, v_c^k = normalise(ρ_k·v_c^photo + sqrt(1-ρ_k²)·w_c^k);
m_k is the domain's style direction, partly made of the photo appearance directions
(fraction λ_m), which is what biases a probe trained on photo. The prompt set of domain k
is normalise(t_c + τ·e_k + jitter), e_k = normalise(ρ_dt·m_k + sqrt(1-ρ_dt²)·r_k).
g_img · g_txt = ρ_gap sets the modality gap. The defaults of :class:`SimParams` give CLIP
ViT-B/32's published geometry (the benchmark's docstring cites the figures).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

def clip_like(n: int, d: int, n_classes: int, seed: int = 0):
    """(x (n, d) float32, labels, class prompts (C, d)): CLIP-like unit-norm latents. Class
    prompts share a direction (prompt-prompt cosine ≈ 0.75), images share a modality-gap
    direction, image-to-own-prompt cosine ≈ 0.3; the prompts depend only on (d, C)."""
    rt = np.random.default_rng(123)
    g = rt.standard_normal(d)
    g /= np.linalg.norm(g)
    gap = rt.standard_normal(d)
    gap -= (gap @ g) * g
    gap /= np.linalg.norm(gap)
    e = rt.standard_normal((n_classes, d))
    text = 0.87 * g + 0.5 * e / np.linalg.norm(e, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    centres = rt.standard_normal((n_classes, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    r = np.random.default_rng(seed)
    y = r.integers(0, n_classes, n)
    x = 0.3 * text[y] + 0.6 * gap + 0.35 * centres[y] + 0.6 * r.standard_normal((n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), y, text.astype(np.float32)


def planted(n: int, seed: int, d: int = 16, minority: float = 0.08):
    """(x, labels, rare mask): class 0 with a rare pattern of ``minority`` of its rows."""
    r = np.random.default_rng(seed)
    y = r.integers(0, 2, n)
    rare = (y == 0) & (r.random(n) < minority)
    x = 0.35 * r.standard_normal((n, d))
    x[:, 0] += np.where(y == 0, 1.0, -1.0)
    x[rare, 0] = -0.6 + 0.35 * r.standard_normal(rare.sum())
    x[rare, 1] += 2.0
    return torch.tensor(x / 3, dtype=torch.float32), torch.tensor(y), torch.tensor(rare)


# ----------------------------------------------------------------------------- domain shift

DOMAINS = ("photo", "sketch", "painting", "clipart")
TRAIN_DOMAIN = "photo"
TARGET_DOMAINS = tuple(d for d in DOMAINS if d != TRAIN_DOMAIN)
TEMPLATES = {"photo": "a photo of a {}.", "sketch": "a sketch of a {}.", "painting": "a painting of a {}.",
             "clipart": "a clipart of a {}."}


@dataclass(frozen=True)
class SimParams:
    """One difficulty setting of the simulator (the model is in the module docstring)."""

    n_classes: int = 16
    d: int = 512
    n_per_class: int = 150  # rows per class and domain
    a: float = 0.62  # weight of the image cone direction g_img
    b: float = 0.90  # weight of the text cone direction g_txt in a class prompt (prompt-prompt cos ≈ b²)
    rho_gap: float = 0.35  # g_img · g_txt: the modality gap
    beta: float = 0.23  # semantic (text-aligned) class signal in images
    kappa: dict = field(default_factory=lambda: {"photo": 0.55, "sketch": 0.60, "painting": 0.55, "clipart": 0.50})
    gamma: float = 0.20  # image-only appearance class signal
    kappa_v: float = 0.25  # per-direction noise of the appearance signal
    rho_app: dict = field(default_factory=lambda: {"photo": 1.0, "sketch": 0.10, "painting": 0.25, "clipart": 0.15})
    delta: float = 0.35  # norm of each domain's style shift m_k
    lambda_m: float = 0.55 # fraction of m_k made of photo appearance directions (what biases the probe)
    sigma: float = 0.25  # isotropic noise norm
    tau: float = 0.25  # shift of a domain prompt set along its text direction e_k
    rho_dt: float = 0.6  # correlation of the text direction e_k with the image style shift m_k
    text_jitter: float = 0.05  # per-prompt noise norm
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



def _directions(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """k unit directions in R^d: orthonormal when k <= d, else random (nearly orthogonal)."""
    g = rng.standard_normal((d, k))
    if k <= d:
        q, _ = np.linalg.qr(g)
        return q.T
    return (g / np.linalg.norm(g, axis=0)).T


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def shifted_domains(p: SimParams) -> dict:
    """Image embeddings (n, d) with labels and domains, and text prompt sets (C, d) each
    (the model is in the module docstring)."""
    rng = np.random.default_rng(p.seed)
    C, d, K = p.n_classes, p.d, len(DOMAINS)
    basis = _directions(rng, d, 2 + C + C + C * K + K + K)
    take = iter(range(len(basis)))
    pick = lambda n: basis[[next(take) for _ in range(n)]]
    e0, e1 = pick(2)
    g_img = e0
    g_txt = p.rho_gap * e0 + np.sqrt(1 - p.rho_gap**2) * e1
    u = pick(C)  # shared class directions
    v_photo = pick(C)  # photo appearance directions
    w = {k: pick(C) for k in DOMAINS}  # fresh appearance directions per domain
    m_perp = pick(K)
    r_perp = pick(K)
    v, m, e = {}, {}, {}
    for i, k in enumerate(DOMAINS):
        rho = p.rho_app[k]
        v[k] = _unit(rho * v_photo + np.sqrt(max(0.0, 1 - rho**2)) * w[k])
        omega = rng.standard_normal(C)
        style_app = _unit(omega @ v_photo)
        m[k] = _unit(p.lambda_m * style_app + np.sqrt(1 - p.lambda_m**2) * m_perp[i])
        e[k] = _unit(p.rho_dt * m[k] + np.sqrt(1 - p.rho_dt**2) * r_perp[i])

    xs, ys, ds = [], [], []
    for k in DOMAINS:
        y = np.repeat(np.arange(C), p.n_per_class)
        n = len(y)
        sem = u[y] + p.kappa[k] * rng.standard_normal((n, C)) @ u
        app = v[k][y] + p.kappa_v * rng.standard_normal((n, C)) @ v[k]
        noise = rng.standard_normal((n, d)) / np.sqrt(d)
        x = p.a * g_img + p.beta * sem + p.gamma * app + p.delta * m[k] + p.sigma * noise
        xs.append(_unit(x))
        ys.append(y)
        ds += [k] * n
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys)
    dom = np.asarray(ds)

    jitter = lambda: p.text_jitter * rng.standard_normal((C, d)) / np.sqrt(d)
    classes_text = _unit(p.b * g_txt + np.sqrt(1 - p.b**2) * u + jitter())
    texts = {"classes": classes_text.astype(np.float32)}
    for k in DOMAINS:
        texts[k] = _unit(classes_text + p.tau * e[k] + jitter()).astype(np.float32)
    return {"x": x, "y": y, "domain": dom, "texts": texts, "classes": [f"class{c:02d}" for c in range(C)]}


def write_cache(path: str | Path, sim: dict, p: SimParams, source: str = "vlaug.simulate (simulated)") -> Path:
    """The simulated embeddings of :func:`shifted_domains` as a vlaug feature cache (one
    prompt set per domain), written with vlaug's own writer."""
    from vlaug import cache

    x, y, dom, classes = sim["x"], sim["y"], sim["domain"], sim["classes"]
    ids = [f"{dom[i]}/{classes[y[i]]}/{i:06d}" for i in range(len(x))]
    rows = {"id": ids, "path": [f"simulated/{i}.jpg" for i in ids], "label": y.tolist(),
            "class_name": [classes[c] for c in y], "domain": dom.tolist(), "split": [""] * len(x)}
    cache.write_part(path, "part-00000.parquet", rows, x, "float32")
    cache.write_texts(path, sim["texts"], classes)
    manifest = cache.CacheManifest(
        model="simulated-clip-vit-b-32", pretrained="none", embed_dim=p.d, dtype="float32", classes=list(classes),
        domains=sorted(DOMAINS), templates=["a photo of a {}."], prompt_sets={k: [TEMPLATES[k]] for k in DOMAINS},
        parts=["part-00000.parquet"], n_images=len(x), seed=p.seed, source=source,
        layout="manifest", n_inputs=len(x), complete=True)
    cache.write_manifest(path, manifest)
    return Path(path)
