import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from vlaug import cache
from vlaug.cache.stream import prefetch
from vlaug.errors import CacheError


def _rows(ids, label=0):
    n = len(ids)
    return {"id": ids, "path": [f"/x/{i}" for i in ids], "label": [label] * n, "class_name": ["a"] * n,
            "domain": ["photo"] * n, "split": [""] * n}


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _make_cache(path, dtype="float32", d=8, seed=0):
    rng = np.random.default_rng(seed)
    m = cache.CacheManifest(model="m", pretrained="none", embed_dim=d, dtype=dtype, classes=["a", "b"], templates=["{}"])
    e1, e2 = _unit(rng, 3, d), _unit(rng, 2, d)
    cache.write_part(path, "part-00000.parquet", _rows(["i0", "i1", "i2"]), e1, dtype)
    cache.write_part(path, "part-00001.parquet", _rows(["i3", "i4"], label=1), e2, dtype)
    texts = {"classes": _unit(rng, 2, d), "painting": _unit(rng, 2, d)}
    cache.write_texts(path, texts, m.classes)
    m.parts = ["part-00000.parquet", "part-00001.parquet"]
    m.n_images = 5
    cache.write_manifest(path, m)
    return m, np.concatenate([e1, e2]), texts


@pytest.mark.parametrize("dtype, atol", [("float32", 0), ("float16", 1e-3)])
def test_round_trip(tmp_path, dtype, atol):
    m, emb, texts = _make_cache(tmp_path, dtype)
    c = cache.read_cache(tmp_path)
    assert c.ids == ["i0", "i1", "i2", "i3", "i4"]
    assert c.labels.tolist() == [0, 0, 0, 1, 1]
    assert c.embeddings.dtype == np.float32 and c.embeddings.shape == (5, 8)
    np.testing.assert_allclose(c.embeddings, emb, atol=atol)
    assert list(c.texts) == ["classes", "painting"]
    np.testing.assert_array_equal(c.texts["painting"], texts["painting"])
    assert c.domains.tolist() == ["photo"] * 5
    schema = pq.read_schema(tmp_path / "images" / "part-00000.parquet")
    assert str(schema.field("embedding").type) == f"fixed_size_list<element: {'halffloat' if dtype == 'float16' else 'float'}>[8]"
    assert cache.read_ids(tmp_path) == c.ids


def test_unlisted_part_is_ignored_and_reported(tmp_path):
    _make_cache(tmp_path)
    rng = np.random.default_rng(1)
    cache.write_part(tmp_path, "part-00002.parquet", _rows(["late"]), _unit(rng, 1, 8), "float32")
    (tmp_path / "manifest.json.tmp-123").write_text("{")
    assert "late" not in cache.read_cache(tmp_path).ids
    names = sorted(f.name for f in cache.unfinished_files(tmp_path))
    assert names == ["manifest.json.tmp-123", "part-00002.parquet"]
    info = cache.cache_info(tmp_path)
    assert info["n_rows"] == 5 and len(info["unfinished"]) == 2


def test_missing_listed_part_is_an_error(tmp_path):
    _make_cache(tmp_path)
    (tmp_path / "images" / "part-00001.parquet").unlink()
    with pytest.raises(CacheError, match="part-00001.parquet"):
        cache.read_cache(tmp_path)


def test_non_finite_rows_are_detected(tmp_path):
    m, _, _ = _make_cache(tmp_path)
    bad = np.full((1, 8), np.nan, np.float32)
    cache.write_part(tmp_path, "part-00002.parquet", _rows(["nan"]), bad, "float32")
    m.parts.append("part-00002.parquet")
    cache.write_manifest(tmp_path, m)
    with pytest.raises(CacheError, match="NaN or Inf"):
        cache.read_cache(tmp_path)


def test_wrong_embedding_length_is_detected(tmp_path):
    m, _, _ = _make_cache(tmp_path)
    m.embed_dim = 16
    cache.write_manifest(tmp_path, m)
    with pytest.raises(CacheError, match=r"\[16\]"):
        cache.read_cache(tmp_path)


def test_manifest_keeps_unknown_keys_and_requires_known_ones(tmp_path):
    _make_cache(tmp_path)
    d = json.loads((tmp_path / "manifest.json").read_text())
    d["written_by"] = "another tool"
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    m = cache.read_manifest(tmp_path)
    assert m.extra == {"written_by": "another tool"}
    assert m.to_dict()["written_by"] == "another tool"
    del d["embed_dim"]
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(CacheError, match="embed_dim"):
        cache.read_manifest(tmp_path)


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="vlaug embed"):
        cache.read_cache(tmp_path)


def test_failed_table_round_trip_and_removal(tmp_path):
    cache.write_failed(tmp_path, [{"id": "a", "path": "/a", "error": "OSError: truncated"}])
    assert cache.read_failed(tmp_path) == [{"id": "a", "path": "/a", "error": "OSError: truncated"}]
    cache.write_failed(tmp_path, [])
    assert not (tmp_path / "failed.parquet").exists()


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        cache.atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_renames_only_a_complete_file_and_a_failed_rename_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "f.txt"
    target.write_text("old")
    renamed = []

    def crash(src, dst):  # a crash at the rename: the temporary file is complete by then
        renamed.append((Path(src).read_text(), Path(dst).name))
        raise OSError("crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="crash"):
        cache.atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert renamed == [("new", "f.txt")]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_reads_match_the_whole_read(tmp_path, dtype):
    _make_cache(tmp_path, dtype)
    whole = cache.read_cache(tmp_path)
    for batch_rows in (1, 2, 64):
        chunks = list(cache.iter_embeddings(tmp_path, batch_rows))
        assert [s for s, _ in chunks] == list(np.cumsum([0] + [len(e) for _, e in chunks])[:-1])
        assert all(len(e) <= batch_rows and e.flags.writeable for _, e in chunks)
        np.testing.assert_array_equal(np.concatenate([e for _, e in chunks]), whole.embeddings)
        rows = np.array([4, 0, 3])  # any order: positions say where each chunk's rows go
        picked = np.zeros((3, 8), np.float32)
        for pos, emb in cache.take_rows(cache.iter_embeddings(tmp_path, batch_rows), rows):
            picked[pos] = emb
        np.testing.assert_array_equal(picked, whole.embeddings[rows])
    meta = cache.read_metadata(tmp_path)
    assert len(meta) == 5 and meta.labels.tolist() == whole.labels.tolist() and meta.domains.tolist() == whole.domains.tolist()


def test_streamed_read_of_a_damaged_part_is_a_cache_error_and_stops_the_reader(tmp_path):
    import threading

    _make_cache(tmp_path)
    (tmp_path / "images" / "part-00001.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(CacheError, match="part-00001.parquet.*damaged"):
        list(cache.iter_embeddings(tmp_path, 1))
    it = cache.iter_embeddings(tmp_path, 1)
    next(it)
    it.close()  # a caller that stops early stops the reading thread
    assert not any(t.name == "vlaug-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("taken", [0, 1, 3])
def test_prefetch_stops_whenever_the_caller_does(taken):
    import threading

    pulled, blocked = [], threading.Event()

    def items():  # tells the test when the reader holds more than the queue takes (or has read everything)
        for i in range(3):
            pulled.append(i)
            if len(pulled) > taken + 2:
                blocked.set()
            yield i
        blocked.set()

    it = prefetch(items(), depth=2)
    assert [next(it) for _ in range(taken)] == list(range(taken))
    if taken:  # (the reader starts with the first item asked for)
        assert blocked.wait(timeout=60)  # it filled the queue and waits to hand over the rest (or the end)
    it.close()
    assert not any(t.name == "vlaug-prefetch" for t in threading.enumerate())
    with pytest.raises(ZeroDivisionError):
        list(prefetch((1 / x for x in (1, 0)), depth=2))
