"""Augmenting methods: the linear probe on the training rows plus sampled rows.

``box``, ``dr`` and ``lads`` sample from a head trained by ``vlaug train-box``; ``gaussian``,
``mixup`` and ``xdomain-mix`` need no head. Each adds its rows block by block with the
block's own generator (:meth:`ProbeMethod.blocks`), so a streamed cache gives the same
rows on every pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlaug import augment
from vlaug.choices import CLASSES_PROMPT_SET
from vlaug.methods.registry import register
from vlaug.methods.base import EnsembleOptions, check_positive
from vlaug.methods.linear import ProbeMethod


@dataclass(frozen=True)
class AugmentOptions(EnsembleOptions):
    n_aug: int = 1  # sampled rows per training row

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "n_aug")


class SamplingMethod(ProbeMethod):
    """A probe method that adds ``n_aug`` rows per training row."""

    Options = AugmentOptions

    def extra_rows(self):
        return self.options.n_aug


@dataclass(frozen=True)
class BoxOptions(AugmentOptions):
    n_aug: int = 5  # samples per box (LARE: 3 for CIFAR-100, 5 for CUB, 40 for DomainNet)
    # text-anchored boxes: each sample also moves towards its class prompt, normalise(s + u·t_y),
    # u ~ U(0, anchor) (0: LARE's samples; see text-anchor)
    anchor: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.anchor < 0:
            raise ValueError(f"anchor == {self.anchor}, must be >= 0.")


@register
class Box(SamplingMethod):
    name = "box"
    summary = (
        "originals + `n_aug` uniform samples inside each training image's box (LARE stage 2); with "
        '`anchor=s` each sample also moves towards its class prompt as in `text-anchor` (`n_aug`: the '
        'paper uses 3, 5, 40)'
    )
    Options = BoxOptions
    head_kinds = ("box",)
    plots_box_volumes = True

    def augment(self, data, x, y, dom, generator):
        head = data.heads[self.head].module.to(data.device)
        rows, t = augment.box_samples(head, x, F.one_hot(y, data.n_classes).float(), self.options.n_aug, generator)
        if self.options.anchor > 0:
            rows = augment.toward_prompts(rows, t.argmax(1), data.text, self.options.anchor, generator)
        return rows, t

    def prompt_sets(self):
        return [CLASSES_PROMPT_SET] if self.options.anchor > 0 or self.ensemble > 0 else []


@register
class DR(ProbeMethod):
    name = "dr"
    summary = (
        'originals + degraded (soft labels) and restored (true labels) rows from trained LatentDR heads, '
        'dropout on, over `n_aug` shuffles'
    )
    Options = AugmentOptions
    head_kinds = ("dr-sa", "dr-pool")

    def extra_rows(self):
        return 2 * self.options.n_aug  # a degraded and a restored row per row and shuffle

    def augment(self, data, x, y, dom, generator):
        module = data.heads[self.head].module.to(data.device)
        with torch.random.fork_rng(devices=[]):  # dropout draws from the global generator
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            return augment.dr_samples(module, x, y, self.options.n_aug, generator=generator)


@register
class LADS(ProbeMethod):
    name = "lads"
    summary = 'originals + normalise(f_aug_k(x)) for each target domain'
    head_kinds = ("lads",)

    def extra_rows(self):
        return 8  # one per target domain; chunks are sized for up to 8

    def augment(self, data, x, y, dom, generator):
        head = data.heads[self.head].module.to(data.device)
        return augment.lads_samples(head, x, F.one_hot(y, data.n_classes).float())


@dataclass(frozen=True)
class GaussianOptions(AugmentOptions):
    sigma: float = 0.1  # noise norm: x + ε, ε ~ N(0, σ²/d · I)

    def __post_init__(self):
        super().__post_init__()
        if not self.sigma > 0:
            raise ValueError(f"sigma == {self.sigma}, must be > 0.")


@register
class Gaussian(SamplingMethod):
    name = "gaussian"
    summary = 'originals + x + ε, ‖ε‖ ≈ σ, re-normalised'
    Options = GaussianOptions

    def augment(self, data, x, y, dom, generator):
        o = self.options
        return augment.gaussian_noise(x, F.one_hot(y, data.n_classes).float(), o.n_aug, o.sigma, generator)


@dataclass(frozen=True)
class MixupOptions(AugmentOptions):
    alpha: float = 0.2  # λ ~ Beta(α, α)

    def __post_init__(self):
        super().__post_init__()
        if not self.alpha > 0:
            raise ValueError(f"alpha == {self.alpha}, must be > 0.")


@register
class Mixup(SamplingMethod):
    name = "mixup"
    summary = 'originals + latent Mixup, λ ~ Beta(α, α), soft labels'
    Options = MixupOptions
    streams = False  # pairs across the whole training set

    def augment(self, data, x, y, dom, generator):
        o = self.options
        return augment.latent_mixup(x, F.one_hot(y, data.n_classes).float(), o.n_aug, o.alpha, generator)


@register
class CrossDomainMix(SamplingMethod):
    name = "xdomain-mix"
    summary = (
        'originals + same-class interpolations across training domains (a latent analogue of CDGA), λ ~ '
        'U(0, 1); with one training domain it can only mix within it (same-class mixup), and the report '
        'warns'
    )
    streams = False  # partners across the whole training set

    def bind(self, feats, train_domains):
        if len(train_domains) < 2:
            return (f"xdomain-mix: one training domain ({', '.join(train_domains) or 'none'}), so it mixes rows of the "
                    "same class within that domain (plain same-class mixup), not across domains")
        return None

    def augment(self, data, x, y, dom, generator):
        return augment.cross_domain_mix(x, F.one_hot(y, data.n_classes).float(), y, dom, self.options.n_aug, generator)
