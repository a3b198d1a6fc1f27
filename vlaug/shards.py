"""Image sources at web scale (issue 31): WebDataset tar shards and Parquet files that hold the
image bytes (img2dataset's two output formats, Hugging Face datasets' Parquet shards).

Nothing is unpacked. Scanning a source reads the tar headers (seeking over the image data)
or the Parquet files' metadata and small columns, and makes one
:class:`~vlaug.sources.ImageRecord` per image whose ``member`` says where its bytes are:
``tar:OFFSET:SIZE`` inside the shard, or ``parquet:ROW`` of the file. The embed workers read
each image's bytes at decode time (:func:`read_member`): a seek and a read for a tar member,
the member's row group for a Parquet row (one row group held per worker, so memory does not
grow with the number of shards or rows). Every guarantee of ``vlaug embed`` holds as for
files because the rest of the pipeline sees records like any other: resume by row id, ranks
under ``torchrun``, failures in ``failed.parquet``, ``--append``.

Remote shards and Parquet files (``s3://``, ``gs://``, ``https://``, ``file://``) are opened through
fsspec (the ``remote`` extra holds the schemes' packages): a seekable file, so a scan and a
decode read only the headers and the member they need.

The standard library's ``tarfile`` reads the shards (no ``webdataset`` dependency): the scan
needs only the headers and each member's offset, which ``tarfile`` gives while seeking over
the data, and a decode needs one seek and one read (the choice is measured in
docs/benchmarks.md, "Shards").

Row ids: ``SHARD_NAME/KEY`` (WebDataset's ``__key__``: the member name up to its first dot)
and ``FILE_NAME/KEY`` (a Parquet ``key`` column, else ``FILE_NAME/ROW``).
"""

from __future__ import annotations

import glob
import io
import json
import re
import tarfile
from pathlib import Path

from vlaug.errors import SourceError

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
BYTES_COLUMNS = ("jpg", "png", "webp", "jpeg", "image", "img")  # a Parquet column of image bytes (binary, or {bytes, path})
TRUNCATED = "truncated"  # the member of a shard cut short: its record fails on decode, with the reason


def is_url(path: str) -> bool:
    return "://" in str(path)


def open_file(path: str):
    """A seekable binary file object: a local file, or a URL through fsspec (``file://``,
    ``s3://``, ``gs://``, ``https://``; the scheme's package is in the ``remote`` extra)."""
    if not is_url(path):
        return open(path, "rb")
    import fsspec

    try:
        return fsspec.open(path, "rb").open()
    except ImportError as e:
        raise SourceError(f"{path!r}: {e}; or: pip install -e \".[remote]\"") from None


def file_size(path: str) -> int:
    if not is_url(path):
        return Path(path).stat().st_size
    import fsspec

    fs, inner = fsspec.core.url_to_fs(path)
    return int(fs.size(inner))


def file_name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _url_files(source: str, suffix: str) -> list[str] | None:
    """:func:`shard_files` for a URL: fsspec's listing and glob, the scheme kept."""
    import fsspec

    try:
        fs, _ = fsspec.core.url_to_fs(source.split("{")[0] or source)
    except ImportError as e:
        raise SourceError(f"{source!r}: {e}; or: pip install -e \".[remote]\"") from None
    scheme = source.split("://", 1)[0]
    full = lambda p: p if is_url(p) else f"{scheme}://{p}"  # noqa: E731
    if "{" in source:
        files = expand_braces(source)
        missing = [f for f in files if not fs.isfile(fsspec.core.url_to_fs(f)[1])]
        if missing:
            raise SourceError(f"{source!r} names {len(files)} files; {missing[0]!r} does not exist. Check the pattern.")
        return files if all(f.endswith(suffix) for f in files) else None
    inner = fsspec.core.url_to_fs(source)[1]
    if any(c in source for c in "*?["):
        files = sorted(full(p) for p in fs.glob(inner))
        if not files:
            raise SourceError(f"{source!r} matches no file. Check the pattern.")
        return files if all(f.endswith(suffix) for f in files) else None
    if fs.isfile(inner):
        return [source] if source.endswith(suffix) else None
    if fs.isdir(inner):
        entries = fs.ls(inner, detail=True)
        files = sorted(full(e["name"]) for e in entries if e["type"] == "file" and e["name"].endswith(suffix))
        dirs = [e for e in entries if e["type"] == "directory"]
        return files if files and not dirs else None
    raise SourceError(f"{source!r} does not exist. Check the URL.")


def expand_braces(pattern: str) -> list[str]:
    """``shards/{00000..00003}.tar`` and ``{a,b}`` expanded (as WebDataset and clip-retrieval
    take them), in order; a pattern without braces is itself."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        values = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        values = body.split(",")
    return [x for v in values for x in expand_braces(head + v + tail)]


def shard_files(source: str, suffix: str) -> list | None:
    """The files of a shard source: one file, a brace pattern, a glob or a folder of files
    ending in ``suffix`` (local paths, or URLs as strings); None when ``source`` is none of these."""
    if is_url(source):
        return _url_files(source, suffix)
    if "{" in source:
        files = [Path(p) for p in expand_braces(source)]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise SourceError(f"{source!r} names {len(files)} files; {missing[0]!r} does not exist. Check the pattern.")
        return files if all(p.name.endswith(suffix) for p in files) else None
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(source))
        if not files:
            raise SourceError(f"{source!r} matches no file. Check the pattern.")
        return files if all(p.name.endswith(suffix) for p in files) else None
    p = Path(source)
    if p.is_file():
        return [p] if p.name.endswith(suffix) else None
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(suffix) and not f.name.startswith("."))
        others = [f for f in p.iterdir() if f.is_dir() and not f.name.startswith(".")]
        return files if files and not others else None
    return None


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset's (``__key__``, extension) of a member: the basename up to its first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _field(kind: str, members: dict, reader, key: str, where: str):
    """The value of a ``--class-key`` / ``--domain-key`` spec for one sample: a member's text
    (``cls``), or ``json:FIELD`` of its ``.json`` member; None when the sample lacks it."""
    if kind.startswith("json:"):
        if "json" not in members:
            return None
        try:
            value = json.loads(reader(members["json"]))
        except ValueError:
            raise SourceError(f"{where}: {key}.json is not JSON; fix the shard or drop the json: key.") from None
        for part in kind[5:].split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return None if value is None else str(value)
    if kind not in members:
        return None
    return reader(members[kind]).decode("utf-8", "replace").strip()


def scan_webdataset(files: list[Path], class_key: str | None, domain_key: str | None, classes: list[str] | None):
    """Records of every sample with an image in the tar ``files`` (see the module docstring):
    ``(rows, class names found, n_ignored)``; rows are dicts for :func:`vlaug.sources` to
    label. The class comes from ``class_key`` (default ``cls`` when the samples have one):
    an integer indexes ``classes``, text is a class name."""
    rows, ignored, truncated = [], 0, []
    default_cls = class_key is None
    for shard in files:
        samples: dict[str, dict] = {}
        cut = None
        name, where_path = file_name(str(shard)), str(shard) if is_url(str(shard)) else str(Path(shard).resolve())
        with open_file(str(shard)) as f:
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        key, ext = _split_key(info.name)
                        samples.setdefault(key, {})[ext] = info
            except (tarfile.ReadError, EOFError) as e:
                cut = str(e) or "unexpected end of data"
            size = file_size(str(shard))

            def read(info, f=f):
                f.seek(info.offset_data)
                return f.read(info.size)

            where = f"shard {str(shard)!r}"
            for key, members in samples.items():
                image = next((ext for ext in IMAGE_SUFFIXES if ext in members), None)
                if image is None:
                    ignored += 1
                    continue
                info = members[image]
                ckey = "cls" if default_cls else class_key
                label = _field(ckey, members, read, key, where) if ckey else None
                domain = _field(domain_key, members, read, key, where) if domain_key else None
                caption = read(members["txt"]).decode("utf-8", "replace") if "txt" in members else None
                complete = info.offset_data + info.size <= size
                rows.append({"id": f"{name}/{key}", "path": where_path, "shard": name, "key": key,
                             "member": f"tar:{info.offset_data}:{info.size}" if complete else f"{TRUNCATED}:{name}",
                             "label": label, "domain": domain or "", "caption": caption})
        if cut is not None:
            truncated.append((shard, cut))
            rows.append({"id": f"{name}/{TRUNCATED}", "path": where_path, "shard": name,
                         "key": TRUNCATED, "member": f"{TRUNCATED}:{name} ({cut})", "label": None, "domain": "",
                         "caption": None})
    whole = [r for r in rows if not r["member"].startswith(TRUNCATED)]  # a cut sample may have lost its cls member
    if default_cls and whole and not all(r["label"] is None for r in whole) and any(r["label"] is None for r in whole):
        missing = next(r for r in whole if r["label"] is None)
        raise SourceError(f"sample {missing['id']!r} has no cls member while others do; give every sample one, or "
                          "--class-key json:FIELD for a field of their .json members.")
    if class_key and any(r["label"] is None for r in whole):
        missing = next(r for r in whole if r["label"] is None)
        raise SourceError(f"sample {missing['id']!r} lacks --class-key {class_key!r}; every sample needs it (or leave "
                          "--class-key out for unlabeled rows).")
    if domain_key and any(not r["domain"] for r in whole):
        missing = next(r for r in whole if not r["domain"])
        raise SourceError(f"sample {missing['id']!r} lacks --domain-key {domain_key!r}; every sample needs it.")
    return rows, ignored, truncated


def parquet_bytes_column(schema) -> tuple[str, bool] | None:
    """The column of image bytes of a Parquet schema, and whether it is a ``{bytes, path}``
    struct (Hugging Face's ``Image`` feature); None when it has none."""
    import pyarrow as pa

    for name in BYTES_COLUMNS:
        if name not in schema.names:
            continue
        t = schema.field(name).type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return name, False
        if pa.types.is_struct(t) and any(t.field(i).name == "bytes" for i in range(t.num_fields)):
            return name, True
    return None


def hf_class_names(schema, column: str) -> list[str] | None:
    """The class names of a ``ClassLabel`` column from the file's ``huggingface`` metadata."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        features = json.loads(meta).get("info", {}).get("features", {})
    except ValueError:
        return None
    feature = features.get(column) or {}
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" and "names" in feature else None


def scan_parquet_images(files: list[Path]):
    """Rows of every Parquet file whose rows carry image bytes: ``(rows, ClassLabel names or None)``."""
    import pyarrow.parquet as pq

    rows, names = [], None
    for file in files:
        pf = pq.ParquetFile(open_file(str(file)))
        schema = pf.schema_arrow
        found = parquet_bytes_column(schema)
        if found is None:
            raise SourceError(f"Parquet file {str(file)!r} has no column of image bytes (columns {schema.names[:8]}); "
                              f"vlaug reads a binary {'/'.join(BYTES_COLUMNS[:3])} column or an image struct with "
                              "'bytes'. A manifest of image paths needs a 'path' column instead.")
        wanted = [c for c in ("key", "label", "class", "domain", "split") if c in schema.names]
        table = pf.read(columns=wanted) if wanted else None
        cols = table.to_pydict() if table is not None else {}
        label_col = "label" if "label" in cols else "class" if "class" in cols else None
        if label_col:
            file_names = hf_class_names(schema, label_col)
            if file_names is not None:
                if names is not None and names != file_names:
                    raise SourceError(f"{str(file)!r} lists other ClassLabel names than the files before it; embed "
                                      "files of one dataset together.")
                names = file_names
        for i in range(pf.metadata.num_rows):
            key = str(cols["key"][i]) if "key" in cols and cols["key"][i] is not None else str(i)
            rows.append({"id": f"{file_name(str(file))}/{key}", "member": f"parquet:{i}",
                         "path": str(file) if is_url(str(file)) else str(Path(file).resolve()),
                         "label": cols[label_col][i] if label_col else None, "domain": str(cols.get("domain", [""] * (i + 1))[i] or ""),
                         "split": str(cols["split"][i] or "") if "split" in cols else ""})
    return rows, names


class _RowGroupCache:
    """One Parquet row group's image column held per process (a worker reads rows in order)."""

    def __init__(self):
        self.key, self.values, self.start = None, None, 0

    def get(self, path: str, row: int) -> bytes:
        import pyarrow.parquet as pq

        if self.key is not None and self.key[0] == path and self.start <= row < self.start + len(self.values):
            value = self.values[row - self.start]  # the row group held already
            if value is None:
                raise ValueError("no image bytes in this row")
            return value
        pf = pq.ParquetFile(open_file(path))
        start = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row < start + n:
                break
            start += n
        else:
            raise IndexError(f"row {row} is past the end of {path!r}")
        if self.key != (path, g):
            column, struct = parquet_bytes_column(pf.schema_arrow)
            values = pf.read_row_group(g, columns=[column]).column(column)
            self.values = [v["bytes"] if struct and v is not None else v for v in values.to_pylist()]
            self.key, self.start = (path, g), start
        value = self.values[row - self.start]
        if value is None:
            raise ValueError("no image bytes in this row")
        return value


_ROW_GROUPS = _RowGroupCache()


def read_member(path: str, member: str) -> io.BytesIO:
    """The bytes of a record's image inside a shard or a Parquet file, as a file object."""
    kind, _, where = member.partition(":")
    if kind == "tar":
        offset, size = (int(v) for v in where.split(":"))
        with open_file(path) as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"tar member cut short: {len(data)} of {size} bytes")
        return io.BytesIO(data)
    if kind == "parquet":
        return io.BytesIO(_ROW_GROUPS.get(path, int(where)))
    if kind == TRUNCATED:
        if " (" in where:  # the shard's own record: where its scan stopped
            raise OSError(f"truncated shard {where}: its scan stopped there, and any sample after that point is lost")
        raise OSError(f"the shard {where} ends inside this member (truncated shard)")
    raise ValueError(f"unknown member {member!r}")
