"""Sources at web scale (issue 31): WebDataset tar shards and Parquet files with the image
bytes, written here, read as the same images are read from files."""

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.conftest import make_class_folder, tiny_config
from vlaug import cache
from vlaug.cli import app
from vlaug.embed import embed_source
from vlaug.sources import load_source

ROOT = Path(__file__).parent.parent
CLASSES = ("ant", "bee", "cat")


def _images(src: Path) -> list[tuple[str, str, bytes]]:
    """(class, key, bytes) of every image of a class folder, in a fixed order."""
    return [(p.parent.name, f"{p.parent.name}_{p.stem}", p.read_bytes()) for p in sorted(src.glob("*/*.png"))]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, images, n_shards: int = 2, cls: str = "index", domains=None, corrupt: str = "") -> list[Path]:
    """img2dataset-like shards: KEY.png, KEY.cls (a class index, or its name with cls="name"),
    KEY.json ({"domain": ...}) and KEY.txt (a caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, (c, key, data) in enumerate(images[s::n_shards]):
                _add(tar, f"{key}.png", b"\x89PNG broken" if key == corrupt else data)
                if cls:
                    _add(tar, f"{key}.cls", (str(CLASSES.index(c)) if cls == "index" else c).encode())
                _add(tar, f"{key}.json", json.dumps({"domain": (domains or ["photo"])[i % len(domains or ["photo"])]}).encode())
                _add(tar, f"{key}.txt", f"a photo of a {c}".encode())
        paths.append(path)
    return paths


@pytest.fixture()
def images(tmp_path):
    src = make_class_folder(tmp_path / "files", classes=CLASSES, n=5)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return src, _images(src)


def test_shards_give_the_rows_and_embeddings_of_the_files(images, tmp_path):
    src, imgs = images
    write_shards(tmp_path / "shards", imgs)
    embed_source(tiny_config(src, tmp_path / "from-files"))
    embed_source(tiny_config(tmp_path / "shards", tmp_path / "from-shards", classes_file=str(tmp_path / "classes.txt")))
    files, shards = cache.read_cache(tmp_path / "from-files"), cache.read_cache(tmp_path / "from-shards")
    by_key = {i.split("/", 1)[1]: (l, e) for i, l, e in zip(shards.ids, shards.labels, shards.embeddings)}
    assert len(by_key) == len(files.ids) == 15 and all(i.startswith(("00000.tar/", "00001.tar/")) for i in shards.ids)
    for i, label, emb in zip(files.ids, files.labels, files.embeddings):
        c, name = i.split("/")
        got_label, got = by_key[f"{c}_{Path(name).stem}"]
        assert got_label == label
        np.testing.assert_allclose(got, emb, rtol=0, atol=1e-6)
    assert shards.manifest.layout == "webdataset" and shards.manifest.classes == list(CLASSES)
    captions = cache.read_columns(tmp_path / "from-shards", ["caption"])["caption"]
    assert sorted(set(captions.tolist())) == [f"a photo of a {c}" for c in CLASSES]


def test_brace_pattern_glob_and_folder_read_alike(images, tmp_path):
    _, imgs = images
    write_shards(tmp_path / "shards", imgs, cls="name")
    reads = [load_source(s) for s in (str(tmp_path / "shards"), str(tmp_path / "shards" / "{00000..00001}.tar"),
                                      str(tmp_path / "shards" / "*.tar"))]
    assert all(r.layout == "webdataset" for r in reads)
    assert reads[0].records == reads[1].records == reads[2].records and len(reads[0].records) == 15
    assert reads[0].classes == sorted(CLASSES)  # class names as text: their sorted order
    one = load_source(str(tmp_path / "shards" / "00001.tar"))
    assert len(one.records) == 7 and one.records[0].id.startswith("00001.tar/")
    with_domains = load_source(str(tmp_path / "shards"), domain_key="json:domain")
    assert with_domains.domains == ["photo"]


def test_parquet_image_bytes_with_classlabel_names(images, tmp_path):
    src, imgs = images
    names = ["cat", "ant", "bee"]  # the dataset's own order, not sorted
    table = pa.table({"image": [{"bytes": d, "path": f"{k}.png"} for _, k, d in imgs],
                      "label": [names.index(c) for c, _, _ in imgs]})
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}
    table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    (tmp_path / "hf").mkdir()
    pq.write_table(table.slice(0, 8), tmp_path / "hf" / "train-00000.parquet", row_group_size=3)
    pq.write_table(table.slice(8), tmp_path / "hf" / "train-00001.parquet", row_group_size=3)
    embed_source(tiny_config(src, tmp_path / "from-files"))
    embed_source(tiny_config(tmp_path / "hf", tmp_path / "from-hf"))
    files, hf = cache.read_cache(tmp_path / "from-files"), cache.read_cache(tmp_path / "from-hf")
    assert hf.manifest.classes == names and hf.manifest.layout == "parquet-images"
    assert hf.ids[:2] == ["train-00000.parquet/0", "train-00000.parquet/1"]
    order = sorted(range(len(files.ids)), key=lambda i: files.ids[i])  # the files' order is the class folders' sorted order
    np.testing.assert_allclose(hf.embeddings, files.embeddings[order], rtol=0, atol=1e-6)
    assert [names[x] for x in hf.labels] == [c for c, _, _ in imgs]
    # img2dataset's parquet output: a binary jpg column with key and caption, no labels (for vlaug predict)
    pq.write_table(pa.table({"key": [k for _, k, _ in imgs], "jpg": [d for _, _, d in imgs],
                             "caption": ["x"] * len(imgs)}), tmp_path / "img2dataset.parquet")
    unlabeled = load_source(str(tmp_path / "img2dataset.parquet"))
    assert not unlabeled.labeled and unlabeled.records[0].id == f"img2dataset.parquet/{imgs[0][1]}"


def test_a_corrupt_member_and_a_truncated_shard_are_recorded(images, tmp_path):
    _, imgs = images
    shards = write_shards(tmp_path / "shards", imgs, corrupt=imgs[2][1])
    with tarfile.open(shards[1]) as tar:
        last = [m for m in tar.getmembers() if m.name.endswith(".png")][-1]
    shards[1].write_bytes(shards[1].read_bytes()[:last.offset_data + last.size // 2])  # cut inside the last image
    r = CliRunner().invoke(app, ["embed", str(tmp_path / "shards"), "--out", str(tmp_path / "out"), "--model", "vlaug-tiny",
                                 "--pretrained", "none", "--workers", "0", "--no-progress", "--classes",
                                 str(tmp_path / "classes.txt")])
    assert r.exit_code == 0, r.output
    failed = {f["id"]: f["error"] for f in cache.read_failed(tmp_path / "out")}
    assert f"00000.tar/{imgs[2][1]}" in failed
    assert f"00001.tar/{Path(last.name).stem}" in failed, failed  # the cut member, recorded
    assert failed["00001.tar/truncated"].startswith("OSError: truncated shard 00001.tar")  # the shard itself, named
    assert cache.read_manifest(tmp_path / "out").n_images == 15 - 2


def test_bad_input_gets_one_line_and_exit_2(images, tmp_path):
    src, imgs = images
    runner = CliRunner()

    def embed(source, *more):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        r = runner.invoke(app, ["embed", str(source), "--out", str(out), "--model", "vlaug-tiny", "--pretrained", "none",
                                "--workers", "0", "--no-progress", *more])
        assert not out.exists() or not cache.is_cache(out)
        return r

    pq.write_table(pa.table({"key": ["a"], "caption": ["x"], "other": [b"x"]}), tmp_path / "noimage.parquet")
    r = embed(tmp_path / "noimage.parquet", "--layout", "parquet-images")
    assert r.exit_code == 2 and "no column of image bytes" in r.output
    shards = write_shards(tmp_path / "shards", imgs)
    with tarfile.open(shards[0], "a") as tar:  # one more sample without a cls member
        _add(tar, "extra.png", imgs[0][2])
    r = embed(tmp_path / "shards")
    assert r.exit_code == 2 and "no cls member" in r.output
    r = embed(tmp_path / "shards", "--class-key", "json:label")
    assert r.exit_code == 2 and "lacks --class-key" in r.output
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        write_shards(tmp_path / d, imgs[:4], n_shards=1)
    r = embed(f"{tmp_path}/{{a,b}}/00000.tar", "--classes", str(tmp_path / "classes.txt"))
    assert r.exit_code == 2 and "duplicate ids" in r.output
    r = embed(f"{tmp_path}/shards/{{00000..00009}}.tar")
    assert r.exit_code == 2 and "does not exist" in r.output


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_rows_of_one_run(tmp_path):
    src = make_class_folder(tmp_path / "files", classes=CLASSES, n=30)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    write_shards(tmp_path / "shards", _images(src), n_shards=3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vlaug", "embed", str(tmp_path / "shards"), "--out", str(out), "--model", "vlaug-tiny",
           "--pretrained", "none", "--workers", "0", "--batch-size", "4", "--part-size", "8", "--dtype", "float32", "--no-progress",
           "--classes", str(tmp_path / "classes.txt")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "images").glob("part-*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    parts = len(list((out / "images").glob("part-*.parquet")))
    assert 2 <= parts < 12  # 90 rows in parts of 8: some committed, some not
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    embed_source(tiny_config(tmp_path / "shards", tmp_path / "once", classes_file=str(tmp_path / "classes.txt")))
    a, b = cache.read_cache(out), cache.read_cache(tmp_path / "once")
    assert len(a.ids) == len(set(a.ids)) == 90 and sorted(a.ids) == sorted(b.ids)
    order_a, order_b = np.argsort(a.ids), np.argsort(b.ids)
    np.testing.assert_allclose(a.embeddings[order_a], b.embeddings[order_b], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_torchrun_splits_shards_into_the_rows_of_one_process(tmp_path):
    from tests.test_distributed import _rows, _torchrun

    src = make_class_folder(tmp_path / "files", classes=CLASSES, n=7)
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    write_shards(tmp_path / "shards", _images(src), n_shards=3, cls="name")
    import os

    r = subprocess.run(_torchrun(tmp_path / "shards", tmp_path / "dist"), capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    embed_source(tiny_config(tmp_path / "shards", tmp_path / "single", part_size=8))
    ids, emb, labels = _rows(tmp_path / "dist")
    ref_ids, ref_emb, ref_labels = _rows(tmp_path / "single")
    assert ids == ref_ids and len(ids) == 21
    # whole shards per rank: rank 0 embedded shards 0 and 2, rank 1 shard 1
    by_rank = {}
    for part in cache.read_manifest(tmp_path / "dist").parts:
        ids_in = pq.read_table(tmp_path / "dist" / "images" / part, columns=["id"]).column("id").to_pylist()
        by_rank.setdefault(part.split("-")[1], set()).update(i.split("/")[0] for i in ids_in)
    assert by_rank == {"r0": {"00000.tar", "00002.tar"}, "r1": {"00001.tar"}}
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(emb, ref_emb, rtol=0, atol=1e-6)


def test_file_urls_read_like_local_paths(images, tmp_path):
    """Remote shards go through fsspec: file:// URLs stand in for s3:// or https:// here."""
    src, imgs = images
    write_shards(tmp_path / "shards", imgs, cls="name")
    pq.write_table(pa.table({"key": [k for _, k, _ in imgs], "jpg": [d for _, _, d in imgs],
                             "class": [c for c, _, _ in imgs]}), tmp_path / "pq.parquet", row_group_size=4)
    for local, url in ((tmp_path / "shards", f"file://{tmp_path}/shards/{{00000..00001}}.tar"),
                       (tmp_path / "shards", f"file://{tmp_path}/shards/*.tar"),
                       (tmp_path / "shards", f"file://{tmp_path}/shards"),
                       (tmp_path / "pq.parquet", f"file://{tmp_path}/pq.parquet")):
        a, b = load_source(str(local)), load_source(url)
        assert [r.id for r in a.records] == [r.id for r in b.records] and a.classes == b.classes and b.root == url
    embed_source(tiny_config(tmp_path / "shards", tmp_path / "local"))
    embed_source(tiny_config(f"file://{tmp_path}/shards/{{00000..00001}}.tar", tmp_path / "remote"))
    a, b = cache.read_cache(tmp_path / "local"), cache.read_cache(tmp_path / "remote")
    assert a.ids == b.ids
    np.testing.assert_allclose(a.embeddings, b.embeddings, rtol=0, atol=1e-6)
    r = CliRunner().invoke(app, ["embed", f"file://{tmp_path}/files", "--out", str(tmp_path / "x"), "--model",
                                 "vlaug-tiny", "--pretrained", "none", "--no-progress"])
    assert r.exit_code == 2 and "a URL source must be" in r.output
