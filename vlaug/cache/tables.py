"""User tables: a CSV or Parquet image manifest read into columns (for ``vlaug embed``)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vlaug.errors import SourceError


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
