"""Metrics: accuracies, alignment / uniformity of features (LatentDR eqs. 10, 11), and the
statistics of a trained box head (LARE's Tables 4 and 5). Pure tensors."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from vlaug.augment import sample_boxes
from vlaug.heads.box import BoxHead, box_center, box_log_volume
from vlaug.zero_shot import zero_shot_logits


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Top-1 accuracy as a fraction; None for no rows."""
    return float((pred == labels).float().mean()) if len(labels) else None


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Mean over the classes present of each class's recall; None for no rows."""
    if not len(labels):
        return None
    recalls = [float((pred[labels == c] == c).float().mean()) for c in labels.unique()]
    return sum(recalls) / len(recalls)


def alignment(x: torch.Tensor, labels: torch.Tensor, max_pairs: int = 20000, generator=None) -> float:
    """E over same-class pairs of ‖f(x) − f(y)‖² (lower: classes tighter)."""
    i = torch.randint(len(x), (max_pairs,), generator=generator)
    j = torch.randint(len(x), (max_pairs,), generator=generator)
    same = (labels.cpu()[i] == labels.cpu()[j]) & (i != j)
    if not same.any():
        return float("nan")
    i, j = i[same].to(x.device), j[same].to(x.device)
    return float(((x[i] - x[j]) ** 2).sum(-1).mean())


def uniformity(x: torch.Tensor, t: float = 2.0, max_pairs: int = 20000, generator=None) -> float:
    """log E over pairs of exp(−t‖f(x) − f(y)‖²) (lower: features spread more evenly)."""
    i = torch.randint(len(x), (max_pairs,), generator=generator).to(x.device)
    j = torch.randint(len(x), (max_pairs,), generator=generator).to(x.device)
    keep = i != j
    d2 = ((x[i[keep]] - x[j[keep]]) ** 2).sum(-1)
    return float(torch.log(torch.exp(-t * d2).mean()))


@torch.no_grad()
def box_stats(
    head: BoxHead,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    classes: list[str],
    text: torch.Tensor,
    top: int = 3,
    seed: int = 0,
) -> dict:
    """LARE's Tables 4 and 5 for a trained box head over the rows of ``batches``, plus diagnostics.

    Returns per-class mean box log-volume with its rank (1 = largest boxes), for each
    dimension the ``top`` classes whose boxes have the longest mean side along it, the
    mean corner inner product, and the zero-shot accuracy (against ``text``) of the
    points, corners, centres and of 5 uniform samples per box: if the samples' accuracy
    is far below the points', the boxes have grown past their classes (raise --alpha).
    Accumulates per class, so its memory does not grow with the number of rows.
    """
    head.eval()
    t = head.config.temperature
    n_classes, d = len(classes), head.config.embed_dim
    count = torch.zeros(n_classes, dtype=torch.float64)
    lv_sum = torch.zeros(n_classes, dtype=torch.float64)
    side_sum = torch.zeros(n_classes, d, dtype=torch.float64)
    correct = {k: 0 for k in ("points", "lo", "hi", "center", "samples")}
    n_rows, inner = 0, 0.0
    gen = None
    for x, y in batches:
        gen = gen or torch.Generator(device=x.device).manual_seed(seed)
        lo, hi = head(x)
        yc = y.cpu()
        count.index_add_(0, yc, torch.ones(len(yc), dtype=torch.float64))
        lv_sum.index_add_(0, yc, box_log_volume(lo, hi).double().cpu())
        side_sum.index_add_(0, yc, (hi - lo).abs().double().cpu())
        hit = lambda p, target: int((zero_shot_logits(p, text, t).argmax(1) == target).sum())  # noqa: E731
        samples = sample_boxes(lo, hi, 5, gen).reshape(-1, d)
        correct["points"] += hit(x, y)
        correct["lo"] += hit(lo, y)
        correct["hi"] += hit(hi, y)
        correct["center"] += hit(box_center(lo, hi), y)
        correct["samples"] += hit(samples, y.repeat_interleave(5)) / 5
        inner += float((lo * hi).sum())
        n_rows += len(x)
    present = [c for c in range(n_classes) if count[c] > 0]
    mean_lv = {c: float(lv_sum[c] / count[c]) for c in present}
    ranked = sorted(present, key=lambda c: -mean_lv[c])
    per_class = [{"class": classes[c], "label": c, "n": int(count[c]), "mean_log_volume": mean_lv[c],
                  "rank": ranked.index(c) + 1} for c in present]
    class_sides = (side_sum[present] / count[present].unsqueeze(1)).numpy()  # (n_present, d)
    longest = np.argsort(-class_sides, axis=0)[:top].T  # (d, top)
    per_dim = [{"dim": j, "classes": [classes[present[i]] for i in longest[j]],
                "mean_side": [float(class_sides[i, j]) for i in longest[j]]} for j in range(d)]
    return {
        "n_rows": n_rows,
        "mean_log_volume": float(lv_sum.sum() / max(1, n_rows)),
        "mean_corner_inner_product": inner / max(1, n_rows),
        "zero_shot_accuracy": {k: v / max(1, n_rows) for k, v in correct.items()},
        "per_class": sorted(per_class, key=lambda r: r["rank"]),
        "per_dimension": per_dim,
    }


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (ties kept): the
    methods that are best at some trade-off of the two accuracies."""
    front = []
    for i, (a, b) in enumerate(points):
        if not any((c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i):
            front.append(i)
    return front
