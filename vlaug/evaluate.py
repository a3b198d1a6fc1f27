"""Stage 3: methods × seeds on identical splits -> results (``vlaug probe``).

Method specs are ``NAME[:HEAD_DIR][?key=value&key=value]``, e.g. ``linear``,
``box:runs/box1?n_aug=40&ensemble=0.7``, ``gaussian?sigma=0.2``. Every probe trains on the
same train rows, selects its weight decay on the same validation rows and is tested on
the same test rows for a given seed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import parse_qsl

import numpy as np
import torch
import torch.nn.functional as F

from vlaug import __version__, augment, metrics
from vlaug import cache as cache_io
from vlaug import checkpoint
from vlaug.cache import CLASSES_PROMPT_SET
from vlaug.devices import resolve_device
from vlaug.errors import UsageError
from vlaug.heads.batchformer import BatchFormer, BatchFormerConfig, batchformer_loss
from vlaug.heads.latentdr import LatentDR, LatentDRConfig, latentdr_loss
from vlaug.probe import (
    REWEIGHTS,
    LinearProbe,
    ProbeConfig,
    Rows,
    as_labels,
    fit_probe,
    fit_reweighted,
    select_weight_decay,
    weight_decay_grid,
)
from vlaug.protocols import Splits, check_domains, make_splits, parse_imbalance

ZERO_SHOT_TEMPERATURE = 0.01  # CLIP's logit scale of 100
# method -> (head kinds it needs, or None) and its options with defaults
METHODS: dict[str, tuple[tuple[str, ...] | None, dict]] = {
    "zero-shot": (None, {}),
    "linear": (None, {"ensemble": 0.0}),
    "linear-zs": (None, {"ensemble": 0.0, "wise": 0.5}),
    "box": (("box",), {"ensemble": 0.0, "n_aug": 5}),
    "dr": (("dr-sa", "dr-pool"), {"ensemble": 0.0, "n_aug": 1}),
    "lads": (("lads",), {"ensemble": 0.0}),
    "gaussian": (None, {"ensemble": 0.0, "n_aug": 1, "sigma": 0.1}),
    "mixup": (None, {"ensemble": 0.0, "n_aug": 1, "alpha": 0.2}),
    "xdomain-mix": (None, {"ensemble": 0.0, "n_aug": 1}),
    "batchformer": (None, {"ensemble": 0.0, "epochs": 100}),
    "latentdr-sa": (None, {"ensemble": 0.0, "epochs": 100}),
    "latentdr-pool": (None, {"ensemble": 0.0, "epochs": 100}),
}
JOINT = ("batchformer", "latentdr-sa", "latentdr-pool")
AUGMENTING = ("box", "dr", "lads", "gaussian", "mixup", "xdomain-mix")  # originals + extra rows
# methods that need every training row at once (pairs across the whole training set, or
# minibatch training) and so refuse a streamed cache (as does --reweight)
NOT_STREAMED = JOINT + ("mixup", "xdomain-mix")
GEOMETRY_ROWS = 20_000  # training rows (a seeded sample) behind the feature geometry and plots


@dataclass(frozen=True)
class MethodSpec:
    text: str  # as the user wrote it: the method's name in reports
    name: str
    head: str = ""  # head directory for box / dr / lads
    options: dict = field(default_factory=dict)  # every option, defaults filled in


def parse_method(text: str) -> MethodSpec:
    """Parse ``NAME[:HEAD_DIR][?k=v&...]``; unknown names and options are UsageErrors."""
    body, _, query = text.partition("?")
    name, _, head = body.partition(":")
    if name not in METHODS:
        raise UsageError(f"--method {text!r}: unknown method {name!r}; known: {', '.join(METHODS)}.")
    kinds, defaults = METHODS[name]
    if kinds and not head:
        raise UsageError(f"--method {text!r}: {name} needs a head folder, e.g. {name}:runs/{name}1 (from vlaug train-box).")
    if head and not kinds:
        raise UsageError(f"--method {text!r}: {name} takes no head folder.")
    options = dict(defaults)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in defaults:
            raise UsageError(f"--method {text!r}: unknown option {key!r} for {name}; it takes {sorted(defaults) or 'none'}.")
        try:
            options[key] = type(defaults[key])(value)
        except ValueError:
            raise UsageError(f"--method {text!r}: option {key}={value!r} must be a {type(defaults[key]).__name__}.") from None
    for key in ("ensemble", "wise"):
        if key in options and not 0.0 <= options[key] <= 1.0:
            raise UsageError(f"--method {text!r}: {key} == {options[key]}, must be in [0, 1].")
    for key in ("n_aug", "epochs"):
        if key in options and options[key] < 1:
            raise UsageError(f"--method {text!r}: {key} == {options[key]}, must be >= 1.")
    return MethodSpec(text, name, head, options)


@dataclass(frozen=True)
class ProbeRunConfig:
    """Everything ``vlaug probe`` needs; the defaults are the CLI's."""

    features: str = ""
    out: str = ""
    methods: tuple[str, ...] = ("zero-shot", "linear")
    train_domains: tuple[str, ...] = ()
    seeds: int = 5  # seeds 0..seeds-1: splits, augmentation sampling, joint training
    test_fraction: float = 0.2  # held-out part of the training domains when the cache has no split
    val_fraction: float = 0.2  # validation part of the training rows
    shots: int | None = None  # K training rows per class
    imbalance: str | None = None  # "X:N": X % of classes reduced to N training rows
    reweight: str = "none"  # none | groupdro | seed-category
    grid_size: int = 8  # log-spaced weight-decay grid from 1e-1 to 1e-6
    max_iter: int = 200  # L-BFGS iterations per fit
    class_weight: bool = False  # weight rows by inverse class frequency
    device: str = "auto"
    memory_budget: str = "auto"  # stream the cache from disk when it needs more memory (auto: RAM / 4)
    tsne: bool = False  # t-SNE instead of PCA for the embedding plot
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.seeds < 1:
            raise UsageError(f"--seeds {self.seeds}, must be >= 1.")
        if not 0.0 < self.test_fraction < 1.0 or not 0.0 < self.val_fraction < 1.0:
            raise UsageError(f"--test-fraction {self.test_fraction} and --val-fraction {self.val_fraction} must be in (0, 1).")
        if self.shots is not None and self.shots < 1:
            raise UsageError(f"--shots {self.shots}, must be >= 1.")
        if self.reweight not in REWEIGHTS:
            raise UsageError(f"--reweight {self.reweight!r}, must be one of {REWEIGHTS}.")
        if not self.methods:
            raise UsageError("give at least one --method.")
        if self.grid_size < 1 or self.max_iter < 10:
            raise UsageError(f"--grid-size {self.grid_size} must be >= 1 and --max-iter {self.max_iter} >= 10.")
        cache_io.parse_memory_budget(self.memory_budget)


@dataclass
class _Context:
    """What every method of a run shares."""

    feats: cache_io.FeatureCache  # without embeddings when streamed
    x: torch.Tensor | None  # (n, d) on the device; None: streamed from disk
    y: torch.Tensor  # (n,)
    dom: torch.Tensor  # (n,) domain index
    text: torch.Tensor  # (C, d) class prompt ensemble
    heads: dict  # head path -> Checkpoint
    config: ProbeRunConfig
    device: torch.device
    chunk_rows: int = 65536  # rows read from disk at a time when streamed
    passes: int = 0  # reads of the cache from disk so far (streamed)

    @property
    def n_classes(self) -> int:
        return len(self.feats.classes)

    def stream(self, rows: np.ndarray) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """The embeddings of ``rows`` as ``(positions in rows, (m, d) tensor)`` blocks: one
        block in memory, one per chunk read from disk when streamed (in cache order)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.x is not None:
            yield np.arange(len(rows)), self.x[torch.as_tensor(rows, device=self.device)]
            return
        self.passes += 1
        chunks = cache_io.iter_embeddings(self.config.features, self.chunk_rows)
        for pos, emb in cache_io.take_rows(chunks, rows):
            yield pos, torch.as_tensor(emb, device=self.device)

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """The embeddings of ``rows`` in their order, in memory (for samples of rows)."""
        out = torch.empty((len(rows), self.feats.manifest.embed_dim), device=self.device)
        for pos, x in self.stream(rows):
            out[torch.as_tensor(pos, device=self.device)] = x
        return out


def _augment(spec: MethodSpec, ctx: _Context, x: torch.Tensor, y: torch.Tensor, dom: torch.Tensor, gen: torch.Generator):
    """The extra training rows (x, soft targets) an augmenting method adds to rows ``x`` (None: no extras)."""
    if spec.name not in AUGMENTING:
        return None
    t = F.one_hot(y, ctx.n_classes).float()
    o = spec.options
    if spec.name == "box":
        return augment.box_samples(ctx.heads[spec.head].module.to(ctx.device), x, t, o["n_aug"], gen)
    if spec.name == "dr":
        module = ctx.heads[spec.head].module.to(ctx.device)
        with torch.random.fork_rng(devices=[]):  # dropout draws from the global generator
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
            return augment.dr_samples(module, x, y, o["n_aug"], generator=gen)
    if spec.name == "lads":
        return augment.lads_samples(ctx.heads[spec.head].module.to(ctx.device), x, t)
    if spec.name == "gaussian":
        return augment.gaussian_noise(x, t, o["n_aug"], o["sigma"], gen)
    if spec.name == "mixup":
        return augment.latent_mixup(x, t, o["n_aug"], o["alpha"], gen)
    if spec.name == "xdomain-mix":
        return augment.cross_domain_mix(x, t, y, dom, o["n_aug"], gen)
    return None


def _blocks(spec: MethodSpec, ctx: _Context, rows: np.ndarray, seed: int):
    """Training rows ``rows`` block by block with the method's extras: ``(x, labels, extra)``,
    ``extra`` = (x, soft targets) or None. Block k draws its augmentations from its own
    generator (seeded by (seed, k)), so every pass over a streamed cache sees the same rows."""
    for k, (pos, x) in enumerate(ctx.stream(rows)):
        r = torch.as_tensor(rows[pos], device=ctx.device)
        yield x, ctx.y[r], _augment(spec, ctx, x, ctx.y[r], ctx.dom[r], _block_generator(seed, k))


def _block_generator(seed: int, block: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, block]).generate_state(1)[0]))


def _training_rows(spec: MethodSpec, ctx: _Context, rows: np.ndarray, seed: int) -> Rows:
    """The probe's training set: ``rows`` plus the method's extras, each weighing 1/N (or,
    with --class-weight, inversely to its class's count, normalised to sum 1). In memory the
    set is built once; streamed, it is rebuilt (same seeds, same rows) on every pass."""

    def unweighted():
        for x, y, extra in _blocks(spec, ctx, rows, seed):
            yield x, y
            if extra is not None:
                yield extra[0], as_labels(extra[1])

    def hard(t):
        return t if t.dim() == 1 else t.argmax(1)

    c = ctx.n_classes
    if ctx.x is not None:
        data = list(unweighted())
        unweighted = lambda: data  # noqa: E731
    if spec.name not in AUGMENTING:
        counts = torch.bincount(ctx.y[torch.as_tensor(rows, device=ctx.device)], minlength=c).float()
    else:  # labels of the extras: one more pass when streamed
        counts = sum((torch.bincount(hard(t), minlength=c).float() for _, t in unweighted()),
                     torch.zeros(c, device=ctx.device))
    n = int(counts.sum())
    if ctx.config.class_weight:
        per_class = 1.0 / (counts.clamp(min=1) * int((counts > 0).sum()))
    else:
        per_class = torch.full((c,), 1.0 / max(1, n), device=ctx.device)

    def blocks():
        for x, t in unweighted():
            yield x, t, per_class[hard(t)]

    return Rows(blocks, ctx.feats.manifest.embed_dim, c, n, ctx.device)


def _labelled_rows(ctx: _Context, rows: np.ndarray) -> Rows:
    """Rows with their labels (validation rows: the probe's accuracy is read off them);
    built once in memory, read again on every pass when streamed."""

    def blocks():
        for pos, x in ctx.stream(rows):
            yield x, ctx.y[torch.as_tensor(rows[pos], device=ctx.device)], None

    if ctx.x is not None:
        data = list(blocks())
        blocks = lambda: data  # noqa: E731
    return Rows(blocks, ctx.feats.manifest.embed_dim, ctx.n_classes, len(rows), ctx.device)


def _materialize(rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, soft targets, hard labels) of in-memory rows, concatenated."""
    xs, ts = [], []
    for x, t, _ in rows.blocks():
        xs.append(x)
        ts.append(F.one_hot(t, rows.n_classes).float() if t.dim() == 1 else t)
    t = torch.cat(ts)
    return torch.cat(xs), t, t.argmax(1)


def _make_probe(ctx: _Context, W: torch.Tensor, b: torch.Tensor, ensemble: float) -> LinearProbe:
    probe = LinearProbe(ProbeConfig(ctx.feats.manifest.embed_dim, ctx.n_classes, ensemble, ZERO_SHOT_TEMPERATURE))
    with torch.no_grad():
        probe.linear.weight.copy_(W.T.cpu())
        probe.linear.bias.copy_(b.cpu())
        probe.text.copy_(ctx.text.cpu())
    return probe.to(ctx.device).eval()


def _fit_joint(spec, ctx, train_rows, val_rows, seed, epochs=None):
    """Joint training (the LatentDR paper's setting, BatchFormer): heads and classifier together."""
    from vlaug.train import fit

    d, c = ctx.feats.manifest.embed_dim, ctx.n_classes
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(seed)
        if spec.name == "batchformer":
            module = BatchFormer(BatchFormerConfig(embed_dim=d, n_classes=max(2, c))).to(ctx.device)
            loss = lambda m, x, y: batchformer_loss(m(x), y)  # noqa: E731
        else:
            module = LatentDR(LatentDRConfig(embed_dim=d, n_classes=max(2, c), kind=spec.name.split("-")[1])).to(ctx.device)
            loss = lambda m, x, y: latentdr_loss(m(x, y), y)  # noqa: E731
        history, selected = fit(module, loss, ctx.x[train_rows], ctx.y[train_rows], ctx.x[val_rows], ctx.y[val_rows],
                                epochs or spec.options["epochs"], 256, 1e-3, 0.01, torch.Generator().manual_seed(seed),
                                val_seed=seed)
    W = module.classifier.weight.detach().T * module.input_scale
    b = module.classifier.bias.detach()
    return W[:, :c], b[:c], {"selected_epoch": selected, "epochs": len(history), "optimizer": "AdamW", "lr": 1e-3,
                             "weight_decay": 0.01, "batch_size": 256}


def fit_method(spec: MethodSpec, ctx: _Context, splits: Splits, seed: int, refit: bool = False):
    """Train one method's probe on ``splits.train`` (selection on ``splits.val``).

    With ``refit``, train on train + val at the hyperparameters chosen without it
    (passed in ``spec.options['_chosen']``) - the probe that is saved for ``vlaug predict``.

    Returns:
        (probe, info).
    """
    dev = ctx.device
    train, val = np.asarray(splits.train), np.asarray(splits.val)
    if refit:
        train, val = np.concatenate([train, val]), val[:0]
    ensemble = spec.options.get("ensemble", 0.0)
    if spec.name == "zero-shot":
        W = ctx.text.T / ZERO_SHOT_TEMPERATURE
        return _make_probe(ctx, W, torch.zeros(ctx.n_classes, device=dev), 0.0), {}
    if spec.name in JOINT:
        epochs = spec.options["_chosen"]["selected_epoch"] if refit else None
        W, b, info = _fit_joint(spec, ctx, torch.as_tensor(train, device=dev), torch.as_tensor(val, device=dev), seed, epochs)
        return _make_probe(ctx, W, b, ensemble), info

    data = _training_rows(spec, ctx, train, seed)
    cfg = ctx.config
    init, anchor = None, None
    if spec.name == "linear-zs":  # start from (and regularise towards) the zero-shot classifier
        anchor = ctx.text.T / ZERO_SHOT_TEMPERATURE
        init = (anchor, torch.zeros(ctx.n_classes, device=dev))
    if refit:
        chosen = spec.options["_chosen"]
        wd = chosen["weight_decay"]
        W, b, _ = fit_probe(data, wd, cfg.max_iter, init=init, regularize_towards=anchor)
        info = dict(chosen)
    else:
        best, search = select_weight_decay(data, _labelled_rows(ctx, val), weight_decay_grid(cfg.grid_size),
                                           cfg.max_iter, init, anchor)
        W, b, wd = best["W"], best["b"], best["weight_decay"]
        info = {"weight_decay": wd, "iterations": best["iterations"], "val_accuracy": best["val_accuracy"],
                "search": search}
    if cfg.reweight != "none":  # in memory only (prepare refuses it for a streamed cache)
        x, t, hard = _materialize(data)
        dom = ctx.dom[torch.as_tensor(train, device=dev)] if spec.name not in AUGMENTING else None
        W, b, rw = fit_reweighted(x, t, hard, wd, cfg.reweight, dom)
        info["reweight"] = {"scheme": cfg.reweight, "eta": 0.01, "t0": 10, "rounds": 10, **rw}
    if spec.name == "linear-zs":
        lam = spec.options["wise"]
        W = (1 - lam) * anchor + lam * W
        b = lam * b
    info["n_train_rows"] = data.n_rows
    return _make_probe(ctx, W, b, ensemble), info


def _predict(probe: LinearProbe, ctx: _Context, rows: np.ndarray) -> torch.Tensor:
    pred = torch.empty(len(rows), dtype=torch.long, device=ctx.device)
    for pos, x in ctx.stream(rows):
        pred[torch.as_tensor(pos, device=ctx.device)] = probe.predict_proba(x).argmax(1)
    return pred


def _evaluate(probe: LinearProbe, ctx: _Context, splits: Splits) -> dict:
    """Accuracies of a probe on one seed's test rows (fractions)."""
    test = torch.as_tensor(splits.test, device=ctx.device)
    pred = _predict(probe, ctx, np.asarray(splits.test))
    y = ctx.y[test]
    n_in = len(splits.test_in)
    per_domain = {}
    names = ctx.feats.domains[splits.test]
    for d in np.unique(names).tolist():
        mask = torch.as_tensor(names == d, device=ctx.device)
        per_domain[d or "(none)"] = metrics.accuracy(pred[mask], y[mask])
    row = {
        "in_domain": metrics.accuracy(pred[:n_in], y[:n_in]),
        "out_of_domain": metrics.accuracy(pred[n_in:], y[n_in:]),
        "extended": metrics.accuracy(pred, y),
        "balanced_accuracy": metrics.balanced_accuracy(pred, y),
        "per_domain": per_domain,
    }
    if splits.reduced_classes:
        reduced = torch.isin(y, torch.as_tensor(splits.reduced_classes, device=ctx.device))
        row["reduced_classes"] = metrics.accuracy(pred[reduced], y[reduced])
        row["other_classes"] = metrics.accuracy(pred[~reduced], y[~reduced])
    return row


def _geometry_rows(splits: Splits, seed: int) -> np.ndarray:
    """The training rows behind the feature geometry and plots: all of them, or a seeded
    sample of GEOMETRY_ROWS (in cache order)."""
    rows = np.asarray(splits.train)
    if len(rows) > GEOMETRY_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, GEOMETRY_ROWS, replace=False))
    return rows


def _augmented_sample(spec: MethodSpec, ctx: _Context, x: torch.Tensor, rows: np.ndarray, seed: int):
    """(x + the method's extras, their hard labels) for the sampled rows ``rows`` whose
    embeddings ``x`` are already in memory (one block, drawn like block 0 of a fit)."""
    r = torch.as_tensor(rows, device=ctx.device)
    extra = _augment(spec, ctx, x, ctx.y[r], ctx.dom[r], _block_generator(seed, 0))
    if extra is None:
        return x, ctx.y[r]
    return torch.cat([x, extra[0]]), torch.cat([ctx.y[r], extra[1].argmax(1)])


def _feature_geometry(x_orig, y_orig, x_all, y_all, seed) -> dict:
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    return {
        "alignment": metrics.alignment(x_orig, y_orig, generator=g()),
        "uniformity": metrics.uniformity(x_orig, generator=g()),
        "alignment_augmented": metrics.alignment(x_all, y_all, generator=g()),
        "uniformity_augmented": metrics.uniformity(x_all, generator=g()),
    }


KEYS = ("in_domain", "out_of_domain", "extended", "balanced_accuracy")


def summarise(results: list[dict], specs: list[MethodSpec]) -> list[dict]:
    """Mean and std (population, over seeds) of each accuracy, per method."""
    summary = []
    for spec in specs:
        rows = [r for r in results if r["method"] == spec.text]
        entry = {"method": spec.text, "n_seeds": len(rows)}
        for key in KEYS + ("reduced_classes", "other_classes"):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                entry[key] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
            elif key in KEYS:
                entry[key] = {"mean": None, "std": None}
        domains = sorted({d for r in rows for d in r["per_domain"]})
        entry["per_domain"] = {
            d: {"mean": float(np.mean(v)), "std": float(np.std(v))}
            for d in domains
            if (v := [r["per_domain"][d] for r in rows if r["per_domain"].get(d) is not None])
        }
        summary.append(entry)
    return summary


def prepare(config: ProbeRunConfig) -> tuple[list[MethodSpec], _Context, tuple | None]:
    """Check everything before any work: methods, heads against the cache, domains, protocol."""
    specs = [parse_method(m) for m in config.methods]
    texts = [s.text for s in specs]
    if len(set(texts)) != len(texts):
        raise UsageError(f"--method given twice: {sorted({t for t in texts if texts.count(t) > 1})}.")
    imbalance = parse_imbalance(config.imbalance)
    out = Path(config.out)
    if not config.out:
        raise UsageError("--out is required: the folder to write the report to.")
    if out.exists() and not config.overwrite:
        raise UsageError(f"--out {str(out)!r} already exists. Pass --overwrite to replace it, or choose another folder.")
    if out.exists() and not (out / "report.json").is_file():
        raise UsageError(f"--out {str(out)!r} exists and is not a vlaug report; refusing to replace it.")
    budget = cache_io.parse_memory_budget(config.memory_budget)
    manifest = cache_io.read_manifest(config.features)
    streamed = not cache_io.fits_in_memory(manifest, budget)
    if streamed:
        need = f"{cache_io.in_memory_bytes(manifest) / 2**30:.2f} GiB"
        for spec in specs:
            if spec.name in NOT_STREAMED:
                raise UsageError(f"--method {spec.text!r} needs the whole cache in memory (about {need}, more than "
                                 f"--memory-budget {config.memory_budget}); raise --memory-budget or leave this method out.")
        if config.reweight != "none":
            raise UsageError(f"--reweight {config.reweight} needs the whole cache in memory (about {need}, more than "
                             f"--memory-budget {config.memory_budget}); raise --memory-budget or use --reweight none.")
    feats = cache_io.read_metadata(config.features) if streamed else cache_io.read_cache(config.features)
    if CLASSES_PROMPT_SET not in feats.texts:
        raise UsageError(f"cache {config.features!r} has no class prompts (texts.parquet); re-run vlaug embed.")
    domain_names, domain_index = np.unique(feats.domains, return_inverse=True)  # sorted names, index per row
    all_domains = [d for d in domain_names.tolist() if d]
    train_domains = check_domains(config.train_domains, all_domains)
    heads = {}
    for spec in specs:
        if spec.head and spec.head not in heads:
            ckpt = checkpoint.load_head(spec.head)
            kinds = METHODS[spec.name][0]
            if ckpt.kind not in kinds:
                raise UsageError(f"--method {spec.text!r}: {spec.head!r} is a {ckpt.kind} head; {spec.name} needs {' or '.join(kinds)}.")
            checkpoint.check_head_matches_cache(ckpt.cache, feats.manifest, spec.head, config.features)
            heads[spec.head] = ckpt
    device = resolve_device(config.device)
    # streamed, a block of rows grows by its extras: n_aug per row (dr: a degraded and a
    # restored row per row and pass; lads: one per target domain, at most 8 assumed)
    expansion = max(1 + s.options.get("n_aug", 0) * (2 if s.name == "dr" else 1) + 8 * (s.name == "lads") for s in specs)
    chunk_rows = cache_io.chunk_rows(budget, manifest.embed_dim, expansion)
    ctx = _Context(
        feats=feats,
        x=None if streamed else torch.as_tensor(feats.embeddings, device=device),
        y=torch.as_tensor(feats.labels, device=device),
        dom=torch.as_tensor(domain_index.reshape(-1), device=device, dtype=torch.long),
        text=torch.as_tensor(feats.texts[CLASSES_PROMPT_SET], device=device),
        heads=heads, config=config, device=device, chunk_rows=chunk_rows,
    )

    # the protocol of every seed, checked now so that a bad --shots fails before any training
    splits = [make_splits(feats.labels, feats.domains, feats.splits, train_domains if config.train_domains else [],
                          seed, config.test_fraction, config.val_fraction, config.shots, imbalance, feats.classes)
              for seed in range(config.seeds)]
    for seed, s in enumerate(splits):
        if not len(s.train) or not len(s.val):
            raise UsageError(f"seed {seed}: {s.sizes()} rows; the protocol leaves no training or validation rows.")
    return specs, ctx, (train_domains, splits, imbalance)


def run_probe(config: ProbeRunConfig, log: Callable[[str], None] | None = None) -> dict:
    """Evaluate every method on every seed; return the report (written by :func:`vlaug.report.write_report`).

    Raises:
        UsageError / CacheMismatchError / CheckpointError: bad input, found before training.
    """
    from tqdm.auto import tqdm

    log = log or (lambda msg: print(msg, file=sys.stderr))
    specs, ctx, (train_domains, all_splits, imbalance) = prepare(config)
    m = ctx.feats.manifest
    if ctx.x is None:
        log(f"streaming {m.n_images} rows from disk, {ctx.chunk_rows} at a time: in memory they would need about "
            f"{cache_io.in_memory_bytes(m) / 2**30:.2f} GiB, more than --memory-budget {config.memory_budget}; "
            "every evaluation of the probe's objective reads the cache once")
    start = time.perf_counter()
    results, geometry, probes, chosen, projections = [], [], {}, {}, {}
    bar = tqdm(total=config.seeds * len(specs), desc="probe", unit="fit", disable=not config.progress, file=sys.stderr)
    sample = _geometry_rows(all_splits[0], 0)
    x_sample = ctx.gather(sample)  # read once (streamed: one pass), shared by every method's geometry and the plot
    for seed, splits in enumerate(all_splits):
        for spec in specs:
            probe, info = fit_method(spec, ctx, splits, seed)
            row = {"method": spec.text, "seed": seed, **_evaluate(probe, ctx, splits),
                   "selection": {k: v for k, v in info.items() if k != "search"}}
            results.append(row)
            if seed == 0:
                chosen[spec.text] = info
                x_all, y_all = _augmented_sample(spec, ctx, x_sample, sample, seed)
                y = y_all[: len(sample)]
                geometry.append({"method": spec.text, **_feature_geometry(x_sample, y, x_all, y_all, seed)})
                if len(x_all) > len(sample):
                    projections[spec.text] = (x_all.cpu().numpy(), y_all.cpu().numpy(), len(sample))
            bar.update(1)
    bar.close()
    # the probes users keep: first seed, refitted on train + val at the chosen hyperparameters
    for spec in specs:
        info = chosen[spec.text]
        refit_spec = MethodSpec(spec.text, spec.name, spec.head, {**spec.options, "_chosen": {k: v for k, v in info.items() if k != "search"}})
        probe, _ = fit_method(refit_spec, ctx, all_splits[0], 0, refit=True)
        probes[spec.text] = probe.cpu()
    seconds = time.perf_counter() - start
    return {
        "vlaug_version": __version__,
        "features": str(Path(config.features).resolve()),
        "model": m.model,
        "pretrained": m.pretrained,
        "embed_dim": m.embed_dim,
        "classes": m.classes,
        "templates": m.templates,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k not in ("overwrite", "progress")},
        "protocol": {
            "train_domains": train_domains,
            "test_domains": [d for d in np.unique(ctx.feats.domains).tolist() if d and d not in train_domains],
            "uses_cache_splits": bool((ctx.feats.splits != "").any()),
            "seeds": list(range(config.seeds)),
            "splits": [{"seed": i, **s.sizes(), "reduced_classes": [m.classes[c] for c in s.reduced_classes]}
                       for i, s in enumerate(all_splits)],
            "shots": config.shots,
            "imbalance": {"percent_of_classes": imbalance[0], "n_images": imbalance[1]} if imbalance else None,
            "weight_decay_grid": weight_decay_grid(config.grid_size),
            "zero_shot_temperature": ZERO_SHOT_TEMPERATURE,
            "streamed": ctx.x is None,
            "passes_over_cache": ctx.passes,  # reads of the whole cache from disk (streamed)
            "memory_budget_bytes": cache_io.parse_memory_budget(config.memory_budget),
            "geometry_rows": int(len(sample)),
        },
        "methods": [{"method": s.text, "name": s.name, "head": s.head, "options": s.options,
                     "head_config": ctx.heads[s.head].config["head"] if s.head else None,
                     "selection_seed0": dict(chosen[s.text])} for s in specs],
        "results": results,
        "summary": summarise(results, specs),
        "feature_geometry": geometry,
        "seconds": seconds,
        "_probes": probes,  # written under probes/, not into report.json
        "_projections": projections,
        "_first_train": (x_sample.cpu().numpy(), ctx.feats.labels[sample], ctx.feats.domains[sample]),
        "_box_stats": {s.head: checkpoint.read_head_stats(s.head) for s in specs if s.name == "box"},
    }


def predict(features: str, probe_dir: str, out: str, overwrite: bool = False, device: str = "auto") -> dict:
    """Classify every row of a cache with a probe saved by ``vlaug probe``; write a Parquet file.

    Raises:
        CheckpointError: not a probe; CacheMismatchError: the cache was embedded with
            another model, dimension or class list; UsageError: ``out`` exists.
    """
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise UsageError(f"--out {out!r} already exists. Pass --overwrite to replace it.")
    if out_path.is_dir():
        raise UsageError(f"--out {out!r} is a folder; pass a file name such as predictions.parquet.")
    ckpt = checkpoint.load_head(probe_dir)
    if ckpt.kind != "probe":
        raise UsageError(f"--probe {probe_dir!r} is a {ckpt.kind} head, not a probe; use a folder from REPORT_DIR/probes/.")
    feats = cache_io.read_metadata(features)  # the embeddings are streamed: any cache size fits
    checkpoint.check_head_matches_cache(ckpt.cache, feats.manifest, probe_dir, features)
    dev = resolve_device(device)
    probe = ckpt.module.to(dev)
    probs = [probe.predict_proba(torch.as_tensor(emb, device=dev)).cpu() for _, emb in cache_io.iter_embeddings(features)]
    probs = torch.cat(probs) if probs else torch.zeros(0, len(feats.classes))
    pred = probs.argmax(1).numpy()
    cache_io.write_predictions(out_path, cache_io.read_ids(features, feats.manifest), pred, feats.classes, probs.numpy())
    labelled = feats.labels
    return {"out": str(out_path), "n": len(feats), "accuracy_against_cache_labels": float((pred == labelled).mean()) if len(feats) else None}
