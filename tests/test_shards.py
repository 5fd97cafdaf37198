"""Webdataset shards: layout, size targets, atomic/interrupted writes, and a reader whose order is
seeded, independent of workers, and resumable exactly from a state_dict."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from axpo_nemo.agent.sample import Sample, read_samples, write_samples
from axpo_nemo.data.shards import (
    SampleSink,
    ShardConfig,
    ShardReader,
    ShardWriter,
    index_shards,
    iter_samples,
    read_index,
)

N = 23


def _png(i: int, size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (i * 10 % 256, 255 - i, 7)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i, i, i)).save(buf, "JPEG")
    return buf.getvalue()


def _samples(n: int = N) -> list[tuple[Sample, list[bytes]]]:
    out = []
    for i in range(n):
        images = [_png(i), _jpeg(i)][: i % 3]
        s = Sample(
            f"q{i}", f"What is {i}?", str(i), "math", candidates=[f"{i}.0"], source="t", category=f"c{i % 2}"
        )
        out.append((s, images))
    return out


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    with ShardWriter(d, ShardConfig(max_samples=4)) as w:
        for s, images in _samples():
            w.write(s, images=images)
    return d


def test_layout_is_webdataset_tar_with_json_and_image_members(shard_dir):
    index = read_index(shard_dir)
    assert index["complete"] and index["num_samples"] == N
    assert [s["samples"] for s in index["shards"]] == [4, 4, 4, 4, 4, 3]
    assert sorted(p.name for p in shard_dir.iterdir()) == ["index.json"] + [
        f"shard-00000{i}.tar" for i in range(6)
    ]
    with tarfile.open(shard_dir / "shard-000000.tar") as tar:
        names = tar.getnames()
        record = json.loads(tar.extractfile("000000002.json").read())
        assert tar.extractfile("000000002.0.png").read() == _png(2)
        assert tar.extractfile("000000002.1.jpg").read() == _jpeg(2)  # JPEG bytes stored as given
    assert names == ["000000000.json", "000000001.json", "000000001.0.png", "000000002.json",
                     "000000002.0.png", "000000002.1.jpg", "000000003.json"]  # fmt: skip
    assert record["id"] == "q2" and record["images"] == ["0.png", "1.jpg"] and "image_data" not in record


def test_webdataset_library_reads_the_shards(shard_dir):
    wds = pytest.importorskip("webdataset")
    ds = wds.WebDataset(str(shard_dir / "shard-{000000..000005}.tar"), shardshuffle=False)
    rows = list(ds)
    assert len(rows) == N
    assert json.loads(rows[5]["json"])["id"] == "q5" and rows[5]["0.png"] == _png(5)


def test_reader_round_trip_pil_and_bytes(shard_dir):
    originals = {s.id: (s, imgs) for s, imgs in _samples()}
    got = list(ShardReader(shard_dir, decode="pil"))
    assert [s.id for s in got] == [f"q{i}" for i in range(N)]
    for s in got:
        ref, imgs = originals[s.id]
        assert (s.question, s.answer, s.candidates, s.category) == (
            ref.question,
            ref.answer,
            ref.candidates,
            ref.category,
        )
        assert len(s.image_data) == len(imgs)
        for img, data in zip(s.load_images(), imgs, strict=True):
            expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert img.mode == "RGB" and np.array_equal(np.asarray(img), expected)
    raw = list(ShardReader(shard_dir, decode="bytes"))
    assert [s.image_data for s in raw] == [originals[s.id][1] for s in raw]


def test_byte_target_bounds_shard_size(tmp_path):
    cfg = ShardConfig(max_samples=1000, max_bytes=6000)
    with ShardWriter(tmp_path, cfg) as w:
        for s, images in _samples(12):
            w.write(s, images=images)
    index = read_index(tmp_path)
    assert len(index["shards"]) > 1 and index["num_samples"] == 12
    for shard in index["shards"]:
        assert shard["offsets"][-1] <= cfg.max_bytes or shard["samples"] == 1


def test_existing_output_needs_overwrite(shard_dir):
    with pytest.raises(FileExistsError, match="already holds shards"):
        ShardWriter(shard_dir)


def test_interrupted_writer_keeps_whole_samples_and_no_temp_files(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path, ShardConfig(max_samples=4)) as w:
        for i, (s, images) in enumerate(_samples(10)):
            if i == 6:
                raise RuntimeError("boom")
            w.write(s, images=images)
    with pytest.raises(ValueError, match=r"an unfinished dataset .*2 finished shard.*6 samples.*--allow-incomplete"):
        read_index(tmp_path)  # never read as if it were whole, unless asked
    with pytest.raises(ValueError, match="unfinished"):
        ShardReader(tmp_path)
    index = read_index(tmp_path, allow_incomplete=True)
    assert not index["complete"] and index["num_samples"] == 6
    assert not list(tmp_path.glob("*.tmp"))
    assert [s.id for s in ShardReader(tmp_path, allow_incomplete=True)] == [f"q{i}" for i in range(6)]
    with tarfile.open(tmp_path / "shard-000001.tar") as tar:  # the cut shard is a valid tar
        assert len([n for n in tar.getnames() if n.endswith(".json")]) == 2


def test_bad_image_is_rejected_before_anything_is_written(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write(Sample("a", "q", "1"), images=[_png(1)])
        with pytest.raises(ValueError, match="sample b: image 0: not a readable image"):
            w.write(Sample("b", "q", "1"), images=[b"not an image"])
        w.write(Sample("c", "q", "1"))
    assert [s.id for s in ShardReader(tmp_path)] == ["a", "c"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_undecodable_image_names_file_byte_range_and_member(shard_dir, tmp_path, num_workers):
    for tar in shard_dir.glob("*"):
        (tmp_path / tar.name).write_bytes(tar.read_bytes())
    shard = tmp_path / "shard-000001.tar"  # samples 4-7; sample 5 holds one PNG
    data = bytearray(shard.read_bytes())
    start, end = read_index(tmp_path)["shards"][1]["offsets"][1:3]
    at = data.index(_png(5), start)
    data[at : at + 8] = b"garbage!"  # the PNG signature: no longer an image
    shard.write_bytes(bytes(data))
    assert [s.id for s in ShardReader(tmp_path, decode="bytes")][5] == "q5"  # bytes: read as stored
    pattern = rf"shard-000001\.tar \(bytes {start}-{end}\): sample 000000005: image 000000005\.0\.png cannot be decoded"
    with pytest.raises(ValueError, match=pattern), ShardReader(tmp_path, num_workers=num_workers) as reader:
        list(reader)


def test_index_shards_rebuilds_the_writer_index(shard_dir, tmp_path):
    for tar in shard_dir.glob("*.tar"):
        (tmp_path / tar.name).write_bytes(tar.read_bytes())
    rebuilt = index_shards(tmp_path)
    assert rebuilt["shards"] == read_index(shard_dir)["shards"]


def _ids(reader, limit=None):
    out = []
    for s in reader:
        out.append(s.id)
        if limit is not None and len(out) == limit:
            break
    return out


def test_shuffle_is_seeded_per_epoch_and_a_permutation(shard_dir):
    stored = [f"q{i}" for i in range(N)]
    a = ShardReader(shard_dir, shuffle_buffer=8, shuffle_shards=True, seed=3)
    e0, e1 = _ids(a), _ids(a)
    assert sorted(e0) == sorted(stored) and e0 != stored and e0 != e1
    assert _ids(ShardReader(shard_dir, shuffle_buffer=8, shuffle_shards=True, seed=3)) == e0
    assert _ids(ShardReader(shard_dir, shuffle_buffer=8, shuffle_shards=True, seed=4)) != e0


@pytest.mark.parametrize(
    "opts",
    [
        {"shuffle_buffer": 0},
        {"shuffle_buffer": 7, "shuffle_shards": True, "seed": 11},
        {"shuffle_buffer": 7, "shuffle_shards": True, "seed": 11, "num_workers": 2, "chunk_size": 2},
    ],
    ids=["stored", "shuffled", "shuffled-2-threads"],
)
def test_resume_continues_exactly_where_it_stopped(shard_dir, opts):
    full = ShardReader(shard_dir, **opts)
    epoch0, epoch1 = _ids(full), _ids(full)
    with ShardReader(shard_dir, **opts) as first:
        head = _ids(first, limit=9)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    assert head == epoch0[:9] and state["position"] == 9
    with ShardReader(shard_dir, **opts) as second:
        second.load_state_dict(state)
        assert _ids(second) == epoch0[9:]
        assert _ids(second, limit=5) == epoch1[:5]  # and on into the next epoch
        state = second.state_dict()
    third = ShardReader(shard_dir, **opts)
    third.load_state_dict(state)
    assert _ids(third) == epoch1[5:]


def test_workers_do_not_change_the_order(shard_dir):
    opts = {"shuffle_buffer": 5, "seed": 2}
    base = _ids(ShardReader(shard_dir, **opts))
    with ShardReader(shard_dir, num_workers=2, prefetch=1, chunk_size=1, **opts) as r:
        assert _ids(r) == base


@pytest.mark.slow
def test_process_workers_same_order_and_resume(shard_dir):
    opts = {"shuffle_buffer": 5, "seed": 2}
    base = _ids(ShardReader(shard_dir, **opts))
    with ShardReader(shard_dir, num_workers=2, worker_type="process", **opts) as r:
        assert _ids(r, limit=10) == base[:10]
        state = r.state_dict()
    with ShardReader(shard_dir, num_workers=2, worker_type="process", **opts) as r:
        r.load_state_dict(state)
        assert _ids(r) == base[10:]


def test_ranks_partition_the_epoch(shard_dir):
    opts = {"shuffle_buffer": 6, "seed": 9}
    whole = _ids(ShardReader(shard_dir, **opts))
    parts = [_ids(ShardReader(shard_dir, rank=r, world_size=3, **opts)) for r in range(3)]
    assert [len(p) for p in parts] == [len(ShardReader(shard_dir, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == sorted(whole) and parts[1] == whole[1::3]


def test_state_of_another_reader_is_refused(shard_dir):
    state = ShardReader(shard_dir, shuffle_buffer=4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed: 1 -> 2"):
        ShardReader(shard_dir, shuffle_buffer=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="bad epoch/position"):
        ShardReader(shard_dir, shuffle_buffer=4, seed=1).load_state_dict({**state, "position": 10**6})
    with pytest.raises(ValueError, match="worker_type"):
        ShardReader(shard_dir, worker_type="fiber")


def test_jsonl_stays_readable_and_converts_both_ways(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png(1))
    old_line = {"id": "a", "question": "q", "answer": "1", "images": ["img/a.png"], "answer_type": "math"}
    (tmp_path / "old.jsonl").write_text(
        json.dumps(old_line) + "\n" + '{"id": "b", "question": "q", "answer": "1", "bogus": 1}\n'
    )
    [sample] = list(read_samples(tmp_path / "old.jsonl"))  # the bad line is skipped
    assert sample.load_images(tmp_path)[0].size == (6, 6) and "image_data" not in sample.to_json()
    with SampleSink(tmp_path / "sh", "shards") as sink:
        sink.write_all(iter_samples(tmp_path / "old.jsonl"))
    with SampleSink(tmp_path / "back", "jsonl") as sink:
        sink.write_all(iter_samples(tmp_path / "sh"))
    [again] = list(read_samples(tmp_path / "back" / "samples.jsonl"))
    assert again.images == ["images/000000000.0.png"]
    assert (tmp_path / "back" / again.images[0]).read_bytes() == _png(1)
    with pytest.raises(ValueError, match="unknown sample key"):
        Sample.from_dict({**old_line, "bogus": 1})
    with pytest.raises(ValueError, match="images must be a list"):
        Sample("x", "q", "1", images="img/a.png")  # type: ignore[arg-type]
    write_samples([again], tmp_path / "w.jsonl")
    assert next(read_samples(tmp_path / "w.jsonl")) == again
