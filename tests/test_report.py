"""Reports: the tables' numbers, JSON without NaN, atomic writing, what saved probes record."""

import json
import os
import signal

import numpy as np
import pytest

from tests.conftest import write_synthetic_cache
from vlaug.checkpoint import load_head
from vlaug.evaluate import ProbeRunConfig, run_probe
from vlaug.report import PlotWorker, _json_ready, format_table, write_report


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


def test_the_report_says_what_the_seeds_vary(run):
    """With every training row used the split is fixed by the ids: the report says the seeds
    vary only what methods draw, which is why `linear` has no spread over them."""
    from vlaug.report import format_markdown

    _, result = run
    md = format_markdown(result.report)
    assert "the split is the same for every seed" in md and "mean ± population std over seeds" in md
    assert "extended: both pooled (LARE's); balanced: the mean over classes" in md  # the table's columns, defined
    linear = [r["in_domain"] for r in result.report["results"] if r["method"] == "linear"]
    assert len(linear) == 2 and len(set(linear)) == 1  # what the sentence says of a method that draws nothing
    shots = {**result.report, "protocol": {**result.report["protocol"], "shots": 4}}
    assert "each seed draws its own training rows" in format_markdown(shots)
    # a search on a seeded sample (--selection-rows) varies with the seed: no claim that linear has no spread
    sampled = {**result.report, "results": [{**r, "selection": {**r["selection"], "selected_on": {"train_rows": 9}}}
                                            for r in result.report["results"]]}
    md = format_markdown(sampled)
    assert "the seeded sample each weight-decay search ran on" in md and "scores the same on every seed" not in md


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


def test_plots_drawn_by_the_worker_process_equal_those_drawn_here(run, tmp_path, monkeypatch):
    """A PlotWorker (started before the run, matplotlib imported meanwhile) draws every plot
    in its own process: those given to it during the run (run_probe submits the embeddings
    before the fits and the results' plots after them) and the others at write time; the
    same files, byte for byte, and the same report."""
    import vlaug.report as report

    root, result = run
    here = write_report(tmp_path / "here", result)
    drawn_here = []
    draw = report._draw
    monkeypatch.setattr(report, "_draw", lambda name, *job, **kw: drawn_here.append(name) or draw(name, *job, **kw))
    worker = PlotWorker(start=True)
    assert worker._proc is not None
    there = write_report(tmp_path / "there", result, plots=worker)
    early = PlotWorker(start=True)
    config = ProbeRunConfig(features=str(root / "feat"), out=str(root / "rep"), methods=("zero-shot", "linear", "gaussian"),
                            train_domains=("photo",), seeds=2, grid_size=2, max_iter=20, device="cpu", progress=False)
    again = run_probe(config, log=lambda msg: None, plots=early)
    assert early.sent == {"embeddings.png", "accuracy.png", "per_domain.png", "tradeoff.png"}  # submitted during the run
    submitted = []
    monkeypatch.setattr(early, "submit", lambda jobs: submitted.extend(j[0] for j in jobs if j[0] not in early.sent))
    during = write_report(tmp_path / "during", again, plots=early)
    assert drawn_here == [] and submitted == []  # nothing drawn here, nothing given twice
    assert there == here
    assert {k: v for k, v in during.items() if k not in ("seconds", "probe_dirs")} == \
        {k: v for k, v in here.items() if k not in ("seconds", "probe_dirs")}
    pngs = sorted(p.name for p in (tmp_path / "here").glob("*.png"))
    assert "embeddings.png" in pngs
    for folder in ("there", "during"):
        assert pngs == sorted(p.name for p in (tmp_path / folder).glob("*.png"))
        for name in pngs:
            assert (tmp_path / "here" / name).read_bytes() == (tmp_path / folder / name).read_bytes(), (folder, name)


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # Python >= 3.12 on forking this (threaded) test process
def test_plots_drawn_side_by_side_in_forks_equal_those_drawn_one_by_one(run, tmp_path):
    """_draw_all (the worker's batch) draws all but the first plot in forked processes on
    Linux: the same bytes as drawn one by one here; a plot that fails is left out (for the
    main process to draw), the others kept."""
    from vlaug.report import _draw, _draw_all, data_plots, result_plots

    _, result = run
    report = result.report
    jobs = result_plots(report) + data_plots(result.first_train, result.projections, False, report["classes"], {})
    broken = ("broken.png", "_plot_embeddings", ((None, None, None), {}), {"tsne": False})
    drawn = _draw_all(jobs[:2] + [broken] + jobs[2:])
    assert sorted(drawn) == sorted(name for name, *_ in jobs)
    for name, *job in jobs:
        assert drawn[name] == _draw(name, *job), name


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_a_forked_plot_that_hangs_is_stopped_and_left_out(run, monkeypatch):
    """A child that does not answer within CHILD_SECONDS is killed and its plot left to the
    main process; the batch's other plots are kept."""
    import time

    import vlaug.report as report

    _, result = run
    monkeypatch.setattr(report, "CHILD_SECONDS", 1.0)
    monkeypatch.setattr(report, "_plot_hangs", lambda file: time.sleep(60), raising=False)
    jobs = report.result_plots(result.report)[:1] + [("hangs.png", "_plot_hangs", (), {})]
    kills, kill = [], os.kill
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append(sig) or kill(pid, sig))
    drawn = report._draw_all(jobs)
    assert sorted(drawn) == [jobs[0][0]]
    assert kills == [signal.SIGKILL]  # the hanging child, stopped rather than waited for


def test_a_worker_that_cannot_draw_leaves_the_plots_to_this_process(run, tmp_path):
    """A worker that died before the plots arrived, or that fails on them: the plots are
    drawn here (a report as without a worker); a plot that fails here too fails the write,
    leaving no report; a worker given no plots is stopped by close()."""
    _, result = run
    worker = PlotWorker(start=True)
    worker._proc.kill()
    worker._proc.wait()
    write_report(tmp_path / "dead", result, plots=worker)
    assert {p.name for p in (tmp_path / "dead").glob("*.png")} >= {"accuracy.png", "per_domain.png", "embeddings.png"}
    flat = (np.zeros(5, np.float32), np.zeros(5, int), np.array(["photo"] * 5))  # no dimensions: the plot fails, there and here
    broken = type(result)(**{**result.__dict__, "first_train": flat, "projections": {}})
    failing = PlotWorker(start=True)
    with pytest.raises(Exception):
        write_report(tmp_path / "broken", broken, plots=failing)
    assert not (tmp_path / "broken").exists() and failing._proc is None  # the worker answered, and was stopped
    unused = PlotWorker(start=True)
    proc = unused._proc
    unused.close()
    assert proc.poll() is not None and unused._proc is None
    assert PlotWorker(start=False)._proc is None


# ----------------------------------------------------------------------------- plots


def test_embedding_plot_one_projection_every_method_and_a_class_legend(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from vlaug.report import _embedding_points, _plot_embeddings, _project

    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((60, 8)).astype(np.float32)
    y0, d0 = np.arange(60) % 3, np.array(["photo", "sketch"] * 30)
    # one projection: the originals' coordinates do not depend on what else is drawn, and an
    # augmentation equal to an original lands exactly on it
    xy_alone, _ = _project(x0, [], tsne=False, seed=0)
    xy0, (xy_copy, xy_far) = _project(x0, [x0[:5], 10 + x0[:5]], tsne=False, seed=0)
    np.testing.assert_allclose(xy0, xy_alone, atol=1e-6)
    np.testing.assert_allclose(xy_copy, xy0[:5], atol=1e-6)
    assert not np.allclose(xy_far, xy0[:5])
    projections = {f"method{k}": (np.concatenate([x0, x0 + 0.1 * k]), np.concatenate([y0, y0]), 60) for k in range(5)}
    drawn = _plot_embeddings((x0, y0, d0), projections, tmp_path / "e.png", tsne=False, classes=["cat", "dog", "fox"])
    assert (tmp_path / "e.png").stat().st_size > 0
    assert len(drawn["panels"]) == 6 and all(any(f"method{k}" in t for t in drawn["panels"]) for k in range(5))
    assert drawn["legend"] == ["cat", "dog", "fox"]
    assert len(drawn["limits"]) == 1  # every panel has the same axes
    # what the plot worker is given: at most max_points of each, the same points drawn again
    (xs, ys, ds), picked = _embedding_points((x0, y0, d0), projections, max_points=20)
    assert len(xs) == 20 and all(len(x) == 20 and n == 0 for x, _, n in picked.values())
    again, picked_again = _embedding_points((xs, ys, ds), picked, max_points=20)
    assert all(np.array_equal(a, b) for a, b in zip(again, (xs, ys, ds)))
    assert all(np.array_equal(picked[k][0], picked_again[k][0]) for k in picked)
    small = _plot_embeddings((x0, y0, d0), projections, tmp_path / "a.png", tsne=False, max_points=20)
    assert small == _plot_embeddings((xs, ys, ds), picked, tmp_path / "b.png", tsne=False, max_points=20)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_box_volume_plot_ranks_differences_and_per_domain_heat_map(run, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from vlaug.report import _plot_box_volume, _plot_per_domain

    per_class = [{"class": f"c{i}", "rank": i + 1, "mean_log_volume": -2800.0 - i * 0.5, "n": 3} for i in range(40)]
    per_dim = [{"dim": j, "classes": ["c1", "c2", "c3"], "mean_side": [0.01 * j, 0.0, 0.0]} for j in range(16)]
    drawn = _plot_box_volume({"per_class": per_class, "per_dimension": per_dim, "n_rows": 120}, "heads/box",
                             tmp_path / "b.png", top=15)
    assert drawn["classes"] == [f"c{i}" for i in list(range(15)) + list(range(25, 40))]  # top and bottom, in rank order
    assert drawn["x"][0] == pytest.approx(9.75) and drawn["x"][-1] == pytest.approx(-9.75)  # around the mean, not -2800
    assert drawn["dims"] == [15, 14, 13, 12, 11, 10, 9, 8]  # the dimensions with the longest sides (Table 5)
    _, result = run
    public = write_report(tmp_path / "rep", result)
    values = _plot_per_domain(public, tmp_path / "d.png")
    assert public["plots"]["per_domain"] == "per_domain.png" and (tmp_path / "rep" / "per_domain.png").is_file()
    assert values.shape == (3, 2)  # methods x domains (photo, sketch)
    for i, s in enumerate(public["summary"]):
        assert values[i].tolist() == pytest.approx([100 * s["per_domain"][d]["mean"] for d in ("photo", "sketch")])


def test_plots_label_a_head_folder_by_its_name_when_that_stays_distinct():
    from vlaug.report import _plot_labels

    assert _plot_labels(["zero-shot", "box:/tmp/run/heads/box?n_aug=3", "lads:heads/lads/"]) == [
        "zero-shot", "box:box?n_aug=3", "lads:lads"]
    assert _plot_labels(["box:/a/box", "box:/b/box"]) == ["box:/a/box", "box:/b/box"]  # ambiguous: as written
