"""The README and the pages of docs/ run as written, and their links lead somewhere.

Every ```bash and ```python block of README.md and docs/*.md either runs here or says why
not in an HTML comment just above it (``<!-- not run: REASON -->``). A page's runnable
blocks run in order in one folder (a small generated DomainNet-like folder, a class
folder, a flat folder and a CSV manifest), as a reader would paste them: the ``vlaug``
commands of a bash block with the tiny random-weight models in place of downloaded
weights and with options that only make the run fast, the python blocks in one namespace.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tests.conftest import make_class_folder, make_domain_folder, write_image
from vlaug.cli import app

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.*?)\s*-->")
SETUP_DEMO = "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && vlaug demo"
SETUP_TEST = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && python -m pytest -q -m "slow or not slow"'

# options that only make the run fast or quiet; none changes what a command does
FAST = {
    "embed": ["--workers", "0", "--no-progress"],
    "train-box": ["--epochs", "2", "--device", "cpu", "--no-progress"],
    "probe": ["--seeds", "1", "--grid-size", "2", "--max-iter", "20", "--device", "cpu", "--no-progress"],
}
# the same calls in the python blocks, with a smaller search
FAST_PYTHON = {"grid_size=8, max_iter=200": "grid_size=2, max_iter=20"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    not_run: str | None  # the reason given above a block that is not run

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang in ("bash", "python") and self.not_run is None


def code_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with the reason of a ``not run`` comment just above it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.match(r"```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = NOT_RUN.fullmatch(above)
        blocks.append(Block(page, i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n", marker and marker.group(1)))
        i = end + 1
    return blocks


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block, continuation lines joined and comments removed."""
    joined = re.sub(r"\\\s*\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line))
    return commands


def _tiny(args: list[str]) -> list[str]:
    """The same command with vlaug's tiny random-weight models instead of downloaded weights."""
    out, i = [], 0
    while i < len(args):
        if args[i] in ("--model", "--pretrained"):
            i += 2
            continue
        out.append(args[i])
        i += 1
    if args[1] == "embed":
        model = "vlaug-tiny-coca" if any("coca" in a for a in args) else "vlaug-tiny"
        out += ["--model", model, "--pretrained", "none"]
    return out + FAST.get(args[1], [])


def _all_blocks() -> list[Block]:
    return [b for page in PAGES for b in code_blocks(page)]


def quick_start_commands() -> list[list[str]]:
    """The ``vlaug`` commands of the README's quick start (the bash block of "Use it on your own images")."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Use it on your own images")
    line = text[:start].count("\n") + 1
    block = next(b for b in code_blocks(README) if b.line > line and b.lang == "bash")
    return shell_commands(block.code)


def test_every_block_runs_or_says_why():
    blocks = _all_blocks()
    assert any(b.runnable and b.lang == "bash" for b in blocks) and any(b.runnable and b.lang == "python" for b in blocks)
    for b in blocks:
        assert b.lang in ("", "bash", "python"), f"{b.where}: a ```{b.lang} block; run it here or use ```bash / ```python"
        if b.not_run is not None:
            assert b.lang, f"{b.where}: a plain block needs no 'not run' comment"
            assert len(b.not_run.split()) >= 3, f"{b.where}: say why the block is not run"
            if b.lang == "python":
                compile(b.code, b.where, "exec")  # not run, but at least valid Python
        elif b.lang == "bash":
            commands = shell_commands(b.code)
            assert commands and all(c[0] == "vlaug" for c in commands), (
                f"{b.where}: only vlaug commands run here; mark the block <!-- not run: WHY --> or change it")
            known = typer.main.get_command(app).commands
            for c in commands:
                assert c[1] in known, f"{b.where}: no command vlaug {c[1]}"
    # a comment that marks no block is a mistake (a block moved away from it)
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if NOT_RUN.fullmatch(line.strip()):
                after = next((x for x in lines[i + 1:] if x.strip()), "")
                assert after.startswith("```"), f"{page.name}:{i + 1}: a 'not run' comment that is not just above a block"
    for old in FAST_PYTHON:  # a substitution that no longer matches would make a block run slowly
        assert any(old in b.code for b in blocks if b.runnable and b.lang == "python"), old


def test_setup_lines_are_the_ones_ci_runs():
    """.ci/run and the demo depend on the README's two set-up lines, verbatim."""
    setup = [b.code.strip() for b in code_blocks(README) if b.not_run is not None][:2]
    assert setup == [SETUP_DEMO, SETUP_TEST]
    assert SETUP_TEST in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_the_quick_start_commands_are_found():
    commands = quick_start_commands()
    assert [c[1] for c in commands][:3] == ["embed", "prompts", "embed"] and commands[-1][1] == "predict"
    assert all(c[0] == "vlaug" for c in commands)
    lads = next(c for c in commands if "lads" in c and c[1] == "train-box")
    embed = commands[0]
    sets = {embed[i + 1].split("=")[0] for i, a in enumerate(embed) if a == "--prompt-set"}
    assert lads[lads.index("--source-prompts") + 1] in sets  # the set the lads line needs is created above it
    assert set(lads[lads.index("--target-prompts") + 1].split(",")) <= sets


def _make_inputs(root: Path) -> None:
    """The folders the pages' commands name, small."""
    make_domain_folder(root / "path/to/DomainNet", domains=("real", "sketch", "painting"), classes=("cat", "dog", "fox"), n=5)
    images = make_class_folder(root / "path/to/images", n=6)
    for k in range(3):
        write_image(root / "new_images" / f"{k}.png", 70 + k)
    rows = ["path,class,domain,split"]
    for i, f in enumerate(sorted(images.rglob("*.png"))):
        rows.append(f"{f.relative_to(root).as_posix()},{f.parent.name},photo,{('train', 'train', 'train', 'val', 'test')[i % 5]}")
    (root / "images.csv").write_text("\n".join(rows) + "\n")


def _run_blocks(blocks: list[Block], root: Path) -> list[Path]:
    """Run the blocks in order in ``root`` (the current folder); return the --out paths of the commands."""
    import vlaug.methods as methods

    runner, scope, outs = CliRunner(), {"__name__": "__docs__"}, []
    registered = dict(methods.REGISTRY)
    try:
        for b in blocks:
            if b.lang == "bash":
                for command in shell_commands(b.code):
                    r = runner.invoke(app, _tiny(command)[1:])
                    assert r.exit_code == 0, f"{b.where}: {shlex.join(command)}\n{r.output}"
                    if "--out" in command:
                        outs.append(root / command[command.index("--out") + 1])
            else:
                code = b.code
                for old, new in FAST_PYTHON.items():
                    code = code.replace(old, new)
                exec(compile(code, b.where, "exec", dont_inherit=True), scope)
    finally:  # a page may register a method (development.md does); the other tests must not see it
        methods.REGISTRY.clear()
        methods.REGISTRY.update(registered)
    return outs


RUNNABLE_PAGES = [p for p in PAGES if any(b.runnable for b in code_blocks(p))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=[p.name for p in RUNNABLE_PAGES])
def test_page_runs_as_written(page, tmp_path, monkeypatch):
    _make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    outs = _run_blocks([b for b in code_blocks(page) if b.runnable], tmp_path)
    missing = [str(o.relative_to(tmp_path)) for o in outs if not o.exists()]
    assert not missing, f"{page.name}: commands ran but wrote nothing at {missing}"
    if page == README:
        assert (tmp_path / "predictions.parquet").is_file() and (tmp_path / "reports/dn40/report.md").is_file()


def test_the_pages_that_must_run_do():
    names = {p.name for p in RUNNABLE_PAGES}
    assert {"README.md", "inputs-and-cache.md", "heads.md", "probes.md", "protocols-and-reports.md", "python-api.md",
            "development.md"} <= names


def test_tensor_examples_run(tmp_path, monkeypatch):
    """python-api.md's examples on plain tensors (heads, losses, samplers, the probe), in the fast suite."""
    page = ROOT / "docs" / "python-api.md"
    text = page.read_text(encoding="utf-8")
    until = text[: text.index("## Heads and probes trained by the commands")].count("\n") + 1
    blocks = [b for b in code_blocks(page) if b.runnable and b.lang == "python" and b.line < until]
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for b in blocks:
        code = b.code
        for old, new in FAST_PYTHON.items():
            code = code.replace(old, new)
        exec(compile(code, b.where, "exec", dont_inherit=True), scope)
    assert scope["proba"].shape == (64, 10) and scope["pred"].shape == (64,)
    assert scope["probe"].classes_ == [f"class{i}" for i in range(10)] and (tmp_path / "my_probe" / "config.json").is_file()


# --- links -------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks), with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(page).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = _slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def _prose(page: Path) -> str:
    """The page without its fenced blocks (their lines blanked, so nothing in them is a heading or link)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    inside = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            inside = not inside
            lines[i] = ""
        elif inside:
            lines[i] = ""
    return "\n".join(lines)


def links(page: Path) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "", _prose(page))  # inline code is not a link
    return re.findall(r"\]\(([^)\s]+)\)", prose)


def test_relative_links_lead_to_files_and_headings():
    checked = 0
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link {target!r} leads to no file"
            if anchor:
                assert dest.suffix == ".md", f"{page.name}: {target!r} has an anchor in a file that is not Markdown"
                assert anchor in anchors(dest), f"{page.name}: {target!r}: no heading with that anchor in {dest.name}"
            checked += 1
    assert checked > 20


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"the README does not link {page.relative_to(ROOT)}"


def test_slugs_follow_github():
    assert _slug("`vlaug probe FEATURES --out REPORT_DIR -m METHOD [...]`") == "vlaug-probe-features---out-report_dir--m-method-"
    assert _slug("Which method should I use?") == "which-method-should-i-use"
    assert _slug("`-m all`") == "-m-all"
