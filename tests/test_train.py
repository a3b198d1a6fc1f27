"""Stage 2 end to end: train_head on a synthetic cache, checkpoints, mismatches, the CLI."""

import json

import numpy as np

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.conftest import write_synthetic_cache
from vlaug.checkpoint import load_head
from vlaug import cache
from vlaug.cli import app
from vlaug.errors import UsageError
from vlaug.heads import HEADS, make_head_config
from vlaug.protocols import id_fractions, validation_mask
from vlaug.train import TrainConfig, head_config, train_head

runner = CliRunner()


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "feat")


def _config(features, out, head="box", **kw):
    """A quiet CPU TrainConfig; keyword arguments that are fields of the head's config go there."""
    fields = HEADS[head][0].__dataclass_fields__
    options = {k: kw.pop(k) for k in list(kw) if k in fields}
    base = dict(features=str(features), out=str(out), epochs=8, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(head=make_head_config(head, **options), **base)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("head", ["box", "dr-sa", "dr-pool", "lads"])
def test_same_seed_same_weights_other_seed_other_weights(features, tmp_path, head):
    kw = dict(head=head, **({"source": "photo", "targets": ("sketch",)} if head == "lads" else {}))
    train_head(_config(features, tmp_path / "a", seed=1, **kw))
    train_head(_config(features, tmp_path / "b", seed=1, **kw))
    train_head(_config(features, tmp_path / "c", seed=2, **kw))
    a, b, c = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_validation_rows_come_only_from_training_domains_and_are_stratified(features, tmp_path):
    train_head(_config(features, tmp_path / "h", train_domains=("sketch",), val_fraction=0.2))
    t = json.loads((tmp_path / "h" / "config.json").read_text())["training"]
    feats = cache.read_cache(features)
    fractions = id_fractions(feats.ids)
    pool = np.flatnonzero((feats.domains == "sketch") & (fractions >= 0.2))  # outside the held-out test rows
    fit_rows = pool[~validation_mask(pool, feats.labels, fractions, feats.splits, 0.2, 0.2)]  # and the probe's val rows
    per_class = np.bincount(feats.labels[fit_rows])
    assert t["n_val"] == sum(round(0.2 * n) for n in per_class) and t["n_train"] + t["n_val"] == len(fit_rows)
    assert t["test_fraction"] == 0.2 and t["probe_val_fraction"] == 0.2 and t["uses_cache_splits"] is False


def test_lads_missing_prompt_set_lists_the_sets(features, tmp_path):
    with pytest.raises(UsageError, match=r"'clipart'.*\['classes', 'photo', 'sketch'\]"):
        train_head(_config(features, tmp_path / "l", head="lads", source="photo", targets=("clipart",)))
    with pytest.raises(UsageError, match="--source-prompts"):
        head_config("lads", {})
    with pytest.raises(UsageError, match="--norm applies to dr-sa and dr-pool heads, not box"):
        head_config("box", {"norm": "pre"})
    with pytest.raises(UsageError, match="--head box: alpha == 1.5, must be in"):
        head_config("box", {"alpha": 1.5})
    assert not (tmp_path / "l").exists()


def test_bad_options_write_nothing(features, tmp_path):
    with pytest.raises(UsageError, match="'clipart' is not in the cache"):
        train_head(_config(features, tmp_path / "x", train_domains=("clipart",)))
    with pytest.raises(UsageError, match="--val-fraction 1.0"):
        _config(features, tmp_path / "x", val_fraction=1.0)
    assert not (tmp_path / "x").exists()
    train_head(_config(features, tmp_path / "x"))
    with pytest.raises(UsageError, match="already exists"):
        train_head(_config(features, tmp_path / "x"))
    train_head(_config(features, tmp_path / "x", overwrite=True, head="dr-sa"))
    assert load_head(tmp_path / "x").kind == "dr-sa"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temporary folders left


def test_cli_trains_every_head_and_info_describes_it(features, tmp_path):
    feats = cache.read_cache(features)
    fractions = id_fractions(feats.ids)
    pool = np.flatnonzero(fractions >= 0.2)  # every domain, outside the held-out test rows ...
    fit_rows = pool[~validation_mask(pool, feats.labels, fractions, feats.splits, 0.2, 0.2)]  # ... and the probe's val rows
    n_fit, n_val = len(fit_rows), sum(round(0.2 * n) for n in np.bincount(feats.labels[fit_rows]))
    for head, extra in [("box", []), ("dr-sa", ["--norm", "pre"]), ("dr-pool", ["--dr-mode", "d"]),
                        ("lads", ["--source-prompts", "photo", "--target-prompts", "sketch"])]:
        out = tmp_path / head
        r = runner.invoke(app, ["train-box", str(features), "--out", str(out), "--head", head, "--epochs", "3",
                                "--device", "cpu", "--no-progress", *extra])
        assert r.exit_code == 0, r.output
        assert f"trained {head} on {n_fit - n_val} rows ({n_val} validation) for 3 epochs" in r.stdout
        r = runner.invoke(app, ["info", str(out)])
        assert r.exit_code == 0, r.output
        assert f"kind         {head}" in r.stdout and "selected     epoch" in r.stdout
    assert "norm=pre" in runner.invoke(app, ["info", str(tmp_path / "dr-sa")]).stdout
    info = runner.invoke(app, ["info", str(tmp_path / "box")]).stdout
    assert "rank  class" in info and "zero-shot    points" in info
    r = runner.invoke(app, ["train-box", str(features), "--out", str(tmp_path / "box")])
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = runner.invoke(app, ["train-box", str(tmp_path / "nothing"), "--out", str(tmp_path / "n")])
    assert r.exit_code == 1 and "not a vlaug feature cache" in r.stderr


@pytest.mark.parametrize("head", ["box", "dr-sa"])
def test_streaming_with_a_buffer_that_holds_everything_equals_the_in_memory_path(features, tmp_path, head):
    train_head(_config(features, tmp_path / "mem", head=head))
    train_head(_config(features, tmp_path / "disk", head=head, memory_budget="1K"))  # far below the cache's size
    mem, disk = _weights(tmp_path / "mem"), _weights(tmp_path / "disk")
    assert all(torch.equal(mem[k], disk[k]) for k in mem)
    t = json.loads((tmp_path / "disk" / "config.json").read_text())["training"]
    assert t["streamed"] is True and t["memory_budget_bytes"] == 1024
    assert json.loads((tmp_path / "mem" / "config.json").read_text())["training"]["streamed"] is False
    if head == "box":
        a = json.loads((tmp_path / "mem" / "stats.json").read_text())
        b = json.loads((tmp_path / "disk" / "stats.json").read_text())
        assert [r["class"] for r in a["per_class"]] == [r["class"] for r in b["per_class"]]
        assert a["mean_log_volume"] == pytest.approx(b["mean_log_volume"], rel=1e-6)


def test_memory_budget_parsing(tmp_path):
    from vlaug.cache import parse_memory_budget

    assert parse_memory_budget("1.5G") == int(1.5 * 2**30)
    assert parse_memory_budget("800M") == 800 * 2**20
    assert parse_memory_budget("2000") == 2000
    assert parse_memory_budget("auto") > 0
    with pytest.raises(UsageError, match="--memory-budget"):
        train_head(_config(write_synthetic_cache(tmp_path / "c"), tmp_path / "y", memory_budget="lots"))
    assert not (tmp_path / "y").exists()
