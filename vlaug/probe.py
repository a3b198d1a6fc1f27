"""Stage 3 compute: zero-shot classification and the linear probe. Pure tensors.

The probe is multinomial logistic regression in torch, trained full-batch with L-BFGS on
soft targets:

    Σ_i  w_i · CE(x_i W + b, t_i)  +  (weight_decay / 2) · ||W||²      (w_i = 1/n by default)

which is scikit-learn's ``LogisticRegression(C=1 / (weight_decay · n))`` objective (up
to the overall scale) when targets are one-hot and weights are 1. The weight decay is
chosen on validation rows from a log-spaced grid (as CLIP_benchmark does): every value of
the grid is fitted at once, as one batched problem (:func:`fit_probes`: one pass over the
rows evaluates all of them), each to convergence; the best validation accuracy wins, ties
going to the lower validation log-loss.

Rows come in blocks (:class:`Rows`): one block in memory (float32, or float16 converted
piece by piece inside the objective), or blocks streamed from disk for caches larger than
memory, where every evaluation of the objective reads the cache once and accumulates the
gradient block by block - the same fit, in bounded memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlaug.devices import threads_for
from vlaug.discriminant import mahalanobis
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
    # input-adaptive ensemble (vlaug.methods.robust.Adaptive): the zero-shot weight rises from
    # `ensemble` to `gate_max` with the input's Mahalanobis distance d² from the training rows,
    # λ(x) = ensemble + (gate_max − ensemble)·sigmoid((d²(x) − gate_center) / gate_width);
    # gate_max 0: no gate (the fixed weight `ensemble`)
    gate_max: float = 0.0
    gate_center: float = 0.0
    gate_width: float = 1.0
    # Tip-Adapter's cache model (vlaug.methods.fewshot): logits += cache_alpha·exp(−cache_beta·(1 − x̂·Kᵀ))·V over
    # n_keys keys K (n_keys, d) with their one-hot labels V (n_keys, C); 0 keys: none
    n_keys: int = 0
    cache_alpha: float = 0.0
    cache_beta: float = 1.0
    # CLIP-Adapter's residual bottleneck: the linear layer reads normalize(r·A(x̂) + (1 − r)·x̂), A two bias-free
    # layers d → adapter_hidden → d, each followed by a ReLU, r = adapter_ratio; 0: none
    adapter_hidden: int = 0
    adapter_ratio: float = 0.2

    def __post_init__(self):
        if not 0.0 <= self.ensemble <= 1.0:
            raise ValueError(f"ensemble == {self.ensemble}, must be in [0, 1].")
        if not 0.0 <= self.gate_max <= 1.0 or not self.gate_width > 0:
            raise ValueError(f"gate_max == {self.gate_max} and gate_width == {self.gate_width}: must be in [0, 1] and > 0.")
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
        if config.gate_max > 0:  # the gate's Gaussian model of the training rows: class means, shared precision
            self.register_buffer("gate_means", torch.zeros(config.n_classes, config.embed_dim))
            self.register_buffer("gate_precision", torch.zeros(config.embed_dim, config.embed_dim))
        if config.n_keys:
            self.register_buffer("cache_keys", torch.zeros(config.n_keys, config.embed_dim))
            self.register_buffer("cache_values", torch.zeros(config.n_keys, config.n_classes))
        if config.adapter_hidden:
            self.adapter = nn.Sequential(nn.Linear(config.embed_dim, config.adapter_hidden, bias=False), nn.ReLU(),
                                         nn.Linear(config.adapter_hidden, config.embed_dim, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.adapter_hidden:
            logits = self.linear(adapted_features(x, self.adapter[0].weight, self.adapter[2].weight, c.adapter_ratio))
        else:
            logits = self.linear(x)
        if c.n_keys:
            logits = logits + c.cache_alpha * cache_logits(x, self.cache_keys, self.cache_values, c.cache_beta)
        return logits

    @torch.no_grad()
    def zero_shot_weight(self, x: torch.Tensor) -> torch.Tensor | float:
        """The weight λ of the zero-shot probabilities for each row of ``x``: (n, 1) with a
        gate, else the fixed ``ensemble``."""
        c = self.config
        if c.gate_max == 0:
            return float(c.ensemble)
        d2 = mahalanobis(x.float(), self.gate_means, self.gate_precision)
        return (c.ensemble + (c.gate_max - c.ensemble) * torch.sigmoid((d2 - c.gate_center) / c.gate_width))[:, None]

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.zero_shot_weight(x)
        if not torch.is_tensor(lam) and lam == 0:  # no zero-shot side (an int 0 too)
            return self(x).softmax(-1)
        p = (self(x) * self.config.logit_scale).softmax(-1)
        zs = zero_shot_logits(x, self.text, self.config.temperature).softmax(-1)
        return (1 - lam) * p + lam * zs


def adapted_features(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, ratio: float) -> torch.Tensor:
    """CLIP-Adapter's features: normalize(r·A(x̂) + (1 − r)·x̂), A = ReLU(ReLU(x̂ downᵀ) upᵀ) with
    bias-free ``down`` (h, d) and ``up`` (d, h): the one definition its training
    (vlaug.methods.fewshot) and the saved probe both use."""
    f = F.normalize(x.float(), dim=-1)
    return F.normalize(ratio * torch.relu(torch.relu(f @ down.T) @ up.T) + (1 - ratio) * f, dim=-1)


def cache_logits(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """Tip-Adapter's cache term exp(−β(1 − x̂·Kᵀ))·V for (n, d) rows ``x`` (normalised here), keys
    (k, d) and values (k, C): (n, C), in pieces of rows whose affinities hold at most PIECE_VALUES."""
    f = F.normalize(x.float(), dim=-1)
    step = max(1, PIECE_VALUES // max(1, len(keys)))
    parts = [torch.exp(-beta * (1 - f[i:i + step] @ keys.T)) @ values for i in range(0, len(f), step)]
    return torch.cat(parts) if parts else f.new_zeros(0, values.shape[1])


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
    """The rows a probe is fitted or scored on, as blocks of ``(x, targets, weights)`` or
    ``(x, targets, weights, index)``.

    ``targets`` is an (m,) integer label tensor or an (m, C) soft-target tensor; ``weights``
    an (m,) tensor of per-row weights (the objective sums weight · loss), or None for rows
    that are only scored. Rows shared by several training sets (the seeds of a method, see
    :meth:`vlaug.methods.linear.ProbeMethod.fit_seeds`) carry (m, S) weights, one column per
    set (``columns`` = S; a row outside a set weighs 0 in its column): each problem of
    :func:`fit_probes` is fitted on one column, and one pass over the rows serves them all.
    A block that serves some of the sets only says so in a fifth element,
    ``(x, targets, weights, index or None, owner)``: a column j (rows a method built for
    one seed, (m,) weights), a span ``(lo, hi)`` (weights (m, hi − lo) for columns
    lo … hi − 1) or a sorted integer tensor of k columns (weights (m, k)); only the
    problems of those columns are evaluated on it. ``x`` may be float16: it stays so in
    memory and is converted to float32 piece by piece inside the objective. With ``index``, the block's rows are
    ``x[index]`` and ``x`` is a whole resident cache (never copied). In memory there is one
    block (:meth:`of`); for caches larger than memory, ``blocks()`` reads the rows from disk
    again on every call, so each pass of the optimiser costs one read of the cache.
    """

    def __init__(self, blocks: Callable[[], Iterable[tuple]], n_features: int, n_classes: int, n_rows: int,
                 device: torch.device | str = "cpu", columns: int = 1, groups: int = 0):
        self.blocks, self.n_features, self.n_classes, self.n_rows = blocks, n_features, n_classes, n_rows
        self.device, self.columns = torch.device(device), columns
        # rows only scored, in groups whose scores are averaged (vlaug.methods.base.RunData.val_groups): the
        # blocks' weight slot holds each row's group id in 0 … groups − 1; 0: no groups
        self.groups = groups

    @classmethod
    def of(cls, x: torch.Tensor, targets: torch.Tensor, sample_weight: torch.Tensor | None = None,
           n_classes: int | None = None, index: torch.Tensor | None = None) -> "Rows":
        """Rows in memory (``x[index]`` when ``index`` is given). One-hot soft targets become
        integer labels (the faster kernel); without ``sample_weight`` every row weighs 1/n."""
        targets = as_labels(targets)
        n = len(targets)
        c = n_classes or (targets.shape[1] if targets.dim() == 2 else int(targets.max()) + 1 if n else 1)
        w = sample_weight if sample_weight is not None else torch.full((n,), 1.0 / max(1, n), device=x.device)
        block = [(x, targets, w) if index is None else (x, targets, w, index)]
        return cls(lambda: block, x.shape[1], c, n, x.device)


def as_labels(targets: torch.Tensor) -> torch.Tensor:
    """Integer labels when every row of the (n, C) soft ``targets`` is one-hot, else ``targets``."""
    if targets.dim() == 2 and bool(((targets == 0) | (targets == 1)).all() and (targets.sum(1) == 1).all()):
        return targets.argmax(1)
    return targets


# The objective works on pieces of rows whose logits (rows x problems x classes) and float32
# features (rows x d) each hold at most this many values (16 MB), whatever the block size: it
# bounds the temporaries while keeping matrix products large.
PIECE_VALUES = 2**22
def row_pieces(rows: Rows, width: int, owners: bool = False) -> Iterable[tuple]:
    """``rows`` as float32 ``(x, targets, weights)`` pieces sized for ``width`` logits per
    row; with ``owners``, ``(x, targets, weights, owner)`` (see :class:`Rows`)."""
    step = int(np.clip(PIECE_VALUES // max(1, width, rows.n_features), 256, 65536))
    for block in rows.blocks():
        x, t, w = block[:3]
        index = block[3] if len(block) > 3 else None
        owner = (block[4] if len(block) > 4 else None,) if owners else ()
        for i in range(0, len(t), step):
            j = min(len(t), i + step)
            xs = x[index[i:j]] if index is not None else x[i:j]
            yield xs.float(), t[i:j], None if w is None else w[i:j], *owner


def _stacked(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P·C, d) weights (each problem's Wᵀ, one above the other) and (P·C,) biases of P
    problems ``theta`` (P, d + 1, C). Kept transposed: the gradient's product, gᵀ·x into a
    (P·C, d) sum, is several times faster than xᵀ·g when P·C is small (a probe's one or two
    problems still running at the end of a fit; see :func:`_logits`)."""
    p, d1, c = theta.shape
    return theta[:, :-1].transpose(1, 2).reshape(p * c, d1 - 1), theta[:, -1].reshape(p * c)


# Logits of at most this many columns (P problems x C classes) are computed as (Wᵀ·xᵀ)ᵀ: for
# a skinny product that order was 2-3x faster (MKL, 1 thread, 2,000-6,000 rows, d = 512:
# 7 columns 2.9 -> 1.1 ms, 28 columns 3.1 -> 2.3 ms), equal at 56 and slower at 160.
SKINNY_LOGITS = 32


def _logits(x: torch.Tensor, Wt: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x·W + b, (m, P·C), for weights kept transposed (``Wt`` (P·C, d), :func:`_stacked`)."""
    if len(Wt) <= SKINNY_LOGITS:
        return torch.addmm(b.unsqueeze(1), Wt, x.T).T.contiguous()
    return torch.addmm(b, x, Wt.T)


def _target_logits(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(m, P): each row's logit of its label (integer ``t``) or its targets' mean logit (soft)."""
    if t.dim() == 1:
        return z.gather(2, t.view(-1, 1, 1).expand(-1, z.shape[1], 1)).squeeze(2)
    return torch.einsum("mpc,mc->mp", z, t)


def _objectives(rows: Rows, theta: torch.Tensor, weight_decay: torch.Tensor, anchor: torch.Tensor | None,
                threads: int | None = None, columns: torch.Tensor | None = None,
                gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`probe_objective` of P problems at once, and its gradient, in one pass over ``rows``.

    ``theta`` (P, d + 1, C) holds each problem's W (first d rows) and b (last row);
    ``weight_decay`` (P,); ``columns`` (P,): the weight column of ``rows`` each problem is
    fitted on (rows with several columns). Returns the losses (P,) and the gradients
    (P, d + 1, C), computed in closed form: d/dz CE(z, t) = softmax(z) − t. ``threads``:
    intra-op threads for a problem large enough to share (:func:`vlaug.devices.threads_for`).
    ``gram``: a (columns, d + 2, d + 2) float64 tensor to which the pass adds, for each
    weight column, Σ [x, 1, 1]ᵀ[x, 1, 1] over its rows among about PRECONDITION_ROWS rows
    spread over ``rows`` (the last entry counts them; see :func:`_preconditioners`), or a
    (1, d + 2, d + 2) one for every row.
    """
    p, d1, c = theta.shape
    with threads_for(rows.n_rows * (d1 - 1) * p * c, theta.device, threads):
        return _objectives_pass(rows, theta, weight_decay, anchor, columns, gram)


def _objectives_pass(rows, theta, weight_decay, anchor, columns, gram=None):
    p, d1, c = theta.shape
    W, b = _stacked(theta)
    loss = torch.zeros(p, device=theta.device)
    # row-major sums (zeros_like would copy the strides of a one-problem W, a transposed view: a
    # product into a column-major sum was 5x slower)
    gW, gb = torch.zeros(W.shape, device=W.device), torch.zeros_like(b)
    stride = max(1, rows.n_rows // PRECONDITION_ROWS)
    for x, t, w, owner in row_pieces(rows, p * c, owners=True):
        if gram is not None:
            _add_moments(gram, x[::stride], w[::stride], owner, rows.columns)
        if columns is None:  # one weight column: every problem
            _accumulate(x, t, w.unsqueeze(1) if w.dim() == 1 else w, W, b, loss, gW, gb)
            continue
        owned = _owned(owner, rows.columns)
        if torch.is_tensor(owned):  # a set of columns, sorted
            inside = torch.isin(columns, owned)
            weights = lambda cols: w[:, torch.searchsorted(owned, cols)]  # noqa: E731
        else:
            lo, hi = owned
            inside = (columns >= lo) & (columns < hi)
            weights = lambda cols, lo=lo: w.unsqueeze(1) if w.dim() == 1 else w[:, cols - lo]  # noqa: E731
        if bool(inside.all()):
            _accumulate(x, t, weights(columns), W, b, loss, gW, gb)
            continue
        mine = inside.nonzero().flatten()  # the block's rows serve these problems alone
        if len(mine):
            mine_W, mine_b = _stacked(theta[mine])
            part_loss, part_gW, part_gb = (torch.zeros(len(mine), device=theta.device),
                                           torch.zeros(mine_W.shape, device=W.device), torch.zeros_like(mine_b))
            _accumulate(x, t, weights(columns[mine]), mine_W, mine_b, part_loss, part_gW, part_gb)
            loss.index_add_(0, mine, part_loss)
            gW.view(p, c, d1 - 1).index_add_(0, mine, part_gW.view(-1, c, d1 - 1))
            gb.view(p, c).index_add_(0, mine, part_gb.view(-1, c))
    reg = theta[:, :-1] if anchor is None else theta[:, :-1] - anchor
    loss += 0.5 * weight_decay * (reg * reg).sum((1, 2))
    grad = torch.cat([gW.view(p, c, d1 - 1).transpose(1, 2) + weight_decay.view(-1, 1, 1) * reg,
                      gb.view(p, 1, c)], 1)
    return loss, grad


def _owned(owner, n_columns: int):
    """The weight columns a block serves (see :class:`Rows`): a span ``(lo, hi)``, or a
    sorted tensor of columns."""
    if owner is None:
        return 0, n_columns
    return (owner, owner + 1) if isinstance(owner, int) else owner


def _add_moments(gram: torch.Tensor, x: torch.Tensor, w: torch.Tensor, owner, n_columns: int) -> None:
    """Add Σ [x, 1, 1]ᵀ[x, 1, 1] over the rows of ``x`` that weigh > 0 in column j to
    ``gram[j]``, for each column j of the rows' ``owner`` (see :class:`Rows`); one ``gram``
    for several columns: every row, once."""
    xt = torch.cat([x, torch.ones(len(x), 2, device=x.device)], 1)
    if len(gram) == 1 and n_columns > 1:
        gram[0] += (xt.T @ xt).to(gram.device, gram.dtype)
        return
    owned = _owned(owner, n_columns)
    cols = owned.tolist() if torch.is_tensor(owned) else range(*owned)
    w = w.unsqueeze(1) if w.dim() == 1 else w
    for i, j in enumerate(cols):
        inside = w[:, min(i, w.shape[1] - 1)] > 0
        part = xt if bool(inside.all()) else xt[inside]
        gram[j] += (part.T @ part).to(gram.device, gram.dtype)


def _accumulate(x, t, weights, Wt, b, loss, gWt, gb) -> None:
    """Add the weighted losses (to ``loss`` (P,)) and gradients (to ``gWt``, (P·C, d), and
    ``gb``, laid out as :func:`_stacked`'s) of the rows ``x`` with targets ``t`` under P
    problems ``Wt``, ``b``; ``weights`` (m, 1) or (m, P)."""
    p, c = len(loss), len(b) // len(loss)
    z = _logits(x, Wt, b).view(len(x), p, c)
    top = z.amax(2, keepdim=True)
    target = _target_logits(z, t)
    e = z.sub_(top).exp_()  # in place of the logits
    total = e.sum(2)
    loss += (weights * (top.squeeze(2) + total.log() - target)).sum(0)  # log-sum-exp − the target's logit
    g = e.div_(total.unsqueeze(2))  # softmax
    if t.dim() == 1:
        g.scatter_add_(2, t.view(-1, 1, 1).expand(-1, p, 1), torch.full((len(x), p, 1), -1.0, device=g.device))
    else:
        g -= t.unsqueeze(1)
    g = g.mul_(weights.unsqueeze(2)).view(len(x), p * c)
    gWt.addmm_(g.T, x)
    gb += g.sum(0)


def validation_scores(rows: Rows, theta: torch.Tensor) -> list[tuple[float, float]]:
    """(accuracy, mean log-loss) of each of P problems ``theta`` on labelled rows (one pass);
    with ``rows.groups``, the mean over the groups of each group's."""
    p, _, c = theta.shape
    W, b = _stacked(theta)
    correct, loss, n = torch.zeros(p, device=theta.device), torch.zeros(p, device=theta.device), 0
    if rows.groups:  # each group's accuracy and log-loss, then their mean (counts per group: equal hits, equal scores)
        g = rows.groups
        correct, loss = torch.zeros(g, p, device=theta.device), torch.zeros(g, p, device=theta.device)
        counts = torch.zeros(g, device=theta.device)
    for x, y, w in row_pieces(rows, p * c):
        z = _logits(x, W, b).view(len(x), p, c)
        if rows.groups:
            correct.index_add_(0, w, (z.argmax(2) == y[:, None]).float())
            loss.index_add_(0, w, z.logsumexp(2) - _target_logits(z, y))
            counts.index_add_(0, w, torch.ones(len(y), device=theta.device))
            n += len(y)
            continue
        correct += (z.argmax(2) == y[:, None]).sum(0)
        loss += (z.logsumexp(2) - _target_logits(z, y)).sum(0)
        n += len(y)
    if not n:
        return [(float("nan"), float("nan"))] * p
    if rows.groups:  # in float64, rounded: equal means of other hit counts compare equal (ties go to the log-loss)
        mean = lambda v: [round(x, 12) for x in (v.double() / counts.double()[:, None]).mean(0).tolist()]  # noqa: E731
        return list(zip(mean(correct), mean(loss)))
    return [(a / n, v / n) for a, v in zip(correct.tolist(), loss.tolist())]


def is_better(score: tuple[float, float], than: tuple[float, float] | None) -> bool:
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


# L-BFGS stops once the largest gradient entry is below this (scikit-learn's lbfgs stops at
# 1e-4 on the same objective scale; on small-scale features 1e-4 stops before convergence)
TOLERANCE_GRAD = 1e-5
# ... and below this fraction of λ·max|W| (without an anchor: the regulariser's largest gradient entry).
# At weak weight decays the objective is nearly flat along the directions the rows do not pin
# down (nearly separable rows), so an absolute test passes far from the minimiser: from zero
# weights at λ = 1e-7 it passed after 1 to 25 iterations, 13 % to 400 % (relative distance)
# from the minimiser, and a fit warm-started at 1e-7 from the 1e-6 probe (the grid's extension)
# passed it without moving. Measured on the shift benchmark's tuning caches (all five
# settings, against scikit-learn's lbfgs in float64 at tol 1e-12): with the relative test every
# fit of the grid and of 1e-7 ends within 0.5 % of the minimiser (2.4 % at 1e-7 on `small`, where
# float32 stops resolving the loss; 1e-2 was no closer), for about 1.2x to 1.5x the grid's time;
# without it, 0.7 % to 1.8 % at 1e-6 and the errors above at 1e-7
# (benchmarks/weak_decay_convergence.py). The distance bound ||θ − θ*|| ≤ ||g|| / λ is why the
# test scales with λ.
RELATIVE_TOLERANCE = 0.1
# the relative test's smallest tolerance (λ = 0, or weights near zero): about float32's
# resolution of a gradient entry
RELATIVE_FLOOR = 1e-9


# A backtracking step whose predicted decrease of the loss, −step·gᵀd, is below this fraction
# of the loss stops the line search: float32 sums cannot resolve it (about 2 units in the last
# place), and a problem there has converged as far as float32 goes (it stops, as if no step
# decreased the loss). Without it such a problem would keep halving its step, a pass over the
# rows each, until the backtracking gave up.
LOSS_RESOLUTION = 2.0**-22


def _inverse_hessian_times(S: torch.Tensor, Y: torch.Tensor, MY: torch.Tensor, valid: torch.Tensor, g: torch.Tensor,
                           Mg: torch.Tensor) -> torch.Tensor:
    """H·g for the L-BFGS inverse-Hessian estimate H of each of A problems, started from
    γM (M: a preconditioner, :func:`_preconditioners`), in the compact form of Byrd, Nocedal
    and Schnabel (1994) - the two-loop recursion's result in a few batched products instead
    of 4m small operations per problem:

        H = γM + [S  γMY] [[R⁻ᵀ(D + γYᵀMY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]] [Sᵀ; γYᵀM],

    R = the upper triangle of SᵀY, D its diagonal, γ = sᵀy / yᵀMy of the newest pair (the
    plain form, M = I, of L-BFGS run on the variables M^(-1/2)·θ). ``S``, ``Y`` (A, m, n)
    hold the pairs oldest first, ``MY`` their M·y, ``valid`` (A, m) which are stored (an
    empty slot has zero vectors and a unit diagonal in R, so it adds nothing); ``Mg`` = M·g.
    The m × m algebra runs in float64.
    """
    a = torch.bmm(S, g.unsqueeze(2)).squeeze(2).double()  # Sᵀg
    yg = torch.bmm(Y, Mg.unsqueeze(2)).squeeze(2).double()  # YᵀMg
    sy = torch.bmm(S, Y.transpose(1, 2)).double()  # (SᵀY)_ij = s_i·y_j
    yy = torch.bmm(Y, MY.transpose(1, 2)).double()  # YᵀMY
    newest = valid[:, -1]
    gamma = torch.where(newest, sy[:, -1, -1] / yy[:, -1, -1].clamp(min=1e-300), torch.ones_like(sy[:, -1, -1]))
    eye = torch.diag_embed((~valid).double())
    R = torch.triu(sy) + eye
    D = torch.diag_embed(torch.diagonal(sy, dim1=1, dim2=2))
    r1 = torch.linalg.solve_triangular(R, a.unsqueeze(2), upper=True)  # R⁻¹Sᵀg
    inner = torch.bmm(D + gamma.view(-1, 1, 1) * yy, r1) - gamma.view(-1, 1, 1) * yg.unsqueeze(2)
    top = torch.linalg.solve_triangular(R.transpose(1, 2), inner, upper=False)
    coef_s, coef_y = top.squeeze(2).to(g.dtype), (-gamma.view(-1, 1) * r1.squeeze(2)).to(g.dtype)
    return gamma.to(g.dtype).view(-1, 1) * Mg + torch.bmm(coef_s.unsqueeze(1), S).squeeze(1) + torch.bmm(coef_y.unsqueeze(1), MY).squeeze(1)


# The preconditioner's estimate of the features' second moments uses about this many rows
# (evenly spread over the training rows, read in the first evaluation of the objective; for a
# batch, over all of its rows: see _preconditioners).
PRECONDITION_ROWS = 32768
# A batch keeps one (d + 1) x (d + 1) preconditioner per weight column and weight decay while
# they hold at most this many values (128 MB: 72 at d = 512); beyond, one per weight decay
# from the moments of every row, gathered once, so that their memory no longer grows with the
# number of weight columns (seeds x methods): the same minima, by paths that differ slightly
# from fits one at a time.
PRECONDITIONER_VALUES = 2**25


def _preconditioners(gram: torch.Tensor, weight_decays: list[float], n_classes: int) -> torch.Tensor:
    """One (d + 1, d + 1) preconditioner per weight decay: M = (Σ/C + λD + δI)⁻¹, where Σ
    is the second-moment matrix E[x̃x̃ᵀ] of the rows' features with a constant 1 appended
    (x̃ = [x, 1]: the bias), ``gram`` (d + 2, d + 2) as :func:`_objectives` accumulates it
    for a weight column (each problem's from its own rows: a batch of problems follows the
    same path as each problem fitted alone, while the batch holds fewer than
    2 x PRECONDITION_ROWS rows; beyond, the sample is spread over the whole batch's rows, so
    a column's estimate uses fewer of its own rows than its fit alone would: the same
    minima, by paths that differ slightly).

    M is the inverse of the objective's Hessian at uniform predictions (the softmax's
    curvature 1/C per class direction, Kronecker-factored with Σ), plus the weight decay λ
    on W (D: 1 on W's rows, 0 on the bias's). L-BFGS started from γM instead of γI
    converges in far fewer iterations on ill-conditioned features (anisotropic embeddings,
    a common mean, weak weight decays; benchmarks/probe_speed.py), to the same minimum.
    δ = 1e-6 x the mean diagonal of Σ/C keeps M bounded where Σ is singular (fewer rows
    than dimensions). The factor 1/C and a step of 1 from the first iteration were chosen in a
    prototype on synthetic problems from 200 x 512 x 10 to 25,000 x 512 x 100, C = 2 to
    100, λ = 1e-6 to 1e-1 (factors 1/(4C) and 4/C: similar, no better)."""
    d2 = gram.shape[0]
    sigma = gram[:-1, :-1] / gram[-1, -1].clamp(min=1) / n_classes
    scale = float(torch.diagonal(sigma).mean())
    delta = 1e-6 * scale if scale > 0 else 1.0  # no rows: M = (λD + I)⁻¹
    eye = torch.eye(d2 - 1, dtype=sigma.dtype, device=sigma.device)
    on_w = eye.clone()
    on_w[-1, -1] = 0
    return torch.stack([_spd_inverse(sigma + wd * on_w + delta * eye) for wd in weight_decays]).float()


def _spd_inverse(A: torch.Tensor) -> torch.Tensor:
    """A⁻¹ for a symmetric positive definite A (δ > 0 above) through its Cholesky factor: half
    the time of a general inverse at d = 512; the general inverse where the factor fails."""
    L, info = torch.linalg.cholesky_ex(A)
    return torch.cholesky_inverse(L) if int(info) == 0 else torch.linalg.inv(A)


def _apply(M: torch.Tensor, which: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """M[which[k]] · v[k] for (A, d + 1, C) vectors ``v`` (flattened (A, (d + 1)·C) too): one
    batched product when the A matrices hold at most PIECE_VALUES values, else one product
    per preconditioner, over every problem that uses it."""
    a, shape = len(v), v.shape
    v = v.reshape(a, M.shape[1], -1)
    if a * M.shape[1] ** 2 <= PIECE_VALUES:
        return torch.bmm(M[which], v).reshape(shape)
    out = torch.empty_like(v)
    for u in which.unique().tolist():
        at = (which == u).nonzero().flatten()
        part = v[at].permute(1, 0, 2).reshape(M.shape[1], -1)  # (d + 1, k·C)
        out[at] = (M[u] @ part).view(M.shape[1], len(at), -1).permute(1, 0, 2)
    return out.reshape(shape)


def fit_probes(
    train: Rows,
    weight_decays: list[float],
    max_iter: int = 200,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    regularize_towards: torch.Tensor | None = None,
    tolerance_grad: float = TOLERANCE_GRAD,
    history_size: int = 10,
    columns: list[int] | None = None,
    relative_tolerance: float = RELATIVE_TOLERANCE,
) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Fit one probe per weight decay, all at once: P independent L-BFGS problems whose
    objectives are evaluated together, one pass over the rows for all of them (streamed
    rows are read once per evaluation, not once per problem), each fitted until it
    converges (the largest gradient entry below ``tolerance_grad``, scikit-learn's lbfgs
    stops at 1e-4 on the same scale, and below ``relative_tolerance`` x λ·max|W|, see
    RELATIVE_TOLERANCE; 0: the absolute test alone), a step
    or a block of 10 iterations no longer moves the loss, or ``max_iter`` iterations.

    Each problem keeps its own L-BFGS memory (``history_size`` pairs), step length and
    stopping state; the line search backtracks on the Armijo condition (c₁ = 1e-4,
    interpolating a quadratic) from a step of 1. The inverse-Hessian estimate starts from
    a preconditioner (:func:`_preconditioners`, from the features' second moments, read in
    the first evaluation) rather than the identity: the same minimum in a fraction of the
    iterations on ill-conditioned problems. The objective is convex, so accepted steps have
    sᵀy > 0 and keep the estimate positive definite (pairs with sᵀy ≤ 1e-10 are skipped).

    ``init`` is one ``(W, b)`` for every problem or a stack of them, ``(P, d, C)`` and
    ``(P, C)``; ``regularize_towards`` one (d, C) anchor or a (P, d, C) stack (zeros: none).
    ``columns``: per problem, the weight column of ``train`` it is fitted on
    (``train.columns`` > 1: the training sets of several seeds, or methods, in one pass).

    Returns:
        per weight decay, ``(W, b, {"iterations", "converged", "stalled"})``.
    """
    d, c, device = train.n_features, train.n_classes, train.device
    p, size = len(weight_decays), (d + 1) * c
    if (columns is None and train.columns > 1) or (columns is not None and (len(columns) != p or max(columns) >= train.columns)):
        raise ValueError(f"{train.columns} weight columns need one column per problem, got {columns}.")
    objective = _batched_objective(train, weight_decays, columns, regularize_towards)
    theta = _starting_weights(p, d, c, init, device)  # (P, d + 1, C)
    memory = _History(p, history_size, size, device)
    # the optimiser's own arithmetic (vectors of (d + 1)·C per problem) on one thread; the
    # objective's products on all of them when the problem is large enough to share
    with threads_for(0, device):
        f, g, M, which = _first_evaluation(objective, theta, train, weight_decays, columns)
        threshold = _thresholds(weight_decays, tolerance_grad, relative_tolerance)
        progress = _Progress(f, g, threshold(theta, None))
        for it in range(1, max_iter + 1):
            a = progress.running()
            if not a:
                break
            ai = torch.tensor(a, device=device)
            memory.keep(a)
            ga, which_a = g[ai].view(len(a), size), which[ai]
            direction, gtd, step = _search_direction(memory, ga, _apply(M, which_a, ga))
            fa = f[ai]
            trial, f_new, g_new, ok, step = _line_search(objective, ai, theta[ai], fa, direction, gtd, step)
            s = step[:, None] * direction
            memory.store(s, (g_new - g[ai]).view(len(a), size), ok, M, which_a)
            oi = ai[ok]
            theta[oi], f[oi], g[oi] = trial[ok], f_new[ok], g_new[ok]
            progress.update(it, a, f, fa, f_new, g_new, s, ok, threshold(trial, ai))
    return _results(theta, progress)


# Rows a fit reads from a resident cache by index are gathered once and kept for the
# optimiser's later passes while they hold at most this many values (64 MB of float32):
# otherwise every evaluation copies them out of the cache again.
GATHERED_VALUES = 2**24


def _gathered_once(rows: Rows) -> Rows:
    """``rows`` whose blocks that index a resident cache (``x[index]``) are gathered in the
    first pass and replayed in the next ones (the same values in the same pieces: the same
    arithmetic). Rows larger than GATHERED_VALUES, and rows with a block read without an
    index (streamed from disk, or already contiguous), are read as before."""
    if rows.n_rows * rows.n_features > GATHERED_VALUES:
        return rows
    kept: list[tuple] = []
    state = {"replay": None}  # None: no pass yet; True: replay kept; False: read rows every pass

    def blocks():
        if state["replay"]:
            yield from kept
            return
        if state["replay"] is False:
            yield from rows.blocks()
            return
        mine, ok = [], True
        for block in rows.blocks():
            if ok and len(block) > 3 and block[3] is not None:
                block = (block[0][block[3]], block[1], block[2], None, *block[4:])
                mine.append(block)
            else:
                ok, mine = False, []
            yield block
        kept[:] = mine
        state["replay"] = ok

    return Rows(blocks, rows.n_features, rows.n_classes, rows.n_rows, rows.device, rows.columns, rows.groups)


def _batched_objective(train: Rows, weight_decays: list[float], columns: list[int] | None,
                       regularize_towards: torch.Tensor | None) -> Callable:
    """``objective(theta, problems, gram=None)``: the losses and gradients of the problems
    ``problems`` (a tensor of their indices; None: all, and ``gram`` gathers the features'
    moments, see :func:`_objectives`) at the weights ``theta``."""
    train = _gathered_once(train)
    device = train.device
    cols = None if columns is None else torch.tensor(columns, device=device)
    wd = torch.tensor(weight_decays, dtype=torch.float32, device=device)
    threads = torch.get_num_threads()  # taken outside the optimiser's single-thread section
    stacked = regularize_towards is not None and regularize_towards.dim() == 3

    def objective(th, problems, gram=None):
        if problems is None:
            return _objectives(train, th, wd, regularize_towards, threads, cols, gram)
        return _objectives(train, th, wd[problems], regularize_towards[problems] if stacked else regularize_towards,
                           threads, None if cols is None else cols[problems])

    return objective


def _starting_weights(p: int, d: int, c: int, init: tuple[torch.Tensor, torch.Tensor] | None,
                      device: torch.device) -> torch.Tensor:
    """The (P, d + 1, C) starting weights, W above b: ``init`` (one or a stack), else zeros."""
    theta = torch.zeros(p, d + 1, c, device=device)
    if init is not None:
        theta[:, :d] = init[0]
        theta[:, d] = init[1]
    return theta


def _first_evaluation(objective: Callable, theta: torch.Tensor, train: Rows, weight_decays: list[float],
                      columns: list[int] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The losses (P,) and gradients at ``theta``, and, from the features' moments read in the
    same pass, the preconditioners M (K, d + 1, d + 1) with ``which`` (P,), the index of each
    problem's: one per weight column and weight decay, or, beyond PRECONDITIONER_VALUES, one
    per weight decay from every row."""
    d, c, device = train.n_features, train.n_classes, train.device
    keys = [(0 if columns is None else columns[k], v) for k, v in enumerate(weight_decays)]
    pooled = len(set(keys)) * (d + 1) ** 2 > PRECONDITIONER_VALUES  # one per weight decay, from every row
    if pooled:
        keys = [(0, v) for v in weight_decays]
    # float64 moments (on the CPU for MPS, which has none); the preconditioners in float32 on the device
    kept = train.__dict__.get("_moments") if train.columns == 1 else None
    if kept is not None:  # an earlier fit on the same rows (the grid's extension): the same moments
        gram = kept
        f, g = objective(theta, None)
    else:
        gram = torch.zeros(1 if pooled else train.columns, d + 2, d + 2, dtype=torch.float64,
                           device="cpu" if device.type == "mps" else device)
        f, g = objective(theta, None, gram)  # and the features' moments
        if train.columns == 1:  # (d + 2)² values, kept with the rows for their next fit
            train._moments = gram
    distinct = sorted(set(keys))
    M = torch.cat([_preconditioners(gram[j], [v for i, v in distinct if i == j], c)
                   for j in sorted({i for i, _ in distinct})]).to(device)
    which = torch.tensor([distinct.index(key) for key in keys], device=device)
    return f, g, M, which


class _History:
    """The L-BFGS memory of the problems still running, in the order of ``held``: per problem
    ``m`` pairs (s, y), oldest first, with M·y and ρ = 1 / sᵀy (ρ 0: an empty slot, which adds
    nothing). Problems that stop leave it: no gathers of every problem's pairs at each iteration."""

    def __init__(self, p: int, m: int, size: int, device: torch.device):
        self.S, self.Y, self.MY = (torch.zeros(p, m, size, device=device) for _ in range(3))
        self.rho = torch.zeros(p, m, device=device)
        self.held = list(range(p))

    def keep(self, running: list[int]) -> None:
        """Drop the pairs of the problems that stopped, ``running`` (sorted) being the rest."""
        if running == self.held:
            return
        alive = set(running)
        still = torch.tensor([k in alive for k in self.held], device=self.S.device)
        self.S, self.Y, self.MY, self.rho = self.S[still], self.Y[still], self.MY[still], self.rho[still]
        self.held = running

    def store(self, s: torch.Tensor, y: torch.Tensor, accepted: torch.Tensor, M: torch.Tensor,
              which: torch.Tensor) -> None:
        """Add the pair (s, y) of each running problem whose step was ``accepted`` and has
        sᵀy > 1e-10, its oldest pair out (every problem, usually: a slice, no gather)."""
        sy = (s * y).sum(1)
        keep = accepted & (sy > 1e-10)
        if not bool(keep.any()):
            return
        ki = slice(None) if bool(keep.all()) else keep.nonzero().flatten()
        self.S[ki] = torch.cat([self.S[ki, 1:], s[keep, None]], 1)
        self.Y[ki] = torch.cat([self.Y[ki, 1:], y[keep, None]], 1)
        self.MY[ki] = torch.cat([self.MY[ki, 1:], _apply(M, which[keep], y[keep])[:, None]], 1)
        self.rho[ki] = torch.cat([self.rho[ki, 1:], (1 / sy[keep])[:, None]], 1)


def _search_direction(memory: _History, g: torch.Tensor, Mg: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each running problem's direction −H·g (steepest descent where that is numerically not
    a descent direction), its slope gᵀd and its first step."""
    direction = -_inverse_hessian_times(memory.S, memory.Y, memory.MY, memory.rho > 0, g, Mg)
    gtd = (g * direction).sum(1)
    ascent = ~(gtd < 0)  # numerically not a descent direction: steepest descent instead
    if bool(ascent.any()):
        direction[ascent] = -g[ascent]
        gtd = (g * direction).sum(1)
    # step 1: M approximates the inverse Hessian from the first iteration on (steepest descent: min(1, 1/‖g‖₁))
    first = (1 / g.abs().sum(1).clamp(min=1e-30)).clamp(max=1.0)
    return direction, gtd, torch.where(ascent, first, torch.ones_like(first))


def _line_search(objective: Callable, ai: torch.Tensor, theta_a: torch.Tensor, fa: torch.Tensor,
                 direction: torch.Tensor, gtd: torch.Tensor, step: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backtrack each problem ``ai`` from ``theta_a`` (A, d + 1, C) along ``direction`` (A, (d + 1)·C)
    until the Armijo condition holds or no shorter step can decrease the loss measurably;
    returns the trial weights, their losses and gradients, which were accepted, and the steps."""
    shaped = direction.view(theta_a.shape)
    trial = theta_a + step.view(-1, 1, 1) * shaped
    f_new, g_new = objective(trial, ai)
    ok = torch.isfinite(f_new) & (f_new <= fa + 1e-4 * step * gtd)
    done = ok.clone()  # accepted, or no shorter step can decrease the loss measurably
    for _ in range(30):  # backtrack: the minimum of the quadratic through f, f'·d and f_new, within [0.1, 0.5]·t
        if bool(done.all()):
            break
        redo = (~done).nonzero().flatten()
        t = step[redo]
        curve = f_new[redo] - fa[redo] - gtd[redo] * t
        quad = torch.where(torch.isfinite(curve) & (curve > 0),
                           -gtd[redo] * t * t / (2 * curve.clamp(min=1e-30)), 0.5 * t)
        step[redo] = torch.minimum(torch.maximum(quad, 0.1 * t), 0.5 * t)
        unresolved = -step[redo] * gtd[redo] <= LOSS_RESOLUTION * fa[redo].abs()
        done[redo[unresolved]] = True
        redo = redo[~unresolved]
        if not len(redo):
            break
        trial[redo] = theta_a[redo] + step[redo].view(-1, 1, 1) * shaped[redo]
        fr, gr = objective(trial[redo], ai[redo])
        f_new[redo], g_new[redo] = fr, gr
        ok[redo] = torch.isfinite(fr) & (fr <= fa[redo] + 1e-4 * step[redo] * gtd[redo])
        done[redo] = ok[redo]
    return trial, f_new, g_new, ok, step


class _Progress:
    """Each problem's iteration count and stopping state: it runs until its gradient, step or
    loss change is small, no step decreases its loss, or a block of 10 iterations no longer
    moves the loss. ``converged``: it stopped because its largest gradient entry passed the
    tolerance; ``stalled``: it stopped for any other of those reasons (as far as float32 goes,
    but not shown optimal); neither: it ran out of iterations."""

    def __init__(self, f: torch.Tensor, g: torch.Tensor, threshold: torch.Tensor):
        p = len(f)
        self.iterations = [0] * p
        self.block_start = f.clone()  # each problem's loss at the start of its block of 10 iterations
        self.converged = (g.abs().flatten(1).amax(1) <= threshold).tolist()
        self.stalled = [False] * p
        self.active = [bool(torch.isfinite(f[k])) and not self.converged[k] for k in range(p)]

    def running(self) -> list[int]:
        """The problems still running, in order."""
        return [k for k in range(len(self.active)) if self.active[k]]

    def update(self, it: int, a: list[int], f: torch.Tensor, fa: torch.Tensor, f_new: torch.Tensor,
               g_new: torch.Tensor, s: torch.Tensor, ok: torch.Tensor, threshold: torch.Tensor) -> None:
        """Count iteration ``it`` of the problems ``a``; stop those that converged (``f``: losses
        after it; ``threshold``: each one's gradient tolerance at its trial weights)."""
        gradient = g_new.abs().flatten(1).amax(1) <= threshold
        small = gradient | (s.abs().amax(1) <= 1e-10) | ((f_new - fa).abs() < 1e-10)
        stuck = (~ok).tolist()  # no step decreased the loss: as far as float32 goes
        gradient, small = (gradient & ok).tolist(), (small & ok).tolist()
        for j, k in enumerate(a):
            self.iterations[k] = it
            stalled = False
            if it % 10 == 0:
                stalled = abs(float(self.block_start[k]) - float(f[k])) <= 1e-7 * max(1.0, abs(float(f[k])))
                self.block_start[k] = f[k]
            if small[j] or stuck[j] or stalled:
                self.active[k] = False
                self.converged[k], self.stalled[k] = gradient[j], not gradient[j]


def _thresholds(weight_decays: list[float], tolerance_grad: float, relative_tolerance: float) -> Callable:
    """``threshold(theta, problems)``: each problem's gradient tolerance at the weights
    ``theta`` (of the problems ``problems``; None: all), the smaller of ``tolerance_grad`` and
    ``relative_tolerance`` x λ·max|W|, never below RELATIVE_FLOOR (see RELATIVE_TOLERANCE).
    λ·max|W|, not the regulariser's gradient λ·(W − anchor): a probe anchored near its
    minimiser would otherwise be held to a precision relative to its small distance from the
    anchor, which float32 cannot reach, rather than to its weights, which set the logits."""
    wd = {}  # the weight decays as a tensor on the weights' device, made once

    def threshold(theta: torch.Tensor, problems: torch.Tensor | None) -> torch.Tensor:
        if not relative_tolerance:
            return torch.full((len(theta),), tolerance_grad, device=theta.device)
        if theta.device not in wd:
            wd[theta.device] = torch.tensor(weight_decays, dtype=torch.float32, device=theta.device)
        lam = wd[theta.device]
        scale = (lam if problems is None else lam[problems]) * theta[:, :-1].abs().flatten(1).amax(1)
        return torch.clamp(relative_tolerance * scale, min=RELATIVE_FLOOR, max=tolerance_grad)

    return threshold


def _results(theta: torch.Tensor, progress: _Progress) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Per problem, ``(W, b, {"iterations", "converged", "stalled"})`` from the (P, d + 1, C)
    weights (see :class:`_Progress`)."""
    d = theta.shape[1] - 1
    return [(theta[k, :d].clone(), theta[k, d].clone(),
             {"iterations": progress.iterations[k], "converged": progress.converged[k], "stalled": progress.stalled[k]})
            for k in range(len(theta))]


def fit_probe(
    train: Rows,
    weight_decay: float,
    max_iter: int = 200,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    regularize_towards: torch.Tensor | None = None,
    tolerance_grad: float = TOLERANCE_GRAD,
    relative_tolerance: float = RELATIVE_TOLERANCE,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Fit W (d, C) and b (C,) by L-BFGS on the ``train`` rows at one weight decay (the
    one-problem case of :func:`fit_probes`)."""
    return fit_probes(train, [weight_decay], max_iter, init, regularize_towards, tolerance_grad,
                      relative_tolerance=relative_tolerance)[0]


def select_weight_decay(
    train: Rows,
    val: Rows,
    grid: list[float],
    max_iter: int = 200,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    regularize_towards: torch.Tensor | None = None,
    scorer: Scorer | None = None,
) -> tuple[dict, list[dict]]:
    """Fit every weight decay of ``grid`` as one batched problem (:func:`fit_probes`), each
    to convergence, and keep the one with the best validation accuracy, ties broken by the
    lower validation log-loss (see :func:`_better`), then by the grid's order: the rule of
    scikit-learn's LogisticRegressionCV with an accuracy-then-log-loss scorer. ``scorer``:
    the scores of what is deployed from each fit, when that is not the fit (see :func:`choose`).

    The weight decay is the only thing selected. Keeping instead the L-BFGS iterate with
    the best validation accuracy (as one keeps an SGD epoch) selects unconverged weights
    that depend on the optimiser's path and starting point, not on the data: on 30 noisy
    rows such a rule chose another weight decay than scikit-learn and scored 1.3 points
    off its test accuracy.

    Returns:
        the best ``{"weight_decay", "iterations", "converged", "stalled", "val_accuracy", "val_log_loss", "W", "b"}``
        and the search (the same without W and b, per weight decay).
    """
    return choose(fit_probes(train, grid, max_iter, init, regularize_towards), grid, val, scorer)


# (P, d + 1, C) candidates and their weight decays -> each one's validation (accuracy, log-loss)
Scorer = Callable[[torch.Tensor, list[float]], list[tuple[float, float]]]


def choose(fits: list[tuple[torch.Tensor, torch.Tensor, dict]], grid: list[float], val: Rows,
           scorer: Scorer | None = None) -> tuple[dict, list[dict]]:
    """The best of the fits at each weight decay of ``grid`` (:func:`fit_probes`' output) on
    the validation rows ``val`` (:func:`_better`), and every candidate's scores. ``scorer``:
    the validation ``(accuracy, log-loss)`` of what is deployed from each candidate's stacked
    (P, d + 1, C) weights, given with their weight decays (a method's :meth:`~vlaug.methods.base.Method.deployed_scores`),
    when that is not the fit itself; by default the fits' own scores on ``val``."""
    W0 = fits[0][0]
    thetas = torch.stack([torch.cat([W, b[None]]) for W, b, _ in fits])
    with threads_for(val.n_rows * W0.shape[0] * W0.shape[1] * len(grid), W0.device):
        scores = scorer(thetas, list(grid)) if scorer is not None else validation_scores(val, thetas)
    search, best = [], None
    for wd, (W, b, info), (accuracy, log_loss) in zip(grid, fits, scores):
        entry = {"weight_decay": wd, **info, "val_accuracy": accuracy, "val_log_loss": log_loss}
        search.append(entry)
        if best is None or is_better((accuracy, log_loss), (best["val_accuracy"], best["val_log_loss"])):
            best = {**entry, "W": W, "b": b}
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
