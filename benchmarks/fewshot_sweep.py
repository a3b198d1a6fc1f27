"""The few-shot sweep (issue 29): the seven few-shot adapters beside zero-shot and linear, K =
1, 2, 4, 8, 16, on the shift benchmark's reported caches, through the CLI.

    python benchmarks/fewshot_sweep.py [--settings default,small,hard,large-d,easy] [--seeds 3]
                                       [--shots 1,2,4,8,16] [--json FILE]

Per setting: the shift benchmark's reported cache (``shift_benchmark.SETTINGS``, simulator
seed 0), then one ``vlaug probe CACHE --train-domain photo --shots 1,2,4,8,16 --seeds N -m
zero-shot -m linear -m tip-adapter ... -m clap`` (the whole sweep in one process, few-shot
validation at its default, min(K, 4) rows per class), timed as a whole process. It prints per
setting and K each method's in-domain and out-of-domain accuracy (mean over seeds) and the
sweep's wall time; the speed target (issue 29) is the ``default`` setting (16 classes, d =
512) under 2 minutes on 2 CPU cores. Nothing is tuned here: every method runs at its
defaults (docs/probes.md, "Few-shot adaptation", says where each came from).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import shift_benchmark as sb  # noqa: E402

METHODS = ("zero-shot", "linear", "tip-adapter", "tip-adapter-f", "clip-adapter", "taskres", "cross-modal", "lp++", "clap")
TARGET_SECONDS = 120.0  # the whole sweep on the default setting (issue 29)
# `small` holds 24 rows per class and domain: about 15 training rows per class once its test and validation
# rows are held out, so its sweep stops at K = 8
MAX_SHOTS = {"small": 8}


def run_setting(name: str, seeds: int, shots: str, tmp: Path) -> dict:
    setting = sb.SETTINGS[name]
    cache = tmp / name / "cache"
    sb.write_cache(cache, sb.shifted_domains(setting.sim), setting.sim, source="benchmarks/fewshot_sweep.py (simulated)")
    out = tmp / name / "report"
    shots = ",".join(k for k in shots.split(",") if int(k) <= MAX_SHOTS.get(name, int(k)))
    cmd = [sys.executable, "-m", "vlaug", "probe", str(cache), "--out", str(out), "--train-domain", sb.TRAIN_DOMAIN,
           "--seeds", str(seeds), "--shots", shots, "--grid-size", str(setting.grid_size), "--max-iter",
           str(setting.max_iter), "--device", "cpu", "--no-progress"]
    for m in METHODS:
        cmd += ["-m", m]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=sb.REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: vlaug probe exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    table = {run["shots"]: {s["method"]: {k: s[k]["mean"] for k in ("in_domain", "out_of_domain")} for s in run["summary"]}
             for run in report["shots_sweep"]["per_shots"]}
    n_val = {run["shots"]: sorted({sp["val"] for sp in run["splits"]}) for run in report["shots_sweep"]["per_shots"]}
    return {"setting": name, "seeds": seeds, "seconds": seconds, "classes": len(report["classes"]),
            "embed_dim": report["embed_dim"], "table": table, "val_rows": n_val, "paired": paired(out, list(table))}


def paired(report_dir: Path, shots: list[int]) -> dict:
    """Per K, each few-shot method against zero-shot and against linear, in and out of domain:
    the paired difference (points) with its 95 % bootstrap interval over test rows and seeds
    (``shift_benchmark.PairedBootstrap``) and its verdict."""
    import pyarrow.parquet as pq

    table = pq.read_table(report_dir / "test_predictions.parquet").to_pydict()
    columns = {k: np.asarray(v) for k, v in table.items()}
    out = {}
    for k in shots:
        keep = columns["shots"] == k
        boot = sb.PairedBootstrap({c: v[keep] for c, v in columns.items()}, [sb.TRAIN_DOMAIN])
        out[k] = {m: {base: {axis: {"diff": 100 * c[axis]["diff"], "low": 100 * c[axis]["low"], "high": 100 * c[axis]["high"],
                                    "verdict": sb.verdict(c[axis]["low"], c[axis]["high"])}
                             for axis in ("in_domain", "out_of_domain")}
                      for base in ("zero-shot", "linear") for c in [boot.compare(m, base)]}
                  for m in METHODS[2:]}
    return out


def markdown(runs: list[dict]) -> str:
    lines = []
    for r in runs:
        shots = list(r["table"])
        lines += [f"**{r['setting']}** ({r['classes']} classes, d = {r['embed_dim']}, {r['seeds']} seeds): the whole "
                  f"sweep {r['seconds']:.1f} s (one process, 2 CPU cores)"
                  + (f"; target {TARGET_SECONDS:.0f} s: {'met' if r['seconds'] <= TARGET_SECONDS else 'NOT met'}"
                     if r["setting"] == "default" else ""), "",
                  "| method | " + " | ".join(f"K={k} in / out" for k in shots) + " |", "|---|" + "---|" * len(shots)]
        for m in METHODS:
            cells = [f"{100 * r['table'][k][m]['in_domain']:.1f} / {100 * r['table'][k][m]['out_of_domain']:.1f}"
                     for k in shots]
            lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
        short = {"beats": "↑", "loses": "↓", "ties": "≈"}
        for base in ("zero-shot", "linear"):
            lines += ["", f"Paired against `{base}`: difference in points, in domain / out of domain; ↑ beats, ↓ loses, "
                      "≈ ties (95 % bootstrap interval over test rows and seeds):", "",
                      "| method | " + " | ".join(f"K={k}" for k in shots) + " |", "|---|" + "---|" * len(shots)]
            for m in METHODS[2:]:
                cells = [" / ".join(f"{c['diff']:+.1f}{short[c['verdict']]}" for c in
                                    (r["paired"][k][m][base][axis] for axis in ("in_domain", "out_of_domain")))
                         for k in shots]
                lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
        lines += ["", "validation rows per K: " + ", ".join(f"K={k}: {'/'.join(map(str, v))}"
                                                              for k, v in r["val_rows"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="default,small,hard,large-d,easy")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--shots", default="1,2,4,8,16")
    ap.add_argument("--json", default="")
    ap.add_argument("--from-json", default="", help="no run: print the Markdown of an earlier --json")
    args = ap.parse_args()
    if args.from_json:
        runs = json.loads(Path(args.from_json).read_text())
        for r in runs:  # JSON keys are text
            r["table"] = {int(k): v for k, v in r["table"].items()}
            r["val_rows"] = {int(k): v for k, v in r["val_rows"].items()}
            r["paired"] = {int(k): v for k, v in r["paired"].items()}
        print(markdown(runs))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            runs.append(run_setting(name, args.seeds, args.shots, Path(tmp)))
            print(markdown(runs[-1:]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
