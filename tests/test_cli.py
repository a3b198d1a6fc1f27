"""The CLI as glue: CliRunner end to end on generated images, exit codes, one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import make_domain_folder, write_synthetic_cache
from tests.test_report_identity import assert_matches_golden
from vlaug import cache
from vlaug.cli import app
from vlaug.protocols import id_fractions, training_rows

runner = CliRunner()
TINY = ["--model", "vlaug-tiny", "--pretrained", "none", "--workers", "0", "--no-progress"]


def test_embed_then_info(tmp_path):
    src = make_domain_folder(tmp_path / "src", n=3)
    (src / "photo" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "feat"
    r = runner.invoke(app, ["embed", str(src), "--out", str(out), *TINY, "--prompt-set", "sketch=a sketch of a {}."])
    assert r.exit_code == 0, r.output
    assert "embedded 12, skipped 0 (already in cache), failed 1" in r.stdout
    assert "RANDOM weights" in r.stderr and "failed.parquet" in r.stderr
    assert len(cache.read_cache(out)) == 12

    r = runner.invoke(app, ["info", str(out)])
    assert r.exit_code == 0, r.output
    assert "per domain   photo 6, sketch 6" in r.stdout
    assert "per class    cat 6, dog 6" in r.stdout
    assert "prompt sets  classes (7 templates), sketch (1 template)" in r.stdout
    assert "photo/cat/broken.jpg:" in r.stdout
    assert "d=64, stored as float16" in r.stdout

    r = runner.invoke(app, ["embed", str(src), "--out", str(out), *TINY, "--prompt-set", "sketch=a sketch of a {}.", "--strict"])
    assert r.exit_code == 1
    assert "embedded 0, skipped 12" in r.stdout
    assert r.stderr.strip().splitlines()[-1] == "error: --strict: 1 input(s) failed."


@pytest.mark.parametrize(
    "args, match",
    [
        (["embed", "{tmp}/nowhere", "--out", "{tmp}/feat"], "does not exist"),
        (["embed", "{src}", "--out", "{tmp}/feat", "--model", "ViT-B-99"], "unknown model"),
        (["embed", "{src}", "--out", "{tmp}/feat", "--model", "ViT-B-32", "--pretrained", "laion5z"], "unknown pretrained tag"),
        (["embed", "{tmp}/m.csv", "--out", "{tmp}/feat"], "needs 'path' and 'class'"),
        (["embed", "{src}", "--out", "{tmp}/file.txt"], "is a file"),
        (["embed", "{src}", "--out", "{tmp}/feat", "--templates", "{tmp}/t.txt"], "has no '{}'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, match):
    src = make_domain_folder(tmp_path / "src", n=1)
    (tmp_path / "m.csv").write_text("file,label\na.png,0\n")
    (tmp_path / "file.txt").write_text("keep me")
    (tmp_path / "t.txt").write_text("a photo of a cat\n")
    args = [a.format(tmp=tmp_path, src=src) for a in args]
    if "--model" not in args:
        args += ["--model", "vlaug-tiny", "--pretrained", "none"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and match in r.stderr
    assert not (tmp_path / "feat").exists()
    assert (tmp_path / "file.txt").read_text() == "keep me"


def test_usage_errors_from_typer_exit_2(tmp_path):
    r = runner.invoke(app, ["embed", str(tmp_path), "--out", str(tmp_path / "f"), "--precision", "fp8"])
    assert r.exit_code == 2


def test_info_on_a_folder_that_is_not_a_cache(tmp_path):
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and "not a vlaug feature cache" in r.stderr
    r = runner.invoke(app, ["info", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


@pytest.mark.slow
def test_demo_runs_on_the_bundled_data(tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "embedded 300, skipped 0 (already in cache), failed 0" in r.stdout
    assert "per domain   painting 100, photo 100, sketch 100" in r.stdout
    assert "--pretrained laion2b_s34b_b79k" in r.stdout
    from vlaug.demo import bundled_data_dir

    assert f"vlaug embed {bundled_data_dir()} --out features" in r.stdout  # the folder it embedded, which exists
    manifest = json.loads((tmp_path / "demo" / "features" / "manifest.json").read_text())
    assert manifest["model"] == "vlaug-tiny" and manifest["pretrained"] == "none"
    assert set(manifest["prompt_sets"]) == {"photo", "sketch", "painting"}
    feats = cache.read_cache(tmp_path / "demo" / "features")
    # outside the held-out test rows and the probe's validation rows
    fit_rows = training_rows(feats.domains, feats.splits, feats.labels, ["photo"], id_fractions(feats.ids), 0.2, 0.2)
    n_val = sum(round(0.2 * n) for n in np.bincount(feats.labels[fit_rows]))
    assert 50 < len(fit_rows) < 100
    for head in ("box", "dr-sa"):
        assert f"trained {head} on {len(fit_rows) - n_val} rows ({n_val} validation) for 30 epochs" in r.stdout
    for head in ("box", "dr-sa"):
        assert (tmp_path / "demo" / "heads" / head / "model.safetensors").is_file()
    assert "| `linear` |" in r.stdout and "| `mixup` |" in r.stdout
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert report["protocol"]["seeds"] == [0, 1, 2] and len(report["summary"]) == 6
    assert_matches_golden("demo", report, tmp_path / "demo")
    # the simulated part: real differences between the methods, labelled as simulated
    assert "SIMULATED embeddings, not images" in r.stdout and "Against the linear probe" in r.stdout
    simulated = tmp_path / "demo" / "simulated" / "report"
    assert (simulated / "tradeoff.png").is_file()
    report = json.loads((simulated / "report.json").read_text())
    means = {row["method"].split(":")[0]: {k: row[k]["mean"] for k in ("in_domain", "out_of_domain")}
             for row in report["summary"]}
    assert list(means) == ["zero-shot", "linear", "box", "lads", "adaptive"]
    assert means["linear"]["in_domain"] - means["zero-shot"]["in_domain"] > 0.2  # tens of points apart
    assert means["zero-shot"]["out_of_domain"] - means["linear"]["out_of_domain"] > 0.1
    assert means["adaptive"]["out_of_domain"] - means["linear"]["out_of_domain"] > 0.1
    assert_matches_golden("demo_simulated", report, tmp_path / "demo" / "simulated")


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.startswith("vlaug ")


@pytest.mark.parametrize(("code", "status"), [("0", 0), ("3", 3), ("None", 0), ("'stopped: a message'", 1)])
def test_exit_skips_the_teardown_but_runs_exit_handlers_flushes_and_waits_for_threads(tmp_path, code, status):
    """vlaug's entry point ends with cli._exit: the exit status of sys.exit(code), exit
    handlers run, buffered output flushed, and a thread that is not a daemon finishes
    first (its work would be lost by an immediate exit)."""
    import subprocess
    import sys

    marker = tmp_path / "thread-done"
    script = f"""
import atexit, threading, time
from pathlib import Path
from vlaug.cli import _exit
atexit.register(lambda: print("handler ran"))
threading.Thread(target=lambda: (time.sleep(0.5), Path({str(marker)!r}).write_text("x"))).start()
print("buffered", end=" ")
_exit({code})
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == status, r.stderr
    assert r.stdout == "buffered handler ran\n"
    assert marker.is_file()
    if status == 1:
        assert r.stderr.strip() == "stopped: a message"


def test_the_command_line_entry_point_exits_with_the_commands_status(tmp_path):
    """``python -m vlaug`` (cli.main, which exits through _exit): a probe run writes its
    whole report and exits 0; bad input is one line and status 2."""
    import subprocess
    import sys

    from tests.conftest import write_synthetic_cache

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=30, d=8, n_classes=3)
    base = [sys.executable, "-m", "vlaug", "probe", str(feats), "--seeds", "1", "--grid-size", "2", "--device", "cpu",
            "--no-progress", "-m", "linear"]
    r = subprocess.run(base + ["--out", str(tmp_path / "rep")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| `linear` |" in r.stdout
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["results"]
    assert (tmp_path / "rep" / "accuracy.png").is_file()
    r = subprocess.run(base + ["--out", str(tmp_path / "rep")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_children_of_the_suite_hear_ctrl_c_and_import_this_vlaug(tmp_path):
    """Whatever shell started the suite (one that ignores SIGINT: nohup, a script's
    background job), a process a test starts handles Ctrl-C, and imports the vlaug under
    test from any directory (tests/conftest.py)."""
    import subprocess
    import sys

    code = "import signal, vlaug; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, vlaug.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    handled, where = r.stdout.split()
    assert handled == "True"
    assert Path(where).resolve() == (Path(__file__).resolve().parent.parent / "vlaug" / "__init__.py")


@pytest.mark.slow
def test_a_terminal_that_cannot_print_a_dash_gets_a_replacement_not_a_crash(tmp_path):
    import os
    import subprocess
    import sys

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=20, d=8, n_classes=3)
    r = subprocess.run([sys.executable, "-m", "vlaug", "probe", str(feats), "--out", str(tmp_path / "r"), "-m", "linear",
                        "--seeds", "1", "--grid-size", "2", "--device", "cpu", "--no-progress"],
                       capture_output=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "iso-8859-1"})
    assert r.returncode == 0, r.stderr.decode("latin-1")[-2000:]
    assert b"| `linear` |" in r.stdout
