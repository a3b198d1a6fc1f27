"""``vlaug demo``, in two parts, offline.

1. The pipeline on real image files: the bundled shapes data embedded with the tiny
   random-weight model, train-box (a LARE box head and a LatentDR head on the photo
   domain), then probe (zero-shot, linear, box, dr, Gaussian noise and Mixup over 3
   seeds). Random weights: the accuracies sit at chance; this part shows that embed ->
   train-box -> probe work, not what CLIP features can do.
2. What latent augmentation is for: a cache drawn from vlaug's simulated CLIP-like
   embedding space with domain shift (:func:`vlaug.simulate.shifted_domains`, the shift
   benchmark's generator, at a smaller size: :data:`SIMULATED`), one training domain
   (photo) and three unseen ones with a prompt set each. A box head and a LADS head are
   trained on photo, and zero-shot, linear, box, LADS and ``adaptive`` are probed over 3
   seeds: the table and ``tradeoff.png`` show what each method trades in domain against out
   of domain. The numbers are simulated, and the demo says so.

The closing lines print the same commands with real weights.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vlaug import demo_data
from vlaug.embed import EmbedConfig, EmbedResult, embed_source
from vlaug.encoders import TINY_MODEL
from vlaug.evaluate import ProbeRunConfig, run_probe
from vlaug.heads import make_head_config
from vlaug.report import write_report
from vlaug.simulate import DOMAINS, TARGET_DOMAINS, TRAIN_DOMAIN, SimParams, shifted_domains, write_cache
from vlaug.train import TrainConfig, TrainResult, train_head

# One prompt set per demo domain, for heads that translate between domains (LADS).
DEMO_PROMPT_SETS = (
    "photo=a photo of a {}.",
    "sketch=a sketch of a {}.",
    "painting=a painting of a {}.",
)


# The simulated part: the shift benchmark's default geometry at d = 256, 10 classes and 60 rows
# per class and domain (about 40 training rows per class), so that it runs in seconds on a CPU.
SIMULATED = SimParams(d=256, n_classes=10, n_per_class=60)
SIMULATED_METHODS = ("zero-shot", "linear", "box", "lads", "adaptive")
HEAD_EPOCHS = 30  # both parts' heads (the heads' own defaults, 50-100, are for real caches)
SEEDS = 3


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
        f"vlaug train-box {out} --out heads/lads --head lads --train-domain photo --source-prompts photo "
        "--target-prompts sketch,painting\n"
        f"vlaug probe {out} --out report --train-domain photo -m zero-shot -m linear -m box:heads/box -m dr:heads/dr-sa "
        "-m lads:heads/lads -m adaptive -m gaussian -m mixup"
    )


@dataclass
class DemoResult:
    embed: EmbedResult
    heads: list[TrainResult]
    report: dict
    report_dir: str
    data: str = ""  # the image folder the demo embedded (the bundled one, or one it drew)
    simulated_heads: list[TrainResult] = field(default_factory=list)
    simulated_report: dict = field(default_factory=dict)
    simulated_dir: str = ""


def run_demo(out: str | Path = "vlaug-demo", progress: bool = True, log: Callable[[str], None] | None = None) -> DemoResult:
    """Both parts of the demo into ``OUT``: ``features/``, ``heads/`` and ``report/`` from the
    bundled images, ``simulated/`` (its features, heads and report) from the simulator."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    result = _images_part(out, progress, log)
    result.simulated_heads, result.simulated_report = _simulated_part(out / "simulated", progress, log)
    result.simulated_dir = str(out / "simulated" / "report")
    return result


def _images_part(out: Path, progress: bool, log: Callable[[str], None]) -> DemoResult:
    """Embed the bundled data into ``OUT/features`` (resuming if it is already there), train
    a LARE box head and a LatentDR (sa) head on its photo domain into ``OUT/heads/``, probe."""
    data = _image_folder(out, log)
    config = EmbedConfig(source=str(data), out=str(out / "features"), model=TINY_MODEL, pretrained="none",
                         prompt_sets=DEMO_PROMPT_SETS, seed=0, progress=progress)
    embedded = embed_source(config, log=log)
    heads = [_train(embedded.out, out / "heads" / head, head, {}, progress, log) for head in ("box", "dr-sa")]
    methods = ("zero-shot", "linear", f"box:{out / 'heads' / 'box'}", f"dr:{out / 'heads' / 'dr-sa'}", "gaussian", "mixup")
    report = _probe(embedded.out, out / "report", methods, progress, log)
    return DemoResult(embedded, heads, report, str(out / "report"), str(data))


def _image_folder(out: Path, log: Callable[[str], None]) -> Path:
    """The bundled shapes folder, or (in a wheel install) the same images drawn into ``OUT/data``."""
    data = bundled_data_dir()
    if data is None:
        data = out / "data"
        if not data.is_dir():
            n = demo_data.generate(data)
            log(f"drew the {n} demo images into {data} (the same generator made data/shapes in the repository)")
    return data


def _simulated_part(out: Path, progress: bool, log: Callable[[str], None]) -> tuple[list[TrainResult], dict]:
    """The simulated cache into ``OUT/features`` (drawn once), a box and a LADS head on its
    training domain, and the probe of :data:`SIMULATED_METHODS` into ``OUT/report``."""
    features = out / "features"
    if not (features / "manifest.json").is_file():
        write_cache(features, shifted_domains(SIMULATED), SIMULATED)
        log(f"simulated {SIMULATED.n_classes} classes x {len(DOMAINS)} domains x {SIMULATED.n_per_class} CLIP-like "
            f"embeddings (d = {SIMULATED.d}) into {features}")
    lads = {"source": TRAIN_DOMAIN, "targets": TARGET_DOMAINS}
    heads = [_train(str(features), out / "heads" / head, head, options, progress, log)
             for head, options in (("box", {}), ("lads", lads))]
    methods = tuple(f"{m}:{out / 'heads' / m}" if m in ("box", "lads") else m for m in SIMULATED_METHODS)
    return heads, _probe(str(features), out / "report", methods, progress, log)


def against_linear(report: dict) -> str:
    """One line: each method's in-domain and out-of-domain accuracy against the linear
    probe's, in points, from the report's means (what the simulated table shows)."""
    summary = {row["method"].split(":")[0]: row for row in report["summary"]}
    base = summary["linear"]

    def points(row: dict, key: str) -> str:
        return f"{100 * (row[key]['mean'] - base[key]['mean']):+.1f}"

    others = [f"{name} {points(row, 'in_domain')} / {points(row, 'out_of_domain')}" for name, row in summary.items()
              if name != "linear"]
    return ("Against the linear probe (in domain / out of domain, points): " + ", ".join(others) + ".")


def _train(features: str, out: Path, head: str, options: dict, progress: bool, log: Callable[[str], None]) -> TrainResult:
    config = TrainConfig(features=features, out=str(out), head=make_head_config(head, **options), train_domains=(TRAIN_DOMAIN,),
                         epochs=HEAD_EPOCHS, seed=0, device="cpu", overwrite=True, progress=progress)
    return train_head(config, log=log)


def _probe(features: str, out: Path, methods: tuple[str, ...], progress: bool, log: Callable[[str], None]) -> dict:
    config = ProbeRunConfig(features=features, out=str(out), train_domains=(TRAIN_DOMAIN,), seeds=SEEDS, overwrite=True,
                            progress=progress, device="cpu", methods=methods)
    return write_report(out, run_probe(config, log=log))
