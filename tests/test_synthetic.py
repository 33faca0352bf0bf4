"""larp_mllm.data.synthetic: the labelled synthetic set (CLI, CSV, determinism, the motion really is the class)."""
from __future__ import annotations

import csv
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from larp_mllm.data.records import csv_records
from larp_mllm.data.make_synthetic import main
from larp_mllm.data.synthetic import COLORS, MAX_CLASSES, class_specs, make_synthetic_dataset, render_clip
from larp_mllm.data.video_io import read_video


def test_class_list_prefixes_are_diverse():
    specs = class_specs(MAX_CLASSES)
    assert len({s.name for s in specs}) == MAX_CLASSES == 72
    assert specs[0].name == "RedCircleMovingRight"
    first4 = specs[:4]
    for attr in ("shape", "direction"):  # the first classes already differ in every attribute
        assert len({getattr(s, attr) for s in first4[:3]}) == 3
    assert len({s.color for s in first4}) == 4 and len({s.direction for s in first4}) == 4
    assert [s.name for s in class_specs(5)] == [s.name for s in specs[:5]]
    assert all(re.fullmatch(r"([A-Z][a-z]+)+Moving(Right|Left|Up|Down)", s.name) for s in specs)
    with pytest.raises(ValueError):
        class_specs(MAX_CLASSES + 1)


def _centroid(frame: np.ndarray, color: tuple[float, float, float]) -> np.ndarray:
    """Mean (x, y) of the pixels within 0.1 of the object's colour; frame (H, W, 3)."""
    ys, xs = np.nonzero(np.abs(frame - np.asarray(color)).max(-1) < 0.1)
    assert len(xs) > 10
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("k", range(8))
def test_objects_move_in_the_class_direction(k):
    spec = class_specs(8)[k]
    step = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[spec.direction]
    for j in range(3):
        video, texture = render_clip(spec, np.random.default_rng([1, k, j]), frames=16, size=64)
        assert video.shape == (3, 16, 64, 64) and 0 <= video.min() and video.max() <= 1
        frames = video.permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
        moved = _centroid(frames[-1], COLORS[spec.color]) - _centroid(frames[0], COLORS[spec.color])
        along, across = moved @ np.array(step), abs(moved @ np.array(step[::-1]))
        assert along > 8 and across < 3, (spec.name, texture, moved)


def test_plain_background_and_large_objects():
    """The demo's style: a smooth background (no texture edges) and shapes about twice the default radius."""
    spec = class_specs(4)[0]
    areas = {}
    for size in ("small", "large"):
        areas[size] = []
        for j in range(6):
            video, texture = render_clip(spec, np.random.default_rng([2, j]), frames=4, size=64,
                                         background="plain", object_size=size)
            assert texture == "plain"
            frame = video[:, 0].permute(1, 2, 0).numpy()  # (H, W, 3)
            obj = np.abs(frame - np.asarray(COLORS[spec.color])).max(-1) < 0.1
            areas[size].append(obj.mean())
            background = frame[~obj]
            # neighbouring background pixels differ by a gradient step at most (textures jump by >= 0.1)
            dx = np.abs(np.diff(frame, axis=1)).max(-1)[~obj[:, 1:] & ~obj[:, :-1]]
            assert dx.max() < 0.02 and background.std() < 0.15
    assert np.mean(areas["large"]) > 2.5 * np.mean(areas["small"])
    with pytest.raises(ValueError, match="background"):
        render_clip(spec, np.random.default_rng(0), background="stars")
    with pytest.raises(ValueError, match="object_size"):
        render_clip(spec, np.random.default_rng(0), object_size="huge")


def test_make_dataset_csv_files_and_determinism(tmp_path):
    csv_path = make_synthetic_dataset(tmp_path / "a", classes=4, per_class=3, seed=11, frames=8, size=32)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "path", "action", "label", "caption"]
    assert len(rows) == 12 and [int(r["id"]) for r in rows] == list(range(12))
    for r in rows:
        name = class_specs(4)[int(r["label"])].name
        assert r["action"] == name
        assert re.fullmatch(r"a (\w+) (circle|square|triangle) moving (right|left|up|down) over a "
                            r"(striped|checkered|dotted|cloudy) background", r["caption"])
        assert name.lower().startswith(r["caption"].split()[1])  # caption colour = class colour
    recs = csv_records(csv_path)
    assert [r.label for r in recs] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    videos = [read_video(r.path) for r in recs]
    assert all(v.shape == (3, 8, 32, 32) for v in videos)
    assert len({r["caption"].split(" over ")[1] for r in rows}) > 1  # backgrounds vary per video
    again = make_synthetic_dataset(tmp_path / "b", classes=4, per_class=3, seed=11, frames=8, size=32)
    assert again.read_text() == csv_path.read_text()
    # The rendered clips are identical (test_render_is_deterministic). FFmpeg's RGB->YUV conversion is not always
    # bit-identical between runs (SIMD paths), and x264's decisions can then move a few pixels by ~13 levels, so
    # the decoded files agree closely but not always exactly.
    for v, r in zip(videos, csv_records(again)):
        diff = (v - read_video(r.path)).abs()
        assert diff.mean() < 1 / 255 and diff.max() < 32 / 255
    other = csv_records(make_synthetic_dataset(tmp_path / "c", classes=4, per_class=3, seed=12, frames=8, size=32))
    assert not torch.equal(videos[0], read_video(other[0].path))


def test_cli(tmp_path):
    main(["--output-dir", str(tmp_path / "x"), "--classes", "2", "--per-class", "2", "--frames", "4", "--size", "16"])
    assert len(csv_records(tmp_path / "x" / "synthetic.csv")) == 4
    done = subprocess.run([sys.executable, "-m", "larp_mllm.data.make_synthetic", "--output-dir", str(tmp_path / "y"), "--classes",
                           "1", "--per-class", "1", "--frames", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("synthetic.csv")
    bad = subprocess.run([sys.executable, "-m", "larp_mllm.data.make_synthetic", "--output-dir", str(tmp_path / "z"), "--classes",
                          "99", "--per-class", "1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "between 1 and 72" in bad.stderr


def test_render_is_deterministic():
    spec = class_specs(4)[2]
    a, ta = render_clip(spec, np.random.default_rng([5, 2, 1]), frames=8, size=32)
    b, tb = render_clip(spec, np.random.default_rng([5, 2, 1]), frames=8, size=32)
    c, _ = render_clip(spec, np.random.default_rng([5, 2, 2]), frames=8, size=32)
    assert torch.equal(a, b) and ta == tb and not torch.equal(a, c)
