"""Pattern-imbalance reweighting on a planted rare pattern: does `--reweight` raise it?

Two classes in d dimensions; 8 % of class 0 follow a rare pattern that sits near class 1
along the main axis and apart along an axis of its own. The selected probe (vlaug's
weight-decay search) is compared with each reweighting scheme started from it, on
held-out rows of the rare pattern and of everything else, over several seeds.

    python benchmarks/reweighting.py [--seeds 5] [--d 16] [--minority 0.08] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlaug.choices import REWEIGHTS  # noqa: E402
from vlaug.methods.linear import REWEIGHT_SCHEDULE  # noqa: E402
from vlaug.probe import Rows, fit_reweighted, select_weight_decay, weight_decay_grid  # noqa: E402
from vlaug.simulate import planted  # noqa: E402


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--minority", type=float, default=0.08)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    for seed in range(args.seeds):
        xt, yt, _ = planted(args.n_train, seed, args.d, args.minority)
        xv, yv, _ = planted(args.n_train // 3, seed + 50, args.d, args.minority)
        xs, ys, rare = planted(4000, seed + 100, args.d, args.minority)
        best, _ = select_weight_decay(Rows.of(xt, yt), Rows.of(xv, yv), weight_decay_grid(8))
        acc = lambda W, b, m: float(((xs[m] @ W + b).argmax(1) == ys[m]).float().mean())  # noqa: E731
        for scheme in REWEIGHTS:
            W, b = best["W"], best["b"]
            if scheme != "none":
                W, b, _ = fit_reweighted(xt, F.one_hot(yt, 2).float(), yt, best["weight_decay"], scheme, None,
                                         init=(W, b), **REWEIGHT_SCHEDULE)
            rows.append({"seed": seed, "scheme": scheme, "rare": acc(W, b, rare), "rest": acc(W, b, ~rare)})
    for scheme in REWEIGHTS:
        r = [x for x in rows if x["scheme"] == scheme]
        print(f"{scheme:22} rare pattern {100 * np.mean([x['rare'] for x in r]):5.1f} ± {100 * np.std([x['rare'] for x in r]):4.1f} %"
              f"   the rest {100 * np.mean([x['rest'] for x in r]):5.1f} ± {100 * np.std([x['rest'] for x in r]):4.1f} %")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def markdown(rows: list[dict]) -> list[str]:
    lines = ["| --reweight | rare pattern (8 % of class 0) | every other row |", "|---|---|---|"]
    for scheme in REWEIGHTS:
        r = [x for x in rows if x["scheme"] == scheme]
        lines.append(f"| `{scheme}` | {100 * np.mean([x['rare'] for x in r]):.1f} ± {100 * np.std([x['rare'] for x in r]):.1f} | "
                     f"{100 * np.mean([x['rest'] for x in r]):.1f} ± {100 * np.std([x['rest'] for x in r]):.1f} |")
    return lines


if __name__ == "__main__":
    main()
