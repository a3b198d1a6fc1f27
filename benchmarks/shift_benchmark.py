"""Domain-shift benchmark on a simulated CLIP-like embedding space, run through vlaug's CLI.

What it does, per difficulty setting (``--settings``):

1. Simulates L2-normalised image and text embeddings with the geometry of CLIP ViT-B/32
   (below), one training domain (``photo``) and three unseen ones (``sketch``, ``painting``,
   ``clipart``), plus one text prompt set per domain ("a sketch of a {}") whose embeddings
   are shifted along a per-domain text direction correlated with that domain's image shift
   (the signal LADS exploits).
2. Writes it as a real vlaug feature cache with vlaug's own writer (``vlaug.cache``).
3. Runs vlaug through its CLI (``python -m vlaug``): ``train-box`` for the heads ``box``,
   ``dr-sa`` and ``lads`` on ``photo``; then one ``probe`` run with every method of
   ``vlaug.methods.REGISTRY`` (methods that need a head get ``NAME:HEAD_DIR``), over
   ``--seeds`` seeds with ``--train-domain photo``.
4. Fits scikit-learn's ``LogisticRegressionCV`` on the same rows per seed as the reference
   probe (the same weight-decay grid converted to ``C = 1 / (wd · n_train)``: vlaug's probe
   minimises mean CE + (wd/2)·||W||²; the train / val / test rows are vlaug's own, taken from
   ``vlaug.evaluate.prepare`` and checked against the report's split sizes).
5. Prints (or writes with ``--out-md``) a Markdown section per setting: the simulator's
   measured statistics, every method's in-domain / out-of-domain / per-domain accuracy
   (mean ± std over seeds), paired differences with 95 % intervals (below), the weight decays
   selection chose, the box head's statistics (``stats.json``), flags counted over seeds, and a
   scatter plot of in-domain vs out-of-domain accuracy per method (error bars: std over
   seeds; the Pareto front highlighted) in ``docs/shift_benchmark_SETTING.png``.

Calibration (published figures for CLIP ViT-B/32 the simulator was tuned to; every run
prints what it measured, the table's ``target`` column repeats these):

* matched image-text cosine about 0.3 (an image and its class prompt), mismatched about
  0.2: CLIP cosines of matching pairs rarely exceed 0.3-0.4 for ViT-B/32, which is why
  CLIPScore rescales them by w = 2.5 (Hessel et al. 2021, "CLIPScore", EMNLP);
* class prompt to class prompt cosine 0.7-0.9: prompts sharing a template sit in a narrow
  cone of the text tower (the "cone effect", Liang et al. 2022);
* a modality gap: image and text embeddings occupy two separate cones; the distance
  between the centre of the image embeddings and the centre of the text embeddings is
  ||Δgap|| = 0.82 for CLIP on MSCOCO, with the cosine between the two centres low (Liang,
  Zhang, Kwon, Yeung, Zou 2022, "Mind the Gap: Understanding the Modality Gap in
  Multi-modal Contrastive Representation Learning", NeurIPS; the simulator targets
  ||Δgap|| ≈ 0.8-1.0 and cos(centres) ≈ 0.2-0.4);
* image-image cosine well above 0 (the image cone, same paper; the simulator aims at about
  0.5, not a published figure);
* domain shift moves zero-shot accuracy far less than a probe fitted on the training
  domain (Radford et al. 2021, CLIP, Sec. 3.3 "robustness to natural distribution shift";
  Wortsman et al. 2022, WiSE-FT; Dunlap et al. 2023, LADS): on the default setting the linear probe is near-perfect
  in domain (~0.95+) and loses most of it out of domain (~0.3-0.4), while zero-shot
  stays around 0.5 in and out of domain.

The generative model is in ``vlaug/simulate.py`` (:func:`vlaug.simulate.shifted_domains`).

Tuning caches and reported caches (``--caches``). The *reported* caches are each setting's
simulator draw (``SimParams.seed``, 0 for every setting): the numbers docs/benchmarks.md and
the README show. The *tuning* caches are the same settings drawn with other simulator seeds,
``TUNING_SEED_BASE + k`` = 1000 + k (``--draw k``, default 0), never a reported seed. The
rule of the project: a default (a method option, a benchmark constant) is chosen on tuning
caches only (``benchmarks/tune_defaults.py``), or by validation inside a method; the
reported caches are run once, at the end, and their test rows choose nothing. The output
names the kind of cache it ran on, and the JSON records each setting's simulator seed.

Paired comparisons. Every claim the tables make ("A beats B": each method against
``linear`` and against ``zero-shot``, the best out-of-domain row against the others, the
rows beating every seed method on both axes, ``linear`` against scikit-learn) is a paired
difference A − B in points with a 95 % interval, per axis (in-domain, out-of-domain): A
"beats" B where the interval lies above 0, "loses" where it lies below, else the two "tie".
The interval is a paired bootstrap over test rows and seeds (:class:`PairedBootstrap`):
each of ``BOOTSTRAP_RESAMPLES`` resamples draws the test rows with replacement (the same
rows for A and B) and the seeds with replacement, and takes the mean over the drawn seeds
of the accuracy difference on the drawn rows; the interval is the 2.5th and 97.5th
percentiles. Resampling the rows too keeps the interval honest for methods that are
deterministic given the data (a t-interval over seeds alone has zero width for two of
them). It reads the per-row predictions ``vlaug probe`` writes (``test_predictions.parquet``
in the report folder); with an older vlaug that does not write them it falls back to a
t-interval over the seeds' accuracy differences and says so. The intervals are per
comparison, not simultaneous: among the many comparisons of a table, a few intervals miss
by chance.

Run (from the repository root, with vlaug installed)::

    python benchmarks/shift_benchmark.py                      # every setting, 10 seeds, reported caches, Markdown on stdout
    python benchmarks/shift_benchmark.py --caches tuning      # the same on tuning caches (simulator seed 1000)
    python benchmarks/shift_benchmark.py --settings default,hard --seeds 3 --out-md shift.md --json shift.json
    python benchmarks/shift_benchmark.py --quick              # tiny sizes, 2 seeds, few epochs: a smoke test (~1 min)
    # settings run side by side (one process each), then reported as one run
    python benchmarks/shift_benchmark.py --merge default.json hard.json --json shift.json --out-md shift.md

Every number it prints is computed in that run; it prints the commit, the seeds, the kind
of cache, sizes, settings and every hyperparameter it used. Plots of the reported caches go
to ``docs/`` (``--plot-dir``; with ``--quick`` or ``--caches tuning`` to the temporary
folder ``vlaug-shift-quick-plots`` unless ``--plot-dir`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlaug.metrics import pareto_front
from vlaug.simulate import DOMAINS, TARGET_DOMAINS, TRAIN_DOMAIN, SimParams, shifted_domains, write_cache

REPO = Path(__file__).resolve().parent.parent
# the published figures the statistics are compared with (see the module docstring)
TARGETS = {
    "matched_cosine": "≈ 0.3 (Hessel et al. 2021)",
    "mismatched_cosine": "≈ 0.2",
    "prompt_prompt_cosine": "0.7-0.9 (Liang et al. 2022, cone effect)",
    "image_image_cosine": "well above 0: a narrow cone (Liang et al. 2022); ≈ 0.5 aimed, no exact figure",
    "modality_gap_norm": "0.82 (Liang et al. 2022, CLIP on MSCOCO)",
    "modality_gap_cosine": "low, ≈ 0.2-0.4",
}


# ----------------------------------------------------------------------------- the simulator


ENSEMBLE_WEIGHTS = (0.3, 0.7)  # linear?ensemble=λ rows of every setting (fixed ensembles)
WISE_WEIGHTS = (0.25, 0.75)  # linear-zs?wise=λ rows (WiSE-style weight interpolation; the default 0.5 is linear-zs)
# the methods of the papers vlaug started from (LARE box, LatentDR, LADS, BatchFormer, Gaussian, Mixup, zero-shot,
# linear): a new method is worth keeping when it beats every one of them on both axes
SEED_METHODS = ("zero-shot", "linear", "box", "dr", "lads", "gaussian", "mixup", "batchformer", "latentdr-sa",
                "latentdr-pool")


def _accuracy_then_log_loss(estimator, x, y) -> float:
    """vlaug's selection rule as a scikit-learn scorer: accuracy, ties to the lower log-loss."""
    from sklearn.metrics import log_loss

    return float((estimator.predict(x) == y).mean()) - 1e-6 * log_loss(y, estimator.predict_proba(x), labels=estimator.classes_)


@dataclass(frozen=True)
class Setting:
    """A named setting: the simulator's parameters and how vlaug is run on it."""

    name: str
    sim: SimParams
    head_epochs: int | None = None  # vlaug train-box --epochs (None: each head's default schedule)
    joint_epochs: int | None = None  # ?epochs= of the joint methods (None: their default, to convergence)
    # other query options of the joint methods, as (name, value) pairs; each applied only to a method that has it
    joint_options: tuple = ()
    grid_size: int = 8  # vlaug probe --grid-size
    max_iter: int = 200  # vlaug probe --max-iter
    description: str = ""


def _settings() -> dict[str, Setting]:
    base = SimParams()
    return {
        "easy": Setting("easy", dataclasses.replace(
            base, kappa={"photo": 0.45, "sketch": 0.5, "painting": 0.45, "clipart": 0.42},
            rho_app={"photo": 1.0, "sketch": 0.4, "painting": 0.55, "clipart": 0.45}, lambda_m=0.35, delta=0.3),
            description="milder shift: appearance features partly survive, weaker style bias, better zero-shot"),
        "default": Setting("default", base, description="16 classes, d = 512, 150 rows per class and domain"),
        "hard": Setting("hard", dataclasses.replace(
            base, kappa={"photo": 0.6, "sketch": 0.7, "painting": 0.62, "clipart": 0.58},
            rho_app={"photo": 1.0, "sketch": 0.0, "painting": 0.1, "clipart": 0.05}, lambda_m=0.75, delta=0.4),
            description="stronger shift: appearance features do not transfer, strong style bias, weaker zero-shot"),
        "small": Setting("small", dataclasses.replace(base, n_per_class=24),
                         description="default geometry, 24 rows per class and domain (about 15 training rows per class)"),
        "large-d": Setting("large-d", dataclasses.replace(base, d=768, n_classes=20, n_per_class=120),
                           description="d = 768 (ViT-L/14's width), 20 classes, 120 rows per class and domain"),
    }


SETTINGS = _settings()

CACHE_KINDS = ("reported", "tuning")
TUNING_SEED_BASE = 1000  # tuning cache k of a setting: its simulator parameters with seed TUNING_SEED_BASE + k


def cache_setting(setting: Setting, caches: str, draw: int = 0) -> Setting:
    """``setting`` on the kind of cache asked for: ``reported`` keeps its simulator seed;
    ``tuning`` redraws it with seed ``TUNING_SEED_BASE + draw`` (never a reported seed)."""
    if caches not in CACHE_KINDS:
        raise ValueError(f"caches == {caches!r}, must be one of {', '.join(CACHE_KINDS)}.")
    if caches == "reported":
        return setting
    if draw < 0:
        raise ValueError(f"draw == {draw}, must be >= 0.")
    seed = TUNING_SEED_BASE + draw
    reported = {s.sim.seed for s in SETTINGS.values()} | {setting.sim.seed}
    if seed in reported:
        raise ValueError(f"tuning seed {seed} is the simulator seed of a reported cache; pick another --draw.")
    return dataclasses.replace(setting, sim=dataclasses.replace(setting.sim, seed=seed),
                               description=f"{setting.description} (tuning cache: simulator seed {seed})")


def _quick(setting: Setting) -> Setting:
    sim = dataclasses.replace(setting.sim, n_classes=min(setting.sim.n_classes, 8), d=setting.sim.d // 4,
                              n_per_class=min(setting.sim.n_per_class, 30))
    joint = (("max_steps", 60), ("patience", 20), ("lr", "1e-2"), ("weight_decay", "0.01"))  # one short configuration
    return dataclasses.replace(setting, sim=sim, head_epochs=3, joint_epochs=3, joint_options=joint, grid_size=4,
                               max_iter=50,
                               description=f"--quick version of '{setting.name}': {sim.n_classes} classes, d = {sim.d}, "
                                           f"{sim.n_per_class} rows per class and domain")


def measure(sim: dict) -> dict:
    """The statistics the calibration targets, measured on the simulated embeddings."""
    x, y, dom, t = sim["x"], sim["y"], sim["domain"], sim["texts"]["classes"]
    cos = x @ t.T  # (n, C)
    matched = cos[np.arange(len(y)), y]
    mask = np.ones_like(cos, dtype=bool)
    mask[np.arange(len(y)), y] = False
    tt = t @ t.T
    off = ~np.eye(len(t), dtype=bool)
    photo = dom == TRAIN_DOMAIN
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, photo.sum(), (2, 20000))
    xp = x[photo]
    img_img = float(np.mean(np.sum(xp[i[i != j]] * xp[j[i != j]], axis=1)))
    all_text = np.concatenate(list(sim["texts"].values()))
    mu_img, mu_txt = x.mean(0), all_text.mean(0)
    pred = cos.argmax(1)
    zs = {k: float((pred[dom == k] == y[dom == k]).mean()) for k in DOMAINS}
    return {
        "matched_cosine": float(matched.mean()),
        "mismatched_cosine": float(cos[mask].mean()),
        "prompt_prompt_cosine": float(tt[off].mean()),
        "image_image_cosine": img_img,
        "modality_gap_norm": float(np.linalg.norm(mu_img - mu_txt)),
        "modality_gap_cosine": float(mu_img @ mu_txt / np.linalg.norm(mu_img) / np.linalg.norm(mu_txt)),
        "zero_shot_in_domain": zs[TRAIN_DOMAIN],
        "zero_shot_out_of_domain": float(np.mean([pred[dom == k] == y[dom == k] for k in TARGET_DOMAINS])),
        "zero_shot_per_domain": zs,
    }


# ----------------------------------------------------------------------------- the cache


# ----------------------------------------------------------------------------- running vlaug


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
THREADS = {"n": None}  # --threads: set in main()
SKIPPED = {"names": ()}  # --skip: registered methods left out of the run (set in main(), stated in the output)


def vlaug_cli(args: list[str], log) -> subprocess.CompletedProcess:
    """``python -m vlaug ARGS`` in a subprocess (the CLI exactly as users run it)."""
    cmd = [sys.executable, "-m", "vlaug", *args]
    env = dict(os.environ)
    if THREADS["n"]:
        env.update({v: str(THREADS["n"]) for v in THREAD_VARS})
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


HEAD_OPTIONS = {"lads": ["--source-prompts", TRAIN_DOMAIN, "--target-prompts", ",".join(TARGET_DOMAINS)]}
BASE_HEADS = ("box", "dr-sa", "lads")  # trained for every setting; other kinds only when a method needs them


def train_heads(cache_dir: Path, heads_dir: Path, kinds: list[str], epochs: int, log) -> dict:
    """``vlaug train-box`` for each head kind on the training domain: kind -> info."""
    out = {}
    for kind in kinds:
        folder = heads_dir / kind
        args = ["train-box", str(cache_dir), "--out", str(folder), "--head", kind, "--train-domain", TRAIN_DOMAIN,
                *(["--epochs", str(epochs)] if epochs else []), "--seed", "0", "--device", "cpu", "--no-progress",
                *HEAD_OPTIONS.get(kind, [])]
        t0 = time.perf_counter()
        proc = vlaug_cli(args, log)
        info = {"kind": kind, "dir": str(folder), "args": args[1:], "seconds": time.perf_counter() - t0,
                "returncode": proc.returncode, "summary": _last_line(proc.stdout)}
        if proc.returncode != 0:
            info["error"] = _last_line(proc.stderr) or _last_line(proc.stdout)
            log(f"  train-box --head {kind} failed: {info['error']}")
        else:
            config = json.loads((folder / "config.json").read_text())
            info["head_config"] = config.get("head")
            info["training"] = {k: v for k, v in (config.get("training") or {}).items() if k not in ("features",)}
            info["selected_epoch"] = config.get("selected_epoch")
            stats = folder / "stats.json"
            if stats.is_file():
                s = json.loads(stats.read_text())
                info["stats"] = {k: s.get(k) for k in ("n_rows", "mean_log_volume", "mean_corner_inner_product",
                                                        "zero_shot_accuracy")}
            log(f"  {info['summary']}")
        out[kind] = info
    return out


def needed_heads() -> list[str]:
    """The base head kinds that some method of this run needs (a run that skips box, dr and
    lads trains none of their heads)."""
    from vlaug.methods import REGISTRY

    kinds = {k for name, cls in REGISTRY.items() if name not in SKIPPED["names"] for k in cls.head_kinds}
    return [k for k in BASE_HEADS if k in kinds]


def method_specs(heads: dict, joint_epochs: int | None,
                 joint_options: tuple = ()) -> tuple[list[tuple[str, str]], list[str]]:
    """(label, spec) for every registered method; a method whose class has head_kinds gets
    NAME:HEAD_DIR of a trained head of one of its kinds. Also the head kinds still missing.
    The label leaves out the setting's own joint-method options (the Markdown lists each
    method's options with the hyperparameters)."""
    from urllib.parse import urlencode

    from vlaug.methods import REGISTRY
    from vlaug.methods.joint import JointMethod

    specs, missing = [], []
    for name, cls in REGISTRY.items():
        if name in SKIPPED["names"] or cls.path_argument:  # cdga needs a generated set of its own
            continue
        options = {}
        # the joint methods' options go to the joint methods alone (the few-shot adapters have epochs and max_steps too)
        joint = issubclass(cls, JointMethod)
        fields_ = {f.name for f in dataclasses.fields(cls.Options)} if joint else set()
        if "epochs" in fields_ and joint_epochs:
            options["epochs"] = joint_epochs
        if "max_steps" in fields_:  # a joint method (the loop counts AdamW steps)
            options.update({k: v for k, v in joint_options if k in fields_})
        query = ("?" + urlencode(options)) if options else ""
        if cls.head_kinds:
            kind = next((k for k in cls.head_kinds if heads.get(k, {}).get("returncode") == 0), None)
            if kind is None:
                missing.append(cls.head_kinds[0])
                continue
            specs.append((f"{name}[{kind}]", f"{name}:{heads[kind]['dir']}" + query))
        else:
            specs.append((name, name + query))
    for name, weights, option in (("linear", ENSEMBLE_WEIGHTS, "ensemble"), ("linear-zs", WISE_WEIGHTS, "wise")):
        if name not in SKIPPED["names"]:  # mixes with zero-shot: their spread over seeds is checked
            specs += [(f"{name}?{option}={w}", f"{name}?{option}={w}") for w in weights]
    return specs, missing


def run_probe(cache_dir: Path, out: Path, specs: list[tuple[str, str]], seeds: int, setting: Setting, log) -> dict:
    """One ``vlaug probe`` over every method; if it fails, each method alone (to name the
    failing ones). Returns the report (merged when run per method) and the failures."""
    base = ["probe", str(cache_dir), "--train-domain", TRAIN_DOMAIN, "--seeds", str(seeds), "--grid-size",
            str(setting.grid_size), "--max-iter", str(setting.max_iter), "--device", "cpu", "--no-progress"]
    t0 = time.perf_counter()
    proc = vlaug_cli([*base, "--out", str(out), *[a for _, s in specs for a in ("-m", s)]], log)
    if proc.returncode == 0:
        report = json.loads((out / "report.json").read_text())
        return {"report": report, "failures": {}, "seconds": time.perf_counter() - t0, "args": base[1:],
                "per_method_runs": False, "report_dirs": [out]}
    log(f"  probe over every method failed ({_last_line(proc.stderr)}); running each method alone")
    merged, failures, dirs = None, {}, []
    for label, spec in specs:
        one = out.parent / (out.name + "-" + label.replace("/", "_").replace("?", "_").replace("[", "_").replace("]", ""))
        p = vlaug_cli([*base, "--out", str(one), "-m", spec], log)
        if p.returncode != 0:
            failures[label] = _last_line(p.stderr) or _last_line(p.stdout)
            log(f"  {label}: {failures[label]}")
            continue
        r = json.loads((one / "report.json").read_text())
        dirs.append(one)
        if merged is None:
            merged = r
        else:
            for key in ("results", "summary", "methods"):
                merged[key] += r[key]
    return {"report": merged, "failures": failures, "seconds": time.perf_counter() - t0, "args": base[1:],
            "per_method_runs": True, "report_dirs": dirs}


# ----------------------------------------------------------------------------- the reference probe


def vlaug_splits(cache_dir: Path, seeds: int, setting: Setting, workdir: Path) -> tuple[list, str]:
    """vlaug's own train / val / test rows of every seed (what ``vlaug probe`` used)."""
    try:
        from vlaug.evaluate import ProbeRunConfig, prepare

        config = ProbeRunConfig(features=str(cache_dir), out=str(workdir / "never-written"), methods=("zero-shot",),
                                train_domains=(TRAIN_DOMAIN,), seeds=seeds, grid_size=setting.grid_size,
                                max_iter=setting.max_iter, device="cpu", progress=False)
        return prepare(config).splits, "vlaug.evaluate.prepare"
    except Exception as e:  # an API change: recompute with vlaug.protocols
        import inspect

        from vlaug import cache as cache_io
        from vlaug import protocols

        feats = cache_io.read_cache(str(cache_dir))
        kw = {}
        if "fractions" in inspect.signature(protocols.make_splits).parameters:
            kw["fractions"] = protocols.id_fractions(cache_io.iter_ids(str(cache_dir)))
        splits = [protocols.make_splits(feats.labels, feats.domains, feats.splits, train_domains=[TRAIN_DOMAIN], seed=s,
                                        **kw) for s in range(seeds)]
        return splits, f"vlaug.protocols.make_splits (prepare failed: {e})"


def sklearn_reference(x: np.ndarray, y: np.ndarray, dom: np.ndarray, splits: list, grid: list[float],
                      max_iter: int) -> dict:
    """LogisticRegressionCV with C = 1 / (wd · n_train) for vlaug's weight-decay grid, fitted on
    each seed's training rows, selected on its validation rows, tested on its test rows.
    Returns ``results`` (rows as in report.json), ``convergence_warnings`` and ``predictions``
    (columns as ``test_predictions.parquet``: one row per seed and test row)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit

    results, n_warn, predictions = [], 0, []
    for seed, s in enumerate(splits):
        train, val = np.asarray(s.train), np.asarray(s.val)
        n = len(train)
        rows = np.concatenate([train, val])
        fold = np.r_[np.full(len(train), -1), np.zeros(len(val))]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            warnings.simplefilter("ignore", FutureWarning)
            cv = LogisticRegressionCV(Cs=[1.0 / (wd * n) for wd in grid], cv=PredefinedSplit(fold), refit=False,
                                      scoring=_accuracy_then_log_loss, max_iter=max(1000, max_iter)).fit(x[rows], y[rows])
        n_warn += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        test_in, test_out = np.asarray(s.test_in), np.asarray(s.test_out)
        acc = lambda r: float((cv.predict(x[r]) == y[r]).mean()) if len(r) else float("nan")  # noqa: E731
        test = np.concatenate([test_in, test_out])
        predictions.append({"method": np.full(len(test), REFERENCE, dtype=object), "seed": np.full(len(test), seed),
                            "row": test.astype(np.int64), "domain": dom[test], "label": y[test],
                            "prediction": cv.predict(x[test]) if len(test) else y[test][:0]})
        results.append({"method": "sklearn LogisticRegressionCV", "seed": seed, "in_domain": acc(test_in),
                        "out_of_domain": acc(test_out), "extended": acc(test),
                        "per_domain": {k: acc(test[dom[test] == k]) for k in np.unique(dom[test]).tolist()},
                        "selection": {"weight_decay": float(1.0 / (np.ravel(cv.C_)[0] * n)), "C": float(np.ravel(cv.C_)[0]),
                                      "n_train": n, "n_val": len(val)}})
    columns = {k: np.concatenate([p[k] for p in predictions]) for k in PREDICTION_COLUMNS} if predictions else None
    return {"results": results, "convergence_warnings": n_warn, "predictions": columns}


def zero_shot_check(x, y, dom, text, splits) -> list[dict]:
    """Zero-shot accuracy recomputed here on each seed's test rows (a check of vlaug's)."""
    out = []
    pred = (x @ text.T).argmax(1)
    for seed, s in enumerate(splits):
        ti, to = np.asarray(s.test_in), np.asarray(s.test_out)
        out.append({"seed": seed, "in_domain": float((pred[ti] == y[ti]).mean()),
                    "out_of_domain": float((pred[to] == y[to]).mean())})
    return out


# ----------------------------------------------------------------------------- paired comparisons


PREDICTIONS_FILE = "test_predictions.parquet"  # written by vlaug probe in the report folder (newer vlaug)
PREDICTION_COLUMNS = ("method", "seed", "row", "domain", "label", "prediction")
AXES = ("in_domain", "out_of_domain")
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # numpy seed of the resamples (the same resamples for every comparison of a setting)
CONFIDENCE = 0.95
BOOTSTRAP_METHOD = "paired bootstrap over test rows and seeds"
T_METHOD = "t-interval over seeds (no per-row predictions: this vlaug writes no test_predictions.parquet)"


def read_predictions(report_dirs: list[Path]) -> dict[str, np.ndarray] | None:
    """The per-row test predictions of every report folder, as columns; None when a folder
    has none (a vlaug older than test_predictions.parquet)."""
    import pyarrow.parquet as pq

    if not report_dirs or not all((d / PREDICTIONS_FILE).is_file() for d in report_dirs):
        return None
    tables = [pq.read_table(d / PREDICTIONS_FILE, columns=list(PREDICTION_COLUMNS)) for d in report_dirs]
    return {k: np.concatenate([t[k].to_numpy(zero_copy_only=False) for t in tables]) for k in PREDICTION_COLUMNS}


def verdict(low: float, high: float) -> str:
    """"beats" when the interval of A − B lies above 0, "loses" below, else "ties"."""
    return "beats" if low > 0 else "loses" if high < 0 else "ties"


class PairedBootstrap:
    """Paired differences of accuracy between methods with a bootstrap over test rows and seeds.

    Each resample draws the test rows of an axis with replacement (the same rows for both
    methods: paired) and the seeds with replacement; its statistic is the mean over the
    drawn seeds of the accuracy difference on the drawn rows (a seed's accuracy on the drawn
    rows it has). The interval is the (1 ± confidence)/2 percentiles over the resamples. The
    resamples are drawn once per axis from ``random_state`` and shared by every comparison.

    Args:
        predictions: columns ``method``, ``seed``, ``row``, ``domain``, ``label``,
            ``prediction`` (a mapping of arrays, a pyarrow table's columns or a DataFrame),
            one row per (method, seed, test row).
        in_domains: the training domains; rows of other domains are out of domain.
        n_resamples, random_state, confidence: of the bootstrap.
    """

    def __init__(self, predictions, in_domains, n_resamples: int = BOOTSTRAP_RESAMPLES,
                 random_state: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE):
        if not 0 < confidence < 1:
            raise ValueError(f"confidence == {confidence}, must be in (0, 1).")
        cols = {k: np.asarray(predictions[k]) for k in PREDICTION_COLUMNS}
        self.n_resamples, self.random_state, self.confidence = n_resamples, random_state, confidence
        self.methods = cols["method"].astype(str)
        self.seeds = np.unique(cols["seed"])
        self._seed_pos = np.searchsorted(self.seeds, cols["seed"])
        self._correct = (cols["label"] == cols["prediction"]).astype(np.float32)
        inside = np.isin(cols["domain"].astype(str), [str(d) for d in in_domains])
        self._axis_mask = {"in_domain": inside, "out_of_domain": ~inside}
        self._rows = {a: np.unique(cols["row"][m]) for a, m in self._axis_mask.items()}
        self._row_pos = {a: np.searchsorted(self._rows[a], cols["row"]) for a in AXES}
        self._weights, self._sums = {}, {}

    def _resamples(self, axis: str) -> tuple[np.ndarray, np.ndarray]:
        """Row weights (B, n_rows) and seed weights (B, n_seeds): how often each is drawn."""
        if axis not in self._weights:
            rng = np.random.default_rng([self.random_state, AXES.index(axis)])
            n_rows, n_seeds = len(self._rows[axis]), len(self.seeds)
            rows = rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=self.n_resamples) if n_rows else \
                np.zeros((self.n_resamples, 0))
            seeds = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=self.n_resamples)
            self._weights[axis] = rows.astype(np.float32), seeds.astype(np.float64)
        return self._weights[axis]

    def _matrix(self, method: str, axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """A method's correctness (n_seeds, n_rows) (0 where absent), its presence mask and
        both summed under every resample's row weights (n_seeds, B)."""
        key = (method, axis)
        if key not in self._sums:
            keep = (self.methods == method) & self._axis_mask[axis]
            if not keep.any():
                self._sums[key] = None
                return None
            shape = (len(self.seeds), len(self._rows[axis]))
            correct, present = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            at = self._seed_pos[keep], self._row_pos[axis][keep]
            correct[at], present[at] = self._correct[keep], 1.0
            rows, _ = self._resamples(axis)
            self._sums[key] = correct, present, correct @ rows.T, present @ rows.T
        return self._sums[key]

    def compare(self, a: str, b: str) -> dict:
        """Per axis, A − B: ``diff`` (the observed mean over seeds of the accuracy difference),
        ``low``, ``high``, ``verdict``, ``n_seeds``, ``n_rows``; an axis is None where either
        method has no prediction."""
        out = {}
        for axis in AXES:
            ma, mb = self._matrix(a, axis), self._matrix(b, axis)
            if ma is None or mb is None:
                out[axis] = None
                continue
            (ca, pa, sa, spa), (cb, pb, sb, _) = ma, mb
            both = pa * pb
            if np.array_equal(pa, pb):  # the usual case: both methods predicted the same rows of every seed
                num, den = sa - sb, spa
            else:
                rows, _ = self._resamples(axis)
                num, den = ((ca - cb) * both) @ rows.T, both @ rows.T
            _, seed_w = self._resamples(axis)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_seed = num / den  # (n_seeds, B): NaN where a seed has no drawn row
                ok = np.isfinite(per_seed).T & (seed_w > 0)  # (B, n_seeds)
                stat = np.where(ok, per_seed.T * seed_w, 0).sum(1) / np.where(ok, seed_w, 0).sum(1)
                observed = ((ca - cb) * both).sum(1) / both.sum(1)
            observed = observed[np.isfinite(observed)]
            tail = 100 * (1 - self.confidence) / 2
            low, high = np.nanpercentile(stat, [tail, 100 - tail]) if np.isfinite(stat).any() else (np.nan, np.nan)
            out[axis] = {"diff": float(observed.mean()) if len(observed) else float("nan"), "low": float(low),
                         "high": float(high), "verdict": verdict(low, high), "n_seeds": int(len(observed)),
                         "n_rows": int((both.sum(0) > 0).sum())}
        return out


def paired_bootstrap(predictions, a: str, b: str, in_domains, n_resamples: int = BOOTSTRAP_RESAMPLES,
                     random_state: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> dict:
    """A − B per axis with a paired bootstrap over test rows and seeds (:class:`PairedBootstrap`)."""
    return PairedBootstrap(predictions, in_domains, n_resamples, random_state, confidence).compare(a, b)


def paired_t(results: list[dict], a: str, b: str, confidence: float = CONFIDENCE) -> dict:
    """A − B per axis with a t-interval over the seeds' accuracy differences (the fallback
    without per-row predictions: zero width for two methods deterministic given the data)."""
    from scipy import stats

    by = {(r["method"], r["seed"]): r for r in results}
    seeds = sorted({s for m, s in by if m == a} & {s for m, s in by if m == b})
    out = {}
    for axis in AXES:
        d = np.array([by[(a, s)][axis] - by[(b, s)][axis] for s in seeds], dtype=np.float64)
        if not len(d):
            out[axis] = None
            continue
        half = stats.t.ppf((1 + confidence) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.inf
        low, high = d.mean() - half, d.mean() + half
        out[axis] = {"diff": float(d.mean()), "low": float(low), "high": float(high), "verdict": verdict(low, high),
                     "n_seeds": len(d), "n_rows": None}
    return out


def is_variant(label: str) -> bool:
    """A fixed-ensemble or WiSE row the benchmark adds (not a method's default row)."""
    return "ensemble=" in label or "wise=" in label


def seed_rows(summary: list[dict]) -> list[str]:
    """The default rows of the seed methods (the papers vlaug started from)."""
    return [s["method"] for s in summary if _seed_label(s["method"]) in SEED_METHODS and not is_variant(s["method"])]


def comparison_pairs(summary: list[dict]) -> list[tuple[str, str]]:
    """Every (A, B) a table's claim rests on: each row against ``linear`` and ``zero-shot``,
    each non-seed row against every seed method, the best out-of-domain row against the others."""
    labels = [s["method"] for s in summary]
    pairs = [(m, base) for base in ("linear", "zero-shot") if base in labels for m in labels if m != base]
    seeds = seed_rows(summary)
    pairs += [(m, s) for m in labels if m not in seeds and m != REFERENCE for s in seeds]
    if summary:
        best = max(summary, key=lambda x: x["out_of_domain"]["mean"])["method"]
        pairs += [(best, m) for m in labels if m != best]
    return list(dict.fromkeys(pairs))


def compare_methods(summary: list[dict], results: list[dict], predictions: dict | None, in_domains) -> dict:
    """The paired comparisons of :func:`comparison_pairs`, by the bootstrap when there are
    per-row predictions, else by the t fallback. ``results`` and ``predictions`` name the
    methods by their table labels."""
    pairs = comparison_pairs(summary)
    if predictions is not None:
        boot = PairedBootstrap(predictions, in_domains)
        rows = [{"a": a, "b": b, **boot.compare(a, b)} for a, b in pairs]
        return {"method": BOOTSTRAP_METHOD, "n_resamples": BOOTSTRAP_RESAMPLES, "random_state": BOOTSTRAP_SEED,
                "confidence": CONFIDENCE, "pairs": rows}
    rows = [{"a": a, "b": b, **paired_t(results, a, b)} for a, b in pairs]
    return {"method": T_METHOD, "confidence": CONFIDENCE, "pairs": rows}


def lookup(comparisons: dict | None, a: str, b: str) -> dict | None:
    """A − B from the stored comparisons (B − A turned around when only that one is stored)."""
    for row in (comparisons or {}).get("pairs", []):
        if (row["a"], row["b"]) == (a, b):
            return row
        if (row["a"], row["b"]) == (b, a):
            flip = {"beats": "loses", "loses": "beats", "ties": "ties"}
            turned = {axis: None if row.get(axis) is None else
                      {**row[axis], "diff": -row[axis]["diff"], "low": -row[axis]["high"], "high": -row[axis]["low"],
                       "verdict": flip[row[axis]["verdict"]]} for axis in AXES}
            return {"a": a, "b": b, **turned}
    return None


def _diff(c: dict | None, verdict_too: bool = True) -> str:
    """A − B in points with its interval: ``+1.2 [+0.4, +2.0] beats``."""
    if not c:
        return "—"
    pts = [100 * c[k] + 0.0 for k in ("diff", "low", "high")]  # + 0.0: no "-0.0" from a turned-around pair
    pts = [0.0 if abs(v) < 0.05 else v for v in pts]
    text = f"{pts[0]:+.1f} [{pts[1]:+.1f}, {pts[2]:+.1f}]"
    return f"{text} {c['verdict']}" if verdict_too else text


# ----------------------------------------------------------------------------- summaries, flags, table, plot

REFERENCE = "sklearn LogisticRegressionCV"


def summarise(results: list[dict], label_of: dict[str, str]) -> list[dict]:
    """Per method: mean and population std over seeds (as vlaug's report) of each accuracy,
    per domain, and the hyperparameters selection chose per seed."""
    order = []
    for r in results:
        if r["method"] not in order:
            order.append(r["method"])
    out = []
    for method in order:
        rows = [r for r in results if r["method"] == method]
        ms = lambda v: {"mean": float(np.mean(v)), "std": float(np.std(v))}  # noqa: E731
        entry = {"method": label_of.get(method, method), "spec": method, "n_seeds": len(rows),
                 "in_domain": ms([r["in_domain"] for r in rows]), "out_of_domain": ms([r["out_of_domain"] for r in rows]),
                 "per_domain": {d: ms([r["per_domain"][d] for r in rows if d in r["per_domain"]]) for d in DOMAINS
                                if any(d in r["per_domain"] for r in rows)},
                 "seeds": [r["seed"] for r in rows], "selection": [r.get("selection") or {} for r in rows]}
        out.append(entry)
    return out


def _joint(selection: dict) -> bool:
    """A joint method's selection (its weight decay is AdamW's, not the probe grid's)."""
    return "selected_epoch" in selection or "selected_step" in selection or "optimizer" in selection


def _chosen(selection: list[dict]) -> str:
    """What selection chose over the seeds, compactly: weight decays with counts, GDA's
    shrinkage, or the kept step / epoch of joint methods."""
    alphas = [s["shrinkage"] for s in selection if "shrinkage" in s]
    if alphas:
        values, counts = np.unique(np.round(alphas, 6), return_counts=True)
        return "shrinkage " + ", ".join(f"{v:g}×{c}" for v, c in zip(values, counts))
    wds = [s["weight_decay"] for s in selection if "weight_decay" in s and not _joint(s)]
    if wds:
        values, counts = np.unique(np.round(wds, 12), return_counts=True)
        return ", ".join(f"{v:.0e}×{c}" for v, c in zip(values, counts))
    steps = [s for s in selection if "selected_step" in s]
    if steps:
        configs = [f"{s['lr']:g}/{s['weight_decay']:g}" for s in steps if "lr" in s and "weight_decay" in s]
        values, counts = np.unique(configs, return_counts=True)
        return ("step " + ",".join(str(s["selected_step"]) for s in steps) + f" of ≤ {steps[0].get('max_steps', '?')}"
                + ("; lr/wd " + ", ".join(f"{v}×{c}" for v, c in zip(values, counts)) if configs else ""))
    epochs = [s["selected_epoch"] for s in selection if "selected_epoch" in s]
    if epochs:
        return "epoch " + ",".join(str(e) for e in epochs) + f" of {selection[0].get('epochs', '?')}"
    return "—"


REFERENCE_TOLERANCE = 0.02  # linear and the scikit-learn reference differ by more than this (either axis): a flag
REFERENCE_STEPS = 1  # ... or their weight decays lie more than this many grid steps apart on a seed


def _count(n: int, total: int) -> str:
    return f"{n} of {total} seeds"


def selection_flags(s: dict, grid: list[float], options: dict | None) -> list[str]:
    """Per method, counted over seeds: weight decays at an end of the grid (or the grid's
    extension when the selection records one), joint methods stopped by their epoch cap,
    solvers that did not converge or stalled. Fields a selection lacks are skipped."""
    out, method, sel = [], s["method"], s["selection"]
    n = len(sel)
    probe = [x for x in sel if "weight_decay" in x and not _joint(x)]  # joint methods' wd is AdamW's
    extended = [x for x in probe if x.get("grid_extended")]
    if extended:
        ranges = sorted({f"[{x['grid'][0]:.0e}, {x['grid'][1]:.0e}]" for x in extended if x.get("grid")})
        out.append(f"{method}: weight-decay grid extended on {_count(len(extended), n)}"
                   + (f" (to {', '.join(ranges)})" if ranges else ""))
    for end, word in ((0, "weakest"), (1, "strongest")):
        for wider in (False, True):  # at an end of the stated grid, then of a grid the selection extended
            hits = []
            for x in probe:
                bounds = x.get("grid") or ([min(grid), max(grid)] if grid else None)
                if bool(x.get("grid_extended")) == wider and bounds and np.isclose(x["weight_decay"], bounds[end],
                                                                                    rtol=1e-6):
                    hits.append(x)
            if hits:
                values = ", ".join(f"{v:.0e}" for v in sorted({x["weight_decay"] for x in hits}))
                where = "the extended grid's" if wider else "the grid's"
                out.append(f"{method}: weight decay {values} ({where} {word}) on {_count(len(hits), n)}")
    cap = [x for x in sel if x.get("stopped") == "cap"]
    if cap:
        out.append(f"{method}: stopped by its cap on steps / epochs (stopped: \"cap\") on {_count(len(cap), n)}")
    elif options and options.get("epochs"):  # older vlaug: no `stopped`; a run as long as the cap reached it
        hit = [x for x in sel if "selected_epoch" in x and "stopped" not in x and x.get("epochs", 0) >= options["epochs"]]
        if hit:
            out.append(f"{method}: ran its whole epoch cap ({options['epochs']}) on {_count(len(hit), n)} "
                       "(inferred: the selection has no `stopped`)")
    bad = [x for x in sel if x.get("converged") is False]
    if bad:
        out.append(f"{method}: did not converge (converged: false) on {_count(len(bad), n)}")
    stalled = [x for x in sel if x.get("stalled") is True]
    if stalled:
        out.append(f"{method}: stalled (stalled: true) on {_count(len(stalled), n)}")
    return out


def reference_check(entry: dict) -> dict | None:
    """vlaug's ``linear`` against the scikit-learn reference on the same rows: the paired
    difference per axis and the weight decays chosen per seed."""
    by = {s["method"]: s for s in entry["summary"]}
    ref, lin = by.get(REFERENCE), by.get("linear")
    if not ref or not lin:
        return None
    grid = sorted(entry.get("weight_decay_grid") or [])
    steps = lambda w: int(np.argmin(np.abs(np.log(grid) - np.log(w)))) if grid else 0  # noqa: E731
    seeds = []
    chosen = {seed: x for seed, x in zip(ref.get("seeds", range(len(ref["selection"]))), ref["selection"])}
    for seed, a in zip(lin.get("seeds", range(len(lin["selection"]))), lin["selection"]):
        b = chosen.get(seed, {})
        if "weight_decay" in a and "weight_decay" in b:
            seeds.append({"seed": seed, "linear": a["weight_decay"], "reference": b["weight_decay"],
                          "same": bool(np.isclose(a["weight_decay"], b["weight_decay"], rtol=1e-6)),
                          "steps": abs(steps(a["weight_decay"]) - steps(b["weight_decay"]))})
    pair = lookup(entry.get("comparisons"), "linear", REFERENCE)
    mean_diff = {k: lin[k]["mean"] - ref[k]["mean"] for k in AXES}
    return {"paired": {k: pair.get(k) for k in AXES} if pair else None, "mean_diff": mean_diff, "seeds": seeds,
            "same_choice": sum(s["same"] for s in seeds), "far": sum(s["steps"] > REFERENCE_STEPS for s in seeds)}


def flags(entry: dict) -> list[str]:
    """What looks wrong or suspicious in one setting's numbers."""
    out = []
    summary, grid = entry["summary"], entry.get("weight_decay_grid") or []
    by = {s["method"]: s for s in summary}
    options = {m["method"]: m.get("options") for m in entry.get("methods", [])}
    for s in summary:
        for key in AXES:
            if s[key]["std"] > 0.05:
                out.append(f"{s['method']}: {key} std over seeds {100 * s[key]['std']:.1f} points (> 5)")
        out += selection_flags(s, grid, options.get(s["method"]))
    check = entry.get("reference_check")
    if check:
        for key in AXES:
            if abs(check["mean_diff"][key]) > REFERENCE_TOLERANCE:
                out.append(f"linear vs {REFERENCE}: {key.replace('_', '-')} {100 * by['linear'][key]['mean']:.1f} vs "
                           f"{100 * by[REFERENCE][key]['mean']:.1f} (more than {100 * REFERENCE_TOLERANCE:.0f} points apart)")
        if check["far"]:
            out.append(f"linear vs {REFERENCE}: weight decays more than {REFERENCE_STEPS} grid step(s) apart on "
                       f"{_count(check['far'], len(check['seeds']))}")
    zs = by.get("zero-shot")
    if zs and entry.get("zero_shot_check"):
        mine = np.mean([r["in_domain"] for r in entry["zero_shot_check"]]), np.mean([r["out_of_domain"] for r in entry["zero_shot_check"]])
        if abs(mine[0] - zs["in_domain"]["mean"]) > 1e-6 or abs(mine[1] - zs["out_of_domain"]["mean"]) > 1e-6:
            out.append(f"zero-shot: vlaug {100 * zs['in_domain']['mean']:.2f}/{100 * zs['out_of_domain']['mean']:.2f} vs "
                       f"recomputed here {100 * mine[0]:.2f}/{100 * mine[1]:.2f} on the same rows")
    for kind, head in entry["heads"].items():
        st = (head.get("stats") or {}).get("zero_shot_accuracy") or {}
        if st and st.get("samples", 1) < st.get("points", 0) - 0.05:
            out.append(f"{kind} head: its box samples classify worse zero-shot than the points "
                       f"({100 * st['samples']:.1f} vs {100 * st['points']:.1f} %): boxes larger than their classes")
        box = head.get("stats") or {}
        if box.get("mean_corner_inner_product") is not None and box["mean_corner_inner_product"] > 0.999:
            out.append(f"{kind} head: mean corner inner product {box['mean_corner_inner_product']:.5f}: the boxes have "
                       f"(almost) no size (mean log-volume {box.get('mean_log_volume'):.1f}), so box samples ≈ the points")
        if head.get("returncode") != 0:
            out.append(f"{kind} head: train-box failed: {head.get('error')}")
    for check_ in (entry.get("split_check"), entry.get("predictions_check")):
        if check_:
            out.append(check_)
    for label, err in entry.get("failures", {}).items():
        out.append(f"{label}: probe failed: {err}")
    if entry.get("reference", {}).get("convergence_warnings"):
        out.append(f"{REFERENCE}: {entry['reference']['convergence_warnings']} ConvergenceWarning(s) at max_iter "
                   f"{entry['setting']['max_iter']}")
    return out


def _seed_label(label: str) -> str:
    """The registered name behind a table label such as ``box[box]`` or ``linear?ensemble=0.3``."""
    return label.split("[")[0].split("?")[0].split(":")[0]


def dominating(summary: list[dict], comparisons: dict | None = None) -> tuple[list[str], dict]:
    """The rows (other than the seed methods' default rows and the reference) that beat every
    seed method on both axes, and the best seed row per axis by mean, ``axis -> (row, mean)``.
    With ``comparisons`` a row beats a seed method on an axis when the paired interval of
    the difference lies above 0 (every seed method, both axes); without them (a JSON of an
    older run) when its mean is higher."""
    seeds = seed_rows(summary)
    if not seeds:
        return [], {}
    by = {s["method"]: s for s in summary}
    best = {k: max((by[m] for m in seeds), key=lambda s: s[k]["mean"]) for k in AXES}
    candidates = [s["method"] for s in summary if s["method"] not in seeds and s["method"] != REFERENCE]
    if comparisons:
        def beats_all(m):
            rows = [lookup(comparisons, m, seed) for seed in seeds]
            return all(r and r.get(k) and r[k]["verdict"] == "beats" for r in rows for k in AXES)
    else:
        def beats_all(m):
            return all(by[m][k]["mean"] > best[k][k]["mean"] for k in AXES)
    wins = [m for m in candidates if beats_all(m)]
    return wins, {k: (b["method"], b[k]["mean"]) for k, b in best.items()}


def ties_with_best(entry: dict) -> tuple[str, list[str]]:
    """The row with the best out-of-domain mean and the rows whose paired interval against it
    contains 0 (they tie with it out of domain)."""
    best = max(entry["summary"], key=lambda x: x["out_of_domain"]["mean"])["method"]
    ties = []
    for s in entry["summary"]:
        c = lookup(entry.get("comparisons"), best, s["method"]) if s["method"] != best else None
        if c and c.get("out_of_domain") and c["out_of_domain"]["verdict"] == "ties":
            ties.append(s["method"])
    return best, ties


def plot(entry: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = entry["summary"]
    pts = [(100 * s["in_domain"]["mean"], 100 * s["out_of_domain"]["mean"]) for s in summary]
    front = set(pareto_front(pts))
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for i, s in enumerate(summary):
        on = i in front
        ref = s["method"] == REFERENCE
        ax.errorbar(pts[i][0], pts[i][1], xerr=100 * s["in_domain"]["std"], yerr=100 * s["out_of_domain"]["std"],
                    fmt="x" if ref else "o", color="tab:red" if on else ("0.3" if ref else "tab:blue"), ms=7 if on else 5,
                    capsize=3, zorder=3 if on else 2)
    # labels: nudged down until they clear the labels already placed (data units scaled to the axes)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    sx, sy = max(1.0, max(xs) - min(xs)), max(1.0, max(ys) - min(ys))
    placed = []
    for i in sorted(range(len(pts)), key=lambda i: -pts[i][1]):
        x, y = pts[i][0] + 0.01 * sx, pts[i][1] + 0.01 * sy
        while any(abs(x - px) < 0.22 * sx and abs(y - py) < 0.035 * sy for px, py in placed):
            y -= 0.035 * sy
        placed.append((x, y))
        on = i in front
        ax.annotate(summary[i]["method"], pts[i], xytext=(x, y), fontsize=7, fontweight="bold" if on else "normal",
                    color="tab:red" if on else "0.2",
                    arrowprops=dict(arrowstyle="-", color="0.6", lw=0.5) if abs(y - pts[i][1]) > 0.03 * sy else None)
    fp = sorted((pts[i] for i in front), key=lambda p: p[0])
    if fp:
        ax.plot([p[0] for p in fp], [p[1] for p in fp], "--", color="tab:red", lw=1, zorder=1,
                label="Pareto front (in-domain vs out-of-domain)")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("in-domain accuracy (%) — photo, held-out rows")
    ax.set_ylabel("out-of-domain accuracy (%) — sketch, painting, clipart")
    st = entry["setting"]
    ax.set_title(f"shift benchmark '{st['name']}': {entry['n_seeds']} seeds, C={st['sim']['n_classes']}, "
                 f"d={st['sim']['d']}, {st['sim']['n_per_class']} rows/class/domain\n(error bars: std over seeds)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pm(ms: dict) -> str:
    return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"


def _interval_note(comparisons: dict | None) -> str:
    """How the paired intervals were computed, in one sentence."""
    if not comparisons:
        return ("No paired intervals in this run (a JSON of an older run): \"beats\" below compares means only, "
                "which a reviewer should not accept.")
    conf = f"{100 * comparisons['confidence']:.0f} %"
    if comparisons["method"] == BOOTSTRAP_METHOD:
        return (f"A − B in points with a {conf} interval from a paired bootstrap over test rows and seeds "
                f"({comparisons['n_resamples']} resamples, numpy seed {comparisons['random_state']}: each resample "
                "draws the test rows of the axis with replacement, the same rows for A and B, and the seeds with "
                "replacement, and takes the mean over the drawn seeds of the accuracy difference; percentiles "
                f"{(100 - 100 * comparisons['confidence']) / 2:g} and {(100 + 100 * comparisons['confidence']) / 2:g}). "
                "\"beats\": the interval lies above 0; \"loses\": below; else \"ties\". Intervals are per "
                "comparison, not simultaneous.")
    return (f"A − B in points with a {conf} t-interval over the seeds' accuracy differences: **fallback**, this vlaug "
            "writes no per-row predictions (`test_predictions.parquet`), so test-row noise is not in the interval "
            "and two methods deterministic given the data get a zero-width one. \"beats\": the interval lies "
            "above 0; \"loses\": below; else \"ties\".")


def _paired_table(entry: dict) -> list[str]:
    """Each row against ``linear`` and ``zero-shot``, both axes."""
    comps = entry.get("comparisons")
    if not comps:
        return []
    L = ["Paired differences (points): " + _interval_note(comps), "",
         "| method | − linear, in-domain | − linear, out-of-domain | − zero-shot, in-domain | − zero-shot, out-of-domain |",
         "|---|---|---|---|---|"]
    for s in entry["summary"]:
        m = s["method"]
        cells = []
        for base in ("linear", "zero-shot"):
            c = lookup(comps, m, base) if m != base else None
            cells += [_diff(c.get(k)) if c else "—" for k in AXES]
        L.append(f"| {m} | " + " | ".join(cells) + " |")
    return L + [""]


def _seed_table(entry: dict) -> list[str]:
    """The rows that are not seed methods against every seed method: which beat all on both axes."""
    comps = entry.get("comparisons")
    wins, best = dominating(entry["summary"], comps)
    if not best:
        return []
    bar = " and ".join(f"{k.replace('_', '-')} {100 * v:.1f} ({m})" for k, (m, v) in best.items())
    L = [f"Seed methods ({', '.join(SEED_METHODS)}) at their best (by mean): {bar}. Rows beating every seed method "
         "on both axes: " + (", ".join(f"**{w}**" for w in wins) if wins else "none") + "."]
    if not comps:
        return L + ["", _interval_note(comps), ""]
    seeds = seed_rows(entry["summary"])
    L += ["", "A row beats every seed method when each of its paired intervals against the "
          f"{len(seeds)} seed rows lies above 0 on both axes; the table shows the difference to the best seed row by "
          "mean on each axis and how many seed rows the row beats / ties / loses to.", "",
          f"| row | − {best['in_domain'][0]}, in-domain | − {best['out_of_domain'][0]}, out-of-domain | "
          "in-domain beats / ties / loses | out-of-domain beats / ties / loses | beats all on both |",
          "|---|---|---|---|---|---|"]
    for s in entry["summary"]:
        m = s["method"]
        if m in seeds or m == REFERENCE:
            continue
        rows = [lookup(comps, m, seed) for seed in seeds]
        counts = []
        for k in AXES:
            v = [r[k]["verdict"] for r in rows if r and r.get(k)]
            counts.append(" / ".join(str(v.count(w)) for w in ("beats", "ties", "loses")))
        first = [lookup(comps, m, best[k][0]) for k in AXES]
        L.append(f"| {m} | {_diff(first[0] and first[0].get('in_domain'))} | "
                 f"{_diff(first[1] and first[1].get('out_of_domain'))} | {counts[0]} | {counts[1]} | "
                 f"{'**yes**' if m in wins else 'no'} |")
    return L + [""]


def _reference_lines(entry: dict) -> list[str]:
    """``linear`` against scikit-learn on the same rows: both axes and the chosen weight decays."""
    check = entry.get("reference_check")
    if not check:
        return []
    paired = check.get("paired")
    axes = "; ".join(f"{k.replace('_', '-')} " + (_diff(paired.get(k)) if paired else
                                                   f"{100 * check['mean_diff'][k]:+.1f} (difference of means)")
                     for k in AXES)
    per_seed = ", ".join(f"seed {x['seed']}: {x['linear']:.0e} / {x['reference']:.0e}" for x in check["seeds"])
    return [f"`linear` − `{REFERENCE}` (same rows; C = 1/(wd·n_train)): {axes}. Same weight decay chosen on "
            f"{_count(check['same_choice'], len(check['seeds']))} (linear / sklearn: {per_seed}); flagged when the "
            f"means differ by more than {100 * REFERENCE_TOLERANCE:.0f} points on an axis or the choices lie more than "
            f"{REFERENCE_STEPS} grid step(s) apart.", ""]


def _hyperparameter_lines(entry: dict) -> list[str]:
    st, sim = entry["setting"], entry["setting"]["sim"]
    sizes = entry["split_sizes"]
    comps = entry.get("comparisons") or {}
    L = ["<details><summary>Settings and hyperparameters of this run</summary>", "",
         f"- caches: {st.get('caches', 'reported')}; simulator seed {sim.get('seed')}",
         f"- simulator: `{json.dumps(sim)}`",
         f"- rows: {entry['n_rows']} ({sim['n_classes']} classes × {len(DOMAINS)} domains × {sim['n_per_class']}); "
         f"splits per seed (train / val / test in / test out): "
         + "; ".join(f"seed {s['seed']}: {s['train']}/{s['val']}/{s['test_in']}/{s['test_out']}" for s in sizes)
         + f" (from {entry['split_source']})",
         f"- weight-decay grid: {', '.join(f'{w:.1e}' for w in entry['weight_decay_grid'])}; "
         f"sklearn C = 1/(wd·n_train), max_iter {st['max_iter']}, selection on the same validation rows",
         f"- paired intervals: {comps.get('method', 'none')}"
         + (f", {comps['n_resamples']} resamples, numpy seed {comps['random_state']}" if "n_resamples" in comps else "")
         + (f", confidence {comps['confidence']}" if comps else ""),
         f"- vlaug probe: `{' '.join(entry['probe_args'])} -m ...`",
         "- methods: " + "; ".join(f"`{m['method']}` options {json.dumps(m.get('options'))}" for m in entry["methods"])]
    for kind, h in entry["heads"].items():
        tr = h.get("training") or {}
        keep = {k: tr[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "val_fraction", "test_fraction",
                                   "n_train", "n_val", "seed") if k in tr}
        L.append(f"- head `{kind}`: `vlaug {' '.join(h['args'])}`; head config {json.dumps(h.get('head_config'))}; "
                 f"training {json.dumps(keep)}")
    return L + ["", "</details>", ""]


def markdown_setting(entry: dict) -> str:
    st, stats = entry["setting"], entry["stats"]
    caches = st.get("caches", "reported")
    L = [f"### Setting `{st['name']}`" + (" — tuning cache" if caches == "tuning" else ""), "",
         st["description"] + ".", ""]
    L += ["Simulated embedding statistics (measured on this run's cache):", "",
          "| statistic | measured | target (published, CLIP ViT-B/32) |", "|---|---|---|"]
    for key, target in TARGETS.items():
        L.append(f"| {key.replace('_', ' ')} | {stats[key]:.3f} | {target} |")
    zs = stats["zero_shot_per_domain"]
    L.append(f"| zero-shot accuracy, all rows (photo / sketch / painting / clipart) | "
             f"{' / '.join(f'{100 * zs[k]:.1f}' for k in DOMAINS)} | in ≈ out, far below the linear probe in domain |")
    L += ["", f"Accuracy (%) on held-out rows, mean ± std over {entry['n_seeds']} seeds (seeds "
          f"{', '.join(map(str, range(entry['n_seeds'])))}); trained on `photo`; out-of-domain = sketch + painting + "
          "clipart. `chosen` = the weight decay selection picked per seed (× count), or the kept epoch of joint "
          "methods.", "",
          "| method | in-domain | out-of-domain | " + " | ".join(TARGET_DOMAINS) + " | chosen |",
          "|---|---|---|" + "---|" * len(TARGET_DOMAINS) + "---|"]
    front = set(pareto_front([(s["in_domain"]["mean"], s["out_of_domain"]["mean"]) for s in entry["summary"]]))
    for i, s in enumerate(entry["summary"]):
        name = f"**{s['method']}**" if i in front else s["method"]
        doms = " | ".join(_pm(s["per_domain"][d]) if d in s["per_domain"] else "—" for d in TARGET_DOMAINS)
        L.append(f"| {name} | {_pm(s['in_domain'])} | {_pm(s['out_of_domain'])} | {doms} | {_chosen(s['selection'])} |")
    L += ["", "Bold: on the Pareto front of (in-domain, out-of-domain) means (descriptive: the front is not tested). "
          f"Plot: `{entry['plot']}`.", ""]
    L += _paired_table(entry) + _seed_table(entry) + _reference_lines(entry)
    box = entry["heads"].get("box", {}).get("stats")
    if box:
        z = box.get("zero_shot_accuracy") or {}
        L += [f"Box head (`stats.json`, {box.get('n_rows')} training-domain rows): mean log-volume "
              f"{box['mean_log_volume']:.3f}, mean corner inner product {box['mean_corner_inner_product']:.4f}; "
              "zero-shot accuracy of points / lower corners / upper corners / centres / box samples: "
              + " / ".join(f"{100 * z[k]:.1f}" for k in ("points", "lo", "hi", "center", "samples") if k in z) + " %.", ""]
    heads = ", ".join(f"{k} {h['seconds']:.1f} s (kept epoch {h.get('selected_epoch')})" for k, h in entry["heads"].items())
    t = entry["seconds"]
    L += [f"Runtime: simulate + write {t['simulate_and_write']:.1f} s; train-box {heads or 'none (no method of the run needs a head)'}; probe "
          f"{t['probe']:.1f} s; sklearn reference {t['reference']:.1f} s; paired comparisons "
          f"{t.get('comparisons', 0.0):.1f} s; total {t['total']:.1f} s.", ""]
    fl = entry["flags"]
    L += ["Flags (automatic checks; counts over seeds):", ""] + ([f"- {f}" for f in fl] or ["- none"]) + [""]
    L += _hyperparameter_lines(entry)
    return "\n".join(L)


def _caches_line(run: dict) -> str:
    """Which kind of cache the run used, with each setting's simulator seed."""
    kinds = {e["setting"].get("caches", "reported") for e in run["settings"].values()}
    seeds = ", ".join(f"{name} {e['setting']['sim'].get('seed')}" for name, e in run["settings"].items())
    if kinds == {"tuning"}:
        return (f"Caches: **tuning** (simulator seed per setting: {seeds}; {TUNING_SEED_BASE} + k, never a reported "
                "seed). For choosing defaults; these are not the reported numbers.")
    kind = "reported" if kinds == {"reported"} else "mixed (" + ", ".join(sorted(kinds)) + ")"
    return (f"Caches: **{kind}** (simulator seed per setting: {seeds}). Defaults are chosen on tuning caches only "
            f"(other simulator seeds, `--caches tuning`; `benchmarks/tune_defaults.py`) or by validation inside a "
            "method; the reported caches are run once, at the end.")


def markdown(run: dict) -> str:
    meta = run["meta"]
    n_seeds = sorted({e["n_seeds"] for e in run["settings"].values()})
    L = ["## Domain-shift benchmark on a simulated CLIP ViT-B/32 embedding space", "",
         f"`python benchmarks/shift_benchmark.py {' '.join(meta['argv'])}` — {meta['date']}, {meta['machine']}, "
         f"vlaug {meta['vlaug_version']} (commit {meta['git']}), torch {meta['torch']}, scikit-learn {meta['sklearn']}, "
         f"{meta['threads_env'] or 'default'} thread(s) per vlaug run ({meta['torch_threads']} torch threads here); "
         f"seeds 0..{n_seeds[-1] - 1 if n_seeds else '?'} ({', '.join(map(str, n_seeds))} per setting); "
         f"total {meta['seconds']:.0f} s.", "",
         _caches_line(run), "",
         *([f"Left out of this run (`--skip`): {', '.join(f'`{n}`' for n in meta['skipped'])}; their rows are "
            "not here and no claim below covers them.", ""] if meta.get("skipped") else []),
         "Every method of `vlaug.methods.REGISTRY` is run through `python -m vlaug probe` on a feature cache written "
         "with vlaug's own writer; heads come from `python -m vlaug train-box` on `photo`. The simulator and the "
         "published figures it is calibrated to are described in the script's docstring. "
         f"`{REFERENCE}` is fitted in the script on vlaug's own train / validation / test rows of each seed.", ""]
    if meta.get("merged"):
        L += [f"Merged from {len(meta['merged'])} runs, one per setting (`--merge`): "
              + "; ".join(f"`shift_benchmark.py {' '.join(m['argv'])}` ({m['date']}, commit {m['git']}, "
                          f"{m['seconds']:.0f} s)" for m in meta["merged"]) + ".", ""]
    notes = sorted({_interval_note(e.get("comparisons")) for e in run["settings"].values()})
    L += ["Claims below (\"beats\", \"ties\", \"loses\") are paired comparisons: " + " ".join(notes), ""]
    L += ["| setting | matched cos | mismatched cos | prompt–prompt cos | image–image cos | ‖Δgap‖ | cos(centres) | "
          "zero-shot in / out | linear in / out | best out-of-domain (ties with it) | seed methods' best in / out | "
          "beating every seed method on both |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in run["settings"].items():
        s = e["stats"]
        by = {x["method"]: x for x in e["summary"]}
        zs, lin = by.get("zero-shot"), by.get("linear")
        io = lambda x: f"{100 * x['in_domain']['mean']:.1f} / {100 * x['out_of_domain']['mean']:.1f}" if x else "—"  # noqa: E731
        best, ties = ties_with_best(e)
        tied = (f"; ties: {', '.join(ties[:3])}" + (f" +{len(ties) - 3}" if len(ties) > 3 else "")) if ties else ""
        wins, bar = dominating(e["summary"], e.get("comparisons"))
        seeds = " / ".join(f"{100 * v:.1f} ({m})" for m, v in bar.values()) if bar else "—"
        beating = ", ".join(f"{w} ({io(by[w])})" for w in wins) or "none"
        L.append(f"| {name} | {s['matched_cosine']:.3f} | {s['mismatched_cosine']:.3f} | {s['prompt_prompt_cosine']:.3f} | "
                 f"{s['image_image_cosine']:.3f} | {s['modality_gap_norm']:.3f} | {s['modality_gap_cosine']:.3f} | "
                 f"{io(zs)} | {io(lin)} | {best} ({100 * by[best]['out_of_domain']['mean']:.1f}{tied}) | {seeds} | "
                 f"{beating} |")
    L.append("")
    for e in run["settings"].values():
        L.append(markdown_setting(e))
    return "\n".join(L)


# ----------------------------------------------------------------------------- main


def with_reference(predictions: dict, label_of: dict[str, str], reference: dict | None) -> dict:
    """vlaug's predictions with the methods named by their table labels, plus the reference's."""
    names = {m: label_of.get(m, m) for m in np.unique(predictions["method"].astype(str))}
    out = dict(predictions)
    out["method"] = np.array([names[m] for m in predictions["method"].astype(str)], dtype=object)
    if reference is not None:
        out = {k: np.concatenate([np.asarray(out[k]), np.asarray(reference[k])]) for k in PREDICTION_COLUMNS}
    return out


def check_predictions(predictions: dict, summary: list[dict], protocol: dict) -> str | None:
    """None when every method's accuracy recomputed from the per-row predictions equals its
    report's (both axes, every seed); else what differs."""
    inside = np.isin(predictions["domain"].astype(str), protocol.get("train_domains") or [TRAIN_DOMAIN])
    correct = predictions["label"] == predictions["prediction"]
    methods = predictions["method"].astype(str)
    bad = []
    for s in summary:
        for axis, mask in (("in_domain", inside), ("out_of_domain", ~inside)):
            keep = (methods == s["method"]) & mask
            if not keep.any():
                continue
            per_seed = [correct[keep & (predictions["seed"] == seed)].mean() for seed in s.get("seeds", [])]
            if per_seed and abs(float(np.mean(per_seed)) - s[axis]["mean"]) > 1e-6:
                bad.append(f"{s['method']} {axis} {100 * np.mean(per_seed):.2f} vs {100 * s[axis]['mean']:.2f}")
    missing = [s["method"] for s in summary if not (methods == s["method"]).any()]
    out = []
    if bad:
        out.append(f"{PREDICTIONS_FILE} disagrees with report.json: " + "; ".join(bad))
    if missing:
        out.append(f"{PREDICTIONS_FILE} has no rows of: {', '.join(missing)} (no paired interval for them)")
    return "; ".join(out) or None


def run_setting(setting: Setting, seeds: int, workdir: Path, plot_dir: Path, log, caches: str = "reported") -> dict:
    """Simulate, write, train the heads, probe every method, fit the reference and compare:
    one setting's entry of the run (``caches``: the kind of cache ``setting.sim`` is, recorded)."""
    t_start = time.perf_counter()
    folder = workdir / setting.name
    if folder.exists():
        shutil.rmtree(folder)
    cache_dir = folder / "features"
    p = setting.sim
    log(f"[{setting.name}] {caches} cache, simulator seed {p.seed}: simulating {p.n_classes} classes × {len(DOMAINS)} domains × {p.n_per_class} rows, d = {p.d}")
    sim = shifted_domains(p)
    stats = measure(sim)
    write_cache(cache_dir, sim, p, source="benchmarks/shift_benchmark.py (simulated)")
    t_sim = time.perf_counter() - t_start
    log(f"[{setting.name}] " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items() if isinstance(v, float)))

    heads = train_heads(cache_dir, folder / "heads", needed_heads(), setting.head_epochs, log)
    specs, missing = method_specs(heads, setting.joint_epochs, setting.joint_options)
    if missing:  # a registered method needs a head kind not trained yet
        heads.update(train_heads(cache_dir, folder / "heads", sorted(set(missing)), setting.head_epochs, log))
        specs, missing = method_specs(heads, setting.joint_epochs, setting.joint_options)
    label_of = {spec: label for label, spec in specs}
    probe = run_probe(cache_dir, folder / "report", specs, seeds, setting, log)
    report = probe["report"] or {"results": [], "methods": [], "protocol": {}}
    failures = dict(probe["failures"])
    for kind in missing:
        failures[f"(methods needing a {kind} head)"] = "train-box failed for that head kind"

    t_ref = time.perf_counter()
    splits, split_source = vlaug_splits(cache_dir, seeds, setting, folder)
    from vlaug.cache import read_cache

    feats = read_cache(str(cache_dir))
    x, y, dom = np.asarray(feats.embeddings, dtype=np.float64), np.asarray(feats.labels), np.asarray(feats.domains)
    grid = report["protocol"].get("weight_decay_grid") or []
    if not grid:
        from vlaug.probe import weight_decay_grid

        grid = weight_decay_grid(setting.grid_size)
    reference = sklearn_reference(x, y, dom, splits, grid, setting.max_iter)
    t_ref = time.perf_counter() - t_ref
    sizes = [{"seed": i, **s.sizes()} for i, s in enumerate(splits)]
    reported = [{k: s[k] for k in ("seed", "train", "val", "test_in", "test_out")} for s in report["protocol"].get("splits", [])]
    split_check = None
    if reported and reported != sizes:
        split_check = f"split sizes of the reference ({sizes}) differ from the report's ({reported})"

    entry = {
        "setting": {"name": setting.name, "description": setting.description, "caches": caches, "sim_seed": p.seed,
                    "sim": p.to_dict(),
                    "head_epochs": setting.head_epochs, "joint_epochs": setting.joint_epochs,
                    "joint_options": dict(setting.joint_options),
                    "grid_size": setting.grid_size, "max_iter": setting.max_iter},
        "n_seeds": seeds, "n_rows": int(len(x)), "stats": stats, "heads": heads,
        "methods": [{"method": label_of.get(m["method"], m["method"]), "spec": m["method"], "options": m.get("options"),
                     "head_config": m.get("head_config")} for m in report["methods"]],
        "probe_args": ["vlaug", *probe["args"]], "probe_per_method_runs": probe["per_method_runs"],
        "failures": failures, "weight_decay_grid": grid, "split_sizes": sizes, "split_source": split_source,
        "split_check": split_check, "reference": reference,
        "zero_shot_check": zero_shot_check(x, y, dom, sim["texts"]["classes"].astype(np.float64), splits),
        "results": report["results"] + reference["results"],
    }
    entry["summary"] = summarise(entry["results"], label_of)
    t_cmp = time.perf_counter()
    predictions = read_predictions(probe.get("report_dirs") or [])
    if predictions is not None:
        predictions = with_reference(predictions, label_of, reference.pop("predictions"))
        entry["predictions_check"] = check_predictions(predictions, entry["summary"], report["protocol"])
    else:
        reference.pop("predictions")
        log(f"[{setting.name}] no {PREDICTIONS_FILE}: paired t-intervals over seeds (fallback)")
    labelled = [{**r, "method": label_of.get(r["method"], r["method"])} for r in entry["results"]]
    entry["comparisons"] = compare_methods(entry["summary"], labelled, predictions,
                                           report["protocol"].get("train_domains") or [TRAIN_DOMAIN])
    entry["reference_check"] = reference_check(entry)
    t_cmp = time.perf_counter() - t_cmp
    suffix = "" if caches == "reported" else f"_{caches}"
    entry["plot"] = str(plot_dir / f"shift_benchmark_{setting.name}{suffix}.png")
    plot(entry, Path(entry["plot"]))
    try:
        entry["plot"] = str(Path(entry["plot"]).resolve().relative_to(REPO))
    except ValueError:
        pass
    entry["seconds"] = {"simulate_and_write": t_sim, "heads": {k: h["seconds"] for k, h in heads.items()},
                        "probe": probe["seconds"], "reference": t_ref, "comparisons": t_cmp,
                        "total": time.perf_counter() - t_start}
    entry["flags"] = flags(entry)
    log(f"[{setting.name}] done in {entry['seconds']['total']:.1f} s")
    return entry


def _meta(argv: list[str]) -> dict:
    import sklearn
    import torch

    from vlaug._version import __version__

    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        git = git + ("+uncommitted changes" if dirty else "")
    except OSError:
        git = "?"
    return {"argv": argv, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} "
            f"{os.cpu_count()} cores, {platform.system()}", "python": platform.python_version(),
            "vlaug_version": __version__, "git": git, "torch": torch.__version__, "sklearn": sklearn.__version__,
            "torch_threads": torch.get_num_threads(), "threads_env": THREADS["n"], "skipped": list(SKIPPED["names"])}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--skip", default="", help="comma-separated registered methods to leave out (e.g. the joint methods "
                                                "whose AdamW searches dominate the time); the output names them")
    ap.add_argument("--seeds", type=int, default=None, help="vlaug probe --seeds (default 10; 2 with --quick)")
    ap.add_argument("--caches", choices=CACHE_KINDS, default="reported",
                    help="reported: each setting's simulator seed (the published numbers; run once, at the end); "
                         f"tuning: the same settings drawn with simulator seed {TUNING_SEED_BASE} + --draw, for "
                         "choosing defaults (default: reported)")
    ap.add_argument("--draw", type=int, default=0,
                    help=f"with --caches tuning: which tuning draw (simulator seed {TUNING_SEED_BASE} + DRAW; default 0)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds, few epochs: a smoke test")
    ap.add_argument("--out-md", help="write the Markdown here (default: stdout)")
    ap.add_argument("--json", help="write every number and setting here")
    ap.add_argument("--plot-dir", help="folder of the PNGs (default docs/; with --quick the work folder)")
    ap.add_argument("--workdir", help="folder for the caches, heads and reports (default: a temporary folder, removed)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads of every vlaug run and of the reference (OMP/MKL/OpenBLAS and torch; default 1: "
                         "with another process on a 2-core machine, 2 torch threads each made training up to 10x slower); "
                         "0 leaves the libraries' defaults")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="no run: report earlier --json runs (one setting or more each) as one run")
    args = ap.parse_args(argv)
    if args.merge:
        run = merge([json.loads(Path(f).read_text()) for f in args.merge])
        run["meta"]["argv"] = argv
        return _write(run, args, lambda msg: print(msg, file=sys.stderr))
    THREADS["n"] = args.threads or None
    SKIPPED["names"] = tuple(n.strip() for n in args.skip.split(",") if n.strip())
    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    if args.draw and args.caches != "tuning":
        ap.error("--draw picks a tuning cache: use it with --caches tuning")
    seeds = args.seeds or (2 if args.quick else 10)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlaug-shift-"))
    workdir.mkdir(parents=True, exist_ok=True)
    quick_plots = Path(tempfile.gettempdir()) / "vlaug-shift-quick-plots"  # not the docs/ figures
    plot_dir = Path(args.plot_dir) if args.plot_dir else (
        quick_plots if args.quick or args.caches == "tuning" else REPO / "docs")
    t0 = time.perf_counter()
    run = {"meta": {**_meta(argv), "caches": args.caches}, "targets": TARGETS, "settings": {}}
    try:
        for name in names:
            setting = cache_setting(_quick(SETTINGS[name]) if args.quick else SETTINGS[name], args.caches, args.draw)
            run["settings"][name] = run_setting(setting, seeds, workdir, plot_dir, log, args.caches)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    run["meta"]["seconds"] = time.perf_counter() - t0
    run["sim_seeds"] = {name: e["setting"]["sim_seed"] for name, e in run["settings"].items()}
    return _write(run, args, log)


def merge(runs: list[dict]) -> dict:
    """Runs of separate settings (e.g. run side by side) as one run; the meta of each is kept."""
    settings = {}
    for r in runs:
        for name, entry in r["settings"].items():
            if name in settings:
                raise SystemExit(f"setting {name!r} is in more than one of the runs to merge")
            settings[name] = entry
    meta = {**runs[0]["meta"], "seconds": sum(r["meta"]["seconds"] for r in runs),
            "merged": [r["meta"] for r in runs]}
    kinds = sorted({e["setting"].get("caches", "reported") for e in settings.values()})
    meta["caches"] = kinds[0] if len(kinds) == 1 else "mixed"
    return {"meta": meta, "targets": runs[0]["targets"], "settings": settings,
            "sim_seeds": {name: e["setting"]["sim"].get("seed") for name, e in settings.items()}}


def _write(run: dict, args, log) -> dict:
    md = markdown(run)
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(md + "\n", encoding="utf-8")
        log(f"wrote {args.out_md}")
    else:
        print(md)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(run, indent=1, default=str) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")
    return run


if __name__ == "__main__":
    main()
