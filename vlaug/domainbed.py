"""The DomainBed protocol (Gulrajani & Lopez-Paz, 2021): leave-one-domain-out evaluation
under three model-selection methods (``vlaug probe --protocol leave-one-domain-out``).

Pure bookkeeping over :mod:`vlaug.protocols`' row indices: :func:`plan_tasks` turns the
seeds × test domains × selections into training problems (:class:`Task`: a
:class:`~vlaug.protocols.Splits` each, fitted by the methods exactly as the seeds of
``--protocol single`` are), :func:`select` picks each selection's configuration from the
fitted tasks, and :func:`tables` builds DomainBed's tables. :mod:`vlaug.evaluate` runs them.

Per seed (DomainBed's trial), each domain's rows are split into ``in`` (80 %) and ``out``
(20 %, stratified by class; :func:`vlaug.protocols.in_out_splits`). For each test domain T,
the training domains are the others, and:

- **training-domain validation**: train on the training domains' ``in`` rows, select on
  their ``out`` rows: the mean over the training domains of the accuracy on each (each
  domain's rows weigh 1/its count, as DomainBed averages the domains' accuracies);
- **leave-one-domain-out**: for each training domain v, train on the ``in`` rows of the other
  training domains and score every candidate on v's ``in`` rows; the candidate with the best
  mean over v is trained on every training domain's ``in`` rows;
- **oracle (test-domain validation)**: train on the training domains' ``in`` rows, select on
  T's ``out`` rows. It uses test-domain labels; the report keeps it apart.

Every selection reports the accuracy on T's ``in`` rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vlaug.errors import UsageError
from vlaug.protocols import Splits, in_out_splits

TRAINING_DOMAIN, LODO, ORACLE = "training-domain", "leave-one-domain-out", "oracle"
SELECTIONS = (TRAINING_DOMAIN, LODO, ORACLE)
EMPTY = np.zeros(0, dtype=np.int64)
# what identifies a candidate of a method's own search (a search entry's keys): the logistic
# probe's weight decay, GDA's shrinkage, a joint method's learning rate and weight decay
CANDIDATE_KEYS = ("lr", "weight_decay", "shrinkage", "alpha", "beta")  # alpha, beta: Tip-Adapter's cache


def parse_selections(text: str) -> tuple[str, ...]:
    """``--selection``: one of SELECTIONS, or ``all``."""
    if text == "all":
        return SELECTIONS
    if text not in SELECTIONS:
        raise UsageError(f"--selection {text!r}; use one of {', '.join(SELECTIONS)} or all.")
    return (text,)


@dataclass
class Task:
    """One training problem of the protocol: train on ``splits.train``, select on
    ``splits.val``; ``splits.test_out`` is the test domain's ``in`` rows (a fold's model is not
    tested: the model refitted at the folds' choice is)."""

    seed: int
    test_domain: str
    role: str  # TRAINING_DOMAIN, ORACLE, or LODO for a fold (validation domain ``fold``)
    splits: Splits
    fold: str = ""
    calibration: np.ndarray = field(default_factory=lambda: EMPTY)  # a fold's: the training domains' out rows (calibrate the refitted model's ensemble)


def plan_tasks(labels: np.ndarray, domains: np.ndarray, splits: np.ndarray, domain_names: list[str],
               test_domains: list[str], seeds: int, selections: tuple[str, ...],
               holdout_fraction: float) -> list[Task]:
    """Every training problem of the run, seed by seed, test domain by test domain."""
    if len(domain_names) < 2 + (LODO in selections):
        need = "three domains (two training domains to hold out in turn)" if LODO in selections else "two domains"
        raise UsageError(f"--protocol leave-one-domain-out needs at least {need}; the cache has {domain_names or ['(none)']}.")
    tasks = []
    for seed in range(seeds):
        parts = in_out_splits(labels, domains, splits, domain_names, seed, holdout_fraction)
        for test in test_domains:
            train_domains = [d for d in domain_names if d != test]
            train = np.sort(np.concatenate([parts[d][0] for d in train_domains]))
            test_in, test_out = parts[test]
            if TRAINING_DOMAIN in selections:
                val = np.sort(np.concatenate([parts[d][1] for d in train_domains]))
                tasks.append(Task(seed, test, TRAINING_DOMAIN, Splits(train, val, EMPTY, test_in)))
            if ORACLE in selections:
                tasks.append(Task(seed, test, ORACLE, Splits(train, test_out, EMPTY, test_in)))
            if LODO in selections:
                for v in train_domains:
                    rest = np.sort(np.concatenate([parts[d][0] for d in train_domains if d != v]))
                    tasks.append(Task(seed, test, LODO, Splits(rest, parts[v][0], EMPTY, test_in), fold=v,
                                      calibration=np.sort(np.concatenate([parts[d][1] for d in train_domains]))))
    return tasks


def training_domain_sets(tasks: list[Task], domain_names: list[str]) -> list[list[str]]:
    """The distinct sets of training domains of the run's fits (each task's domains but its
    test domain and fold), in task order."""
    sets = [[d for d in domain_names if d not in (t.test_domain, t.fold)] for t in tasks]
    return [list(s) for s in dict.fromkeys(tuple(s) for s in sets)]


def candidate_key(entry: dict) -> tuple:
    """A search entry's candidate: its values of CANDIDATE_KEYS."""
    return tuple((k, entry[k]) for k in CANDIDATE_KEYS if k in entry)


def _better(a: tuple[float, float], b: tuple[float, float] | None) -> bool:
    """Higher accuracy, then lower log-loss (the probe's order, vlaug.probe.is_better)."""
    return b is None or a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


def best_config(scores: list[tuple[float, float]]) -> int:
    """The index of the best ``(val_accuracy, val_log_loss)``; the first of equals."""
    best = None
    for i, s in enumerate(scores):
        if best is None or _better(s, scores[best]):
            best = i
    return best


def lodo_choice(fold_searches: list[list[dict]]) -> tuple[dict, list[dict]] | None:
    """Leave-one-domain-out's choice among one configuration's candidates: ``fold_searches``
    holds each fold's search (entries with CANDIDATE_KEYS and ``val_accuracy`` /
    ``val_log_loss``); the candidates scored in every fold, each by its mean over the folds.
    Returns (the best candidate's entry with the means, every candidate's means), or None
    when no candidate was scored in every fold."""
    by_fold = [{candidate_key(e): e for e in search} for search in fold_searches]
    common = [k for k in by_fold[0] if all(k in f for f in by_fold[1:])]
    if not common:
        return None
    means = []
    for key in common:
        entries = [f[key] for f in by_fold]
        # rounded: two candidates whose folds' accuracies have the same mean compare equal (then the log-loss decides),
        # whatever the order of the float sums
        means.append({**dict(key), "val_accuracy": round(float(np.mean([e["val_accuracy"] for e in entries])), 12),
                      "val_log_loss": round(float(np.mean([e["val_log_loss"] for e in entries])), 12),
                      "fold_val_accuracy": [e["val_accuracy"] for e in entries],
                      **({"selected_step": int(round(np.mean([e["selected_step"] for e in entries])))}
                         if all("selected_step" in e for e in entries) else {})})
    best = best_config([(m["val_accuracy"], m["val_log_loss"]) for m in means])
    return means[best], means


def extended_choice(fold_searches: list[list[dict]], candidate: Callable[[int, float], dict], decades: int
                    ) -> tuple[tuple[dict, list[dict]] | None, dict]:
    """:func:`lodo_choice` for a method whose search extends the weight-decay grid
    (vlaug.methods.linear.extend_grid), with the rule applied to the mean over the folds: where
    the mean chooses an end of the grid, every fold is fitted a decade past it
    (``candidate(k, weight_decay)``: fold k's search entry there, appended to
    ``fold_searches[k]``), until the mean's best is interior or ``decades`` were added on that
    side; a value past the grid is taken only with a higher mean accuracy, as in one search.
    A fold's own choice plays no part (its search does not extend by itself). Returns the
    choice and ``{"grid_extended", "grid": [lowest, highest weight decay tried]}``."""
    choice = lodo_choice(fold_searches)
    if choice is None:
        return None, {}
    grid = [m["weight_decay"] for m in choice[1]]
    info = {"grid_extended": False, "grid": [min(grid), max(grid)]}
    best = choice[0]
    if len(grid) < 2:
        return choice, info
    for factor in (0.1, 10.0):  # the weak end, then the strong end
        end = min(grid) if factor < 1 else max(grid)
        for _ in range(decades):
            if best["weight_decay"] != end:
                break
            end *= factor  # the same arithmetic as each search's extension: the folds' values compare equal
            for k, search in enumerate(fold_searches):
                if not any(e.get("weight_decay") == end for e in search):
                    search.append(candidate(k, end))
            mean = next(m for m in lodo_choice(fold_searches)[1] if m["weight_decay"] == end)
            info = {"grid_extended": True, "grid": [min(info["grid"][0], end), max(info["grid"][1], end)]}
            if mean["val_accuracy"] > best["val_accuracy"]:  # a higher accuracy only, as in extend_grid
                best = mean
    return (best, lodo_choice(fold_searches)[1]), info


def tables(results: list[dict], methods: list[str], test_domains: list[str]) -> dict[str, list[dict]]:
    """DomainBed's tables, one per selection: per method, per test domain the mean and std
    (population, over seeds) of the accuracy on the test domain's ``in`` rows, and ``Avg``:
    the mean over test domains of those means, with the std over seeds of each seed's mean
    over test domains (DomainBed prints no spread for Avg)."""
    out = {}
    for selection in SELECTIONS:
        rows = [r for r in results if r["model_selection"] == selection]
        if not rows:
            continue
        table = []
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            entry = {"method": method, "domains": {}, "n_configurations": mine[0]["n_configurations"] if mine else 0}
            for d in test_domains:
                values = [r["out_of_domain"] for r in mine if r["test_domain"] == d]
                if values:
                    entry["domains"][d] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                                           "se": float(np.std(values) / np.sqrt(len(values))), "n_seeds": len(values)}
            seeds = sorted({r["seed"] for r in mine})
            per_seed = [np.mean([r["out_of_domain"] for r in mine if r["seed"] == s]) for s in seeds
                        if len({r["test_domain"] for r in mine if r["seed"] == s}) == len(test_domains)]
            if len(entry["domains"]) == len(test_domains) and per_seed:
                entry["avg"] = {"mean": float(np.mean([v["mean"] for v in entry["domains"].values()])),
                                "std": float(np.std(per_seed))}
            table.append(entry)
        out[selection] = table
    return out
