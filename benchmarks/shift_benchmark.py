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
   (mean ± std over seeds), the weight decays selection chose, the box head's statistics
   (``stats.json``), and a scatter plot of in-domain vs out-of-domain accuracy per method
   (error bars: std over seeds; the Pareto front highlighted) in
   ``docs/shift_benchmark_SETTING.png``.

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

Run (from the repository root, with vlaug installed)::

    python benchmarks/shift_benchmark.py                      # every setting, 5 seeds, Markdown on stdout
    python benchmarks/shift_benchmark.py --settings default,hard --seeds 3 --out-md shift.md --json shift.json
    python benchmarks/shift_benchmark.py --quick              # tiny sizes, 2 seeds, few epochs: a smoke test (~1 min)
    # settings run side by side (one process each), then reported as one run
    python benchmarks/shift_benchmark.py --merge default.json hard.json --json shift.json --out-md shift.md

Every number it prints is computed in that run; it prints the seeds, sizes, settings and
every hyperparameter it used. Plots go to ``docs/`` (``--plot-dir``; with ``--quick`` to the
temporary folder ``vlaug-shift-quick-plots`` unless ``--plot-dir`` is given).
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


def _quick(setting: Setting) -> Setting:
    sim = dataclasses.replace(setting.sim, n_classes=min(setting.sim.n_classes, 8), d=setting.sim.d // 4,
                              n_per_class=min(setting.sim.n_per_class, 30))
    return dataclasses.replace(setting, sim=sim, head_epochs=3, joint_epochs=3, grid_size=4, max_iter=50,
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


def method_specs(heads: dict, joint_epochs: int) -> tuple[list[tuple[str, str]], list[str]]:
    """(label, spec) for every registered method; a method whose class has head_kinds gets
    NAME:HEAD_DIR of a trained head of one of its kinds. Also the head kinds still missing."""
    from urllib.parse import urlencode

    from vlaug.methods import REGISTRY

    specs, missing = [], []
    for name, cls in REGISTRY.items():
        options = {}
        fields_ = {f.name for f in dataclasses.fields(cls.Options)} if dataclasses.is_dataclass(cls.Options) else set()
        if "epochs" in fields_ and joint_epochs:
            options["epochs"] = joint_epochs
        query = ("?" + urlencode(options)) if options else ""
        if cls.head_kinds:
            kind = next((k for k in cls.head_kinds if heads.get(k, {}).get("returncode") == 0), None)
            if kind is None:
                missing.append(cls.head_kinds[0])
                continue
            specs.append((f"{name}[{kind}]" + query, f"{name}:{heads[kind]['dir']}" + query))
        else:
            specs.append((name + query, name + query))
    for weight in ENSEMBLE_WEIGHTS:  # ensembles with zero-shot: their spread over seeds is checked
        specs.append((f"linear?ensemble={weight}", f"linear?ensemble={weight}"))
    for weight in WISE_WEIGHTS:
        specs.append((f"linear-zs?wise={weight}", f"linear-zs?wise={weight}"))
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
                "per_method_runs": False}
    log(f"  probe over every method failed ({_last_line(proc.stderr)}); running each method alone")
    merged, failures = None, {}
    for label, spec in specs:
        one = out.parent / (out.name + "-" + label.replace("/", "_").replace("?", "_").replace("[", "_").replace("]", ""))
        p = vlaug_cli([*base, "--out", str(one), "-m", spec], log)
        if p.returncode != 0:
            failures[label] = _last_line(p.stderr) or _last_line(p.stdout)
            log(f"  {label}: {failures[label]}")
            continue
        r = json.loads((one / "report.json").read_text())
        if merged is None:
            merged = r
        else:
            for key in ("results", "summary", "methods"):
                merged[key] += r[key]
    return {"report": merged, "failures": failures, "seconds": time.perf_counter() - t0, "args": base[1:],
            "per_method_runs": True}


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
    each seed's training rows, selected on its validation rows, tested on its test rows."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit

    results, n_warn = [], 0
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
        results.append({"method": "sklearn LogisticRegressionCV", "seed": seed, "in_domain": acc(test_in),
                        "out_of_domain": acc(test_out), "extended": acc(test),
                        "per_domain": {k: acc(test[dom[test] == k]) for k in np.unique(dom[test]).tolist()},
                        "selection": {"weight_decay": float(1.0 / (np.ravel(cv.C_)[0] * n)), "C": float(np.ravel(cv.C_)[0]),
                                      "n_train": n, "n_val": len(val)}})
    return {"results": results, "convergence_warnings": n_warn}


def zero_shot_check(x, y, dom, text, splits) -> list[dict]:
    """Zero-shot accuracy recomputed here on each seed's test rows (a check of vlaug's)."""
    out = []
    pred = (x @ text.T).argmax(1)
    for seed, s in enumerate(splits):
        ti, to = np.asarray(s.test_in), np.asarray(s.test_out)
        out.append({"seed": seed, "in_domain": float((pred[ti] == y[ti]).mean()),
                    "out_of_domain": float((pred[to] == y[to]).mean())})
    return out


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
                 "selection": [r.get("selection") or {} for r in rows]}
        out.append(entry)
    return out


def _chosen(selection: list[dict]) -> str:
    """What selection chose over the seeds, compactly: weight decays with counts, GDA's
    shrinkage, or epochs."""
    alphas = [s["shrinkage"] for s in selection if "shrinkage" in s]
    if alphas:
        values, counts = np.unique(np.round(alphas, 6), return_counts=True)
        return "shrinkage " + ", ".join(f"{v:g}×{c}" for v, c in zip(values, counts))
    wds = [s["weight_decay"] for s in selection if "weight_decay" in s and "selected_epoch" not in s]
    if wds:
        values, counts = np.unique(np.round(wds, 12), return_counts=True)
        return ", ".join(f"{v:.0e}×{c}" for v, c in zip(values, counts))
    epochs = [s["selected_epoch"] for s in selection if "selected_epoch" in s]
    if epochs:
        return "epoch " + ",".join(str(e) for e in epochs) + f" of {selection[0].get('epochs', '?')}"
    return "—"


def flags(entry: dict) -> list[str]:
    """What looks wrong or suspicious in one setting's numbers."""
    out = []
    summary, grid = entry["summary"], entry.get("weight_decay_grid") or []
    by = {s["method"]: s for s in summary}
    for s in summary:
        for key in ("in_domain", "out_of_domain"):
            if s[key]["std"] > 0.05:
                out.append(f"{s['method']}: {key} std over seeds {100 * s[key]['std']:.1f} points (> 5)")
        wds = [x["weight_decay"] for x in s["selection"] if "weight_decay" in x and "selected_epoch" not in x]
        if len(wds) > 1 and len(set(np.round(wds, 12))) == 1 and grid and (
                np.isclose(wds[0], min(grid)) or np.isclose(wds[0], max(grid))):
            edge = "weakest" if np.isclose(wds[0], min(grid)) else "strongest"
            out.append(f"{s['method']}: selection chose the {edge} weight decay of the grid ({wds[0]:.0e}) for every seed")
    ref, lin = by.get(REFERENCE), by.get("linear")
    if ref and lin and abs(ref["in_domain"]["mean"] - lin["in_domain"]["mean"]) > 0.02:
        out.append(f"linear vs {REFERENCE}: in-domain {100 * lin['in_domain']['mean']:.1f} vs "
                   f"{100 * ref['in_domain']['mean']:.1f} (more than 2 points apart)")
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
    if entry.get("split_check"):
        out.append(entry["split_check"])
    for label, err in entry.get("failures", {}).items():
        out.append(f"{label}: probe failed: {err}")
    if entry.get("reference", {}).get("convergence_warnings"):
        out.append(f"{REFERENCE}: {entry['reference']['convergence_warnings']} ConvergenceWarning(s) at max_iter "
                   f"{entry['setting']['max_iter']}")
    return out


def _seed_label(label: str) -> str:
    """The registered name behind a table label such as ``box[box]`` or ``linear?ensemble=0.3``."""
    return label.split("[")[0].split("?")[0].split(":")[0]


def dominating(summary: list[dict]) -> tuple[list[str], dict]:
    """The rows (other than the seed methods' default rows) whose in-domain and
    out-of-domain means both beat every seed method's, and the best seed values per axis."""
    seeds = [s for s in summary if _seed_label(s["method"]) in SEED_METHODS and "?" not in s["method"]]
    if not seeds:
        return [], {}
    best = {k: max(seeds, key=lambda s: s[k]["mean"]) for k in ("in_domain", "out_of_domain")}
    wins = [s["method"] for s in summary if s not in seeds and s["method"] != REFERENCE
            and all(s[k]["mean"] > best[k][k]["mean"] for k in best)]
    return wins, {k: (b["method"], b[k]["mean"]) for k, b in best.items()}


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


def markdown_setting(entry: dict) -> str:
    st, sim, stats = entry["setting"], entry["setting"]["sim"], entry["stats"]
    L = [f"### Setting `{st['name']}`", "", st["description"] + ".", ""]
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
    L += ["", "Bold: on the Pareto front of (in-domain, out-of-domain) means. "
          f"Plot: `{entry['plot']}`.", ""]
    wins, best = dominating(entry["summary"])
    if best:
        bar = " and ".join(f"{k.replace('_', '-')} {100 * v:.1f} ({m})" for k, (m, v) in best.items())
        L += [f"Seed methods ({', '.join(SEED_METHODS)}) at their best: {bar}. Rows beating both: "
              + (", ".join(f"**{w}**" for w in wins) if wins else "none") + ".", ""]
    box = entry["heads"].get("box", {}).get("stats")
    if box:
        z = box.get("zero_shot_accuracy") or {}
        L += [f"Box head (`stats.json`, {box.get('n_rows')} training-domain rows): mean log-volume "
              f"{box['mean_log_volume']:.3f}, mean corner inner product {box['mean_corner_inner_product']:.4f}; "
              "zero-shot accuracy of points / lower corners / upper corners / centres / box samples: "
              + " / ".join(f"{100 * z[k]:.1f}" for k in ("points", "lo", "hi", "center", "samples") if k in z) + " %.", ""]
    heads = ", ".join(f"{k} {h['seconds']:.1f} s (kept epoch {h.get('selected_epoch')})" for k, h in entry["heads"].items())
    t = entry["seconds"]
    L += [f"Runtime: simulate + write {t['simulate_and_write']:.1f} s; train-box {heads}; probe "
          f"{t['probe']:.1f} s; sklearn reference {t['reference']:.1f} s; total {t['total']:.1f} s.", ""]
    fl = entry["flags"]
    L += ["Flags (automatic checks):", ""] + ([f"- {f}" for f in fl] or ["- none"]) + [""]
    sizes = entry["split_sizes"]
    L += ["<details><summary>Settings and hyperparameters of this run</summary>", "",
          f"- simulator: `{json.dumps(sim)}`",
          f"- rows: {entry['n_rows']} ({sim['n_classes']} classes × {len(DOMAINS)} domains × {sim['n_per_class']}); "
          f"splits per seed (train / val / test in / test out): "
          + "; ".join(f"seed {s['seed']}: {s['train']}/{s['val']}/{s['test_in']}/{s['test_out']}" for s in sizes)
          + f" (from {entry['split_source']})",
          f"- weight-decay grid: {', '.join(f'{w:.1e}' for w in entry['weight_decay_grid'])}; "
          f"sklearn C = 1/(wd·n_train), max_iter {st['max_iter']}, selection on the same validation rows",
          f"- vlaug probe: `{' '.join(entry['probe_args'])} -m ...`",
          "- methods: " + "; ".join(f"`{m['method']}` options {json.dumps(m.get('options'))}" for m in entry["methods"])]
    for kind, h in entry["heads"].items():
        tr = h.get("training") or {}
        keep = {k: tr[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "val_fraction", "test_fraction",
                                   "n_train", "n_val", "seed") if k in tr}
        L.append(f"- head `{kind}`: `vlaug {' '.join(h['args'])}`; head config {json.dumps(h.get('head_config'))}; "
                 f"training {json.dumps(keep)}")
    L += ["", "</details>", ""]
    return "\n".join(L)


def markdown(run: dict) -> str:
    meta = run["meta"]
    L = ["## Domain-shift benchmark on a simulated CLIP ViT-B/32 embedding space", "",
         f"`python benchmarks/shift_benchmark.py {' '.join(meta['argv'])}` — {meta['date']}, {meta['machine']}, "
         f"vlaug {meta['vlaug_version']} (git {meta['git']}), torch {meta['torch']}, scikit-learn {meta['sklearn']}, "
         f"{meta['threads_env'] or 'default'} thread(s) per vlaug run ({meta['torch_threads']} torch threads here); total {meta['seconds']:.0f} s.", "",
         "Every method of `vlaug.methods.REGISTRY` is run through `python -m vlaug probe` on a feature cache written "
         "with vlaug's own writer; heads come from `python -m vlaug train-box` on `photo`. The simulator and the "
         "published figures it is calibrated to are described in the script's docstring. "
         f"`{REFERENCE}` is fitted in the script on vlaug's own train / validation / test rows of each seed.", ""]
    if meta.get("merged"):
        L += [f"Merged from {len(meta['merged'])} runs, one per setting (`--merge`): "
              + "; ".join(f"`shift_benchmark.py {' '.join(m['argv'])}` ({m['date']}, git {m['git']}, {m['seconds']:.0f} s)"
                          for m in meta["merged"]) + ".", ""]
    L += ["| setting | matched cos | mismatched cos | prompt–prompt cos | image–image cos | ‖Δgap‖ | cos(centres) | "
          "zero-shot in / out | linear in / out | best out-of-domain | seed methods' best in / out | beating both |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in run["settings"].items():
        s = e["stats"]
        by = {x["method"]: x for x in e["summary"]}
        zs, lin = by.get("zero-shot"), by.get("linear")
        best = max(e["summary"], key=lambda x: x["out_of_domain"]["mean"])
        io = lambda x: f"{100 * x['in_domain']['mean']:.1f} / {100 * x['out_of_domain']['mean']:.1f}" if x else "—"  # noqa: E731
        wins, bar = dominating(e["summary"])
        seeds = " / ".join(f"{100 * v:.1f} ({m})" for m, v in bar.values()) if bar else "—"
        beating = ", ".join(f"{w} ({io(by[w])})" for w in wins) or "none"
        L.append(f"| {name} | {s['matched_cosine']:.3f} | {s['mismatched_cosine']:.3f} | {s['prompt_prompt_cosine']:.3f} | "
                 f"{s['image_image_cosine']:.3f} | {s['modality_gap_norm']:.3f} | {s['modality_gap_cosine']:.3f} | "
                 f"{io(zs)} | {io(lin)} | {best['method']} ({100 * best['out_of_domain']['mean']:.1f}) | {seeds} | {beating} |")
    L.append("")
    for e in run["settings"].values():
        L.append(markdown_setting(e))
    return "\n".join(L)


# ----------------------------------------------------------------------------- main


def run_setting(setting: Setting, seeds: int, workdir: Path, plot_dir: Path, log) -> dict:
    t_start = time.perf_counter()
    folder = workdir / setting.name
    if folder.exists():
        shutil.rmtree(folder)
    cache_dir = folder / "features"
    p = setting.sim
    log(f"[{setting.name}] simulating {p.n_classes} classes × {len(DOMAINS)} domains × {p.n_per_class} rows, d = {p.d}")
    sim = shifted_domains(p)
    stats = measure(sim)
    write_cache(cache_dir, sim, p, source="benchmarks/shift_benchmark.py (simulated)")
    t_sim = time.perf_counter() - t_start
    log(f"[{setting.name}] " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items() if isinstance(v, float)))

    heads = train_heads(cache_dir, folder / "heads", list(BASE_HEADS), setting.head_epochs, log)
    specs, missing = method_specs(heads, setting.joint_epochs)
    if missing:  # a registered method needs a head kind not trained yet
        heads.update(train_heads(cache_dir, folder / "heads", sorted(set(missing)), setting.head_epochs, log))
        specs, missing = method_specs(heads, setting.joint_epochs)
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
        "setting": {"name": setting.name, "description": setting.description, "sim": p.to_dict(),
                    "head_epochs": setting.head_epochs, "joint_epochs": setting.joint_epochs,
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
    entry["plot"] = str(plot_dir / f"shift_benchmark_{setting.name}.png")
    plot(entry, Path(entry["plot"]))
    try:
        entry["plot"] = str(Path(entry["plot"]).resolve().relative_to(REPO))
    except ValueError:
        pass
    entry["seconds"] = {"simulate_and_write": t_sim, "heads": {k: h["seconds"] for k, h in heads.items()},
                        "probe": probe["seconds"], "reference": t_ref, "total": time.perf_counter() - t_start}
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
            "torch_threads": torch.get_num_threads(), "threads_env": THREADS["n"]}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--seeds", type=int, default=None, help="vlaug probe --seeds (default 5; 2 with --quick)")
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
    if args.threads:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    seeds = args.seeds or (2 if args.quick else 5)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vlaug-shift-"))
    workdir.mkdir(parents=True, exist_ok=True)
    quick_plots = Path(tempfile.gettempdir()) / "vlaug-shift-quick-plots"  # not the docs/ figures
    plot_dir = Path(args.plot_dir) if args.plot_dir else (quick_plots if args.quick else REPO / "docs")
    t0 = time.perf_counter()
    run = {"meta": _meta(argv), "targets": TARGETS, "settings": {}}
    try:
        for name in names:
            setting = _quick(SETTINGS[name]) if args.quick else SETTINGS[name]
            run["settings"][name] = run_setting(setting, seeds, workdir, plot_dir, log)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    run["meta"]["seconds"] = time.perf_counter() - t0
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
    return {"meta": meta, "targets": runs[0]["targets"], "settings": settings}


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
