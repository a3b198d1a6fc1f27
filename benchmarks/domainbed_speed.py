"""What DomainBed's protocol costs (issue 28): `vlaug probe --protocol leave-one-domain-out`
against `--protocol single` on a cache of PACS's size, and every method's time under it.

    python benchmarks/domainbed_speed.py [--rows 10000] [--dim 512] [--classes 7] [--seeds 3]
                                         [--repeats 3] [--methods-too [--methods A,B]] [--skip-pair] [--json FILE]

1. Writes a simulated 4-domain cache (``vlaug.simulate``, the shift benchmark's CLIP-like
   space; PACS's size by default: 10,000 rows, 512-d, 7 classes).
2. Times ``vlaug probe -m linear -m zero-shot --seeds N`` under ``--protocol single``
   (trained on every domain) and under ``--protocol leave-one-domain-out --selection all``
   (4 test domains x 3 selections), whole processes run in turn (A B A B ...), and prints
   the medians and the ratio (issue 28's target: at most 3).
3. With ``--methods-too``: the head sets of ``box`` and ``dr-sa`` (``vlaug train-box
   --protocol leave-one-domain-out --selection all``), then every registered method (with
   one of those heads where it needs one; a ``lads`` set, whose heads target their held-out
   domains, with ``--head-sets box,dr-sa,lads``) alone under ``--protocol leave-one-domain-out --selection all``, one process
   each, its wall time;
   a method still running after ``--method-timeout`` seconds is stopped and reported as
   such (the joint methods on 2 CPU cores: see docs/benchmarks.md). ``--methods`` times only
   those, ``--skip-pair`` leaves out step 2; ``cdga`` (it needs a generated set) is left out.

Run nothing else on the machine meanwhile: every figure is a timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


HEAD_SETS = ("box", "dr-sa")  # trained as sets for the methods that need a head (add lads to time lads too)


def write_cache(path: Path, rows: int, dim: int, classes: int) -> Path:
    from vlaug import simulate

    per_class = max(2, rows // (len(simulate.DOMAINS) * classes))
    p = simulate.SimParams(n_per_class=per_class, d=dim, n_classes=classes)
    return simulate.write_cache(path, simulate.shifted_domains(p), p)


def probe_command(cache: Path, out: Path, methods: list[str], seeds: int, lodo: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vlaug", "probe", str(cache), "--out", str(out), "--overwrite", "--no-progress",
           "--seeds", str(seeds)]
    for m in methods:
        cmd += ["-m", m]
    if lodo:
        cmd += ["--protocol", "leave-one-domain-out", "--selection", "all"]
    return cmd


def timed(cmd: list[str], timeout: float | None = None, refused: list | None = None) -> tuple[float, bool]:
    """Wall seconds of one whole process, and whether it finished. With ``refused`` (a list),
    a process that exits with an error is not raised: its last line is appended there."""
    start = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout, text=True)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, False
    except subprocess.CalledProcessError as e:
        if refused is None:
            raise
        refused.append((e.stderr or "").strip().splitlines()[-1:] or [f"exit {e.returncode}"])
        return time.perf_counter() - start, False
    return time.perf_counter() - start, True


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods-too", action="store_true")
    ap.add_argument("--method-timeout", type=float, default=1200.0)
    ap.add_argument("--head-sets", default=",".join(HEAD_SETS), help="head kinds trained as sets (comma-separated; '' for none)")
    ap.add_argument("--methods", default="", help="with --methods-too: only these registered methods (comma-separated)")
    ap.add_argument("--skip-pair", action="store_true", help="leave out step 2 (the linear + zero-shot pair)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    out: dict = {"rows": args.rows, "dim": args.dim, "classes": args.classes, "seeds": args.seeds}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = write_cache(tmp / "cache", args.rows, args.dim, args.classes)
        pair = {"single": [], "leave-one-domain-out": []}
        for _ in range(0 if args.skip_pair else args.repeats):  # in turn: a drift of the machine's speed moves both
            for name in pair:
                pair[name].append(timed(probe_command(cache, tmp / name, ["linear", "zero-shot"], args.seeds,
                                                      name != "single"))[0])
        ratios = [a / b for a, b in zip(pair["leave-one-domain-out"], pair["single"])]
        out["linear_zero_shot"] = {k: statistics.median(v) for k, v in pair.items()} if ratios else {}
        if ratios:
            out["linear_zero_shot"]["ratio"] = statistics.median(ratios)
            print(f"-m linear -m zero-shot, {args.seeds} seeds, {args.rows} rows x {args.dim} d x {args.classes} classes: "
                  f"single {out['linear_zero_shot']['single']:.1f} s, leave-one-domain-out --selection all "
                  f"{out['linear_zero_shot']['leave-one-domain-out']:.1f} s (medians of {args.repeats}), "
                  f"ratio {out['linear_zero_shot']['ratio']:.2f}")
        if args.methods_too:
            from vlaug.methods import REGISTRY

            out["head_sets"], heads = {}, {}
            for kind in [k for k in args.head_sets.split(",") if k]:  # one head per split seed and held-out domain or pair
                folder = tmp / "heads" / kind
                cmd = [sys.executable, "-m", "vlaug", "train-box", str(cache), "--out", str(folder), "--head", kind,
                       "--protocol", "leave-one-domain-out", "--seeds", str(args.seeds), "--selection", "all",
                       "--device", "cpu", "--no-progress"]
                seconds, done = timed(cmd)
                out["head_sets"][kind] = {"seconds": seconds}
                heads[kind] = folder
                print(f"  train-box --head {kind} --protocol leave-one-domain-out: {seconds:.1f} s", flush=True)
            out["methods"] = {}
            wanted = [m for m in args.methods.split(",") if m]
            for name, cls in REGISTRY.items():
                if (wanted and name not in wanted) or cls.path_argument:  # cdga needs a generated set
                    continue
                spec = name
                if cls.head_kinds:
                    kind = next((k for k in cls.head_kinds if k in heads), None)
                    if kind is None:
                        continue
                    spec = f"{name}:{heads[kind]}"
                refused = []
                seconds, done = timed(probe_command(cache, tmp / name, [spec], args.seeds, True), args.method_timeout, refused)
                out["methods"][name] = {"seconds": seconds, "finished": done, "refused": refused[0][0] if refused else None}
                why = f" (refused: {refused[0][0]})" if refused else "" if done else f" (stopped at {args.method_timeout:.0f} s)"
                print(f"  {name}: {seconds:.1f} s{why}", flush=True)
            finished = [v["seconds"] for v in out["methods"].values() if v["finished"]]
            out["methods_total_finished"] = sum(finished)
            print(f"  total of the methods that finished: {sum(finished):.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
