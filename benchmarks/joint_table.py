"""The joint methods' table of docs/benchmarks.md ("The joint methods on the shift benchmark"),
from a finished shift-benchmark run of one setting.

    python benchmarks/shift_benchmark.py --settings S --seeds 3 --threads 1 \
        --skip linear-zs,box,dr,lads,gaussian,mixup,xdomain-mix,gda,text-anchor,prompt-shift,adaptive,tip-adapter,tip-adapter-f,clip-adapter,taskres,cross-modal,lp++,clap,cdga \
        --json S.json --out-md S.md --workdir W
    python benchmarks/joint_table.py S.json W/S/report

One row per method the run has of (`linear`, `linear-adamw`, `batchformer`, `latentdr-sa`, `latentdr-pool`):
in-domain and out-of-domain accuracy (mean ± std over the seeds, in %), the AdamW steps each
seed kept, and the paired differences against `linear` and `linear-adamw` with their 95 %
intervals and verdicts (shift_benchmark.PairedBootstrap: bootstrap over the test rows and the
seeds, the same rows for both methods); then zero-shot and the flags the run raised about the
joint methods (a configuration at its step cap).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shift_benchmark as sb  # noqa: E402

METHODS = ("linear", "linear-adamw", "batchformer", "latentdr-sa", "latentdr-pool")


def _difference(c: dict, axis: str) -> str:
    d = c[axis]
    return f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] {d['verdict']}"


def table(run_json: Path, report_dir: Path, train_domains: list[str]) -> str:
    """The markdown table (and the zero-shot line) of one setting's run."""
    run = json.loads(run_json.read_text())
    (setting,) = run["settings"].values() if len(run["settings"]) == 1 else (None,)
    if setting is None:
        raise SystemExit(f"{run_json} holds {len(run['settings'])} settings; run one setting at a time.")
    summary = {s["method"]: s for s in setting["summary"]}
    paired = sb.PairedBootstrap(sb.read_predictions([report_dir]), train_domains)
    lines = ["| method | in-domain | out-of-domain | steps kept per seed (of ≤ 10,000) | − linear, in | − linear, out "
             "| − linear-adamw, in | − linear-adamw, out |", "|---|---|---|---|---|---|---|---|"]
    for m in [m for m in METHODS if m in summary]:  # a run may leave some joint methods out (--skip)
        s = summary[m]
        steps = "—" if m == "linear" else ", ".join(str(r["selection"].get("steps", "")) for r in setting["results"]
                                                     if r["method"] == m)
        row = [m, f"{100 * s['in_domain']['mean']:.1f} ± {100 * s['in_domain']['std']:.1f}",
               f"{100 * s['out_of_domain']['mean']:.1f} ± {100 * s['out_of_domain']['std']:.1f}", steps]
        for base in ("linear", "linear-adamw"):
            if METHODS.index(base) < METHODS.index(m):  # each method against the baselines above it
                c = paired.compare(m, base)
                row += [_difference(c, "in_domain"), _difference(c, "out_of_domain")]
            else:
                row += ["—", "—"]
        lines.append("| " + " | ".join(row) + " |")
    zs = summary["zero-shot"]
    lines += ["", f"Zero-shot: {100 * zs['in_domain']['mean']:.1f} / {100 * zs['out_of_domain']['mean']:.1f}.",
              f"Flags about these methods: {[f for f in setting['flags'] if any(k in f for k in ('cap', *METHODS[1:]))]}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        raise SystemExit("usage: python benchmarks/joint_table.py RUN.json REPORT_DIR [TRAIN_DOMAIN,...]  (default photo)")
    print(table(Path(args[0]), Path(args[1]), args[2].split(",") if len(args) == 3 else ["photo"]))


if __name__ == "__main__":
    main()
