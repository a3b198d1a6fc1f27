"""An independent check of ``vlaug probe --protocol leave-one-domain-out`` (DomainBed's
protocol, vlaug/domainbed.py) with scikit-learn.

What it checks. On a 4-domain simulated cache (:mod:`vlaug.simulate`, or a cache given with
``--cache``), it runs vlaug's probe with ``-m linear --protocol leave-one-domain-out
--selection all`` and then computes DomainBed's table again with scikit-learn's
``LogisticRegression(solver="lbfgs")`` on vlaug's own splits:

- the splits: every task (seed × test domain × role, and each leave-one-domain-out fold) is
  rebuilt with :func:`vlaug.domainbed.plan_tasks` (each domain's in/out parts from
  :func:`vlaug.protocols.in_out_splits`) from the cache's labels, domains and split column,
  and its row counts and split fingerprints are checked against report.json's
  ``protocol.tasks`` (the check stops if they differ: the numbers would not be comparable);
- the probe: vlaug minimises (1/N)·Σ CE + (wd/2)·‖W‖² (no penalty on the bias); scikit-learn
  minimises C·Σ CE + ½·‖W‖² (no penalty on the intercept with lbfgs), the same problem at
  C = 1 / (wd · N), N the training rows (as tests/test_probe.py and
  benchmarks/probe_speed.py map it), fitted to a tight tolerance;
- the grid: report.json's ``protocol.weight_decay_grid``, extended past an end, a decade at a
  time and at most 3 decades, only while the best sits at that end, the weak end first
  (vlaug.methods.linear.extend_grid; a value past the grid is taken only with a higher
  accuracy); for leave-one-domain-out, while the best *mean over the folds* sits at that end,
  every fold scoring the next decade (vlaug.domainbed.extended_choice);
- the selection rule: the highest validation accuracy, ties to the lower validation log-loss,
  then the first in the grid's order (strongest weight decay first);
- the three model selections, reimplemented here from DomainBed's definitions, not taken
  from vlaug:
  * training-domain: train on the training domains' ``in`` rows, score on their ``out`` rows
    as the mean over the training domains of each domain's accuracy (and log-loss);
  * leave-one-domain-out: for each training domain v, train on the other training domains'
    ``in`` rows, score on v's ``in`` rows; the candidate with the best mean over v (ties:
    lower mean log-loss) is refitted on every training
    domain's ``in`` rows;
  * oracle: train on the training domains' ``in`` rows, select on the test domain's ``out`` rows;

and every selection's model is scored on the test domain's ``in`` rows.

It prints, per selection and test domain (and their average), vlaug's and scikit-learn's
accuracy (mean over seeds), the difference in points and whether it is within
``--tolerance`` points (default 1), and how often the two chose the same weight decay; it
exits 1 if any accuracy differs by more.

Accuracies are compared exactly in the selections (fractions: a mean of accuracies in floating
point can split a tie that should go to the log-loss). Expected differences: a borderline
validation row or two classified differently by vlaug's fit (float32, largest gradient entry
below 1e-5, at most 200 L-BFGS iterations) and scikit-learn's (float64, tol 1e-10), which
at a near-tie can move the chosen weight decay (about 1 choice in 12 on the defaults), a few
tenths of a point on one seed's test accuracy.

Run (about 20 s on 2 CPU cores with the defaults: 7 classes, d = 64, 150 rows per class
and domain, 2 seeds)::

    python benchmarks/domainbed_sklearn.py [--seeds 2] [--json numbers.json]
    python benchmarks/domainbed_sklearn.py --cache PATH   # an existing cache instead

tests/test_domainbed_sklearn.py runs a small version.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np

TRAINING_DOMAIN, LODO, ORACLE = "training-domain", "leave-one-domain-out", "oracle"
SELECTIONS = (TRAINING_DOMAIN, LODO, ORACLE)
EXTENSION_DECADES = 3  # vlaug.methods.linear.GRID_EXTENSION_DECADES
METHOD = "linear"


# ----------------------------------------------------------------------------- the cache and vlaug's run


def build_cache(path: str | Path, n_classes: int = 7, d: int = 64, n_per_class: int = 150, seed: int = 0) -> Path:
    """A simulated 4-domain cache (vlaug.simulate.shifted_domains) at ``path``."""
    from vlaug import simulate

    p = simulate.SimParams(n_per_class=n_per_class, d=d, n_classes=n_classes, seed=seed)
    return simulate.write_cache(path, simulate.shifted_domains(p), p)


def run_vlaug(cache: str | Path, out: str | Path, seeds: int) -> dict:
    """vlaug's report of ``probe CACHE -m linear --protocol leave-one-domain-out --selection all``."""
    from vlaug.evaluate import run_probe
    from vlaug.runs import ProbeRunConfig

    config = ProbeRunConfig(features=str(cache), out=str(out), methods=(METHOD,), seeds=seeds,
                            protocol="leave-one-domain-out", selection="all", progress=False)
    return run_probe(config).report


# ----------------------------------------------------------------------------- the splits


def rebuild_tasks(cache: str | Path, report: dict):
    """vlaug's tasks rebuilt from the cache's metadata (vlaug.domainbed.plan_tasks), checked
    against report.json's ``protocol.tasks``: the same tasks, row counts and fingerprints.
    Returns (the tasks, the cache's embeddings (n, d) float64, labels)."""
    from vlaug import cache as cache_io
    from vlaug.domainbed import plan_tasks
    from vlaug.evaluate import split_fingerprints
    from vlaug.protocols import id_fractions

    protocol = report["protocol"]
    meta = cache_io.read_metadata(cache)
    domain_names = sorted(d for d in np.unique(meta.domains).tolist() if d)
    if domain_names != protocol["domains"]:
        raise SystemExit(f"the cache's domains {domain_names} are not the report's {protocol['domains']}")
    tasks = plan_tasks(meta.labels, meta.domains, meta.splits, domain_names, protocol["test_domains"],
                       len(protocol["seeds"]), tuple(protocol["selections"]), protocol["holdout_fraction"])
    fractions = id_fractions(cache_io.iter_ids(cache))
    theirs = {(t["seed"], t["test_domain"], t["role"], t["fold"]): t for t in protocol["tasks"]}
    if len(theirs) != len(tasks):
        raise SystemExit(f"report.json has {len(theirs)} tasks, the rebuilt plan {len(tasks)}")
    for t in tasks:
        key = (t.seed, t.test_domain, t.role, t.fold)
        mine = {"train": len(t.splits.train), "val": len(t.splits.val), "test": len(t.splits.test_out),
                "fingerprints": split_fingerprints(t.splits, fractions)}
        if key not in theirs or any(theirs[key][k] != v for k, v in mine.items()):
            raise SystemExit(f"task {key}: rebuilt {mine}, report.json {theirs.get(key)}")
    x = cache_io.read_cache(cache).embeddings.astype(np.float64)
    return tasks, x, meta.labels, meta.domains


# ----------------------------------------------------------------------------- scikit-learn


class Fitter:
    """scikit-learn's probe at each weight decay on each set of training rows (fitted once:
    the training-domain and oracle tasks and the leave-one-domain-out refit share rows)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int, max_iter: int = 10_000, tol: float = 1e-10):
        self.x, self.y, self.n_classes, self.max_iter, self.tol = x, y, n_classes, max_iter, tol
        self.fits: dict[tuple[bytes, float], tuple[np.ndarray, np.ndarray]] = {}
        self.not_converged = 0

    def __call__(self, train: np.ndarray, wd: float) -> tuple[np.ndarray, np.ndarray]:
        """(coef (C, d), intercept (C,)) of the fit on rows ``train`` at weight decay ``wd``."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        key = (np.sort(train).tobytes(), wd)
        if key not in self.fits:
            n = len(train)
            clf = LogisticRegression(solver="lbfgs", C=1.0 / (wd * n), max_iter=self.max_iter, tol=self.tol)
            # one BLAS thread: these small products run 10-100x slower on several threads that
            # compete for a few cores (measured on 2 cores)
            with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1):
                warnings.simplefilter("always", ConvergenceWarning)
                clf.fit(self.x[train], self.y[train])
            self.not_converged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
            coef, intercept = np.zeros((self.n_classes, self.x.shape[1])), np.full(self.n_classes, -np.inf)
            coef[clf.classes_], intercept[clf.classes_] = clf.coef_, clf.intercept_  # a class absent from train: never predicted
            self.fits[key] = (coef, intercept)
        return self.fits[key]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(1, keepdims=True))


def scores(model: tuple[np.ndarray, np.ndarray], x: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None
           ) -> tuple[Fraction, float]:
    """(accuracy, mean log-loss) on rows ``x``, ``y``; with ``groups``, the mean over the groups
    of each group's (the training-domain validation score: each domain weighs the same).

    The accuracy is an exact fraction: a mean of accuracies (over domains here, over folds in
    :func:`lodo_choice`) computed in floating point can split a tie (two candidates with the
    same hits, spread differently over the domains: 201, 201, 194 and 200, 199, 197 of 210
    each give 0.9460317460317461 and ...459 in float64), and a tie goes to the log-loss."""
    coef, intercept = model
    z = x @ coef.T + intercept
    hit = z.argmax(1) == y
    loss = -_log_softmax(z)[np.arange(len(y)), y]
    if groups is None:
        return Fraction(int(hit.sum()), len(y)), float(loss.mean())
    parts = [groups == g for g in np.unique(groups)]
    return (sum(Fraction(int(hit[p].sum()), int(p.sum())) for p in parts) / len(parts),
            float(np.mean([loss[p].mean() for p in parts])))


def _better(a: tuple[float, float], b: tuple[float, float] | None) -> bool:
    """Higher accuracy, then lower log-loss."""
    return b is None or a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


def search(grid: list[float], score) -> list[dict]:
    """One task's search: every value of ``grid`` scored (``score(wd) -> (accuracy, log-loss)``),
    then values past an end of the grid while the best sits at that end (a decade at a time,
    at most EXTENSION_DECADES, the weak end first; taken only with a higher accuracy, as
    vlaug.methods.linear.extend_grid). Returns the entries tried, in order,
    the chosen one marked ``best``."""
    entries, best = [], None
    for wd in grid:
        entries.append({"weight_decay": wd, "score": score(wd)})
        if best is None or _better(entries[-1]["score"], best["score"]):
            best = entries[-1]
    for factor in (0.1, 10.0):
        end = min(grid) if factor < 1 else max(grid)
        for _ in range(EXTENSION_DECADES):
            if best["weight_decay"] != end:
                break
            end *= factor  # the same float arithmetic as vlaug: extended values compare equal across folds
            entry = {"weight_decay": end, "score": score(end), "extension": True}
            entries.append(entry)
            if entry["score"][0] > best["score"][0]:
                best = entry
    best["best"] = True
    return entries


def _chosen(entries: list[dict]) -> dict:
    return next(e for e in entries if e.get("best"))


def lodo_choice(fold_entries: list[list[dict]]) -> tuple[float, tuple[Fraction, float]]:
    """Leave-one-domain-out's weight decay on the grid: among the candidates every fold tried
    (in the first fold's order), the best mean (accuracy, log-loss) over the folds."""
    by_fold = [{e["weight_decay"]: e["score"] for e in entries} for entries in fold_entries]
    best = None
    for wd in by_fold[0]:
        if all(wd in f for f in by_fold[1:]):
            mean = _fold_mean(by_fold, wd)
            if best is None or _better(mean, best[1]):
                best = (wd, mean)
    return best


def _fold_mean(by_fold: list[dict], wd: float) -> tuple[Fraction, float]:
    return sum(f[wd][0] for f in by_fold) / len(by_fold), float(np.mean([f[wd][1] for f in by_fold]))


def lodo_search(grid: list[float], fold_scores: list) -> tuple[float, tuple[Fraction, float], list[list[dict]]]:
    """Leave-one-domain-out's search: every fold scores the grid (``fold_scores[k](wd)``);
    where the best mean over the folds sits at an end of the grid, every fold scores the next
    decade past it, at most EXTENSION_DECADES, the weak end first, a value past the grid taken
    only with a higher mean accuracy (the extension rule applied to the mean, which is what
    chooses; a fold's own best plays no part). Returns the weight decay, its mean scores and
    each fold's entries."""
    fold_entries = [[{"weight_decay": wd, "score": score(wd)} for wd in grid] for score in fold_scores]
    wd, mean = lodo_choice(fold_entries)
    for factor in (0.1, 10.0):
        end = min(grid) if factor < 1 else max(grid)
        for _ in range(EXTENSION_DECADES):
            if wd != end:
                break
            end *= factor  # the same float arithmetic as vlaug
            for entries, score in zip(fold_entries, fold_scores):
                entries.append({"weight_decay": end, "score": score(end), "extension": True})
            new = _fold_mean([{e["weight_decay"]: e["score"] for e in entries} for entries in fold_entries], end)
            if new[0] > mean[0]:
                wd, mean = end, new
    return wd, mean, fold_entries


def _lodo_candidates(fold_entries: list[list[dict]]) -> list[list[float]]:
    """[weight decay, mean accuracy, mean log-loss] of each candidate every fold tried."""
    by_fold = [{e["weight_decay"]: e["score"] for e in entries} for entries in fold_entries]
    return [[wd, float(sum(f[wd][0] for f in by_fold) / len(by_fold)), float(np.mean([f[wd][1] for f in by_fold]))]
            for wd in by_fold[0] if all(wd in f for f in by_fold[1:])]


def sklearn_results(tasks, x: np.ndarray, y: np.ndarray, domains: np.ndarray, grid: list[float],
                    n_classes: int, max_iter: int = 10_000, tol: float = 1e-10) -> tuple[list[dict], dict]:
    """scikit-learn's result per seed × test domain × selection (as report.json's ``results``:
    ``out_of_domain``, ``selection.weight_decay``), and how the fits went."""
    fit = Fitter(x, y, n_classes, max_iter, tol)
    results = []
    keys = list(dict.fromkeys((t.seed, t.test_domain) for t in tasks))
    for seed, test in keys:
        mine = [t for t in tasks if (t.seed, t.test_domain) == (seed, test)]
        test_rows = mine[0].splits.test_out

        def accuracy(train: np.ndarray, wd: float) -> float:
            return float(scores(fit(train, wd), x[test_rows], y[test_rows])[0])

        for role in SELECTIONS:
            if role == LODO:
                folds = [t for t in mine if t.role == LODO]
                if not folds:
                    continue
                wd, val, fold_entries = lodo_search(grid, [lambda wd, t=t: scores(fit(t.splits.train, wd), x[t.splits.val],
                                                                                  y[t.splits.val]) for t in folds])
                train = np.union1d(folds[0].splits.train, folds[0].splits.val)  # every training domain's in rows
                results.append({"seed": seed, "test_domain": test, "model_selection": role, "weight_decay": wd,
                                "val_accuracy": float(val[0]), "val_log_loss": val[1], "out_of_domain": accuracy(train, wd),
                                "folds": [t.fold for t in folds],
                                "candidates": _lodo_candidates(fold_entries)})
                continue
            task = next((t for t in mine if t.role == role), None)
            if task is None:
                continue
            train, val = task.splits.train, task.splits.val
            groups = domains[val] if role == TRAINING_DOMAIN else None
            entries = search(grid, lambda wd: scores(fit(train, wd), x[val], y[val], groups))
            best = _chosen(entries)
            results.append({"seed": seed, "test_domain": test, "model_selection": role,
                            "weight_decay": best["weight_decay"], "val_accuracy": float(best["score"][0]),
                            "val_log_loss": best["score"][1], "out_of_domain": accuracy(train, best["weight_decay"]),
                            "candidates": [[e["weight_decay"], float(e["score"][0]), e["score"][1]] for e in entries]})
    return results, {"fits": len(fit.fits), "not_converged": fit.not_converged, "max_iter": max_iter, "tol": tol}


# ----------------------------------------------------------------------------- the comparison


def _same_wd(a: float, b: float) -> bool:
    return bool(np.isclose(a, b, rtol=1e-9, atol=0.0))


def compare(report: dict, sk: list[dict], tolerance: float = 1.0) -> dict:
    """Per selection and test domain (and ``Avg``, the mean over test domains), vlaug's and
    scikit-learn's accuracy (mean over seeds, in points), the difference and whether it is
    within ``tolerance`` points; and per seed × test domain × selection both weight decays."""
    theirs = {(r["seed"], r["test_domain"], r["model_selection"]): r for r in report["results"] if r["method"] == METHOD}
    mine = {(r["seed"], r["test_domain"], r["model_selection"]): r for r in sk}
    if set(theirs) != set(mine):
        raise SystemExit(f"vlaug has results for {sorted(set(theirs) - set(mine))} that scikit-learn does not, "
                         f"and the reverse for {sorted(set(mine) - set(theirs))}")
    test_domains = report["protocol"]["test_domains"]
    rows, choices = [], []
    for selection in SELECTIONS:
        keys = [k for k in theirs if k[2] == selection]
        if not keys:
            continue
        per_domain = []
        for d in test_domains + ["Avg"]:
            ks = [k for k in keys if k[1] == d] if d != "Avg" else keys
            if d == "Avg":
                v, s = float(np.mean([r["vlaug"] for r in per_domain])), float(np.mean([r["sklearn"] for r in per_domain]))
            else:
                v = 100 * float(np.mean([theirs[k]["out_of_domain"] for k in ks]))
                s = 100 * float(np.mean([mine[k]["out_of_domain"] for k in ks]))
            row = {"selection": selection, "test_domain": d, "vlaug": v, "sklearn": s, "difference": v - s,
                   "within_tolerance": bool(abs(v - s) <= tolerance + 1e-9), "n_seeds": len({k[0] for k in ks})}
            if d != "Avg":
                per_domain.append(row)
            rows.append(row)
        for k in sorted(keys):
            wv, ws = theirs[k]["selection"]["weight_decay"], mine[k]["weight_decay"]
            choices.append({"seed": k[0], "test_domain": k[1], "selection": selection, "vlaug_weight_decay": wv,
                            "sklearn_weight_decay": ws, "same": _same_wd(wv, ws),
                            "vlaug_accuracy": theirs[k]["out_of_domain"], "sklearn_accuracy": mine[k]["out_of_domain"],
                            "vlaug_val": [theirs[k]["selection"].get("val_accuracy"), theirs[k]["selection"].get("val_log_loss")],
                            "sklearn_val": [mine[k]["val_accuracy"], mine[k]["val_log_loss"]],
                            "vlaug_candidates": [[c["weight_decay"], c["val_accuracy"], c["val_log_loss"]]
                                                 for c in theirs[k]["selection"].get("candidates", [])],
                            "sklearn_candidates": mine[k]["candidates"]})
    return {"tolerance_points": tolerance, "rows": rows, "choices": choices,
            "ok": all(r["within_tolerance"] for r in rows)}


def format_table(comparison: dict) -> str:
    """The comparison as a text table."""
    lines = [f"{'selection':<22} {'test domain':<12} {'vlaug':>7} {'sklearn':>8} {'diff':>7}  within {comparison['tolerance_points']:g} pt"]
    for r in comparison["rows"]:
        diff = r["difference"] if abs(r["difference"]) >= 0.005 else 0.0  # no "-0.00"
        lines.append(f"{r['selection']:<22} {r['test_domain']:<12} {r['vlaug']:7.2f} {r['sklearn']:8.2f} "
                     f"{diff:+7.2f}  {'yes' if r['within_tolerance'] else 'NO'}")
    lines.append("")
    for selection in SELECTIONS:
        mine = [c for c in comparison["choices"] if c["selection"] == selection]
        if mine:
            differ = [f"seed {c['seed']} {c['test_domain']}: {c['vlaug_weight_decay']:.0e} vs {c['sklearn_weight_decay']:.0e}"
                      for c in mine if not c["same"]]
            lines.append(f"same weight decay, {selection}: {sum(c['same'] for c in mine)}/{len(mine)}"
                         + (f" (differ: {'; '.join(differ)})" if differ else ""))
    return "\n".join(lines)


def check(cache: str | Path, out: str | Path, seeds: int, tolerance: float = 1.0, max_iter: int = 10_000,
          tol: float = 1e-10) -> dict:
    """vlaug's run on ``cache`` (report in ``out``) and scikit-learn's, compared."""
    start = time.perf_counter()
    report = run_vlaug(cache, out, seeds)
    vlaug_seconds = time.perf_counter() - start
    tasks, x, y, domains = rebuild_tasks(cache, report)
    start = time.perf_counter()
    sk, fits = sklearn_results(tasks, x, y, domains, list(report["protocol"]["weight_decay_grid"]),
                               len(report["classes"]), max_iter, tol)
    comparison = compare(report, sk, tolerance)
    comparison.update({"cache": str(cache), "seeds": seeds, "n_tasks": len(tasks), "sklearn_fits": fits,
                       "vlaug_seconds": vlaug_seconds, "sklearn_seconds": time.perf_counter() - start,
                       "weight_decay_grid": report["protocol"]["weight_decay_grid"]})
    return comparison


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", help="an existing vlaug cache with 4 (at least 3) domains; default: a simulated one")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--classes", type=int, default=7, help="simulated cache: classes")
    parser.add_argument("--dim", type=int, default=64, help="simulated cache: embedding dimension")
    parser.add_argument("--per-class", type=int, default=150, help="simulated cache: rows per class and domain")
    parser.add_argument("--sim-seed", type=int, default=0, help="simulated cache: the simulator's seed")
    parser.add_argument("--tolerance", type=float, default=1.0, help="largest difference allowed, in accuracy points")
    parser.add_argument("--max-iter", type=int, default=10_000, help="scikit-learn's max_iter")
    parser.add_argument("--tol", type=float, default=1e-10, help="scikit-learn's tol")
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vlaug-domainbed-sklearn-") as tmp:
        cache = args.cache or build_cache(Path(tmp) / "cache", args.classes, args.dim, args.per_class, args.sim_seed)
        comparison = check(cache, Path(tmp) / "report", args.seeds, args.tolerance, args.max_iter, args.tol)
    if args.cache is None:
        comparison["simulated"] = {"n_classes": args.classes, "d": args.dim, "n_per_class": args.per_class,
                                   "seed": args.sim_seed}
        comparison["cache"] = "(simulated, removed)"
    print(f"{comparison['n_tasks']} tasks, {args.seeds} seeds; splits and fingerprints match report.json; "
          f"vlaug {comparison['vlaug_seconds']:.0f} s, scikit-learn {comparison['sklearn_seconds']:.0f} s "
          f"({comparison['sklearn_fits']['fits']} fits, {comparison['sklearn_fits']['not_converged']} not converged)")
    print("accuracy on the test domain's in rows, mean over seeds (points):")
    print(format_table(comparison))
    if args.json:
        Path(args.json).write_text(json.dumps(comparison, indent=2))
    if not comparison["ok"]:
        print(f"vlaug and scikit-learn differ by more than {args.tolerance:g} point(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
