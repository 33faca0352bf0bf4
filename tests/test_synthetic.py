"""larp_mllm.data.synthetic: the labelled synthetic set (CLI, CSV, determinism, the motion really is the class)."""
from __future__ import annotations

import csv
import itertools
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from larp_mllm.data.records import csv_records
from larp_mllm.data.make_synthetic import main
from larp_mllm.data.synthetic import (COLORS, DIRECTIONS, HELD_OUT_NAME, MAX_CLASSES, SHAPES, ClassSpec, class_specs,
                                      composition_split, load_composition_split, make_synthetic_dataset, render_clip,
                                      unseen_pairs)
from larp_mllm.data.video_io import read_video
from larp_mllm.eval.attributes import attribute_accuracy, read_attributes


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


# ----------------------------------------------------------------------------------------------------------------------
# Composition split: held-out combinations of seen attributes
# ----------------------------------------------------------------------------------------------------------------------
THREE = (["red", "green", "blue"], list(SHAPES), list(DIRECTIONS))  # 36 combinations


def _attrs(specs: list[ClassSpec]) -> set[tuple[str, str, str]]:
    return {(s.color, s.shape, s.direction) for s in specs}


def _product(lists: tuple[list[str], list[str], list[str]]) -> list[ClassSpec]:
    return [ClassSpec(*c) for c in itertools.product(*lists)]


@pytest.mark.parametrize("lists,hold_out,seed,pairs_kept", [
    (THREE, 6, 0, True),
    (THREE, 12, 5, True),
    ((list(COLORS), list(SHAPES), list(DIRECTIONS)), 24, 3, True),
    ((["red", "blue"], ["circle", "square"], ["right", "up"]), 2, 1, True),
    (THREE, 32, 2, False),  # the most: 4 seen combinations, one per direction, still show every value
    ((["red", "green"], ["circle", "square"], ["right"]), 2, 0, False),  # one direction: (colour, shape) pairs can't
])
def test_composition_split_holds_out_combinations_not_values(lists, hold_out, seed, pairs_kept):
    seen, held = composition_split(*lists, hold_out=hold_out, seed=seed)
    product = list(itertools.product(*lists))
    assert len(held) == hold_out and len(seen) + len(held) == len(product)
    assert not _attrs(seen) & _attrs(held) and _attrs(seen) | _attrs(held) == set(product)
    assert [(s.color, s.shape, s.direction) for s in seen] == [c for c in product if c in _attrs(seen)]  # in order
    for h in held:  # every value of a held-out combination is seen
        assert any(s.color == h.color for s in seen) and any(s.shape == h.shape for s in seen)
        assert any(s.direction == h.direction for s in seen)
    missing = unseen_pairs(seen, held)
    if pairs_kept:
        assert missing == []
    else:
        assert missing  # where a pair cannot be kept, unseen_pairs says so
    if len(lists[2]) == 1:  # only the (colour, shape) pairs are lost: the direction pairs stay seen
        assert set(missing) == {(h.color, h.shape) for h in held}
    assert composition_split(*lists, hold_out=hold_out, seed=seed) == (seen, held)  # deterministic


def test_composition_split_seed_and_errors():
    held = {tuple(s.name for s in composition_split(*THREE, hold_out=6, seed=k)[1]) for k in range(4)}
    assert len(held) == 4  # the seed picks the split
    assert composition_split(*THREE, hold_out=0) == (_product(THREE), [])
    for bad, match in [(dict(hold_out=33), r"hold_out must be between 0 and 32 for 3 colours x 3 shapes x 4 "
                                           r"directions \(36 combinations, of which at least 4 stay seen"),
                       (dict(hold_out=-1), "between 0 and 32"),
                       (dict(colors=["red", "pink"]), r"distinct colours from \['red'"),
                       (dict(shapes=["circle", "circle"]), "distinct shapes"),
                       (dict(directions=[]), "non-empty list of distinct directions")]:
        kwargs = dict(colors=THREE[0], shapes=THREE[1], directions=THREE[2], hold_out=6) | bad
        with pytest.raises(ValueError, match=match):
            composition_split(**kwargs)
    with pytest.raises(ValueError, match=r"unknown colour 'pink': expected one of \['red'"):
        ClassSpec("pink", "circle", "right")


def test_composition_sets_render_and_read(tmp_path):
    """The seen set (labels index the seen classes) and an evaluation set of the held-out combinations, each with
    held_out.json; the pixel attribute reader reads every held-out clip as its combination."""
    lists = (["red", "blue"], ["circle", "square", "triangle"], ["right", "up"])
    seen, held = composition_split(*lists, hold_out=3, seed=0)
    train_csv = make_synthetic_dataset(tmp_path / "train", seen, 1, seed=0, frames=8, size=32, held_out=held)
    eval_csv = make_synthetic_dataset(tmp_path / "eval", seen, 2, seed=1, frames=8, size=32, held_out=held,
                                      only_held_out=True)
    for path, specs, per_class in ((train_csv, seen, 1), (eval_csv, held, 2)):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["action"] for r in rows] == [s.name for s in specs for _ in range(per_class)]
        assert [int(r["label"]) for r in rows] == [k for k in range(len(specs)) for _ in range(per_class)]
        for r in rows:
            s = specs[int(r["label"])]
            assert r["caption"].startswith(f"a {s.color} {s.shape} moving {s.direction} over a ")
    for folder, rendered in (("train", "seen"), ("eval", "held_out")):
        raw = json.loads((tmp_path / folder / HELD_OUT_NAME).read_text())
        assert raw["rendered"] == rendered
        assert raw["held_out"] == [{"name": s.name, "color": s.color, "shape": s.shape, "direction": s.direction}
                                   for s in held]
        assert [e["name"] for e in raw["seen"]] == [s.name for s in seen] and raw["unseen_pairs"] == []
        assert load_composition_split(tmp_path / folder) == (seen, held)
    records = csv_records(eval_csv)
    read = [read_attributes(read_video(r.path)) for r in records]  # through the H.264 files
    acc = attribute_accuracy(read, [held[r.label] for r in records])
    assert acc.all_three == 1.0 and acc.count == 6, acc
    make_synthetic_dataset(tmp_path / "train", 1, 1, frames=2, size=16)  # a plain set: the old split is gone
    assert not (tmp_path / "train" / HELD_OUT_NAME).exists()
    with pytest.raises(ValueError, match=f"expected a {HELD_OUT_NAME}"):
        load_composition_split(tmp_path / "train")


def test_make_dataset_refuses_bad_class_lists(tmp_path):
    seen, held = composition_split(["red"], ["circle", "square"], ["right", "up"], hold_out=1)
    for kwargs, match in [(dict(classes=seen, held_out=[seen[0]]), "disjoint from held_out"),
                          (dict(classes=[], held_out=held), "non-empty class list"),
                          (dict(classes=seen + seen[:1]), "distinct ClassSpec"),
                          (dict(classes=["RedCircleMovingRight"]), "distinct ClassSpec"),
                          (dict(classes=seen, only_held_out=True), "needs a non-empty held_out")]:
        with pytest.raises(ValueError, match=match):
            make_synthetic_dataset(tmp_path, per_class=1, frames=2, size=16, **kwargs)
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_composition_split(tmp_path, capsys):
    flags = ["--per-class", "1", "--frames", "2", "--size", "16", "--colors", "red,blue", "--shapes", "circle,square",
             "--directions", "right,up", "--hold-out", "2", "--split-seed", "4"]
    seen, held = composition_split(["red", "blue"], ["circle", "square"], ["right", "up"], hold_out=2, seed=4)
    main(["--output-dir", str(tmp_path / "train"), *flags])
    main(["--output-dir", str(tmp_path / "eval"), "--seed", "1", "--only-held-out", *flags])
    assert [r.class_name for r in csv_records(tmp_path / "train" / "synthetic.csv")] == [s.name for s in seen]
    assert [r.class_name for r in csv_records(tmp_path / "eval" / "synthetic.csv")] == [s.name for s in held]
    assert load_composition_split(tmp_path / "eval" / HELD_OUT_NAME) == (seen, held)
    main(["--output-dir", str(tmp_path / "all"), "--per-class", "1", "--frames", "2", "--size", "16", "--shapes",
          "circle", "--directions", "left"])  # lists alone: every colour, nothing held out
    assert [r.class_name for r in csv_records(tmp_path / "all" / "synthetic.csv")] == [
        f"{c.title()}CircleMovingLeft" for c in COLORS]
    capsys.readouterr()
    for bad, match in [(["--classes", "2", "--hold-out", "1"], "does not combine with"),
                       ([], "expected --classes N, or attribute lists"),
                       (["--colors", "red", "--hold-out", "9"], "between 0 and 8"),
                       (["--colors", "red,pink"], "distinct colours")]:
        with pytest.raises(SystemExit):
            main(["--output-dir", str(tmp_path / "bad"), "--per-class", "1", *bad])
        assert match in capsys.readouterr().err
