"""Image sources: a folder in ``class/image`` or ``domain/class/image`` layout, or a
CSV/Parquet manifest. A source becomes an ordered list of :class:`ImageRecord`; the
order is deterministic (sorted folders and files, or the manifest's row order), which is
what makes ``vlaug embed`` resumable and its output reproducible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path

from vlaug.errors import SourceError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
)
MANIFEST_EXTENSIONS = frozenset({".csv", ".parquet", ".pq"})
GENERATED_MANIFEST = "generated.parquet"  # the manifest vlaug generate writes in its folder (vlaug embed GEN_DIR reads it)
# what a generated image's cache row keeps of its manifest row: the source row it was made from, the domains it
# moved between and (image-guided) the row that guided it; the cdga probe method reads them (split hygiene)
GENERATION_COLUMNS = ("source_id", "source_domain", "target_domain", "guide_id")
SPLITS = ("train", "val", "test", "")


class Layout(str, Enum):
    auto = "auto"
    class_folders = "class"  # ROOT/class/image
    domain_class_folders = "domain-class"  # ROOT/domain/class/image (DomainBed style)
    manifest = "manifest"  # CSV or Parquet with columns path [, class|label, domain, split, id]
    flat = "flat"  # ROOT/image, no labels (for vlaug predict)
    webdataset = "webdataset"  # tar shards: one .tar, a brace pattern, a glob or a folder of .tar files (vlaug.shards)
    parquet_images = "parquet-images"  # Parquet files whose rows hold the image bytes (img2dataset, Hugging Face)


@dataclass(frozen=True)
class ImageRecord:
    id: str  # stable key: path relative to the source root, or the manifest's id
    path: str  # where the image is read from
    label: int | None  # index into Source.classes; None for an unlabeled image
    class_name: str | None
    domain: str = ""  # "" when the source has no domains
    split: str | None = None  # train / val / test when the source says so, else None (null in the cache)
    # vlaug generate's provenance columns (GENERATION_COLUMNS) of a generated image, as (name, value) pairs: the
    # cache keeps them as columns
    extra: tuple[tuple[str, str], ...] = ()
    # where the image's bytes are inside ``path`` (a shard or a Parquet file, vlaug.shards.read_member): "" for a file
    member: str = ""


@dataclass(frozen=True)
class Source:
    root: str  # the folder or manifest file given by the user, resolved
    layout: str  # the Layout value that was used
    records: list[ImageRecord]
    classes: list[str]  # ordered; ImageRecord.label indexes it; empty for an unlabeled source
    domains: list[str] = field(default_factory=list)  # sorted, without ""
    n_ignored_files: int = 0  # files without an image extension that were skipped
    detected: bool = False  # the layout was detected (--layout auto), not given

    @property
    def labeled(self) -> bool:
        return bool(self.classes)

    def describe(self) -> str:
        """One line saying what was found, printed before embedding: the layout, and the
        classes and domains with their first few names."""
        def first(names: list[str]) -> str:
            return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")

        how = "detected" if self.detected else "given"
        what = [f"{len(self.records)} images"]
        what.append(f"{len(self.classes)} classes ({first(self.classes)})" if self.classes else "no labels")
        if self.domains:
            what.append(f"{len(self.domains)} domains ({first(self.domains)})")
        return f"source {self.root}: layout {self.layout} ({how}); " + ", ".join(what)


def read_class_file(path: str | os.PathLike) -> list[str]:
    """Read a class list: one name per line, blank lines and ``#`` comments ignored."""
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"classes file {str(p)!r} not found. Pass a text file with one class name per line.")
    names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise SourceError(f"classes file {str(p)!r} lists no class. Write one class name per line.")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SourceError(f"classes file {str(p)!r} lists {dupes[:5]} more than once. Keep each class once.")
    return names


def load_source(
    source: str | os.PathLike,
    layout: Layout | str = Layout.auto,
    classes: list[str] | None = None,
    class_key: str | None = None,
    domain_key: str | None = None,
) -> Source:
    """Scan a folder or read a manifest into an ordered list of image records.

    Args:
        source: a folder (``class/image`` or ``domain/class/image``) or a ``.csv`` /
            ``.parquet`` manifest.
        layout: force a layout instead of detecting it.
        classes: the class order to use (``--classes``); by default sorted folder names
            or the manifest's order of first appearance.

    Returns:
        a :class:`Source`.

    Raises:
        SourceError: missing or empty source, ambiguous layout, malformed manifest,
            classes missing from ``classes``, duplicate ids.
    """
    layout = Layout(layout)
    sharded = _load_sharded(str(source), layout, classes, class_key, domain_key)
    if sharded is not None:
        return sharded
    if class_key or domain_key:
        raise SourceError("--class-key and --domain-key read WebDataset shards; a folder or a manifest names its classes "
                          "and domains itself (folders, or its 'class' and 'domain' columns).")
    if "://" in str(source):
        raise SourceError(f"{str(source)!r}: a URL source must be WebDataset .tar shards or Parquet files holding the "
                          "image bytes; copy folders of image files to a local disk.")
    root = Path(source)
    if not root.exists():
        raise SourceError(f"source {str(source)!r} does not exist. Pass an image folder or a CSV/Parquet manifest.")
    if layout is Layout.manifest or (layout is Layout.auto and root.is_file()):
        if not root.is_file():
            raise SourceError(f"--layout manifest needs a CSV or Parquet file, but {str(source)!r} is a folder.")
        return replace(_load_manifest(root.resolve(), classes), detected=layout is Layout.auto)
    if not root.is_dir():
        raise SourceError(f"source {str(source)!r} is neither a folder nor a CSV/Parquet manifest.")
    if layout is Layout.auto and (root / GENERATED_MANIFEST).is_file():  # a vlaug generate folder: its manifest
        return replace(_load_manifest((root / GENERATED_MANIFEST).resolve(), classes), detected=True)
    return _load_folder(root.resolve(), layout, classes)


# ----------------------------------------------------------------------------- folders


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    """Entries of a folder without hidden ones, sorted by name."""
    try:
        entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    except OSError as e:
        raise SourceError(f"cannot list folder {str(folder)!r}: {e.strerror}. Check its permissions.") from None
    return sorted(entries, key=lambda e: e.name)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # e.g. a symlink loop: treat as a file, it will fail to load and be recorded
        return False


def _walk_images(folder: Path) -> tuple[list[Path], int]:
    """Image files below a folder (recursive, sorted), and the number of other files skipped."""
    images, n_ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, onerror=None, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                images.append(Path(dirpath) / name)
            else:
                n_ignored += 1
    # os.walk yields a folder's files before its subfolders'; sort the whole list by
    # relative path so the order does not depend on the walk.
    images.sort(key=lambda p: p.relative_to(folder).as_posix())
    return images, n_ignored


def _has_direct_images(folder: Path) -> bool:
    return any(
        not _is_dir(e) and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS for e in _visible_entries(folder)
    )


def _detect_layout(root: Path, top_dirs: list[Path]) -> Layout:
    direct = [d for d in top_dirs if _has_direct_images(d)]
    nested = [d for d in top_dirs if d not in direct and any(_is_dir(e) for e in _visible_entries(d))]
    if direct and not nested:
        return Layout.class_folders
    if nested and not direct:
        return Layout.domain_class_folders
    if direct and nested:
        raise SourceError(
            f"cannot tell the layout of {str(root)!r}: {direct[0].name}/ holds images but {nested[0].name}/ "
            "holds folders. Pass --layout class or --layout domain-class."
        )
    raise SourceError(
        f"source folder {str(root)!r} has no images in class/ or domain/class/ sub-folders. "
        "Lay images out as ROOT/class/image.jpg or ROOT/domain/class/image.jpg, or pass a manifest."
    )


def _load_flat(root: Path) -> Source:
    """Every image below ``root`` (recursive), unlabeled: embeddings for vlaug predict."""
    images, n_ignored = _walk_images(root)
    if not images:
        raise SourceError(
            f"source folder {str(root)!r} holds no image files (extensions {sorted(IMAGE_EXTENSIONS)}). Check the path."
        )
    records = [ImageRecord(id=p.relative_to(root).as_posix(), path=str(p), label=None, class_name=None) for p in images]
    return Source(str(root), Layout.flat.value, records, [], [], n_ignored)


def _load_folder(root: Path, layout: Layout, classes: list[str] | None) -> Source:
    detected = layout is Layout.auto
    top_dirs = [Path(e.path) for e in _visible_entries(root) if _is_dir(e)]
    if layout is Layout.flat or (detected and not top_dirs and _has_direct_images(root)):
        if classes is not None:
            raise SourceError(f"source folder {str(root)!r} holds images without class folders (unlabeled); "
                              "--classes needs ROOT/class/image.jpg or ROOT/domain/class/image.jpg.")
        return replace(_load_flat(root), detected=detected)
    if not top_dirs:
        raise SourceError(
            f"source folder {str(root)!r} is empty or has no sub-folders. "
            "Lay images out as ROOT/class/image.jpg or ROOT/domain/class/image.jpg (or ROOT/image.jpg, unlabeled)."
        )
    if layout is Layout.auto:
        layout = _detect_layout(root, top_dirs)

    # (domain, class folder) pairs in sorted order
    groups: list[tuple[str, Path]] = []
    if layout is Layout.class_folders:
        groups = [("", d) for d in top_dirs]
    else:
        for domain_dir in top_dirs:
            groups += [(domain_dir.name, Path(e.path)) for e in _visible_entries(domain_dir) if _is_dir(e)]

    found = sorted({class_dir.name for _, class_dir in groups})
    class_names = _resolve_classes(found, classes, where=f"folder {str(root)!r}")
    index = {name: i for i, name in enumerate(class_names)}

    records, n_ignored = [], 0
    for domain, class_dir in groups:
        images, ignored = _walk_images(class_dir)
        n_ignored += ignored
        for path in images:
            records.append(
                ImageRecord(
                    id=path.relative_to(root).as_posix(),
                    path=str(path),
                    label=index[class_dir.name],
                    class_name=class_dir.name,
                    domain=domain,
                )
            )
    if not records:
        raise SourceError(
            f"source folder {str(root)!r} holds no image files (extensions {sorted(IMAGE_EXTENSIONS)}). "
            "Check the path."
        )
    domains = sorted({r.domain for r in records} - {""})
    return Source(str(root), layout.value, records, class_names, domains, n_ignored, detected)


def _resolve_classes(found: list[str], classes: list[str] | None, where: str) -> list[str]:
    """The class order: ``classes`` when given (every found class must be in it), else ``found``."""
    if classes is None:
        return list(found)
    missing = [c for c in found if c not in set(classes)]
    if missing:
        raise SourceError(
            f"{where} has classes {missing[:5]} that the --classes file does not list. "
            "Add them to the file or remove those images."
        )
    return list(classes)


# ----------------------------------------------------------------------------- manifests


def _load_manifest(path: Path, classes: list[str] | None) -> Source:
    from vlaug.cache import read_table_columns

    if path.suffix.lower() not in MANIFEST_EXTENSIONS:
        raise SourceError(
            f"manifest {str(path)!r} must end in .csv or .parquet (got {path.suffix!r}). "
            "Rename it, or pass an image folder."
        )
    columns = read_table_columns(path)
    n_rows = len(next(iter(columns.values()))) if columns else 0
    if "path" not in columns:
        raise SourceError(
            f"manifest {str(path)!r} has columns {sorted(columns)}; it needs 'path' and 'class' (or 'label'), "
            "optionally 'domain', 'split' and 'id' ('path' alone: unlabeled images, for vlaug predict)."
        )
    labeled = bool({"class", "label"} & set(columns))
    if not labeled and classes is not None:
        raise SourceError(f"manifest {str(path)!r} has no 'class' or 'label' column, so --classes has nothing to order. "
                          "Add a 'class' column or leave out --classes.")
    if n_rows == 0:
        raise SourceError(f"manifest {str(path)!r} has no rows. Add one row per image.")

    base = path.parent
    paths = [_cell(v) for v in columns["path"]]
    empty = [i + 1 for i, p in enumerate(paths) if not p]
    if empty:
        raise SourceError(f"manifest {str(path)!r} rows {empty[:5]} have an empty 'path'. Fill them or delete them.")

    class_of_row, class_names = _manifest_classes(columns, classes, path) if labeled else ([None] * n_rows, [])
    index = {name: i for i, name in enumerate(class_names)}

    domains = [_cell(v) for v in columns.get("domain", [""] * n_rows)]
    splits = [_cell(v).lower() for v in columns.get("split", [""] * n_rows)]
    bad_splits = sorted({s for s in splits if s not in SPLITS})
    if bad_splits:
        raise SourceError(
            f"manifest {str(path)!r} has split values {bad_splits[:5]}; use 'train', 'val', 'test' or leave it empty."
        )
    ids = [_cell(v) for v in columns["id"]] if "id" in columns else paths
    empty_ids = [i + 1 for i, v in enumerate(ids) if not v]
    if empty_ids:
        raise SourceError(f"manifest {str(path)!r} rows {empty_ids[:5]} have an empty 'id'. Fill them or drop the column.")
    seen, dupes = set(), []
    for v in ids:
        if v in seen:
            dupes.append(v)
        seen.add(v)
    if dupes:
        raise SourceError(
            f"manifest {str(path)!r} has duplicate ids {sorted(set(dupes))[:5]}. "
            "Each row needs its own 'id' (or its own 'path' when there is no 'id' column)."
        )

    kept = [c for c in GENERATION_COLUMNS if c in columns] if path.name == GENERATED_MANIFEST else []
    extra = {c: [_cell(v) for v in columns[c]] for c in kept}
    records = []
    for i in range(n_rows):
        p = Path(paths[i])
        resolved = p if p.is_absolute() else base / p
        name = class_of_row[i]
        records.append(ImageRecord(ids[i], str(resolved), index.get(name), name, domains[i], splits[i] or None,
                                   tuple((c, extra[c][i]) for c in kept)))
    return Source(str(path), Layout.manifest.value, records, class_names, sorted(set(domains) - {""}), 0)


def _cell(value) -> str:
    return "" if value is None else str(value).strip()


def _manifest_classes(columns: dict, classes: list[str] | None, path: Path) -> tuple[list[str], list[str]]:
    """Each row's class name and the ordered class list, from a 'class' or 'label' column."""
    if "class" in columns:
        names = [_cell(v) for v in columns["class"]]
        empty = [i + 1 for i, n in enumerate(names) if not n]
        if empty:
            raise SourceError(f"manifest {str(path)!r} rows {empty[:5]} have an empty 'class'. Fill them or delete them.")
        found = list(dict.fromkeys(names))  # order of first appearance
        return names, _resolve_classes(found, classes, where=f"manifest {str(path)!r}")

    labels = []
    for i, v in enumerate(columns["label"]):
        try:
            labels.append(int(str(v).strip()))
        except (TypeError, ValueError):
            raise SourceError(
                f"manifest {str(path)!r} row {i + 1} has label {v!r}; 'label' must be an integer class index "
                "(or use a 'class' column with names)."
            ) from None
    n_classes = len(classes) if classes is not None else max(labels) + 1
    bad = sorted({v for v in labels if not 0 <= v < n_classes})
    if bad:
        raise SourceError(
            f"manifest {str(path)!r} has labels {bad[:5]} outside 0..{n_classes - 1} "
            f"({'the --classes file lists' if classes is not None else 'inferred'} {n_classes} classes)."
        )
    class_names = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    return [class_names[v] for v in labels], class_names


# ----------------------------------------------------------------------------- shards (vlaug.shards)


def _load_sharded(text: str, layout: Layout, classes: list[str] | None, class_key: str | None,
                  domain_key: str | None) -> Source | None:
    """A WebDataset or image-bytes Parquet source (given, or detected by ``auto``), else None."""
    from vlaug import shards

    detected = layout is Layout.auto
    if layout in (Layout.auto, Layout.webdataset):
        files = shards.shard_files(text, ".tar")
        if files is not None:
            return replace(_load_webdataset(text, files, classes, class_key, domain_key), detected=detected)
        if layout is Layout.webdataset:
            raise SourceError(f"--layout webdataset reads a .tar shard, a brace pattern ('shards/{{00000..00127}}.tar'), a "
                              f"glob or a folder of .tar files; {text!r} is none of these.")
    if layout in (Layout.auto, Layout.parquet_images):
        files = shards.shard_files(text, ".parquet")
        if files is not None and (layout is Layout.parquet_images or _holds_image_bytes(files[0])):
            if class_key or domain_key:
                raise SourceError("--class-key and --domain-key read WebDataset shards; a Parquet file's classes and "
                                  "domains are its 'label'/'class' and 'domain' columns.")
            return replace(_load_parquet_images(text, files, classes), detected=detected)
        if layout is Layout.parquet_images:
            raise SourceError(f"--layout parquet-images reads a .parquet file, a folder or a glob of them; {text!r} is "
                              "none of these.")
    return None


def _holds_image_bytes(file: Path) -> bool:
    import pyarrow.parquet as pq

    from vlaug.shards import open_file, parquet_bytes_column

    try:
        with open_file(str(file)) as f:
            return parquet_bytes_column(pq.read_schema(f)) is not None
    except Exception:  # noqa: BLE001 - not a Parquet file: the manifest reader says so
        return False


def _sharded_classes(values: list, classes: list[str] | None, names: list[str] | None, where: str) -> tuple[list, list[str]]:
    """Each row's class name and the class list from the rows' label values: integers index
    ``names`` (a ClassLabel) or ``classes`` (--classes); text is a class name."""
    if all(v is None for v in values):
        if classes is not None:
            raise SourceError(f"{where} has no labels, so --classes has nothing to order; leave it out.")
        return [None] * len(values), []
    texts = [str(v).strip() for v in values]
    if all(t.lstrip("-").isdigit() for t in texts):
        order = names if names is not None else classes
        if order is None:
            raise SourceError(f"{where} labels its images with class indices; give --classes FILE (one class name per "
                              "line, in index order) to name them.")
        bad = sorted({int(t) for t in texts if not 0 <= int(t) < len(order)})
        if bad:
            raise SourceError(f"{where} has class indices {bad[:5]} outside 0..{len(order) - 1}; check --classes.")
        row_names = [order[int(t)] for t in texts]
        return row_names, _resolve_classes(sorted(set(row_names), key=order.index), classes, where) if classes else list(order)
    return texts, _resolve_classes(sorted(set(texts)), classes, where)


def _sharded_source(text: str, layout: Layout, rows: list[dict], row_names: list, class_names: list[str],
                    n_ignored: int) -> Source:
    index = {name: i for i, name in enumerate(class_names)}
    seen, dupes = set(), []
    for r in rows:
        if r["id"] in seen:
            dupes.append(r["id"])
        seen.add(r["id"])
    if dupes:
        raise SourceError(f"source {text!r} has duplicate ids {sorted(set(dupes))[:5]} (shard or file name / key); give "
                          "each shard or file its own name, and each sample its own key.")
    records = [ImageRecord(r["id"], r["path"], index.get(name), name, r.get("domain", ""), r.get("split") or None,
                           (("caption", r["caption"]),) if r.get("caption") is not None else (), r["member"])
               for r, name in zip(rows, row_names)]
    domains = sorted({r.domain for r in records} - {""})
    root = text if "://" in text else os.path.abspath(text)
    return Source(root, layout.value, records, class_names, domains, n_ignored)


def _load_webdataset(text: str, files: list[Path], classes: list[str] | None, class_key: str | None,
                     domain_key: str | None) -> Source:
    from vlaug import shards

    rows, ignored, _ = shards.scan_webdataset(files, class_key, domain_key, classes)
    if not rows:
        raise SourceError(f"source {text!r} holds no sample with an image member ({', '.join(shards.IMAGE_SUFFIXES)}).")
    # a sample cut by a truncated shard keeps no label (its record fails on decode, recorded in failed.parquet)
    cut = [r["member"].startswith(shards.TRUNCATED) for r in rows]
    names, class_names = _sharded_classes([r["label"] for r, c in zip(rows, cut) if not c], classes, None, f"source {text!r}")
    it = iter(names)
    row_names = [None if c else next(it) for c in cut]
    return _sharded_source(text, Layout.webdataset, rows, row_names, class_names, ignored)


def _load_parquet_images(text: str, files: list[Path], classes: list[str] | None) -> Source:
    from vlaug import shards

    rows, names = shards.scan_parquet_images(files)
    if not rows:
        raise SourceError(f"source {text!r} has no rows. Add one row per image.")
    row_names, class_names = _sharded_classes([r["label"] for r in rows], classes, names, f"source {text!r}")
    bad = sorted({r["split"] for r in rows} - set(SPLITS))
    if bad:
        raise SourceError(f"source {text!r} has split values {bad[:5]}; use 'train', 'val', 'test' or leave it empty.")
    return _sharded_source(text, Layout.parquet_images, rows, row_names, class_names, 0)
