"""DomainBed's protocol (issue 28): per-seed in/out splits, the training problems of the
three model selections, their choices, the tables and the report, and the refusals."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import write_synthetic_cache
from vlaug import domainbed
from vlaug.cli import app
from vlaug.errors import UsageError
from vlaug.evaluate import ProbeRunConfig, run_probe
from vlaug.methods.registry import expand_method
from vlaug.probe import Rows, validation_scores
from vlaug.protocols import in_out_splits
from vlaug.report import format_markdown, write_report

DOMAINS = ("clipart", "painting", "photo", "sketch")
runner = CliRunner()


def _labels_domains(n_per=(40, 25, 30, 35), n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([rng.integers(0, n_classes, n) for n in n_per])
    domains = np.concatenate([np.full(n, d) for n, d in zip(n_per, DOMAINS)]).astype(object)
    return labels, domains


def test_in_out_splits_cover_each_domain_stratified_and_vary_with_the_seed():
    labels, domains = _labels_domains()
    none = np.full(len(labels), "", dtype=object)
    first = in_out_splits(labels, domains, none, list(DOMAINS), seed=0)
    again = in_out_splits(labels, domains, none, list(DOMAINS), seed=0)
    other = in_out_splits(labels, domains, none, list(DOMAINS), seed=1)
    for d in DOMAINS:
        rows = np.flatnonzero(domains == d)
        inn, out = first[d]
        assert np.array_equal(np.sort(np.concatenate([inn, out])), rows) and not np.intersect1d(inn, out).size
        for c in np.unique(labels[rows]):  # 20 % of each class (rounded, at least one) is out
            n = int((labels[rows] == c).sum())
            assert int((labels[out] == c).sum()) == (min(n - 1, max(1, round(0.2 * n))) if n > 1 else 0)
        assert np.array_equal(again[d][1], out)
    assert any(not np.array_equal(first[d][1], other[d][1]) for d in DOMAINS)


def test_a_split_column_gives_in_and_out_and_anything_else_is_refused():
    labels, domains = _labels_domains()
    splits = np.where(np.arange(len(labels)) % 5 == 0, "val", "train").astype(object)
    parts = in_out_splits(labels, domains, splits, list(DOMAINS), seed=3)
    for d in DOMAINS:
        assert (splits[parts[d][0]] == "train").all() and (splits[parts[d][1]] == "val").all()
        assert len(parts[d][0]) + len(parts[d][1]) == int((domains == d).sum())
    splits[7] = "test"
    with pytest.raises(UsageError, match="train rows: in, val rows: out"):
        in_out_splits(labels, domains, splits, list(DOMAINS), seed=0)


def test_the_tasks_never_train_on_the_test_domain_and_validate_where_each_selection_says():
    labels, domains = _labels_domains()
    none = np.full(len(labels), "", dtype=object)
    tasks = domainbed.plan_tasks(labels, domains, none, list(DOMAINS), ["photo", "sketch"], 2, domainbed.SELECTIONS, 0.2)
    assert len(tasks) == 2 * 2 * (1 + 1 + 3)  # seeds x test domains x (training-domain, oracle, 3 folds)
    for t in tasks:
        parts = in_out_splits(labels, domains, none, list(DOMAINS), t.seed)
        others = [d for d in DOMAINS if d != t.test_domain]
        s = t.splits
        assert not np.isin(s.train, np.flatnonzero(domains == t.test_domain)).any()
        assert not np.intersect1d(s.train, s.val).size
        assert np.array_equal(s.test_out, parts[t.test_domain][0])  # every selection is scored on the test domain's in rows
        if t.role == domainbed.TRAINING_DOMAIN:
            assert np.array_equal(s.train, np.sort(np.concatenate([parts[d][0] for d in others])))
            assert np.array_equal(s.val, np.sort(np.concatenate([parts[d][1] for d in others])))
        elif t.role == domainbed.ORACLE:
            assert np.array_equal(s.val, parts[t.test_domain][1])
        else:
            assert t.fold in others and np.array_equal(s.val, parts[t.fold][0])
            assert np.array_equal(s.train, np.sort(np.concatenate([parts[d][0] for d in others if d != t.fold])))
            assert np.array_equal(t.calibration, np.sort(np.concatenate([parts[d][1] for d in others])))
    with pytest.raises(UsageError, match="three domains"):
        domainbed.plan_tasks(labels[domains != "photo"], domains[domains != "photo"], none[domains != "photo"],
                             ["clipart", "painting"], ["clipart"], 1, domainbed.SELECTIONS, 0.2)


def test_leave_one_domain_out_takes_the_best_mean_over_the_folds():
    folds = [[{"weight_decay": 0.1, "val_accuracy": 0.9, "val_log_loss": 0.3},
              {"weight_decay": 0.01, "val_accuracy": 0.7, "val_log_loss": 0.5}],
             [{"weight_decay": 0.1, "val_accuracy": 0.5, "val_log_loss": 0.9},
              {"weight_decay": 0.01, "val_accuracy": 0.8, "val_log_loss": 0.4},
              {"weight_decay": 0.001, "val_accuracy": 1.0, "val_log_loss": 0.1}]]  # 0.001: scored in one fold only
    best, means = domainbed.lodo_choice(folds)
    assert best["weight_decay"] == 0.01 and best["val_accuracy"] == pytest.approx(0.75)
    assert [m["weight_decay"] for m in means] == [0.1, 0.01]
    assert domainbed.lodo_choice([[{"weight_decay": 1.0, "val_accuracy": 1, "val_log_loss": 0}], []]) is None
    # equal means of other accuracies (201 + 201 + 194 and 200 + 199 + 197 hits of 210): the log-loss decides
    folds = [[{"weight_decay": 0.1, "val_accuracy": a / 210, "val_log_loss": 0.9},
              {"weight_decay": 0.01, "val_accuracy": b / 210, "val_log_loss": 0.1}] for a, b in ((201, 200), (201, 199), (194, 197))]
    assert domainbed.lodo_choice(folds)[0]["weight_decay"] == 0.01


def test_the_mean_over_the_folds_extends_every_fold_past_the_end_it_chose():
    """vlaug's grid rule (extend past an end that the selection chose) applied to what chooses
    under leave-one-domain-out: the mean over the folds, not each fold's own best."""
    def fold(*accuracies):
        return [{"weight_decay": wd, "val_accuracy": a, "val_log_loss": 1 - a} for wd, a in zip((0.1, 0.01, 0.001), accuracies)]

    past = {0.001 * 0.1: (0.9, 0.95), 0.001 * 0.1 * 0.1: (0.9, 0.9), 0.001 * 0.1 * 0.1 * 0.1: (0.99, 0.99)}
    calls = []

    def candidate(k, wd):
        calls.append((k, wd))
        return {"weight_decay": wd, "val_accuracy": past[wd][k], "val_log_loss": 0.0}

    # fold 0 alone prefers the strong end (0.1); the mean prefers the weak end (0.001): both folds go past it
    folds = [fold(0.8, 0.7, 0.75), fold(0.5, 0.6, 0.9)]
    (best, means), info = domainbed.extended_choice(folds, candidate, 2)
    assert calls == [(0, 1e-4), (1, 1e-4), (0, 1e-5), (1, 1e-5)] and info == {"grid_extended": True, "grid": [1e-5, 0.1]}
    assert best["weight_decay"] == 1e-4 and best["val_accuracy"] == pytest.approx(0.925)  # 1e-5 ties it: not taken
    assert [m["weight_decay"] for m in means] == [0.1, 0.01, 0.001, 1e-4, 1e-5]
    assert all(len(f) == 5 for f in folds)  # the folds' searches hold the values past the grid
    # a fold's own best at an end (fold 0: 0.1) with the mean's interior: nothing past the grid
    calls.clear()
    (best, _), info = domainbed.extended_choice([fold(0.9, 0.7, 0.6), fold(0.5, 0.9, 0.6)], candidate, 3)
    assert calls == [] and best["weight_decay"] == 0.01 and info == {"grid_extended": False, "grid": [0.001, 0.1]}


def test_grouped_validation_scores_are_the_mean_of_the_groups_accuracies():
    torch.manual_seed(0)
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    groups = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(10, dtype=torch.long)])  # unequal sizes
    theta = torch.randn(2, 5, 3)
    grouped = validation_scores(Rows(lambda: [(x, y, groups)], 4, 3, 50, groups=2), theta)
    pooled = validation_scores(Rows(lambda: [(x, y, None)], 4, 3, 50), theta)
    for p in range(2):
        hit = (x @ theta[p, :-1] + theta[p, -1]).argmax(1) == y
        assert grouped[p][0] == pytest.approx((hit[:40].float().mean() + hit[40:].float().mean()).item() / 2)
        assert pooled[p][0] == pytest.approx(hit.float().mean().item())


def test_option_lists_expand_into_configurations():
    assert [c for _, c in expand_method("gaussian?sigma=0.05,0.2&n_aug=1,2")] == [
        {"sigma": "0.05", "n_aug": "1"}, {"sigma": "0.05", "n_aug": "2"}, {"sigma": "0.2", "n_aug": "1"},
        {"sigma": "0.2", "n_aug": "2"}]
    assert expand_method("linear-adamw?lr=1e-3,1e-2") == [("linear-adamw?lr=1e-3,1e-2", {})]  # searched inside
    with pytest.raises(UsageError, match="repeats"):
        expand_method("gaussian?sigma=0.1,0.1")


@pytest.fixture(scope="module")
def four_domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domainbed")
    return write_synthetic_cache(root / "feat", n_per_class=20, d=16, n_classes=3, domains=DOMAINS, prompt_sets=())


@pytest.fixture(scope="module")
def run(four_domains, tmp_path_factory):
    config = ProbeRunConfig(features=str(four_domains), out=str(tmp_path_factory.mktemp("out") / "r"), methods=("zero-shot", "linear", "gaussian?sigma=0.05,0.3"),
                            seeds=2, grid_size=4, max_iter=60, device="cpu", progress=False,
                            protocol="leave-one-domain-out", selection="all")
    return run_probe(config)


def test_one_result_per_method_seed_test_domain_and_selection(run, four_domains):
    results = run.report["results"]
    assert len(results) == 3 * 2 * 4 * 3
    keys = {(r["method"], r["seed"], r["test_domain"], r["model_selection"]) for r in results}
    assert len(keys) == len(results)
    for r in results:  # the three selections are measured on the same rows: the test domain's in rows
        same = [x["n_test_rows"] for x in results if (x["seed"], x["test_domain"]) == (r["seed"], r["test_domain"])]
        assert len(set(same)) == 1
    zs = [r["out_of_domain"] for r in results if r["method"] == "zero-shot" and (r["seed"], r["test_domain"]) == (0, "photo")]
    assert len(set(zs)) == 1  # nothing to select
    gauss = [r for r in results if r["method"] == "gaussian?sigma=0.05,0.3"]
    assert {r["config"]["sigma"] for r in gauss} <= {0.05, 0.3} and all(r["n_configurations"] == 8 for r in gauss)


def test_the_selections_choose_what_their_scores_say(run):
    for r in run.report["results"]:
        s = r["selection"]
        if r["method"].startswith("gaussian"):  # the configuration chosen is the one its selection scored best
            scores = [(c["val_accuracy"], -c["val_log_loss"]) for c in s["configurations"]]
            assert r["config"] == s["configurations"][scores.index(max(scores))]["config"]
        if r["method"] != "linear":
            continue
        if r["model_selection"] == domainbed.LODO:  # the refitted weight decay is the best mean over the folds
            grid = run.report["protocol"]["weight_decay_grid"]
            on_grid = [c for c in s["candidates"] if c["weight_decay"] in grid]
            best = max(on_grid, key=lambda c: (c["val_accuracy"], -c["val_log_loss"]))
            top = max(c["val_accuracy"] for c in s["candidates"])
            if best["val_accuracy"] < top:  # a value past the grid, taken with a higher mean accuracy only
                best = next(c for c in s["candidates"] if c["val_accuracy"] == top)
            assert s["weight_decay"] == best["weight_decay"] and len(s["folds"]) == 3
            assert r["test_domain"] not in s["folds"]
            # past an end of the grid exactly where the mean chose that end
            ends = [min(grid), max(grid)]
            assert s["grid_extended"] == (best["weight_decay"] not in grid or best["weight_decay"] in ends)
        else:
            assert 0.0 <= s["val_accuracy"] <= 1.0


def test_tip_adapters_alpha_and_beta_are_the_best_mean_over_the_folds(four_domains, tmp_path):
    """Tip-Adapter's (α, β) are candidates like a weight decay: under leave-one-domain-out
    selection each is scored by its mean over the folds (not fold 0's own choice), and an
    adapter's refit trains for the mean of its folds' epochs."""
    from vlaug.methods.fewshot import TIP_ALPHAS, TIP_BETAS

    config = ProbeRunConfig(features=str(four_domains), out=str(tmp_path / "r"), methods=("tip-adapter", "tip-adapter-f?epochs=3"),
                            seeds=1, device="cpu", progress=False, protocol="leave-one-domain-out",
                            selection="all", test_domains=("photo",))
    report = run_probe(config).report
    results = report["results"]
    assert len(results) == 2 * 3
    # every selection chose among the 4,000 (α, β), whichever task comes first
    assert all(r["n_configurations"] == len(TIP_ALPHAS) * len(TIP_BETAS) for r in results)
    md = format_markdown(report)
    assert f"{len(TIP_ALPHAS)} α 0.1 … {TIP_ALPHAS[-1]:.4g} × {len(TIP_BETAS)} β 0.1 … {TIP_BETAS[-1]:.4g}" in md
    results = [r for r in results if r["model_selection"] == domainbed.LODO]
    for r in results:
        s = r["selection"]
        assert s["n_candidates"] == len(TIP_ALPHAS) * len(TIP_BETAS) and len(s["candidates"]) == 50
        top = s["candidates"][0]
        assert top["val_accuracy"] == max(c["val_accuracy"] for c in s["candidates"])
        assert (s["alpha"], s["beta"]) == (top["alpha"], top["beta"]) and s["val_accuracy"] == top["val_accuracy"]
        for c in s["candidates"]:
            assert len(c["fold_val_accuracy"]) == 3 and c["val_accuracy"] == pytest.approx(np.mean(c["fold_val_accuracy"]))
    assert isinstance(results[1]["selection"]["selected_epoch"], int)


def test_tables_average_the_test_domains(run):
    tables = run.report["tables"]
    assert list(tables) == list(domainbed.SELECTIONS)
    for selection, table in tables.items():
        for row in table:
            mine = [r for r in run.report["results"] if r["method"] == row["method"] and r["model_selection"] == selection]
            for d, stat in row["domains"].items():
                values = [r["out_of_domain"] for r in mine if r["test_domain"] == d]
                assert stat["mean"] == pytest.approx(np.mean(values)) and stat["std"] == pytest.approx(np.std(values))
            assert row["avg"]["mean"] == pytest.approx(np.mean([v["mean"] for v in row["domains"].values()]))


def test_the_report_keeps_the_oracle_apart_and_writes_every_prediction(run, tmp_path):
    public = write_report(tmp_path / "r", run)
    md = (tmp_path / "r" / "report.md").read_text()
    titles = [md.index("## Training-domain validation"), md.index("## Leave-one-domain-out cross-validation"),
              md.index("## Oracle: test-domain validation (uses test-domain labels")]
    assert titles == sorted(titles)
    assert md == format_markdown(json.loads((tmp_path / "r" / "report.json").read_text()))
    assert (tmp_path / "r" / "domainbed.png").stat().st_size > 0 and public["plots"]["domainbed"] == "domainbed.png"
    table = pq.read_table(tmp_path / "r" / "test_predictions.parquet").to_pydict()
    assert len(table["prediction"]) == sum(r["n_test_rows"] for r in public["results"])
    assert set(table["model_selection"]) == set(domainbed.SELECTIONS)
    for r in public["results"][:12]:  # each result's accuracy is its predictions'
        at = [i for i in range(len(table["method"])) if (table["method"][i], table["seed"][i], table["test_domain"][i],
                                                           table["model_selection"][i]) ==
              (r["method"], r["seed"], r["test_domain"], r["model_selection"])]
        assert {table["domain"][i] for i in at} == {r["test_domain"]}
        assert [table["id"][i] for i in at] == [f"img{table['row'][i]}" for i in at]  # the cache's ids, decoded
        hits = np.mean([table["prediction"][i] == table["label"][i] for i in at])
        assert hits == pytest.approx(r["out_of_domain"], abs=1e-6)


def test_the_report_states_what_each_selection_chose_and_extended(run):
    """report.md's counts of searches past the grid are per selection (the oracle's apart),
    and each method's line says what every selection chose for the first seed and test domain,
    with a listed option's chosen value rather than its first."""
    report = run.report
    md = format_markdown(report)
    counted = 0
    for role in domainbed.SELECTIONS:
        mine = [r["selection"] for r in report["results"] if r["model_selection"] == role and "grid_extended" in r["selection"]]
        n = sum(x["grid_extended"] for x in mine)
        assert f"{role} {n} of {len(mine)} results" in md
        counted += n
    assert counted  # (this run goes past the grid somewhere)
    from vlaug.methods.linear import GRID_EXTENSION_DECADES

    assert report["protocol"]["grid_extension_decades"] == GRID_EXTENSION_DECADES
    assert f"a decade at a time (at most {GRID_EXTENSION_DECADES};" in md
    assert "a decade at a time (at most 7;" in format_markdown({**report, "protocol": {**report["protocol"], "grid_extension_decades": 7}})
    line = next(x for x in md.splitlines() if x.startswith("- `gaussian?sigma=0.05,0.3`"))
    assert "sigma=0.05, " not in line.split(";")[0]  # the listed option is not shown as the first configuration's
    seed, test = report["protocol"]["seeds"][0], report["protocol"]["test_domains"][0]
    for r in report["results"]:
        if (r["method"], r["seed"], r["test_domain"]) == ("gaussian?sigma=0.05,0.3", seed, test):
            assert f"{r['model_selection']} chose sigma={r['config']['sigma']:.3g}, weight_decay={r['selection']['weight_decay']:.3g}" in line


def test_same_seeds_same_splits(four_domains, run, tmp_path):
    config = ProbeRunConfig(features=str(four_domains), out=str(tmp_path / "r"), methods=("zero-shot",), seeds=2, device="cpu",
                            progress=False, protocol="leave-one-domain-out", selection="all")
    again = run_probe(config).report["protocol"]["tasks"]
    assert [t["fingerprints"] for t in again] == [t["fingerprints"] for t in run.report["protocol"]["tasks"]]
    by_seed = {t["seed"]: t["fingerprints"]["train"] for t in again if t["role"] == "training-domain" and t["test_domain"] == "photo"}
    assert by_seed[0] != by_seed[1]


@pytest.mark.parametrize("args, match", [
    (["--test-domain", "photo"], "belong to --protocol leave-one-domain-out"),
    (["--selection", "oracle"], "belong to --protocol leave-one-domain-out"),
    (["--protocol", "leave-one-domain-out", "--train-domain", "photo"], "--train-domain belongs to --protocol single"),
    (["--protocol", "leave-one-domain-out", "--test-domain", "nowhere"], "--test-domain 'nowhere' is not in the cache"),
    (["-m", "gaussian?sigma=0.1,0.2"], "searched under --protocol"),
])
def test_wrong_protocol_options_are_one_line_and_exit_2(four_domains, tmp_path, args, match):
    base = ["probe", str(four_domains), "--out", str(tmp_path / "r"), "--no-progress"]
    if "-m" not in args:
        base += ["-m", "linear"]
    r = runner.invoke(app, base + args)
    assert r.exit_code == 2, r.output
    assert match in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_splits_with_the_same_training_rows_share_the_grids_fits(four_domains, tmp_path, monkeypatch):
    """The training-domain and oracle selections train on the same rows, as do the folds
    (T, v) and (v, T): the grid is fitted once for them, and each selects on its own rows
    as a search of its own would. The distinct sets' grids are one batch (a column per set,
    each domain's rows a block under the sets that train on it)."""
    import vlaug.methods.batching as batching
    from vlaug.evaluate import prepare
    from vlaug.methods import parse_method
    from vlaug.methods.batching import ProbeSolver

    monkeypatch.setattr(batching, "GROUP_PATTERN_ROWS", 8)  # (a small cache: its domains' rows as blocks all the same)
    config = ProbeRunConfig(features=str(four_domains), out=str(tmp_path / "r"), methods=("linear",), seeds=1,
                            grid_size=4, max_iter=60, device="cpu", progress=False,
                            protocol="leave-one-domain-out", selection="all")
    plan = prepare(config)
    shared = plan.methods[0]
    counted = []
    import vlaug.methods.linear as linear
    real = linear.fit_probes
    linear.fit_probes = lambda *a, **k: counted.append(len(a[1])) or real(*a, **k)
    together, real_together, blocks = [], batching.fit_probes, []
    batching.fit_probes = lambda rows, *a, **k: (together.append(len(a[0])) or blocks.append(list(rows.blocks()))
                                                 or real_together(rows, *a, **k))
    try:
        fits = shared.fit_seeds(plan.data, plan.splits, ProbeSolver(plan.data, plan.splits))
    finally:
        linear.fit_probes, batching.fit_probes = real, real_together
    unique = {np.asarray(s.train).tobytes() for s in plan.splits}
    assert len(unique) == 10 < len(plan.splits)  # 4 three-domain sets + 6 pairs, for 20 tasks
    assert together == [10 * 4] and counted.count(4) == 0  # every set's grid in one batch, none alone
    owners = sorted(len(b[4]) for b in blocks[0] if len(b) > 4)
    assert owners == [6, 6, 6, 6]  # a domain's rows: under the 3 three-domain sets and 3 pairs that hold it
    at_end = 0
    for i, (split, fit) in enumerate(zip(plan.splits, fits)):
        fresh = parse_method("linear")
        fresh.folds = shared.folds  # a fold's search does not extend by its own choice (the mean over its folds does)
        alone = fresh.fit(plan.data, split, i)
        assert fit.selection["weight_decay"] == alone.selection["weight_decay"]
        if i in shared.folds:  # nothing past the grid by a fold's own choice
            assert not fit.selection["grid_extended"] and not any(e.get("extension") for e in fit.search)
            at_end += fit.selection["weight_decay"] in (min(plan.data.settings.grid), max(plan.data.settings.grid))
        assert fit.selection["val_accuracy"] == pytest.approx(alone.selection["val_accuracy"], abs=0.02)
        assert (fit.W - alone.W).norm() <= 0.01 * alone.W.norm()
    assert at_end  # (folds whose own best is at an end: their searches would have gone past it)


def test_methods_with_rows_of_their_own_are_searched_on_them(four_domains, tmp_path):
    """cross-modal adds its class prompts as rows (no extras to count): the grouped grids of
    the distinct training sets fit the cache's rows alone, so they must not stand in for its
    fits (tests/test_fewshot.py: the seeds' batched refits after sampled searches)."""
    from vlaug.evaluate import prepare
    from vlaug.methods import parse_method
    from vlaug.methods.batching import ProbeSolver

    config = ProbeRunConfig(features=str(four_domains), out=str(tmp_path / "r"), methods=("cross-modal",), seeds=1,
                            grid_size=4, max_iter=60, device="cpu", progress=False,
                            protocol="leave-one-domain-out", selection="all", test_domains=("photo", "sketch"))
    plan = prepare(config)
    method = plan.methods[0]
    fits = method.fit_seeds(plan.data, plan.splits, ProbeSolver(plan.data, plan.splits))
    for i, (split, fit) in enumerate(zip(plan.splits, fits)):
        fresh = parse_method("cross-modal")
        fresh.folds = method.folds
        alone = fresh.fit(plan.data, split, i)
        assert fit.selection["n_train_rows"] == len(split.train) + plan.data.n_classes  # the prompts' rows too
        assert fit.selection["weight_decay"] == alone.selection["weight_decay"]
        assert [e["val_log_loss"] for e in fit.search] == pytest.approx([e["val_log_loss"] for e in alone.search], abs=1e-4)
        assert (fit.W - alone.W).norm() <= 0.01 * alone.W.norm()


def test_training_sets_are_grouped_by_the_rows_they_share():
    """grids_together's groups: consecutive sets while their union stays within UNION_LIMIT x
    the largest (one split seed's sets: unions of the same domains' in rows), a new group for
    another seed's sets (other rows), and never more than the group size, every set once in
    order."""
    from vlaug.methods.batching import _compact_groups

    rng = np.random.default_rng(0)
    domains = [np.arange(k * 100, (k + 1) * 100) for k in range(4)]

    def seed_sets():  # each domain's "in" rows drawn for this seed; its tasks' distinct sets in the protocol's order
        ins = [np.sort(rng.choice(d, 80, replace=False)) for d in domains]
        found = {}
        for test in range(4):  # the training-domain set, then each fold's pair
            rest = [j for j in range(4) if j != test]
            for keep in [rest] + [[j for j in rest if j != v] for v in rest]:
                found.setdefault(tuple(keep), np.sort(np.concatenate([ins[j] for j in keep])))
        return list(found.values())

    first, second = seed_sets(), seed_sets()
    sets = first + second
    groups = _compact_groups(sets, 16)
    assert [len(g) for g in groups] == [10, 10]
    assert all(a is b for a, b in zip([t for g in groups for t in g], sets))  # in order, each once
    small = _compact_groups(sets, 4)
    assert all(len(g) <= 4 for g in small) and [t for g in small for t in g] == sets


@pytest.fixture(scope="module")
def head_set(four_domains, tmp_path_factory):
    from vlaug.heads import make_head_config
    from vlaug.train import TrainConfig, train_head

    out = tmp_path_factory.mktemp("heads") / "box"
    result = train_head(TrainConfig(features=str(four_domains), out=str(out), head=make_head_config("box"), epochs=2,
                                    progress=False, device="cpu", protocol="leave-one-domain-out", seeds=2,
                                    selection="all"), log=lambda msg: None)
    assert result.n_heads == 2 * (4 + 6)  # seeds x (held-out domains + held-out pairs)
    return out


def test_a_head_set_holds_one_head_per_seed_and_held_out_domains_trained_on_the_others_in_rows(head_set, four_domains):
    from vlaug import cache as cache_io
    from vlaug.checkpoint import read_head_config
    from vlaug.train import HEAD_SET_NAME

    index = json.loads((head_set / HEAD_SET_NAME).read_text())
    feats = cache_io.read_metadata(str(four_domains))
    assert index["kind"] == "box" and index["domains"] == list(DOMAINS) and len(index["heads"]) == 20
    for h in index["heads"]:
        training = read_head_config(head_set / h["path"])["training"]
        assert (training["split_seed"], training["held_out"]) == (h["seed"], h["held_out"])
        parts = in_out_splits(feats.labels, feats.domains, feats.splits, list(DOMAINS), h["seed"])
        rows = [d for d in DOMAINS if d not in h["held_out"]]
        assert training["train_domains"] == rows
        assert training["n_train"] + training["n_val"] == sum(len(parts[d][0]) for d in rows)


@pytest.mark.parametrize("selection", ["all", "leave-one-domain-out"])
def test_methods_with_heads_run_under_the_protocol_with_a_head_per_task(head_set, four_domains, tmp_path, selection):
    """Each task's head, and the leave-one-domain-out model's (trained without the test domain
    alone: no task's head when that selection runs by itself), loaded and checked."""
    from vlaug.evaluate import prepare

    config = ProbeRunConfig(features=str(four_domains), out=str(tmp_path / "r"), methods=(f"box:{head_set}?n_aug=2",),
                            seeds=2, grid_size=3, max_iter=40, device="cpu", progress=False,
                            protocol="leave-one-domain-out", selection=selection)
    plan = prepare(config)
    method = plan.methods[0]
    for i, t in enumerate(plan.tasks):  # each task's head: its seed, without its test domain (and fold)
        held = "+".join(sorted({t.test_domain, t.fold} - {""}))
        assert method.task_heads[i].endswith(f"seed{t.seed}/without-{held}")
    report = run_probe(config).report
    n = 3 if selection == "all" else 1
    assert len(report["results"]) == 2 * 4 * n and all(0 <= r["out_of_domain"] <= 1 for r in report["results"])


@pytest.mark.parametrize("case, match", [
    ("plain head", "train a set of heads with vlaug train-box FEATURES --protocol leave-one-domain-out"),
    ("set under single", "is a set of heads for --protocol leave-one-domain-out"),
    ("other holdout", "--holdout-fraction 0.2, this probe splits with 0.3"),
    ("more seeds", "has no head for seed 2"),
])
def test_heads_that_do_not_fit_the_protocol_are_refused(head_set, four_domains, tmp_path, case, match):
    from vlaug.heads import make_head_config
    from vlaug.train import TrainConfig, train_head

    head, kw = str(head_set), dict(protocol="leave-one-domain-out", selection="all", seeds=2)
    if case == "plain head":
        head = str(tmp_path / "plain")
        train_head(TrainConfig(features=str(four_domains), out=head, head=make_head_config("box"), epochs=1, progress=False,
                               device="cpu"), log=lambda msg: None)
    elif case == "set under single":
        kw = {}
    elif case == "other holdout":
        kw["holdout_fraction"] = 0.3
    else:
        kw["seeds"] = 3
    config = ProbeRunConfig(features=str(four_domains), out=str(tmp_path / "r"), methods=(f"box:{head}",), device="cpu",
                            progress=False, **kw)
    with pytest.raises(UsageError, match=match):
        run_probe(config)


@pytest.fixture(scope="module")
def four_domains_with_prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("domainbed-prompts")
    return write_synthetic_cache(root / "feat", n_per_class=20, d=16, n_classes=3, domains=DOMAINS, prompt_sets=DOMAINS)


def test_prompt_shift_shifts_each_fit_towards_the_domains_it_leaves_out(four_domains_with_prompts, tmp_path):
    """Under leave-one-domain-out the training domains differ between fits: prompt-shift's
    targets are, per fit, the prompt sets of the domains its training rows are not from (the
    test domain, and a fold's validation domain), its source the class prompts."""
    from vlaug.evaluate import prepare

    config = ProbeRunConfig(features=str(four_domains_with_prompts), out=str(tmp_path / "r"),
                            methods=("prompt-shift", "adaptive"), seeds=1, grid_size=3, max_iter=40, device="cpu",
                            progress=False, protocol="leave-one-domain-out", selection="all")
    plan = prepare(config)
    shift = plan.methods[0]
    assert shift.name == "prompt-shift" and sorted(shift.prompt_sets()) == sorted(["classes", *DOMAINS])
    assert shift.extra_rows() == 2  # a fold leaves out two domains
    x = plan.data.x[:6].float()
    y = plan.data.y[:6]
    for t in plan.tasks:
        held = {t.test_domain, t.fold} - {""}
        source, targets = shift.pick(np.unique(plan.data.feats.domains[t.splits.train]).tolist())
        assert (source, sorted(targets)) == ("classes", sorted(held))
        rows, soft = shift.augmenter(plan.data, t.splits.train)(plan.data, x, y, None, torch.Generator().manual_seed(0))
        assert rows.shape == (6 * len(held), 16) and torch.equal(soft.argmax(1), y.repeat(len(held)))
    report = run_probe(config).report
    assert {r["method"] for r in report["results"]} == {"prompt-shift", "adaptive"}
    assert len(report["results"]) == 2 * 4 * 3


def test_prompt_shift_names_the_held_out_domains_without_a_prompt_set(four_domains, tmp_path):
    from vlaug.evaluate import prepare

    config = ProbeRunConfig(features=str(four_domains), out=str(tmp_path / "r"), methods=("prompt-shift",), seeds=1,
                            device="cpu", progress=False, protocol="leave-one-domain-out", selection="training-domain")
    with pytest.raises(UsageError, match="no target-domain prompt set"):
        prepare(config)
    config = ProbeRunConfig(features=str(four_domains), out=str(tmp_path / "r2"), methods=("adaptive",), seeds=1,
                            device="cpu", progress=False, protocol="leave-one-domain-out", selection="training-domain")
    assert any("runs without prompt shifts" in w for w in prepare(config).warnings)


def test_prompt_shift_under_the_protocol_needs_a_prompt_set_per_held_out_domain(tmp_path):
    from vlaug.evaluate import prepare

    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=10, d=8, n_classes=3, domains=DOMAINS,
                                  prompt_sets=("sketch",))
    config = ProbeRunConfig(features=str(feats), out=str(tmp_path / "r"), methods=("prompt-shift",), seeds=1,
                            device="cpu", progress=False, protocol="leave-one-domain-out", selection="training-domain")
    with pytest.raises(UsageError, match="held-out domain.s. clipart, painting, photo .*--prompt-set"):
        prepare(config)


def test_a_lads_head_set_targets_each_heads_held_out_domains_and_probes_under_the_protocol(four_domains_with_prompts,
                                                                                         tmp_path):
    from vlaug.checkpoint import read_head_config
    from vlaug.train import HEAD_SET_NAME

    out = tmp_path / "lads"
    result = runner.invoke(app, ["train-box", str(four_domains_with_prompts), "--out", str(out), "--head", "lads",
                                 "--protocol", "leave-one-domain-out", "--seeds", "1", "--selection", "all",
                                 "--epochs", "2", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / HEAD_SET_NAME).read_text())
    assert len(index["heads"]) == 4 + 6
    for h in index["heads"]:
        config = read_head_config(out / h["path"])["head"]
        assert (config["source"], sorted(config["targets"])) == ("classes", sorted(h["held_out"]))
    report_dir = tmp_path / "r"
    result = runner.invoke(app, ["probe", str(four_domains_with_prompts), "--out", str(report_dir), "-m", f"lads:{out}",
                                 "--protocol", "leave-one-domain-out", "--selection", "all", "--seeds", "1",
                                 "--grid-size", "3", "--max-iter", "40", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert len(report["results"]) == 4 * 3


def test_a_lads_head_set_refuses_fixed_targets_and_missing_prompt_sets(four_domains, four_domains_with_prompts, tmp_path):
    base = ["--head", "lads", "--protocol", "leave-one-domain-out", "--seeds", "1", "--epochs", "1", "--device", "cpu",
            "--no-progress"]
    result = runner.invoke(app, ["train-box", str(four_domains_with_prompts), "--out", str(tmp_path / "a"), *base,
                                 "--target-prompts", "sketch"])
    assert result.exit_code == 2 and "drop --target-prompts" in result.output
    result = runner.invoke(app, ["train-box", str(four_domains), "--out", str(tmp_path / "b"), *base])
    assert result.exit_code == 2 and "no prompt set 'clipart'" in result.output and "vlaug prompts" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_coded_columns_concatenate_over_the_union_of_their_values():
    from vlaug.runs import Coded

    a = Coded.of([("linear", 2), ("box", 1)])
    b = Coded.of([("gda", 1), ("linear", 2)])
    both = Coded.concat([a, b, Coded.of([])])
    assert both.decoded().tolist() == ["linear", "linear", "box", "gda", "linear", "linear"]
    assert both.codes.dtype == np.int32 and len(both.values) == 3


def test_prompt_shift_picks_a_fits_targets_from_its_own_rows_on_a_sampled_search(four_domains_with_prompts, tmp_path):
    """A search on a seeded sample fits on ``data.subset(...)``, whose row i is a row of the
    cache elsewhere: the fit's domains (and so its targets) must be read at the cache's rows."""
    from vlaug.evaluate import prepare

    config = ProbeRunConfig(features=str(four_domains_with_prompts), out=str(tmp_path / "r"), methods=("prompt-shift",),
                            seeds=1, device="cpu", progress=False, protocol="leave-one-domain-out",
                            selection="training-domain")
    plan = prepare(config)
    shift, data = plan.methods[0], plan.data
    for t in plan.tasks:
        rows = np.asarray(t.splits.train)
        order = rows[::-1].copy()
        sub = data.subset(order)  # local row i is cache row order[i]
        assert np.array_equal(sub.cache_rows(np.arange(len(rows))), order)
        local = np.arange(len(rows))
        x, y = sub.x[local].float(), sub.y[local]
        shifted = shift.augmenter(sub, local)(sub, x, y, None, torch.Generator().manual_seed(0))
        expected = shift.augmenter(data, order)(data, x, y, None, torch.Generator().manual_seed(0))
        assert torch.equal(shifted[0], expected[0])
