"""Probe methods: a linear probe fitted by L-BFGS with its weight decay chosen on
validation rows (:class:`ProbeMethod`), on the training rows alone (``linear``), anchored
at the zero-shot classifier (``linear-zs``), or on the training rows plus the extra rows an
augmenting method adds (:mod:`vlaug.methods.augmenting`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from vlaug.choices import CLASSES_PROMPT_SET
from vlaug.devices import release_memory
from vlaug.methods.registry import register
from vlaug.methods.base import BatchPlan, EnsembleOptions, Fit, Method, RunData, Search
from vlaug.methods.batching import ProbeSolver
from vlaug.discriminant import SHRINKAGE_GRID, ClassStatistics, gda_weights, shrunk_inverses
from vlaug.probe import (Rows, Scorer, as_labels, choose, fit_probe, fit_probes, fit_reweighted, is_better, row_pieces,
                         select_weight_decay, validation_scores)
from vlaug.zero_shot import zero_shot_weights

# After a search on a sample, the fit on every training row starts from the sample's probe at
# the chosen weight decay and stops at scikit-learn's default tolerance (largest gradient entry
# 1e-4) rather than the search's 1e-5: each of its evaluations is a pass over every row. (The
# test relative to the weights, vlaug.probe.RELATIVE_TOLERANCE, holds for it as for every fit.)
REFIT_TOLERANCE = 1e-4

# When the chosen weight decay is at an end of the grid, the search goes on past that end, a decade
# at a time (each fit from the method's starting weights, as the grid's), until the best is interior or this
# many decades were added on that side (issue 27: on the shift benchmark most augmenting methods
# chose the grid's weakest value, 1e-6, on most seeds). 3 decades: 1e-9 … 1e2 around the default
# grid, far enough that a rows-per-dimension ratio of a few hundred is covered at the weak end.
GRID_EXTENSION_DECADES = 3
# A value past the grid replaces the best only with a higher validation accuracy (at least one
# more validation row right; a tie in accuracy is not broken by the log-loss there, as it is
# within the grid): on validation rows a probe already separates, the log-loss falls with every
# weaker decade, so a log-loss rule would always run to the bound, GRID_EXTENSION_DECADES below
# the grid, where the fits are the least determined (nearly flat objective, float32 stalls).

# A method without extras keeps the grid's fits of this many values (weights of every weight decay, over
# the last few sets of training rows) for the next split with the same training rows: DomainBed's
# training-domain and oracle selections train on the same rows, and so do its folds (T, v) and (v, T).
# 2**25 float32 values = 128 MB: 30 sets at d = 512, C = 7; one at d = 1024, C = 1000 is not kept.
GRID_FITS_VALUES = 2**25

def _rows_key(data: RunData, train: np.ndarray) -> tuple:
    """A key for the training rows ``train`` of the cache (resident or streamed)."""
    return data.x is not None, len(train), hashlib.blake2b(np.ascontiguousarray(train).tobytes()).hexdigest()


# --reweight: Adam steps from the selected probe, regrouping period t0 and Mei et al.'s η
REWEIGHT_SCHEDULE = {"steps": 500, "period": 100, "eta": 0.01, "lr": 0.01}

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

    def deployed(self, data, W, b):
        return self.finish(W, b, self.start(data)[1])

    def deploys_fit_as_is(self, gate=None):
        return type(self).finish is ProbeMethod.finish and self.ensemble == 0 and gate is None

    def gate_for(self, data: RunData, train: np.ndarray, val: np.ndarray) -> dict | None:
        """The input-adaptive gate the deployed probe carries, set from the training and
        validation rows before any selection (so that every candidate is scored with it); None
        for a fixed mix."""
        return None

    def scorer(self, data: RunData, val: np.ndarray, gate: dict | None = None, rows: Rows | None = None,
               train: np.ndarray | None = None) -> Scorer | None:
        """How a search scores its candidates: the validation scores of what this method
        deploys from each (:meth:`deployed_scores`; with --reweight, each candidate first
        reweighted on the training ``rows``, cache rows ``train``, as :meth:`fit` reweights
        the chosen one), or None where that is the fit itself."""
        reweight = data.settings.reweight != "none"
        if self.deploys_fit_as_is(gate) and not reweight:
            return None

        def scores(thetas: torch.Tensor, grid: list[float]) -> list[tuple[float, float]]:
            if reweight:
                parts = [self._reweighted(data, rows, train, th[:-1], th[-1], {"weight_decay": wd})
                         for th, wd in zip(thetas, grid)]
                thetas = torch.stack([torch.cat([W, b[None]]) for W, b in parts])
            return self.deployed_scores(data, thetas, val, gate)

        return scores

    def fit_seeds(self, data, splits, solver: ProbeSolver, searched: dict[int, Search] | None = None) -> list[Fit]:
        """Every seed's fit. The seeds' logistic searches (or, after searches on samples,
        their refits on every training row) run as one batch where that pays (see
        vlaug.methods.batching): the same fits, with one optimiser loop and one pass over
        the rows per evaluation for all of them. ``searched``: the searches the solver
        already ran with other methods' (:meth:`ProbeSolver.search_together`)."""
        found = searched or solver.search_together([self]).get(self.text) or self._refit_seeds(data, splits, solver)
        if not found:  # each split searched on its own (DomainBed's): their grids, at least, fitted in groups
            self._grids_together(data, splits, solver)
        return [self.fit(data, s, seed, found.get(seed)) for seed, s in enumerate(splits)]

    def _grids_together(self, data: RunData, splits, solver: ProbeSolver) -> None:
        """Where the splits' searches could not join one batch (DomainBed's 30 distinct
        training sets over 3 split seeds: too many rows for one union), the grids of their
        distinct training sets, fitted in groups (:meth:`ProbeSolver.grids_together`), into
        the memo each split's search takes its grid's fits from (:meth:`_search`). Only for
        a method that fits the cache's rows alone (:meth:`_fits_cache_rows`) and whose splits
        are searched on every row."""
        cfg, grid = data.settings, list(data.settings.grid)
        per_set = len(grid) * (data.embed_dim + 1) * data.n_classes
        if (self.solver != "logistic" or not self._fits_cache_rows() or not self._batchable(data)
                or per_set > GRID_FITS_VALUES):
            return
        memo = self.__dict__.setdefault("_grid_fits", {})
        sets = {}
        for seed, s in enumerate(splits):
            train = np.asarray(s.train)
            if _selection_sample(train, np.asarray(s.val), cfg.selection_rows, seed) is not None:
                return
            key = _rows_key(data, train)
            if key not in memo:
                sets.setdefault(key, train)
        if len(sets) < 2 or (len(memo) + len(sets)) * per_set > GRID_FITS_VALUES:
            return
        init, anchor = self.start(data)
        fits = solver.grids_together(list(sets.values()), init, anchor)
        for key, set_fits in zip(sets, fits or []):
            memo[key] = set_fits

    def reweighting_conflict(self) -> str:
        return "it fits GDA, which has no per-row loss to reweight" if self.solver == "gda" else ""

    def fit(self, data, splits, seed, found: Search | None = None) -> Fit:
        """Train on ``splits.train``, the weight decay chosen on ``splits.val``; ``found``: a
        search already run for these rows (taken only if it was made for them)."""
        train, val = np.asarray(splits.train), np.asarray(splits.val)
        gate = self.gate_for(data, train, val)
        if self.solver == "gda":
            return self._fit_gda(data, train, val, seed, gate)
        if found is None or found.train is None or not np.array_equal(found.train, train):  # not these rows' search
            found = self._search(data, train, val, seed, gate)
        best, rows = found.best, found.rows if found.rows is not None else self.training_rows(data, train, seed)
        if found.extension is None:  # a batched search: extended here, past an end of the grid if it chose one
            init, anchor = self.start(data)
            best, search, found.extension = extend_grid(rows, data.labelled_rows(val), best, found.search, data.settings,
                                                        anchor, self.scorer(data, val, gate, rows, train),
                                                        self._past_fits(data, train), init, self._decades(seed))
            found.search = search  # with the values tried past the grid
            if best is not found.best:
                found.best, found.W, found.b = best, best["W"], best["b"]
        selection = {k: best[k] for k in ("weight_decay", "iterations", "converged", "stalled", "val_accuracy",
                                          "val_log_loss") if k in best}
        selection.update(found.extension)
        W, b = self._reweighted(data, rows, train, found.W, found.b, selection)
        W, b = self.finish(W, b, self.start(data)[1])
        if found.sample is not None:
            selection["selected_on"] = {"train_rows": len(found.sample[0]), "val_rows": len(found.sample[1])}
            selection["refit"] = found.refit
            # the search scored the sample's fits; what is deployed is the fit on every training row, scored here
            # on the same validation rows
            selection["val_accuracy"], selection["val_log_loss"] = self.final_scores(data, W, b, found.sample[1], gate)
            # where refit (this seed's train + val rows, the same weight decay) starts from: a few iterations away
            self._fitted = {**getattr(self, "_fitted", {}), seed: (found.W, found.b)}
        selection["n_train_rows"] = rows.n_rows
        return Fit(W, b, selection, found.search, gate=gate)

    def _search(self, data: RunData, train: np.ndarray, val: np.ndarray, seed: int, gate: dict | None = None) -> Search:
        """One seed's logistic search: the weight decay chosen on the validation rows (by
        what the method deploys, :meth:`scorer`), the probe at that weight decay on the
        training rows."""
        init, anchor = self.start(data)
        cfg = data.settings
        grid = list(cfg.grid)
        sample = _selection_sample(train, val, cfg.selection_rows, seed)
        rows = self.training_rows(data, train, seed)
        if sample is None:
            scorer, labelled = self.scorer(data, val, gate, rows, train), data.labelled_rows(val)
            if self.extra_rows() or len(grid) * (data.embed_dim + 1) * data.n_classes > GRID_FITS_VALUES:
                best, search = select_weight_decay(rows, labelled, grid, cfg.max_iter, init, anchor, scorer)
            else:  # the grid's fits depend on the training rows alone: splits that share them share the fits
                key = _rows_key(data, train)
                memo = self.__dict__.setdefault("_grid_fits", {})
                if key not in memo:
                    while memo and (len(memo) + 1) * len(grid) * (data.embed_dim + 1) * data.n_classes > GRID_FITS_VALUES:
                        memo.pop(next(iter(memo)))  # the oldest first
                    memo[key] = fit_probes(rows, grid, cfg.max_iter, init=init, regularize_towards=anchor)
                best, search = choose(memo[key], grid, labelled, scorer)
            best, search, extension = extend_grid(rows, labelled, best, search, cfg, anchor, scorer,
                                                  self._past_fits(data, train), init, self._decades(seed))
            return Search(best, search, best["W"], best["b"], rows, extension=extension)
        # select on a seeded sample held in memory, then refit on every training row, warm-started
        best, search, extension = self._search_sample(data, sample, seed, grid, init, anchor, gate)
        W, b, info = fit_probe(rows, best["weight_decay"], cfg.max_iter, init=(best["W"], best["b"]),
                               regularize_towards=anchor, tolerance_grad=REFIT_TOLERANCE)
        return Search(best, search, W, b, rows, sample, {k: info[k] for k in ("iterations", "converged", "stalled")},
                      extension=extension)

    def _past_fits(self, data: RunData, train: np.ndarray) -> dict | None:
        """The fits past the grid (:func:`extend_grid`) already made on the training rows
        ``train``, by weight decay: a seed or split with the same rows (a cache's fixed split,
        DomainBed's shared training sets) reuses them. None for a method with extras (its rows
        differ by seed). The most recent sets of rows are kept, as many as GRID_FITS_VALUES
        holds at GRID_EXTENSION_DECADES x 2 probes a set (the most a set can have): 1,557 sets
        at d = 512, C = 7; 21 at d = 768, C = 345 (DomainNet)."""
        if self.extra_rows():
            return None
        memo = self.__dict__.setdefault("_past", {})
        key = _rows_key(data, train)
        if key not in memo:
            most = max(1, GRID_FITS_VALUES // (2 * GRID_EXTENSION_DECADES * (data.embed_dim + 1) * data.n_classes))
            while len(memo) >= most:
                memo.pop(next(iter(memo)))  # the oldest first
            memo[key] = {}
        return memo[key]

    def _search_sample(self, data, sample, seed, grid, init, anchor, gate=None) -> tuple[dict, list[dict], dict]:
        """The search on a seeded sample of the training and validation rows, held in memory
        (extended past an end of the grid that it chose)."""
        rows, labelled, scorer = self._sample_rows(data, sample, seed, gate)
        best, search = select_weight_decay(rows, labelled, grid, data.settings.max_iter, init, anchor, scorer)
        return extend_grid(rows, labelled, best, search, data.settings, anchor, scorer, init=init,
                           decades=self._decades(seed))

    def _sample_rows(self, data, sample, seed, gate=None) -> tuple[Rows, Rows, Scorer | None]:
        """The training rows, validation rows and scorer of a search on the seeded ``sample``
        ``(train rows, validation rows)`` (:func:`_selection_sample`), held in memory."""
        sub_train, sub_val = sample
        held = data.subset(np.concatenate([sub_train, sub_val]))
        local = np.arange(len(sub_train) + len(sub_val))
        rows, labelled = self.training_rows(held, local[:len(sub_train)], seed), held.labelled_rows(local[len(sub_train):])
        return rows, labelled, self.scorer(held, local[len(sub_train):], gate, rows, local[:len(sub_train)])

    def _decades(self, seed: int) -> int:
        """How many decades split ``seed``'s own search may add past an end of the grid: none
        for a leave-one-domain-out fold (:attr:`~vlaug.methods.base.Method.folds`), whose own
        choice is not used; the mean over its folds chooses, and extends them together
        (:meth:`fold_candidate`)."""
        return 0 if seed in self.folds else GRID_EXTENSION_DECADES

    def extends_grid(self) -> bool:
        return self.solver == "logistic"

    def fold_candidate(self, data: RunData, splits, seed: int, weight_decay: float) -> dict:
        """The search entry of split ``seed`` (a leave-one-domain-out fold) at ``weight_decay``,
        a value past the grid: fitted on the rows that split's search fitted (every training
        row, or its seeded sample, with the method's extras drawn as they were), scored by
        what the method deploys on its validation rows; fits already made on the same rows are
        reused (:meth:`_past_fits`)."""
        train, val = np.asarray(splits.train), np.asarray(splits.val)
        gate = self.gate_for(data, train, val)
        init, anchor = self.start(data)
        sample = _selection_sample(train, val, data.settings.selection_rows, seed)
        if sample is None:
            rows = self.training_rows(data, train, seed)
            labelled, scorer, memo = data.labelled_rows(val), self.scorer(data, val, gate, rows, train), self._past_fits(data, train)
        else:
            (rows, labelled, scorer), memo = self._sample_rows(data, sample, seed, gate), None
        return _candidate(rows, labelled, weight_decay, data.settings, anchor, scorer, memo, init)[0]

    def batch_values(self, data: RunData, splits) -> float | None:
        """How many values this method's rows built for every seed at once would hold (0:
        none, rows of the cache), or None where its seeds' full searches cannot join a batch
        (GDA, searches on a sample, a method's extras streamed, a gate or --reweight: their
        candidates are scored one by one)."""
        cfg = data.settings
        if self.solver != "logistic" or (data.x is None and self.extra_rows()) or not self._batchable(data):
            return None  # streamed extras: each block's draws are seeded by its place in the seed's own stream
        if any(_selection_sample(np.asarray(s.train), np.asarray(s.val), cfg.selection_rows, seed) is not None
               for seed, s in enumerate(splits)):
            return None
        return sum(len(s.train) for s in splits) * (1 + self.extra_rows()) * data.embed_dim if self.extra_rows() else 0

    def batch_plan(self, data: RunData, splits) -> BatchPlan:
        """What :meth:`ProbeSolver.search_together` needs to fit this method's full searches
        with others': the seeds' training rows (built once here with a method's extras, and
        kept for fit()), validation rows, start and anchor."""
        trains, vals = [np.asarray(s.train) for s in splits], [np.asarray(s.val) for s in splits]
        per_seed = [self.training_rows(data, t, seed) for seed, t in enumerate(trains)] if self.extra_rows() else None
        init, anchor = self.start(data)
        return BatchPlan(trains, vals, per_seed, init, anchor)

    def _refit_seeds(self, data: RunData, splits, solver: ProbeSolver) -> dict[int, Search]:
        """After searches on samples (one per seed, each on its own sample), the seeds'
        refits on every training row of the cache as one batch; {} where the seeds are
        fitted one by one."""
        cfg = data.settings
        if (self.solver != "logistic" or not self._fits_cache_rows() or len(splits) < 2 or not solver.state_fits(len(splits))
                or not self._batchable(data)):
            return {}
        trains, vals = [np.asarray(s.train) for s in splits], [np.asarray(s.val) for s in splits]
        samples = [_selection_sample(t, v, cfg.selection_rows, seed) for seed, (t, v) in enumerate(zip(trains, vals))]
        if any(sample is None for sample in samples):
            return {}
        members = solver.union_index(trains)
        if members is None:
            return {}
        init, anchor = self.start(data)
        grid = list(cfg.grid)
        picks = []
        for seed, sample in enumerate(samples):
            picks.append(self._search_sample(data, sample, seed, grid, init, anchor))
            release_memory()  # the sample's copy and the search's temporaries, before the next seed's (lowers the peak)
        union = solver.union_rows(trains, members)
        fits = fit_probes(union, [best["weight_decay"] for best, *_ in picks], cfg.max_iter,
                          init=(torch.stack([best["W"] for best, *_ in picks]), torch.stack([best["b"] for best, *_ in picks])),
                          regularize_towards=anchor, tolerance_grad=REFIT_TOLERANCE, columns=list(range(len(splits))))
        return {seed: Search(best, search, W, b, None, samples[seed],
                             {k: info[k] for k in ("iterations", "converged", "stalled")}, trains[seed], extension)
                for seed, ((best, search, extension), (W, b, info)) in enumerate(zip(picks, fits))}

    def refit(self, data, rows, seed, selection) -> Fit:
        train_rows = self.training_rows(data, rows, seed)
        if self.solver == "gda":
            stats = _statistics(train_rows, data.device)
            W, b = gda_weights(stats, shrunk_inverses(stats.covariance(), [selection["shrinkage"]])[0], self._priors(data))
            return Fit(W.float().to(data.device), b.float().to(data.device), {**selection, "n_train_rows": train_rows.n_rows})
        init, anchor = self.start(data)
        wd, cfg = selection["weight_decay"], data.settings
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

    def _fits_cache_rows(self) -> bool:
        """Whether this method's training rows are the cache's rows alone: no extras, and no rows
        of its own (cross-modal's class prompts, cdga's generated images, added by its
        :meth:`training_rows`). Only then may the solver fit it on the cache's rows
        (:meth:`ProbeSolver.grids_together`, :meth:`ProbeSolver.union_rows`)."""
        return not self.extra_rows() and type(self).training_rows is ProbeMethod.training_rows

    def _batchable(self, data: RunData) -> bool:
        """Whether this method's searches may join a batch: not with --reweight (each candidate
        is reweighted before it is scored) nor with a gate (scored with it, one by one)."""
        return data.settings.reweight == "none" and type(self).gate_for is ProbeMethod.gate_for

    def _fit_gda(self, data: RunData, train: np.ndarray, val: np.ndarray, seed: int, gate: dict | None = None) -> Fit:
        """GDA on the training rows (and the method's extras): one pass for the class
        statistics, one eigendecomposition, every shrinkage of SHRINKAGE_GRID scored on the
        validation rows (what the method deploys: with its gate or ensemble, each candidate
        calibrated); the best accuracy wins, ties to the lower log-loss."""
        rows = self.training_rows(data, train, seed)
        stats = _statistics(rows, data.device)
        priors = self._priors(data)
        fits = [gda_weights(stats, inv, priors) for inv in shrunk_inverses(stats.covariance(), SHRINKAGE_GRID)]
        theta = torch.stack([torch.cat([W, b[None]]) for W, b in fits]).float().to(data.device)
        scores = self.deployed_scores(data, theta, val, gate)
        search, best = [], None
        for alpha, (accuracy, log_loss), th in zip(SHRINKAGE_GRID, scores, theta):
            search.append({"shrinkage": alpha, "val_accuracy": accuracy, "val_log_loss": log_loss})
            if best is None or is_better((accuracy, log_loss), (best[0]["val_accuracy"], best[0]["val_log_loss"])):
                best = (search[-1], th)
        entry, th = best
        return Fit(th[:-1], th[-1], {**entry, "n_train_rows": rows.n_rows}, search, gate=gate)

    def _priors(self, data: RunData) -> torch.Tensor | None:
        """GDA's class priors: uniform with --class-weight, else the training rows' frequencies (None)."""
        c = data.n_classes
        return torch.full((c,), 1.0 / c, dtype=torch.float64) if data.settings.class_weight else None

    def _reweighted(self, data: RunData, rows: Rows, train: np.ndarray, W, b, selection: dict):
        """With --reweight (in memory only: prepare refuses it for a streamed cache), the
        reweighted probe at the chosen weight decay; else ``W``, ``b``."""
        scheme = data.settings.reweight
        if scheme == "none":
            return W, b
        x, t, hard = materialize(rows)
        # with extras, or rows of a method's own (cross-modal's prompts, cdga's generated images), which have no
        # domain, no row's domain is used: groupdro groups by class, seed-category ranks every row in one pool
        dom = data.dom[data.rows(train)] if self._fits_cache_rows() else None
        W, b, rw = fit_reweighted(x, t, hard, selection["weight_decay"], scheme, dom, init=(W, b), **REWEIGHT_SCHEDULE)
        selection["reweight"] = {"scheme": scheme, **rw}
        return W, b

    def blocks(self, data: RunData, rows: np.ndarray, seed: int):
        """Training rows ``rows`` block by block with the method's extras: ``(x, labels, extra)``,
        ``extra`` = (x, soft targets) or None. Block k draws its augmentations from its own
        generator (seeded by (seed, k)), so every pass over a streamed cache sees the same rows.
        A method that pairs rows across the training set (``streams`` False: mixup,
        xdomain-mix) gets every row as one block, so that any two rows can pair."""
        augment = self.augmenter(data, rows)
        if not self.streams and data.x is not None and self.extra_rows():
            r = data.rows(rows)
            x = data.x[r].float()
            yield x, data.y[r], augment(data, x, data.y[r], data.dom[r], block_generator(seed, 0))
            return
        for k, (pos, x) in enumerate(data.stream(rows)):
            r = data.rows(rows[pos])
            yield x, data.y[r], augment(data, x, data.y[r], data.dom[r], block_generator(seed, k))

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
        per_class = data.class_weights(counts)

        def weighted():
            for x, t, *index in unweighted():
                yield x, t, per_class[hard(t)], *index

        return Rows(weighted, data.embed_dim, c, int(counts.sum()), data.device)


# Built rows (originals and a method's extras, in blocks) of at most this many values are
# joined into one block: every block costs each evaluation of the objective its own dozen
# operators, much of a small fit's time.
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


def extend_grid(rows: Rows, val: Rows, best: dict, search: list[dict], settings, anchor: torch.Tensor | None,
                scorer: Scorer | None = None, memo: dict | None = None,
                init: tuple[torch.Tensor, torch.Tensor] | None = None,
                decades: int = GRID_EXTENSION_DECADES) -> tuple[dict, list[dict], dict]:
    """The search continued past an end of the weight-decay grid that it chose: a decade at a
    time (each fit from the method's starting weights ``init``, as the grid's are, scored like
    the grid, by ``scorer``; taken only with a higher validation accuracy), until the best is interior
    or ``decades`` were added on that side. Not warm-started from the best: past the
    weak end, L-BFGS from a nearby minimiser crawled (steps of 1e-3, 200 iterations, still 20 %
    from the minimiser on a separable 200-row problem) where the same fit from zeros converged
    in 25. ``memo``: fits already made on the same training rows, by weight decay: a split that
    shares its rows with an earlier one reuses them. Returns the
    best, the search (each added candidate marked ``"extension": true``) and
    ``{"grid_extended", "grid": [lowest, highest weight decay tried]}``."""
    grid = [c["weight_decay"] for c in search]
    info = {"grid_extended": False, "grid": [min(grid), max(grid)]}
    if len(grid) < 2:
        return best, search, info
    search = list(search)
    for factor in (0.1, 10.0):  # the weak end, then the strong end
        end = min(grid) if factor < 1 else max(grid)
        for _ in range(decades):
            if best["weight_decay"] != end:
                break
            end *= factor
            entry, W, b = _candidate(rows, val, end, settings, anchor, scorer, memo, init)
            search.append(entry)
            info = {"grid_extended": True, "grid": [min(info["grid"][0], end), max(info["grid"][1], end)]}
            if entry["val_accuracy"] > best["val_accuracy"]:  # a higher accuracy only (see above the module's constants)
                best = {**entry, "W": W, "b": b}
    return best, search, info


def _candidate(rows: Rows, val: Rows, weight_decay: float, settings, anchor: torch.Tensor | None,
               scorer: Scorer | None, memo: dict | None, init: tuple[torch.Tensor, torch.Tensor] | None
               ) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The search entry of one weight decay past the grid (marked ``"extension": true``), with
    its weights: fitted on ``rows`` from ``init`` (or taken from ``memo``, the fits already made
    on the same rows, by weight decay), scored on ``val`` by ``scorer``."""
    if memo is not None and weight_decay in memo:
        W, b, fit = memo[weight_decay]
    else:
        W, b, fit = fit_probe(rows, weight_decay, settings.max_iter, init=init, regularize_towards=anchor)
        if memo is not None:
            memo[weight_decay] = (W, b, fit)
    theta = torch.cat([W, b[None]])[None]
    (accuracy, log_loss), = scorer(theta, [weight_decay]) if scorer is not None else validation_scores(val, theta)
    return {"weight_decay": weight_decay, **fit, "val_accuracy": accuracy, "val_log_loss": log_loss, "extension": True}, W, b


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
    summary = 'the original embeddings (LARE\'s "fine-tuning" baseline)'


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
    summary = (
        'originals, starting from (and regularised towards) the zero-shot classifier; final weights '
        '(1−λ)·zero-shot + λ·trained (WiSE-FT)'
    )
    Options = LinearZSOptions

    def prompt_sets(self):
        return [CLASSES_PROMPT_SET]

    def start(self, data):
        anchor = zero_shot_weights(data.text)
        return (anchor, torch.zeros(data.n_classes, device=data.device)), anchor

    def finish(self, W, b, anchor):
        lam = self.options.wise
        return (1 - lam) * anchor + lam * W, lam * b
