"""How close vlaug's L-BFGS fits end to the minimiser at every weight decay of the grid and
one decade past its weak end, with and without the gradient test relative to the weights
(``vlaug.probe.RELATIVE_TOLERANCE``), on the shift benchmark's *tuning* caches.

    python benchmarks/weak_decay_convergence.py [--settings default,small,hard,large-d,easy]
                                                [--draw 0] [--relative 0,0.1,0.01] [--json FILE] [--out-md FILE]

Per setting: the tuning cache (simulator seed 1000 + ``--draw``, never a reported cache),
vlaug's training rows of seed 0 (``--train-domain photo``), the default grid (8 values, 1e-1
to 1e-6) plus 1e-7, fitted from zero weights by ``vlaug.probe.fit_probes`` (one batch,
``--max-iter`` 200) at each ``--relative`` tolerance (0: the absolute test alone), the rows
in cache order and in a shuffled order (a stand-in for another machine's summation order).
The minimiser: scikit-learn's ``LogisticRegression`` (lbfgs, float64, tol 1e-12,
C = 1 / (λ·n)). Printed per weight decay: iterations, how the fit stopped (C converged,
S stalled, M the cap), the relative distance ||W − W*|| / ||W*||, and the out-of-domain
accuracy of the fit and of the minimiser; per tolerance, the batch's wall time (1 thread).
Nothing here chooses a value by accuracy: the tolerance is judged by the distance.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import shift_benchmark as sb  # noqa: E402

from vlaug.probe import weight_decay_grid  # noqa: E402

WEIGHT_DECAYS = weight_decay_grid(8) + [1e-7]  # the default grid and one decade past its weak end


def _accuracy(x, y, W, b, rows) -> float:
    return float(((x[rows] @ W + b).argmax(1) == y[rows]).float().mean()) * 100


def minimisers(x: np.ndarray, y: np.ndarray) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.linear_model import LogisticRegression

    out = {}
    for wd in WEIGHT_DECAYS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = LogisticRegression(C=1 / (wd * len(y)), tol=1e-12, max_iter=50_000).fit(x.astype(np.float64), y)
        out[wd] = (torch.tensor(m.coef_.T, dtype=torch.float32), torch.tensor(m.intercept_, dtype=torch.float32))
    return out


def run_setting(name: str, draw: int, relatives: list[float], tmp: Path) -> dict:
    from vlaug.evaluate import ProbeRunConfig, prepare
    from vlaug.probe import Rows, fit_probes

    setting = sb.cache_setting(sb.SETTINGS[name], "tuning", draw)
    cache = tmp / name
    sb.write_cache(cache, sb.shifted_domains(setting.sim), setting.sim, source="benchmarks/weak_decay_convergence.py")
    plan = prepare(ProbeRunConfig(features=str(cache), out=str(tmp / "never"), methods=("zero-shot",),
                                  train_domains=(sb.TRAIN_DOMAIN,), seeds=1, device="cpu", progress=False))
    x, y, split = plan.data.x.float(), plan.data.y.long(), plan.splits[0]
    train, c = np.asarray(split.train), int(plan.data.n_classes)
    best = minimisers(x[train].numpy(), y[train].numpy())
    entry = {"setting": name, "simulator_seed": setting.sim.seed, "n_train": len(train), "runs": []}
    for rel in relatives:
        for order in ("cache", "shuffled"):
            rows = train if order == "cache" else train[np.random.default_rng(1).permutation(len(train))]
            start = time.perf_counter()
            fits = fit_probes(Rows.of(x[rows], y[rows], n_classes=c), WEIGHT_DECAYS, 200, relative_tolerance=rel)
            seconds = time.perf_counter() - start
            per = []
            for wd, (W, b, info) in zip(WEIGHT_DECAYS, fits):
                Wt, bt = best[wd]
                per.append({"weight_decay": wd, "iterations": info["iterations"],
                            "stop": "C" if info["converged"] else "S" if info["stalled"] else "M",
                            "distance": float((W - Wt).norm() / Wt.norm()),
                            "out_of_domain": _accuracy(x, y, W, b, split.test_out),
                            "minimiser_out_of_domain": _accuracy(x, y, Wt, bt, split.test_out)})
            entry["runs"].append({"relative_tolerance": rel, "order": order, "seconds": seconds, "fits": per})
    return entry


def markdown(run: dict) -> str:
    lines = [f"`{run['command']}` — {run['date']}, {run['machine']}, vlaug at {run['commit']}, 1 thread.", ""]
    for entry in run["settings"]:
        lines += [f"**{entry['setting']}** (tuning cache, simulator seed {entry['simulator_seed']}, "
                  f"{entry['n_train']} training rows): distance from the minimiser, cache order / shuffled; "
                  "out-of-domain accuracy of the fit (minimiser's in brackets).", ""]
        rels = sorted({r["relative_tolerance"] for r in entry["runs"]})
        head = " | ".join(f"relative {r:g}" if r else "absolute test only" for r in rels)
        lines += [f"| λ | {head} |", "|---" * (len(rels) + 1) + "|"]
        by = {(r["relative_tolerance"], r["order"]): r for r in entry["runs"]}
        for k, wd in enumerate(WEIGHT_DECAYS):
            cells = []
            for rel in rels:
                a, b = by[rel, "cache"]["fits"][k], by[rel, "shuffled"]["fits"][k]
                cells.append(f"{a['distance']:.4f} / {b['distance']:.4f}, {a['iterations']} it {a['stop']}, "
                             f"{a['out_of_domain']:.1f} ({a['minimiser_out_of_domain']:.1f})")
            lines.append(f"| {wd:.1e} | " + " | ".join(cells) + " |")
        times = ", ".join(f"{'relative ' + format(r, 'g') if r else 'absolute'} {by[r, 'cache']['seconds']:.2f} s"
                          for r in rels)
        lines += ["", f"Batch wall time (9 weight decays, cache order): {times}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(sb.SETTINGS))
    ap.add_argument("--draw", type=int, default=0, help="tuning cache k: simulator seed 1000 + k")
    ap.add_argument("--relative", default="0,0.1,0.01", help="relative tolerances to compare (0: absolute test only)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--out-md", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    relatives = [float(v) for v in args.relative.split(",")]
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    run = {"command": "python benchmarks/weak_decay_convergence.py " + " ".join(argv or sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {platform.system()}",
           "commit": commit, "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            run["settings"].append(run_setting(name, args.draw, relatives, Path(tmp)))
            print(f"{name}: done", file=sys.stderr)
    text = markdown(run)
    print(text)
    if args.out_md:
        Path(args.out_md).write_text(text + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(run, indent=1) + "\n", encoding="utf-8")
    return run


if __name__ == "__main__":
    main()
