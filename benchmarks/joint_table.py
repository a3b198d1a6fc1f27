"""The joint methods' table of docs/benchmarks.md ("The joint methods on the shift benchmark"),
from a finished shift-benchmark run of one setting.

    python benchmarks/shift_benchmark.py --settings S --seeds 3 --threads 1 \
        --skip linear-zs,box,dr,lads,gaussian,mixup,xdomain-mix,gda,text-anchor,prompt-shift,adaptive,tip-adapter,tip-adapter-f,clip-adapter,taskres,cross-modal,lp++,clap,cdga \
        --json S.json --out-md S.md --workdir W
    python benchmarks/joint_table.py S.json W/S/report
    python benchmarks/joint_table.py A.json WA/S/report B.json WB/S/report   # runs of one method each, one table

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


def _setting(run_json: Path) -> dict:
    run = json.loads(run_json.read_text())
    if len(run["settings"]) != 1:
        raise SystemExit(f"{run_json} holds {len(run['settings'])} settings; run one setting at a time.")
    return next(iter(run["settings"].values()))


def table(runs: list[tuple[Path, Path]], train_domains: list[str]) -> str:
    """The markdown table (and the zero-shot line) of one setting, from one run or several
    (each a RUN.json and its report folder; e.g. one joint method per run). Each method's row
    comes from the first run that has it, and is compared with that run's own `linear` and
    `linear-adamw`; a baseline whose accuracies differ between the runs is said below the table."""
    rows, notes, flags, zero_shot, caps = [], [], [], None, set()
    done: dict[str, dict] = {}
    for run_json, report_dir in runs:
        setting = _setting(run_json)
        summary = {s["method"]: s for s in setting["summary"]}
        label_of = {m["spec"]: m["method"] for m in setting["methods"]}  # a spec may carry the setting's joint options
        paired = sb.PairedBootstrap(sb.with_reference(sb.read_predictions([report_dir]), label_of, None), train_domains)
        zero_shot = zero_shot or summary["zero-shot"]
        flags += [f for f in setting["flags"] if any(k in f for k in ("cap", *METHODS[1:])) and f not in flags]
        for m in [m for m in METHODS if m in summary]:  # a run may leave some joint methods out (--skip)
            s = summary[m]
            if m in done:
                if m in METHODS[:2] and any(s[a]["mean"] != done[m][a]["mean"] for a in ("in_domain", "out_of_domain")):
                    notes.append(f"`{m}` differs in {run_json}: {100 * s['in_domain']['mean']:.2f} / "
                                 f"{100 * s['out_of_domain']['mean']:.2f} (the table's row: the first run's).")
                continue
            done[m] = s
            mine = [r for r in setting["results"] if label_of.get(r["method"], r["method"]) == m]
            caps.update(r["selection"]["max_steps"] for r in mine if "max_steps" in r["selection"])
            steps = "—" if m == "linear" else ", ".join(str(r["selection"].get("steps", "")) for r in mine)
            row = [m, f"{100 * s['in_domain']['mean']:.1f} ± {100 * s['in_domain']['std']:.1f}",
                   f"{100 * s['out_of_domain']['mean']:.1f} ± {100 * s['out_of_domain']['std']:.1f}", steps]
            for base in ("linear", "linear-adamw"):
                if METHODS.index(base) < METHODS.index(m):  # each method against the baselines above it
                    c = paired.compare(m, base)
                    row += [_difference(c, "in_domain"), _difference(c, "out_of_domain")]
                else:
                    row += ["—", "—"]
            rows.append((METHODS.index(m), "| " + " | ".join(row) + " |"))
    cap = ", ".join(f"{c:,}" for c in sorted(caps)) or "?"
    lines = [f"| method | in-domain | out-of-domain | steps kept per seed (of ≤ {cap}) | − linear, in | − linear, out "
             "| − linear-adamw, in | − linear-adamw, out |", "|---|---|---|---|---|---|---|---|"]
    lines += [row for _, row in sorted(rows)]
    lines += ["", f"Zero-shot: {100 * zero_shot['in_domain']['mean']:.1f} / {100 * zero_shot['out_of_domain']['mean']:.1f}.",
              *notes, f"Flags about these methods: {flags}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    domains = ["photo"]
    if len(args) % 2:  # a trailing TRAIN_DOMAIN,...
        domains, args = args[-1].split(","), args[:-1]
    if not args:
        raise SystemExit("usage: python benchmarks/joint_table.py RUN.json REPORT_DIR [RUN.json REPORT_DIR ...] "
                         "[TRAIN_DOMAIN,...]  (default photo)")
    print(table([(Path(a), Path(b)) for a, b in zip(args[::2], args[1::2])], domains))


if __name__ == "__main__":
    main()
