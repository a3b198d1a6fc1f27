"""Augmenters: box sampling, Gaussian noise, latent Mixup and cross-domain mixing."""

import pytest
import torch
import torch.nn.functional as F

from vlaug.augment import sample_boxes


def test_sample_boxes():
    lo = torch.tensor([[0.0, 1.0, -1.0], [2.0, 2.0, 2.0]])
    hi = torch.tensor([[1.0, 0.0, -1.0], [3.0, 4.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    s = sample_boxes(lo, hi, 1000, g, renormalize=False)
    assert s.shape == (2, 1000, 3)
    low, high = torch.minimum(lo, hi).unsqueeze(1), torch.maximum(lo, hi).unsqueeze(1)
    assert ((s >= low) & (s <= high)).all()
    # uniform per dimension: the mean is the box centre, and samples spread over the whole side
    torch.testing.assert_close(s.mean(1), (lo + hi) / 2, atol=0.05, rtol=0)
    assert (s[1, :, 1].max() - s[1, :, 1].min()) > 1.9
    a = sample_boxes(lo, hi, 5, torch.Generator().manual_seed(1))
    b = sample_boxes(lo, hi, 5, torch.Generator().manual_seed(1))
    c = sample_boxes(lo, hi, 5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2, 5))
    with pytest.raises(ValueError):
        sample_boxes(lo, hi, 0)


def test_baseline_augmenters():
    from vlaug.augment import cross_domain_mix, gaussian_noise, latent_mixup

    x = F.normalize(torch.randn(60, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    y = torch.arange(60) % 3
    t = F.one_hot(y, 3).float()
    dom = (torch.arange(60) // 30)
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    xn, tn = gaussian_noise(x, t, 2, 0.1, g())
    assert xn.shape == (120, 8) and torch.equal(tn, t.repeat(2, 1))
    assert ((xn - x.repeat(2, 1)).norm(dim=-1).mean() - 0.1).abs() < 0.03
    xm, tm = latent_mixup(x, t, 1, 0.2, g())
    assert torch.allclose(tm.sum(1), torch.ones(60))
    assert torch.equal(xm, latent_mixup(x, t, 1, 0.2, g())[0])
    # Beta(0.2, 0.2) puts about 27 % of its mass in [0.1, 0.9]
    mixed_pairs = tm.max(1).values < 0.9
    assert 0.1 < mixed_pairs.float().mean() < 0.35
    xc, tc = cross_domain_mix(x, t, y, dom, 1, g())
    assert torch.equal(tc, t)  # same-class partners keep the label
    torch.testing.assert_close(xc.norm(dim=-1), torch.ones(60))


def test_cross_domain_partners_are_same_class_other_domain_and_uniform():
    from vlaug.augment import cross_domain_partners

    # class 0 in domains 0/1/2, class 1 only in domain 1 (fallback: other class-1 rows), class 2 a single row
    labels = torch.tensor([0] * 9 + [1] * 4 + [2])
    domains = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2] + [1] * 4 + [0])
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # order must not matter
    labels, domains = labels[perm], domains[perm]
    p = cross_domain_partners(labels, domains, 3000, torch.Generator().manual_seed(1))
    assert p.shape == (3000, 14)
    assert torch.equal(labels[p], labels.expand_as(p))
    for i in range(14):
        if labels[i] == 0:
            assert (domains[p[:, i]] != domains[i]).all()
            counts = torch.bincount(p[:, i], minlength=14)[labels == 0]
            assert (counts[domains[labels == 0] != domains[i]] > 400).all()  # 6 candidates, ~500 each
        elif labels[i] == 1:
            assert (p[:, i] != i).all() and len(p[:, i].unique()) == 3
        else:
            assert (p[:, i] == i).all()
