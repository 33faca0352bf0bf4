"""Data faults (larp_mllm.data.faults): each kind classified with a clear reason, counted with and without workers,
the warnings and the stop above the threshold, damaged code folders refused by name, and the tokenizer trainer
end to end: 5% bad files of each kind train to the end with the counts reported; no readable file stops before the
first step. The trainer runs are subprocesses (CPU, gloo, OMP_NUM_THREADS=1), about 30 s each on 2 busy cores."""
from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from larp_mllm.data import clips as clips_mod
from larp_mllm.data.clips import Clip, ClipDataset, DataFaultError, DataFaults, Skipped, collate_clips
from larp_mllm.data.codes import CodeFolderError, CodeManifest, CodeShardWriter, ShardData, VideoEntry, load_code_shards
from larp_mllm.data.faults import check_files_exist, min_items_to_judge
from larp_mllm.data.records import VideoRecord
from larp_mllm.data.video_io import decord_available
from larp_mllm.data.video_write import write_video
from larp_mllm.runtime.processes import loader_workers
from test_train_tokenizer import log_rows, run_train

SHAPE = (3, 8, 16, 16)
BACKENDS = ["auto", "av"] + (["decord"] if decord_available() else [])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One file per case: good (12 frames), short (4 frames), missing, text named .mp4, short and long .txt."""
    root = tmp_path_factory.mktemp("faults")
    good = write_video(torch.rand(3, 12, 32, 32, generator=torch.Generator().manual_seed(0)), root / "good.mp4")
    short = write_video(torch.rand(3, 4, 32, 32, generator=torch.Generator().manual_seed(1)), root / "short.mp4")
    (root / "text.mp4").write_text("not a video\n" * 20)
    (root / "hello.txt").write_text("hello\n")  # decord opens it, PyAV does not: once an internal AttributeError
    (root / "notes.txt").write_text("lorem ipsum dolor sit amet " * 400)  # FFmpeg's tty demuxer reads it as "video"
    return {"good": good, "short": short, "missing": root / "missing.mp4", "text_mp4": root / "text.mp4",
            "hello_txt": root / "hello.txt", "notes_txt": root / "notes.txt"}


def _dataset(paths: list[Path], **kw) -> ClipDataset:
    return ClipDataset([VideoRecord(p) for p in paths], num_frames=8, size=16, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_kind_is_classified_with_a_clear_reason(files, backend):
    ds = _dataset([files[k] for k in ("good", "missing", "text_mp4", "hello_txt", "notes_txt", "short")],
                  pad_short=False, backend=backend)
    items = [ds[i] for i in range(len(ds))]
    assert isinstance(items[0], Clip) and items[0].video.shape == SHAPE
    kinds = [(it.kind, it.path) for it in items[1:]]
    assert kinds == [("missing", str(files["missing"])), ("unreadable", str(files["text_mp4"])),
                     ("unreadable", str(files["hello_txt"])), ("unreadable", str(files["notes_txt"])),
                     ("too_short", str(files["short"]))]
    missing, text_mp4, hello, notes, short = items[1:]
    assert missing.reason == "no such file"
    for bad in (text_mp4, hello, notes):
        assert bad.reason.startswith("not a readable video (") and "AttributeError" not in bad.reason
        assert "\n" not in bad.reason and bad.shape == SHAPE
    if backend != "decord":
        assert "Invalid data found when processing input" in text_mp4.reason
        assert "a text file: FFmpeg reads it as ansi text art" in notes.reason
    assert short.reason == "4 frames, fewer than the 8 of a clip"
    assert isinstance(_dataset([files["short"]], backend=backend)[0], Clip)  # padded when pad_short (the default)


def test_wrong_size_is_its_own_kind(files, monkeypatch):
    class Narrow(clips_mod.VideoReader):  # a decoder that hands back one column too few
        def read(self, *args, **kwargs):
            return super().read(*args, **kwargs)[..., :-1]

    monkeypatch.setattr(clips_mod, "VideoReader", Narrow)
    item = _dataset([files["good"]])[0]
    assert isinstance(item, Skipped) and item.kind == "wrong_size"
    assert item.reason == "decoded to (3, 8, 16, 15), not (3, t, 16, 16)"


def test_chunk_index_faults_have_kinds(files, tmp_path):
    paths = [files[k] for k in ("good", "missing", "text_mp4", "short")]
    ds = _dataset(paths, mode="chunks", pad_short=False, cache_path=tmp_path / "index.json")
    assert [(f.index, f.kind) for f in ds.index_faults()] == [(1, "missing"), (2, "unreadable"), (3, "too_short")]
    again = _dataset(paths, mode="chunks", pad_short=False, cache_path=tmp_path / "index.json")  # from the cache
    assert again.index_faults() == ds.index_faults()
    faults = DataFaults(0.8)
    faults.add_index_faults(ds.index_faults(), len(paths))  # 3 of 4 videos: within 0.8
    assert faults.counts() == {"good": 0, "missing": 1, "unreadable": 1, "too_short": 1, "wrong_size": 0}
    with pytest.raises(DataFaultError, match=r"3 of 4 videos indexed could not be used \(75% > max_bad_fraction=0.5"):
        DataFaults(0.5).add_index_faults(ds.index_faults(), len(paths))


# ----------------------------------------------------------------------------------------------------------------------
# The counter
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_counts_by_kind_with_any_number_of_workers(files, workers, caplog):
    paths = [files["good"]] * 6 + [files[k] for k in ("missing", "text_mp4", "notes_txt", "short")]
    ds = _dataset(paths, pad_short=False)
    faults = DataFaults(1.0, warn_first=2, name="clips")
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_clips, **loader_workers(workers))
    with caplog.at_level(logging.WARNING, logger="larp.data"):
        for batch in loader:
            faults.update(batch)
        epoch = faults.end_epoch(0)
    assert epoch == {"good": 6, "missing": 1, "unreadable": 2, "too_short": 1, "wrong_size": 0}
    assert faults.summary() == "6 good, 1 missing, 2 unreadable, 1 too_short, 0 wrong_size"
    assert faults.scalars()["data/unreadable"] == 2.0
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 2  # warn_first: the first two faults, one line each, with path and kind
    assert lines[0] == f"clips: skipped {files['missing']} (missing: no such file)"
    assert lines[1].startswith(f"clips: skipped {files['text_mp4']} (unreadable: not a readable video (")
    assert lines[1].endswith("; further faults are counted, not listed")
    assert "clips, epoch 0: 6 good, 1 missing, 2 unreadable, 1 too_short, 0 wrong_size" in caplog.text


def _batch(*kinds: str) -> object:
    """A collated batch of good clips ("good") and faults of the given kinds, without any video file."""
    items = [Clip(torch.zeros(SHAPE), 0, i, -1) if k == "good" else Skipped(i, -1, f"/data/{k}_{i}.mp4", k, "x", SHAPE)
             for i, k in enumerate(kinds)]
    return collate_clips(items)


def test_stop_above_the_threshold_once_enough_items_were_seen():
    faults = DataFaults(0.5, min_items=4, option="max_bad_data_fraction")
    faults.update(_batch("missing", "missing"))  # 100% bad, but 2 items are too few to judge
    faults.update(_batch("good", "good"))  # 2 of 4: not above one half
    with pytest.raises(DataFaultError) as err:
        faults.update(_batch("unreadable", "unreadable"))  # 4 of 6
    message = str(err.value)
    assert message.startswith("data: 4 of 6 clips seen so far in this epoch could not be used (67% > "
                               "max_bad_data_fraction=0.5): missing 2, unreadable 2, too_short 0, wrong_size 0; e.g. "
                               "/data/missing_0.mp4 (missing: x); /data/missing_1.mp4 (missing: x); "
                               "/data/unreadable_0.mp4 (unreadable: x); /data/unreadable_1.mp4 (unreadable: x)")
    assert message.endswith("Fix or remove these files, or raise max_bad_data_fraction")
    small = DataFaults(0.5, min_items=100)  # a small data set is judged at the epoch's end
    small.update(_batch("too_short", "wrong_size", "good"))
    with pytest.raises(DataFaultError, match=r"2 of 3 clips seen in this epoch .* too_short 1, wrong_size 1"):
        small.end_epoch()
    never = DataFaults(1.0, min_items=1)  # 1.0 stops only when nothing at all could be used
    never.update(_batch("missing", "good"))
    never.end_epoch()
    never.update(_batch("missing", "unreadable"))
    with pytest.raises(DataFaultError, match=r"2 of 2 clips seen in this epoch could not be used \(not one could"):
        never.end_epoch()
    with pytest.raises(ValueError, match="must lie in"):
        DataFaults(1.5)
    assert min_items_to_judge(4, 1000) == 16 and min_items_to_judge(64, 1000) == 128 and min_items_to_judge(4, 5) == 5


def test_several_processes_judge_the_summed_counts():
    other = [3, 1, 0, 0, 0]  # what another process counted: 3 good, 1 missing
    faults = DataFaults(0.5, min_items=4, reduce=lambda mine: [a + b for a, b in zip(mine, other)])
    faults.update(_batch("good"))  # globally 4 good + 1 missing: fine
    assert faults.counts() == {"good": 4, "missing": 1, "unreadable": 0, "too_short": 0, "wrong_size": 0}
    other[:] = [0, 4, 0, 0, 0]
    with pytest.raises(DataFaultError, match=r"4 of 5 clips"):  # here 1 good; the other process: 4 missing
        faults.update(_batch())


def test_pre_flight_stats_every_file(files, caplog):
    paths = [files["good"], files["short"], files["missing"], Path("/nowhere/b.mp4")]
    with caplog.at_level(logging.WARNING, logger="larp.data"):
        assert check_files_exist(paths, 0.5, name="training data") == 2  # one half: not above it
    assert "training data: 2 of 4 files are missing (50%), e.g. " in caplog.text
    with pytest.raises(DataFaultError, match=r"training data: 2 of 3 files are missing \(67% > max_bad_data_fraction"
                                             r"=0.5\), e.g. .*missing.mp4, /nowhere/b.mp4"):
        check_files_exist(paths[1:], 0.5, name="training data", option="max_bad_data_fraction")
    assert check_files_exist([files["good"]], 0.0) == 0


# ----------------------------------------------------------------------------------------------------------------------
# Code shards: a damaged folder is refused, naming the file
# ----------------------------------------------------------------------------------------------------------------------
def _code_folder(folder: Path) -> Path:
    writer = CodeShardWriter(folder, "run", 2, "hash", 4, 16)
    for s in range(2):
        idx = torch.arange(3 * s, 3 * s + 3)
        writer.write(s, 3 * s, 3 * s + 3, ShardData(torch.randint(0, 16, (3, 4)), torch.zeros(3, dtype=torch.long),
                                                    idx, torch.full((3,), -1)), 1, {"unreadable": 1})
    manifest = CodeManifest("run", "hash", 4, 16, "larp", "test", "random", 8, 32, 0, False, 3, 6, 0, ["a"],
                            [VideoEntry(f"v{i}.mp4") for i in range(6)], index_faults={"missing": 2})
    writer.finalize(manifest)
    return folder


def test_damaged_code_folders_are_refused_by_name(tmp_path):
    folder = _code_folder(tmp_path / "codes")
    manifest = CodeManifest.load(folder)
    assert manifest.data_faults == {"missing": 2, "unreadable": 2} and manifest.shards[0].faults == {"unreadable": 1}
    assert len(load_code_shards(folder)) == 6
    shard = folder / manifest.shards[1].file
    whole = shard.read_bytes()
    for damage in (whole[: len(whole) // 2], b"", whole[:-5]):
        shard.write_bytes(damage)
        with pytest.raises(CodeFolderError, match=rf"code shard {re.escape(str(shard))} cannot be read .*damaged"):
            load_code_shards(folder)
    shard.unlink()
    with pytest.raises(CodeFolderError, match=rf"code shard {re.escape(str(shard))} is missing"):
        load_code_shards(folder)
    bad = CodeShardWriter(tmp_path / "other", "run", 1, "hash", 4, 16)  # codes outside the codebook
    bad.write(0, 0, 1, ShardData(torch.tensor([[0, 1, 2, 99]]), torch.zeros(1, dtype=torch.long),
                                 torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)), 0)
    bad.finalize(CodeManifest("run", "hash", 4, 16, "", "t", "random", 8, 32, 0, False, 1, 1, 0, [], [VideoEntry("v")]))
    with pytest.raises(CodeFolderError, match=r"codes outside \[0, 16\)"):
        load_code_shards(tmp_path / "other")
    (folder / "manifest.json").write_text("{cut")
    with pytest.raises(CodeFolderError, match="manifest.json is not readable JSON"):
        load_code_shards(folder)


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer trainer, end to end
# ----------------------------------------------------------------------------------------------------------------------
# The trainer pads short clips (the reference's behaviour) and its decoder always returns the asked size, so two of
# the kinds need help: this wrapper turns padding off and narrows the clips of files named wrong_size_*.
WRAPPER = '''
import functools, os, sys
sys.path.insert(0, os.getcwd())  # the repository (run_train runs in it)
import larp_mllm.data.clips as clips
import tokenizer_training.data as data

data.ClipDataset = functools.partial(clips.ClipDataset, pad_short=False)


class WrongSize(clips.VideoReader):
    def read(self, *args, **kwargs):
        video = super().read(*args, **kwargs)
        return video[..., :-1] if "wrong_size" in self.path.name else video


clips.VideoReader = WrongSize
from tokenizer_training.train import main
main(sys.argv[2:])  # after the module name run_train passes
'''
BAD_FILES = {"missing_0.mp4": "missing", "missing_1.mp4": "missing", "text.mp4": "unreadable",
             "notes.txt": "unreadable", "short_0.mp4": "too_short", "short_1.mp4": "too_short",
             "wrong_size_0.mp4": "wrong_size", "wrong_size_1.mp4": "wrong_size"}


@pytest.fixture(scope="module")
def mixed_csvs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A training CSV of 40 clips, 2 of each fault kind (5% each), a validation CSV, and the wrapper script."""
    from larp_mllm.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("mixed")
    train = make_synthetic_dataset(root / "train", classes=4, per_class=8, seed=0, frames=12, size=32)
    val = make_synthetic_dataset(root / "val", classes=4, per_class=1, seed=1, frames=8, size=32)
    folder = train.parent
    (folder / "text.mp4").write_text("not a video\n" * 20)
    (folder / "notes.txt").write_text("lorem ipsum dolor sit amet " * 400)
    for i in range(2):
        write_video(torch.rand(3, 4, 32, 32), folder / f"short_{i}.mp4")
        shutil.copy(next((folder / "videos").rglob("*.mp4")), folder / f"wrong_size_{i}.mp4")
    with open(train, "a", newline="") as f:
        for i, name in enumerate(BAD_FILES):
            csv.writer(f).writerow([100 + i, name, "Bad", 0, ""])
    (root / "wrapper.py").write_text(WRAPPER)
    return train, val, root / "wrapper.py"


def test_five_percent_of_each_kind_trains_to_the_end_with_the_counts(mixed_csvs, tmp_path):
    train, val, wrapper = mixed_csvs
    proc = run_train(tmp_path, (train, val), "--max_steps", "11", launcher=[sys.executable, str(wrapper)])
    err = proc.stderr
    assert "training data: 2 of 40 files are missing (5%)" in err  # the pre-flight check warns, below the limit
    assert "training data, epoch 0: 32 good, 2 missing, 2 unreadable, 2 too_short, 2 wrong_size" in err
    assert "validation data: 4 good, 0 missing, 0 unreadable, 0 too_short, 0 wrong_size" in err
    assert re.search(r"done: 11 steps, 0 micro-batches skipped for a non-finite loss; training data: \d+ good, "
                     r"2 missing, \d+ unreadable, \d+ too_short, \d+ wrong_size", err)
    assert "non-finite loss on some process" not in err and "AttributeError" not in err
    warned = re.findall(r"training data: skipped (\S+) \((\w+): ", err)
    assert len(warned) == 5 and all(BAD_FILES[Path(p).name] == kind for p, kind in warned)
    rows = [r for r in log_rows(tmp_path) if "data/good" in r]
    assert [r["step"] for r in rows] == list(range(1, 12))
    at_epoch_end = rows[9]  # step 10: the 40 clips of epoch 0, every one seen once
    assert {k: at_epoch_end[f"data/{k}"] for k in ("good", "missing", "unreadable", "too_short", "wrong_size")} == {
        "good": 32, "missing": 2, "unreadable": 2, "too_short": 2, "wrong_size": 2}
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_bad_share_above_the_limit_stops_with_the_counts_and_a_checkpoint(mixed_csvs, tmp_path):
    train, val, wrapper = mixed_csvs
    proc = run_train(tmp_path, (train, val), "--max_steps", "11", "--max_bad_data_fraction", "0.1",
                     launcher=[sys.executable, str(wrapper)], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    found = re.search(r"ERROR training data: (\d+) of (\d+) clips seen so far in this epoch could not be used "
                      r"\(\d+% > max_bad_data_fraction=0.1\): missing (\d+), unreadable (\d+), too_short (\d+), "
                      r"wrong_size (\d+); e\.g\. .*; state saved to (\S+)", proc.stderr)
    assert found, proc.stderr[-3000:]
    bad, seen, *kinds, saved = found.groups()
    assert int(bad) == sum(map(int, kinds)) and int(bad) > 0.1 * int(seen) and int(seen) >= 16
    state = json.loads((Path(saved) / "trainer_state.json").read_text())
    assert state["step"] >= 1 and "Traceback" not in proc.stderr


def test_no_readable_file_stops_before_the_first_step(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("id,path,action,label\n" + "".join(f"{i},gone/clip_{i}.mp4,X,0\n" for i in range(8)))
    out = tmp_path / "run"
    proc = run_train(out, (data, data), check=False)
    assert proc.returncode == 2
    assert (f"ERROR training data: 8 of 8 files are missing (100% > max_bad_data_fraction=0.5), e.g. "
            f"{tmp_path}/gone/clip_0.mp4, {tmp_path}/gone/clip_1.mp4") in proc.stderr
    assert "Traceback" not in proc.stderr and "non-finite" not in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "log.jsonl").exists() and not (out / "final").exists()
