"""Probe speed and accuracy: vlaug's torch L-BFGS probe against scikit-learn.

Synthetic, L2-normalised features (default 40,000 train + 10,000 validation + 10,000 test,
d = 512, 100 classes), one process:
  single fit:  vlaug.probe.fit_probe at weight decay λ against
               sklearn.linear_model.LogisticRegression(C = 1 / (λ · n_train), lbfgs);
  selection:   vlaug.probe.select_weight_decay over the 8-value grid against
               LogisticRegressionCV with the same C values and the same validation split
               (PredefinedSplit, refit=False).
Reports test accuracy of each and the speed ratio sklearn time / vlaug time.

    python benchmarks/probe_speed.py [--n-train 40000] [--d 512] [--classes 100] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import PredefinedSplit

from vlaug.devices import resolve_device
from vlaug.probe import Rows, fit_probe, select_weight_decay, weight_decay_grid


def make_data(n: int, d: int, n_classes: int, noise: float = 5.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d)).astype(np.float32)
    y = rng.integers(0, n_classes, n)
    x = centres[y] + rng.standard_normal((n, d)).astype(np.float32) * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y


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
    p.add_argument("--json")
    args = p.parse_args(argv)
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
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
