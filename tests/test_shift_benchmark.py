"""benchmarks/shift_benchmark.py's statistics and bookkeeping, on synthetic predictions (no vlaug run)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sb():
    spec = importlib.util.spec_from_file_location("shift_benchmark", ROOT / "benchmarks" / "shift_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("shift_benchmark", module)  # its dataclasses look their module up
    spec.loader.exec_module(sys.modules["shift_benchmark"])
    return sys.modules["shift_benchmark"]


def _predictions(correct: dict[str, np.ndarray], domains: np.ndarray) -> dict[str, np.ndarray]:
    """Columns of test_predictions.parquet from per-method correctness (n_seeds, n_rows)."""
    cols = {k: [] for k in ("method", "seed", "row", "id", "domain", "label", "prediction")}
    for method, c in correct.items():
        n_seeds, n_rows = c.shape
        for seed in range(n_seeds):
            rows = np.arange(n_rows)
            label = rows % 3
            cols["method"] += [method] * n_rows
            cols["seed"] += [seed] * n_rows
            cols["row"] += rows.tolist()
            cols["id"] += [f"r{r}" for r in rows]
            cols["domain"] += domains.tolist()
            cols["label"] += label.tolist()
            cols["prediction"] += np.where(c[seed], label, (label + 1) % 3).tolist()
    return {k: np.asarray(v) for k, v in cols.items()}


def _domains(n_in: int, n_out: int) -> np.ndarray:
    return np.array(["photo"] * n_in + ["sketch"] * n_out)


def test_bootstrap_has_width_for_deterministic_methods(sb):
    """Two methods that predict the same on every seed (deterministic given the data), A
    right where B is wrong on 6 rows and B right where A is wrong on 4: a t-interval over
    seeds has zero width and would call it a win; the bootstrap over rows ties it."""
    rng = np.random.default_rng(0)
    b = rng.random(400) < 0.7
    a = b.copy()
    a[np.flatnonzero(~b[100:])[:6] + 100] = True
    a[np.flatnonzero(b[100:])[:4] + 100] = False
    preds = _predictions({"a": np.tile(a, (5, 1)), "b": np.tile(b, (5, 1))}, _domains(100, 300))
    out = sb.paired_bootstrap(preds, "a", "b", ["photo"], n_resamples=500)["out_of_domain"]
    assert out["diff"] == pytest.approx(2 / 300)
    assert out["low"] < 0 < out["high"] and out["verdict"] == "ties"
    results = [{"method": m, "seed": s, "in_domain": 1.0, "out_of_domain": float(c[100:].mean())}
               for s in range(5) for m, c in (("a", a), ("b", b))]
    t = sb.paired_t(results, "a", "b")["out_of_domain"]
    assert t["low"] == t["high"] == pytest.approx(2 / 300) and t["verdict"] == "beats"


def test_bootstrap_verdicts_follow_the_interval(sb):
    rng = np.random.default_rng(1)
    base = rng.random((4, 600)) < 0.6
    much = base | (rng.random((4, 600)) < 0.3)  # about 12 points better everywhere
    preds = _predictions({"a": much, "b": base, "c": base.copy()}, _domains(200, 400))
    boot = sb.PairedBootstrap(preds, ["photo"], n_resamples=400)
    ab, ba, bc = boot.compare("a", "b"), boot.compare("b", "a"), boot.compare("b", "c")
    for axis in sb.AXES:
        assert ab[axis]["verdict"] == "beats" and ab[axis]["low"] > 0
        assert ba[axis]["verdict"] == "loses"
        assert ba[axis]["diff"] == pytest.approx(-ab[axis]["diff"])
        assert bc[axis] == {**bc[axis], "diff": 0.0, "low": 0.0, "high": 0.0, "verdict": "ties"}
        assert ab[axis]["n_seeds"] == 4
    assert ab["in_domain"]["n_rows"] == 200 and ab["out_of_domain"]["n_rows"] == 400
    expected = (much[:, 200:].mean(1) - base[:, 200:].mean(1)).mean()
    assert ab["out_of_domain"]["diff"] == pytest.approx(expected)


def test_bootstrap_is_seeded_and_reads_a_pyarrow_table(sb):
    rng = np.random.default_rng(2)
    preds = _predictions({"a": rng.random((3, 300)) < 0.6, "b": rng.random((3, 300)) < 0.55}, _domains(100, 200))
    first = sb.paired_bootstrap(preds, "a", "b", ["photo"], n_resamples=300, random_state=7)
    again = sb.paired_bootstrap(pa.table(preds), "a", "b", ["photo"], n_resamples=300, random_state=7)
    other = sb.paired_bootstrap(preds, "a", "b", ["photo"], n_resamples=300, random_state=8)
    assert first == again
    assert first["out_of_domain"]["low"] != other["out_of_domain"]["low"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bootstrap_interval_covers_a_null_difference(sb, seed):
    """A and B equally accurate (independent errors): the interval contains 0."""
    rng = np.random.default_rng(seed)
    preds = _predictions({"a": rng.random((5, 2000)) < 0.7, "b": rng.random((5, 2000)) < 0.7}, _domains(500, 1500))
    out = sb.paired_bootstrap(preds, "a", "b", ["photo"], n_resamples=300)
    assert out["out_of_domain"]["low"] < 0.02 and out["out_of_domain"]["high"] > -0.02
    assert out["out_of_domain"]["high"] - out["out_of_domain"]["low"] < 0.05


def test_paired_t_fallback(sb):
    results = [{"method": m, "seed": s, "in_domain": 0.9 + d, "out_of_domain": 0.5 + 2 * d}
               for s, noise in enumerate([0.0, 0.01, -0.01])
               for m, d in (("a", 0.05 + noise), ("b", 0.0))]
    out = sb.paired_t(results, "a", "b")
    assert out["in_domain"]["diff"] == pytest.approx(0.05)
    assert out["in_domain"]["verdict"] == "beats" and out["out_of_domain"]["low"] > 0


def test_lookup_turns_a_pair_around(sb):
    comps = {"pairs": [{"a": "x", "b": "y", "in_domain": {"diff": 0.02, "low": 0.01, "high": 0.03, "verdict": "beats"},
                        "out_of_domain": None}]}
    turned = sb.lookup(comps, "y", "x")
    assert turned["in_domain"] == {"diff": -0.02, "low": -0.03, "high": -0.01, "verdict": "loses"}
    assert turned["out_of_domain"] is None and sb.lookup(comps, "x", "z") is None


def test_tuning_caches_are_other_draws(sb):
    for setting in sb.SETTINGS.values():
        tuned = sb.cache_setting(setting, "tuning", draw=3)
        assert tuned.sim.seed == sb.TUNING_SEED_BASE + 3 != setting.sim.seed
        assert dataclasses.replace(tuned.sim, seed=setting.sim.seed) == setting.sim
        assert sb.cache_setting(setting, "reported") is setting
    with pytest.raises(ValueError, match="caches"):
        sb.cache_setting(sb.SETTINGS["easy"], "test")
    assert "easy" in sb.SETTINGS


def test_selection_flags_count_seeds(sb):
    grid = [1e-6, 1e-4, 1e-2]
    s = {"method": "gaussian", "selection": [{"weight_decay": 1e-6}, {"weight_decay": 1e-6, "converged": False},
                                             {"weight_decay": 1e-4}, {"weight_decay": 1e-2, "stalled": True},
                                             {"weight_decay": 1e-8, "grid_extended": True, "grid": [1e-8, 1e-2]}]}
    flags = sb.selection_flags(s, grid, None)
    assert "gaussian: weight decay 1e-06 (the grid's weakest) on 2 of 5 seeds" in flags
    assert "gaussian: weight decay 1e-02 (the grid's strongest) on 1 of 5 seeds" in flags
    assert "gaussian: weight decay 1e-08 (the extended grid's weakest) on 1 of 5 seeds" in flags
    assert any("grid extended on 1 of 5 seeds" in f for f in flags)
    assert "gaussian: did not converge (converged: false) on 1 of 5 seeds" in flags
    assert "gaussian: stalled (stalled: true) on 1 of 5 seeds" in flags
    joint = {"method": "batchformer", "selection": [{"selected_epoch": 3, "epochs": 3, "weight_decay": 0.01,
                                                     "stopped": "cap"}, {"selected_epoch": 2, "epochs": 3}]}
    assert sb.selection_flags(joint, grid, {"epochs": 3}) == [
        "batchformer: stopped by its cap on steps / epochs (stopped: \"cap\") on 1 of 2 seeds"]
    assert sb.selection_flags({"method": "zero-shot", "selection": [{}, {}]}, grid, None) == []


@pytest.fixture(scope="module")
def tune(sb):
    spec = importlib.util.spec_from_file_location("tune_defaults", ROOT / "benchmarks" / "tune_defaults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tune_defaults", module)
    spec.loader.exec_module(sys.modules["tune_defaults"])
    return sys.modules["tune_defaults"]


def test_tuning_rule(tune):
    rule = tune.Rule(tie=0.2, prefer=1.0)
    # 0.5 and 2 tie with the best and are equally near 1 on a log scale: the smaller wins
    assert tune.choose({"0.25": 76.0, "0.5": 76.9, "2": 76.9, "4": 77.0}, rule) == ("0.5", ["0.5", "2", "4"])
    assert tune.choose({"0.25": 76.67, "0.5": 76.82, "1": 76.83, "2": 76.61}, rule)[0] == "1"
    assert tune.choose({"0.5": 78.0, "1": 76.0}, rule) == ("0.5", ["0.5"])  # a clear lead is kept
    assert tune.choose({"gda": 70.0, "logistic": 70.1}, rule)[0] == "gda"  # not numbers: the first listed
    assert tune.choose({"0.5": 70.0, "1": float("nan")}, tune.Rule(prefer=None))[0] == "0.5"
    with pytest.raises(ValueError, match="tie"):
        tune.Rule(tie=-1)


def test_joint_options_go_to_the_joint_methods_alone(sb):
    specs = dict(sb.method_specs({}, 3, (("max_steps", 60), ("lr", "1e-2")))[0])
    assert specs["linear-adamw"] == "linear-adamw?max_steps=60&lr=1e-2"
    assert specs["clip-adapter"] == "clip-adapter" and specs["tip-adapter-f"] == "tip-adapter-f"  # their own schedules
    assert "cdga" not in specs  # it needs a generated set of its own


def test_a_run_trains_only_the_heads_and_runs_only_the_mixes_its_methods_need(sb, monkeypatch):
    assert sb.needed_heads() == list(sb.BASE_HEADS)
    monkeypatch.setitem(sb.SKIPPED, "names", ("box", "lads"))
    assert sb.needed_heads() == ["dr-sa"]
    monkeypatch.setitem(sb.SKIPPED, "names", ("box", "dr", "lads"))
    assert sb.needed_heads() == []
    monkeypatch.setitem(sb.SKIPPED, "names", ("linear-zs",))  # its WiSE mixes go with it
    specs = dict(sb.method_specs({}, None)[0])
    assert "linear?ensemble=0.3" in specs and "linear-zs" not in specs and not any("wise" in s for s in specs)


def _write_run(folder: Path, correct: dict[str, np.ndarray], specs: dict[str, str], domains: np.ndarray) -> Path:
    """A one-setting run JSON and its report folder's test_predictions.parquet (specs: label -> spec)."""
    import json

    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    cols = _predictions({specs[m]: c for m, c in correct.items()}, domains)
    pq.write_table(pa.table(cols), folder / "test_predictions.parquet")
    inside = domains == "photo"
    summary = [{"method": m, **{axis: {"mean": float(c[:, mask].mean()), "std": 0.0}
                                for axis, mask in (("in_domain", inside), ("out_of_domain", ~inside))}}
               for m, c in [("zero-shot", np.zeros((1, len(domains)), bool)), *correct.items()]]
    results = [{"method": specs[m], "seed": s, "selection": {"steps": 100 + s, "max_steps": 500}}
               for m in correct if m != "linear" for s in range(len(correct[m]))]
    run = {"settings": {"small": {"summary": summary, "results": results, "flags": [],
                                  "methods": [{"method": m, "spec": specs[m]} for m in correct]}}}
    (folder / "run.json").write_text(json.dumps(run))
    return folder / "run.json"


def test_joint_table_joins_runs_of_one_method_each(sb, tmp_path):
    """Runs that each hold one joint method make one table: each row compared with its own
    run's baselines (matched by label, though the predictions name the spec), the baselines
    once, and a note where they differ between the runs."""
    spec = importlib.util.spec_from_file_location("joint_table", ROOT / "benchmarks" / "joint_table.py")
    jt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jt)
    rng = np.random.default_rng(0)
    domains = _domains(40, 60)
    linear, adamw = rng.random((3, 100)) < 0.6, rng.random((3, 100)) < 0.6
    better = linear | (rng.random((3, 100)) < 0.5)  # right wherever linear is, and more
    specs = {m: m + "?max_steps=500" if m != "linear" else m for m in ("linear", "linear-adamw", "batchformer", "latentdr-pool")}
    a = _write_run(tmp_path / "a", {"linear": linear, "linear-adamw": adamw, "batchformer": better}, specs, domains)
    b = _write_run(tmp_path / "b", {"linear": linear, "linear-adamw": ~adamw, "latentdr-pool": linear}, specs, domains)
    text = jt.table([(a, tmp_path / "a"), (b, tmp_path / "b")], ["photo"])
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r[0].strip("| ") for r in rows] == ["linear", "linear-adamw", "batchformer", "latentdr-pool"]
    assert "(of ≤ 500)" in text and rows[2][3] == "100, 101, 102"
    out_gain = 100 * (better[:, 40:].mean() - linear[:, 40:].mean())
    assert rows[2][5].startswith(f"{out_gain:+.1f} [") and rows[2][5].endswith("beats")
    assert rows[3][4] == "+0.0 [+0.0, +0.0] ties"  # latentdr-pool against run b's own linear (the same predictions)
    assert f"`linear-adamw` differs in {b}:" in text and "`linear` differs" not in text
