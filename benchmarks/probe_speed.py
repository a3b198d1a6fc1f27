"""Probe speed and accuracy: vlaug's L-BFGS probe against scikit-learn, `vlaug probe` on a
small cache against importing torch, and the default search on a 2M-row cache.

sklearn (default 40,000 train + 10,000 validation + 10,000 test synthetic rows, d = 512,
100 classes, one process):
  single fit:  vlaug.probe.fit_probe at weight decay λ against
               sklearn.linear_model.LogisticRegression(C = 1 / (λ · n_train), lbfgs);
  selection:   vlaug.probe.select_weight_decay over the 8-value grid against
               LogisticRegressionCV with the same C values and the same validation split
               (PredefinedSplit, refit=False).
small: `vlaug probe` with 5 methods x 3 seeds on a 2,000-row, 64-d, 10-class cache against
  `python -c "import torch"`, best of 5 each (the two interleaved), on an idle machine and
  while a second CPU-bound process (a Python busy loop) runs beside it.
large: the default `vlaug probe -m linear` on a 2M x 512 x 100-class float16 cache at
  --memory-budget 3G (wall time, peak RSS) against the time of one streamed pass of the
  probe's objective over that cache (vlaug's streaming reader, 1G budget's chunks); and the
  default (sampled) search against the full search (--selection-rows 0) on a 250k-row cache.
preconditioner: fit_probes over the 8-value grid against the same L-BFGS started from the
  identity, on CLIP-like synthetic problems of several sizes, dimensions and kinds.

    python benchmarks/probe_speed.py [--sections sklearn,small,large,preconditioner] [--n-train 40000] [--d 512]
                                     [--classes 100] [--device auto] [--large-rows 2000000] [--json F]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import PredefinedSplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from larger_than_memory import run_child, write_cache  # noqa: E402
from vlaug.devices import resolve_device
from vlaug.probe import Rows, fit_probe, select_weight_decay, weight_decay_grid


def make_data(n: int, d: int, n_classes: int, noise: float = 5.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d)).astype(np.float32)
    y = rng.integers(0, n_classes, n)
    x = centres[y] + rng.standard_normal((n, d)).astype(np.float32) * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y


NOISE = 8.0  # class centres + 8 x Gaussian noise in 512 d: about 59 % accuracy, not a separable toy
SMALL_METHODS = ("zero-shot", "linear", "linear-zs", "gaussian", "mixup")


def _best_of(commands: list[list[str]], repeats: int) -> list[float]:
    """The best wall time of each command over ``repeats`` rounds, the commands interleaved
    within each round (a VM's speed drifts by 10-20 % over a minute: measured one after the
    other, the two sides of a ratio would see different machines)."""
    best = [float("inf")] * len(commands)
    for _ in range(repeats):
        for i, command in enumerate(commands):
            t0 = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def small(workdir: Path, repeats: int = 5) -> dict:
    """`vlaug probe`, 5 methods x 3 seeds on a 2,000-row 64-d cache, against importing torch."""
    cache = workdir / "small"
    write_cache(cache, 2000, 64, 10)
    probe = [sys.executable, "-m", "vlaug", "probe", str(cache), "--out", str(workdir / "small-report"), "--seeds", "3",
             "--device", "cpu", "--no-progress", "--overwrite"] + [a for m in SMALL_METHODS for a in ("-m", m)]
    torch_cmd = [sys.executable, "-c", "import torch"]
    out = {"methods": list(SMALL_METHODS), "seeds": 3, "rows": 2000, "d": 64, "classes": 10, "repeats": repeats}
    out["torch_s"], out["probe_s"] = _best_of([torch_cmd, probe], repeats)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out["torch_busy_s"], out["probe_busy_s"] = _best_of([torch_cmd, probe], repeats)
    finally:
        busy.kill()
        busy.wait()
    out["ratio"], out["ratio_busy"] = out["probe_s"] / out["torch_s"], out["probe_busy_s"] / out["torch_busy_s"]
    return out


STREAMED_PASS = """
import json, sys, time, numpy as np, torch
from vlaug.evaluate import ProbeRunConfig, prepare
from vlaug.methods.linear import Linear
from vlaug.probe import _objectives
plan = prepare(ProbeRunConfig(features=sys.argv[1], out=sys.argv[2], methods=("linear",), seeds=1, memory_budget="1G",
                              device="cpu"))
assert plan.memory.streamed
rows = Linear("linear").training_rows(plan.data, np.asarray(plan.splits[0].train), 0)
theta = torch.zeros(1, rows.n_features + 1, rows.n_classes)
times = []
for _ in range(3):
    t0 = time.perf_counter()
    _objectives(rows, theta, torch.tensor([1e-4]), None)
    times.append(time.perf_counter() - t0)
print(json.dumps({"pass_s": min(times), "chunk_rows": plan.chunk_rows, "train_rows": rows.n_rows}))
"""


def large(workdir: Path, n: int, accuracy_rows: int) -> dict:
    """The default `vlaug probe -m linear` on an n-row float16 cache at --memory-budget 3G
    against one streamed pass; sampled against full search on ``accuracy_rows`` rows."""
    out = {"rows": n, "d": 512, "classes": 100, "budget": "3G", "noise": NOISE}
    cache = workdir / f"large-{n}"
    if not (cache / "manifest.json").is_file():  # a --workdir keeps its caches between runs
        write_cache(cache, n, 512, 100, noise=NOISE)
    passed = subprocess.run([sys.executable, "-c", STREAMED_PASS, str(cache), str(workdir / "unused")], check=True,
                            capture_output=True, text=True)
    out.update(json.loads(passed.stdout.strip().splitlines()[-1]))
    report = workdir / "large-report"
    out["probe_s"], out["probe_peak_rss_mib"], rc = run_child(
        [sys.executable, "-m", "vlaug", "probe", str(cache), "--out", str(report), "-m", "linear", "--memory-budget",
         "3G", "--device", "cpu", "--no-progress", "--overwrite"])
    assert rc == 0, "vlaug probe failed on the large cache"
    r = json.loads((report / "report.json").read_text())
    out["streamed"], out["seeds"] = r["protocol"]["streamed"], len(r["protocol"]["seeds"])
    out["in_domain"] = r["summary"][0]["in_domain"]["mean"]
    out["refit_iterations"] = [x["selection"]["refit"]["iterations"] for x in r["results"]]  # after the sampled searches
    out["passes_equivalent"] = out["probe_s"] / out["pass_s"]
    # sampled selection against the full search, one seed, on a cache that the full search can afford
    cache = workdir / f"accuracy-{accuracy_rows}"
    if not (cache / "manifest.json").is_file():
        write_cache(cache, accuracy_rows, 512, 100, noise=NOISE)
    for name, extra in (("full", ["--selection-rows", "0"]), ("sampled", [])):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vlaug", "probe", str(cache), "--out", str(workdir / name), "-m", "linear",
                        "--seeds", "1", "--device", "cpu", "--no-progress", "--overwrite", *extra], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = json.loads((workdir / name / "report.json").read_text())
        out[f"{name}_s"] = time.perf_counter() - t0
        out[f"{name}_accuracy"] = r["results"][0]["in_domain"]
        out[f"{name}_weight_decay"] = r["results"][0]["selection"]["weight_decay"]
    grid = weight_decay_grid(8)
    out["accuracy_rows"] = accuracy_rows
    out["grid_steps_apart"] = abs(grid.index(out["full_weight_decay"]) - grid.index(out["sampled_weight_decay"]))
    return out


def main(argv=None) -> dict:
    warnings.filterwarnings("ignore", category=FutureWarning)  # sklearn's l1_ratios deprecation notice
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=40_000)
    p.add_argument("--n-val", type=int, default=10_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grid-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-cv", action="store_true", help="only the single fit")
    p.add_argument("--sections", default="sklearn,small,large,preconditioner",
                   help="comma-separated: sklearn, small, large, preconditioner")
    p.add_argument("--large-rows", type=int, default=2_000_000)
    p.add_argument("--accuracy-rows", type=int, default=250_000)
    p.add_argument("--workdir", help="where to write the caches (default: a temporary folder)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    result = {}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vlaug-probe-speed-"))
    try:
        if "small" in sections:
            result["small"] = small(workdir)
            print(json.dumps(result["small"]), flush=True)
        if "large" in sections:
            result["large"] = large(workdir, args.large_rows, args.accuracy_rows)
            print(json.dumps(result["large"]), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if "sklearn" in sections:
        result["sklearn"] = sklearn_rows(args)
    if "preconditioner" in sections:
        result["preconditioner"] = preconditioner_rows()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def sklearn_rows(args) -> dict:
    dev = resolve_device(args.device)
    n = args.n_train + args.n_val + args.n_test
    x, y = make_data(n, args.d, args.classes)
    tr, va, te = slice(0, args.n_train), slice(args.n_train, args.n_train + args.n_val), slice(args.n_train + args.n_val, n)
    xt = torch.as_tensor(x, device=dev)
    yt = torch.as_tensor(y, device=dev)
    targets = F.one_hot(yt[tr], args.classes).float()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    acc = lambda W, b: float(((xt[te] @ W + b).argmax(1) == yt[te]).float().mean())  # noqa: E731
    fit_probe(Rows.of(xt[:1000], yt[:1000], n_classes=args.classes), args.weight_decay, max_iter=10)  # warm-up
    out = {"n_train": args.n_train, "n_val": args.n_val, "d": args.d, "classes": args.classes, "device": str(dev),
           "torch_threads": torch.get_num_threads(), "weight_decay": args.weight_decay}

    sync(); t0 = time.perf_counter()
    W, b, info = fit_probe(Rows.of(xt[tr], targets), args.weight_decay, max_iter=200)
    sync(); out["vlaug_fit_s"] = time.perf_counter() - t0
    out["vlaug_fit_accuracy"], out["vlaug_fit_iterations"] = acc(W, b), info["iterations"]
    t0 = time.perf_counter()
    sk = LogisticRegression(C=1 / (args.weight_decay * args.n_train), max_iter=200).fit(x[tr], y[tr])
    out["sklearn_fit_s"] = time.perf_counter() - t0
    out["sklearn_fit_accuracy"] = float(sk.score(x[te], y[te]))
    out["fit_speed_ratio"] = out["sklearn_fit_s"] / out["vlaug_fit_s"]

    if not args.skip_cv:
        grid = weight_decay_grid(args.grid_size)
        sync(); t0 = time.perf_counter()
        best, _ = select_weight_decay(Rows.of(xt[tr], targets), Rows.of(xt[va], yt[va]), grid, max_iter=200)
        sync(); out["vlaug_select_s"] = time.perf_counter() - t0
        out["vlaug_select_accuracy"], out["vlaug_selected_weight_decay"] = acc(best["W"], best["b"]), best["weight_decay"]
        fold = np.r_[np.full(args.n_train, -1), np.zeros(args.n_val)]
        t0 = time.perf_counter()
        cv = LogisticRegressionCV(Cs=[1 / (wd * args.n_train) for wd in grid], cv=PredefinedSplit(fold), refit=False,
                                  max_iter=200, scoring="accuracy").fit(x[: args.n_train + args.n_val], y[: args.n_train + args.n_val])
        out["sklearn_cv_s"] = time.perf_counter() - t0
        out["sklearn_cv_accuracy"] = float(cv.score(x[te], y[te]))
        out["sklearn_selected_weight_decay"] = float(1 / (cv.C_[0] * args.n_train))
        out["select_speed_ratio"] = out["sklearn_cv_s"] / out["vlaug_select_s"]
    for k, v in out.items():
        print(f"{k:32} {v:.4g}" if isinstance(v, float) else f"{k:32} {v}")
    return out


def clip_like(n: int, d: int, n_classes: int, noise: float, mean: float, decay: float, seed: int):
    """Embeddings shaped like a CLIP encoder's: unit norm, a power-law spectrum (eigenvalue
    k ~ k^-decay in a random basis) and a common mean direction of weight ``mean``."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, d + 1, dtype=torch.float32) ** (-decay / 2)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    centres = torch.randn(n_classes, d, generator=g) * spectrum @ basis.T
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = F.normalize(centres[y] + noise * (torch.randn(n, d, generator=g) * spectrum) @ basis.T, dim=1)
    common = F.normalize(torch.randn(d, generator=g), dim=0)
    return F.normalize(x + mean * common, dim=1), y


# (name, rows: train, validation, test; d; classes; noise; common mean; spectrum decay; what else)
PRECONDITIONER_CASES = [
    ("CLIP-like, 10 classes", (2000, 1000, 2000), 512, 10, 3.0, 1.0, 1.0, ""),
    ("CLIP-like, 100 classes", (20000, 5000, 5000), 512, 100, 4.0, 1.0, 1.0, ""),
    ("CLIP-like, 1000 classes, 10 rows each", (10000, 3000, 3000), 512, 1000, 2.0, 1.0, 1.0, ""),
    ("few-shot: fewer rows than dimensions", (160, 1000, 1000), 512, 10, 3.0, 1.0, 1.0, ""),
    ("binary, d = 768", (3000, 1000, 2000), 768, 2, 6.0, 1.0, 0.5, ""),
    ("isotropic, no common mean, d = 64", (1300, 700, 2000), 64, 10, 3.0, 0.0, 0.0, ""),
    ("soft targets (mixed labels)", (2000, 1000, 2000), 512, 10, 3.0, 1.0, 1.0, "soft"),
    ("float16 rows", (10000, 2500, 2500), 512, 100, 4.0, 1.0, 1.0, "half"),
    ("regularised towards an anchor (linear-zs)", (2000, 1000, 2000), 512, 10, 3.0, 1.0, 1.0, "anchor"),
]


def preconditioner_rows() -> list[dict]:
    """fit_probes over the 8-value grid with its preconditioner against the same L-BFGS
    started from the identity (vlaug.probe._preconditioners replaced), on problems of
    several sizes, dimensions, class counts and kinds: iterations summed over the grid,
    time, the selected weight decay, test accuracy and the objective each fit ends at."""
    import vlaug.probe as probe_module
    from vlaug.probe import choose, fit_probes, probe_objective

    identity = lambda gram, wds, c: torch.eye(gram.shape[0] - 1).expand(len(wds), -1, -1)  # noqa: E731
    preconditioned = probe_module._preconditioners
    grid = weight_decay_grid(8)
    out = []
    for name, (n_tr, n_va, n_te), d, c, noise, mean, decay, kind in PRECONDITIONER_CASES:
        x, y = clip_like(n_tr + n_va + n_te, d, c, noise, mean, decay, seed=len(out))
        xt, yt, xv, yv, xs, ys = x[:n_tr], y[:n_tr], x[n_tr:n_tr + n_va], y[n_tr:n_tr + n_va], x[n_tr + n_va:], y[n_tr + n_va:]
        targets = yt
        if kind == "soft":
            one_hot = F.one_hot(yt, c).float()
            targets = 0.8 * one_hot + 0.2 * one_hot[torch.randperm(n_tr, generator=torch.Generator().manual_seed(0))]
        anchor = F.normalize(torch.stack([xt[yt == k].mean(0) for k in range(c)], 1), dim=0) if kind == "anchor" else None
        rows = Rows.of(xt.half() if kind == "half" else xt, targets, n_classes=c)
        row = {"case": name, "train": n_tr, "d": d, "classes": c}
        for label, pre in (("identity", identity), ("preconditioned", preconditioned)):
            probe_module._preconditioners = pre
            try:
                t0 = time.perf_counter()
                fits = fit_probes(rows, grid, 200, init=None if anchor is None else (anchor, torch.zeros(c)),
                                  regularize_towards=anchor)
                seconds = time.perf_counter() - t0
            finally:
                probe_module._preconditioners = preconditioned
            best, _ = choose(fits, grid, Rows.of(xv, yv, n_classes=c))
            weights = torch.full((n_tr,), 1.0 / n_tr, dtype=torch.float64)
            objectives = [float(probe_objective(xt.double(), W.double(), b.double(), targets if targets.dim() == 1 else targets.double(),
                                                weights, wd, None if anchor is None else anchor.double()))
                          for (W, b, _), wd in zip(fits, grid)]
            row[label] = {"s": seconds, "iterations": sum(info["iterations"] for *_, info in fits),
                          "most_iterations": max(info["iterations"] for *_, info in fits),
                          "converged": sum(info["converged"] for *_, info in fits), "weight_decay": best["weight_decay"],
                          "accuracy": float(((xs @ best["W"] + best["b"]).argmax(1) == ys).float().mean()),
                          "objectives": objectives}
        out.append(row)
        print(json.dumps(row)[:400], flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
