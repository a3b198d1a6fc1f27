import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_class_folder, make_domain_folder, write_image
from vlaug.errors import SourceError
from vlaug.sources import load_source, read_class_file


def test_class_layout_is_detected_and_sorted(tmp_path):
    root = make_class_folder(tmp_path / "src", classes=("zebra", "ant", "moth"), n=2)
    (root / "ant" / "notes.txt").write_text("not an image")
    src = load_source(root)
    assert src.layout == "class"
    assert src.classes == ["ant", "moth", "zebra"]
    assert [r.id for r in src.records][:3] == ["ant/000.png", "ant/001.png", "moth/000.png"]
    assert [r.label for r in src.records] == [0, 0, 1, 1, 2, 2]
    assert all(r.domain == "" and r.split is None for r in src.records)
    assert src.n_ignored_files == 1


def test_domain_class_layout_is_detected(tmp_path):
    root = make_domain_folder(tmp_path / "src", domains=("sketch", "photo"), classes=("dog", "cat"), n=2)
    src = load_source(root)
    assert src.layout == "domain-class"
    assert src.classes == ["cat", "dog"]
    assert src.domains == ["photo", "sketch"]
    assert src.records[0].id == "photo/cat/0.jpg"
    assert {(r.domain, r.class_name) for r in src.records} == {(d, c) for d in ("photo", "sketch") for c in ("cat", "dog")}
    # a class missing from one domain still gets the label of the global class list
    assert all(src.classes[r.label] == r.class_name for r in src.records)


def test_forced_layout(tmp_path):
    root = make_domain_folder(tmp_path / "src", n=1)
    src = load_source(root, layout="class")  # domains treated as classes, images found recursively
    assert src.classes == ["photo", "sketch"]
    assert len(src.records) == 4


def test_mixed_layout_asks_for_layout(tmp_path):
    write_image(tmp_path / "src" / "a" / "1.png", 0)
    write_image(tmp_path / "src" / "b" / "c" / "1.png", 1)
    with pytest.raises(SourceError, match="--layout"):
        load_source(tmp_path / "src")


def test_classes_file_sets_order_and_rejects_unknown(tmp_path):
    root = make_class_folder(tmp_path / "src", classes=("a", "b"), n=1)
    f = tmp_path / "classes.txt"
    f.write_text("# order\nb\nc\na\n")
    src = load_source(root, classes=read_class_file(f))
    assert src.classes == ["b", "c", "a"]
    assert [(r.class_name, r.label) for r in src.records] == [("a", 2), ("b", 0)]
    with pytest.raises(SourceError, match=r"\['a'\].*--classes"):
        load_source(root, classes=["b"])


@pytest.mark.parametrize("kind", ["missing", "empty", "no-images"])
def test_bad_folders(tmp_path, kind):
    root = tmp_path / "src"
    if kind != "missing":
        root.mkdir()
    if kind == "no-images":
        (root / "a").mkdir()
        (root / "a" / "x.txt").write_text("hi")
    with pytest.raises(SourceError):
        load_source(root)


def test_csv_manifest(tmp_path):
    write_image(tmp_path / "imgs" / "1.png", 1)
    write_image(tmp_path / "imgs" / "2.png", 2)
    absolute = write_image(tmp_path / "elsewhere" / "3.png", 3)
    m = tmp_path / "manifest.csv"
    m.write_text(
        "path,class,domain,split,id\n"
        "imgs/1.png,dog,photo,train,007\n"
        f"{absolute},cat,sketch,TEST,008\n"
        "\n"
        "imgs/2.png,dog,sketch,,009\n"
    )
    src = load_source(m)
    assert src.layout == "manifest"
    assert src.classes == ["dog", "cat"]  # order of first appearance
    assert [r.id for r in src.records] == ["007", "008", "009"]  # CSV cells stay strings
    assert src.records[0].path == str(tmp_path / "imgs" / "1.png")
    assert src.records[1].path == str(absolute)
    assert [r.split for r in src.records] == ["train", "test", None]
    assert src.domains == ["photo", "sketch"]


def test_parquet_manifest_with_integer_labels(tmp_path):
    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "label": [1, 0]}), m)
    src = load_source(m, classes=["zero", "one"])
    assert [(r.label, r.class_name, r.id) for r in src.records] == [(1, "one", "a.png"), (0, "zero", "b.png")]
    src = load_source(m)
    assert src.classes == ["0", "1"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("file,class\na.png,x\n", "needs 'path'"),
        ("path,class\n", "no rows"),
        ("path,class\na.png,x\na.png,y\n", "duplicate ids"),
        ("path,class\n,x\n", "empty 'path'"),
        ("path,class,split\na.png,x,training\n", "split values"),
        ("path,label\na.png,dog\n", "integer class index"),
    ],
)
def test_bad_manifests(tmp_path, text, match):
    m = tmp_path / "m.csv"
    m.write_text(text)
    with pytest.raises(SourceError, match=match):
        load_source(m)


def test_manifest_labels_outside_classes_file(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("path,label\na.png,5\n")
    with pytest.raises(SourceError, match="outside 0..1"):
        load_source(m, classes=["a", "b"])


def test_flat_folder_and_path_only_manifest_are_unlabeled(tmp_path):
    for k in range(3):
        write_image(tmp_path / "flat" / f"{k}.png", k)
    src = load_source(tmp_path / "flat")
    assert src.layout == "flat" and src.detected and not src.labeled and src.classes == []
    assert [(r.id, r.label, r.class_name, r.split) for r in src.records][0] == ("0.png", None, None, None)
    assert "no labels" in src.describe() and "layout flat (detected)" in src.describe()
    m = tmp_path / "m.csv"
    m.write_text("path,domain\nflat/0.png,x\nflat/1.png,y\n")
    src = load_source(m)
    assert src.layout == "manifest" and src.classes == [] and [r.label for r in src.records] == [None, None]
    assert src.domains == ["x", "y"]
    with pytest.raises(SourceError, match="--classes has nothing to order"):
        load_source(m, classes=["a"])


def test_describe_names_layout_classes_and_domains(tmp_path):
    root = make_domain_folder(tmp_path / "src", domains=("photo", "sketch"), classes=("cat", "dog"), n=1)
    line = load_source(root).describe()
    assert "layout domain-class (detected)" in line
    assert "4 images, 2 classes (cat, dog), 2 domains (photo, sketch)" in line
    assert "layout class (given)" in load_source(root / "photo", "class").describe()
