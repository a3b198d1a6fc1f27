"""Stage 3: methods × seeds on identical splits -> a typed run result (``vlaug probe``).

Every method (:mod:`vlaug.methods`) trains on the same train rows, selects on the same
validation rows and is tested on the same test rows for a given seed. :func:`run_probe`
returns a :class:`ProbeRun`; :func:`vlaug.report.write_report` writes it.
"""

from __future__ import annotations

import copy
import hashlib
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vlaug import cache as cache_io
from vlaug import checkpoint, domainbed, metrics
from vlaug._version import __version__
from vlaug.choices import CLASSES_PROMPT_SET
from vlaug.devices import release_memory, resolve_device, threads_for
from vlaug.cache.files import read_json_object
from vlaug.errors import CheckpointError, UsageError
from vlaug.methods import Fit, Method, RunData, parse_method
from vlaug.methods.registry import expand_method
from vlaug.methods.batching import ProbeSolver
from vlaug.methods.linear import GRID_EXTENSION_DECADES, ProbeMethod, block_generator
from vlaug.probe import LinearProbe
from vlaug.runs import Coded, Plots, ProbeRun, ProbeRunConfig
from vlaug.protocols import FEW_SHOT_VAL, Splits, check_domains, id_fractions, make_splits, parse_imbalance, training_rows
from vlaug.train import check_labeled, classes_without_rows
from vlaug.zero_shot import TEMPERATURE

GEOMETRY_ROWS = 20_000  # training rows (a seeded sample) behind the feature geometry and plots
KEYS = ("in_domain", "out_of_domain", "extended", "balanced_accuracy")


@dataclass
class _Plan:
    """What :func:`prepare` checked and built before any training."""

    methods: list[Method]
    data: RunData
    train_domains: list[str]
    splits: list[Splits]  # one per seed
    imbalance: tuple[float, int] | None
    memory: cache_io.MemoryPlan
    chunk_rows: int  # rows read from disk at a time when streamed
    warnings: list[str] = field(default_factory=list)  # printed, and at the top of the report
    texts_made_from: dict[str, list[str]] = field(default_factory=dict)  # prompt set -> the templates it was encoded from
    fractions: np.ndarray | None = None  # each row's id hash (protocols.id_fractions): fingerprints the splits
    tasks: list[domainbed.Task] | None = None  # --protocol leave-one-domain-out: what each of ``splits`` is
    shots: int | None = None  # --shots K of these splits (one K of a sweep)


ALL_METHODS = "all"  # --method all: every registered method with its default options


def _head_folders(heads: str, kinds: tuple[str, ...]) -> list[str]:
    """The head folders directly inside ``heads`` whose kind is one of ``kinds``, sorted."""
    if not heads:
        return []
    root = Path(heads)
    if not root.is_dir():
        raise UsageError(f"--heads {heads!r} is not a folder; give the folder that holds your head folders "
                         "(e.g. heads/ with heads/box from vlaug train-box --out heads/box).")
    from vlaug.train import HEAD_SET_NAME, is_head_set

    found = []
    for sub in sorted(p for p in root.iterdir() if checkpoint.is_head(p) or is_head_set(p)):
        try:
            if is_head_set(sub):  # a set of heads for --protocol leave-one-domain-out: its kind in its index
                kind = read_json_object(sub / HEAD_SET_NAME, CheckpointError, "").get("kind")
            else:
                kind = checkpoint.read_head_config(sub)["kind"]
        except CheckpointError:
            continue  # not readable as a head: --method NAME:DIR names it when wanted, and says why
        if kind in kinds:
            found.append(str(sub))
    return found


def _method_specs(config: ProbeRunConfig) -> tuple[list[str], list[str], set[str]]:
    """The --method specs with ``all`` expanded (and a head-needing method given without a
    folder resolved from --heads): (specs, notes on skipped methods, specs that came from all)."""
    from vlaug.methods import REGISTRY

    specs, notes, from_all = [], [], set()
    for text in config.methods:
        if text != ALL_METHODS:
            name, _, query = text.partition("?")
            cls = REGISTRY.get(name)
            if cls is not None and cls.head_kinds and config.heads and ":" not in name:
                folders = _head_folders(config.heads, cls.head_kinds)
                if not folders:
                    raise UsageError(f"--method {text!r}: no {' or '.join(cls.head_kinds)} head in --heads {config.heads!r}; "
                                     f"train one with vlaug train-box FEATURES --head {cls.head_kinds[0]} --out "
                                     f"{config.heads}/{cls.head_kinds[0]}.")
                if len(folders) > 1:
                    raise UsageError(f"--method {text!r}: --heads {config.heads!r} holds {len(folders)} "
                                     f"{' or '.join(cls.head_kinds)} heads ({', '.join(folders)}); name one with "
                                     f"--method {name}:{folders[0]}" + (f"?{query}" if query else "") + ".")
                text = f"{name}:{folders[0]}" + (f"?{query}" if query else "")
            if text in from_all:  # also expanded from all: given by name, it is the user's own method
                from_all.discard(text)
            else:
                specs.append(text)
            continue
        for name, cls in REGISTRY.items():
            if cls.path_argument:  # its path is the user's: nothing to take it from
                notes.append(f"{name} skipped: it needs {name}:{cls.path_argument} (name it beside all)")
                continue
            if not cls.head_kinds:
                found = [name]
            else:
                found = [f"{name}:{folder}" for folder in _head_folders(config.heads, cls.head_kinds)]
                if not found:
                    notes.append(f"{name} skipped: no {' or '.join(cls.head_kinds)} head "
                                 + (f"in --heads {config.heads}" if config.heads else "(give --heads DIR, a folder of head folders)"))
            for spec in found:
                if spec not in specs:
                    specs.append(spec)
                    from_all.add(spec)
    return specs, list(dict.fromkeys(notes)), from_all


def _same_run(m: Method) -> tuple:
    """What makes two method specs the same run: name, head folder and options, however written."""
    return m.name, str(Path(m.head).resolve()) if m.head else "", m.options


def _parse_methods(config: ProbeRunConfig) -> tuple[list[Method], list[str], set[str]]:
    specs, notes, from_all = _method_specs(config)
    methods = []
    for spec in specs:  # a spec that lists values: one method per configuration, grouped under the spec
        configs = expand_method(spec)
        if len(configs) > 1 and config.protocol == "single":
            raise UsageError(f"--method {spec!r} lists several values; they are searched under --protocol "
                             "leave-one-domain-out. Under --protocol single give one value per option.")
        for text, chosen in configs:
            m = parse_method(text)
            m.group = spec
            m.config = {k: getattr(m.options, k) for k in chosen}
            methods.append(m)
        if spec in from_all:
            from_all.update(text for text, _ in configs)
    named = {_same_run(m) for m in methods if m.text not in from_all}
    methods = [m for m in methods if m.text not in from_all or _same_run(m) not in named]  # given by name: theirs
    texts = [m.text for m in methods]
    if len(set(texts)) != len(texts):
        raise UsageError(f"--method given twice: {sorted({t for t in texts if texts.count(t) > 1})}.")
    return methods, notes, from_all


def _check_streaming(config: ProbeRunConfig, methods: list[Method], memory: cache_io.MemoryPlan,
                     from_all: set[str], notes: list[str]) -> None:
    """Refuse what needs every row at once when the cache is streamed (a method that came
    from ``--method all`` is left out instead, with a note)."""
    if memory.streamed:
        if config.reweight != "none":
            raise UsageError(memory.refusal(f"--reweight {config.reweight}", "use --reweight none"))
        for m in list(methods):
            if m.streams:
                continue
            if m.text not in from_all:
                raise UsageError(memory.refusal(f"--method {m.text!r}", "leave this method out"))
            methods.remove(m)
            notes.append(f"{m.text} skipped: it trains on every row at once and the cache is streamed from disk")


def _check_reweight(config: ProbeRunConfig, methods: list[Method], from_all: set[str], notes: list[str]) -> None:
    """Refuse --reweight with a GDA method (it has no per-row loss to reweight); from
    ``--method all`` such a method is left out, with a note."""
    if config.reweight == "none":
        return
    refused = [m for m in methods if m.reweighting_conflict()]
    for m in refused:
        if m.text in from_all:
            methods.remove(m)
            notes.append(f"{m.text} skipped: {m.reweighting_conflict()} (--reweight {config.reweight})")
    given = [m for m in refused if m.text not in from_all]
    if given:
        raise UsageError(f"--reweight {config.reweight} reweights the rows of a logistic probe; "
                         + "; ".join(f"{m.text}: {m.reweighting_conflict()}" for m in given)
                         + ". Leave them out, give them ?solver=logistic, or use --reweight none.")


def _load_heads(methods: list[Method], manifest: cache_io.CacheManifest, features: str, warnings: list[str],
                made_from: dict[str, list[str]]) -> dict:
    """The heads the methods name, each checked against its method, the cache and the
    prompt sets it was trained with (``made_from``: the cache's, set -> templates)."""
    heads = {}
    for m in methods:
        if m.head and m.head not in heads:
            ckpt = checkpoint.load_head(m.head)
            if ckpt.kind not in m.head_kinds:
                raise UsageError(f"--method {m.text!r}: {m.head!r} is a {ckpt.kind} head; {m.name} needs "
                                 f"{' or '.join(m.head_kinds)}.")
            if checkpoint.check_head_matches_cache(ckpt.cache, manifest, m.head, features, made_from) is not None:
                warnings.append(f"head {m.head} lists the cache's classes in another order; they are mapped by name")
            heads[m.head] = ckpt
    return heads


def _check_head_held_out(path: str, training: dict, feats: cache_io.FeatureCache, fractions: np.ndarray,
                         splits: list[Splits], config: ProbeRunConfig) -> None:
    """Refuse a head whose training rows (recomputed from the rule it recorded) include any
    row a seed of this probe tests on (in domain or out of domain) or selects on."""
    if "test_fraction" not in training or "probe_val_fraction" not in training:
        raise UsageError(f"head {path!r} was trained by an older vlaug that did not hold out the probe's "
                         f"{'test' if 'test_fraction' not in training else 'validation'} rows, and may have been fitted on "
                         "rows this probe selects or tests on; train it again with vlaug train-box.")
    seen = training_rows(feats.domains, feats.splits, feats.labels, training.get("train_domains") or [], fractions,
                         training["test_fraction"], training["probe_val_fraction"])
    for s in splits:
        overlap = np.intersect1d(seen, s.test)
        if len(overlap):
            test_domains = sorted({d for d in feats.domains[np.intersect1d(seen, s.test_out)].tolist()})
            if test_domains:
                flags = " ".join(f"--train-domain {d}" for d in (config.train_domains or ["DOMAIN"]))
                raise UsageError(f"head {path!r} was trained on the domains {training.get('train_domains')}, which include "
                                 f"this probe's out-of-domain test domains {test_domains}; train it with vlaug train-box {flags}.")
            raise UsageError(f"head {path!r} was trained on {len(overlap)} of this probe's held-out test rows (it held out "
                             f"--test-fraction {training['test_fraction']}, this probe {config.test_fraction}); use the same "
                             "--test-fraction for both.")
        overlap = np.intersect1d(seen, s.val)
        if len(overlap):  # the rule's fractions differ (the validation rows are hashed past the test rows)
            held = f"--probe-val-fraction {training['probe_val_fraction']}"
            ours, fix = f"validates on --val-fraction {config.val_fraction}", f"--probe-val-fraction {config.val_fraction}"
            if training["test_fraction"] != config.test_fraction:
                held = f"--test-fraction {training['test_fraction']} and {held}"
                ours, fix = f"tests on --test-fraction {config.test_fraction} and {ours}", f"--test-fraction {config.test_fraction} {fix}"
            raise UsageError(f"head {path!r} was trained on {len(overlap)} of this probe's validation rows (it held out "
                             f"{held}; this probe {ours}); train it with vlaug train-box {fix}.")


def prepare(config: ProbeRunConfig) -> _Plan:
    """Check everything before any work: methods, heads against the cache, domains, protocol."""
    methods, skipped, from_all = _parse_methods(config)  # the options first (no cache read yet), then the files
    lodo = config.protocol != "single"
    selections = domainbed.parse_selections(config.selection) if lodo else ()
    _check_reweight(config, methods, from_all, skipped)
    budget = cache_io.parse_memory_budget(config.memory_budget)
    imbalance = parse_imbalance(config.imbalance)
    cache_io.check_output(config.out, config.overwrite, lambda p: (p / "report.json").is_file(), "vlaug report")
    manifest, warnings = _checked_cache(config, skipped)
    memory = cache_io.plan_memory(manifest, config.memory_budget, budget, resident=True)
    _check_streaming(config, methods, memory, from_all, warnings)
    feats = cache_io.read_metadata(config.features, allow_incomplete=True)
    if CLASSES_PROMPT_SET not in feats.texts:
        raise UsageError(f"cache {config.features!r} has no class prompts (texts.parquet); re-run vlaug embed.")
    domain_names, domain_index = np.unique(feats.domains, return_inverse=True)  # sorted names, index per row
    train_domains = check_domains(config.train_domains, [d for d in domain_names.tolist() if d])
    tasks = None
    if lodo:
        if (feats.domains == "").any():
            raise UsageError(f"--protocol leave-one-domain-out needs a domain for every row; cache {config.features!r} has "
                             f"{int((feats.domains == '').sum())} rows without one (embed a domain/class folder or a "
                             "manifest with a domain column).")
        test_domains = check_domains(config.test_domains, train_domains, "--test-domain")
        tasks = domainbed.plan_tasks(feats.labels, feats.domains, feats.splits, train_domains, test_domains, config.seeds,
                                     selections, config.holdout_fraction)
        folds = frozenset(i for i, t in enumerate(tasks) if t.role == domainbed.LODO)
        for m in methods:  # a fold's search is scored for the mean over its folds (_lodo_model), not for its own choice
            m.folds = folds
    _bind(methods, feats, train_domains, from_all, warnings,
          domain_sets=None if tasks is None else domainbed.training_domain_sets(tasks, train_domains))
    head_users = _resolve_head_sets(methods, tasks, feats, config)
    made_from = cache_io.read_text_templates(config.features, feats.manifest)
    heads = _load_heads(head_users, feats.manifest, config.features, warnings, made_from)
    chunk_rows = memory.chunk_rows(max(1 + m.extra_rows() for m in methods))  # streamed, a block grows by its extras
    data = _run_data(config, feats, domain_index, heads, memory, chunk_rows)
    fractions = id_fractions(cache_io.iter_ids(config.features))
    if lodo:
        data.balance_domains = True  # training-domain validation: the mean of the training domains' accuracies
        splits = [t.splits for t in tasks]
    else:
        splits = _seed_splits(config, feats, fractions, train_domains, imbalance)
        for path, ckpt in heads.items():
            _check_head_held_out(path, ckpt.config.get("training", {}), feats, fractions, splits, config)
    _bind(methods, feats, train_domains, from_all, warnings, splits)
    empty = classes_without_rows(feats.labels[splits[0].train], feats.classes)
    if empty:
        warnings.append(f"{len(empty)} of {len(feats.classes)} classes have no training rows (seed 0): "
                        f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
    return _Plan(methods, data, train_domains, splits, imbalance, memory, chunk_rows, warnings, made_from, fractions, tasks)


def _with_head(method: Method, head: str) -> Method:
    """``method`` with another head folder (a head of its set, for one task)."""
    clone = copy.copy(method)
    clone.head = head
    return clone


def _resolve_head_sets(methods: list[Method], tasks: list | None, feats: cache_io.FeatureCache,
                       config: ProbeRunConfig) -> list[Method]:
    """The methods whose heads are to be loaded: under --protocol leave-one-domain-out, each
    head-needing method's folder must be a set of heads from ``vlaug train-box --protocol
    leave-one-domain-out``; the method gets, per task, the head of its split seed trained
    without the task's test domain (and fold), checked never to have fitted a row the task
    validates or tests on (``task_heads``, by task index; ``set_heads``, by (seed, held-out
    domains)). Under --protocol single a set is refused."""
    from vlaug.protocols import in_out_splits
    from vlaug.train import HEAD_SET_NAME, is_head_set

    users = []
    for m in methods:
        if not m.head:
            continue
        if tasks is None:
            if is_head_set(m.head):
                raise UsageError(f"--method {m.group!r}: {m.head!r} is a set of heads for --protocol leave-one-domain-out; "
                                 "add that protocol, or give a head from vlaug train-box --protocol single.")
            users.append(m)
            continue
        if not is_head_set(m.head):
            raise UsageError(f"--method {m.group!r}: under --protocol leave-one-domain-out a head must not have seen the "
                             f"test domain nor the rows a selection validates on, per seed; train a set of heads with "
                             f"vlaug train-box FEATURES --protocol leave-one-domain-out --seeds {config.seeds} "
                             f"--selection {config.selection} --out {m.head}-domainbed and give that folder.")
        index = read_json_object(Path(m.head) / HEAD_SET_NAME, UsageError, "")
        members = {(h["seed"], tuple(sorted(h["held_out"]))): str(Path(m.head) / h["path"]) for h in index.get("heads", [])}
        if index.get("holdout_fraction") != config.holdout_fraction:
            raise UsageError(f"--method {m.group!r}: the heads of {m.head!r} were trained with --holdout-fraction "
                             f"{index.get('holdout_fraction')}, this probe splits with {config.holdout_fraction}; use the same.")
        # per (seed, held-out domains): the rows its head must never have fitted. Each task's head is trained without
        # its test domain (and fold); the leave-one-domain-out model, refitted on every training domain, takes the head
        # trained without the test domain alone, tested on its in rows and calibrated on the training domains' out rows
        needed: dict[tuple, list[np.ndarray]] = {}
        for t in tasks:
            needed.setdefault((t.seed, _held_out(t)), []).append(np.concatenate([t.splits.val, t.splits.test_out]))
            if t.role == domainbed.LODO:
                needed.setdefault((t.seed, (t.test_domain,)), []).append(np.concatenate([t.splits.test_out, t.calibration]))
        parts = {}
        for (seed, held), used in needed.items():
            path = members.get((seed, held))
            if path is None:
                raise UsageError(f"--method {m.group!r}: {m.head!r} has no head for seed {seed} without {' and '.join(held)}; "
                                 f"train the set with vlaug train-box FEATURES --protocol leave-one-domain-out --seeds "
                                 f"{config.seeds} --selection {config.selection}.")
            if seed not in parts:
                parts[seed] = in_out_splits(feats.labels, feats.domains, feats.splits,
                                            [d for d in np.unique(feats.domains).tolist()], seed, config.holdout_fraction)
            seen = np.concatenate([parts[seed][d][0] for d in parts[seed] if d not in held])
            if np.isin(np.concatenate(used), seen).any():  # a set from another cache or split: never fitted on what it scores
                raise UsageError(f"--method {m.group!r}: head {path!r} was trained on rows this probe validates or tests on "
                                 "(another cache, split or --holdout-fraction); train the set again on this cache.")
        m.task_heads, m.set_heads = {i: members[t.seed, _held_out(t)] for i, t in enumerate(tasks)}, members
        m.head = m.task_heads[0]
        users += [_with_head(m, members[key]) for key in needed]
    return users


def _held_out(task: domainbed.Task) -> tuple[str, ...]:
    """The domains a task's head must have been trained without: its test domain, and a fold's."""
    return tuple(sorted({task.test_domain, task.fold} - {""}))


def _checked_cache(config: ProbeRunConfig, skipped: list[str]) -> tuple[cache_io.CacheManifest, list[str]]:
    """The cache's manifest, refused when unlabeled or incomplete (unless allowed), and the
    run's warnings so far (``skipped`` methods, an incomplete cache)."""
    manifest = cache_io.read_manifest(config.features)
    check_labeled(manifest, config.features, "vlaug probe")
    cache_io.check_complete(config.features, manifest, config.allow_incomplete)
    warnings = list(skipped)
    if manifest.n_missing:
        warnings.append(f"INCOMPLETE CACHE (--allow-incomplete): {manifest.n_missing} of {manifest.n_inputs} inputs "
                        "were never embedded; these numbers cover only the rows the cache holds")
    return manifest, warnings


def _bind(methods: list[Method], feats: cache_io.FeatureCache, train_domains: list[str], from_all: set[str],
          warnings: list[str], splits: list[Splits] | None = None, domain_sets: list[list[str]] | None = None) -> None:
    """Each method against the cache (its prompt sets; under leave-one-domain-out against each
    fit's training domains, ``domain_sets``), or with ``splits`` against the protocol's
    splits, before any work; under ``--method all`` what this cache cannot run is left out,
    with its reason."""
    for m in list(methods):
        try:
            if splits is not None:
                note = m.check_splits(splits)
            elif domain_sets is not None:
                note = m.bind_tasks(feats, domain_sets)
            else:
                note = m.bind(feats, train_domains)
        except UsageError as e:
            if m.text not in from_all:
                raise
            methods.remove(m)
            note = f"{m.name} skipped: {str(e).split(': ', 1)[-1].rstrip('.')}"
        if note:
            warnings.append(note)


def _run_data(config: ProbeRunConfig, feats: cache_io.FeatureCache, domain_index: np.ndarray, heads: dict,
              memory: cache_io.MemoryPlan, chunk_rows: int) -> RunData:
    """What the methods share: the embeddings resident in their stored precision (float16
    stays float16) on the device, or streamed from disk; labels, domains, class prompts, heads."""
    device = resolve_device(config.device)
    resident = None if memory.streamed else cache_io.read_embeddings(config.features, feats.manifest)
    return RunData(
        feats=feats,
        x=None if resident is None else torch.as_tensor(resident, device=device),
        y=torch.as_tensor(feats.labels, device=device),
        dom=torch.as_tensor(domain_index.reshape(-1), device=device, dtype=torch.long),
        text=torch.as_tensor(feats.texts[CLASSES_PROMPT_SET], device=device),
        heads=heads, settings=config.method_settings(), device=device,
        chunks=(lambda: cache_io.iter_embeddings(config.features, chunk_rows)) if memory.streamed else None,
        features=config.features,
    )


def _seed_splits(config: ProbeRunConfig, feats: cache_io.FeatureCache, fractions: np.ndarray, train_domains: list[str],
                 imbalance: tuple[float, int] | None) -> list[Splits]:
    """The protocol of every seed, checked now so that a bad --shots fails before any training."""
    splits = [make_splits(feats.labels, feats.domains, feats.splits, fractions=fractions,
                          train_domains=train_domains if config.train_domains else [], seed=seed,
                          test_fraction=config.test_fraction, val_fraction=config.val_fraction, shots=config.shots,
                          imbalance=imbalance, class_names=feats.classes, val_shots=config.val_shots)
              for seed in range(config.seeds)]
    for seed, s in enumerate(splits):
        if not len(s.train) or not len(s.val):
            raise UsageError(f"seed {seed}: {s.sizes()} rows; the protocol leaves no training or validation rows.")
    return splits


def _predict(probe: LinearProbe, data: RunData, rows: np.ndarray) -> torch.Tensor:
    pred = torch.empty(len(rows), dtype=torch.long, device=data.device)
    for pos, x in data.stream(rows):
        pred[torch.as_tensor(pos, device=data.device)] = probe.predict_proba(x).argmax(1)
    return pred


def evaluate_probe(probe: LinearProbe, data: RunData, splits: Splits) -> dict:
    """Accuracies of a probe on one seed's test rows (fractions)."""
    return _scored(probe, data, splits)[0]


def _scored(probe: LinearProbe, data: RunData, splits: Splits) -> tuple[dict, torch.Tensor]:
    """:func:`evaluate_probe`'s accuracies and the predicted label of every test row (in
    ``splits.test``'s order)."""
    pred = _predict(probe, data, np.asarray(splits.test))
    y = data.y[data.rows(splits.test)]
    n_in = len(splits.test_in)
    per_domain = {}
    names = data.feats.domains[splits.test]
    for d in np.unique(names).tolist():
        mask = torch.as_tensor(names == d, device=data.device)
        per_domain[d or "(none)"] = metrics.accuracy(pred[mask], y[mask])
    row = {
        "in_domain": metrics.accuracy(pred[:n_in], y[:n_in]),
        "out_of_domain": metrics.accuracy(pred[n_in:], y[n_in:]),
        "extended": metrics.accuracy(pred, y),
        "balanced_accuracy": metrics.balanced_accuracy(pred, y),
        "per_domain": per_domain,
    }
    if splits.reduced_classes:
        reduced = torch.isin(y, torch.as_tensor(splits.reduced_classes, device=data.device))
        row["reduced_classes"] = metrics.accuracy(pred[reduced], y[reduced])
        row["other_classes"] = metrics.accuracy(pred[~reduced], y[~reduced])
    return row, pred


def _geometry_rows(splits: Splits, seed: int) -> np.ndarray:
    """The training rows behind the feature geometry and plots: all of them, or a seeded
    sample of GEOMETRY_ROWS (in cache order)."""
    rows = np.asarray(splits.train)
    if len(rows) > GEOMETRY_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, GEOMETRY_ROWS, replace=False))
    return rows


def _augmented_sample(method: Method, data: RunData, x: torch.Tensor, rows: np.ndarray, seed: int):
    """(x + the method's extras, their hard labels) for the sampled rows ``rows`` whose
    embeddings ``x`` are already in memory (one block, drawn like block 0 of a fit)."""
    r = data.rows(rows)
    extra = method.augmenter(data, rows)(data, x, data.y[r], data.dom[r], block_generator(seed, 0))
    if extra is None:
        return x, data.y[r]
    return torch.cat([x, extra[0]]), torch.cat([data.y[r], extra[1].argmax(1)])


def _feature_geometry(x_orig, y_orig, x_all, y_all, seed) -> dict:
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    return {
        "alignment": metrics.alignment(x_orig, y_orig, generator=g()),
        "uniformity": metrics.uniformity(x_orig, generator=g()),
        "alignment_augmented": metrics.alignment(x_all, y_all, generator=g()),
        "uniformity_augmented": metrics.uniformity(x_all, generator=g()),
    }


def summarise(results: list[dict], methods: list[str]) -> list[dict]:
    """Mean and std (population, over seeds) of each accuracy, per method."""
    summary = []
    for method in methods:
        rows = [r for r in results if r["method"] == method]
        entry = {"method": method, "n_seeds": len(rows)}
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


def _with_search(fit) -> dict:
    """What a fit chose and, for methods that search, every candidate it tried."""
    return {**fit.selection, "search": fit.search} if fit.search else dict(fit.selection)


def split_fingerprints(splits: Splits, fractions: np.ndarray) -> dict[str, str]:
    """A short hash of the row ids in each part of a split (from their id hashes, in any
    order): two reports with the same fingerprints trained, validated and tested on the same
    images."""
    def digest(rows: np.ndarray) -> str:
        return hashlib.sha256(np.sort(fractions[np.asarray(rows, dtype=np.int64)]).tobytes()).hexdigest()[:16]

    return {part: digest(getattr(splits, part)) for part in ("train", "val", "test_in", "test_out")}


def _protocol(config: ProbeRunConfig, plan: _Plan, geometry_rows: int) -> dict:
    classes, domains = plan.data.feats.classes, plan.data.feats.domains
    return {
        "train_domains": plan.train_domains,
        "test_domains": [d for d in np.unique(domains).tolist() if d and d not in plan.train_domains],
        "uses_cache_splits": bool((plan.data.feats.splits != "").any()),
        "seeds": list(range(config.seeds)),
        "splits": [{"seed": i, **s.sizes(), "reduced_classes": [classes[c] for c in s.reduced_classes],
                    "fingerprints": split_fingerprints(s, plan.fractions)}
                   for i, s in enumerate(plan.splits)],
        "shots": config.shots,
        # with --shots: validation rows per class (few-shot validation, issue 29), or "all" of the held-out ones
        "val_shots": None if config.shots is None else (config.val_shots if config.val_shots is not None
                                                         else min(config.shots_list[-1], FEW_SHOT_VAL)),
        "imbalance": {"percent_of_classes": plan.imbalance[0], "n_images": plan.imbalance[1]} if plan.imbalance else None,
        "weight_decay_grid": list(plan.data.settings.grid),
        "grid_extension_decades": GRID_EXTENSION_DECADES,  # the most decades a search goes past the grid
        "zero_shot_temperature": TEMPERATURE,
        "streamed": plan.memory.streamed,
        "passes_over_cache": plan.data.passes,  # reads of the whole cache from disk (streamed)
        "memory_budget_bytes": plan.memory.budget,
        "geometry_rows": geometry_rows,
    }


def _seed0_samples(plan: _Plan, sample: np.ndarray, x_sample: torch.Tensor):
    """Seed 0's augmented sample of each method (drawn like block 0 of its fit, so known
    before any fit): the feature geometry per method, and the projections of the methods
    that add rows."""
    geometry, projections = [], {}
    for method in plan.methods:
        x_all, y_all = _augmented_sample(method, plan.data, x_sample, sample, 0)
        y = y_all[: len(sample)]
        geometry.append({"method": method.text, **_feature_geometry(x_sample, y, x_all, y_all, 0)})
        if len(x_all) > len(sample):
            projections[method.text] = (x_all.cpu().numpy(), y_all.cpu().numpy(), len(sample))
    return geometry, projections


def _fit_all(plan: _Plan, progress: bool) -> dict[tuple[int, str], "Fit"]:
    """Every method on every split of the plan (a seed's, or a task of the DomainBed
    protocol): the fits by (split index, method text)."""
    from tqdm.auto import tqdm

    data, methods = plan.data, plan.methods
    bar = tqdm(total=len(plan.splits) * len(methods), desc="probe", unit="fit", disable=not progress, file=sys.stderr)
    fits = {}
    solver = ProbeSolver(data, plan.splits)
    # the probe methods' weight-decay searches, as one batch (not those with a head per task: each task's own rows)
    searched = solver.search_together([m for m in methods if not getattr(m, "task_heads", None)])
    for method in methods:  # a method's seeds together: it may share work between them (Method.fit_seeds)
        if getattr(method, "task_heads", None):  # DomainBed's tasks, each with the head trained without its domains
            for i, split in enumerate(plan.splits):
                fits[i, method.text] = _with_head(method, method.task_heads[i]).fit(data, split, i)
        else:
            for seed, fit in enumerate(method.fit_seeds(data, plan.splits, solver, searched.get(method.text))):
                fits[seed, method.text] = fit
        release_memory()  # the fits' temporaries, before the next method
        bar.update(len(plan.splits))
    bar.close()
    return fits


def _fit_every_seed(plan: _Plan, progress: bool):
    """Every method on every seed: per-seed result rows, and seed 0's fits (their selections)."""
    data, methods = plan.data, plan.methods
    results, first_fits = [], {}
    fits = _fit_all(plan, progress)
    predictions = []
    for seed, splits in enumerate(plan.splits):
        for method in methods:
            fit = fits.pop((seed, method.text))
            row, pred = _scored(deploy(method, data, fit, splits.val), data, splits)
            results.append({"method": method.text, "seed": seed, **row, "selection": fit.selection,
                            **({"shots": plan.shots} if plan.shots is not None else {})})
            predictions.append((method.text, seed, np.asarray(splits.test), pred.cpu().numpy().astype(np.int32)))
            if seed == 0:
                first_fits[method.text] = fit
    return results, first_fits, predictions


def deploy(method: Method, data: RunData, fit, val: np.ndarray) -> LinearProbe:
    """The probe a method deploys from one seed's ``fit``: its weights, and for an ensemble
    (or a gate) both sides calibrated on that seed's validation rows ``val`` (recorded in
    ``fit.selection["calibration"]``), as every candidate was when it was selected
    (:meth:`~vlaug.methods.base.Method.deployed_scores`)."""
    if method.ensemble or fit.gate:
        fit.selection["calibration"] = data.calibration(fit.W, fit.b, np.asarray(val))
    return data.make_probe(fit.W, fit.b, method.ensemble, fit.selection.get("calibration"), fit.gate, fit.parts)


def _prediction_table(predictions: list[tuple], data: RunData, features: str) -> dict:
    """Every test row's prediction, per method and seed (``test_predictions.parquet``): what a
    paired comparison of two methods resamples (same rows, same seeds). The string columns
    are :class:`~vlaug.runs.Coded` (codes into their distinct values)."""
    rows = np.concatenate([p[2] for p in predictions]) if predictions else np.zeros(0, np.int64)
    wanted, back = np.unique(rows, return_inverse=True)
    ids, offset = np.empty(len(wanted), dtype=object), 0
    for chunk in cache_io.iter_ids(features) if len(wanted) else ():  # part by part: only the test rows' ids are kept
        lo, hi = np.searchsorted(wanted, [offset, offset + len(chunk)])
        ids[lo:hi] = [chunk[i - offset] for i in wanted[lo:hi]]
        offset += len(chunk)
    back = back.astype(np.int32)
    domains, domain_of = np.unique(data.feats.domains[wanted], return_inverse=True)
    table = {"method": Coded.of([(p[0], len(p[2])) for p in predictions]),
             "seed": np.concatenate([np.full(len(p[2]), p[1], np.int32) for p in predictions] or [np.zeros(0, np.int32)]),
             "row": rows.astype(np.int64), "id": Coded(back, ids),
             "domain": Coded(domain_of.astype(np.int32)[back], domains.astype(object)),
             "label": data.feats.labels[rows].astype(np.int32),
             "prediction": np.concatenate([p[3] for p in predictions] or [np.zeros(0, np.int64)]).astype(np.int32)}
    if predictions and len(predictions[0]) > 4:  # --protocol leave-one-domain-out: which model predicted
        table["test_domain"] = Coded.of([(p[4], len(p[2])) for p in predictions])
        table["model_selection"] = Coded.of([(p[5], len(p[2])) for p in predictions])
    return table


def run_probe(config: ProbeRunConfig, log: Callable[[str], None] | None = None, plots: Plots | None = None) -> ProbeRun:
    """Evaluate every method on every seed; refit each on seed 0's train + val rows.
    ``plots``: a :class:`~vlaug.runs.Plots` (:class:`~vlaug.report.PlotWorker`) given each plot as soon as its data is
    known (drawn there while this process fits; :func:`~vlaug.report.write_report` writes them).

    Raises:
        UsageError / CacheMismatchError / CheckpointError: bad input, found before training.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    sweep = config.shots_list if isinstance(config.shots, tuple) else ()
    # a sweep is checked at its largest K (the draw most likely to lack rows) before any training
    plan = prepare(replace(config, shots=sweep[-1]) if sweep else config)
    m = plan.data.feats.manifest
    # a small cache runs on one thread: its operators are too small to share (see devices.threads_for)
    with threads_for(m.n_images * m.embed_dim * len(m.classes) * config.grid_size, plan.data.device):
        if sweep:
            return _run_sweep(plan, config, log)
        return _run(replace(plan, shots=config.shots), config, log, plots)


def _run_sweep(plan: _Plan, config: ProbeRunConfig, log: Callable[[str], None]) -> ProbeRun:
    """--shots K1,K2,...: one run per K on the same seeds (each seed's draws nested: the K-shot
    rows hold the smaller K's), merged into one report: every result carries its ``shots``,
    ``shots_sweep`` holds each K's summary and splits, the tables and plots of the report's
    top level, and the saved probes, are the largest K's."""
    runs = []
    for i, k in enumerate(config.shots_list):
        sub = replace(config, shots=k)
        splits = _seed_splits(sub, plan.data.feats, plan.fractions, plan.train_domains, plan.imbalance)
        runs.append(_run(replace(plan, splits=splits, shots=k, warnings=plan.warnings if i == 0 else []), sub, log, None))
    last = runs[-1]
    report = dict(last.report)
    report["config"] = {**report["config"], "shots": list(config.shots_list)}
    report["results"] = [r for run in runs for r in run.report["results"]]
    report["warnings"] = runs[0].report["warnings"]
    report["shots_sweep"] = {
        "shots": list(config.shots_list),
        "per_shots": [{"shots": k, "val_shots": run.report["protocol"]["val_shots"], "splits": run.report["protocol"]["splits"],
                       "summary": run.report["summary"], "seconds": run.report["seconds"]}
                      for k, run in zip(config.shots_list, runs)],
        "probes_and_plots": f"the {config.shots_list[-1]}-shot run's (accuracy, per-domain and trade-off plots, saved probes)",
    }
    report["seconds"] = sum(run.report["seconds"] for run in runs)
    predictions = {}
    for k, run in zip(config.shots_list, runs):
        for name, column in run.test_predictions.items():
            predictions.setdefault(name, []).append(column)
        predictions.setdefault("shots", []).append(np.full(len(run.test_predictions["row"]), k, dtype=np.int32))
    return replace(last, report=report, test_predictions={k: Coded.concat(v) if isinstance(v[0], Coded) else np.concatenate(v)
                                                          for k, v in predictions.items()})


def _run(plan: _Plan, config: ProbeRunConfig, log: Callable[[str], None], plots: Plots | None) -> ProbeRun:
    data, methods = plan.data, plan.methods
    for warning in plan.warnings:
        log(f"WARNING: {warning}")
    if plan.memory.streamed:
        log(plan.memory.streaming_note(plan.chunk_rows, "every evaluation of the probe's objective reads the cache once"))
    release_memory()  # what reading the cache left behind
    start = time.perf_counter()
    m = data.feats.manifest
    sample = _geometry_rows(plan.splits[0], 0)
    x_sample = data.gather(sample)  # read once (streamed: one pass), shared by every method's geometry and the plot
    first_train = (x_sample.cpu().numpy(), data.feats.labels[sample], data.feats.domains[sample])
    geometry, projections = _seed0_samples(plan, sample, x_sample)
    box_stats = {x.head: checkpoint.read_head_stats(x.head) for x in methods if x.plots_box_volumes}
    if plots is not None and not config.tsne:  # drawn while the probes are fitted (a t-SNE, on every core, after them)
        plots.submit_data(first_train, projections, config.tsne, m.classes, box_stats)
    if plan.tasks is not None:
        return _run_domainbed(plan, config, plots, start, (sample, first_train, geometry, projections, box_stats))
    results, first_fits, predictions = _fit_every_seed(plan, config.progress)
    report = {
        "vlaug_version": __version__,
        "features": str(Path(config.features).resolve()),
        "model": m.model,
        "pretrained": m.pretrained,
        "embed_dim": m.embed_dim,
        "classes": m.classes,
        "templates": m.templates,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k not in ("overwrite", "progress")},
        "protocol": _protocol(config, plan, int(len(sample))),
        "methods": [{"method": x.text, "name": x.name, "head": x.head, "options": x.options.to_dict(),
                     "search": x.search_space(),
                     "head_config": data.heads[x.head].config["head"] if x.head else None,
                     "selection_seed0": _with_search(first_fits[x.text])} for x in methods],
        "results": results,
        "summary": summarise(results, [x.text for x in methods]),
        "feature_geometry": geometry,
        "seconds": None,  # below, once the probes are refitted
        "warnings": plan.warnings,
        "incomplete_cache": bool(m.n_missing),
    }
    if plots is not None:  # drawn while the probes are refitted and written
        plots.submit_results(report)
    # the probes users keep: first seed, refitted on train + val at the chosen hyperparameters
    refit_rows = np.concatenate([plan.splits[0].train, plan.splits[0].val])
    probes = {}
    for method in methods:
        chosen = first_fits[method.text].selection
        fit = method.refit(data, refit_rows, 0, chosen)
        probes[method.text] = data.make_probe(fit.W, fit.b, method.ensemble, chosen.get("calibration"), fit.gate, fit.parts).cpu()
    report["seconds"] = time.perf_counter() - start
    return ProbeRun(
        report=report, probes=probes, cache=checkpoint.cache_identity(m), first_train=first_train,
        projections=projections, box_stats=box_stats, texts_used=_texts_used(methods, plan.texts_made_from),
        test_predictions=_prediction_table(predictions, data, config.features),
    )


def _run_domainbed(plan: _Plan, config: ProbeRunConfig, plots: Plots | None, start: float, seen: tuple) -> ProbeRun:
    """--protocol leave-one-domain-out: every task fitted, each selection's model per method,
    seed and test domain scored on the test domain's ``in`` rows (:mod:`vlaug.domainbed`)."""
    sample, first_train, geometry, projections, box_stats = seen
    data, m = plan.data, plan.data.feats.manifest
    fits = _fit_all(plan, config.progress)
    results, predictions = _domainbed_results(plan, fits)
    groups = list(dict.fromkeys(x.group for x in plan.methods))
    test_domains = list(dict.fromkeys(t.test_domain for t in plan.tasks))
    report = {
        "vlaug_version": __version__,
        "features": str(Path(config.features).resolve()),
        "model": m.model,
        "pretrained": m.pretrained,
        "embed_dim": m.embed_dim,
        "classes": m.classes,
        "templates": m.templates,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items() if k not in ("overwrite", "progress")},
        "protocol": _domainbed_protocol(config, plan, test_domains, int(len(sample))),
        "methods": [{"method": g, "name": members[0].name, "options": members[0].options.to_dict(),
                     "search": members[0].search_space(),
                     "configurations": [x.config for x in members], "n_configurations": _n_configurations(members, fits)}
                    for g in groups for members in [[x for x in plan.methods if x.group == g]]],
        "results": results,
        "tables": domainbed.tables(results, groups, test_domains),
        "feature_geometry": geometry,
        "seconds": time.perf_counter() - start,
        "warnings": plan.warnings,
        "incomplete_cache": bool(m.n_missing),
    }
    if plots is not None:
        plots.submit_results(report)
    return ProbeRun(report=report, probes={}, cache=checkpoint.cache_identity(m), first_train=first_train,
                    projections=projections, box_stats=box_stats, texts_used=_texts_used(plan.methods, plan.texts_made_from),
                    test_predictions=_prediction_table(predictions, data, config.features))


def _n_configurations(members: list[Method], fits: dict) -> int:
    """How many configurations a method's selection chose among (DomainBed's point: more
    configurations, more chances): its listed configurations × the candidates of its own
    search on the grid (the probe's weight decays, a joint method's lr × weight decay; not
    the values a search added past the grid's end; Tip-Adapter's (α, β), whose search a fit
    does not keep: its ``n_candidates``), on the first task."""
    def candidates(x: Method) -> int:
        fit = fits.get((0, x.text))
        if fit is None:
            return 1
        return fit.selection.get("n_candidates") or max(1, len([e for e in fit.search if not e.get("extension")]))
    return sum(candidates(x) for x in members)


def _domainbed_protocol(config: ProbeRunConfig, plan: _Plan, test_domains: list[str], geometry_rows: int) -> dict:
    feats = plan.data.feats
    per_seed = {}
    for t in plan.tasks:
        if t.role != domainbed.LODO and t.seed not in per_seed:
            per_seed[t.seed] = t
    return {
        "name": config.protocol,
        "domains": plan.train_domains,
        "test_domains": test_domains,
        "selections": list(dict.fromkeys(t.role for t in plan.tasks)),
        "holdout_fraction": config.holdout_fraction,
        "uses_cache_splits": bool((feats.splits != "").any()),
        "seeds": list(range(config.seeds)),
        "tasks": [{"seed": t.seed, "test_domain": t.test_domain, "role": t.role, "fold": t.fold,
                   "train": int(len(t.splits.train)), "val": int(len(t.splits.val)), "test": int(len(t.splits.test_out)),
                   "fingerprints": split_fingerprints(t.splits, plan.fractions)} for t in plan.tasks],
        "weight_decay_grid": list(plan.data.settings.grid),
        "grid_extension_decades": GRID_EXTENSION_DECADES,  # the most decades a search goes past the grid
        "zero_shot_temperature": TEMPERATURE,
        "streamed": plan.memory.streamed,
        "passes_over_cache": plan.data.passes,
        "memory_budget_bytes": plan.memory.budget,
        "geometry_rows": geometry_rows,
    }


def _domainbed_results(plan: _Plan, fits: dict) -> tuple[list[dict], list[tuple]]:
    """One result per method (its configurations together) × seed × test domain × selection:
    the selection's model scored on the test domain's ``in`` rows; and its predictions."""
    data, tasks = plan.data, plan.tasks
    groups: dict[str, list[Method]] = {}
    for x in plan.methods:
        groups.setdefault(x.group, []).append(x)
    where = {(t.seed, t.test_domain, t.role): i for i, t in enumerate(tasks) if t.role != domainbed.LODO}
    folds: dict[tuple[int, str], list[int]] = {}
    for i, t in enumerate(tasks):
        if t.role == domainbed.LODO:
            folds.setdefault((t.seed, t.test_domain), []).append(i)
    refit_seed = len(tasks)  # the refits' seeds: past every task's (methods keep per-seed state from their fits)
    results, predictions = [], []
    for seed, test in dict.fromkeys((t.seed, t.test_domain) for t in tasks):
        for group, members in groups.items():
            n_conf = _n_configurations(members, fits)
            for role in [r for r in domainbed.SELECTIONS if any(t.role == r for t in tasks)]:
                if role == domainbed.LODO:
                    x, fit, test_rows, chosen = _lodo_model(data, members, fits, [tasks[i] for i in folds[seed, test]],
                                                            folds[seed, test], refit_seed)
                    refit_seed += 1
                else:
                    task = tasks[where[seed, test, role]]
                    i = where[seed, test, role]
                    scores = [(fits[i, x.text].selection.get("val_accuracy", float("-inf")),
                               fits[i, x.text].selection.get("val_log_loss", float("inf"))) for x in members]
                    x = members[domainbed.best_config(scores)]
                    fit, test_rows = fits[i, x.text], task.splits.test_out
                    deploy(x, data, fit, task.splits.val)
                    chosen = fit.selection
                    if len(members) > 1:  # every configuration's best candidate, as the selection compared them
                        chosen = {**chosen, "configurations": [{"config": y.config, "val_accuracy": a, "val_log_loss": ll}
                                                               for y, (a, ll) in zip(members, scores)]}
                probe = data.make_probe(fit.W, fit.b, x.ensemble, fit.selection.get("calibration"), fit.gate, fit.parts)
                row, pred = _scored(probe, data, Splits(domainbed.EMPTY, domainbed.EMPTY, domainbed.EMPTY, test_rows))
                results.append({"method": group, "seed": seed, "test_domain": test, "model_selection": role,
                                "out_of_domain": row["out_of_domain"], "balanced_accuracy": row["balanced_accuracy"],
                                "n_test_rows": int(len(test_rows)), "config": x.config, "n_configurations": n_conf,
                                "selection": chosen})
                predictions.append((group, seed, np.asarray(test_rows), pred.cpu().numpy().astype(np.int32), test, role))
    return results, predictions


def _lodo_model(data: RunData, members: list[Method], fits: dict, fold_tasks: list, fold_index: list[int],
                refit_seed: int):
    """Leave-one-domain-out selection for one seed and test domain: each configuration's
    candidates scored by their mean over the folds, the best one refitted on every training
    domain's ``in`` rows (the folds' training and validation rows together); an ensemble or
    gate is calibrated on the training domains' ``out`` rows, which no selection used."""
    choices, extended = [], []
    for x in members:
        searches = [fits[i, x.text].search or [fits[i, x.text].selection] for i in fold_index]
        if x.extends_grid():  # past an end of the grid that the mean over the folds chose, every fold a decade further
            def candidate(k: int, wd: float, x=x) -> dict:
                i = fold_index[k]
                fold = _with_head(x, x.task_heads[i]) if getattr(x, "task_heads", None) else x
                return fold.fold_candidate(data, fold_tasks[k].splits, i, wd)

            choice, info = domainbed.extended_choice(searches, candidate, GRID_EXTENSION_DECADES)
        else:
            choice, info = domainbed.lodo_choice(searches), {}
        choices.append(choice)
        extended.append(info)
    scores = [(c[0]["val_accuracy"], c[0]["val_log_loss"]) if c else (float("-inf"), float("inf")) for c in choices]
    k = domainbed.best_config(scores)
    x, (best, means) = members[k], choices[k]
    first = fits[fold_index[0], x.text].selection
    chosen = {**{key: v for key, v in first.items() if key not in _PER_FIT}, **best, **extended[k],
              "folds": [t.fold for t in fold_tasks], "candidates": means}
    epochs = [fits[i, x.text].selection.get("selected_epoch") for i in fold_index]
    if all(e is not None for e in epochs):  # an adapter trains for the mean of its folds' epochs (as a joint method's steps)
        chosen["selected_epoch"] = int(round(np.mean(epochs)))
    if len(means) > REPORTED_CANDIDATES:  # Tip-Adapter's 4,000 (α, β): the best ones, best first
        order = sorted(range(len(means)), key=lambda j: (-means[j]["val_accuracy"], means[j]["val_log_loss"], j))
        chosen["candidates"], chosen["n_candidates"] = [means[j] for j in order[:REPORTED_CANDIDATES]], len(means)
    if len(members) > 1:  # every configuration's best mean over the folds
        chosen["configurations"] = [{"config": y.config, "val_accuracy": a, "val_log_loss": ll} for y, (a, ll) in zip(members, scores)]
    train = np.union1d(fold_tasks[0].splits.train, fold_tasks[0].splits.val)
    calibration_rows = fold_tasks[0].calibration
    if getattr(x, "set_heads", None):  # the head trained on every training domain (without the test domain)
        x = _with_head(x, x.set_heads[fold_tasks[0].seed, (fold_tasks[0].test_domain,)])
    fit = x.refit(data, train, refit_seed, chosen)
    if isinstance(x, ProbeMethod) and type(x).gate_for is not ProbeMethod.gate_for:  # set on these rows, as a fit sets it
        fit.gate = x.gate_for(data, train, calibration_rows)
        fit.selection["gate"] = {**fit.selection.get("gate", {}),  # the refit's, not fold 0's
                                 **{k: fit.gate[k] for k in ("center", "width", "max", "val_rows_past_center") if k in fit.gate}}
    deploy(x, data, fit, calibration_rows)
    return x, fit, fold_tasks[0].splits.test_out, fit.selection


# what a fit records about itself, not about the configuration chosen (left out of a leave-one-domain-out choice)
_PER_FIT = ("val_accuracy", "val_log_loss", "iterations", "converged", "stalled", "n_train_rows", "steps", "stopped",
            "selected_step", "selected_epoch", "epochs", "n_val_rows", "calibration", "grid_extended", "grid", "selected_on",
            "refit")
# a leave-one-domain-out result's report.json lists at most this many candidates' means over the folds (the best)
REPORTED_CANDIDATES = 50


def _texts_used(methods: list[Method], made_from: dict[str, list[str]]) -> dict[str, dict]:
    """Per method, the prompt sets its probe's predictions use (the class prompts, for
    zero-shot and ensembles; the probe stores their embeddings), with their templates."""
    return {x.text: {name: made_from.get(name, []) for name in x.prompt_sets()} for x in methods}


def predict(features: str, probe_dir: str, out: str, overwrite: bool = False, device: str = "auto") -> dict:
    """Classify every row of a cache with a probe saved by ``vlaug probe``; write a Parquet
    file with ``id``, ``path``, the predicted ``label`` and ``class_name`` and the
    ``probabilities``, in the cache's class order (the probe's for an unlabeled cache).

    The cache may be unlabeled (a flat folder or a path-only manifest), or list the probe's
    classes in another order (mapped by name).

    Returns:
        ``out``, ``n``, ``accuracy_against_cache_labels`` (None without labels) and
        ``class_order`` (``"same"``, ``"mapped by name"`` or ``"probe's (unlabeled cache)"``).

    Raises:
        CheckpointError: not a probe; CacheMismatchError: the cache was embedded with
            another model or dimension, or has another class set; UsageError: ``out`` exists.
    """
    if Path(out).is_dir():
        raise UsageError(f"--out {out!r} is a folder; pass a file name such as predictions.parquet.")
    out_path = cache_io.check_output(out, overwrite, lambda p: p.is_file(), "predictions file")
    ckpt = checkpoint.load_head(probe_dir)
    if ckpt.kind != "probe":
        raise UsageError(f"--probe {probe_dir!r} is a {ckpt.kind} head, not a probe; use a folder from REPORT_DIR/probes/.")
    feats = cache_io.read_metadata(features, allow_incomplete=True)  # the embeddings are streamed: any cache size fits
    order = checkpoint.check_head_matches_cache(ckpt.cache, feats.manifest, probe_dir, features)
    labeled = bool(feats.classes)
    classes = feats.classes if labeled else list(ckpt.cache["classes"])
    dev = resolve_device(device)
    probe = ckpt.module.to(dev)
    probs = [probe.predict_proba(torch.as_tensor(emb, device=dev)).cpu() for _, emb in cache_io.iter_embeddings(features)]
    probs = torch.cat(probs) if probs else torch.zeros(0, len(classes))
    if order is not None:  # the probe's column j is the cache's class order[j]
        mapped = torch.empty_like(probs)
        mapped[:, torch.as_tensor(order)] = probs
        probs = mapped
    pred = probs.argmax(1).numpy()
    ids_paths = cache_io.read_columns(features, ["id", "path"])
    cache_io.write_predictions(out_path, ids_paths["id"].tolist(), pred, classes, probs.numpy(), paths=ids_paths["path"].tolist())
    has_labels = feats.labels >= 0
    agreement = float((pred[has_labels] == feats.labels[has_labels]).mean()) if labeled and has_labels.any() else None
    return {"out": str(out_path), "n": len(feats), "accuracy_against_cache_labels": agreement,
            "class_order": "same" if order is None and labeled else "mapped by name" if labeled else "probe's (unlabeled cache)"}