"""larp-extract-codes + larp_mllm.codes: shards, manifest, resume after a kill, ranks, dataset kinds."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from larp_mllm import LARPTokenizer
from larp_mllm.codes import CodeManifest, load_code_shards, read_shard
from larp_mllm.data import ClipDataset, csv_records
from larp_mllm.synthetic import make_synthetic_dataset
from tokenizer_training.extract_codes import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A larp-tiny checkpoint (8x32x32 clips) and a CSV of 8 synthetic 16-frame videos + one non-video row."""
    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    LARPTokenizer.from_preset("larp-tiny").save_pretrained(root / "larp")
    csv_path = make_synthetic_dataset(root / "data", classes=4, per_class=2, seed=3, frames=16, size=32)
    (root / "data" / "broken.mp4").write_text("not a video\n" * 20)
    with open(csv_path, "a", newline="") as f:
        csv.writer(f).writerow([8, "broken.mp4", "Broken", 7, "a broken file"])
    return root / "larp", csv_path


def _args(setup, out: Path, *extra: str) -> list[str]:
    ckpt, csv_path = setup
    return ["--checkpoint", str(ckpt), "--csv", str(csv_path), "--out", str(out), "--num-workers", "0", *extra]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("codes-*.safetensors"))} | {
        "manifest.json": (out / "manifest.json").read_bytes()}


@pytest.fixture(scope="module")
def reference_run(setup, tmp_path_factory) -> Path:
    """One uninterrupted run: 16 chunks (8 videos x 2), 1 per shard, flipped codes too."""
    out = tmp_path_factory.mktemp("ref") / "codes"
    main(_args(setup, out, "--shard-size", "1", "--batch-size", "1", "--flip"))
    return out


def test_codes_match_the_tokenizer(setup, reference_run):
    ckpt, csv_path = setup
    codes = load_code_shards(reference_run)
    manifest = CodeManifest.load(reference_run)
    tok = LARPTokenizer.from_pretrained(ckpt).eval()
    assert manifest.codebook_hash == codes.codebook_hash == tok.codebook_hash()
    assert (codes.num_tokens, codes.codebook_size) == (tok.num_tokens, tok.codebook_size) == (32, 256)
    assert manifest.num_examples == len(codes) == 16 and manifest.num_index_skipped == 1  # broken.mp4
    assert len(manifest.shards) == 16 and manifest.larp_checkpoint == str(ckpt.resolve())
    recs = csv_records(csv_path)
    ds = ClipDataset(recs, num_frames=8, size=32, mode="chunks")
    clips = [ds[i] for i in range(len(ds))]
    video = torch.stack([c.video for c in clips])  # (16, 3, 8, 32, 32)
    assert torch.equal(codes.codes, tok.tokenize(video))
    assert torch.equal(codes.flip_codes, tok.tokenize(video.flip(-1)))
    assert codes.codes.dtype == torch.int64 and codes.labels.tolist() == [c.label for c in clips]
    assert codes.video_index.tolist() == [c.index for c in clips] and codes.chunk.tolist() == [0, 1] * 8
    assert codes.captions == [recs[c.index].caption for c in clips]
    assert codes.class_names[:4] == ["RedCircleMovingRight", "GreenSquareMovingLeft", "BlueTriangleMovingUp",
                                     "YellowCircleMovingDown"]
    assert Path(codes.video_paths[codes.video_index[5]]) == recs[clips[5].index].path
    header, shard = read_shard(reference_run / manifest.shards[3].file)
    assert (header.start, header.end, header.shard) == (3, 4, 3) and shard.codes.shape == (1, 32)


def _kill_after_first_shard(setup, out: Path) -> list[Path]:
    """Start an extraction in a child process and SIGKILL it as soon as its first shard appears."""
    cmd = [sys.executable, "-m", "tokenizer_training.extract_codes",
           *_args(setup, out, "--shard-size", "1", "--batch-size", "1", "--flip")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("codes-*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # a real kill, mid-run: no cleanup, no manifest
    proc.wait(timeout=30)
    return sorted(out.glob("codes-*.safetensors"))


def test_killed_run_resumes_to_identical_shards(setup, reference_run, tmp_path):
    for attempt in range(3):  # on a loaded machine the child may finish before the kill lands: try again
        out = tmp_path / f"codes{attempt}"
        done = _kill_after_first_shard(setup, out)
        if len(done) < 16:
            break
    assert 1 <= len(done) < 16, f"the kill should land mid-run ({len(done)} shards written)"
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        load_code_shards(out)
    # what else a crash can leave: a writer's temporary file, and a damaged copy of a shard
    (out / ".codes-00015-of-00016.safetensors.999.tmp").write_bytes(b"partial")
    (out / "codes-00015-of-00016.safetensors").write_bytes(b"\x00" * 10)
    before = {p.name: p.stat().st_mtime_ns for p in done}
    main(_args(setup, out, "--shard-size", "1", "--batch-size", "1", "--flip"))
    assert all((out / name).stat().st_mtime_ns == t for name, t in before.items())  # finished shards not redone
    assert _files(out) == _files(reference_run)  # byte-identical shards and manifest
    assert not list(out.glob(".*.tmp"))


def test_max_shards_stops_and_rerun_completes(setup, reference_run, tmp_path):
    out = tmp_path / "codes"
    main(_args(setup, out, "--shard-size", "1", "--batch-size", "1", "--flip", "--max-shards", "3"))
    assert len(list(out.glob("codes-*.safetensors"))) == 3 and not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="not written yet"):
        main(_args(setup, out, "--shard-size", "1", "--batch-size", "1", "--flip", "--finalize"))
    main(_args(setup, out, "--shard-size", "1", "--batch-size", "4", "--flip"))  # batch size does not matter
    assert _files(out) == _files(reference_run)


def test_ranks_share_the_work(setup, reference_run, tmp_path, monkeypatch):
    out = tmp_path / "codes"
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    main(_args(setup, out, "--shard-size", "1", "--batch-size", "2", "--flip"))
    assert sorted(int(p.name[6:11]) for p in out.glob("codes-*")) == [1, 4, 7, 10, 13]
    assert not (out / "manifest.json").exists()
    for rank in ("2", "0"):  # the last one to finish writes the manifest
        monkeypatch.setenv("RANK", rank)
        main(_args(setup, out, "--shard-size", "1", "--batch-size", "3", "--flip", "--num-workers", "2"))
    assert _files(out) == _files(reference_run)
    (out / "manifest.json").unlink()
    main(_args(setup, out, "--shard-size", "1", "--flip", "--finalize"))
    assert _files(out) == _files(reference_run)


def test_other_run_in_same_folder_refused(setup, reference_run, tmp_path):
    out = tmp_path / "codes"
    main(_args(setup, out, "--shard-size", "4"))
    with pytest.raises(ValueError, match="different extraction run"):
        main(_args(setup, out, "--shard-size", "4", "--mode", "random"))
    main(_args(setup, out, "--shard-size", "4", "--mode", "random", "--seed", "1", "--overwrite", "--dtype", "bf16"))
    codes = load_code_shards(out)
    manifest = CodeManifest.load(out)
    assert manifest.mode == "random" and len(codes) == 8 and codes.flip_codes is None
    assert codes.chunk.tolist() == [-1] * 8 and sum(s.num_skipped for s in manifest.shards) == 1  # broken.mp4


def test_caption_csv_and_folder_datasets(setup, tmp_path):
    ckpt, csv_path = setup
    recs = [r for r in csv_records(csv_path) if r.path.name != "broken.mp4"]
    caption_csv = tmp_path / "captions.csv"
    with open(caption_csv, "w", newline="") as f:
        csv.writer(f).writerows([["path", "caption"], *[[str(r.path), r.caption] for r in recs]])
    main(["--preset", "larp-tiny", "--caption-csv", str(caption_csv), "--out", str(tmp_path / "cap"),
          "--num-workers", "0", "--mode", "random"])
    codes = load_code_shards(tmp_path / "cap")
    assert codes.captions == [r.caption for r in recs] and codes.labels.tolist() == [-1] * 8
    main(["--preset", "larp-tiny", "--folder", str(csv_path.parent / "videos"), "--out", str(tmp_path / "dir"),
          "--num-workers", "0"])
    codes = load_code_shards(tmp_path / "dir")
    assert codes.class_names == sorted({r.class_name for r in recs}) and len(codes) == 16
    assert codes.codebook_hash == CodeManifest.load(tmp_path / "dir").codebook_hash
    assert codes.larp_checkpoint == "preset:larp-tiny:seed0"


def test_console_script_help():
    done = subprocess.run([sys.executable, "-m", "tokenizer_training.extract_codes", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "torchrun" in done.stdout and "--finalize" in done.stdout
