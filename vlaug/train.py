"""Stage 2: train a head on cached latents (``vlaug train-box``).

A :class:`TrainConfig` composes the head's own config (``BoxConfig``, ``LatentDRConfig``
or ``LADSConfig`` from :mod:`vlaug.heads`, each with its defaults and checks) with the
training run's settings. The stage reads the cache (in memory, or streamed when it is
larger than ``--memory-budget``), trains the head with the generic loop of
:mod:`vlaug.loop` and writes a checkpoint with :mod:`vlaug.checkpoint`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vlaug import cache as cache_io
from vlaug import checkpoint, loop
from vlaug.choices import CLASSES_PROMPT_SET, PROTOCOLS
from vlaug.devices import release_memory, resolve_device
from vlaug.errors import UsageError
from vlaug.heads import (
    HEADS,
    BoxConfig,
    HeadConfig,
    LADSConfig,
    LatentDRConfig,
    box_loss,
    domain_directions,
    head_kind,
    lads_loss,
    latentdr_loss,
    make_head_config,
)
from vlaug.metrics import box_stats
from vlaug.protocols import check_domains, id_fractions, stratified_split, training_rows


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``vlaug train-box`` needs: the head (kind and options) and how to train it."""

    features: str = ""  # feature cache to train on
    out: str = ""  # head directory to write
    head: HeadConfig = field(default_factory=BoxConfig)  # the head to train, with its options (vlaug.heads)
    train_domains: tuple[str, ...] = ()  # empty: every domain
    test_fraction: float = 0.2  # held-out test rows (by id hash) when the cache has no split: never trained on
    val_fraction: float = 0.2  # stratified part of the head's training rows that selects the epoch
    # vlaug probe's validation rows (by id hash, vlaug.protocols.validation_mask), held out so that no probe selects
    # on a row its head was fitted on; must equal the probe's --val-fraction (the probe checks it)
    probe_val_fraction: float = 0.2
    epochs: int | None = None  # None: the head's schedule (box 100, dr 100, lads 50)
    batch_size: int | None = None  # None: the head's schedule (box 512, dr 256, lads 256)
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    seed: int = 0  # initial weights, batch order, validation split, dropout
    # "leave-one-domain-out": a set of heads for vlaug probe's DomainBed protocol (train_head_set): per split
    # seed 0 … seeds − 1, one head per held-out domain (and per held-out pair for that selection), each on
    # the `in` rows of the other domains
    protocol: str = "single"
    seeds: int = 5  # leave-one-domain-out: the probe's seeds (each draws its own in/out split)
    selection: str = "training-domain"  # leave-one-domain-out: leave-one-domain-out or all also trains the pairs
    holdout_fraction: float = 0.2  # leave-one-domain-out: each domain's `out` part (the probe's --holdout-fraction)
    device: str = "auto"
    memory_budget: str = "auto"  # stream the cache from disk when its embeddings need more (auto: RAM / 4)
    allow_incomplete: bool = False  # train on a cache whose embed run was interrupted
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.head, (BoxConfig, LatentDRConfig, LADSConfig)):
            raise UsageError(f"head == {self.head!r}; pass a head config, e.g. make_head_config('box').")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"--val-fraction {self.val_fraction}, must be in [0, 1).")
        if not 0.0 < self.test_fraction < 1.0:
            raise UsageError(f"--test-fraction {self.test_fraction}, must be in (0, 1).")
        if not 0.0 < self.probe_val_fraction < 1.0:
            raise UsageError(f"--probe-val-fraction {self.probe_val_fraction}, must be in (0, 1).")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} {value}, must be >= 1.")
        if self.lr <= 0 or self.weight_decay < 0:
            raise UsageError(f"--lr {self.lr} must be > 0 and --weight-decay {self.weight_decay} >= 0.")
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"--protocol {self.protocol!r}; use one of {', '.join(PROTOCOLS)}.")
        if self.protocol != "single" and self.train_domains:
            raise UsageError("--train-domain belongs to --protocol single; under leave-one-domain-out every domain is "
                             "held out in turn.")
        if self.seeds < 1 or not 0.0 < self.holdout_fraction < 1.0:
            raise UsageError(f"--seeds {self.seeds} must be >= 1 and --holdout-fraction {self.holdout_fraction} in (0, 1).")

    @property
    def kind(self) -> str:
        return head_kind(self.head)

    @property
    def schedule(self) -> tuple[int, int]:
        """(epochs, batch size): the options given, else the head's own."""
        return self.epochs or self.head.EPOCHS, self.batch_size or self.head.BATCH_SIZE


# vlaug train-box's flags for the head options whose config field has another name
HEAD_FLAGS = {"mode": "--dr-mode", "heads": "--attention-heads", "source": "--source-prompts", "targets": "--target-prompts"}


# a lads head of a set (--protocol leave-one-domain-out) targets its held-out domains' prompt sets:
# the config holds this name until train_head_set gives each head its own
HELD_OUT_TARGETS = "<held-out domains>"


def head_config(kind: str, options: dict, protocol: str = "single") -> HeadConfig:
    """The config of a ``kind`` head from user options (config fields); a refused option is
    a UsageError naming its vlaug train-box flag. Under ``protocol`` leave-one-domain-out a
    lads head's targets are each head's held-out domains and its source defaults to the
    class prompts (the training domains are several)."""
    flag = lambda name: HEAD_FLAGS.get(name, "--" + name.replace("_", "-"))  # noqa: E731
    if kind not in HEADS:
        raise UsageError(f"--head {kind!r}, must be one of {list(HEADS)}.")
    takes = lambda name: [k for k, (c, _) in HEADS.items() if name in {f.name for f in fields(c)}]  # noqa: E731
    for name in options:
        if kind not in takes(name):
            raise UsageError(f"{flag(name)} applies to {' and '.join(takes(name))} heads, not {kind}.")
    if kind == "lads" and protocol != "single":
        if options.get("targets"):
            raise UsageError(f"--head lads --protocol {protocol}: each head of the set targets the domains it holds out "
                             f"(their prompt sets); drop {flag('targets')}.")
        options = {"source": CLASSES_PROMPT_SET, **options, "targets": (HELD_OUT_TARGETS,)}
    if kind == "lads" and not (options.get("source") and options.get("targets")):
        raise UsageError(f"--head lads needs {flag('source')} NAME and {flag('targets')} NAME[,NAME] (prompt sets of the cache).")
    try:
        return make_head_config(kind, **options)
    except ValueError as e:
        raise UsageError(f"--head {kind}: {e}") from None


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
    n_heads: int = 1  # --protocol leave-one-domain-out: the heads of the set (this result is the last one's)

    def summary(self) -> str:
        best = self.history[self.selected_epoch - 1]
        val = f"val loss {best['val_loss']:.4f}" if best["val_loss"] is not None else "no validation rows"
        if self.n_heads > 1:
            return (f"trained {self.n_heads} {self.kind} heads for vlaug probe --protocol leave-one-domain-out "
                    f"(the last on {self.n_train} rows, kept epoch {self.selected_epoch}, {val}) -> {self.out} "
                    f"(index: {self.out}/{HEAD_SET_NAME})")
        return (
            f"trained {self.kind} on {self.n_train} rows ({self.n_val} validation) for {len(self.history)} epochs "
            f"in {self.seconds:.1f} s; kept epoch {self.selected_epoch} ({val}) -> {self.out}"
        )


def _prompt_set(texts: dict, name: str, option: str) -> np.ndarray:
    if name not in texts:
        raise UsageError(
            f"{option} {name!r}: the cache has no such prompt set; it has {sorted(texts)}. "
            f"Re-embed with --prompt-set \"{name}=... {{}}\" or pick one of those."
        )
    return texts[name]


def build_training(config: HeadConfig, texts: dict[str, np.ndarray], device: torch.device) -> tuple[torch.nn.Module, loop.LossFn]:
    """The head module (on ``device``) of a bound head config, and its loss over ``(module, x, y)``."""
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    module = HEADS[head_kind(config)][1](config).to(device)
    if isinstance(config, BoxConfig):
        text = as_tensor(_prompt_set(texts, CLASSES_PROMPT_SET, "box head needs prompt set"))
        return module, lambda m, x, y: box_loss(*m(x), text, y, config.alpha, config.temperature)
    if isinstance(config, LatentDRConfig):
        return module, lambda m, x, y: latentdr_loss(m(x, y), y)
    source = as_tensor(_prompt_set(texts, config.source, "--source-prompts"))
    targets = as_tensor(np.stack([_prompt_set(texts, t, "--target-prompts") for t in config.targets]))
    class_text = as_tensor(_prompt_set(texts, CLASSES_PROMPT_SET, "lads head needs prompt set"))
    directions = domain_directions(source, targets)
    return module, lambda m, x, y: lads_loss(x, m(x), class_text, directions, y, config.alpha, config.temperature)


def prompt_sets_used(config: HeadConfig) -> list[str]:
    """The prompt sets a head's training reads (recorded in its checkpoint)."""
    if isinstance(config, BoxConfig):
        return [CLASSES_PROMPT_SET]
    if isinstance(config, LADSConfig):
        return list(dict.fromkeys([CLASSES_PROMPT_SET, config.source, *config.targets]))
    return []


def check_labeled(manifest: cache_io.CacheManifest, features: str, stage: str) -> None:
    """Refuse an unlabeled cache (a flat folder or a path-only manifest) in stages 2 and 3."""
    if not manifest.classes:
        raise UsageError(f"cache {features!r} has no labels (it was embedded from unlabeled images); {stage} needs a "
                         "labeled cache. Use this one with vlaug predict.")


def classes_without_rows(labels: np.ndarray, classes: list[str]) -> list[str]:
    """The names of the classes that no label in ``labels`` points to."""
    present = np.zeros(len(classes), dtype=bool)
    present[labels[labels >= 0]] = True
    return [c for c, p in zip(classes, present) if not p]


def _rows_on(device: torch.device, labels: np.ndarray, chunks: Callable, rows: np.ndarray):
    """Chunks of the streamed cache's ``rows`` as (x, y) on ``device``. Before each chunk the C
    allocator hands back what the previous one's work freed: glibc keeps freed blocks of up
    to 32 MB (its adaptive mmap threshold) for reuse, and over a pass of a large cache its
    fragmented heaps would grow by hundreds of MB."""
    for pos, emb in cache_io.take_rows(chunks(), rows):
        release_memory()
        yield torch.as_tensor(emb, device=device), torch.as_tensor(labels[rows[pos]], device=device)


def _read_features(config: TrainConfig, manifest: cache_io.CacheManifest, plan: cache_io.MemoryPlan,
                   log: Callable[[str], None]) -> cache_io.FeatureCache:
    """The cache with its embeddings, or without them when they are streamed."""
    if plan.streamed:  # metadata in memory, embeddings streamed from disk each epoch
        feats = cache_io.read_metadata(config.features, allow_incomplete=True)
        log(plan.streaming_note(plan.chunk_rows()))
    else:
        feats = cache_io.read_cache(config.features, allow_incomplete=True)
    if manifest.n_missing:
        log(f"WARNING: --allow-incomplete: {config.features} is incomplete ({manifest.n_missing} of "
            f"{manifest.n_inputs} inputs never embedded); the head sees only the rows it holds")
    return feats


def _select_rows(config: TrainConfig, feats: cache_io.FeatureCache,
                 log: Callable[[str], None]) -> tuple[list[str], np.ndarray, list[str]]:
    """(training domains, the rows the head may fit on, the classes without any of them)."""
    domains = check_domains(config.train_domains, [d for d in np.unique(feats.domains).tolist() if d])
    fractions = id_fractions(cache_io.iter_ids(config.features))
    rows = training_rows(feats.domains, feats.splits, feats.labels, config.train_domains, fractions, config.test_fraction,
                         config.probe_val_fraction)
    if len(rows) < 2:
        raise UsageError(f"only {len(rows)} training row(s) in {config.features!r} for domains {domains}; need at least 2.")
    empty = classes_without_rows(feats.labels[rows], feats.classes)
    if empty:
        log(f"WARNING: {len(empty)} of {len(feats.classes)} classes have no training rows: {', '.join(empty[:10])}"
            f"{' ...' if len(empty) > 10 else ''}")
    return domains, rows, empty


# rows -> a callable giving those rows as (x, y) chunks on the training device
RowChunks = Callable[[np.ndarray], loop.Chunks]


def _row_chunks(config: TrainConfig, plan: cache_io.MemoryPlan, feats: cache_io.FeatureCache,
                device: torch.device) -> tuple[RowChunks, tuple[torch.Tensor, torch.Tensor] | None]:
    """How rows reach the device: streamed from disk, or sliced from the cache in memory,
    whose (embeddings, labels) tensors come second (None when streamed)."""
    if plan.streamed:
        chunks = lambda: cache_io.iter_embeddings(config.features, plan.chunk_rows())  # noqa: E731
        return lambda r: (lambda: _rows_on(device, feats.labels, chunks, r)), None
    x, y = torch.as_tensor(feats.embeddings, device=device), torch.as_tensor(feats.labels, device=device)
    return lambda r: (lambda: ((x[r[i : i + 8192]], y[r[i : i + 8192]]) for i in range(0, len(r), 8192))), (x, y)


def _fit(config: TrainConfig, head: HeadConfig, texts: dict[str, np.ndarray], device: torch.device,
         plan: cache_io.MemoryPlan, row_chunks: RowChunks, held: tuple[torch.Tensor, torch.Tensor] | None,
         train_rows: np.ndarray, val_rows: np.ndarray) -> tuple[torch.nn.Module, list[dict], int]:
    """Build the head and train it under the config's seed: (module, history, selected epoch)."""
    epochs, batch_size = config.schedule
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)  # initial weights, dropout, pool subsets
        module, loss_fn = build_training(head, texts, device)
        schedule = dict(epochs=epochs, batch_size=batch_size, lr=config.lr, weight_decay=config.weight_decay,
                        generator=torch.Generator().manual_seed(config.seed), progress=config.progress,
                        val_seed=config.seed)
        if held is None:
            # a quarter of the budget for the shuffle buffer (a row costs d float32 and a label)
            buffer_rows = max(4 * batch_size, plan.budget // 4 // (head.embed_dim * 4 + 8))
            history, selected = loop.fit_streamed(module, loss_fn, train_chunks=row_chunks(train_rows),
                                                  val_chunks=row_chunks(val_rows) if len(val_rows) else None,
                                                  buffer_rows=buffer_rows, **schedule)
        else:
            x, y = held
            history, selected = loop.fit(module, loss_fn, x_train=x[train_rows], y_train=y[train_rows], x_val=x[val_rows],
                                         y_val=y[val_rows], **schedule)
    return module, history, selected


def _training_record(config: TrainConfig, plan: cache_io.MemoryPlan, manifest: cache_io.CacheManifest,
                     feats: cache_io.FeatureCache, device: torch.device, domains: list[str], empty: list[str],
                     n_train: int, n_val: int) -> dict:
    """The checkpoint's ``training`` section: the run's options and what it trained on."""
    epochs, batch_size = config.schedule
    training = {k: v for k, v in asdict(config).items() if k not in ("head", "overwrite", "progress")}
    training.update(head=config.kind, epochs=epochs, batch_size=batch_size, train_domains=domains, device=str(device),
                    uses_cache_splits=bool((feats.splits != "").any()),
                    n_train=n_train, n_val=n_val, optimizer="AdamW",
                    features=str(Path(config.features).resolve()), streamed=plan.streamed, memory_budget_bytes=plan.budget,
                    incomplete_cache=bool(manifest.n_missing), classes_without_training_rows=empty)
    return training


def train_head(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train one head on a feature cache and write its checkpoint directory.

    Raises:
        UsageError: bad options, unknown training domain, missing prompt set, an
            existing output without ``overwrite`` (checked before training).
        CacheError: the cache is unreadable.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if config.protocol != "single":
        return train_head_set(config, log)
    budget = cache_io.parse_memory_budget(config.memory_budget)
    out = cache_io.check_output(config.out, config.overwrite, checkpoint.is_head, "vlaug head")
    manifest = cache_io.read_manifest(config.features)
    check_labeled(manifest, config.features, "vlaug train-box")
    cache_io.check_complete(config.features, manifest, config.allow_incomplete)
    plan = cache_io.plan_memory(manifest, config.memory_budget, budget)
    feats = _read_features(config, manifest, plan, log)
    domains, rows, empty = _select_rows(config, feats, log)
    return _train_on(config, out, manifest, plan, feats, domains, rows, empty, {})


def _train_on(config: TrainConfig, out: Path, manifest: cache_io.CacheManifest, plan: cache_io.MemoryPlan,
              feats: cache_io.FeatureCache, domains: list[str], rows: np.ndarray, empty: list[str],
              record: dict) -> TrainResult:
    """Train the head on ``rows`` (its epoch chosen on a stratified part of them) and write it
    to ``out``, with ``record`` added to its training section."""
    train_rows, val_rows = stratified_split(rows, feats.labels, config.val_fraction, config.seed)
    device = resolve_device(config.device)
    head = config.head.bind(manifest.embed_dim, len(feats.classes))
    row_chunks, held = _row_chunks(config, plan, feats, device)
    release_memory()  # what reading the metadata and the ids left behind

    start = time.perf_counter()
    module, history, selected = _fit(config, head, feats.texts, device, plan, row_chunks, held, train_rows, val_rows)
    seconds = time.perf_counter() - start
    stats = None
    if isinstance(head, BoxConfig):
        text = torch.as_tensor(feats.texts[CLASSES_PROMPT_SET], device=device)
        stats = box_stats(module, row_chunks(rows)(), feats.classes, text, seed=config.seed)

    training = _training_record(config, plan, manifest, feats, device, domains, empty, len(train_rows), len(val_rows))
    training.update(record)
    made_from = cache_io.read_text_templates(config.features, manifest)
    texts = {name: made_from.get(name, []) for name in prompt_sets_used(head)}
    checkpoint.save_head(
        out, config.kind, module.cpu(),
        {"training": training, "cache": checkpoint.cache_identity(feats.manifest, texts), "history": history,
         "selected_epoch": selected},
        stats=stats, overwrite=config.overwrite,
    )
    return TrainResult(str(out), config.kind, len(train_rows), len(val_rows), selected, history, seconds, stats)


HEAD_SET_NAME = "heads.json"  # the index of a set of heads trained under --protocol leave-one-domain-out


def head_set_folder(seed: int, held_out: tuple[str, ...] | list[str]) -> str:
    """Where a set's head for split seed ``seed`` without the domains ``held_out`` lives, inside the set."""
    return f"seed{seed}/without-{'+'.join(sorted(held_out))}"


def is_head_set(path: str | os.PathLike) -> bool:
    return (Path(path) / HEAD_SET_NAME).is_file()


def train_head_set(config: TrainConfig, log: Callable[[str], None]) -> TrainResult:
    """``--protocol leave-one-domain-out``: for each split seed, one head per held-out domain
    (and, when the selection includes leave-one-domain-out, per held-out pair), each trained
    on the `in` rows of the other domains of that seed's split (vlaug.protocols.in_out_splits,
    as vlaug probe draws it), written to ``OUT/seedS/without-D[+E]/`` with ``OUT/heads.json``
    listing them. The folder appears whole or not at all. Returns the last head's result,
    with the number of heads in ``n_heads``."""
    from itertools import combinations

    from vlaug.protocols import in_out_splits

    budget = cache_io.parse_memory_budget(config.memory_budget)
    cache_io.check_output(config.out, config.overwrite, is_head_set, "vlaug head set")
    manifest = cache_io.read_manifest(config.features)
    check_labeled(manifest, config.features, "vlaug train-box")
    cache_io.check_complete(config.features, manifest, config.allow_incomplete)
    plan = cache_io.plan_memory(manifest, config.memory_budget, budget)
    feats = _read_features(config, manifest, plan, log)
    names = [d for d in np.unique(feats.domains).tolist() if d]
    pairs = config.selection in ("leave-one-domain-out", "all")
    if len(names) < 2 + pairs or (feats.domains == "").any():
        raise UsageError(f"--protocol leave-one-domain-out needs a domain for every row and at least {2 + pairs} domains; "
                         f"cache {config.features!r} has {names or ['(none)']}.")
    held_sets = [(d,) for d in names] + (list(combinations(names, 2)) if pairs else [])
    per_head = isinstance(config.head, LADSConfig) and config.head.targets == (HELD_OUT_TARGETS,)
    if isinstance(config.head, LADSConfig):
        needed = [config.head.source, *(names if per_head else config.head.targets)]
        missing = [n for n in dict.fromkeys(needed) if n not in feats.texts]
        if missing:
            raise UsageError(f"--head lads: cache {config.features!r} has no prompt set {', '.join(map(repr, missing))} (a "
                             f"set's heads target the domains they hold out); add them with vlaug prompts FEATURES "
                             f"--prompt-set {missing[0]}='a {missing[0]} of a {{}}.'")
    heads, result = [], None
    with cache_io.atomic_directory(Path(config.out)) as tmp:
        for seed in range(config.seeds):
            parts = in_out_splits(feats.labels, feats.domains, feats.splits, names, seed, config.holdout_fraction)
            for held in held_sets:
                domains = [d for d in names if d not in held]
                rows = np.sort(np.concatenate([parts[d][0] for d in domains]))
                folder = head_set_folder(seed, held)
                log(f"head {len(heads) + 1}/{config.seeds * len(held_sets)}: split seed {seed}, without {', '.join(held)}")
                record = {"protocol": config.protocol, "split_seed": seed, "held_out": list(held),
                          "holdout_fraction": config.holdout_fraction}
                own = replace(config, head=replace(config.head, targets=held)) if per_head else config
                result = _train_on(own, tmp / folder, manifest, plan, feats, domains, rows,
                                   classes_without_rows(feats.labels[rows], feats.classes), record)
                heads.append({"seed": seed, "held_out": list(held), "path": folder})
        index = {"kind": config.kind, "protocol": config.protocol, "seeds": config.seeds, "selection": config.selection,
                 "holdout_fraction": config.holdout_fraction, "domains": names, "heads": heads}
        (tmp / HEAD_SET_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    result.out, result.n_heads = str(config.out), len(heads)
    return result
