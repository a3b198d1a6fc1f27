"""Stage-3 methods as objects: the registry, typed options and their checks, and a new
method joining every stage by being one registered class."""

import json
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from tests.conftest import write_synthetic_cache
from vlaug.cli import app
from vlaug.errors import UsageError
from vlaug.methods import REGISTRY, parse_method, register
from vlaug.methods.augmenting import Box, Gaussian
from vlaug.methods.base import EnsembleOptions
from vlaug.methods.linear import ProbeMethod

runner = CliRunner()


def test_registry_lists_every_method_once_in_order():
    # the papers' methods, zero-shot and the linear probe first (a new method adds itself: no list to edit here)
    assert list(REGISTRY)[:2] == ["zero-shot", "linear"]
    assert {"linear-zs", "box", "dr", "lads", "gaussian", "mixup", "xdomain-mix", "linear-adamw", "batchformer",
            "latentdr-sa", "latentdr-pool"} <= set(REGISTRY)
    assert {n for n, c in REGISTRY.items() if not c.streams} >= {"mixup", "xdomain-mix", "linear-adamw", "batchformer",
                                                                  "latentdr-sa", "latentdr-pool"}
    assert {n: REGISTRY[n].head_kinds for n in ("box", "dr", "lads")} == {
        "box": ("box",), "dr": ("dr-sa", "dr-pool"), "lads": ("lads",)}
    with pytest.raises(ValueError, match="registered twice"):
        register(type("Other", (ProbeMethod,), {"name": "linear"}))


def test_parse_method_fills_typed_defaults():
    box = parse_method("box:runs/b?n_aug=40&ensemble=0.7")
    assert isinstance(box, Box) and (box.name, box.head, box.text) == ("box", "runs/b", "box:runs/b?n_aug=40&ensemble=0.7")
    assert box.options.to_dict() == {"ensemble": 0.7, "n_aug": 40, "anchor": 0.0} and box.extra_rows() == 40
    g = parse_method("gaussian")
    assert isinstance(g, Gaussian) and g.options.to_dict() == {"ensemble": 0.0, "n_aug": 1, "sigma": 0.1}
    joint = parse_method("latentdr-sa?batch_size=64&lr=0.01")
    assert (joint.options.batch_size, joint.options.lr, joint.options.max_steps) == (64, "0.01", 10_000)
    assert parse_method("zero-shot").options.to_dict() == {}


@pytest.mark.parametrize("text, match", [
    ("box:x?n_aug=many", "n_aug='many' must be an integer"),
    ("gaussian?sigma=-1", "sigma == -1.0, must be > 0"),
    ("gaussian?n_aug=0", "n_aug == 0, must be >= 1"),
    ("mixup?alpha=0", "alpha == 0.0, must be > 0"),
    ("linear-zs?wise=1.5", "wise == 1.5, must be in"),
    ("batchformer?lr=0", "lr == 0.0 must be > 0"),
    ("zero-shot?ensemble=0.5", "unknown option 'ensemble'"),
    ("linear:runs/x", "takes no head folder"),
    ("dr", "needs a head folder"),
])
def test_bad_options_are_refused_with_the_value(text, match):
    with pytest.raises(UsageError, match=match):
        parse_method(text)


@dataclass(frozen=True)
class _ShiftOptions(EnsembleOptions):
    shift: float = 0.05  # moves every row along the first axis


class _Shifted(ProbeMethod):
    """A new method for this test: one class, nothing else."""

    name = "test-shifted"
    Options = _ShiftOptions

    def extra_rows(self):
        return 1

    def augment(self, data, x, y, dom, generator):
        import torch.nn.functional as F

        moved = x.clone()
        moved[:, 0] += self.options.shift
        return moved, F.one_hot(y, data.n_classes).float()


def test_a_new_method_is_one_registered_class(tmp_path):
    feats = write_synthetic_cache(tmp_path / "feat", n_per_class=20, d=16, n_classes=3)
    register(_Shifted)
    try:
        r = runner.invoke(app, ["probe", str(feats), "--out", str(tmp_path / "rep"), "--seeds", "1", "--grid-size", "2",
                                "--max-iter", "20", "--device", "cpu", "--no-progress", "-m", "linear",
                                "-m", "test-shifted?shift=0.1", "--train-domain", "photo"])
    finally:
        del REGISTRY["test-shifted"]
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    shifted = report["methods"][1]
    assert shifted["options"] == {"ensemble": 0.0, "shift": 0.1}
    n_linear, n_shifted = (row["selection"]["n_train_rows"] for row in report["results"])
    assert n_shifted == 2 * n_linear  # the originals and one moved copy each
    assert (tmp_path / "rep" / "probes" / "test-shifted_shift_0.1" / "model.safetensors").is_file()
