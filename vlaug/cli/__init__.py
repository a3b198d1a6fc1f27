"""The ``vlaug`` command line: the only Typer code. One thin function per command:
build a config, call one library function, print the result.

A :class:`vlaug.errors.VlaugError` becomes one line on stderr and its exit code (2 for
bad input, 1 for failures at run time); any other exception keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from vlaug import choices
from vlaug._version import __version__
from vlaug.errors import UsageError, VlaugError
from vlaug.sources import Layout

METHODS_HELP = ", ".join(choices.builtin_methods())

def _plain_flags(params: list) -> list:
    """Flags take no value: show none (typer would print ``<bool>``)."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    """A command whose usage line reads ``vlaug embed [OPTIONS] SOURCE`` (no braces) and
    whose flags show no ``<bool>``."""

    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx):
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    name="vlaug",
    help="Latent augmentation for classifiers on frozen CLIP/CoCa embeddings. "
    "Pipeline: vlaug embed (images -> feature cache) -> vlaug train-box (heads on the cache) "
    "-> vlaug probe (probes, protocols, report); vlaug predict uses a probe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum of the library's closed choices, so that --help lists them."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


PrecisionChoice = _choices("PrecisionChoice", choices.PRECISIONS)
DtypeChoice = _choices("DtypeChoice", choices.STORAGE_DTYPES)
HeadChoice = _choices("HeadChoice", choices.HEAD_KINDS)
NormChoice = _choices("NormChoice", choices.DR_NORMS)
DRModeChoice = _choices("DRModeChoice", choices.DR_MODES)
DegradeChoice = _choices("DegradeChoice", choices.DR_DEGRADES)
ReweightChoice = _choices("ReweightChoice", choices.REWEIGHTS)
ProtocolChoice = _choices("ProtocolChoice", choices.PROTOCOLS)
SelectionChoice = _choices("SelectionChoice", choices.SELECTIONS)


def _value(choice):
    """The string of a choice option (Typer passes an Enum member, or the default as written)."""
    return choice.value if isinstance(choice, Enum) else choice


def _shots(text: str | None) -> int | tuple[int, ...] | None:
    """--shots: K, or the sweep's comma-separated values."""
    if text is None:
        return None
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--shots {text!r}: give K (e.g. 16) or comma-separated values (e.g. 1,2,4,8,16).") from None
    return values[0] if len(values) == 1 else values


def _val_shots(text: str | None) -> int | str | None:
    """--val-shots: rows per class, or 'all'."""
    if text is None or text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--val-shots {text!r}: give a number of rows per class (e.g. 4) or 'all'.") from None


def _errors_to_exit(fn):
    """Turn a VlaugError into one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VlaugError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper


def _version(value: bool):
    if value:
        typer.echo(f"vlaug {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    pass


@app.command(cls=_Command)
@_errors_to_exit
def embed(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help="Image folder (class/img, domain/class/img, or img alone: unlabeled), CSV/Parquet manifest, WebDataset .tar shard(s) (a file, a folder, 'shards/{00000..00127}.tar' or a glob) or Parquet files holding the image bytes.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Feature cache folder to create, or to resume.")],
    model: Annotated[str, typer.Option(help="open_clip model name (ViT-B-32, coca_ViT-B-32, ...), hf-hub:ORG/REPO or local-dir:PATH.")] = "ViT-B-32",
    pretrained: Annotated[str, typer.Option(help="Pretrained tag (e.g. laion2b_s34b_b79k), a local checkpoint file, or 'none' for random weights.")] = "laion2b_s34b_b79k",
    layout: Annotated[Layout, typer.Option(help="Source layout; auto detects folders and manifests.")] = Layout.auto,
    classes: Annotated[Optional[Path], typer.Option("--classes", help="Text file, one class per line: the class order.")] = None,
    class_key: Annotated[Optional[str], typer.Option(help="WebDataset shards: the member holding the class (an index into --classes, or a name), or json:FIELD of the .json member. Default: cls when the samples have one, else unlabeled.")] = None,
    domain_key: Annotated[Optional[str], typer.Option(help="WebDataset shards: the member or json:FIELD holding the domain (e.g. json:domain).")] = None,
    templates: Annotated[Optional[str], typer.Option(help="Class prompt templates: simple (7), openai (80), photo (1), or a file with one template per line. Default: simple for a new cache, the cache's own when resuming.")] = None,
    prompt_set: Annotated[Optional[List[str]], typer.Option("--prompt-set", help="Extra named prompt set NAME=TEMPLATE or NAME=@FILE; repeatable, a repeated NAME adds templates.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[PrecisionChoice, typer.Option(help="auto: bf16/fp16 autocast on GPU, fp32 on CPU.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[int, typer.Option(help="Processes decoding images in parallel with the model; -1 picks from the CPU count.")] = -1,
    dtype: Annotated[DtypeChoice, typer.Option(help="Storage dtype of the image embeddings.")] = "float16",
    part_size: Annotated[int, typer.Option(help="Rows per committed part: the most work an interruption can lose.")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of the random weights with --pretrained none.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing cache made with other settings.")] = False,
    append: Annotated[bool, typer.Option("--append", help="Add the images of another source to an existing cache (same model, classes within the cache's).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit with code 1 if any image could not be embedded.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
):
    """Embed images with a frozen open_clip model into a Parquet feature cache (resumable)."""
    from vlaug.embed import EmbedConfig, embed_source
    from vlaug.errors import EmbedFailuresError

    config = EmbedConfig(
        source=str(source), out=str(out), model=model, pretrained=pretrained, layout=_value(layout),
        classes_file=str(classes) if classes else None, class_key=class_key, domain_key=domain_key, templates=templates,
        prompt_sets=tuple(prompt_set or ()),
        device=device, precision=_value(precision), batch_size=batch_size, workers=workers, dtype=_value(dtype),
        part_size=part_size, seed=seed, overwrite=overwrite, append=append, progress=progress,
    )
    from vlaug.embed import dist_context

    result = embed_source(config)
    if dist_context().rank != 0:
        return  # under torchrun, rank 0 reports for the run
    typer.echo(result.summary())
    if result.n_failed:
        typer.echo(f"{result.n_failed} input(s) could not be embedded; reasons in {out / 'failed.parquet'} (vlaug info {out}).", err=True)
        if strict:
            raise EmbedFailuresError(f"--strict: {result.n_failed} input(s) failed.")


@app.command(cls=_Command)
@_errors_to_exit
def prompts(
    features: Annotated[Path, typer.Argument(metavar="FEATURES", help="Feature cache written by vlaug embed.")],
    prompt_set: Annotated[Optional[List[str]], typer.Option("--prompt-set", help="Prompt set NAME=TEMPLATE or NAME=@FILE to add, or to replace one of that name; repeatable, a repeated NAME adds templates.")] = None,
    templates: Annotated[Optional[str], typer.Option(help="New class prompt templates: simple (7), openai (80), photo (1), or a file with one template per line.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Default: the model the cache records (another one is refused).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Default: the weights the cache records; for a checkpoint file that moved, its new path (checked by its recorded sha256).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[PrecisionChoice, typer.Option(help="auto: bf16/fp16 autocast on GPU, fp32 on CPU.")] = "auto",
):
    """Add or replace prompt sets and class templates of a cache without re-embedding its images."""
    from vlaug.prompts import PromptsConfig, update_prompts

    config = PromptsConfig(features=str(features), prompt_sets=tuple(prompt_set or ()), templates=templates, model=model,
                           pretrained=pretrained, device=device, precision=_value(precision))
    typer.echo(update_prompts(config).summary())


@app.command("train-box", cls=_Command)
@_errors_to_exit
def train_box(
    features: Annotated[Path, typer.Argument(metavar="FEATURES", help="Feature cache written by vlaug embed.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Head folder to write (model.safetensors + config.json).")],
    head: Annotated[HeadChoice, typer.Option(help="box (LARE), dr-sa / dr-pool (LatentDR), lads (baseline).")] = "box",
    train_domain: Annotated[Optional[List[str]], typer.Option("--train-domain", help="Train on this domain; repeatable. Default: all.")] = None,
    test_fraction: Annotated[float, typer.Option(help="Held-out test rows (by a hash of the row id) when the cache has no split column; never trained on, as in vlaug probe.")] = 0.2,
    val_fraction: Annotated[float, typer.Option(help="Stratified part of the head's training rows whose loss selects the epoch.")] = 0.2,
    probe_val_fraction: Annotated[float, typer.Option(help="vlaug probe's validation rows (by a hash of the row id, the same for every seed), never trained on: give the probe's --val-fraction.")] = 0.2,
    epochs: Annotated[Optional[int], typer.Option(help="Default: box 100, dr 100, lads 50.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Default: box 512, dr 256, lads 256.")] = None,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seeds weights, batch order, validation split and dropout.")] = 0,
    protocol: Annotated[ProtocolChoice, typer.Option(help="leave-one-domain-out: a set of heads for vlaug probe "
                        "--protocol leave-one-domain-out, one per split seed and held-out domain, in sub-folders of --out.")] = "single",
    seeds: Annotated[int, typer.Option(help="leave-one-domain-out: heads for the probe's seeds 0..N-1 (each draws its own in/out split).")] = 5,
    selection: Annotated[SelectionChoice, typer.Option(help="leave-one-domain-out: leave-one-domain-out or all also trains "
                         "one head per held-out pair (that selection's folds).")] = "training-domain",
    holdout_fraction: Annotated[float, typer.Option(help="leave-one-domain-out: each domain's out part (the probe's --holdout-fraction).")] = 0.2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    alpha: Annotated[Optional[float], typer.Option(help="box: weight of the classification terms (default 0.5); lads: of the domain alignment (default 0.5).")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="box, lads: classification logits are cos / temperature (default: box 0.1, lads 0.01).")] = None,
    hidden: Annotated[Optional[int], typer.Option(help="box: f_Box hidden width (default 2·d); lads: f_aug width (default 384).")] = None,
    norm: Annotated[Optional[NormChoice], typer.Option(help="dr: post-norm (paper eq. 12, default) or pre-norm (eq. 13, long-tail).")] = None,
    dr_mode: Annotated[Optional[DRModeChoice], typer.Option(help="dr: both terms (default); d: degradation only; r: restoration only.")] = None,
    degrade: Annotated[Optional[DegradeChoice], typer.Option(help="dr: attention layer (default), or gaussian noise (ablation).")] = None,
    attention_heads: Annotated[Optional[int], typer.Option(help="dr: attention heads of each layer (default 4).")] = None,
    dim_head: Annotated[Optional[int], typer.Option(help="dr: per-head width; default: the paper's (sa d/4, pool d/32).")] = None,
    dim_ff: Annotated[Optional[int], typer.Option(help="dr: feed-forward width; default: the paper's (sa d/4, pool d/8).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="dr: dropout of the degradation/restoration layers (default 0.5).")] = None,
    noise_std: Annotated[Optional[float], typer.Option(help="dr with --degrade gaussian: noise σ (default 0.1).")] = None,
    source_prompts: Annotated[Optional[str], typer.Option(help="lads: prompt set of the training domain (e.g. photo; leave-one-domain-out: default classes).")] = None,
    target_prompts: Annotated[Optional[str], typer.Option(help="lads: comma-separated prompt sets of unseen domains (leave-one-domain-out: each head's held-out domains, not given).")] = None,
    memory_budget: Annotated[str, typer.Option(help="Stream the cache from disk when its embeddings need more memory than this (auto: a quarter of the RAM; or e.g. 1.5G).")] = "auto",
    allow_incomplete: Annotated[bool, typer.Option("--allow-incomplete", help="Train on a cache whose embed run was interrupted (refused otherwise).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing head folder.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
):
    """Train a stage-2 head (LARE box, LatentDR, LADS) on cached embeddings only."""
    from vlaug.train import TrainConfig, head_config, train_head

    targets = tuple(t.strip() for t in target_prompts.split(",") if t.strip()) if target_prompts is not None else None
    given = dict(alpha=alpha, temperature=temperature, hidden=hidden, norm=norm, mode=dr_mode, degrade=degrade,
                 heads=attention_heads, dim_head=dim_head, dim_ff=dim_ff, dropout=dropout, noise_std=noise_std,
                 source=source_prompts, targets=targets)
    options = {k: _value(v) for k, v in given.items() if v is not None}
    config = TrainConfig(
        features=str(features), out=str(out), head=head_config(_value(head), options, _value(protocol)),
        train_domains=tuple(train_domain or ()), test_fraction=test_fraction, val_fraction=val_fraction, probe_val_fraction=probe_val_fraction, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, seed=seed, device=device, memory_budget=memory_budget, overwrite=overwrite,
        allow_incomplete=allow_incomplete, progress=progress, protocol=_value(protocol), seeds=seeds,
        selection=_value(selection), holdout_fraction=holdout_fraction,
    )
    typer.echo(train_head(config).summary())


@app.command(cls=_Command)
@_errors_to_exit
def probe(
    features: Annotated[Path, typer.Argument(metavar="FEATURES", help="Feature cache written by vlaug embed.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder to write.")],
    method: Annotated[List[str], typer.Option("--method", "-m", help="NAME[:HEAD_DIR][?key=value&...]; repeatable. "
                      f"{METHODS_HELP}; or all: every method with its defaults (heads from --heads).")],
    train_domain: Annotated[Optional[List[str]], typer.Option("--train-domain", help="Training domain; repeatable. Default: all.")] = None,
    protocol: Annotated[ProtocolChoice, typer.Option(help="single: train on --train-domain, test on the rest (LARE); "
                        "leave-one-domain-out: DomainBed's, each domain in turn the test domain (docs/protocols-and-reports.md).")] = "single",
    test_domain: Annotated[Optional[List[str]], typer.Option("--test-domain", help="leave-one-domain-out: a test domain; "
                           "repeatable. Default: every domain in turn.")] = None,
    selection: Annotated[SelectionChoice, typer.Option(help="leave-one-domain-out: DomainBed's model selection: "
                         "training-domain, leave-one-domain-out, oracle (test-domain labels) or all.")] = "training-domain",
    holdout_fraction: Annotated[float, typer.Option(help="leave-one-domain-out: each domain's out part, per class and seed "
                                "(DomainBed's holdout_fraction), when the cache has no split column.")] = 0.2,
    seeds: Annotated[int, typer.Option(help="Seeds 0..N-1: what methods draw (sampling, joint training, a search's --selection-rows sample), and the split with --shots, --imbalance or under leave-one-domain-out; mean ± std over them.")] = 5,
    test_fraction: Annotated[float, typer.Option(help="Held-out test rows of the training domains (by a hash of the row id, the same for every seed and stage) when the cache has no split column.")] = 0.2,
    val_fraction: Annotated[float, typer.Option(help="Validation part of the training rows (selects weight decay and epoch), by a hash of the row id: the same for every seed and stage, never trained on by vlaug train-box heads.")] = 0.2,
    shots: Annotated[Optional[str], typer.Option(help="K training images per class (few-shot); a list (1,2,4,8,16) runs "
                     "the sweep in one report, the same seeds drawing nested sets.")] = None,
    val_shots: Annotated[Optional[str], typer.Option(help="With --shots: validation images per class (default min(K, 4)), "
                         "or 'all' (every held-out validation row; the report says so).")] = None,
    imbalance: Annotated[Optional[str], typer.Option(help="X:N: X % of the classes reduced to N training images.")] = None,
    reweight: Annotated[ReweightChoice, typer.Option(help="Probe reweighting: none, groupdro, seed-category (pattern imbalance).")] = "none",
    class_weight: Annotated[bool, typer.Option("--class-weight/--no-class-weight", help="Weight rows by inverse class frequency.")] = False,
    grid_size: Annotated[int, typer.Option(help="Weight-decay values, log-spaced from 1e-1 to 1e-6.")] = 8,
    max_iter: Annotated[int, typer.Option(help="L-BFGS iterations per fit (each weight decay is fitted to convergence or this).")] = 200,
    selection_rows: Annotated[int, typer.Option(help="Above this many training rows, select the weight decay on a seeded "
                              "sample of this many rows, then refit once on every row (0: never).")] = 25_000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    memory_budget: Annotated[str, typer.Option(help="Stream the cache from disk when its embeddings need more memory than this "
                             "(auto: a quarter of the RAM; or e.g. 1.5G). Streamed, every L-BFGS step reads the cache.")] = "auto",
    heads: Annotated[Optional[Path], typer.Option("--heads", help="A folder of head folders (e.g. heads/box, heads/lads "
                     "from vlaug train-box --out heads/KIND): -m all, and a method that needs a head given without :DIR, "
                     "take theirs from it.")] = None,
    tsne: Annotated[bool, typer.Option("--tsne", help="t-SNE instead of PCA for the embedding plot.")] = False,
    allow_incomplete: Annotated[bool, typer.Option("--allow-incomplete", help="Probe a cache whose embed run was interrupted (refused otherwise); the report says so.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report folder.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
):
    """Zero-shot, linear and augmented probes side by side on identical splits and seeds; report + plots."""
    from vlaug.report import PlotWorker, format_table, write_report

    # another process imports matplotlib while this one imports torch, and draws while it fits
    plots = PlotWorker()
    try:
        from vlaug.evaluate import ProbeRunConfig, run_probe

        config = ProbeRunConfig(
            features=str(features), out=str(out), methods=tuple(method), train_domains=tuple(train_domain or ()), seeds=seeds,
            test_fraction=test_fraction, val_fraction=val_fraction, shots=_shots(shots), val_shots=_val_shots(val_shots), imbalance=imbalance, reweight=_value(reweight),
            grid_size=grid_size, max_iter=max_iter, selection_rows=selection_rows, class_weight=class_weight, device=device, tsne=tsne,
            overwrite=overwrite, memory_budget=memory_budget, allow_incomplete=allow_incomplete, progress=progress, heads=str(heads or ""),
            protocol=_value(protocol), test_domains=tuple(test_domain or ()), selection=_value(selection),
            holdout_fraction=holdout_fraction,
        )
        report = write_report(out, run_probe(config, plots=plots), tsne=tsne, plots=plots)
    finally:
        plots.close()
    typer.echo(format_table(report))
    saved = "plots and probes" if report["probe_dirs"] else "plots"
    typer.echo(f"report: {out / 'report.md'}, {out / 'report.json'}; {saved} in {out}/")


@app.command(cls=_Command)
@_errors_to_exit
def predict(
    features: Annotated[Path, typer.Argument(metavar="FEATURES", help="Feature cache to classify (same model as the probe; labels not needed).")],
    probe: Annotated[Path, typer.Option("--probe", help="A probe folder: REPORT_DIR/probes/METHOD.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Parquet file to write: id, path, label, class_name, probabilities.")],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
):
    """Classify a cache with a probe saved by vlaug probe."""
    from vlaug.evaluate import predict as run_predict

    result = run_predict(str(features), str(probe), str(out), overwrite=overwrite, device=device)
    acc = result["accuracy_against_cache_labels"]
    typer.echo(f"predicted {result['n']} rows -> {result['out']}"
               + (f" (agreement with the cache's labels: {100 * acc:.1f} %)" if acc is not None else " (the cache has no labels)"))
    if result["class_order"] == "mapped by name":
        typer.echo("note: the cache lists the probe's classes in another order; they were mapped by name "
                   "(labels and probabilities follow the cache's class order)")


@app.command(cls=_Command)
@_errors_to_exit
def generate(
    source: Annotated[Path, typer.Argument(metavar="SOURCE", help="The images to move between domains: what vlaug embed reads (a domain/class folder or a manifest with domains).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the generated images and their manifest (vlaug embed GEN_DIR reads it); a rerun resumes it.")],
    model: Annotated[str, typer.Option(help="A diffusers model id or a local diffusers folder: Stable Diffusion (img2img) for --variant prompt, an image-variation model for --variant image.")],
    variant: Annotated[str, typer.Option(help="prompt: CDGA-PG (img2img with 'a {domain} of a {class}.'); image: CDGA-IG (conditioned on a mix of the source's and a target-domain image's CLIP embeddings).")] = "prompt",
    layout: Annotated[Layout, typer.Option(help="Source layout, as vlaug embed.")] = Layout.auto,
    classes: Annotated[Optional[Path], typer.Option("--classes", help="Text file, one class per line: the class order.")] = None,
    train_domain: Annotated[Optional[List[str]], typer.Option("--train-domain", help="A domain whose images are moved (and a target); repeatable. Default: every domain.")] = None,
    target_domain: Annotated[Optional[List[str]], typer.Option("--target-domain", help="A domain to move them towards; repeatable. Default: the training domains. With --variant prompt a domain may be named by text only.")] = None,
    per_image: Annotated[int, typer.Option(help="Images per source image and target domain.")] = 1,
    strength: Annotated[float, typer.Option(help="Prompt-guided: how far from the source image (1: pure noise).")] = 0.75,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 50,
    mix: Annotated[float, typer.Option(help="Image-guided: λ of (1 − λ)·e_source + λ·e_guide.")] = 0.5,
    prompt: Annotated[str, typer.Option(help="Prompt-guided: the template, with {domain} and {class}.")] = "a {domain} of a {class}.",
    size: Annotated[int, typer.Option(help="Side of the generated images in pixels (a multiple of 8).")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the run (each image's seed comes from it, its source image and target).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per pipeline call.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    limit: Annotated[int, typer.Option(help="At most this many source images (0: all): to try a model first.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
):
    """CDGA: generate images that move each training image towards the other domains (latent diffusion; resumable)."""
    from vlaug.generate import GenerateConfig, generate as run

    config = GenerateConfig(
        source=str(source), out=str(out), model=model, variant=variant, layout=_value(layout),
        classes_file=str(classes) if classes else None, train_domains=tuple(train_domain or ()),
        target_domains=tuple(target_domain or ()), per_image=per_image, strength=strength, guidance_scale=guidance_scale,
        steps=steps, mix=mix, prompt=prompt, seed=seed, batch_size=batch_size, size=size, device=device, limit=limit,
        progress=progress,
    )
    summary = run(config)
    per = summary["seconds_per_image"]
    typer.echo(f"generated {summary['generated']} images ({summary['in_manifest']} of {summary['planned']} planned are in "
               f"{out / 'generated.parquet'}" + (f"; {per:.2f} s per image" if per is not None else "")
               + f"); embed them with: vlaug embed {out} --out FEATURES_GEN (same --model as the main cache)")


@app.command(cls=_Command)
@_errors_to_exit
def info(path: Annotated[Path, typer.Argument(metavar="PATH", help="A feature cache folder or a head folder.")]):
    """Describe a feature cache (counts, prompt sets, failures) or a trained head (config, selected epoch, box ranking)."""
    from vlaug.checkpoint import is_head, read_head_config, read_head_stats
    from vlaug.report import format_cache_info, format_head_info

    from vlaug.cache import cache_info, is_cache
    from vlaug.errors import UsageError

    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist. Pass a feature cache folder (vlaug embed) or a head folder (vlaug train-box).")
    if is_head(path):
        typer.echo(format_head_info(str(path), read_head_config(path), read_head_stats(path)))
        return
    if not is_cache(path):
        raise UsageError(f"{str(path)!r} is not a vlaug feature cache (no manifest.json) nor a head (no config.json and "
                         "model.safetensors). Pass a folder written by vlaug embed, train-box or probe.")

    typer.echo(format_cache_info(cache_info(path)))


@app.command(cls=_Command)
@_errors_to_exit
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's outputs.")] = Path("vlaug-demo"),
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
):
    """Run the pipeline (embed, train-box, probe) on the bundled images with a tiny random-weight model, then probe simulated CLIP-like embeddings with domain shift (offline, about a minute)."""
    from vlaug.cache import cache_info
    from vlaug.demo import SEEDS, against_linear, real_weights_commands, run_demo
    from vlaug.simulate import TARGET_DOMAINS, TRAIN_DOMAIN
    from vlaug.report import format_cache_info

    result = run_demo(out, progress=progress)
    typer.echo(result.embed.summary())
    typer.echo(format_cache_info(cache_info(result.embed.out)))
    for head in result.heads:
        typer.echo(head.summary())
    from vlaug.report import format_table

    typer.echo(f"\n1. The pipeline on the bundled images: top-1 accuracy (%), trained on photo, {SEEDS} seeds "
               f"(report in {result.report_dir}/).\n   The demo model has RANDOM weights: these accuracies sit at "
               "chance; they show that embed -> train-box -> probe run.")
    typer.echo(format_table(result.report))
    for head in result.simulated_heads:
        typer.echo(head.summary())
    typer.echo(f"\n2. SIMULATED embeddings, not images: top-1 accuracy (%) on vlaug's CLIP-like space with domain shift "
               f"(vlaug.simulate), trained on {TRAIN_DOMAIN},\n   tested on {TRAIN_DOMAIN} (in domain) and "
               f"{', '.join(TARGET_DOMAINS)} (out of domain), {SEEDS} seeds (report and tradeoff.png in "
               f"{result.simulated_dir}/).")
    typer.echo(format_table(result.simulated_report))
    typer.echo(
        "\n" + against_linear(result.simulated_report) + "\nSimulated numbers show what each method trades; "
        "on your data they will differ: run the same comparison on real embeddings.\n"
        "With real CLIP / CoCa weights (downloaded by open_clip on first use):\n"
        + real_weights_commands(result.data, "features")
    )


def main() -> None:
    """Run the command, then exit without the interpreter's teardown once its output is
    written (see :func:`_exit`). A character the terminal's encoding lacks (a dash, ±, in a
    Latin-1 locale) is printed as a replacement, not a crash after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        app(prog_name="vlaug")
    except SystemExit as e:  # how click ends every command, with its exit code
        _exit(e.code)
    _exit(0)


def _exit(code) -> None:
    """Exit with ``code`` (as ``sys.exit``) without tearing the interpreter down: freeing
    torch's, pyarrow's and matplotlib's modules object by object is a noticeable part of a
    small ``vlaug probe`` (docs/benchmarks.md). Everything the command wrote is closed by then; exit
    handlers still run and the standard streams are flushed. Where a thread that is not a
    daemon still runs, the ordinary exit waits for it."""
    import atexit
    import os
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
        pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
