"""``vlaug demo``: the pipeline on the bundled shapes data with the tiny random-init model:
embed, train-box (a LARE box head and a LatentDR head on the photo domain), then probe
(zero-shot, linear, box, dr, Gaussian noise and Mixup over 3 seeds).

No download is needed: the tiny model gets random weights, so the numbers show that the
pipeline runs, not what CLIP features can do. The closing lines print the same commands
with real weights.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlaug import demo_data
from vlaug.embed import EmbedConfig, EmbedResult, embed_source
from vlaug.encoders import TINY_MODEL
from vlaug.evaluate import ProbeRunConfig, run_probe
from vlaug.heads import make_head_config
from vlaug.report import write_report
from vlaug.train import TrainConfig, TrainResult, train_head

# One prompt set per demo domain, for heads that translate between domains (LADS).
DEMO_PROMPT_SETS = (
    "photo=a photo of a {}.",
    "sketch=a sketch of a {}.",
    "painting=a painting of a {}.",
)


def bundled_data_dir() -> Path | None:
    """``data/shapes`` of a source checkout (editable install), or None in a wheel install."""
    candidate = Path(__file__).resolve().parent.parent / "data" / "shapes"
    return candidate if candidate.is_dir() else None


def real_weights_commands(source: str, out: str) -> str:
    prompt_sets = " ".join(f'--prompt-set "{p}"' for p in DEMO_PROMPT_SETS)
    return (
        f"vlaug embed {source} --out {out} --model ViT-B-32 --pretrained laion2b_s34b_b79k {prompt_sets}\n"
        f"vlaug embed {source} --out {out}-coca --model coca_ViT-B-32 --pretrained laion2b_s13b_b90k {prompt_sets}\n"
        f"vlaug train-box {out} --out heads/box --head box --train-domain photo\n"
        f"vlaug train-box {out} --out heads/dr-sa --head dr-sa --train-domain photo\n"
        f"vlaug probe {out} --out report --train-domain photo -m zero-shot -m linear -m box:heads/box -m dr:heads/dr-sa "
        "-m gaussian -m mixup"
    )


@dataclass
class DemoResult:
    embed: EmbedResult
    heads: list[TrainResult]
    report: dict
    report_dir: str
    data: str = ""  # the image folder the demo embedded (the bundled one, or one it drew)


def run_demo(out: str | Path = "vlaug-demo", progress: bool = True, log: Callable[[str], None] | None = None) -> DemoResult:
    """Embed the bundled data into ``OUT/features`` (resuming if it is already there), then
    train a LARE box head and a LatentDR (sa) head on its photo domain into ``OUT/heads/``."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    data = bundled_data_dir()
    if data is None:
        data = out / "data"
        if not data.is_dir():
            n = demo_data.generate(data)
            log(f"drew the {n} demo images into {data} (the same generator made data/shapes in the repository)")
    config = EmbedConfig(
        source=str(data),
        out=str(out / "features"),
        model=TINY_MODEL,
        pretrained="none",
        prompt_sets=DEMO_PROMPT_SETS,
        seed=0,
        progress=progress,
    )
    embedded = embed_source(config, log=log)
    heads = []
    for head in ("box", "dr-sa"):
        train = TrainConfig(features=embedded.out, out=str(out / "heads" / head), head=make_head_config(head), train_domains=("photo",),
                            epochs=30, seed=0, device="cpu", overwrite=True, progress=progress)
        heads.append(train_head(train, log=log))
    report_dir = out / "report"
    probe = ProbeRunConfig(
        features=embedded.out, out=str(report_dir), train_domains=("photo",), seeds=3, overwrite=True, progress=progress,
        device="cpu", methods=("zero-shot", "linear", f"box:{out / 'heads' / 'box'}", f"dr:{out / 'heads' / 'dr-sa'}",
                               "gaussian", "mixup"),
    )
    report = write_report(report_dir, run_probe(probe, log=log))
    return DemoResult(embedded, heads, report, str(report_dir), str(data))
