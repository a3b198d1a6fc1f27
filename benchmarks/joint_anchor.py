"""The joint methods' sanity anchor (issue 27, item 3) at the current defaults: `linear-adamw`
and `linear` optimise the same model class (a linear classifier on the embeddings), so in
domain they must agree within a point on every setting of the shift benchmark.

    python benchmarks/joint_anchor.py [--settings default,small,hard,large-d,easy] [--seeds 10]
                                      [--json FILE] [--out-md FILE]

Per setting: the shift benchmark's reported cache (``shift_benchmark.SETTINGS``, simulator
seed 0, written as a vlaug cache), then ``vlaug probe -m linear -m linear-adamw
--train-domain photo --seeds N`` through the CLI, and from its ``test_predictions.parquet``
the paired difference linear-adamw − linear with a 95 % paired-bootstrap interval over test
rows and seeds (``shift_benchmark.PairedBootstrap``), in domain and out of domain; and how
linear-adamw stopped on each seed (steps, ``patience`` or ``cap``). The anchor holds on a
setting when the in-domain difference is within ±1 point. Nothing is tuned here: the
defaults were chosen on the tuning caches (docs/probes.md, "Joint methods").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import shift_benchmark as sb  # noqa: E402

ANCHOR_POINTS = 1.0  # |linear-adamw − linear| in domain, in points, that the anchor allows


def run_setting(name: str, seeds: int, tmp: Path) -> dict:
    setting = sb.SETTINGS[name]
    cache = tmp / name / "cache"
    sb.write_cache(cache, sb.shifted_domains(setting.sim), setting.sim, source="benchmarks/joint_anchor.py (simulated)")
    out = tmp / name / "report"
    cmd = [sys.executable, "-m", "vlaug", "probe", str(cache), "--out", str(out), "--train-domain", sb.TRAIN_DOMAIN,
           "--seeds", str(seeds), "--grid-size", str(setting.grid_size), "--max-iter", str(setting.max_iter),
           "--device", "cpu", "--no-progress", "-m", "linear", "-m", "linear-adamw"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=sb.REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    predictions = sb.read_predictions([out])
    compared = sb.PairedBootstrap(predictions, [sb.TRAIN_DOMAIN]).compare("linear-adamw", "linear")
    joint = [r["selection"] for r in report["results"] if r["method"] == "linear-adamw"]
    summary = {s["method"]: s for s in report["summary"]}
    diff = 100 * compared["in_domain"]["diff"]
    return {"setting": name, "seeds": seeds, "seconds": seconds,
            "linear": {k: summary["linear"][k] for k in ("in_domain", "out_of_domain")},
            "linear-adamw": {k: summary["linear-adamw"][k] for k in ("in_domain", "out_of_domain")},
            "paired": compared, "steps": [s["steps"] for s in joint], "stopped": [s["stopped"] for s in joint],
            "chosen": [f"{s['lr']:g}/{s['weight_decay']:g}" for s in joint],
            "max_steps": joint[0]["max_steps"], "anchor_holds": abs(diff) <= ANCHOR_POINTS}


def markdown(rows: list[dict], commit: str) -> str:
    lines = ["## The joint methods' sanity anchor — `benchmarks/joint_anchor.py`", "",
             f"`linear-adamw` (AdamW steps, lr × weight decay searched, early-stopped) against `linear` (L-BFGS over the "
             f"weight-decay grid) on the shift benchmark's reported caches, {rows[0]['seeds']} seeds, vlaug at {commit}, "
             "`--train-domain photo`. Difference linear-adamw − linear in points, 95 % paired-bootstrap interval over "
             f"test rows and seeds. The anchor holds when the in-domain difference is within ±{ANCHOR_POINTS:g} point.", "",
             "| setting | linear in / out | linear-adamw in / out | in domain: diff [95 %] | out of domain: diff [95 %] | "
             "steps (median, max) of ≤ max | stopped at the cap | anchor |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
        d = lambda a: f"{100 * a['diff']:+.1f} [{100 * a['low']:+.1f}, {100 * a['high']:+.1f}] {a['verdict']}"  # noqa: E731
        steps = sorted(r["steps"])
        lines.append(f"| {r['setting']} | {pct(r['linear']['in_domain'])} / {pct(r['linear']['out_of_domain'])} | "
                     f"{pct(r['linear-adamw']['in_domain'])} / {pct(r['linear-adamw']['out_of_domain'])} | "
                     f"{d(r['paired']['in_domain'])} | {d(r['paired']['out_of_domain'])} | "
                     f"{steps[len(steps) // 2]}, {steps[-1]} of {r['max_steps']} | "
                     f"{r['stopped'].count('cap')} of {len(r['stopped'])} | {'holds' if r['anchor_holds'] else 'FAILS'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default=",".join(sb.SETTINGS))
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument("--out-md")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=sb.REPO, capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [s.strip() for s in args.settings.split(",") if s.strip()]:
            rows.append(run_setting(name, args.seeds, Path(tmp)))
            r = rows[-1]
            print(f"{name}: in-domain diff {100 * r['paired']['in_domain']['diff']:+.2f} points, "
                  f"cap on {r['stopped'].count('cap')}/{len(r['stopped'])} seeds, {r['seconds']:.0f} s", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"commit": commit, "rows": rows}, indent=2) + "\n")
    text = markdown(rows, commit)
    if args.out_md:
        Path(args.out_md).write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
