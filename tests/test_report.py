"""Reports: the tables' numbers, JSON without NaN, atomic writing, what saved probes record."""

import json

import numpy as np
import pytest

from tests.conftest import write_synthetic_cache
from vlaug.checkpoint import load_head
from vlaug.evaluate import ProbeRunConfig, run_probe
from vlaug.report import _json_ready, format_table, write_report


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    feats = write_synthetic_cache(root / "feat", n_per_class=20, d=16, n_classes=3)
    config = ProbeRunConfig(features=str(feats), out=str(root / "rep"), methods=("zero-shot", "linear", "gaussian"),
                            train_domains=("photo",), seeds=2, grid_size=2, max_iter=20, device="cpu", progress=False)
    return root, run_probe(config, log=lambda msg: None)


def test_table_shows_mean_and_std_over_seeds_in_percent(run):
    _, result = run
    table = format_table(result.report)
    for s in result.report["summary"]:
        values = [r["in_domain"] for r in result.report["results"] if r["method"] == s["method"]]
        assert f"| `{s['method']}` | {100 * np.mean(values):.1f} ± {100 * np.std(values):.1f} |" in table


def test_json_has_no_nan_and_plain_types():
    out = _json_ready({"a": float("nan"), "b": [np.float32(0.5), (1, float("inf"))], "c": np.int64(3)})
    assert json.dumps(out, allow_nan=False) == '{"a": null, "b": [0.5, [1, null]], "c": 3}'


def test_written_report_and_its_probes(run, tmp_path):
    _, result = run
    public = write_report(tmp_path / "rep", result)
    on_disk = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert on_disk == public and on_disk["results"] == _json_ready(result.report["results"])
    assert not any(k.startswith("_") for k in on_disk)
    probe = load_head(tmp_path / "rep" / on_disk["probe_dirs"]["linear"])
    assert probe.kind == "probe" and probe.cache == {**result.cache, "texts": {}} and probe.cache["seed"] == 0
    zero_shot = load_head(tmp_path / "rep" / on_disk["probe_dirs"]["zero-shot"])
    assert zero_shot.cache["texts"] == {"classes": ["a photo of a {}."]}  # the prompts its predictions use
    assert "- model: `synthetic`" in (tmp_path / "rep" / "report.md").read_text()


def test_a_failed_write_leaves_the_old_report(run, tmp_path):
    _, result = run
    write_report(tmp_path / "rep", result)
    before = (tmp_path / "rep" / "report.json").read_text()
    broken = type(result)(**{**result.__dict__, "first_train": (None, None, None)})  # the plot fails
    with pytest.raises(Exception):
        write_report(tmp_path / "rep", broken)
    assert (tmp_path / "rep" / "report.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rep"]  # no temporary folder left
