"""What one step of a joint method costs, and the share of its optimiser (issues 27, 28):
milliseconds per AdamW step of ``linear-adamw``, ``batchformer``, ``latentdr-sa`` and
``latentdr-pool`` with the grid's 4 configurations stacked, on the shift benchmark's
``default`` shape (d = 512, 16 classes, batch 256), with the stacked AdamW through torch's
fused kernel and operation by operation, in turn in one process.

    python benchmarks/joint_step.py [--steps 60] [--repeats 3] [--json FILE]

A joint method's search is its steps × this cost (the steps are in report.json's
``search``), so this ratio is what the fused optimiser saves of its time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vlaug import loop
from vlaug.methods.joint import BatchFormerMethod, LatentDRPool, LatentDRSA, LinearAdamW, _clean_ce

CONFIGS = [(3e-3, 0.01), (3e-3, 1.0), (1e-2, 0.01), (1e-2, 1.0)]  # the joint methods' default grid


def ms_per_step(method, x, y, xv, yv, steps: int, fused: bool) -> tuple[float, float]:
    """(ms per step, of which the optimiser) over ``steps`` steps of the 4 stacked configurations."""
    spent = {"optimizer": 0.0}
    step = loop._StackedAdamW.step

    def timed(self):
        start = time.perf_counter()
        step(self)
        spent["optimizer"] += time.perf_counter() - start

    module, loss = method.build(x.shape[1], int(y.max()) + 1)
    loop._StackedAdamW.step, loop.FUSED_ADAMW, fused_before = timed, fused, loop.FUSED_ADAMW
    try:
        start = time.perf_counter()
        loop.fit_steps(module, loss, x_train=x, y_train=y, batch_size=256, max_steps=steps, configs=CONFIGS,
                       generator=torch.Generator().manual_seed(0), val_loss=_clean_ce(xv, yv, module.input_scale),
                       val_every=10)
        total = time.perf_counter() - start
    finally:
        loop._StackedAdamW.step, loop.FUSED_ADAMW = step, fused_before
    return 1000 * total / steps, 1000 * spent["optimizer"] / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    d, c = 512, 16
    x = torch.nn.functional.normalize(torch.randn(1500, d), dim=-1)
    y = torch.randint(0, c, (1500,))
    xv = torch.nn.functional.normalize(torch.randn(400, d), dim=-1)
    yv = torch.randint(0, c, (400,))
    out = {"threads": torch.get_num_threads(), "steps": args.steps, "repeats": args.repeats, "methods": {}}
    print("| method | step, fused AdamW (ms) | of which AdamW | step, AdamW op by op (ms) | of which AdamW | fused / op by op |")
    print("|---|---|---|---|---|---|")
    for cls in (LinearAdamW, BatchFormerMethod, LatentDRSA, LatentDRPool):
        method = cls.__new__(cls)
        runs = {True: [], False: []}
        for _ in range(args.repeats):  # in turn: a drift of the machine's speed moves both
            for fused in (True, False):
                runs[fused].append(ms_per_step(method, x, y, xv, yv, args.steps, fused))
        med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
        ratio = statistics.median(a[0] / b[0] for a, b in zip(runs[True], runs[False]))
        out["methods"][cls.name] = {"fused_ms": med[True][0], "fused_optimizer_ms": med[True][1],
                                    "plain_ms": med[False][0], "plain_optimizer_ms": med[False][1], "ratio": ratio}
        print(f"| `{cls.name}` | {med[True][0]:.1f} | {med[True][1]:.1f} | {med[False][0]:.1f} | {med[False][1]:.1f} | "
              f"**{ratio:.2f}** |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
