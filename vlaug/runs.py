"""The types a probe run hands from layer to layer: the run's settings
(:class:`ProbeRunConfig`), the few of them a method reads (:class:`MethodSettings`) and
what the run produces (:class:`ProbeRun`).

A leaf module: the CLI builds a config, :mod:`vlaug.evaluate` plans and runs it, the
methods (:mod:`vlaug.methods`) read their settings, :mod:`vlaug.report` writes the
result; each imports these types from here, none of them from another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vlaug.choices import PROTOCOLS, REWEIGHTS
from vlaug.errors import UsageError
from vlaug.probe import LinearProbe, weight_decay_grid


@dataclass(frozen=True)
class MethodSettings:
    """What a method reads of the run's settings: the weight-decay grid it searches, the
    L-BFGS iterations of a fit, when to select on a sample, how to weight and reweight rows."""

    grid: tuple[float, ...] = tuple(weight_decay_grid(8))  # weight decays, strongest first
    max_iter: int = 200  # L-BFGS iterations per fit
    selection_rows: int = 25_000  # above this many training rows, select on a seeded sample (0: never)
    reweight: str = "none"  # none | groupdro | seed-category | seed-category-kmeans
    class_weight: bool = False  # weight rows by inverse class frequency


@dataclass(frozen=True)
class ProbeRunConfig:
    """Everything ``vlaug probe`` needs; the defaults are the CLI's."""

    features: str = ""
    out: str = ""
    methods: tuple[str, ...] = ("zero-shot", "linear")
    train_domains: tuple[str, ...] = ()
    seeds: int = 5  # seeds 0..seeds-1: splits, augmentation sampling, joint training
    test_fraction: float = 0.2  # held-out part of the training domains when the cache has no split
    val_fraction: float = 0.2  # validation part of the training rows
    # K training rows per class; several values (a tuple): the sweep, one run per K on the same seeds' nested draws
    shots: int | tuple[int, ...] | None = None
    # with shots: validation rows per class (None: min(K, 4)), or "all" (every held-out validation row)
    val_shots: int | str | None = None
    imbalance: str | None = None  # "X:N": X % of classes reduced to N training rows
    reweight: str = "none"  # none | groupdro | seed-category
    grid_size: int = 8  # log-spaced weight-decay grid from 1e-1 to 1e-6
    max_iter: int = 200  # L-BFGS iterations per fit
    # above this many training rows, the weight decay is selected on a seeded sample of this
    # many training (and validation) rows, then one warm-started refit uses every row; 0: never
    selection_rows: int = 25_000
    class_weight: bool = False  # weight rows by inverse class frequency
    device: str = "auto"
    memory_budget: str = "auto"  # stream the cache from disk when it needs more memory (auto: RAM / 4)
    heads: str = ""  # a folder of head folders: --method all (and a head-needing method without :DIR) takes heads from it
    tsne: bool = False  # t-SNE instead of PCA for the embedding plot
    allow_incomplete: bool = False  # probe a cache whose embed run was interrupted (the report says so)
    # "single": train on --train-domain, test on the rest (LARE's protocol); "leave-one-domain-out": DomainBed's
    # (vlaug.domainbed): each domain in turn is the test domain, under the model selections of ``selection``
    protocol: str = "single"
    test_domains: tuple[str, ...] = ()  # leave-one-domain-out: the test domains (default: every domain in turn)
    selection: str = "training-domain"  # leave-one-domain-out: training-domain | leave-one-domain-out | oracle | all
    holdout_fraction: float = 0.2  # leave-one-domain-out: each domain's `out` part (DomainBed's holdout_fraction)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.seeds < 1:
            raise UsageError(f"--seeds {self.seeds}, must be >= 1.")
        if not 0.0 < self.test_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"--test-fraction {self.test_fraction} and --val-fraction {self.val_fraction} must be in (0, 1).")
        if isinstance(self.shots, (tuple, list)):
            values = tuple(int(k) for k in self.shots)
            if not values or len(set(values)) < len(values):
                raise UsageError(f"--shots {','.join(map(str, values))}: give each K once.")
            object.__setattr__(self, "shots", values[0] if len(values) == 1 else tuple(sorted(values)))
        if any(k < 1 for k in self.shots_list):
            raise UsageError(f"--shots {self.shots}, must be >= 1.")
        if self.val_shots is not None:
            if self.shots is None:
                raise UsageError("--val-shots belongs to --shots (few-shot validation); add --shots K, or leave it out.")
            if self.val_shots != "all" and not (isinstance(self.val_shots, int) and self.val_shots >= 1):
                raise UsageError(f"--val-shots {self.val_shots!r}: give a number of rows per class (>= 1) or 'all'.")
        if self.reweight not in REWEIGHTS:
            raise UsageError(f"--reweight {self.reweight!r}, must be one of {REWEIGHTS}.")
        if not self.methods:
            raise UsageError("give at least one --method.")
        if self.grid_size < 1 or self.max_iter < 10:
            raise UsageError(f"--grid-size {self.grid_size} must be >= 1 and --max-iter {self.max_iter} >= 10.")
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"--protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}.")
        if self.protocol == "single" and (self.test_domains or self.selection != "training-domain"):
            raise UsageError("--test-domain and --selection belong to --protocol leave-one-domain-out; add it, or leave them "
                             "out (--protocol single tests on every domain but the --train-domain ones).")
        if self.protocol != "single":
            given = [flag for flag, value in (("--train-domain", self.train_domains), ("--shots", self.shots),
                                              ("--imbalance", self.imbalance)) if value]
            if given:
                raise UsageError(f"{given[0]} belongs to --protocol single; under leave-one-domain-out every domain is "
                                 "a training domain in turn (pick the test domains with --test-domain).")
            if not 0.0 < self.holdout_fraction < 1.0:
                raise UsageError(f"--holdout-fraction {self.holdout_fraction}, must be in (0, 1).")
        if self.selection_rows < 0 or 0 < self.selection_rows < 100:
            raise UsageError(f"--selection-rows {self.selection_rows}; use 0 (select on every row) or at least 100.")

    @property
    def shots_list(self) -> tuple[int, ...]:
        """The K of every run: () without --shots, one value, or the sweep's, ascending."""
        return () if self.shots is None else self.shots if isinstance(self.shots, tuple) else (self.shots,)

    def method_settings(self) -> MethodSettings:
        """The settings every method of this run reads."""
        return MethodSettings(tuple(weight_decay_grid(self.grid_size)), self.max_iter, self.selection_rows,
                              self.reweight, self.class_weight)


@dataclass
class ProbeRun:
    """What :func:`vlaug.evaluate.run_probe` returns: the report and what is written beside it."""

    report: dict  # report.json's contents but the files the writer adds (probe_dirs, plots)
    probes: dict[str, LinearProbe]  # method -> its probe refitted on train + val of seed 0 (probes/METHOD/)
    cache: dict  # the cache's identity (checkpoint.cache_identity), recorded in every saved probe
    first_train: tuple[np.ndarray, np.ndarray, np.ndarray]  # (x, labels, domains) of the geometry rows, seed 0
    projections: dict[str, tuple[np.ndarray, np.ndarray, int]]  # method -> (x with extras, labels, n originals)
    box_stats: dict[str, dict | None]  # box head folder -> its stats.json
    texts_used: dict[str, dict] = field(default_factory=dict)  # method -> {prompt set: templates} its probe holds
    # every test row's prediction per method and seed (test_predictions.parquet): method, seed, row, id, domain,
    # label, prediction; the string columns as Coded
    test_predictions: dict[str, "np.ndarray | Coded"] = field(default_factory=dict)


@dataclass(frozen=True)
class Coded:
    """A string column held as codes into its distinct values: test_predictions' method, id
    and domain columns (a DomainNet-size DomainBed run predicts tens of millions of rows,
    of a few hundred thousand distinct ids and a handful of methods and domains; as Python
    strings they took about 8 bytes a row per column, and a copy per column to write).
    Written as a Parquet dictionary column, which readers decode to the strings."""

    codes: np.ndarray  # (n,) int32: the row's index in values
    values: np.ndarray  # (k,) object: the distinct strings

    def __len__(self) -> int:
        return len(self.codes)

    def decoded(self) -> np.ndarray:
        return self.values[self.codes]

    @staticmethod
    def of(parts: list[tuple[str, int]]) -> "Coded":
        """(value, count) runs, in order: ``count`` rows of each ``value``."""
        values = list(dict.fromkeys(v for v, _ in parts))
        index = {v: i for i, v in enumerate(values)}
        codes = np.concatenate([np.full(n, index[v], np.int32) for v, n in parts] or [np.zeros(0, np.int32)])
        return Coded(codes, np.asarray(values, dtype=object))

    @staticmethod
    def concat(parts: list["Coded"]) -> "Coded":
        """The rows of ``parts`` in order, over the union of their values."""
        values = list(dict.fromkeys(v for p in parts for v in p.values.tolist()))
        index = {v: i for i, v in enumerate(values)}
        codes = [np.asarray([index[v] for v in p.values.tolist()], dtype=np.int32)[p.codes] if len(p.values) else p.codes
                 for p in parts]
        return Coded(np.concatenate(codes or [np.zeros(0, np.int32)]), np.asarray(values, dtype=object))


class Plots(Protocol):
    """Where a run hands its plots' data as soon as it is known (to be drawn while it goes
    on): :class:`vlaug.report.PlotWorker`."""

    def submit_data(self, first_train: tuple, projections: dict, tsne: bool, classes: list[str], box_stats: dict) -> None:
        """The data's plots (embeddings, box volumes): known before any fit."""

    def submit_results(self, report: dict) -> None:
        """The results' plots (accuracy, trade-off, per domain): known once every seed is fitted."""
