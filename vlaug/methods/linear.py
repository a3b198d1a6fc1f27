"""Probe methods: a linear probe fitted by L-BFGS with its weight decay chosen on
validation rows (:class:`ProbeMethod`), on the training rows alone (``linear``), anchored
at the zero-shot classifier (``linear-zs``), or on the training rows plus the extra rows an
augmenting method adds (:mod:`vlaug.methods.augmenting`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from vlaug.choices import CLASSES_PROMPT_SET
from vlaug.devices import release_memory
from vlaug.methods import register
from vlaug.methods.base import EnsembleOptions, Fit, Method, RunData
from vlaug.discriminant import SHRINKAGE_GRID, ClassStatistics, gda_weights, shrunk_inverses
from vlaug.probe import (Rows, as_labels, choose, fit_probe, fit_probes, fit_reweighted, is_better, row_pieces,
                         select_weight_decay, validation_scores, weight_decay_grid)
from vlaug.zero_shot import zero_shot_weights

# After a search on a sample, the fit on every training row starts from the sample's probe at
# the chosen weight decay and stops at scikit-learn's default tolerance (largest gradient entry
# 1e-4) rather than the search's 1e-5: each of its evaluations is a pass over every row.
REFIT_TOLERANCE = 1e-4

# --reweight: Adam steps from the selected probe, regrouping period t0 and Mei et al.'s η
REWEIGHT_SCHEDULE = {"steps": 500, "period": 100, "eta": 0.01, "lr": 0.01}

# The seeds of a method are fitted as one batch (fit_seeds): one optimiser loop, one pass over
# the rows per evaluation for all of them (streamed: one read of the cache, not one per seed).
# Rows of the cache are shared: the union of the seeds' rows, each seed's weighted in its own
# column, when the union holds at most this many times a seed's rows (by default each seed's
# validation rows are the others' training rows: 1.25 x; a row outside a seed's set costs its
# problems arithmetic for nothing).
UNION_LIMIT = 1.5
# Rows a method builds (its extras) differ between seeds: each seed's block is evaluated under
# its own problems only (a block's owner, see vlaug.probe.Rows). They are built for every seed
# (and, in search_together, every method) at once, so only while all of them hold at most this
# many values (small runs, whose time is the optimiser's loop); otherwise, and when streamed,
# each seed is fitted on its own.
BUILT_BATCH_VALUES = 2**26
# A batch of P problems holds about (3 x history + 6) x (d + 1) x C values per problem of
# optimiser state (L-BFGS pairs and the pairs' preconditioned y, iterates, gradients, starts,
# anchors); batches stay within this many values (512 MB of float32: 72 problems at d = 512,
# C = 100; one seed's grid at d = 1024, C = 400 is fitted as before, one seed at a time).
BATCH_STATE_VALUES = 2**27


def _state_fits(n_problems: int, data: RunData) -> bool:
    """Whether a batch of ``n_problems`` probes keeps its optimiser state within BATCH_STATE_VALUES."""
    return n_problems * 36 * (data.embed_dim + 1) * data.n_classes <= BATCH_STATE_VALUES


def block_generator(seed: int, block: int) -> torch.Generator:
    """The generator of block ``block``'s augmentations under ``seed``."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, block]).generate_state(1)[0]))


class ProbeMethod(Method):
    """The linear probe on the training rows plus the rows :meth:`augment` adds.

    Every row weighs 1/N (or, with --class-weight, inversely to its class's count,
    normalised to sum 1). The weight decay is chosen from the run's grid on validation
    accuracy; the refit uses the chosen value on train + validation rows.
    """

    Options: ClassVar = EnsembleOptions
    default_solver: ClassVar[str] = "logistic"  # "gda": Gaussian discriminant analysis (vlaug.discriminant)

    @property
    def solver(self) -> str:
        """How the classifier is fitted: ``logistic`` (L-BFGS over the weight-decay grid) or
        ``gda`` (class means and a shrunk shared covariance, the shrinkage chosen on validation)."""
        return getattr(self.options, "solver", self.default_solver)

    def start(self, data: RunData) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """The fit's initial weights and the weights it is regularised towards (None: zeros)."""
        return None, None

    def finish(self, W: torch.Tensor, b: torch.Tensor, anchor: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier kept once the fit is done."""
        return W, b

    def fit_seeds(self, data, splits) -> list[Fit]:
        """Every seed's fit. The seeds' logistic searches (or, after searches on samples,
        their refits on every training row) run as one batch where that pays (see
        UNION_LIMIT and BUILT_BATCH_VALUES): the same fits, with one optimiser loop and one
        pass over the rows per evaluation for all of them. Searches already run with other
        methods' (:func:`search_together`) are taken as they are."""
        if not getattr(self, "_searched", None):
            search_together([self], data, splits)
        if not getattr(self, "_searched", None):
            self._searched = self._refit_seeds(data, splits)
        try:
            return super().fit_seeds(data, splits)
        finally:
            self._searched = {}

    def fit(self, data, splits, seed) -> Fit:
        train, val = np.asarray(splits.train), np.asarray(splits.val)
        if self.solver == "gda":
            return self._fit_gda(data, train, val, seed)
        found = getattr(self, "_searched", {}).pop(seed, None)
        if found is None or found.train is None or not np.array_equal(found.train, train):  # not these rows' search
            found = self._search(data, train, val, seed)
        best, rows = found.best, found.rows if found.rows is not None else self.training_rows(data, train, seed)
        selection = {k: best[k] for k in ("weight_decay", "iterations", "converged", "val_accuracy", "val_log_loss")}
        if found.sample is not None:
            selection["selected_on"] = {"train_rows": len(found.sample[0]), "val_rows": len(found.sample[1])}
            selection["refit"] = found.refit
            # where refit (this seed's train + val rows, the same weight decay) starts from: a few iterations away
            self._fitted = {**getattr(self, "_fitted", {}), seed: (found.W, found.b)}
        W, b = self._reweighted(data, rows, train, found.W, found.b, selection)
        selection["n_train_rows"] = rows.n_rows
        return Fit(*self.finish(W, b, self.start(data)[1]), selection, found.search)

    def _search(self, data: RunData, train: np.ndarray, val: np.ndarray, seed: int) -> "_Searched":
        """One seed's logistic search: the weight decay chosen on the validation rows, the
        probe at that weight decay on the training rows."""
        init, anchor = self.start(data)
        cfg = data.config
        grid = weight_decay_grid(cfg.grid_size)
        sample = _selection_sample(train, val, cfg.selection_rows, seed)
        rows = self.training_rows(data, train, seed)
        if sample is None:
            best, search = select_weight_decay(rows, labelled_rows(data, val), grid, cfg.max_iter, init, anchor)
            return _Searched(best, search, best["W"], best["b"], rows)
        # select on a seeded sample held in memory, then refit on every training row, warm-started
        best, search = self._search_sample(data, sample, seed, grid, init, anchor)
        W, b, info = fit_probe(rows, best["weight_decay"], cfg.max_iter, init=(best["W"], best["b"]),
                               regularize_towards=anchor, tolerance_grad=REFIT_TOLERANCE)
        return _Searched(best, search, W, b, rows, sample, {"iterations": info["iterations"], "converged": info["converged"]})

    def _search_sample(self, data, sample, seed, grid, init, anchor) -> tuple[dict, list[dict]]:
        """The search on a seeded sample of the training and validation rows, held in memory."""
        sub_train, sub_val = sample
        held = data.subset(np.concatenate([sub_train, sub_val]))
        local = np.arange(len(sub_train) + len(sub_val))
        return select_weight_decay(self.training_rows(held, local[:len(sub_train)], seed),
                                   labelled_rows(held, local[len(sub_train):]), grid, data.config.max_iter, init, anchor)

    def _built_values(self, data: RunData, splits) -> float | None:
        """How many values this method's rows built for every seed at once would hold (0:
        none, rows of the cache), or None where its seeds' full searches cannot join a batch
        (GDA, searches on a sample, a method's extras streamed)."""
        cfg = data.config
        if self.solver != "logistic" or (data.x is None and self.extra_rows()):
            return None  # streamed extras: each block's draws are seeded by its place in the seed's own stream
        if any(_selection_sample(np.asarray(s.train), np.asarray(s.val), cfg.selection_rows, seed) is not None
               for seed, s in enumerate(splits)):
            return None
        return sum(len(s.train) for s in splits) * (1 + self.extra_rows()) * data.embed_dim if self.extra_rows() else 0

    def _batch_plan(self, data: RunData, splits) -> "_BatchPlan":
        """What :func:`search_together` needs to fit this method's full searches with
        others': the seeds' training rows (built once here with a method's extras, and kept
        for fit()), validation rows, start and anchor."""
        trains, vals = [np.asarray(s.train) for s in splits], [np.asarray(s.val) for s in splits]
        per_seed = [self.training_rows(data, t, seed) for seed, t in enumerate(trains)] if self.extra_rows() else None
        init, anchor = self.start(data)
        return _BatchPlan(trains, vals, per_seed, init, anchor)

    def _refit_seeds(self, data: RunData, splits) -> dict[int, "_Searched"]:
        """After searches on samples (one per seed, each on its own sample), the seeds'
        refits on every training row of the cache as one batch; {} where the seeds are
        fitted one by one."""
        cfg = data.config
        if self.solver != "logistic" or self.extra_rows() or len(splits) < 2 or not _state_fits(len(splits), data):
            return {}
        trains, vals = [np.asarray(s.train) for s in splits], [np.asarray(s.val) for s in splits]
        samples = [_selection_sample(t, v, cfg.selection_rows, seed) for seed, (t, v) in enumerate(zip(trains, vals))]
        if any(sample is None for sample in samples):
            return {}
        members = _union_index(data, trains)
        if members is None:
            return {}
        init, anchor = self.start(data)
        grid = weight_decay_grid(cfg.grid_size)
        picks = []
        for seed, sample in enumerate(samples):
            picks.append(self._search_sample(data, sample, seed, grid, init, anchor))
            release_memory()  # the sample's copy and the search's temporaries, before the next (on 2M rows: 0.06 GiB of peak)
        union = _union_rows(data, trains, members)
        fits = fit_probes(union, [best["weight_decay"] for best, _ in picks], cfg.max_iter,
                          init=(torch.stack([best["W"] for best, _ in picks]), torch.stack([best["b"] for best, _ in picks])),
                          regularize_towards=anchor, tolerance_grad=REFIT_TOLERANCE, columns=list(range(len(splits))))
        return {seed: _Searched(best, search, W, b, None, samples[seed],
                                {"iterations": info["iterations"], "converged": info["converged"]}, trains[seed])
                for seed, ((best, search), (W, b, info)) in enumerate(zip(picks, fits))}

    def refit(self, data, rows, seed, selection) -> Fit:
        train_rows = self.training_rows(data, rows, seed)
        if self.solver == "gda":
            stats = _statistics(train_rows, data.device)
            W, b = gda_weights(stats, shrunk_inverses(stats.covariance(), [selection["shrinkage"]])[0], self._priors(data))
            return Fit(W.float().to(data.device), b.float().to(data.device), {**selection, "n_train_rows": train_rows.n_rows})
        init, anchor = self.start(data)
        wd, cfg = selection["weight_decay"], data.config
        sample = _selection_sample(rows, rows[:0], cfg.selection_rows, seed)
        if sample is not None and seed in getattr(self, "_fitted", {}):  # from this seed's fit on the training rows
            init = self._fitted[seed]
        elif sample is not None:  # as in fit: first on a seeded sample, then on every row, warm-started
            held = data.subset(sample[0])
            init = fit_probe(self.training_rows(held, np.arange(len(sample[0])), seed), wd, cfg.max_iter, init=init,
                             regularize_towards=anchor)[:2]
        # to the search's tolerance: from this seed's fit, the looser REFIT_TOLERANCE can already hold on
        # train + val, and the saved probe would be the training rows' probe, never refitted
        W, b, _ = fit_probe(train_rows, wd, cfg.max_iter, init=init, regularize_towards=anchor)
        chosen = {k: v for k, v in selection.items() if k != "reweight"}
        W, b = self._reweighted(data, train_rows, rows, W, b, chosen)
        chosen["n_train_rows"] = train_rows.n_rows
        return Fit(*self.finish(W, b, anchor), chosen)

    def _fit_gda(self, data: RunData, train: np.ndarray, val: np.ndarray, seed: int) -> Fit:
        """GDA on the training rows (and the method's extras): one pass for the class
        statistics, one eigendecomposition, every shrinkage of SHRINKAGE_GRID scored on the
        validation rows in one pass; the best accuracy wins, ties to the lower log-loss."""
        rows = self.training_rows(data, train, seed)
        stats = _statistics(rows, data.device)
        priors = self._priors(data)
        fits = [gda_weights(stats, inv, priors) for inv in shrunk_inverses(stats.covariance(), SHRINKAGE_GRID)]
        theta = torch.stack([torch.cat([W, b[None]]) for W, b in fits]).float().to(data.device)
        scores = validation_scores(labelled_rows(data, val), theta)
        search, best = [], None
        for alpha, (accuracy, log_loss), th in zip(SHRINKAGE_GRID, scores, theta):
            search.append({"shrinkage": alpha, "val_accuracy": accuracy, "val_log_loss": log_loss})
            if best is None or is_better((accuracy, log_loss), (best[0]["val_accuracy"], best[0]["val_log_loss"])):
                best = (search[-1], th)
        entry, th = best
        return Fit(th[:-1], th[-1], {**entry, "n_train_rows": rows.n_rows}, search)

    def _priors(self, data: RunData) -> torch.Tensor | None:
        """GDA's class priors: uniform with --class-weight, else the training rows' frequencies (None)."""
        c = data.n_classes
        return torch.full((c,), 1.0 / c, dtype=torch.float64) if data.config.class_weight else None

    def _reweighted(self, data: RunData, rows: Rows, train: np.ndarray, W, b, selection: dict):
        """With --reweight (in memory only: prepare refuses it for a streamed cache), the
        reweighted probe at the chosen weight decay; else ``W``, ``b``."""
        scheme = data.config.reweight
        if scheme == "none":
            return W, b
        x, t, hard = materialize(rows)
        dom = data.dom[data.rows(train)] if not self.extra_rows() else None  # extras have no domain
        W, b, rw = fit_reweighted(x, t, hard, selection["weight_decay"], scheme, dom, init=(W, b), **REWEIGHT_SCHEDULE)
        selection["reweight"] = {"scheme": scheme, **rw}
        return W, b

    def blocks(self, data: RunData, rows: np.ndarray, seed: int):
        """Training rows ``rows`` block by block with the method's extras: ``(x, labels, extra)``,
        ``extra`` = (x, soft targets) or None. Block k draws its augmentations from its own
        generator (seeded by (seed, k)), so every pass over a streamed cache sees the same rows."""
        for k, (pos, x) in enumerate(data.stream(rows)):
            r = data.rows(rows[pos])
            yield x, data.y[r], self.augment(data, x, data.y[r], data.dom[r], block_generator(seed, k))

    def training_rows(self, data: RunData, rows: np.ndarray, seed: int) -> Rows:
        """The probe's training set: ``rows`` plus the method's extras, weighted. In memory
        the set is built once; streamed, it is rebuilt (same seeds, same rows) on every pass."""

        def unweighted():
            for x, y, extra in self.blocks(data, rows, seed):
                yield x, y
                if extra is not None:
                    yield extra[0], as_labels(extra[1])

        def hard(t):
            return t if t.dim() == 1 else t.argmax(1)

        c = data.n_classes
        if data.x is not None and not self.extra_rows():  # the resident cache itself, indexed: no copy
            index = data.rows(rows)
            unweighted = lambda: [(data.x, data.y[index], index)]  # noqa: E731
        elif data.x is not None:
            built = _joined(list(unweighted()), c)
            unweighted = lambda: built  # noqa: E731
        if not self.extra_rows():
            counts = torch.bincount(data.y[data.rows(rows)], minlength=c).float()
        else:  # labels of the extras: one more pass when streamed
            counts = sum((torch.bincount(hard(t), minlength=c).float() for _, t in unweighted()),
                         torch.zeros(c, device=data.device))
        per_class = _class_weights(data, counts)

        def weighted():
            for x, t, *index in unweighted():
                yield x, t, per_class[hard(t)], *index

        return Rows(weighted, data.embed_dim, c, int(counts.sum()), data.device)


@dataclass
class _Searched:
    """A seed's logistic search (:meth:`ProbeMethod._search`): the chosen candidate and the
    search, the probe on the training rows, those rows (when built), and after a search on a
    sample the sample and the refit on every training row."""

    best: dict
    search: list[dict]
    W: torch.Tensor
    b: torch.Tensor
    rows: Rows | None  # None: built again when needed
    sample: tuple[np.ndarray, np.ndarray] | None = None
    refit: dict | None = None
    train: np.ndarray | None = None  # the training rows it was fitted for


@dataclass
class _BatchPlan:
    """A method's part of :func:`search_together` (see :meth:`ProbeMethod._batch_plan`)."""

    trains: list[np.ndarray]
    vals: list[np.ndarray]
    per_seed: list[Rows] | None  # the seeds' built rows; None: rows of the cache
    init: tuple[torch.Tensor, torch.Tensor] | None
    anchor: torch.Tensor | None


def search_together(methods: list[Method], data: RunData, splits) -> None:
    """The full weight-decay searches of several probe methods on every seed, as one batch:
    one optimiser loop and one pass over the rows per evaluation for every method x seed x
    weight decay. The methods without extras share the rows of the cache (the union of the
    seeds' rows, a weight column per seed); each method's built rows are evaluated under its
    own problems only. The same fits as one search at a time; on small runs, whose time is
    the optimiser's loop, much less time (vlaug.evaluate calls it with every method of the
    run). Each batched method finds its seeds' searches in ``_searched`` (fit_seeds);
    methods that cannot share (see ProbeMethod._built_values, BATCH_STATE_VALUES) are left out."""
    s, grid, cfg = len(splits), weight_decay_grid(data.config.grid_size), data.config
    chosen, room = [], BUILT_BATCH_VALUES  # within BUILT_BATCH_VALUES of built rows and BATCH_STATE_VALUES of state
    for m in methods:
        built = m._built_values(data, splits) if isinstance(m, ProbeMethod) else None
        if built is not None and built <= room and _state_fits((len(chosen) + 1) * s * len(grid), data):
            chosen.append(m)
            room -= built
    if len(chosen) * s < 2:
        return  # nothing to share
    plans = [(m, m._batch_plan(data, splits)) for m in chosen]
    shared = _union_rows(data, plans[0][1].trains) if any(plan.per_seed is None for _, plan in plans) else None
    plans = [(m, plan) for m, plan in plans if plan.per_seed is not None or shared is not None]
    if not plans:
        return
    owned, base, columns = [], {}, s  # a method's built rows: each seed's blocks, owned by its column
    for m, plan in plans:
        base[m] = 0 if plan.per_seed is None else columns
        if plan.per_seed is not None:
            owned += [(*block[:3], None, columns + j) for j, rows in enumerate(plan.per_seed) for block in rows.blocks()]
            columns += s
    uses_shared = any(plan.per_seed is None for _, plan in plans)

    def blocks():  # the cache's rows (resident: one block; streamed: read again), columns 0 … s - 1; then the built
        if uses_shared:
            for block in shared.blocks():
                yield *block[:3], block[3] if len(block) > 3 else None, block[4] if len(block) > 4 else (0, s)
        yield from owned

    rows = Rows(blocks, data.embed_dim, data.n_classes, (shared.n_rows if uses_shared else 0) + sum(len(b[1]) for b in owned),
                data.device, columns=columns)
    d, c = data.embed_dim, data.n_classes
    problems = [(m, plan, j, wd) for m, plan in plans for j in range(s) for wd in grid]
    start = [plan.init or (torch.zeros(d, c, device=data.device), torch.zeros(c, device=data.device))
             for _, plan, _, _ in problems]
    anchors = None
    if any(plan.anchor is not None for _, plan in plans):
        zero = torch.zeros(d, c, device=data.device)
        anchors = torch.stack([zero if plan.anchor is None else plan.anchor for _, plan, _, _ in problems])
    fits = fit_probes(rows, [wd for *_, wd in problems], cfg.max_iter,
                      init=(torch.stack([w for w, _ in start]), torch.stack([b for _, b in start])),
                      regularize_towards=anchors, columns=[base[m] + j for m, _, j, _ in problems])
    k = len(grid)  # problems per method and seed
    for i, (m, plan) in enumerate(plans):
        searched = {}
        for j, val in enumerate(plan.vals):
            first = (i * s + j) * k
            best, search = choose(fits[first:first + k], grid, labelled_rows(data, val))
            searched[j] = _Searched(best, search, best["W"], best["b"], plan.per_seed[j] if plan.per_seed else None,
                                    train=plan.trains[j])
        m._searched = searched


def _union_index(data: RunData, trains: list[np.ndarray]) -> np.ndarray | None:
    """The union of the seeds' training rows ``trains``, sorted; None when it is larger than
    UNION_LIMIT x a seed's rows, or a seed holds a row twice (one weight could not hold both)."""
    if any(len(t) > 1 and not (t[1:] > t[:-1]).all() and len(np.unique(t)) != len(t) for t in trains):
        return None
    member = np.zeros(len(data.y), dtype=bool)  # the union, sorted, without sorting millions of row ids
    for t in trains:
        member[t] = True
    union = np.flatnonzero(member)
    if len(union) > UNION_LIMIT * sum(len(t) for t in trains) / len(trains):
        return None  # too many rows unused by each seed
    return union


def _union_rows(data: RunData, trains: list[np.ndarray], union: np.ndarray | None = None) -> Rows | None:
    """The training rows ``trains`` of several seeds, rows of the cache (resident or
    streamed), as one set of rows: the union of the seeds' rows (``union``, or
    :func:`_union_index`), with a weight column per seed (0 where a row is not the seed's),
    read once per pass for all of them; None where :func:`_union_index` is."""
    s = len(trains)
    union = _union_index(data, trains) if union is None else union
    if union is None:
        return None
    y = data.y[data.rows(union)]
    weights = torch.zeros(len(union), s, device=data.device)
    for j, t in enumerate(trains):
        labels = data.y[data.rows(t)]
        per_class = _class_weights(data, torch.bincount(labels, minlength=data.n_classes).float())
        weights[data.rows(np.searchsorted(union, t)), j] = per_class[labels]
    if data.x is not None:  # the resident cache itself, indexed: no copy
        built = _membership_blocks(data.x, y, weights, data.rows(union))
        return Rows(lambda: built, data.embed_dim, data.n_classes, len(union), data.device, columns=s)

    def blocks():
        for pos, x in data.stream(union):
            at = data.rows(pos)
            yield x, y[at], weights[at]

    return Rows(blocks, data.embed_dim, data.n_classes, len(union), data.device, columns=s)


# A row of the union outside a seed's set weighs 0 in that seed's column, and costs its problems
# arithmetic for nothing (with 5 seeds' default splits, a fifth of a refit's products). Rows
# that the same seeds hold (a membership pattern) of at least this many are a block of their
# own, evaluated under those seeds' problems only; the rest stay one block under every seed
# (small sets: each block costs every evaluation its own dozen operators).
PATTERN_ROWS = 4096
PATTERN_SEEDS = 16  # more seeds than this: one block


def _membership_blocks(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> list[tuple]:
    """The union's rows ``x[index]`` (labels ``y``, a weight column per seed, 0 outside its
    set) as blocks ``(x, labels, weights, index, owner)``: one per membership pattern of at
    least PATTERN_ROWS rows (owner: its seeds' columns), the rest under every column; each
    block's rows in cache order."""
    s = weights.shape[1]
    if s < 2 or s > PATTERN_SEEDS or len(index) < 2 * PATTERN_ROWS:
        return [(x, y, weights, index)]
    code = torch.zeros(len(index), dtype=torch.int32, device=weights.device)  # bit j: in seed j's set
    for j in range(s):
        code |= (weights[:, j] > 0).to(torch.int32) << j
    counts = torch.bincount(code, minlength=2**s)
    own = [int(k) for k in (counts >= PATTERN_ROWS).nonzero().flatten() if 0 < k < 2**s - 1]
    if not own:
        return [(x, y, weights, index)]
    blocks, rest = [], torch.ones(len(code), dtype=torch.bool, device=code.device)
    for k in own:
        at = (code == k).nonzero().flatten()
        cols = torch.tensor([j for j in range(s) if k >> j & 1], device=weights.device)
        blocks.append((x, y[at], weights[at][:, cols], index[at], cols))
        rest[at] = False
    at = rest.nonzero().flatten()
    if len(at):
        blocks.append((x, y[at], weights[at], index[at]))
    return blocks


def _class_weights(data: RunData, counts: torch.Tensor) -> torch.Tensor:
    """Per class, the weight of a training row with that (hard) label, from the training
    rows' class ``counts``: 1/N, or with --class-weight inversely to its class's count
    (the weights sum to 1 over the rows either way)."""
    if data.config.class_weight:
        return 1.0 / (counts.clamp(min=1) * int((counts > 0).sum()))
    return torch.full((data.n_classes,), 1.0 / max(1, int(counts.sum())), device=data.device)


# Built rows (originals and a method's extras, in blocks) of at most this many values are
# joined into one block: every block costs each evaluation of the objective its own dozen
# operators, much of a small fit's time (gaussian, 2,000 rows, 3 seeds: 0.98 s -> 0.91 s).
JOIN_VALUES = 2**24


def _joined(blocks: list[tuple], n_classes: int) -> list[tuple]:
    """``(x, targets)`` blocks as one block when they hold at most JOIN_VALUES values (integer
    labels become one-hot rows when other blocks have soft targets), else as they are."""
    if len(blocks) < 2 or sum(x.numel() for x, _ in blocks) > JOIN_VALUES:
        return blocks
    if all(t.dim() == 1 for _, t in blocks):
        return [(torch.cat([x for x, _ in blocks]), torch.cat([t for _, t in blocks]))]
    soft = [F.one_hot(t, n_classes).to(x.dtype) if t.dim() == 1 else t for x, t in blocks]
    return [(torch.cat([x for x, _ in blocks]), torch.cat(soft))]


def _selection_sample(train: np.ndarray, val: np.ndarray, limit: int, seed: int):
    """``(train rows, validation rows)``, each a seeded sample of at most ``limit`` rows (in
    cache order), when there are more than ``limit`` training rows; else None (``limit`` 0:
    never). The weight-decay search fits every grid value to convergence, so its cost grows
    with the rows; on a large cache it runs on the sample and one refit uses every row."""
    if not limit or len(train) <= limit:
        return None
    rng = np.random.default_rng([seed, 0x5E1EC7])
    pick = lambda rows: rows if len(rows) <= limit else np.sort(rng.choice(rows, limit, replace=False))  # noqa: E731
    return pick(train), pick(val)


def _statistics(rows: Rows, device: torch.device) -> ClassStatistics:
    """GDA's class statistics of ``rows`` (float32 pieces, float64 sums; on the CPU for MPS,
    which has no float64)."""
    where = torch.device("cpu") if device.type == "mps" else device
    return ClassStatistics.of(((x.to(where), t.to(where)) for x, t, _ in row_pieces(rows, rows.n_classes)),
                              rows.n_classes, rows.n_features, where)


def labelled_rows(data: RunData, rows: np.ndarray) -> Rows:
    """Rows with their labels (validation rows: the probe's accuracy is read off them);
    built once in memory, read again on every pass when streamed."""

    def blocks():
        for pos, x in data.stream(rows):
            yield x, data.y[data.rows(rows[pos])], None

    if data.x is not None:  # the resident cache itself, indexed: no copy
        index = data.rows(rows)
        built = [(data.x, data.y[index], None, index)]
        blocks = lambda: built  # noqa: E731
    return Rows(blocks, data.embed_dim, data.n_classes, len(rows), data.device)


def materialize(rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, soft targets, hard labels) of in-memory rows, concatenated."""
    xs, ts = [], []
    for x, t, _, *index in rows.blocks():
        xs.append((x[index[0]] if index else x).float())
        ts.append(F.one_hot(t, rows.n_classes).float() if t.dim() == 1 else t)
    t = torch.cat(ts)
    return torch.cat(xs), t, t.argmax(1)


@register
class Linear(ProbeMethod):
    name = "linear"
    summary = "linear probe on the training rows (multinomial logistic regression, weight decay chosen on validation)"


@dataclass(frozen=True)
class LinearZSOptions(EnsembleOptions):
    wise: float = 0.5  # WiSE-FT mix: W = (1 - wise)·zero-shot + wise·fitted (0: zero-shot, 1: the fitted probe)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.wise <= 1.0:
            raise ValueError(f"wise == {self.wise}, must be in [0, 1].")


@register
class LinearZS(ProbeMethod):
    name = "linear-zs"
    summary = "linear probe started from, and regularised towards, the zero-shot classifier; WiSE-style mix"
    Options = LinearZSOptions

    def prompt_sets(self):
        return [CLASSES_PROMPT_SET]

    def start(self, data):
        anchor = zero_shot_weights(data.text)
        return (anchor, torch.zeros(data.n_classes, device=data.device)), anchor

    def finish(self, W, b, anchor):
        lam = self.options.wise
        return (1 - lam) * anchor + lam * W, lam * b
