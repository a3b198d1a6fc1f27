"""Stage 2 end to end: train_head on a synthetic cache, checkpoints, mismatches, the CLI."""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.conftest import write_synthetic_cache
from vlaug import cache
from vlaug.checkpoint import check_head_matches_cache, load_head
from vlaug.cli import app
from vlaug.errors import CacheMismatchError, CheckpointError, UsageError
from vlaug.train import TrainConfig, train_head

runner = CliRunner()


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "feat")


def _config(features, out, **kw):
    base = dict(features=str(features), out=str(out), epochs=8, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("head", ["box", "dr-sa", "dr-pool", "lads"])
def test_same_seed_same_weights_other_seed_other_weights(features, tmp_path, head):
    kw = dict(head=head, source_prompts="photo", target_prompts=("sketch",))
    train_head(_config(features, tmp_path / "a", seed=1, **kw))
    train_head(_config(features, tmp_path / "b", seed=1, **kw))
    train_head(_config(features, tmp_path / "c", seed=2, **kw))
    a, b, c = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_box_checkpoint_round_trip_and_config(features, tmp_path):
    result = train_head(_config(features, tmp_path / "box", train_domains=("photo",), alpha=0.7))
    ckpt = load_head(tmp_path / "box")
    assert ckpt.kind == "box" and not ckpt.module.training
    x = torch.tensor(cache.read_cache(features).embeddings[:5])
    lo1, hi1 = ckpt.module(x)
    lo2, hi2 = load_head(tmp_path / "box").module(x)
    assert torch.equal(lo1, lo2) and torch.equal(hi1, hi2)
    config = json.loads((tmp_path / "box" / "config.json").read_text())
    assert config["head"] == {"embed_dim": 32, "hidden": 64, "residual": True, "alpha": 0.7, "temperature": 0.01}
    assert config["cache"]["model"] == "synthetic" and config["cache"]["classes"] == [f"class{i}" for i in range(4)]
    t = config["training"]
    assert t["train_domains"] == ["photo"] and t["epochs"] == 8 and t["batch_size"] == 512 and t["n_train"] + t["n_val"] == 120
    assert len(config["history"]) == 8
    val = [row["val_loss"] for row in config["history"]]
    assert config["selected_epoch"] == int(np.argmin(val)) + 1 == result.selected_epoch
    stats = json.loads((tmp_path / "box" / "stats.json").read_text())
    assert sorted(r["rank"] for r in stats["per_class"]) == [1, 2, 3, 4]
    volumes = [r["mean_log_volume"] for r in stats["per_class"]]
    assert volumes == sorted(volumes, reverse=True)
    assert len(stats["per_dimension"]) == 32 and len(stats["per_dimension"][0]["classes"]) == 3
    assert set(stats["zero_shot_accuracy"]) == {"points", "lo", "hi", "center", "samples"}


def test_validation_rows_come_only_from_training_domains_and_are_stratified(features, tmp_path):
    train_head(_config(features, tmp_path / "h", train_domains=("sketch",), val_fraction=0.2))
    t = json.loads((tmp_path / "h" / "config.json").read_text())["training"]
    assert (t["n_train"], t["n_val"]) == (96, 24)  # 30 rows per class in sketch, 20 % of each held out


def test_lads_missing_prompt_set_lists_the_sets(features, tmp_path):
    with pytest.raises(UsageError, match=r"'clipart'.*\['classes', 'photo', 'sketch'\]"):
        train_head(_config(features, tmp_path / "l", head="lads", source_prompts="photo", target_prompts=("clipart",)))
    with pytest.raises(UsageError, match="--source-prompts"):
        _config(features, tmp_path / "l", head="lads")
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


def test_head_refuses_another_cache(features, tmp_path):
    train_head(_config(features, tmp_path / "h"))
    head_cache = load_head(tmp_path / "h").cache
    other_model = write_synthetic_cache(tmp_path / "m", model="other")
    other_dim = write_synthetic_cache(tmp_path / "d", d=16)
    other_classes = write_synthetic_cache(tmp_path / "c", n_classes=5)
    check_head_matches_cache(head_cache, cache.read_manifest(features))
    with pytest.raises(CacheMismatchError, match="model: head has 'synthetic', cache has 'other'"):
        check_head_matches_cache(head_cache, cache.read_manifest(other_model))
    with pytest.raises(CacheMismatchError, match="embed_dim: head has 32, cache has 16"):
        check_head_matches_cache(head_cache, cache.read_manifest(other_dim))
    with pytest.raises(CacheMismatchError, match="classes: head has 4 .* cache has 5"):
        check_head_matches_cache(head_cache, cache.read_manifest(other_classes))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["head"].update(width=3), r"unknown head field\(s\) \['width'\]"),
        (lambda c: c["head"].update(hidden="64"), "field 'hidden' is '64'"),
        (lambda c: c["head"].update(residual=1), "field 'residual'"),
        (lambda c: c.update(extra=True), r"unknown keys \['extra'\]"),
        (lambda c: c.update(kind="vae"), "unknown head kind 'vae'"),
        (lambda c: c["head"].update(hidden=65), "does not fit its config.json"),
    ],
)
def test_bad_config_json_names_the_field(features, tmp_path, edit, match):
    train_head(_config(features, tmp_path / "h"))
    file = tmp_path / "h" / "config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        load_head(tmp_path / "h")


class _Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_pickle_never_runs(features, tmp_path):
    train_head(_config(features, tmp_path / "h"))
    marker = tmp_path / "pwned"
    payload = _Exploit()
    payload.marker = str(marker)
    (tmp_path / "h" / "model.safetensors").write_bytes(pickle.dumps({"net.0.weight": payload}))
    with pytest.raises(CheckpointError, match="cannot read"):
        load_head(tmp_path / "h")
    assert not marker.exists()


def test_cli_trains_every_head_and_info_describes_it(features, tmp_path):
    for head, extra in [("box", []), ("dr-sa", ["--norm", "pre"]), ("dr-pool", ["--dr-mode", "d"]),
                        ("lads", ["--source-prompts", "photo", "--target-prompts", "sketch"])]:
        out = tmp_path / head
        r = runner.invoke(app, ["train-box", str(features), "--out", str(out), "--head", head, "--epochs", "3",
                                "--device", "cpu", "--no-progress", *extra])
        assert r.exit_code == 0, r.output
        assert f"trained {head} on 192 rows (48 validation) for 3 epochs" in r.stdout
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


def test_streaming_through_a_small_shuffle_buffer(tmp_path):
    from vlaug.train import fit_streamed

    feats = write_synthetic_cache(tmp_path / "big", n_per_class=60, d=16, n_classes=3)
    labels = cache.read_cache(feats).labels
    chunks = lambda: cache.iter_embeddings(feats, batch_rows=25)  # noqa: E731
    rows = np.arange(len(labels))
    seen = []

    def loss_fn(m, x, y):
        if m.training:
            seen.append(len(x))
        return torch.nn.functional.cross_entropy(m(x), y), {}

    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        module = torch.nn.Linear(16, 3)
        seen.clear()
        fit_streamed(module, loss_fn, chunks, labels, rows[::2], rows[1::2], epochs=2, batch_size=8, buffer_rows=32,
                     generator=torch.Generator().manual_seed(0))
        weights.append(module.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])  # same seed, same result
    assert sum(seen) == 2 * 180 and max(seen) == 8  # every training row in each of the 2 epochs, batches of 8


def test_memory_budget_parsing():
    from vlaug.cache import parse_memory_budget

    assert parse_memory_budget("1.5G") == int(1.5 * 2**30)
    assert parse_memory_budget("800M") == 800 * 2**20
    assert parse_memory_budget("2000") == 2000
    assert parse_memory_budget("auto") > 0
    with pytest.raises(UsageError, match="--memory-budget"):
        _config("x", "y", memory_budget="lots")
