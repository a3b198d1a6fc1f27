"""The README's quick start runs as written (on a cache it creates), with the tiny
random-weight models in place of the real ones and a small generated DomainNet-like folder."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import make_class_folder, make_domain_folder, write_image
from vlaug.cli import app

README = Path(__file__).parent.parent / "README.md"
# options that only make the run fast or quiet; none changes what a command does
FAST = {
    "embed": ["--workers", "0", "--no-progress"],
    "train-box": ["--epochs", "2", "--device", "cpu", "--no-progress"],
    "probe": ["--seeds", "1", "--grid-size", "2", "--max-iter", "20", "--device", "cpu", "--no-progress"],
}


def quick_start_commands() -> list[list[str]]:
    """The ``vlaug`` commands of the README's quick-start block, continuation lines joined
    and comments removed."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quick start with real weights"):]
    block = section[section.index("```bash\n") + len("```bash\n"):section.index("```\n", section.index("```bash\n") + 8)]
    joined = re.sub(r"\\\s*\n\s*", " ", block)
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


def test_the_commands_are_found():
    commands = quick_start_commands()
    assert [c[1] for c in commands][:3] == ["embed", "prompts", "embed"] and commands[-1][1] == "predict"
    assert all(c[0] == "vlaug" for c in commands)
    lads = next(c for c in commands if "lads" in c and c[1] == "train-box")
    embed = commands[0]
    sets = {embed[i + 1].split("=")[0] for i, a in enumerate(embed) if a == "--prompt-set"}
    assert lads[lads.index("--source-prompts") + 1] in sets  # the set the lads line needs is created above it
    assert set(lads[lads.index("--target-prompts") + 1].split(",")) <= sets


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    make_domain_folder(tmp_path / "path/to/DomainNet", domains=("real", "sketch", "painting"), classes=("cat", "dog", "fox"), n=3)
    make_class_folder(tmp_path / "path/to/images", n=2)
    for k in range(3):
        write_image(tmp_path / "new_images" / f"{k}.png", 70 + k)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in quick_start_commands():
        r = runner.invoke(app, _tiny(command)[1:])
        assert r.exit_code == 0, f"{shlex.join(command)}\n{r.output}"
    assert (tmp_path / "predictions.parquet").is_file()
    assert (tmp_path / "reports/dn40/report.md").is_file()


def test_library_examples_run(tmp_path, monkeypatch):
    """The README's heads example and the probe example after it (tensors in, tensors out)."""
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    heads = next(b for b in blocks if "BoxHead" in b)
    heads = heads[: heads.index('head = vlaug.load_head("heads/box")')]  # needs a trained head folder
    probe = next(b for b in blocks if "fit_linear_probe" in b)
    probe = probe.replace("grid_size=8, max_iter=200", "grid_size=2, max_iter=20")  # the same calls, a smaller search
    assert "grid_size=2, max_iter=20" in probe
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(heads + probe, "README.md", "exec"), scope)
    assert scope["proba"].shape == (64, 10) and scope["pred"].shape == (64,)
    assert scope["probe"].classes_ == [f"class{i}" for i in range(10)] and (tmp_path / "my_probe" / "config.json").is_file()
