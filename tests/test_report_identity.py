"""The numbers of ``vlaug probe`` reports are pinned: a refactor must leave them unchanged.

``tests/data/golden_reports.json`` holds the numbers (accuracies per seed, what each
selection chose, feature geometry) of a few fixed commands on a synthetic cache: every
method, heads trained by ``vlaug train-box``, reweighting with class weights and
imbalance, and a streamed run. A change that is *meant* to move the numbers (a fix to
the science) regenerates the file and says why in its commit:

    VLAUG_WRITE_GOLDEN=1 python -m pytest tests/test_report_identity.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import write_synthetic_cache
from vlaug.cli import app

GOLDEN = Path(__file__).parent / "data" / "golden_reports.json"
runner = CliRunner()

HEADS = {
    "box": [],
    "dr-sa": [],
    "lads": ["--source-prompts", "photo", "--target-prompts", "sketch"],
}
COMMON = ["--train-domain", "photo", "--seeds", "2", "--grid-size", "3", "--max-iter", "40", "--device", "cpu",
          "--no-progress"]
SCENARIOS = {
    "all_methods": (["zero-shot", "linear", "linear-zs?wise=0.3", "linear?ensemble=0.3", "box:{root}/box?n_aug=3&ensemble=0.5",
                     "dr:{root}/dr-sa", "lads:{root}/lads", "gaussian?sigma=0.2", "mixup", "xdomain-mix",
                     "batchformer?epochs=3", "latentdr-sa?epochs=3", "latentdr-pool?epochs=3"], []),
    "reweighted": (["linear", "gaussian", "box:{root}/box"],
                   ["--reweight", "seed-category", "--class-weight", "--imbalance", "50:8"]),
    "groupdro_shots": (["linear", "mixup"], ["--reweight", "groupdro", "--shots", "10"]),
    "streamed": (["linear", "box:{root}/box?n_aug=2", "gaussian", "dr:{root}/dr-sa"], ["--memory-budget", "20K"]),
}


def numbers(report: dict) -> dict:
    """What must not move: per-seed accuracies and selections, summaries, geometry, head stats."""
    return {
        "results": report["results"],
        "summary": report["summary"],
        "feature_geometry": report["feature_geometry"],
        "selection_seed0": {m["method"].split(":")[0] + m["method"].partition("?")[1] + m["method"].partition("?")[2]:
                            m["selection_seed0"] for m in report["methods"]},
        "splits": report["protocol"]["splits"],
        "streamed": report["protocol"]["streamed"],
    }


def _relative(report: dict, root: Path) -> dict:
    """Method names without the temporary folder they were run in."""
    text = json.dumps(report).replace(str(root) + "/", "")
    return json.loads(text)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("golden")
    feats = write_synthetic_cache(root / "feat", n_per_class=25, d=32, n_classes=4)
    for head, extra in HEADS.items():
        r = runner.invoke(app, ["train-box", str(feats), "--out", str(root / head), "--head", head, "--epochs", "5",
                                "--train-domain", "photo", "--device", "cpu", "--no-progress", *extra])
        assert r.exit_code == 0, r.output
    out = {}
    for name, (methods, extra) in SCENARIOS.items():
        args = ["probe", str(feats), "--out", str(root / name), *COMMON, *extra]
        for m in methods:
            args += ["-m", m.format(root=root)]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        out[name] = (json.loads((root / name / "report.json").read_text()), root)
    return out


def assert_matches_golden(name: str, report: dict, root: Path) -> None:
    """``report``'s numbers equal the pinned ones of ``name`` (or, with VLAUG_WRITE_GOLDEN, become them)."""
    got = _relative(numbers(report), root)
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if os.environ.get("VLAUG_WRITE_GOLDEN"):
        golden[name] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    assert json.dumps(got, sort_keys=True) == json.dumps(golden[name], sort_keys=True), name


@pytest.mark.slow
def test_report_numbers_are_unchanged(runs):
    for name, (report, root) in runs.items():
        assert_matches_golden(name, report, root)
