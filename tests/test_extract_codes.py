"""larp-extract-codes + larp_mllm.data.codes: shards, manifest, resume after a kill, ranks, dataset kinds."""
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
import torch.nn.functional as F

from larp_mllm import LARPTokenizer
from larp_mllm.data.codes import CodeManifest, load_code_shards, read_shard
from larp_mllm.data.records import csv_records
from larp_mllm.data.clips import ClipDataset
from larp_mllm.data.continuation import condition_clip
from larp_mllm.data.synthetic import make_synthetic_dataset
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
    return ["--larp-tokenizer", str(ckpt), "--csv", str(csv_path), "--output-dir", str(out), "--workers", "0", *extra]


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
    assert manifest.index_faults == manifest.data_faults == {"missing": 0, "unreadable": 1, "too_short": 0,
                                                              "wrong_size": 0}
    assert len(manifest.shards) == 16 and manifest.larp_checkpoint == str(ckpt.resolve())
    recs = csv_records(csv_path)
    ds = ClipDataset(recs, num_frames=8, size=32, mode="chunks")
    clips = [ds[i] for i in range(len(ds))]
    video = torch.stack([c.video for c in clips])  # (16, 3, 8, 32, 32)
    # the run coded one clip per batch, here all 16 go at once: other GEMM shapes, so the code affinities differ by
    # fp32 rounding and an argmax may differ where two codes are within that rounding of each other
    assert_codes_agree(codes.codes, tok.tokenize(video), _affinities(tok, video))
    assert_codes_agree(codes.flip_codes, tok.tokenize(video.flip(-1)), _affinities(tok, video.flip(-1)))
    assert codes.codes.dtype == torch.int64 and codes.labels.tolist() == [c.label for c in clips]
    assert codes.video_index.tolist() == [c.index for c in clips] and codes.chunk.tolist() == [0, 1] * 8
    assert codes.captions == [recs[c.index].caption for c in clips]
    assert codes.class_names[:4] == ["RedCircleMovingRight", "GreenSquareMovingLeft", "BlueTriangleMovingUp",
                                     "YellowCircleMovingDown"]
    assert Path(codes.video_paths[codes.video_index[5]]) == recs[clips[5].index].path
    header, shard = read_shard(reference_run / manifest.shards[3].file)
    assert (header.start, header.end, header.shard) == (3, 4, 3) and shard.codes.shape == (1, 32)


# Cosines between a clip's tokens and the codes, computed in batches of other sizes, may differ by fp32 rounding
# (depending on the CPU's kernels; a few roundings of sums of a few hundred terms of size ~1, ~1e-6 at most):
# 1e-5 leaves room. The closest top-2 cosines of these clips are ~2e-4 apart.
COSINE_TOL = 1e-5


@torch.no_grad()
def _affinities(tok: LARPTokenizer, video: torch.Tensor) -> torch.Tensor:
    """The cosines (B, N, K) between the tokens of `video` and the codes, whose argmax `tokenize` returns."""
    return F.normalize(tok.bottleneck.in_linear(tok.encode(video)).float(), dim=-1) @ tok.codebook().t()


def assert_codes_agree(got: torch.Tensor, want: torch.Tensor, cosines: torch.Tensor) -> None:
    """Codes (B, N) from two computations of the same argmax agree, except where both are within COSINE_TOL of the
    best cosine (a near tie, which rounding may break either way); `cosines` (B, N, K) from a third computation."""
    assert got.shape == want.shape == cosines.shape[:-1]
    best = cosines.max(-1).values

    def near_best(codes: torch.Tensor) -> torch.Tensor:
        return best - cosines.gather(-1, codes[..., None])[..., 0] <= COSINE_TOL

    differ = got != want
    assert (near_best(got) & near_best(want))[differ].all(), (
        f"{int(differ.sum())} codes differ, at (example, token) {differ.nonzero().tolist()}, not all at near ties")


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
    (out / ".codes-00015-of-00016.safetensors.tmp-999-0badc0de.safetensors").write_bytes(b"partial")
    (out / "codes-00015-of-00016.safetensors").write_bytes(b"\x00" * 10)
    before = {p.name: p.stat().st_mtime_ns for p in done}
    main(_args(setup, out, "--shard-size", "1", "--batch-size", "1", "--flip"))
    assert all((out / name).stat().st_mtime_ns == t for name, t in before.items())  # finished shards not redone
    assert _files(out) == _files(reference_run)  # byte-identical shards and manifest (the same batches of one clip)
    assert not list(out.glob(".*.tmp-*"))


def test_max_shards_stops_and_rerun_completes(setup, reference_run, tmp_path):
    out = tmp_path / "codes"
    main(_args(setup, out, "--shard-size", "1", "--batch-size", "1", "--flip", "--max-shards", "3"))
    assert len(list(out.glob("codes-*.safetensors"))) == 3 and not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="not written yet"):
        main(_args(setup, out, "--shard-size", "1", "--batch-size", "1", "--flip", "--finalize"))
    main(_args(setup, out, "--shard-size", "1", "--batch-size", "4", "--flip"))  # batch size does not matter
    assert _files(out) == _files(reference_run)  # batches never cross shards of 1 clip: the same computation


def test_ranks_share_the_work(setup, reference_run, tmp_path, monkeypatch):
    out = tmp_path / "codes"
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    main(_args(setup, out, "--shard-size", "1", "--batch-size", "2", "--flip"))
    assert sorted(int(p.name[6:11]) for p in out.glob("codes-*")) == [1, 4, 7, 10, 13]
    assert not (out / "manifest.json").exists()
    for rank in ("2", "0"):  # the last one to finish writes the manifest
        monkeypatch.setenv("RANK", rank)
        main(_args(setup, out, "--shard-size", "1", "--batch-size", "3", "--flip", "--workers", "2"))
    assert _files(out) == _files(reference_run)  # batches of the 1 clip of a shard: the reference's computation
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
    assert manifest.data_faults == {"missing": 0, "unreadable": 1, "too_short": 0, "wrong_size": 0}
    assert [s.faults for s in manifest.shards if s.num_skipped] == [{"unreadable": 1}]


def test_condition_codes(setup, reference_run, tmp_path):
    """--condition-frames 5 stores, beside the codes of each clip, the codes of its condition clip (first 5 frames,
    the 5th repeated): the tokenizer's own codes of condition_clip(clip), in the same computation (batches of one)."""
    ckpt, csv_path = setup
    out = tmp_path / "codes"
    main(_args(setup, out, "--shard-size", "4", "--batch-size", "1", "--flip"))
    with pytest.raises(ValueError, match="different extraction run"):  # the run key covers the condition
        main(_args(setup, out, "--shard-size", "4", "--batch-size", "1", "--flip", "--condition-frames", "5"))
    main(_args(setup, out, "--shard-size", "4", "--batch-size", "1", "--flip", "--condition-frames", "5",
               "--overwrite"))
    codes, reference = load_code_shards(out), load_code_shards(reference_run)
    assert CodeManifest.load(out).condition_frames == codes.condition_frames == 5
    assert CodeManifest.load(out).run_key != CodeManifest.load(reference_run).run_key
    assert reference.cond_codes is None and reference.condition_frames == 0
    # the codes of the clips themselves are those of a run without the flag (the same batches of one clip)
    assert torch.equal(codes.codes, reference.codes) and torch.equal(codes.flip_codes, reference.flip_codes)
    tok = LARPTokenizer.from_pretrained(ckpt).eval()
    ds = ClipDataset(csv_records(csv_path), num_frames=8, size=32, mode="chunks")
    with torch.inference_mode():
        want = torch.cat([tok.tokenize(condition_clip(ds[i].video[None], 5)) for i in range(len(ds))])  # (16, 32)
    assert codes.cond_codes.shape == (16, 32) and codes.cond_codes.dtype == torch.int64
    assert torch.equal(codes.cond_codes, want)
    # the condition (frames 6-8 replaced) is another clip: the random-init tokenizer still tells them apart in places
    assert (codes.cond_codes != codes.codes).any()
    with pytest.raises(SystemExit):
        main(_args(setup, tmp_path / "neg", "--condition-frames", "-1"))
    with pytest.raises(ValueError, match="--condition-frames must be between 0 and the clip length 8, got 9"):
        main(_args(setup, tmp_path / "long", "--condition-frames", "9"))


def test_caption_csv_and_folder_datasets(setup, tmp_path):
    ckpt, csv_path = setup
    recs = [r for r in csv_records(csv_path) if r.path.name != "broken.mp4"]
    caption_csv = tmp_path / "captions.csv"
    with open(caption_csv, "w", newline="") as f:
        csv.writer(f).writerows([["path", "caption"], *[[str(r.path), r.caption] for r in recs]])
    main(["--preset", "larp-tiny", "--caption-csv", str(caption_csv), "--output-dir", str(tmp_path / "cap"),
          "--workers", "0", "--mode", "random"])
    codes = load_code_shards(tmp_path / "cap")
    assert codes.captions == [r.caption for r in recs] and codes.labels.tolist() == [-1] * 8
    main(["--preset", "larp-tiny", "--folder", str(csv_path.parent / "videos"), "--output-dir", str(tmp_path / "dir"),
          "--workers", "0"])
    codes = load_code_shards(tmp_path / "dir")
    assert codes.class_names == sorted({r.class_name for r in recs}) and len(codes) == 16
    assert codes.codebook_hash == CodeManifest.load(tmp_path / "dir").codebook_hash
    assert codes.larp_checkpoint == "preset:larp-tiny:seed0"


def test_console_script_help():
    done = subprocess.run([sys.executable, "-m", "tokenizer_training.extract_codes", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "torchrun" in done.stdout and "--finalize" in done.stdout
