"""Head checkpoints: round trips, configs that rebuild the head, refusals that name the field,
no pickle, and heads that refuse another cache."""

import json
import pickle

import numpy as np
import pytest
import torch

from tests.conftest import write_synthetic_cache
from tests.test_train import _config
from vlaug import cache
from vlaug.checkpoint import HEAD_KINDS, build_head, check_head_matches_cache, load_head
from vlaug.errors import CacheMismatchError, CheckpointError
from vlaug.protocols import id_fractions, training_rows
from vlaug.train import train_head


def _n_fit_rows(features, domain, test_fraction=0.2):
    """Rows of ``domain`` outside the held-out test split and the probe's validation rows."""
    feats = cache.read_cache(features)
    fractions = id_fractions(feats.ids)
    return len(training_rows(feats.domains, feats.splits, feats.labels, [domain], fractions, test_fraction, 0.2))


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "feat")


def test_box_checkpoint_round_trip_and_config(features, tmp_path):
    result = train_head(_config(features, tmp_path / "box", train_domains=("photo",), alpha=0.7))
    ckpt = load_head(tmp_path / "box")
    assert ckpt.kind == "box" and not ckpt.module.training
    x = torch.tensor(cache.read_cache(features).embeddings[:5])
    lo1, hi1 = ckpt.module(x)
    lo2, hi2 = load_head(tmp_path / "box").module(x)
    assert torch.equal(lo1, lo2) and torch.equal(hi1, hi2)
    config = json.loads((tmp_path / "box" / "config.json").read_text())
    assert config["head"] == {"embed_dim": 32, "hidden": 64, "residual": True, "init_width": 0.5, "alpha": 0.7,
                              "temperature": 0.1}
    assert config["cache"]["model"] == "synthetic" and config["cache"]["classes"] == [f"class{i}" for i in range(4)]
    t = config["training"]
    assert t["train_domains"] == ["photo"] and t["epochs"] == 8 and t["batch_size"] == 512 and t["n_train"] + t["n_val"] == _n_fit_rows(features, "photo")
    assert len(config["history"]) == 8
    val = [row["val_loss"] for row in config["history"]]
    assert config["selected_epoch"] == int(np.argmin(val)) + 1 == result.selected_epoch
    stats = json.loads((tmp_path / "box" / "stats.json").read_text())
    assert sorted(r["rank"] for r in stats["per_class"]) == [1, 2, 3, 4]
    volumes = [r["mean_log_volume"] for r in stats["per_class"]]
    assert volumes == sorted(volumes, reverse=True)
    assert len(stats["per_dimension"]) == 32 and len(stats["per_dimension"][0]["classes"]) == 3
    assert set(stats["zero_shot_accuracy"]) == {"points", "lo", "hi", "center", "samples"}


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
    with pytest.raises(CacheMismatchError, match=r"classes: head has 4, cache has 5; only in the head: \[\], only in the cache: \[.class4.\]"):
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




def test_every_kind_rebuilds_from_its_config_alone():
    for kind, (config_cls, module_cls) in HEAD_KINDS.items():
        options = {"embed_dim": 16}
        if kind == "lads":
            options.update(targets=["sketch"], source="photo")
        if kind == "probe":
            options["n_classes"] = 3
        module = build_head(kind, options)
        assert isinstance(module, module_cls) and isinstance(module.config, config_cls)
        assert build_head(kind, module.config.to_dict()).config == module.config
    with pytest.raises(CheckpointError, match="bind the config to a cache"):
        build_head("box", {"embed_dim": 0})
