"""larp_mllm.data.records and .clips: record lists (CSV, UCF101 splits, folders, captions), ClipDataset sampling, skips, workers."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from larp_mllm.data import clips as data_mod
from larp_mllm.data.records import VideoRecord, caption_csv_records, class_names_of, csv_records, folder_records, ucf101_records, ucf_action
from larp_mllm.data.clips import Clip, ClipBatch, ClipDataset, DataFaults, Skipped, build_chunk_index, collate_clips
from larp_mllm.runtime.processes import loader_workers
from larp_mllm.data.video_io import read_video
from larp_mllm.data.video_write import write_video

# classInd.txt order (1-based, case-insensitive alphabetical as in the official file) and the folder names.
UCF_CLASSES = ["ApplyEyeMakeup", "Hammering", "HammerThrow", "HandstandPushups", "YoYo"]
# Python's sorted(): "HammerThrow" < "Hammering" ('T' < 'i'), which is how the reference numbers classes.
SORTED_LABEL = {"ApplyEyeMakeup": 0, "HammerThrow": 1, "Hammering": 2, "HandstandPushups": 3, "YoYo": 4}


def _video(frames: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """A clip whose frames differ from each other (a moving bright column over noise), (3, frames, size, size)."""
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(3, 1, size, size, generator=g).expand(3, frames, size, size).clone() * 0.5
    for t in range(frames):
        video[:, t, :, (2 * t) % size] = 1.0
    return video


def _file_stem(cls: str) -> str:
    return "HandStandPushups" if cls == "HandstandPushups" else cls  # the real data set's spelling quirk


@pytest.fixture(scope="module")
def fake_ucf(tmp_path_factory) -> tuple[Path, Path]:
    """UCF101-like tree: 5 classes x groups 01, 02 (test) and 08, 09 (train), 1 clip each, + split files."""
    root = tmp_path_factory.mktemp("ucf")
    videos, splits = root / "UCF-101", root / "ucfTrainTestlist"
    splits.mkdir()
    train, test = [], []
    for c, cls in enumerate(UCF_CLASSES):
        for g in (1, 2, 8, 9):
            rel = f"{cls}/v_{_file_stem(cls)}_g{g:02d}_c01.avi"
            write_video(_video(12, seed=10 * c + g), videos / rel)
            (test.append(rel) if g <= 7 else train.append(f"{rel} {c + 1}"))
    (splits / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES)))
    (splits / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (splits / "testlist01.txt").write_text("\r\n".join(test) + "\r\n")  # the official files use CRLF
    return videos, splits


def test_ucf101_records_labels_and_splits(fake_ucf):
    videos, splits = fake_ucf
    train = ucf101_records(videos, splits, split=1, subset="train")
    test = ucf101_records(videos, splits, split=1, subset="test")
    assert len(train) == len(test) == 10
    assert all(int(r.path.stem.split("_g")[1][:2]) >= 8 for r in train)
    assert all(int(r.path.stem.split("_g")[1][:2]) <= 7 for r in test)
    for r in train + test:
        assert r.path.is_file()
        assert r.label == SORTED_LABEL[r.class_name] == SORTED_LABEL[r.path.parent.name]
    assert class_names_of(train) == sorted(UCF_CLASSES)
    with pytest.raises(FileNotFoundError, match="trainlist02.txt"):
        ucf101_records(videos, splits, split=2)
    with pytest.raises(ValueError):
        ucf101_records(videos, splits, subset="val")


def test_ucf_csv_labels_recomputed_like_reference(fake_ucf, tmp_path):
    videos, splits = fake_ucf
    train = ucf101_records(videos, splits, subset="train")
    rows = [f"{i},{r.path},{r.class_name},99" for i, r in enumerate(train)]  # label column is ignored for ucf*
    (tmp_path / "ucf101_train.csv").write_text("id,path,action,label\n" + "\n".join(rows) + "\n")
    from_csv = csv_records(tmp_path / "ucf101_train.csv")
    assert [r.label for r in from_csv] == [r.label for r in train]
    assert [r.path for r in from_csv] == [r.path for r in train]
    assert {r.class_name for r in from_csv if r.label == 3} == {"HandStandPushups"}  # the file name's spelling
    (tmp_path / "other.csv").write_text("id,path,action,label\n" + "\n".join(rows) + "\n")
    assert {r.label for r in csv_records(tmp_path / "other.csv")} == {99}  # non-ucf CSVs keep their labels
    assert ucf_action("v_YoYo_g25_c05.avi") == "YoYo"
    with pytest.raises(ValueError, match="UCF101 file name"):
        ucf_action("clip.avi")


def test_csv_records_paths_and_columns(tmp_path, monkeypatch):
    (tmp_path / "vids").mkdir()
    (tmp_path / "vids" / "a.mp4").write_bytes(b"")
    (tmp_path / "set.csv").write_text("id,path,action,label,caption\n0,vids/a.mp4,Jump,3,a jump\n1,vids/b.mp4,,,\n")
    recs = csv_records(tmp_path / "set.csv")
    assert recs[0] == VideoRecord(tmp_path / "vids" / "a.mp4", 3, "Jump", "a jump")
    assert recs[1] == VideoRecord(tmp_path / "vids" / "b.mp4", -1, "", "")
    assert csv_records(tmp_path / "set.csv", root="/data")[0].path == Path("/data/vids/a.mp4")
    # reference CSVs hold paths relative to the repo root (the working directory)
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "ref.csv").write_text("id,path,action,label\n0,vids/a.mp4,Jump,0\n")
    monkeypatch.chdir(tmp_path)
    assert csv_records(sub / "ref.csv")[0].path.resolve() == (tmp_path / "vids" / "a.mp4").resolve()
    (tmp_path / "bad.csv").write_text("id,file\n0,x.mp4\n")
    with pytest.raises(ValueError, match="path"):
        csv_records(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError):
        csv_records(tmp_path / "nope.csv")


def test_caption_and_folder_records(tmp_path):
    (tmp_path / "caps.csv").write_text('path,caption\nx.mp4,"a dog, running"\n')
    assert caption_csv_records(tmp_path / "caps.csv") == [VideoRecord(tmp_path / "x.mp4", caption="a dog, running")]
    with pytest.raises(ValueError, match="caption"):
        caption_csv_records(_write(tmp_path, "paths_only.csv", "path\nx.mp4\n"))
    root = tmp_path / "folder"
    for rel in ["b_cls/one.mp4", "a_cls/x/two.avi", "a_cls/three.webm", "loose.mkv", "a_cls/notes.txt",
                ".hidden/four.mp4", "a_cls/.five.mp4"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    recs = folder_records(root)
    assert [(r.path.relative_to(root).as_posix(), r.label, r.class_name) for r in recs] == [
        ("a_cls/three.webm", 0, "a_cls"), ("a_cls/x/two.avi", 0, "a_cls"), ("b_cls/one.mp4", 1, "b_cls"),
        ("loose.mkv", -1, "")]
    with pytest.raises(ValueError, match="no video files"):
        folder_records(root / "a_cls" / "x" / "..", extensions=(".mov",))


def _write(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder / name


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """3 good videos (9, 20 and 5 frames) in 2 classes + a truncated mp4 + a text file named .avi + a README."""
    root = tmp_path / "messy"
    write_video(_video(9, seed=1), root / "cats" / "c1.mp4")
    write_video(_video(20, seed=2), root / "cats" / "c2.mp4")
    write_video(_video(5, seed=3), root / "dogs" / "d1.mp4")
    good = (root / "cats" / "c2.mp4").read_bytes()
    (root / "dogs" / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (root / "dogs" / "not_a_video.avi").write_text("this is a text file\n" * 50)
    (root / "README.txt").write_text("not listed: wrong extension")
    return root


def _run(ds: ClipDataset, workers: int, batch_size: int = 2) -> tuple[list[ClipBatch], DataFaults]:
    counter = DataFaults(max_bad_fraction=1.0)
    batches = []
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collate_clips, **loader_workers(workers)):
        counter.update(batch)
        batches.append(batch)
    return batches, counter


@pytest.mark.parametrize("backend", ["auto", "av"])
def test_corrupt_files_skipped_and_counted_with_workers(messy_folder, caplog, backend):
    recs = folder_records(messy_folder)
    assert len(recs) == 5 and class_names_of(recs) == ["cats", "dogs"]
    ds = ClipDataset(recs, num_frames=8, size=16, mode="random", seed=0, backend=backend)
    batches, counter = _run(ds, workers=2)
    got = sorted(i for b in batches for i in b.index.tolist())
    good = sorted(i for i, r in enumerate(recs) if r.path.name in {"c1.mp4", "c2.mp4", "d1.mp4"})
    assert got == good  # every good clip, including the 5-frame one (padded)
    assert all(b.video.shape[1:] == (3, 8, 16, 16) for b in batches)
    assert counter.counts() == {"good": 3, "missing": 0, "unreadable": 2, "too_short": 0, "wrong_size": 0}
    assert any("truncated.mp4" in e for e in counter.examples) and any("not_a_video" in e for e in counter.examples)
    with caplog.at_level(logging.WARNING):
        epoch = counter.end_epoch(0)
    assert epoch["unreadable"] == 2 and "epoch 0: 3 good, 0 missing, 2 unreadable" in caplog.text
    assert counter.epoch == [0] * 5 and counter.counts()["unreadable"] == 2  # a new epoch; the run's totals kept
    chunks = ClipDataset(recs, num_frames=8, size=16, mode="chunks", backend=backend)
    assert chunks.num_index_skipped == 2
    assert sorted(chunks.chunk_index.entries) == sorted([(good[0], 0), (good[1], 0), (good[1], 1), (good[2], 0)])


def test_short_clips_padded_or_skipped(messy_folder):
    recs = [r for r in folder_records(messy_folder) if r.path.name == "d1.mp4"]  # 5 frames
    clip = ClipDataset(recs, num_frames=8, size=16)[0]
    assert isinstance(clip, Clip) and clip.video.shape == (3, 8, 16, 16)
    assert torch.equal(clip.video[:, 5:], clip.video[:, 4:5].expand(-1, 3, -1, -1))
    assert torch.allclose(clip.video[:, :5], read_video(recs[0].path, size=16), atol=1e-6)
    skipped = ClipDataset(recs, num_frames=8, size=16, pad_short=False)[0]
    assert isinstance(skipped, Skipped) and skipped.kind == "too_short" and skipped.reason.startswith("5 frames")
    assert len(ClipDataset(recs, num_frames=8, size=16, mode="chunks", pad_short=False)) == 0
    empty = collate_clips([skipped])
    assert empty.video.shape == (0, 3, 8, 16, 16) and empty.num_skipped == 1 and empty.label.numel() == 0


def test_chunk_index_deterministic_and_cached(messy_folder, tmp_path, monkeypatch):
    recs = folder_records(messy_folder)
    first = build_chunk_index(recs, 4, cache_path=tmp_path / "index.json")
    second = build_chunk_index(recs, 4)  # no cache: counted again
    assert first.entries == second.entries and first.frame_counts == second.frame_counts
    counts = {r.path.name: n for r, n in zip(recs, first.frame_counts)}
    assert counts["c1.mp4"] == 9 and counts["c2.mp4"] == 20 and counts["d1.mp4"] == 5
    assert len(first.entries) == 9 // 4 + 20 // 4 + 5 // 4
    cached = json.loads((tmp_path / "index.json").read_text())
    assert cached["frame_counts"] == first.frame_counts

    opened = []

    class CountingReader(data_mod.VideoReader):
        def __init__(self, path, backend="auto"):
            opened.append(path)
            super().__init__(path, backend)

    monkeypatch.setattr(data_mod, "VideoReader", CountingReader)
    third = build_chunk_index(recs, 4, cache_path=tmp_path / "index.json")
    assert third.entries == first.entries and third.errors == first.errors and opened == []  # from the cache
    build_chunk_index(recs, 5, cache_path=tmp_path / "index.json")  # another clip length: the cache is stale
    assert len(opened) == len(recs)
    monkeypatch.undo()
    ds = ClipDataset(recs, num_frames=4, size=16, mode="chunks", cache_path=tmp_path / "index.json")
    for i in range(len(ds)):  # chunk c of a video is frames [4c, 4c + 4)
        r, c = ds.chunk_index.entries[i]
        assert torch.allclose(ds[i].video, read_video(recs[r].path, 4, 16, start=4 * c), atol=1e-6)
        assert ds[i].chunk == c and ds[i].index == r


def test_random_windows_reproducible_across_workers(messy_folder):
    recs = [r for r in folder_records(messy_folder) if r.path.name in {"c1.mp4", "c2.mp4", "d1.mp4"}]
    ds = ClipDataset(recs * 3, num_frames=4, size=16, mode="random", seed=5, flip=True)
    ds.set_epoch(1)
    serial = torch.cat([b.video for b in _run(ds, workers=0, batch_size=3)[0]])
    parallel = torch.cat([b.video for b in _run(ds, workers=2, batch_size=2)[0]])
    # exact: each clip is decoded, resized (per-pixel sums, no reduction split across threads) and flipped on its own,
    # so neither the batch nor the worker processes' thread count enter its values
    assert torch.equal(serial, parallel)
    epochs = []
    for e in range(4):
        ds.set_epoch(e)
        epochs.append(torch.stack([ds[i].video for i in range(len(ds))]))
    assert not all(torch.equal(epochs[0], other) for other in epochs[1:])  # new windows/flips per epoch
    assert torch.equal(ClipDataset(recs * 3, num_frames=4, size=16, seed=5, flip=True)[4].video,
                       ClipDataset(recs * 3, num_frames=4, size=16, seed=5, flip=True)[4].video)


def test_flip_is_one_horizontal_flip_per_clip(messy_folder):
    recs = [r for r in folder_records(messy_folder) if r.path.name == "c2.mp4"] * 12
    plain = ClipDataset(recs, num_frames=4, size=16, seed=3, flip=False)
    flipped = ClipDataset(recs, num_frames=4, size=16, seed=3, flip=True)
    kinds = []
    for i in range(len(recs)):
        a, b = plain[i].video, flipped[i].video
        kinds.append("same" if torch.equal(a, b) else "flipped" if torch.equal(a.flip(-1), b) else "other")
    assert set(kinds) == {"same", "flipped"}


def test_dataset_argument_errors(messy_folder):
    recs = folder_records(messy_folder)
    with pytest.raises(ValueError, match="mode"):
        ClipDataset(recs, mode="all")
    with pytest.raises(ValueError):
        ClipDataset([], num_frames=4)
    with pytest.raises(ValueError):
        ClipDataset(recs, num_frames=0)
    assert np.array_equal(ClipDataset(recs, num_frames=4, size=8).class_names, ["cats", "dogs"])
