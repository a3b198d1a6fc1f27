"""Stage 2: train a head on cached latents (``vlaug train-box``).

The loop (:func:`fit`) is shared by every head: the training rows live on the device as
one tensor, each epoch draws a seeded permutation and slices batches from it (no
DataLoader, no per-sample Python), AdamW steps, then the validation loss picks the
epoch to keep (the lowest, as LADS does).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from vlaug import cache as cache_io
from vlaug import checkpoint
from vlaug.cache import CLASSES_PROMPT_SET, parse_memory_budget
from vlaug.devices import resolve_device
from vlaug.errors import UsageError
from vlaug.heads import (
    BoxConfig,
    BoxHead,
    LADSConfig,
    LADSHead,
    LatentDR,
    LatentDRConfig,
    box_center,
    box_log_volume,
    box_loss,
    domain_directions,
    lads_loss,
    latentdr_loss,
    zero_shot_logits,
)
from vlaug.augment import sample_boxes
from vlaug.protocols import check_domains, stratified_split, training_rows

HEADS = ("box", "dr-sa", "dr-pool", "lads")
# Per-head defaults for the options left at None. box and lads: the papers' settings;
# LatentDR: vlaug's choice (the paper trains end to end with the backbone).
HEAD_DEFAULTS = {
    "box": {"epochs": 100, "batch_size": 512},
    "dr-sa": {"epochs": 100, "batch_size": 256},
    "dr-pool": {"epochs": 100, "batch_size": 256},
    "lads": {"epochs": 50, "batch_size": 256},
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``vlaug train-box`` needs; None means "the head's default"."""

    features: str = ""  # feature cache to train on
    out: str = ""  # head directory to write
    head: str = "box"  # box | dr-sa | dr-pool | lads
    train_domains: tuple[str, ...] = ()  # empty: every domain
    val_fraction: float = 0.2  # stratified part of the training rows that selects the epoch
    epochs: int | None = None  # box 100, dr 100, lads 50
    batch_size: int | None = None  # box 512, dr 256, lads 256
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    seed: int = 0  # initial weights, batch order, validation split, dropout
    device: str = "auto"
    # box and lads
    alpha: float = 0.5  # box: weight of the classification terms; lads: of the domain-alignment term
    temperature: float = 0.01  # zero-shot logits = cos / temperature
    hidden: int | None = None  # box: 2·d; lads: 384
    # LatentDR
    norm: str = "post"  # post | pre
    dr_mode: str = "dr"  # dr | d | r
    degrade: str = "attention"  # attention | gaussian
    heads: int = 4
    dim_head: int = 0  # 0: paper default
    dim_ff: int = 0  # 0: paper default
    dropout: float = 0.5
    noise_std: float = 0.1
    # LADS
    source_prompts: str = ""  # prompt set of the training domain, e.g. photo
    target_prompts: tuple[str, ...] = ()  # prompt sets of the unseen domains
    memory_budget: str = "auto"  # stream the cache from disk when its embeddings need more (auto: RAM / 4)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        parse_memory_budget(self.memory_budget)
        if self.head not in HEADS:
            raise UsageError(f"--head {self.head!r}, must be one of {HEADS}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction {self.val_fraction}, must be in [0, 1).")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} {value}, must be >= 1.")
        if self.lr <= 0 or self.weight_decay < 0:
            raise UsageError(f"--lr {self.lr} must be > 0 and --weight-decay {self.weight_decay} >= 0.")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--alpha {self.alpha}, must be in [0, 1].")
        if self.temperature <= 0:
            raise UsageError(f"--temperature {self.temperature}, must be > 0.")
        if self.head == "lads" and (not self.source_prompts or not self.target_prompts):
            raise UsageError("--head lads needs --source-prompts NAME and --target-prompts NAME[,NAME] (prompt sets of the cache).")

    def resolved(self, name: str):
        value = getattr(self, name)
        return HEAD_DEFAULTS[self.head][name] if value is None else value


@dataclass
class TrainResult:
    out: str
    kind: str
    n_train: int
    n_val: int
    selected_epoch: int
    history: list[dict]
    seconds: float
    stats: dict | None = None

    def summary(self) -> str:
        best = self.history[self.selected_epoch - 1]
        val = f"val loss {best['val_loss']:.4f}" if best["val_loss"] is not None else "no validation rows"
        return (
            f"trained {self.kind} on {self.n_train} rows ({self.n_val} validation) for {len(self.history)} epochs "
            f"in {self.seconds:.1f} s; kept epoch {self.selected_epoch} ({val}) -> {self.out}"
        )


# ----------------------------------------------------------------------------- the loop

LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


def fit(
    module: torch.nn.Module,
    loss_fn: LossFn,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    generator: torch.Generator | None = None,
    progress: bool = False,
    val_seed: int = 0,
) -> tuple[list[dict], int]:
    """Train ``module`` with AdamW and keep the epoch with the lowest validation loss.

    Args:
        loss_fn: ``(module, x, y) -> (loss, parts)``.
        x_train, y_train, x_val, y_val: tensors on the module's device.
        generator: CPU generator for the batch order.
        val_seed: the validation pass runs under this fixed seed, so its random parts
            (LatentDR's pool subsets) are the same every epoch and losses compare.

    Returns:
        per-epoch history and the selected epoch (1-based); ``module`` holds its weights.
    """

    def train_batches():
        order = torch.randperm(len(x_train), generator=generator).to(x_train.device)
        for start in range(0, len(x_train), batch_size):
            idx = order[start : start + batch_size]
            yield x_train[idx], y_train[idx]

    def val_loss():
        return evaluate(module, loss_fn, x_val, y_val, batch_size, val_seed) if len(x_val) else None

    return fit_batches(module, loss_fn, train_batches, val_loss, epochs, lr, weight_decay, progress)


def fit_batches(
    module: torch.nn.Module,
    loss_fn: LossFn,
    train_batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]],
    val_loss: Callable[[], float | None],
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    progress: bool = False,
) -> tuple[list[dict], int]:
    """The epoch loop behind :func:`fit` and :func:`fit_streamed`: ``train_batches()``
    yields one epoch of (x, y) minibatches; ``val_loss()`` gives the epoch's validation loss."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    history, best_loss, best_state, best_epoch = [], math.inf, None, epochs
    bar = tqdm(range(1, epochs + 1), desc="train", unit="epoch", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for epoch in bar:
        module.train()
        n, total, sums = 0, 0.0, {}
        for xb, yb in train_batches():
            loss, parts = loss_fn(module, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(xb)
            total += loss.detach() * len(xb)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(xb)
        row = {"epoch": epoch, "train_loss": float(total) / n, **{k: float(v) / n for k, v in sums.items()}}
        row["val_loss"] = val_loss()
        history.append(row)
        if row["val_loss"] is not None and row["val_loss"] < best_loss:
            best_loss, best_epoch = row["val_loss"], epoch
            best_state = copy.deepcopy(module.state_dict())
        bar.set_postfix(train=f"{row['train_loss']:.4f}", val=f"{row['val_loss']:.4f}" if row["val_loss"] is not None else "-")
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return history, best_epoch


def stream_rows(chunks: Callable[[], Iterator[tuple[int, np.ndarray]]], rows: np.ndarray, labels: np.ndarray,
                device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The rows ``rows`` (sorted global indices) of a streamed cache, chunk by chunk, on ``device``."""
    for pos, emb in cache_io.take_rows(chunks(), rows):
        yield torch.as_tensor(emb, device=device), torch.as_tensor(labels[rows[pos]], device=device)


def fit_streamed(
    module: torch.nn.Module,
    loss_fn: LossFn,
    chunks: Callable[[], Iterator[tuple[int, np.ndarray]]],
    labels: np.ndarray,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    epochs: int,
    batch_size: int,
    buffer_rows: int,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    generator: torch.Generator | None = None,
    progress: bool = False,
    val_seed: int = 0,
    device: torch.device = torch.device("cpu"),
) -> tuple[list[dict], int]:
    """:func:`fit` for caches larger than memory: each epoch streams the cache from disk
    (``chunks()`` yields (first row, embeddings)), keeps the training rows in a shuffle
    buffer of ``buffer_rows`` and draws minibatches from a seeded permutation of it. With
    a buffer that holds every training row the batch order is exactly :func:`fit`'s."""

    def train_batches():
        buf_x, buf_y, held = [], [], 0

        def drain(final: bool):
            x, y = torch.cat(buf_x), torch.cat(buf_y)
            order = torch.randperm(len(x), generator=generator).to(x.device)
            stop = len(x) if final else len(x) - len(x) % batch_size
            for start in range(0, stop, batch_size):
                idx = order[start : start + batch_size]
                yield x[idx], y[idx]
            rest = order[stop:]
            return [x[rest]], [y[rest]]

        for xb, yb in stream_rows(chunks, train_rows, labels, device):
            buf_x.append(xb)
            buf_y.append(yb)
            held += len(xb)
            if held > buffer_rows:
                buf_x, buf_y = yield from drain(final=False)
                held = len(buf_x[0])
        if held:
            yield from drain(final=True)

    def val_loss():
        if not len(val_rows):
            return None
        total, n = 0.0, 0
        for xb, yb in stream_rows(chunks, val_rows, labels, device):
            total += evaluate(module, loss_fn, xb, yb, batch_size, val_seed) * len(xb)
            n += len(xb)
        return total / n

    return fit_batches(module, loss_fn, train_batches, val_loss, epochs, lr, weight_decay, progress)


@torch.no_grad()
def evaluate(module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> float:
    """Mean loss over ``x`` in eval mode, under a fixed seed."""
    module.eval()
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        total = 0.0
        for start in range(0, len(x), batch_size):
            loss, _ = loss_fn(module, x[start : start + batch_size], y[start : start + batch_size])
            total += float(loss) * len(x[start : start + batch_size])
    return total / len(x)


# ----------------------------------------------------------------------------- heads


def _prompt_set(texts: dict, name: str, option: str) -> np.ndarray:
    if name not in texts:
        raise UsageError(
            f"{option} {name!r}: the cache has no such prompt set; it has {sorted(texts)}. "
            f"Re-embed with --prompt-set \"{name}=... {{}}\" or pick one of those."
        )
    return texts[name]


def build_training(config: TrainConfig, feats: cache_io.FeatureCache, device: torch.device) -> tuple[torch.nn.Module, LossFn]:
    """The head module (on ``device``) and its loss for ``config.head``."""
    d, n_classes = feats.manifest.embed_dim, len(feats.classes)
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    if config.head == "box":
        text = as_tensor(_prompt_set(feats.texts, CLASSES_PROMPT_SET, "box head needs prompt set"))
        cfg = BoxConfig(embed_dim=d, hidden=config.hidden or 2 * d, alpha=config.alpha, temperature=config.temperature)
        loss = lambda m, x, y: box_loss(*m(x), text, y, cfg.alpha, cfg.temperature)  # noqa: E731
        return BoxHead(cfg).to(device), loss
    if config.head in ("dr-sa", "dr-pool"):
        cfg = LatentDRConfig(
            embed_dim=d, n_classes=max(2, n_classes), kind=config.head[3:], heads=config.heads, dim_head=config.dim_head,
            dim_ff=config.dim_ff, dropout=config.dropout, norm=config.norm, mode=config.dr_mode, degrade=config.degrade,
            noise_std=config.noise_std,
        )
        return LatentDR(cfg).to(device), lambda m, x, y: latentdr_loss(m(x, y), y)
    source = as_tensor(_prompt_set(feats.texts, config.source_prompts, "--source-prompts"))
    targets = as_tensor(np.stack([_prompt_set(feats.texts, t, "--target-prompts") for t in config.target_prompts]))
    class_text = as_tensor(_prompt_set(feats.texts, CLASSES_PROMPT_SET, "lads head needs prompt set"))
    directions = domain_directions(source, targets)
    cfg = LADSConfig(embed_dim=d, targets=config.target_prompts, source=config.source_prompts, hidden=config.hidden or 384,
                     alpha=config.alpha, temperature=config.temperature)
    loss = lambda m, x, y: lads_loss(x, m(x), class_text, directions, y, cfg.alpha, cfg.temperature)  # noqa: E731
    return LADSHead(cfg).to(device), loss


@torch.no_grad()
def box_stats(
    head: BoxHead,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    classes: list[str],
    text: torch.Tensor,
    top: int = 3,
    seed: int = 0,
) -> dict:
    """LARE's Tables 4 and 5 for a trained box head over the rows of ``batches``, plus diagnostics.

    Returns per-class mean box log-volume with its rank (1 = largest boxes), for each
    dimension the ``top`` classes whose boxes have the longest mean side along it, the
    mean corner inner product, and the zero-shot accuracy (against ``text``) of the
    points, corners, centres and of 5 uniform samples per box: if the samples' accuracy
    is far below the points', the boxes have grown past their classes (raise --alpha).
    Accumulates per class, so its memory does not grow with the number of rows.
    """
    head.eval()
    t = head.config.temperature
    n_classes, d = len(classes), head.config.embed_dim
    count = torch.zeros(n_classes, dtype=torch.float64)
    lv_sum = torch.zeros(n_classes, dtype=torch.float64)
    side_sum = torch.zeros(n_classes, d, dtype=torch.float64)
    correct = {k: 0 for k in ("points", "lo", "hi", "center", "samples")}
    n_rows, inner = 0, 0.0
    gen = None
    for x, y in batches:
        gen = gen or torch.Generator(device=x.device).manual_seed(seed)
        lo, hi = head(x)
        yc = y.cpu()
        count.index_add_(0, yc, torch.ones(len(yc), dtype=torch.float64))
        lv_sum.index_add_(0, yc, box_log_volume(lo, hi).double().cpu())
        side_sum.index_add_(0, yc, (hi - lo).abs().double().cpu())
        hit = lambda p, target: int((zero_shot_logits(p, text, t).argmax(1) == target).sum())  # noqa: E731
        samples = sample_boxes(lo, hi, 5, gen).reshape(-1, d)
        correct["points"] += hit(x, y)
        correct["lo"] += hit(lo, y)
        correct["hi"] += hit(hi, y)
        correct["center"] += hit(box_center(lo, hi), y)
        correct["samples"] += hit(samples, y.repeat_interleave(5)) / 5
        inner += float((lo * hi).sum())
        n_rows += len(x)
    present = [c for c in range(n_classes) if count[c] > 0]
    mean_lv = {c: float(lv_sum[c] / count[c]) for c in present}
    ranked = sorted(present, key=lambda c: -mean_lv[c])
    per_class = [{"class": classes[c], "label": c, "n": int(count[c]), "mean_log_volume": mean_lv[c],
                  "rank": ranked.index(c) + 1} for c in present]
    class_sides = (side_sum[present] / count[present].unsqueeze(1)).numpy()  # (n_present, d)
    longest = np.argsort(-class_sides, axis=0)[:top].T  # (d, top)
    per_dim = [{"dim": j, "classes": [classes[present[i]] for i in longest[j]],
                "mean_side": [float(class_sides[i, j]) for i in longest[j]]} for j in range(d)]
    return {
        "n_rows": n_rows,
        "mean_log_volume": float(lv_sum.sum() / max(1, n_rows)),
        "mean_corner_inner_product": inner / max(1, n_rows),
        "zero_shot_accuracy": {k: v / max(1, n_rows) for k, v in correct.items()},
        "per_class": sorted(per_class, key=lambda r: r["rank"]),
        "per_dimension": per_dim,
    }


def train_head(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train one head on a feature cache and write its checkpoint directory.

    Raises:
        UsageError: bad options, unknown training domain, missing prompt set, an
            existing output without ``overwrite`` (checked before training).
        CacheError: the cache is unreadable.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(config.out)
    if not config.out:
        raise UsageError("--out is required: the folder to write the head to.")
    if out.exists() and not config.overwrite:
        raise UsageError(f"--out {str(out)!r} already exists. Pass --overwrite to replace it, or choose another folder.")
    if out.exists() and not checkpoint.is_head(out):
        raise UsageError(f"--out {str(out)!r} exists and is not a vlaug head; refusing to replace it. Choose another folder.")
    budget = parse_memory_budget(config.memory_budget)
    manifest = cache_io.read_manifest(config.features)
    streamed = not cache_io.fits_in_memory(manifest, budget)
    if streamed:  # larger than the budget: metadata in memory, embeddings streamed from disk each epoch
        feats = cache_io.read_metadata(config.features)
        log(f"streaming {manifest.n_images} rows from disk: in memory they would need about "
            f"{cache_io.in_memory_bytes(manifest) / 2**30:.2f} GiB, more than --memory-budget ({budget / 2**30:.2f} GiB)")
    else:
        feats = cache_io.read_cache(config.features)
    domains = check_domains(config.train_domains, [d for d in np.unique(feats.domains).tolist() if d])
    rows = training_rows(feats.domains, feats.splits, config.train_domains)
    if len(rows) < 2:
        raise UsageError(f"only {len(rows)} training row(s) in {config.features!r} for domains {domains}; need at least 2.")
    train_rows, val_rows = stratified_split(rows, feats.labels, config.val_fraction, config.seed)
    device = resolve_device(config.device)
    epochs, batch_size = config.resolved("epochs"), config.resolved("batch_size")
    # a quarter of the budget for the shuffle buffer (a row costs d float32 and a label);
    # shuffling it makes one transient copy, so the buffer peaks at half the budget
    buffer_rows = max(4 * batch_size, budget // 4 // (manifest.embed_dim * 4 + 8))
    chunks = lambda: cache_io.iter_embeddings(config.features, cache_io.chunk_rows(budget, manifest.embed_dim))  # noqa: E731

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)  # initial weights, dropout, pool subsets
        module, loss_fn = build_training(config, feats, device)
        generator = torch.Generator().manual_seed(config.seed)
        if streamed:
            history, selected = fit_streamed(
                module, loss_fn, chunks, feats.labels, train_rows, val_rows, epochs, batch_size, buffer_rows,
                config.lr, config.weight_decay, generator, config.progress, config.seed, device,
            )
        else:
            x = torch.as_tensor(feats.embeddings, device=device)
            y = torch.as_tensor(feats.labels, device=device)
            history, selected = fit(
                module, loss_fn, x[train_rows], y[train_rows], x[val_rows], y[val_rows], epochs, batch_size,
                config.lr, config.weight_decay, generator, config.progress, config.seed,
            )
    seconds = time.perf_counter() - start
    stats = None
    if config.head == "box":
        text = torch.as_tensor(feats.texts[CLASSES_PROMPT_SET], device=device)
        if streamed:
            batches = stream_rows(chunks, rows, feats.labels, device)
        else:
            batches = ((x[rows[i : i + 8192]], y[rows[i : i + 8192]]) for i in range(0, len(rows), 8192))
        stats = box_stats(module, batches, feats.classes, text, seed=config.seed)

    training = {k: v for k, v in asdict(config).items() if k not in ("overwrite", "progress")}
    training.update(epochs=epochs, batch_size=batch_size, train_domains=domains, device=str(device),
                    n_train=int(len(train_rows)), n_val=int(len(val_rows)), optimizer="AdamW",
                    features=str(Path(config.features).resolve()), streamed=streamed, memory_budget_bytes=budget)
    for k in ("target_prompts",):
        training[k] = list(training[k])
    checkpoint.save_head(
        out, config.head, module.cpu(),
        {"training": training, "cache": checkpoint.cache_identity(feats.manifest), "history": history,
         "selected_epoch": selected},
        stats=stats, overwrite=config.overwrite,
    )
    return TrainResult(str(out), config.head, len(train_rows), len(val_rows), selected, history, seconds, stats)
