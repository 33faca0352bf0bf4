"""A synthetic labelled video set: coloured shapes moving in a direction over textured backgrounds.

    make_synthetic_dataset("runs/synthetic", classes=8, per_class=20, seed=0, frames=16, size=64)
    larp-make-synthetic --output-dir runs/synthetic --classes 8 --per-class 20     # the same from the shell

writes ``videos/<Class>/<Class>_0000.mp4`` (H.264) and ``synthetic.csv`` with the reference columns
``id,path,action,label`` plus ``caption`` (paths relative to the CSV's folder). A class is (colour, shape, direction),
e.g. "RedCircleMovingRight"; a caption also names the background, e.g. "a red circle moving right over a striped
background". Each video draws its own start position, speed, size, colour jitter and background (texture kind,
period, orientation, tint), so the class is learnable but not trivial. Everything is a function of ``--seed``. The
class list is ordered so that any prefix differs in as many attributes as possible (class 0..3 already differ in
colour, shape and direction).

Composition split (does a model compose attributes it has seen, in a combination it has not?):

    seen, held_out = composition_split(["red", "green", "blue"], SHAPES, DIRECTIONS, hold_out=6, seed=0)
    make_synthetic_dataset("runs/comp/train", seen, 20, held_out=held_out)            # + held_out.json
    make_synthetic_dataset("runs/comp/eval", seen, 4, seed=1, held_out=held_out, only_held_out=True)
    larp-make-synthetic --output-dir runs/comp/train --per-class 20 --colors red,green,blue --hold-out 6
    larp-make-synthetic --output-dir runs/comp/eval --per-class 4 --seed 1 --colors red,green,blue --hold-out 6 \\
        --only-held-out

Every held-out combination is new as a whole, while each of its colour, shape and direction (and, wherever the
split can keep them, each of its attribute pairs) appears in the seen classes. ``held_out.json`` beside the CSV
lists both sides of the split (``load_composition_split``).
"""
from __future__ import annotations

import csv
import itertools
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from larp_mllm.runtime.files import atomic_write, atomic_write_json
from larp_mllm.data.video_write import write_video

COLORS = {
    "red": (0.86, 0.16, 0.16), "green": (0.16, 0.72, 0.24), "blue": (0.2, 0.32, 0.92),
    "yellow": (0.94, 0.84, 0.16), "magenta": (0.84, 0.2, 0.8), "cyan": (0.16, 0.8, 0.84),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy)
TEXTURES = ("striped", "checkered", "dotted", "cloudy")
BACKGROUNDS = ("textured", "plain")  # textured: one of TEXTURES per clip; plain: a tint with a soft gradient
OBJECT_SIZES = {"small": (0.1, 0.18), "large": (0.2, 0.3)}  # shape radius range, as a fraction of the frame size
MAX_CLASSES = len(COLORS) * len(SHAPES) * len(DIRECTIONS)
HELD_OUT_NAME = "held_out.json"  # the composition split, beside synthetic.csv


@dataclass(frozen=True)
class ClassSpec:
    """One class: what moves and where to."""

    color: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        for value, known, what in ((self.color, COLORS, "colour"), (self.shape, SHAPES, "shape"),
                                   (self.direction, DIRECTIONS, "direction")):
            if value not in known:
                raise ValueError(f"unknown {what} {value!r}: expected one of {list(known)}")

    @property
    def name(self) -> str:
        """CamelCase class name, e.g. "RedCircleMovingRight"."""
        return f"{self.color.title()}{self.shape.title()}Moving{self.direction.title()}"

    def caption(self, texture: str) -> str:
        return f"a {self.color} {self.shape} moving {self.direction} over a {texture} background"


def class_specs(num_classes: int) -> list[ClassSpec]:
    """The first ``num_classes`` classes: greedily pick the combination whose attributes (then attribute pairs) were
    used least so far; ties go to the first in (colour, shape, direction) order."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"--classes must be between 1 and {MAX_CLASSES}, got {num_classes}")
    candidates = list(itertools.product(COLORS, SHAPES, DIRECTIONS))
    used: dict[object, int] = {}  # attribute or attribute pair -> times used
    chosen: list[ClassSpec] = []
    for _ in range(num_classes):
        best = min(candidates, key=lambda c: (sum(used.get(a, 0) for a in c),
                                              sum(used.get(p, 0) for p in itertools.combinations(c, 2))))
        candidates.remove(best)
        for a in (*best, *itertools.combinations(best, 2)):
            used[a] = used.get(a, 0) + 1
        chosen.append(ClassSpec(*best))
    return chosen


_Combo = tuple[str, str, str]  # (colour, shape, direction)


def _pairs(combo: _Combo) -> tuple[tuple[int, str, str], ...]:
    """The three attribute pairs of a combination, tagged 0 = (colour, shape), 1 = (colour, direction),
    2 = (shape, direction)."""
    c, s, d = combo
    return (0, c, s), (1, c, d), (2, s, d)


def _check_values(values: Sequence[str], known: Sequence[str], what: str) -> list[str]:
    values = list(values)
    if not values or len(set(values)) != len(values) or any(v not in known for v in values):
        raise ValueError(f"expected a non-empty list of distinct {what} from {list(known)}, got {values}")
    return values


def composition_split(colors: Sequence[str], shapes: Sequence[str], directions: Sequence[str], hold_out: int,
                      seed: int = 0) -> tuple[list[ClassSpec], list[ClassSpec]]:
    """Split the combinations ``colors x shapes x directions`` into (seen, held_out), both in product order.

    What is held out is the combination, not a value: every colour, shape and direction of a held-out combination
    appears in a seen one (a seeded "core" of max(len) seen combinations covers every value), and each of its three
    attribute pairs too wherever the greedy choice can keep it so: each step holds out the candidate that leaves the
    fewest of its pairs unseen, then the one whose values and pairs are held out least so far, then the first in a
    seeded order. Up to about half the combinations every pair stays seen; close to the maximum some cannot
    (``unseen_pairs`` lists them). Deterministic in ``seed``. ValueError for unknown or repeated values, or
    ``hold_out`` outside [0, N - max(len)] (N combinations).
    """
    lists = (_check_values(colors, list(COLORS), "colours"), _check_values(shapes, SHAPES, "shapes"),
             _check_values(directions, list(DIRECTIONS), "directions"))
    combos: list[_Combo] = list(itertools.product(*lists))
    widest = max(len(v) for v in lists)
    if not 0 <= hold_out <= len(combos) - widest:
        raise ValueError(
            f"hold_out must be between 0 and {len(combos) - widest} for {len(lists[0])} colours x {len(lists[1])} "
            f"shapes x {len(lists[2])} directions ({len(combos)} combinations, of which at least {widest} stay seen "
            f"so that every value is seen), got {hold_out}")
    rng = np.random.default_rng(seed)
    shuffled = [[v[i] for i in rng.permutation(len(v))] for v in lists]
    core = {tuple(v[i % len(v)] for v in shuffled) for i in range(widest)}  # every value in one seen combination
    candidates = [combos[i] for i in rng.permutation(len(combos)) if combos[i] not in core]
    seen_count = Counter(p for c in combos for p in _pairs(c))  # pair -> seen combinations holding it
    load: dict[object, int] = {}  # value or pair -> held-out combinations holding it
    held: set[_Combo] = set()
    for _ in range(hold_out):
        best = min(candidates, key=lambda c: (sum(seen_count[p] <= 1 for p in _pairs(c)),
                                              sum(load.get(v, 0) for v in c), sum(load.get(p, 0) for p in _pairs(c))))
        candidates.remove(best)
        held.add(best)
        for p in _pairs(best):
            seen_count[p] -= 1
        for key in (*best, *_pairs(best)):
            load[key] = load.get(key, 0) + 1
    return [ClassSpec(*c) for c in combos if c not in held], [ClassSpec(*c) for c in combos if c in held]


def unseen_pairs(seen: Sequence[ClassSpec], held_out: Sequence[ClassSpec]) -> list[tuple[str, str]]:
    """The attribute pairs ((colour, shape), (colour, direction) or (shape, direction)) of held-out classes that no
    seen class has, in order of first appearance."""
    kept = {p for s in seen for p in _pairs((s.color, s.shape, s.direction))}
    missing = [p for h in held_out for p in _pairs((h.color, h.shape, h.direction)) if p not in kept]
    return [(a, b) for _, a, b in dict.fromkeys(missing)]


def _spec_json(spec: ClassSpec) -> dict[str, str]:
    return {"name": spec.name, "color": spec.color, "shape": spec.shape, "direction": spec.direction}


def load_composition_split(path: str | os.PathLike) -> tuple[list[ClassSpec], list[ClassSpec]]:
    """(seen, held_out) from a ``held_out.json`` (or the folder holding it) written by ``make_synthetic_dataset``."""
    path = Path(path)
    path = path / HELD_OUT_NAME if path.is_dir() else path
    try:
        raw = json.loads(path.read_text())
        return [ClassSpec(s["color"], s["shape"], s["direction"]) for s in raw["seen"]], \
            [ClassSpec(s["color"], s["shape"], s["direction"]) for s in raw["held_out"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"expected a {HELD_OUT_NAME} written by make_synthetic_dataset at {path} (lists 'seen' and "
                         f"'held_out' of {{color, shape, direction}}): {type(err).__name__}: {err}") from None


def _background(rng: np.random.Generator, size: int, texture: str) -> np.ndarray:
    """A static textured background, float (size, size, 3) in [0, 1], dim and low-saturation."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if texture == "striped":
        angle = rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])
        period = rng.uniform(0.08, 0.2) * size
        pattern = (np.cos(angle) * xx + np.sin(angle) * yy) % period < period / 2
    elif texture == "checkered":
        cell = max(2, int(rng.uniform(0.06, 0.16) * size))
        pattern = ((xx // cell) + (yy // cell)) % 2 == 0
    elif texture == "dotted":
        gap = rng.uniform(0.1, 0.18) * size
        radius = gap * rng.uniform(0.15, 0.3)
        pattern = ((xx % gap) - gap / 2) ** 2 + ((yy % gap) - gap / 2) ** 2 < radius**2
    elif texture == "plain":  # a soft linear gradient
        angle = rng.uniform(0, 2 * np.pi)
        pattern = 0.5 + 0.5 * (np.cos(angle) * xx + np.sin(angle) * yy) / (size * np.sqrt(2))
    else:  # cloudy: smooth noise, bilinear upsample of a coarse grid
        coarse = torch.from_numpy(rng.random((1, 1, 5, 5), dtype=np.float32))
        up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        pattern = up[0, 0].numpy()
    low, high = rng.uniform(0.1, 0.3), rng.uniform(0.4, 0.6)
    tint = 1.0 + rng.uniform(-0.15, 0.15, size=3)  # low-saturation colour cast
    gray = low + (high - low) * np.asarray(pattern, dtype=np.float32)
    return np.clip(gray[..., None] * tint, 0, 1).astype(np.float32)


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
    if shape == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    # triangle pointing up: inside the three half-planes
    top, bottom = cy - r, cy + r * 0.8
    half_width = (yy - top) / (bottom - top) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_width)


def render_clip(
    spec: ClassSpec, rng: np.random.Generator, frames: int = 16, size: int = 64, background: str = "textured",
    object_size: str = "small",
) -> tuple[torch.Tensor, str]:
    """One video of ``spec``: float (3, frames, size, size) in [0, 1], and the background's texture name."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    if object_size not in OBJECT_SIZES:
        raise ValueError(f"object_size must be one of {sorted(OBJECT_SIZES)}, got {object_size!r}")
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))] if background == "textured" else "plain"
    backdrop = _background(rng, size, texture)  # (size, size, 3)
    r = rng.uniform(*OBJECT_SIZES[object_size]) * size
    dx, dy = DIRECTIONS[spec.direction]
    room = size - 2 * r  # the centre stays in [r, size - r] on the motion axis
    speed = min(rng.uniform(0.025, 0.05) * size, 0.9 * room / max(frames - 1, 1))  # pixels per frame
    travel = speed * (frames - 1)
    along = r + rng.uniform(0, room - travel)  # start on the motion axis (measured along +x or +y)
    across = rng.uniform(r, size - r)
    if dx < 0 or dy < 0:
        along = size - along
    color = np.clip(np.asarray(COLORS[spec.color]) + rng.uniform(-0.06, 0.06, size=3), 0, 1).astype(np.float32)
    video = np.empty((frames, size, size, 3), dtype=np.float32)
    for t in range(frames):
        pos = along + speed * t * (dx + dy)
        cx, cy = (pos, across) if dx != 0 else (across, pos)
        frame = backdrop.copy()
        frame[_shape_mask(spec.shape, size, cx, cy, r)] = color
        video[t] = frame
    return torch.from_numpy(video).permute(3, 0, 1, 2).contiguous(), texture  # (3, frames, size, size)


def make_synthetic_dataset(
    out: str | os.PathLike, classes: int | Sequence[ClassSpec], per_class: int, seed: int = 0, frames: int = 16,
    size: int = 64, fps: float = 8, background: str = "textured", object_size: str = "small", *,
    held_out: Sequence[ClassSpec] = (), only_held_out: bool = False,
) -> Path:
    """Write ``len(classes) * per_class`` mp4 files under ``out/videos`` and ``out/synthetic.csv``; return the CSV path.

    classes: a number (the first ``class_specs(classes)``) or an explicit class list; labels index it in order.
    held_out: combinations held out of ``classes`` (``composition_split``); when given, ``out/held_out.json`` lists
    both sides of the split, and ``only_held_out=True`` renders the held-out classes instead (labels then index
    ``held_out``; use another ``seed`` than the seen set's for an evaluation set).
    ``background="plain"`` and ``object_size="large"`` make a set a tiny tokenizer learns in CPU minutes (the demo's).
    """
    if per_class < 1 or frames < 1 or size < 8:
        raise ValueError(f"need per_class >= 1, frames >= 1, size >= 8; got {per_class}, {frames}, {size}")
    seen = class_specs(classes) if isinstance(classes, int) else list(classes)
    held_out = list(held_out)
    for what, specs in (("classes", seen), ("held_out", held_out)):
        if not all(isinstance(s, ClassSpec) for s in specs) or len(set(specs)) != len(specs):
            raise ValueError(f"expected {what} as distinct ClassSpec, got {specs}")
    if not seen or set(seen) & set(held_out):
        raise ValueError(f"expected a non-empty class list disjoint from held_out; classes {[s.name for s in seen]}, "
                         f"held out {[s.name for s in held_out]}")
    if only_held_out and not held_out:
        raise ValueError("only_held_out=True needs a non-empty held_out list")
    out = Path(out)
    rows = []
    for label, spec in enumerate(held_out if only_held_out else seen):
        for j in range(per_class):
            rng = np.random.default_rng([seed, label, j])
            video, texture = render_clip(spec, rng, frames, size, background, object_size)
            rel = Path("videos") / spec.name / f"{spec.name}_{j:04d}.mp4"
            write_video(video, out / rel, fps=fps)
            rows.append((len(rows), rel.as_posix(), spec.name, label, spec.caption(texture)))
    if held_out:
        split = {"rendered": "held_out" if only_held_out else "seen", "held_out": [_spec_json(s) for s in held_out],
                 "seen": [_spec_json(s) for s in seen], "unseen_pairs": unseen_pairs(seen, held_out)}
        atomic_write_json(out / HELD_OUT_NAME, split)
    else:
        (out / HELD_OUT_NAME).unlink(missing_ok=True)  # a split of an earlier set written here no longer applies
    csv_path = out / "synthetic.csv"

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "path", "action", "label", "caption"])
            writer.writerows(rows)

    return atomic_write(csv_path, write_csv)
