"""Stage 3 compute: zero-shot classification and the linear probe. Pure tensors.

The probe is multinomial logistic regression in torch, trained full-batch with L-BFGS
(strong-Wolfe line search) on soft targets:

    Σ_i  w_i · CE(x_i W + b, t_i)  +  (weight_decay / 2) · ||W||²      (w_i = 1/n by default)

which is scikit-learn's ``LogisticRegression(C=1 / (weight_decay · n))`` objective (up
to the overall scale) when targets are one-hot and weights are 1. The weight decay is
chosen on validation rows from a log-spaced grid (as CLIP_benchmark does), warm-starting
from the strongest regularisation; within a fit, the iteration count ("epoch") with the
best validation accuracy is kept (LARE: "the epoch was set to the maximum of the
validation data"). Ties in validation accuracy, within a fit and between weight decays,
go to the lower validation log-loss.

Rows come in blocks (:class:`Rows`): one block in memory, or blocks streamed from disk
for caches larger than memory, where every evaluation of the objective reads the cache
once and accumulates the gradient block by block - the same fit, in bounded memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlaug.zero_shot import TEMPERATURE, zero_shot_logits



@dataclass(frozen=True)
class ProbeConfig:
    """A trained probe's shape and how to turn its logits into probabilities."""

    embed_dim: int = 512
    n_classes: int = 2
    ensemble: float = 0.0  # weight of the zero-shot probabilities mixed into the probe's
    temperature: float = TEMPERATURE  # zero-shot logits = cos / temperature (for ensembles)
    # ensembles mix calibrated probabilities: the probe's logits are multiplied by logit_scale
    # (both values fitted on validation rows by temperature scaling; 1 and 0.01 uncalibrated)
    logit_scale: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.ensemble <= 1.0:
            raise ValueError(f"ensemble == {self.ensemble}, must be in [0, 1].")
        if not (self.temperature > 0 and self.logit_scale > 0):
            raise ValueError(f"temperature == {self.temperature} and logit_scale == {self.logit_scale}, must be > 0.")

    def to_dict(self) -> dict:
        return asdict(self)


class LinearProbe(nn.Module):
    """Logits x W + b; ``predict_proba`` mixes in zero-shot probabilities when ``ensemble`` > 0."""

    def __init__(self, config: ProbeConfig):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.embed_dim, config.n_classes)
        # class text embeddings, stored with the probe so that an ensemble is self-contained
        self.register_buffer("text", torch.zeros(config.n_classes, config.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.ensemble == 0:
            return self.linear(x).softmax(-1)
        p = (self.linear(x) * self.config.logit_scale).softmax(-1)
        lam = self.config.ensemble
        if lam > 0:
            zs = zero_shot_logits(x, self.text, self.config.temperature).softmax(-1)
            p = (1 - lam) * p + lam * zs
        return p


def calibrate_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 50) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 that minimises the mean log-loss of
    ``softmax(logits / T)`` on labelled rows. A 1-d convex problem in log T, solved by
    golden-section search over T in [1e-4, 1e4].

    An ensemble that mixes probabilities is only meaningful when both sides are calibrated:
    otherwise a probe whose logits happen to be large (weak weight decay) or small (strong)
    swamps or vanishes next to the other side, and the same weight λ means another mix on
    every seed.
    """
    logits, labels = logits.double(), labels.long()
    loss = lambda log_t: float(F.cross_entropy(logits / np.exp(log_t), labels))  # noqa: E731
    lo, hi = np.log(1e-4), np.log(1e4)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(steps):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(np.exp((lo + hi) / 2))


def weight_decay_grid(n: int = 8, low: float = 1e-6, high: float = 1e-1) -> list[float]:
    """Log-spaced grid, strongest regularisation first (for warm starts)."""
    return [float(v) for v in np.logspace(np.log10(high), np.log10(low), n)]


class Rows:
    """The rows a probe is fitted or scored on, as blocks of ``(x, targets, weights)``.

    ``targets`` is an (m,) integer label tensor or an (m, C) soft-target tensor; ``weights``
    an (m,) tensor of per-row weights (the objective sums weight · loss). In memory there is
    one block (:meth:`of`); for caches larger than memory, ``blocks()`` reads the rows from
    disk again on every call, so each pass of the optimiser costs one read of the cache.
    """

    def __init__(self, blocks: Callable[[], Iterable[tuple]], n_features: int, n_classes: int, n_rows: int,
                 device: torch.device | str = "cpu"):
        self.blocks, self.n_features, self.n_classes, self.n_rows = blocks, n_features, n_classes, n_rows
        self.device = torch.device(device)

    @classmethod
    def of(cls, x: torch.Tensor, targets: torch.Tensor, sample_weight: torch.Tensor | None = None,
           n_classes: int | None = None) -> "Rows":
        """Rows in memory. One-hot soft targets become integer labels (the faster kernel);
        without ``sample_weight`` every row weighs 1/n."""
        targets = as_labels(targets)
        c = n_classes or (targets.shape[1] if targets.dim() == 2 else int(targets.max()) + 1 if len(targets) else 1)
        w = sample_weight if sample_weight is not None else torch.full((len(x),), 1.0 / max(1, len(x)), device=x.device)
        block = [(x, targets, w)]
        return cls(lambda: block, x.shape[1], c, len(x), x.device)


def as_labels(targets: torch.Tensor) -> torch.Tensor:
    """Integer labels when every row of the (n, C) soft ``targets`` is one-hot, else ``targets``."""
    if targets.dim() == 2 and bool(((targets == 0) | (targets == 1)).all() and (targets.sum(1) == 1).all()):
        return targets.argmax(1)
    return targets


def _score(rows: Rows, W: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean log-loss) of ``x W + b`` on labelled rows (one pass)."""
    correct, loss, n = 0, 0.0, 0
    for x, y, _ in rows.blocks():
        logits = torch.addmm(b, x, W)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        n += len(y)
    return (correct / n, loss / n) if n else (float("nan"), float("nan"))


def _better(score: tuple[float, float], than: tuple[float, float] | None) -> bool:
    """Selection's order: higher validation accuracy, then (at equal accuracy) lower
    validation log-loss. Accuracy alone ties often on small validation sets (every value
    of a grid can score the same), and a tie kept the first candidate: the fewest
    iterations and the strongest weight decay, whatever the data. The log-loss ranks the
    tied candidates by how well they fit the validation rows."""
    return than is None or score[0] > than[0] or (score[0] == than[0] and score[1] < than[1])


def probe_objective(x, W, b, targets, sample_weight, weight_decay, anchor=None) -> torch.Tensor:
    """Σ_i w_i · CE(x_i W + b, t_i) + (weight_decay / 2)·‖W − anchor‖².

    ``targets``: (n,) integer labels or (n, C) soft targets (rows sum to 1).
    """
    ce = F.cross_entropy(torch.addmm(b, x, W), targets, reduction="none")
    reg = W if anchor is None else W - anchor
    return (sample_weight * ce).sum() + 0.5 * weight_decay * (reg * reg).sum()


def fit_probe(
    train: Rows,
    weight_decay: float,
    max_iter: int = 200,
    eval_every: int = 10,
    val: Rows | None = None,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    regularize_towards: torch.Tensor | None = None,
    patience: int = 5,
    tolerance_grad: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fit W (d, C) and b (C,) by L-BFGS on the ``train`` rows.

    Every evaluation of the objective is one pass over ``train.blocks()`` (gradients
    accumulate block by block; the penalty is added once), so streamed rows give the
    in-memory result up to the order of floating-point sums.

    With ``val`` rows (integer labels), the weights after the block of ``eval_every``
    iterations with the best validation accuracy (ties: the lower validation log-loss) are
    returned (``info['iterations']`` says how many), and the fit stops once ``patience``
    blocks in a row have not improved them;
    without them, the weights after ``max_iter`` (or convergence: the largest gradient
    entry below ``tolerance_grad``; scikit-learn's lbfgs stops at 1e-4 on the same scale).
    """
    d, c, device = train.n_features, train.n_classes, train.device
    W = (init[0].detach().clone(memory_format=torch.contiguous_format) if init else torch.zeros(d, c, device=device)).requires_grad_(True)
    b = (init[1].detach().clone() if init else torch.zeros(c, device=device)).requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=eval_every, max_eval=eval_every * 3, history_size=10,
                            line_search_fn="strong_wolfe", tolerance_grad=tolerance_grad, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        total = 0.0
        for i, (x, t, w) in enumerate(train.blocks()):
            loss = probe_objective(x, W, b, t, w, weight_decay if i == 0 else 0.0, regularize_towards)
            loss.backward()
            total = total + loss.detach()
        return total

    best, best_score = (W.detach().clone(), b.detach().clone(), 0), None
    done, previous = 0, None
    while done < max_iter:
        loss = float(opt.step(closure))  # the loss at the start of this block
        done += eval_every
        if val is not None and val.n_rows:
            with torch.no_grad():
                score = _score(val, W, b)
            if _better(score, best_score):
                best, best_score = (W.detach().clone(), b.detach().clone(), done), score
            elif done - best[2] >= patience * eval_every:
                break
        if previous is not None and abs(previous - loss) <= 1e-7 * max(1.0, abs(loss)):
            break  # converged: a whole block no longer moved the loss
        previous = loss
    if best_score is None:
        return W.detach().clone(), b.detach().clone(), {"val_accuracy": float("nan"), "val_log_loss": float("nan"),
                                                        "iterations": done}
    return best[0], best[1], {"val_accuracy": best_score[0], "val_log_loss": best_score[1], "iterations": best[2]}


def select_weight_decay(
    train: Rows,
    val: Rows,
    grid: list[float],
    max_iter: int = 200,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    regularize_towards: torch.Tensor | None = None,
) -> tuple[dict, list[dict]]:
    """Fit each weight decay of ``grid`` (warm-started along it, strongest first) and keep
    the fit with the best validation accuracy, ties broken by the lower validation
    log-loss (see :func:`_better`).

    Returns:
        the best ``{"weight_decay", "iterations", "val_accuracy", "val_log_loss", "W", "b"}``
        and the search.
    """
    search, warm, best = [], init, None
    for wd in grid:
        W, b, info = fit_probe(train, wd, max_iter, val=val, init=warm, regularize_towards=regularize_towards)
        warm = (W, b)
        search.append({"weight_decay": wd, **info})
        if best is None or _better((info["val_accuracy"], info["val_log_loss"]), (best["val_accuracy"], best["val_log_loss"])):
            best = {"weight_decay": wd, **info, "W": W, "b": b}
    best["iterations"] = max(best["iterations"], 10)
    return best, search


# ----------------------------------------------------------------------------- reweighting


def _compact(raw: torch.Tensor) -> torch.Tensor:
    """Group ids 0..G-1 for the groups that have rows (no empty group holds weight)."""
    return torch.unique(raw, return_inverse=True)[1]


def kmeans(x: torch.Tensor, k: int, iterations: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cluster index per row of ``x`` by Lloyd's k-means (k-means++ seeding from ``generator``)."""
    n = len(x)
    k = min(k, n)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(1).values ** 2
        nxt = int(torch.multinomial(d2 / d2.sum() if d2.sum() > 0 else torch.ones(n) / n, 1, generator=generator))
        centres.append(x[nxt])
    centres = torch.stack(centres)
    for _ in range(iterations):
        assign = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            if (assign == j).any():
                centres[j] = x[assign == j].mean(0)
    return torch.cdist(x, centres).argmin(1)


def group_ids(labels: torch.Tensor, losses: torch.Tensor, domains: torch.Tensor | None, scheme: str, n_groups: int = 4,
              x: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Groups for reweighting, numbered 0..G-1 with no empty group.

    ``groupdro``: one group per class present (per class and training domain when
    ``domains`` is given). ``seed-category``: the rows of each training domain (all rows
    when ``domains`` is None, e.g. with augmented rows, which have none) split into
    ``n_groups`` seed categories by the rank of their current loss (Mei et al.).
    ``seed-category-kmeans``: the same, by k-means of the embeddings ``x`` instead of loss rank.
    """
    if scheme == "groupdro":
        return _compact(labels if domains is None else labels * (int(domains.max()) + 1) + domains)
    key = torch.zeros_like(labels) if domains is None else domains
    groups = torch.empty_like(labels)
    for k in key.unique():
        rows = torch.nonzero(key == k).flatten()
        if scheme == "seed-category-kmeans":
            groups[rows] = int(k) * n_groups + kmeans(x[rows], n_groups, generator=generator).to(labels.device)
        else:
            order = rows[losses[rows].argsort()]
            groups[order] = int(k) * n_groups + torch.arange(len(order), device=labels.device) * n_groups // max(1, len(order))
    return _compact(groups)


def update_group_weights(q: torch.Tensor, group_losses: torch.Tensor, eta: float = 0.01) -> torch.Tensor:
    """q ← q · exp(η · loss_group), normalised to sum 1."""
    q = q * torch.exp(eta * group_losses)
    return q / q.sum()


def sample_weights_from_groups(groups: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row weights: each group's weight q_g shared by its rows (sums to 1)."""
    counts = torch.bincount(groups, minlength=len(q)).clamp(min=1).float()
    return q[groups] / counts[groups]


def fit_reweighted(
    x: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    weight_decay: float,
    scheme: str,
    domains: torch.Tensor | None = None,
    *,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    steps: int = 500,
    period: int = 100,
    eta: float = 0.01,
    lr: float = 0.01,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A probe trained on reweighted rows, from ``init`` (the selected probe), by ``steps``
    full-batch Adam steps on Σ_i w_i·CE_i + (weight_decay / 2)·‖W‖².

    At every step each group's weight follows its mean loss, q ← q·exp(η·loss_g)
    (normalised; a row weighs q_g / |g|). ``seed-category`` schemes regroup every
    ``period`` steps by the current losses (or k-means) and reset q to uniform, as Mei et
    al. do; ``groupdro`` keeps its groups and its q. L-BFGS cannot follow an objective that
    changes at every step, hence the first-order optimiser.

    Returns:
        W, b and ``{"groups", "group_weights", "steps", "period", "eta", "lr"}``.
    """
    d, c = x.shape[1], targets.shape[1]
    W = (init[0].detach().clone() if init else torch.zeros(d, c, device=x.device)).requires_grad_(True)
    b = (init[1].detach().clone() if init else torch.zeros(c, device=x.device)).requires_grad_(True)
    opt = torch.optim.Adam([W, b], lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def row_losses():
        return -(targets * (x @ W + b).log_softmax(-1)).sum(-1)

    with torch.no_grad():
        groups = group_ids(labels, row_losses(), domains, scheme, x=x, generator=gen)
    q = torch.full((int(groups.max()) + 1,), 1.0 / (int(groups.max()) + 1), device=x.device)
    for step in range(steps):
        losses = row_losses()
        with torch.no_grad():
            n_groups = len(q)
            group_loss = torch.zeros(n_groups, device=x.device).index_add_(0, groups, losses.detach())
            group_loss /= torch.bincount(groups, minlength=n_groups).clamp(min=1)
            q = update_group_weights(q, group_loss, eta)
        objective = (sample_weights_from_groups(groups, q) * losses).sum() + 0.5 * weight_decay * (W * W).sum()
        opt.zero_grad()
        objective.backward()
        opt.step()
        if scheme != "groupdro" and (step + 1) % period == 0 and step + 1 < steps:
            with torch.no_grad():  # regroup by the current model, and start the weights afresh
                groups = group_ids(labels, row_losses(), domains, scheme, x=x, generator=gen)
            q = torch.full((int(groups.max()) + 1,), 1.0 / (int(groups.max()) + 1), device=x.device)
    return W.detach(), b.detach(), {"groups": len(q), "group_weights": q.tolist(), "steps": steps, "period": period,
                                    "eta": eta, "lr": lr}


# ----------------------------------------------------------------------------- library use


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                     grid_size: int = 8, max_iter: int = 200, n_classes: int | None = None) -> LinearProbe:
    """The linear probe of ``vlaug probe -m linear`` on tensors: multinomial logistic
    regression, the weight decay chosen on the validation rows from ``grid_size``
    log-spaced values (1e-1 ... 1e-6).

    Args:
        x, x_val: (n, d) embeddings (L2-normalised, as in a cache); y, y_val: (n,) labels.

    Returns:
        a :class:`LinearProbe` (``predict_proba(x)`` -> (n, C)); its ``selection_`` holds
        the chosen weight decay and its validation accuracy.
    """
    x, x_val = x.detach(), x_val.detach()  # e.g. samples of a head that is still training: the probe is fitted apart
    c = n_classes or int(max(int(y.max()), int(y_val.max()))) + 1
    best, _ = select_weight_decay(Rows.of(x, y, n_classes=c), Rows.of(x_val, y_val, n_classes=c),
                                  weight_decay_grid(grid_size), max_iter)
    probe = LinearProbe(ProbeConfig(embed_dim=x.shape[1], n_classes=c)).to(x.device)
    with torch.no_grad():
        probe.linear.weight.copy_(best["W"].T)
        probe.linear.bias.copy_(best["b"])
    probe.selection_ = {k: v for k, v in best.items() if k not in ("W", "b")}
    return probe.eval()
