"""Stage 1: source -> encoder -> feature cache, resumable.

DataLoader workers open, decode and preprocess images in parallel with the model; a
file that cannot be read is recorded in ``failed.parquet`` and the run goes on. Rows
are committed in parts (temporary file + rename, then the manifest); re-running the
same command after an interruption embeds only what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from vlaug import cache
from vlaug.encoders import (
    CLASSES_PROMPT_SET,
    EncoderSpec,
    check_encoder_spec,
    load_encoder,
    parse_prompt_sets,
    resolve_templates,
)
from vlaug.choices import STORAGE_DTYPES
from vlaug.errors import CacheMismatchError, UsageError, VlaugError
from vlaug.shards import read_member
from vlaug.sources import ImageRecord, Layout, Source, load_source, read_class_file

@dataclass(frozen=True)
class EmbedConfig:
    """Everything ``vlaug embed`` needs; the defaults are the CLI's."""

    source: str = ""  # image folder or CSV/Parquet manifest
    out: str = ""  # cache directory to create or resume
    model: str = "ViT-B-32"  # open_clip model name, hf-hub:ORG/REPO or local-dir:PATH
    pretrained: str = "laion2b_s34b_b79k"  # tag, checkpoint file, or "none" (random weights)
    layout: str = "auto"  # auto | class | domain-class | manifest
    classes_file: str | None = None  # one class per line: fixes the class order
    class_key: str | None = None  # WebDataset: the member (cls) or json:FIELD holding the class; None: cls when present
    domain_key: str | None = None  # WebDataset: the member or json:FIELD holding the domain; None: no domains
    templates: str | None = None  # simple | openai | photo | FILE; None: the cache's own, or simple for a new cache
    prompt_sets: tuple[str, ...] = ()  # extra "NAME=TEMPLATE" / "NAME=@FILE" prompt sets (added to the cache's)
    device: str = "auto"  # auto | cpu | cuda[:N] | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast on GPU)
    batch_size: int = 64  # images per forward pass
    workers: int = -1  # DataLoader processes decoding images; -1 picks from the CPU count
    dtype: str = "float16"  # storage dtype of image embeddings
    part_size: int = 4096  # rows per committed part: the most work an interruption can lose
    seed: int = 0  # seeds random weights when pretrained is "none"
    overwrite: bool = False  # replace an existing cache made with other settings
    append: bool = False  # add the images of another source to an existing cache
    progress: bool = True  # show a progress bar on stderr

    def __post_init__(self):
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}, must be >= 1.")
        if self.part_size < 1:
            raise UsageError(f"--part-size {self.part_size}, must be >= 1.")
        if self.workers < -1:
            raise UsageError(f"--workers {self.workers}, must be >= 0 (or -1 for automatic).")
        if self.dtype not in STORAGE_DTYPES:
            raise UsageError(f"--dtype {self.dtype!r}, must be one of {STORAGE_DTYPES}.")
        try:
            Layout(self.layout)
        except ValueError:
            raise UsageError(f"--layout {self.layout!r}, must be one of {[m.value for m in Layout]}.") from None


@dataclass
class EmbedResult:
    out: str
    n_inputs: int  # inputs in the source
    n_embedded: int  # embedded in this run
    n_skipped: int  # already in the cache (resumed)
    n_failed: int  # could not be embedded (see failed.parquet)
    seconds: float  # wall time of the embedding loop
    n_removed: int = 0  # unfinished files of an interrupted run that were cleaned up
    failures: list[dict] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.n_embedded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"embedded {self.n_embedded}, skipped {self.n_skipped} (already in cache), failed {self.n_failed} "
            f"in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s) -> {self.out}"
        )


class EmbedInterrupted(VlaugError):
    """Ctrl-C during embedding; committed parts are kept (exit code 130)."""

    exit_code = 130


# ----------------------------------------------------------------------------- image loading


def load_image(path) -> Image.Image:
    """Open and fully decode an image as RGB.

    EXIF orientation is applied; transparent pixels are composited on white; 16-bit and
    float images are scaled to 8 bits. Truncated files and decompression bombs raise.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file raises here, not in a worker later
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(img, dtype=np.float64)
                hi = arr.max() if arr.size else 0.0
                arr = arr / hi * 255.0 if hi > 0 else arr
                img = Image.fromarray(arr.astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("RGB")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "unreadable"
    return f"{type(e).__name__}: {text}"[:300]


class _ImageDataset(torch.utils.data.Dataset):
    """Records -> (position, tensor or None, error or None); never raises for a bad file."""

    def __init__(self, records: list[ImageRecord], preprocess: Callable):
        self.records = records
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            record = self.records[i]
            source = read_member(record.path, record.member) if record.member else record.path  # inside a shard
            return i, self.preprocess(load_image(source)), None
        except Exception as e:  # any decoder error is a recorded failure, not a crash
            return i, None, _one_line(e)


def _collate(items):
    """Stack the good images; keep the positions of good and failed ones."""
    good = [(i, t) for i, t, err in items if err is None]
    failed = [(i, err) for i, _, err in items if err is not None]
    images = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], images, failed


def default_workers(device: torch.device) -> int:
    """Decoding workers: enough to hide decoding behind the model, leaving the model its cores."""
    n_cpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        return max(1, min(4, n_cpu // 2))
    return max(1, min(8, n_cpu - 1))


# ----------------------------------------------------------------------------- cache checks


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file. Pass a folder path for the feature cache.")
    if out.is_dir() and not cache.is_cache(out) and any(out.iterdir()):
        raise UsageError(
            f"--out {str(out)!r} exists, is not empty and is not a vlaug cache. Pass a new or empty folder."
        )


def _mismatches(old: cache.CacheManifest, new: cache.CacheManifest) -> list[str]:
    """What differs between an existing cache's images and the run asked for now (texts are
    not part of it: vlaug prompts changes them)."""
    diffs = []
    for key in ("model", "pretrained", "classes", "dtype"):
        a, b = getattr(old, key), getattr(new, key)
        if a != b:
            show = lambda v: repr(v) if len(repr(v)) < 80 else repr(v)[:77] + "..."  # noqa: E731
            diffs.append(f"{key}: cache has {show(a)}, this run asks for {show(b)}")
    if new.pretrained == "none" and old.seed != new.seed:
        diffs.append(f"seed of the random weights: cache has {old.seed}, this run asks for {new.seed}")
    if old.pretrained_sha256 and new.pretrained_sha256 and old.pretrained_sha256 != new.pretrained_sha256:
        diffs.append("checkpoint file contents changed since the cache was made (sha256 differs)")
    return diffs


def _text_changes(old: cache.CacheManifest, templates: list[str] | None, prompt_sets: dict[str, list[str]],
                  out: Path) -> list[str]:
    """Templates or prompt sets given now that would change the cache's texts: vlaug prompts does that."""
    show = lambda v: repr(v) if len(repr(v)) < 80 else repr(v)[:77] + "..."  # noqa: E731
    diffs = []
    if templates is not None and templates != old.templates:
        diffs.append(f"templates: cache has {show(old.templates)}, this run asks for {show(templates)}")
    diffs += [f"prompt set {name!r}: cache has {show(old.prompt_sets[name])}, this run asks for {show(t)}"
              for name, t in prompt_sets.items() if name in old.prompt_sets and old.prompt_sets[name] != t]
    if diffs:
        diffs[-1] += (f" (texts change without re-embedding any image: vlaug prompts {str(out)} --templates ... "
                      "or --prompt-set NAME=TEMPLATE)")
    return diffs


def _source_changes(old: cache.CacheManifest, source: Source, append: bool) -> list[str]:
    """Another source than the one(s) the cache was embedded from, without --append."""
    known = old.source_identities
    if append or not known or {"source": source.root, "layout": source.layout} in known:
        return []
    was = "; ".join(f"{k['source']} ({k['layout']} layout)" for k in known)
    return [f"source: cache holds images of {was}, this run reads {source.root} ({source.layout} layout); "
            "pass --append to add its images to the cache"]


def _check_append(out: Path, old: cache.CacheManifest, source: Source) -> Source:
    """The source of an --append run with its labels in the cache's class order; refused when
    it has classes the cache lacks or ids the cache holds for other files."""
    if bool(source.classes) != bool(old.classes):
        has, lacks = ("labels", "none") if old.classes else ("no labels", "labels")
        raise CacheMismatchError(
            f"--append: the cache {str(out)!r} has {has} and {source.root} has {lacks}; labeled and unlabeled images "
            "do not share a cache. Embed it into another --out."
        )
    extra = [c for c in source.classes if c not in old.classes]
    if extra:
        raise CacheMismatchError(
            f"--append: {source.root} has classes {extra[:5]} that the cache {str(out)!r} lacks (it has "
            f"{len(old.classes)}). Embed it into another --out, or list every class with --classes."
        )
    source = _in_class_order(source, old.classes)
    paths = {r.id: r.path for r in source.records}
    clash = []
    for table in cache.iter_metadata(out, ["id", "path"]):
        for i, p in zip(table.column("id").to_pylist(), table.column("path").to_pylist()):
            if i in paths and paths[i] != p:
                clash.append(i)
    if clash:
        raise CacheMismatchError(
            f"--append: {len(clash)} id(s) of {source.root} are already in {str(out)!r} for other files (e.g. "
            f"{clash[0]!r}; ids are paths relative to the source). Give the new source its own ids (a manifest "
            "with an 'id' column) or embed it into another --out."
        )
    return source


def _in_class_order(source: Source, classes: list[str]) -> Source:
    """``source`` with its labels indexing ``classes`` (which holds every class it has): an
    appended source's images are labeled in the cache's class order."""
    if source.classes == classes or not set(source.classes) <= set(classes):
        return source
    index = {c: i for i, c in enumerate(classes)}
    records = [r if r.class_name is None else dataclasses.replace(r, label=index[r.class_name]) for r in source.records]
    return dataclasses.replace(source, records=records, classes=list(classes))


def _remove_cache(out: Path) -> None:
    """Delete only what a cache consists of; other files in the folder are left alone."""
    for name in (cache.MANIFEST_NAME, cache.TEXTS_NAME, cache.FAILED_NAME):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / cache.IMAGES_DIR, ignore_errors=True)
    for f in out.glob(f"*{cache.TMP_MARKER}*"):
        f.unlink(missing_ok=True)


def _next_part_index(names: list[str], rank: int | None = None) -> int:
    """One past the highest index among the parts of this writer (a rank, or the single process)."""
    pattern = rf"part-r{rank}-(\d+)\.parquet" if rank is not None else r"part-(\d+)\.parquet"
    numbers = [int(m.group(1)) for n in names if (m := re.fullmatch(pattern, n))]
    return max(numbers, default=-1) + 1


# ----------------------------------------------------------------------------- torchrun


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_context() -> DistContext:
    """Rank and world size from torchrun's environment (1 process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistContext(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def _rank_device(device: str, ctx: DistContext) -> str:
    """Each rank on its own GPU (cuda:LOCAL_RANK) when the device is auto or cuda."""
    if ctx.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    return device


def _barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------- the stage


def plan_embed(config: EmbedConfig) -> tuple[Source, cache.CacheManifest, EncoderSpec]:
    """Check everything that can be checked without loading the model; write nothing.

    Raises:
        UsageError (exit code 2): bad source, output, templates, model or tag, or an
            existing cache made with other settings (without ``overwrite``).
    """
    out = Path(config.out)
    if not config.out:
        raise UsageError("--out is required: the folder to write the feature cache to.")
    _check_out(out)
    classes = read_class_file(config.classes_file) if config.classes_file else None
    source = load_source(config.source, config.layout, classes, config.class_key, config.domain_key)
    templates = resolve_templates(config.templates) if config.templates else None
    prompt_sets = parse_prompt_sets(config.prompt_sets)
    spec = check_encoder_spec(config.model, config.pretrained)
    cache.check_unlocked(out)
    old = cache.read_manifest(out) if cache.is_cache(out) and not config.overwrite else None
    if old is not None:
        recorded = not _source_changes(old, source, False)  # one of the cache's sources: a plain resume
        config = dataclasses.replace(config, append=config.append and not recorded)
        source = _check_append(out, old, source) if config.append else _in_class_order(source, old.classes)
    identity = {"source": source.root, "layout": source.layout}
    manifest = cache.CacheManifest(
        model=spec.model,
        pretrained=spec.pretrained,
        dtype=config.dtype,
        classes=source.classes,
        domains=source.domains,
        templates=templates if templates is not None else resolve_templates("simple"),
        prompt_sets=prompt_sets,
        seed=config.seed,
        pretrained_sha256=spec.checkpoint_sha256,
        source=source.root,
        layout=source.layout,
        n_inputs=len(source.records),
        sources=[identity],
    )
    if old is not None:
        diffs = _mismatches(old, manifest) + _source_changes(old, source, config.append)
        diffs += _text_changes(old, templates, prompt_sets, out)
        if diffs:
            raise CacheMismatchError(
                f"{str(out)!r} holds a cache made with other settings ({'; '.join(diffs)}). "
                "Pass --overwrite to replace it, or choose another --out."
            )
        # the cache keeps its texts (and its first source); this run may add prompt sets and sources
        manifest.templates = list(old.templates) if templates is None else templates
        manifest.prompt_sets = {**old.prompt_sets, **prompt_sets}
        manifest.source, manifest.layout = old.source or source.root, old.layout or source.layout
        manifest.sources = old.source_identities + ([identity] if identity not in old.source_identities else [])
        manifest.domains = sorted(set(old.domains) | set(source.domains))
    return source, manifest, spec


def embed_source(config: EmbedConfig, log: Callable[[str], None] | None = None) -> EmbedResult:
    """Embed every image of ``config.source`` that the cache at ``config.out`` lacks.

    Args:
        config: the run's settings.
        log: where to send notes and warnings (default: stderr).

    Returns:
        an :class:`EmbedResult` with the counts of this run.

    Raises:
        UsageError: see :func:`plan_embed`; nothing is written.
        EncoderError: the model or its weights could not be loaded; nothing is written.
        EmbedInterrupted: Ctrl-C; rows embedded so far are committed.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    ctx = dist_context()
    source, manifest, spec = plan_embed(config)
    out = Path(config.out)
    if ctx.rank != 0:
        log = lambda msg: None  # noqa: E731  (rank 0 speaks for the run)
    log(source.describe())
    if spec.random_weights:
        log(
            f"WARNING: --pretrained none: {spec.model} has RANDOM weights (seed {config.seed}); its embeddings "
            "mean nothing. Use this only for tests and demos; pass a tag or a checkpoint file for real features."
        )
    device = _rank_device(config.device, ctx)
    encoder = load_encoder(spec.model, spec, device, config.precision, config.seed)
    manifest.embed_dim = encoder.embed_dim
    if ctx.distributed:
        return _embed_distributed(config, encoder, source, manifest, out, ctx, log)
    with _writing(out, log):
        return _embed_locked(config, encoder, source, manifest, out, log)


@contextlib.contextmanager
def _writing(out: Path, log):
    """Hold the cache's lock; if the block fails before a cache exists, remove the folder
    it created, so that bad input leaves nothing behind."""
    created = not out.exists()
    lock, stale = cache.acquire_lock(out)
    if stale:
        log("note: took over a lock left by an embed process that no longer runs")
    try:
        yield
    except BaseException:
        if created and not cache.is_cache(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        cache.release_lock(lock)


def _embed_distributed(config, encoder, source, manifest, out, ctx: DistContext, log) -> EmbedResult:
    """torchrun: rank 0 prepares the cache, every rank embeds its share of the pending
    inputs into its own parts, rank 0 merges the ranks' commits into the manifest."""
    import torch.distributed as dist

    backend = "nccl" if encoder.device.type == "cuda" else "gloo"
    initialised_here = not dist.is_initialized()
    if initialised_here:
        dist.init_process_group(backend)
    comm = _comm_device(backend)
    try:
        # rank 0 holds the lock for the whole run
        with _writing(out, log) if ctx.rank == 0 else contextlib.nullcontext():
            n_removed, failed = 0, torch.zeros(1, device=comm)
            if ctx.rank == 0:
                try:
                    n_removed = _prepare_cache(config, encoder, source, manifest, out, log)[1]
                except BaseException:
                    dist.broadcast(failed + 1, 0)  # release the other ranks before raising
                    raise
            dist.broadcast(failed, 0)
            if failed.item():
                raise VlaugError("rank 0 could not prepare the cache; see its error.")
            manifest = cache.read_manifest(out)
            done = set(cache.read_ids(out, manifest))
            pending = [r for r in source.records if r.id not in done]
            mine = _rank_share(pending, ctx.rank, ctx.world_size)  # deterministic share of this rank
            result = _embed_pending(config, encoder, source, manifest, pending=mine,
                                    n_skipped=len(source.records) - len(pending), n_removed=n_removed, log=log, ctx=ctx)
            counts = torch.tensor([result.n_embedded, result.n_failed], dtype=torch.float64, device=comm)
            dist.all_reduce(counts)
            _barrier(ctx)
            if ctx.rank == 0:
                final = cache.read_manifest(out)
                _, failures = cache.merge_rank_commits(out, final)
                cache.write_failed(out, failures)
                final.n_failed = len(failures)
                final.complete = final.n_images + len(failures) >= final.n_inputs
                cache.write_manifest(out, final)
                result.failures = failures
            result.n_embedded, result.n_failed = int(counts[0]), int(counts[1])
            _barrier(ctx)
            return result
    finally:
        if initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _rank_share(pending: list[ImageRecord], rank: int, world_size: int) -> list[ImageRecord]:
    """A rank's share of the pending inputs: image files interleaved; the images of a shard
    (tar or Parquet file) kept together, whole shards dealt to the ranks in turn (as
    clip-retrieval's partitions), so that each rank reads only its own shards."""
    if not any(r.member for r in pending):
        return pending[rank::world_size]
    shards = dict.fromkeys(r.path for r in pending)  # in the source's order
    mine = {path for i, path in enumerate(shards) if i % world_size == rank}
    return [r for r in pending if r.path in mine]


def _comm_device(backend: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _prepare_cache(config, encoder, source, manifest, out, log) -> tuple[set[str], int]:
    """Under the lock: replace or clean the cache, merge an interrupted distributed run,
    write the texts and the manifest. Returns the ids already embedded and the number of
    unfinished files removed."""
    if config.overwrite and cache.is_cache(out):
        _remove_cache(out)
    # read under the lock: another process may have committed parts since plan_embed
    existing = cache.read_manifest(out) if cache.is_cache(out) else None
    if existing is not None and existing.embed_dim != manifest.embed_dim:
        raise CacheMismatchError(
            f"{str(out)!r} holds {existing.embed_dim}-d embeddings but {manifest.model} gives {manifest.embed_dim}-d. "
            "Pass --overwrite or choose another --out."
        )
    n_removed = 0
    done: set[str] = set()
    if existing is not None:
        merged, _ = cache.merge_rank_commits(out, existing)
        if merged:
            log(f"merged {merged} part(s) committed by the ranks of an interrupted torchrun")
        stray = cache.unfinished_files(out, existing)
        for f in stray:
            f.unlink(missing_ok=True)
        n_removed = len(stray)
        if stray:
            log(f"removed {len(stray)} unfinished file(s) left by an interrupted run")
        manifest.created = existing.created
        manifest.parts = list(existing.parts)
        manifest.n_images = existing.n_images
        done = set(cache.read_ids(out, existing))
    # every input of every source: the rows in the cache and the inputs of this source
    manifest.n_inputs = len(done | {r.id for r in source.records})
    _write_missing_texts(encoder, manifest, out, existing)
    cache.write_manifest(out, manifest)
    return done, n_removed


def _write_missing_texts(encoder, manifest: cache.CacheManifest, out: Path, existing: cache.CacheManifest | None) -> None:
    """Encode the prompt sets ``texts.parquet`` lacks (all of them for a new cache); the
    cache's own texts are kept as they are. An unlabeled cache has no texts."""
    if not manifest.classes:
        return
    texts = cache.read_texts(out, existing) if existing is not None else {}
    made_from = cache.read_text_templates(out, existing) if existing is not None else {}
    wanted = {CLASSES_PROMPT_SET: manifest.templates, **manifest.prompt_sets}
    missing = {name: t for name, t in wanted.items() if name not in texts or made_from.get(name) != t}
    if not missing:
        return
    for name, templates in missing.items():
        texts[name] = encoder.encode_prompts(manifest.classes, templates).numpy()
    cache.write_texts(out, {name: texts[name] for name in wanted}, manifest.classes, wanted)


def _embed_locked(config, encoder, source, manifest, out, log) -> EmbedResult:
    done, n_removed = _prepare_cache(config, encoder, source, manifest, out, log)
    orphans = len(done - {r.id for r in source.records})
    if orphans and len(manifest.sources) == 1:
        log(f"note: {orphans} row(s) in the cache are not in the source any more; they are kept")
    pending = [r for r in source.records if r.id not in done]
    n_skipped = len(source.records) - len(pending)
    return _embed_pending(config, encoder, source, manifest, pending=pending, n_skipped=n_skipped, n_removed=n_removed,
                          log=log)


class _PartWriter:
    """Buffers embedded rows and commits them in parts of ``part_size`` rows: a single
    process commits into manifest.json, a torchrun rank into its rank file."""

    def __init__(self, out: Path, manifest: cache.CacheManifest, pending: list[ImageRecord], *, part_size: int,
                 dtype: str, ctx: DistContext):
        self.out, self.manifest, self.pending, self.part_size, self.dtype, self.ctx = out, manifest, pending, part_size, dtype, ctx
        self.positions: list[int] = []  # buffered rows: positions in ``pending``
        self.embeddings: list[np.ndarray] = []
        self.failures: list[dict] = []
        self.rank_parts: list[str] = []  # this rank's committed parts (torchrun)
        self.part_rank = ctx.rank if ctx.distributed else None
        self.next_index = _next_part_index(manifest.parts, self.part_rank)

    def add(self, positions: list[int], embeddings: np.ndarray | None, failed: list[tuple[int, str]]) -> None:
        for i, err in failed:
            self.failures.append({"id": self.pending[i].id, "path": self.pending[i].path, "error": err})
        if embeddings is not None:
            self.embeddings.append(embeddings)
            self.positions += positions

    def _write_part(self, n: int) -> None:
        """Write the first ``n`` buffered rows as the next part."""
        emb = np.concatenate(self.embeddings)
        recs = [self.pending[i] for i in self.positions[:n]]
        rows = {key: [getattr(r, key) for r in recs] for key in ("id", "path", "label", "class_name", "domain", "split")}
        for name in dict(recs[0].extra) if recs and recs[0].extra else ():  # a generated set's provenance (vlaug generate)
            rows[name] = [dict(r.extra).get(name, "") for r in recs]
        name = cache.part_name(self.next_index, self.part_rank)
        cache.write_part(self.out, name, rows, emb[:n], self.dtype)
        if self.ctx.distributed:
            self.rank_parts.append(name)
        else:
            self.manifest.parts.append(name)
            self.manifest.n_images += n
        self.next_index += 1
        self.positions, self.embeddings = self.positions[n:], [emb[n:]]

    def commit(self, final: bool) -> None:
        """Write full parts (and the remainder when ``final``), then the manifest or rank
        file: the commit point."""
        first_new = self.next_index
        while len(self.positions) >= self.part_size:
            self._write_part(self.part_size)
        if final and self.positions:
            self._write_part(len(self.positions))
        if not final and self.next_index == first_new:
            return  # no new part: nothing to commit
        if self.ctx.distributed:
            cache.write_rank_commit(self.out, self.ctx.rank, self.rank_parts, self.failures)
        else:
            cache.write_failed(self.out, self.failures)
            self.manifest.n_failed = len(self.failures)
            cache.write_manifest(self.out, self.manifest)


def _embed_pending(config: EmbedConfig, encoder, source: Source, manifest: cache.CacheManifest, *,
                   pending: list[ImageRecord], n_skipped: int, n_removed: int, log,
                   ctx: DistContext = DistContext()) -> EmbedResult:
    """The loop: batches through the model, parts committed every ``part_size`` rows."""
    from tqdm.auto import tqdm

    out = Path(config.out)
    workers = config.workers if config.workers >= 0 else default_workers(encoder.device)
    if len(pending) <= config.batch_size:
        workers = 0  # starting processes costs more than it hides
    batches = [list(range(i, min(i + config.batch_size, len(pending)))) for i in range(0, len(pending), config.batch_size)]
    loader = torch.utils.data.DataLoader(
        _ImageDataset(pending, encoder.worker_preprocess),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    writer = _PartWriter(out, manifest, pending, part_size=config.part_size, dtype=config.dtype, ctx=ctx)
    bar = tqdm(
        total=len(source.records), initial=n_skipped, unit="img", desc="embed", disable=not config.progress,
        file=sys.stderr, dynamic_ncols=True, smoothing=0.1, position=0,
    )
    n_embedded = 0
    start = time.perf_counter()
    try:
        for positions, images, failed in loader:
            writer.add(positions, encoder.encode_images(images).cpu().numpy() if images is not None else None, failed)
            n_embedded += len(positions)
            bar.update(len(positions) + len(failed))
            if failed:
                bar.set_postfix(failed=len(writer.failures))
            writer.commit(final=False)
        seconds = time.perf_counter() - start
        writer.commit(final=True)
    except KeyboardInterrupt:
        bar.close()
        writer.commit(final=True)  # keep what was embedded before Ctrl-C
        raise EmbedInterrupted(
            f"interrupted: {manifest.n_images} of {len(source.records)} images are in {str(out)!r} "
            f"({len(manifest.parts)} parts). Re-run the same command to resume."
        ) from None
    finally:
        bar.close()
    failures = writer.failures
    if not ctx.distributed:
        manifest.complete = manifest.n_images + len(failures) >= manifest.n_inputs
        cache.write_manifest(out, manifest)
    return EmbedResult(str(out), len(source.records), n_embedded, n_skipped, len(failures), seconds, n_removed, failures)
