"""Metrics by hand: accuracies, alignment / uniformity, and a box head's statistics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlaug import metrics
from vlaug.heads import BoxConfig


def test_accuracies_by_hand():
    pred, labels = torch.tensor([0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 0, 2, 2, 0])
    assert metrics.accuracy(pred, labels) == pytest.approx(4 / 6)
    # recalls: class 0 1/3, class 1 1/1, class 2 2/2
    assert metrics.balanced_accuracy(pred, labels) == pytest.approx((1 / 3 + 1 + 1) / 3)
    assert metrics.accuracy(pred[:0], labels[:0]) is None and metrics.balanced_accuracy(pred[:0], labels[:0]) is None


def test_alignment_and_uniformity_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    same = torch.tensor([0, 0, 1, 1])
    assert metrics.alignment(x, same, generator=torch.Generator().manual_seed(0)) == pytest.approx(0.0)
    split = torch.tensor([0, 1, 0, 1])  # every same-class pair is orthogonal: ‖a − b‖² = 2
    assert metrics.alignment(x, split, generator=torch.Generator().manual_seed(0)) == pytest.approx(2.0)
    # pairs i != j: a third are identical (d² = 0), two thirds orthogonal (d² = 2)
    expected = math.log(1 / 3 + 2 / 3 * math.exp(-4))
    assert metrics.uniformity(x, max_pairs=200000, generator=torch.Generator().manual_seed(0)) == pytest.approx(expected, abs=0.02)


def test_box_stats_rank_classes_by_their_boxes():
    d, classes = 8, ["small", "large"]
    x = F.normalize(torch.randn(20, d, generator=torch.Generator().manual_seed(0)), dim=-1)
    y = torch.arange(20) % 2

    class Scaled(torch.nn.Module):  # an f_Box whose boxes are 50x larger for class-1 rows
        config = BoxConfig().bind(d, 2)

        def forward(self, z):
            side = torch.where(y.unsqueeze(1) == 0, 0.01, 0.5)
            return F.normalize(z - side, dim=-1), F.normalize(z + side, dim=-1)

        def eval(self):
            return self

    text = F.normalize(torch.randn(2, d, generator=torch.Generator().manual_seed(1)), dim=-1)
    stats = metrics.box_stats(Scaled(), [(x, y)], classes, text, top=1)
    assert [r["class"] for r in stats["per_class"]] == ["large", "small"] and stats["per_class"][0]["rank"] == 1
    assert stats["n_rows"] == 20 and len(stats["per_dimension"]) == d
    assert all(r["classes"] == ["large"] for r in stats["per_dimension"])
    lv = {r["class"]: r["mean_log_volume"] for r in stats["per_class"]}
    assert lv["large"] - lv["small"] > d * np.log(10)  # sides 50x longer along every dimension (after normalising)
    assert set(stats["zero_shot_accuracy"]) == {"points", "lo", "hi", "center", "samples"}
