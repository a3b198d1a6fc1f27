"""The feature cache: the only module that reads or writes Parquet.

A cache is a directory (see DESIGN.md)::

    FEATURES/
      manifest.json             what produced it and what it holds
      images/part-*.parquet     one row per embedded image
      texts.parquet             one row per (prompt set, class)
      failed.parquet            one row per input that could not be embedded (only if any)

Every file is written to a temporary name in the same folder and renamed into place,
so a reader never sees a half-written file. The manifest lists the completed parts; a
reader reads exactly those, and a part on disk that the manifest does not list is an
unfinished write that is ignored.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlaug import __version__
from vlaug.errors import CacheError, SourceError, UsageError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGES_DIR = "images"
# Row groups of at most 4,096 rows (vlaug embed's default part is one): a streaming reader
# decodes a row group at a time, and decoding a list column takes about 3x its size in
# repetition and definition levels, so 16,384-row groups cost ~150 MB more resident memory.
ROW_GROUP_ROWS = 4096
TEXTS_NAME = "texts.parquet"
FAILED_NAME = "failed.parquet"
TMP_MARKER = ".tmp-"
CLASSES_PROMPT_SET = "classes"  # name of the class-name prompt ensemble in texts.parquet
LOCK_NAME = ".vlaug-embed.lock"
# Fault injection for the reliability suite: "part:N" or "manifest:N" makes the process
# SIGKILL itself during its N-th write of that kind, after the temporary file is written
# and before it is renamed into place (the worst moment for a crash).
FAULT_ENV = "VLAUG_FAULT_INJECT"
_fault_counts: dict[str, int] = {}
STORAGE_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


# ----------------------------------------------------------------------------- atomic files


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename ``tmp_path`` onto ``path``.

    A crash at any moment leaves either the old file or the new one, never a mix; the
    temporary file of an interrupted write is recognisable by its ``.tmp-`` marker.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _maybe_inject_fault(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _maybe_inject_fault(path: Path) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind = "manifest" if path.name == MANIFEST_NAME else "part" if path.parent.name == IMAGES_DIR else "other"
    want, _, n = spec.partition(":")
    if kind != want:
        return
    _fault_counts[kind] = _fault_counts.get(kind, 0) + 1
    if _fault_counts[kind] == int(n or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary folder beside ``path``; when the block succeeds, rename it onto
    ``path`` (replacing an existing folder), and when it fails, delete it. Readers see the
    old folder or the complete new one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f"{path.name}{TMP_MARKER}old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_object(file: Path, error: type[Exception], hint: str = "") -> dict:
    """Parse a JSON file that must hold an object; a bad file raises ``error`` naming it."""
    try:
        d = json.loads(Path(file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{str(file)!r} is not valid JSON ({e}){hint}") from None
    if not isinstance(d, dict):
        raise error(f"{str(file)!r} must hold a JSON object{hint}")
    return d


def _write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))


# ----------------------------------------------------------------------------- manifest


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class CacheManifest:
    """The contents of ``manifest.json``: what produced the cache and what it holds."""

    model: str = ""  # open_clip model name (or hf-hub:/local-dir: identifier)
    pretrained: str = ""  # tag, checkpoint file path, or "none" for random weights
    embed_dim: int = 0
    dtype: str = "float16"  # storage dtype of the image embeddings
    normalized: bool = True  # image and text embeddings are L2-normalised
    classes: list[str] = field(default_factory=list)  # ordered; `label` indexes it
    domains: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)  # templates of the `classes` prompt set
    prompt_sets: dict[str, list[str]] = field(default_factory=dict)  # other named prompt sets
    n_images: int = 0  # rows in the listed parts
    n_failed: int = 0  # rows in failed.parquet
    created: str = field(default_factory=_now)
    parts: list[str] = field(default_factory=list)  # completed parts, relative to images/
    format_version: int = FORMAT_VERSION
    vlaug_version: str = __version__
    # Provenance beyond the DESIGN.md keys; optional for caches written by other tools.
    seed: int | None = None  # seeds the random weights when pretrained == "none"
    pretrained_sha256: str | None = None  # when pretrained is a local checkpoint file
    source: str = ""  # folder or manifest the images came from
    layout: str = ""
    n_inputs: int | None = None  # inputs in the source; complete when n_images + n_failed == n_inputs
    complete: bool = False  # the last embed run finished every input
    updated: str = field(default_factory=_now)
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept as they were

    REQUIRED = ("model", "embed_dim", "dtype", "classes", "parts")

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {**d, **extra}

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "CacheManifest":
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise CacheError(f"{where} lacks the keys {missing}; it was not written by vlaug embed or is damaged.")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in known}
        m = cls(**kwargs)
        if m.format_version > FORMAT_VERSION:
            raise CacheError(
                f"{where} has format_version {m.format_version}; this vlaug ({__version__}) reads up to "
                f"{FORMAT_VERSION}. Upgrade vlaug."
            )
        if m.dtype not in STORAGE_DTYPES:
            raise CacheError(f"{where} has dtype {m.dtype!r}; expected one of {sorted(STORAGE_DTYPES)}.")
        if not isinstance(m.embed_dim, int) or m.embed_dim <= 0:
            raise CacheError(f"{where} has embed_dim {m.embed_dim!r}; expected a positive integer.")
        return m


def is_cache(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path: str | os.PathLike) -> CacheManifest:
    """Read ``manifest.json`` of a cache directory.

    Raises:
        CacheError: no manifest, or one that is not valid JSON or lacks required keys.
    """
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        raise CacheError(f"{str(path)!r} is not a vlaug feature cache (no {MANIFEST_NAME}). Run vlaug embed first.")
    d = read_json_object(file, CacheError, "; the cache is damaged. Re-run vlaug embed with --overwrite.")
    return CacheManifest.from_dict(d, where=str(file))


def write_manifest(path: str | os.PathLike, manifest: CacheManifest) -> None:
    manifest.updated = _now()
    _write_json(Path(path) / MANIFEST_NAME, manifest.to_dict())


# ----------------------------------------------------------------------------- the writer's lock


def _lock_holder_alive(info: dict) -> bool:
    """True unless the lock's process is known to be gone (same host, no such pid)."""
    import socket

    if info.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes: assume it is alive
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


def acquire_lock(path: str | os.PathLike) -> tuple[Path, bool]:
    """Create ``LOCK_NAME`` in the cache folder (exclusively). A lock left by a process
    that is gone (crash, SIGKILL) is stale and taken over.

    Returns:
        the lock file and whether a stale lock was replaced.

    Raises:
        CacheLockedError: a live process holds the lock.
    """
    import socket

    from vlaug.errors import CacheLockedError

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    stale = False
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            check_unlocked(folder)  # raises while the holder lives
            lock.unlink(missing_ok=True)  # stale (or unreadable: its writer died while creating it)
            stale = True
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}, f)
        return lock, stale
    raise CacheLockedError(f"could not take the lock {str(lock)!r}; another process keeps creating it.")


def check_unlocked(path: str | os.PathLike) -> None:
    """Raise CacheLockedError if a live process holds the cache's lock; return if there is
    no lock, or only a stale or unreadable one."""
    from vlaug.errors import CacheLockedError

    lock = Path(path) / LOCK_NAME
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if _lock_holder_alive(info):
        raise CacheLockedError(
            f"{str(path)!r} is being written by vlaug embed (pid {info.get('pid')} on {info.get('host')}, since "
            f"{info.get('started')}). Wait for it to finish; if that process no longer exists, delete {str(lock)!r}."
        )


def release_lock(lock: Path) -> None:
    lock.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- writing rows


def image_schema(embed_dim: int, dtype: str) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("path", pa.string()),
            ("label", pa.int32()),
            ("class_name", pa.string()),
            ("domain", pa.string()),
            ("split", pa.string()),
            ("embedding", pa.list_(STORAGE_DTYPES[dtype], embed_dim)),
        ]
    )


def _write_table(table: pa.Table, file: Path, **kwargs) -> None:
    """``pq.write_table`` without dictionary encoding for vector columns (embeddings,
    probabilities): a dictionary-encoded embedding column takes 4-5x longer to decode and
    2x longer to write, for a 6 % smaller file."""
    scalar = [f.name for f in table.schema if not pa.types.is_fixed_size_list(f.type)]
    pq.write_table(table, file, use_dictionary=scalar, **kwargs)


def _embedding_array(embeddings: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    n, d = embeddings.shape
    flat = np.ascontiguousarray(embeddings, dtype=np.dtype(dtype)).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=STORAGE_DTYPES[dtype]), d)


def part_name(index: int, rank: int | None = None) -> str:
    """``part-00012.parquet``, or ``part-r3-00012.parquet`` for torchrun rank 3."""
    return f"part-{index:05d}.parquet" if rank is None else f"part-r{rank}-{index:05d}.parquet"


def write_part(path: str | os.PathLike, name: str, rows: dict, embeddings: np.ndarray, dtype: str) -> None:
    """Write one part of image rows atomically to ``images/NAME``.

    Args:
        rows: lists ``id``, ``path``, ``label``, ``class_name``, ``domain``, ``split``.
        embeddings: (n, d) L2-normalised embeddings, stored as ``dtype``.
    """
    folder = Path(path) / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    schema = image_schema(embeddings.shape[1], dtype)
    arrays = [pa.array(rows[name_], type=schema.field(name_).type) for name_ in schema.names[:-1]]
    table = pa.Table.from_arrays(arrays + [_embedding_array(embeddings, dtype)], schema=schema)
    atomic_write(folder / name, lambda tmp: _write_table(table, tmp, row_group_size=max(1, min(len(table), ROW_GROUP_ROWS))))


def write_texts(path: str | os.PathLike, texts: dict[str, np.ndarray], classes: list[str]) -> None:
    """Write ``texts.parquet``: one row per (prompt set, class); ``texts[name]`` is (n_classes, d)."""
    prompt_set, label, class_name, chunks = [], [], [], []
    for name, emb in texts.items():
        prompt_set += [name] * len(classes)
        label += list(range(len(classes)))
        class_name += list(classes)
        chunks.append(np.asarray(emb, dtype=np.float32))
    d = chunks[0].shape[1]
    table = pa.table(
        {
            "prompt_set": pa.array(prompt_set, pa.string()),
            "label": pa.array(label, pa.int32()),
            "class_name": pa.array(class_name, pa.string()),
            "embedding": _embedding_array(np.concatenate(chunks), "float32"),
        }
    )
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), d)
    atomic_write(Path(path) / TEXTS_NAME, lambda tmp: _write_table(table, tmp))


def write_failed(path: str | os.PathLike, failures: list[dict]) -> None:
    """Write ``failed.parquet`` (columns id, path, error), or remove it when there is no failure."""
    file = Path(path) / FAILED_NAME
    if not failures:
        file.unlink(missing_ok=True)
        return
    table = pa.table({k: pa.array([f[k] for f in failures], pa.string()) for k in ("id", "path", "error")})
    atomic_write(file, lambda tmp: _write_table(table, tmp))


# ----------------------------------------------------------------------------- reading


@dataclass
class FeatureCache:
    """A cache read into memory. Arrays share the row order of the listed parts."""

    manifest: CacheManifest
    ids: list[str]
    paths: list[str]
    labels: np.ndarray  # (n,) int64
    domains: np.ndarray  # (n,) str
    splits: np.ndarray  # (n,) str
    embeddings: np.ndarray  # (n, d) float32, L2-normalised
    texts: dict[str, np.ndarray]  # prompt set -> (n_classes, d) float32

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    def __len__(self) -> int:
        return len(self.labels)


def _read_parquet(file: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(file, columns=columns)
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"cannot read {str(file)!r}: {e}. The file is damaged; re-run vlaug embed to rebuild it.") from None


def _listed_part_files(path: Path, manifest: CacheManifest) -> list[Path]:
    files = [path / IMAGES_DIR / name for name in manifest.parts]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CacheError(
            f"cache {str(path)!r} lists parts {missing[:3]} that are missing from {IMAGES_DIR}/. "
            "Re-run the same vlaug embed command to re-embed them, or --overwrite."
        )
    return files


def _embeddings_to_numpy(column: pa.ChunkedArray, embed_dim: int, where: str) -> np.ndarray:
    if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != embed_dim:
        raise CacheError(
            f"{where}: column 'embedding' has type {column.type}; the manifest says "
            f"fixed_size_list<float>[{embed_dim}]."
        )
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if arr.null_count:
        raise CacheError(f"{where}: {arr.null_count} rows have a null embedding.")
    import torch  # converts half to float, and sums, several times faster than numpy

    values = arr.flatten().to_numpy(zero_copy_only=False)  # .values would ignore a slice offset
    if values.dtype == np.float16:  # read-only view; .float() makes the copy callers may write
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(values).float()
    else:  # float32 converts into a read-only view: copy it
        t = torch.from_numpy(values if values.flags.writeable else values.copy())
    out = t.numpy().reshape(len(arr), embed_dim)
    if not bool(torch.isfinite(t.sum())):  # a NaN or Inf anywhere makes the sum one (the cheap check)
        bad = ~np.isfinite(out).all(axis=1)
        raise CacheError(f"{where}: {int(bad.sum())} rows have NaN or Inf in 'embedding'; the cache was edited or damaged.")
    return out


def read_ids(path: str | os.PathLike, manifest: CacheManifest | None = None) -> list[str]:
    """The ids of every row in the listed parts (for resuming without loading embeddings)."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    ids: list[str] = []
    for f in _listed_part_files(path, manifest):
        ids += _read_parquet(f, ["id"]).column("id").to_pylist()
    return ids


def read_texts(path: str | os.PathLike, manifest: CacheManifest) -> dict[str, np.ndarray]:
    file = Path(path) / TEXTS_NAME
    if not file.is_file():
        return {}
    table = _read_parquet(file)
    emb = _embeddings_to_numpy(table.column("embedding"), manifest.embed_dim, str(file))
    names = table.column("prompt_set").to_pylist()
    labels = np.asarray(table.column("label").to_pylist())
    out = {}
    for name in dict.fromkeys(names):
        rows = np.flatnonzero(np.asarray(names) == name)
        order = rows[np.argsort(labels[rows], kind="stable")]
        if not np.array_equal(labels[order], np.arange(len(manifest.classes))):
            raise CacheError(
                f"{str(file)!r}: prompt set {name!r} has labels {sorted(set(labels[rows]))[:5]}...; expected one row "
                f"per class 0..{len(manifest.classes) - 1}."
            )
        out[name] = emb[order]
    return out


def read_failed(path: str | os.PathLike) -> list[dict]:
    file = Path(path) / FAILED_NAME
    if not file.is_file():
        return []
    return _read_parquet(file).to_pylist()


def read_cache(path: str | os.PathLike) -> FeatureCache:
    """Read a whole cache into memory.

    Returns:
        a :class:`FeatureCache` with float32 embeddings in the order of the listed parts.

    Raises:
        CacheError: missing manifest or part, wrong embedding length, NaN/Inf, labels
            outside the class list, duplicate ids.
    """
    path = Path(path)
    manifest = read_manifest(path)
    schema = image_schema(manifest.embed_dim, manifest.dtype)
    tables = []
    for f in _listed_part_files(path, manifest):
        t = _read_parquet(f)
        missing = [c for c in schema.names if c not in t.column_names]
        if missing:
            raise CacheError(f"{str(f)!r} lacks the columns {missing}; it is not a vlaug image part.")
        t = t.select(schema.names)
        emb = _embeddings_to_numpy(t.column("embedding"), manifest.embed_dim, str(f))
        tables.append((t, emb))
    d = manifest.embed_dim
    if tables:
        meta = pa.concat_tables([t.drop(["embedding"]) for t, _ in tables], promote_options="permissive")
        embeddings = np.concatenate([e for _, e in tables])
    else:
        meta = pa.table({n: pa.array([], schema.field(n).type) for n in schema.names[:-1]})
        embeddings = np.zeros((0, d), np.float32)
    ids = meta.column("id").to_pylist()
    labels = np.asarray(meta.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(manifest.classes)):
        raise CacheError(
            f"cache {str(path)!r} has labels outside 0..{len(manifest.classes) - 1} (the manifest's classes)."
        )
    if len(set(ids)) != len(ids):
        raise CacheError(f"cache {str(path)!r} has duplicate ids across its parts; it was edited or damaged.")
    return FeatureCache(
        manifest=manifest,
        ids=ids,
        paths=meta.column("path").to_pylist(),
        labels=labels,
        domains=np.asarray(meta.column("domain").to_pylist(), dtype=str),
        splits=np.asarray(meta.column("split").to_pylist(), dtype=str),
        embeddings=embeddings,
        texts=read_texts(path, manifest),
    )


def iter_metadata(path: str | os.PathLike, columns: Iterable[str]) -> Iterable[pa.Table]:
    """The listed parts, one table at a time, with only ``columns`` (no embeddings)."""
    path = Path(path)
    manifest = read_manifest(path)
    for f in _listed_part_files(path, manifest):
        yield _read_parquet(f, list(columns))


# ----------------------------------------------------------------------------- distributed writers
# Under torchrun each rank commits its parts to images/rank-R.json (parts, rows, failures);
# rank 0 merges every rank file into manifest.json when all ranks are done, and at the start
# of the next run (whatever its world size) if a distributed run was interrupted.


def rank_file(path: str | os.PathLike, rank: int) -> Path:
    return Path(path) / IMAGES_DIR / f"rank-{rank}.json"


def write_rank_commit(path: str | os.PathLike, rank: int, parts: list[str], failures: list[dict]) -> None:
    """Commit a rank's parts (rows are counted from the parts when rank 0 merges them)."""
    (Path(path) / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    _write_json(rank_file(path, rank), {"rank": rank, "parts": parts, "failures": failures})


def merge_rank_commits(path: str | os.PathLike, manifest: CacheManifest) -> tuple[int, list[dict]]:
    """Move the parts of every rank file into ``manifest`` (and write it), then delete the
    rank files. Returns the number of parts merged and the ranks' failures."""
    path = Path(path)
    files = sorted((path / IMAGES_DIR).glob("rank-*.json")) if (path / IMAGES_DIR).is_dir() else []
    merged, failures = 0, []
    for f in files:
        try:
            commit = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an unreadable rank file cannot have been committed (atomic writes)
        for part in commit.get("parts", []):
            file = path / IMAGES_DIR / part
            if part not in manifest.parts and file.is_file():
                manifest.parts.append(part)
                manifest.n_images += pq.read_metadata(file).num_rows
                merged += 1
        failures += commit.get("failures", [])
    if files:
        write_manifest(path, manifest)
        for f in files:
            f.unlink(missing_ok=True)
    return merged, failures


def unfinished_files(path: str | os.PathLike, manifest: CacheManifest | None = None) -> list[Path]:
    """Files left by an interrupted write: parts the manifest does not list, and temporaries."""
    path = Path(path)
    listed = set((manifest or read_manifest(path)).parts)
    stray = [f for f in path.glob(f"*{TMP_MARKER}*") if f.is_file()]
    images = path / IMAGES_DIR
    if images.is_dir():
        stray += [f for f in sorted(images.iterdir()) if f.is_file() and f.name not in listed]
    return stray


# ----------------------------------------------------------------------------- other tables


def read_table_columns(path: str | os.PathLike) -> dict[str, list]:
    """Read a CSV or Parquet table (an image manifest) into ``{column: values}``.

    Column names are stripped and lower-cased. CSV cells stay strings (an id such as
    ``007`` keeps its zeros); Parquet columns keep their types.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.reader(f))
            if not rows:
                return {}
            header = [h.strip().lower() for h in rows[0]]
            body = [r for r in rows[1:] if any(c.strip() for c in r)]  # skip blank lines
            return {h: [r[i] if i < len(r) else "" for r in body] for i, h in enumerate(header)}
        table = pq.read_table(path)
    except (OSError, UnicodeDecodeError, csv.Error, pa.ArrowException) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(
            f"cannot read manifest {str(path)!r}: {reason}. Check that it is a valid UTF-8 CSV or Parquet file."
        ) from None
    return {name.strip().lower(): table.column(i).to_pylist() for i, name in enumerate(table.column_names)}


def cache_info(path: str | os.PathLike) -> dict:
    """What ``vlaug info`` shows: the manifest, row counts per domain/class/split,
    prompt sets, failures and unfinished files. Reads no embedding."""
    path = Path(path)
    manifest = read_manifest(path)
    counts = {"domain": {}, "class_name": {}, "split": {}}
    n_rows = 0
    for table in iter_metadata(path, list(counts)):
        n_rows += len(table)
        for col, acc in counts.items():
            for value, n in zip(*np.unique(np.asarray(table.column(col).to_pylist(), dtype=str), return_counts=True)):
                acc[str(value)] = acc.get(str(value), 0) + int(n)
    prompt_sets = {}
    texts_file = path / TEXTS_NAME
    if texts_file.is_file():
        names = _read_parquet(texts_file, ["prompt_set"]).column("prompt_set").to_pylist()
        templates = {"classes": manifest.templates, **manifest.prompt_sets}
        prompt_sets = {n: len(templates.get(n, [])) for n in dict.fromkeys(names)}
    return {
        "path": str(path),
        "manifest": manifest.to_dict(),
        "n_rows": n_rows,
        "per_domain": counts["domain"],
        "per_class": {c: counts["class_name"].get(c, 0) for c in manifest.classes},
        "per_split": counts["split"],
        "prompt_sets": prompt_sets,
        "failures": read_failed(path),
        "unfinished": [str(f.relative_to(path)) for f in unfinished_files(path, manifest)],
    }


def write_predictions(path: str | os.PathLike, ids: list[str], labels: np.ndarray, classes: list[str],
                      probabilities: np.ndarray) -> None:
    """Write a predictions Parquet file atomically: id, label, class_name, probabilities[C]."""
    labels = np.asarray(labels, dtype=np.int32)
    table = pa.table({
        "id": pa.array(ids, pa.string()),
        "label": pa.array(labels, pa.int32()),
        "class_name": pa.array([classes[i] for i in labels], pa.string()),
        "probabilities": _embedding_array(np.asarray(probabilities, np.float32), "float32"),
    })
    atomic_write(Path(path), lambda tmp: _write_table(table, tmp))


# ----------------------------------------------------------------------------- streaming (larger than memory)


def embedding_bytes(manifest: CacheManifest) -> int:
    """Memory the embeddings take once read as float32."""
    return manifest.n_images * manifest.embed_dim * 4


def parse_memory_budget(value: str) -> int:
    """``auto`` (a quarter of the RAM), or a size such as ``1.5G``, ``800M``, ``2000000000``."""
    if value == "auto":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        except (ValueError, OSError, AttributeError):
            return 4 * 2**30
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = value.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        raise UsageError(f"--memory-budget {value!r}; use auto or a size such as 1.5G or 800M.") from None


def in_memory_bytes(manifest: CacheManifest) -> int:
    """What stages 2 and 3 need to hold a cache in memory: about three float32 copies of its
    embeddings at their peak (the cache, the training rows and the validation rows)."""
    return 3 * embedding_bytes(manifest)


def fits_in_memory(manifest: CacheManifest, budget: int) -> bool:
    """Whether the cache can be held in memory under ``budget`` bytes (else it is streamed)."""
    return in_memory_bytes(manifest) <= budget


def chunk_rows(budget: int, embed_dim: int, expansion: int = 1) -> int:
    """Rows to read from disk at a time when streaming under ``budget`` bytes: the reader
    holds about four chunks (one being decoded, two read ahead, one in use) at several
    bytes per value, and a chunk may grow ``expansion``-fold (augmentations) once read."""
    return int(np.clip(budget // 64 // (embed_dim * 4 * expansion), 256, 65536))


def read_metadata(path: str | os.PathLike) -> FeatureCache:
    """A cache without its embeddings, ids or paths (labels, domains, splits and texts), for
    streaming the embeddings from disk with :func:`iter_embeddings`."""
    manifest = read_manifest(path)
    cols = read_columns(path, ["label", "domain", "split"])
    labels = cols["label"].astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(manifest.classes)):
        raise CacheError(f"cache {str(path)!r} has labels outside 0..{len(manifest.classes) - 1} (the manifest's classes).")
    return FeatureCache(manifest, [], [], labels, cols["domain"].astype(str), cols["split"].astype(str),
                        np.zeros((0, manifest.embed_dim), np.float32), read_texts(path, manifest))


def read_columns(path: str | os.PathLike, columns: list[str]) -> dict[str, np.ndarray]:
    """Metadata columns of the listed parts as numpy arrays (no embedding, no ids).

    String columns come back as fixed-width ``str`` arrays built from their dictionary
    (no Python object per row: a 2M-row cache would otherwise hold ~100 MB of them).
    """
    path = Path(path)
    manifest = read_manifest(path)
    chunks: dict[str, list] = {c: [] for c in columns}
    for f in _listed_part_files(path, manifest):
        t = _read_parquet(f, columns)
        for c in columns:
            col = t.column(c)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                enc = col.dictionary_encode().combine_chunks()
                values = np.asarray(enc.dictionary.to_pylist(), dtype=str)
                chunks[c].append(values[enc.indices.to_numpy(zero_copy_only=False)] if len(values) else np.zeros(len(col), str))
            else:
                chunks[c].append(col.to_numpy(zero_copy_only=False))
    return {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in chunks.items()}


def _prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead: Parquet
    decoding (which releases the GIL) overlaps the caller's work, in bounded memory.
    Exceptions reach the caller; a caller that stops early stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:  # False once the caller has stopped (never blocks for good)
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the caller
            put((done, e))

    thread = threading.Thread(target=run, name="vlaug-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def iter_embeddings(path: str | os.PathLike, batch_rows: int = 65536):
    """Yield (first row index, (m, d) float32 embeddings) over the listed parts, in order,
    at most ``batch_rows`` rows (and at most a row group) at a time, checked like
    :func:`read_cache`. A background thread decodes up to two batches ahead: a pyarrow
    dataset scanner would decode faster, but runs ahead without bound when the caller is
    slower than the disk (2 GB resident on a 2M-row cache).
    """
    path = Path(path)
    manifest = read_manifest(path)

    def batches():
        for f in _listed_part_files(path, manifest):
            try:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=["embedding"], use_threads=False):
                    yield _embeddings_to_numpy(pa.chunked_array([batch.column(0)]), manifest.embed_dim, str(f))
            except (OSError, pa.ArrowException) as e:
                raise CacheError(f"cannot read {str(f)!r}: {e}. The file is damaged; re-run vlaug embed to rebuild it.") from None

    start = 0
    for emb in _prefetch(batches()):
        yield start, emb
        start += len(emb)


def take_rows(chunks: Iterable[tuple[int, np.ndarray]], rows: np.ndarray) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """The embeddings of ``rows`` (global row indices, any order, no repeats) out of
    ``(first row, embeddings)`` chunks such as :func:`iter_embeddings` yields: one
    ``(positions in rows, (m, d) embeddings)`` per chunk that holds any of them."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    for start, emb in chunks:
        lo, hi = np.searchsorted(ordered, [start, start + len(emb)])
        if hi > lo:
            yield order[lo:hi], emb[ordered[lo:hi] - start]

