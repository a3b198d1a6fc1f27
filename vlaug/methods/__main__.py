"""``python -m vlaug.methods``: print the registry's method table (Markdown); with
``--docs PAGE``, rewrite the table between PAGE's ``methods table`` markers instead."""

from __future__ import annotations

import sys
from pathlib import Path

from vlaug.methods.registry import markdown_table

BEGIN = "<!-- methods table: generated from vlaug/methods by `python -m vlaug.methods --docs docs/probes.md` -->\n"
END = "<!-- end of methods table -->\n"


def with_table(page: str) -> str:
    """``page`` with the text between its markers replaced by :func:`markdown_table`."""
    if BEGIN not in page or END not in page:
        raise SystemExit(f"the page has no methods table markers; put these two lines where it goes:\n{BEGIN}{END}")
    head, rest = page.split(BEGIN, 1)
    return head + BEGIN + markdown_table() + END + rest.split(END, 1)[1]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--docs"] and len(sys.argv) == 3:
        page = Path(sys.argv[2])
        if not page.is_file():
            raise SystemExit(f"--docs {page}: no such file; give the Markdown page that holds the table (docs/probes.md).")
        page.write_text(with_table(page.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        sys.stdout.write(markdown_table())
