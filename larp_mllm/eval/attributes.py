"""A pixel-level attribute reader for the synthetic set: colour, shape and direction of the moving object, read from
the pixels of a clip, with its per-frame centroid track. It scores generated videos and captions without
nearest-neighbour class matching.

    attrs = read_attributes(video)          # video (3, T, H, W): float in [0, 1] or uint8 in [0, 255]
    attrs.color, attrs.shape, attrs.direction, attrs.centroids     # "red", "circle", "right", (T, 2) pixels
    acc = attribute_accuracy(read_batch(videos), [parse_class_name(n) for n in names])   # or parse_caption(...)

Frames are in the layout of the rest of the library (``render_clip``, ``read_video``, a tokenizer's ``decode_codes``):
channels first, time second. The reader knows the renderer (``larp_mllm.data.synthetic``):

* The background is ``gray * tint``: every background pixel lies on one line through the RGB origin (the clip's
  tint), whatever the texture. The tint is the per-channel median of the unit-length pixels (the object covers at
  most ~30% of a frame), and a pixel is unmixed as ``m * object + g * tint`` by least squares; ``m`` in [0, 1] is the
  soft object mask (linear in the pixels, so blur and resizing move mask weight without losing it). Per frame, only
  the heaviest connected region of ``m > 0.5`` and a few pixels around it are kept (noise elsewhere is not the object).
* The object's colour is the per-channel median of the pixels farthest from the tint line (the palette is saturated,
  the background is not); the class colour is the nearest palette colour (RGB distance: the jitter is <= 0.06 per
  channel, i.e. <= 0.1 away, and palette colours are >= 0.48 apart).
* The shape only translates: for each of ``SHAPES`` the renderer's own mask function (``_shape_mask``) draws a
  template of the mask's area on each frame's centroid, in several looks (the renderer's raster, or pixel coverage
  sampled 4x4, then H.264's 2x2 chroma blocks or a Gaussian blur: see _LOOKS), radius +-10%; the shape whose best
  look has the smallest L1 mismatch with the soft masks (of 4 frames) wins.
* The renderer moves the object at constant velocity, fully inside the frame, over a static background: the
  direction is the entry of ``DIRECTIONS`` (dx, dy in image axes, y down) best aligned with the least-squares
  velocity of the centroid track.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, Sequence

import numpy as np
import torch
from scipy import ndimage

from larp_mllm.data.synthetic import COLORS, DIRECTIONS, SHAPES, TEXTURES, ClassSpec, _shape_mask

__all__ = ["ClipAttributes", "CaptionAttributes", "AttributeAccuracy", "Attributed", "read_attributes", "read_batch",
           "parse_caption", "parse_class_name", "attribute_accuracy"]

_MIN_CHROMA = 0.15  # RGB distance from the tint line an object's core needs (palette >= 0.43, background ~0)
_MASK_FLOOR = 0.2  # unmixed object fractions below this are codec / texture noise
_MARGIN = 3  # pixels of soft edge kept around the object's core (mask > 0.5)
_MIN_AREA = 1.0  # pixels: a frame with less soft mask than this has no object
_MAX_SHAPE_FRAMES = 4  # frames (evenly spaced among those with the object) that vote on the shape
_RADIUS_SCALES = (0.9, 1.0, 1.1)  # template radii tried, relative to the one of the mask's area
# How a shape may look in the mask, tried per clip: (raster, Gaussian sigma in pixels, 2x2 chroma blocks first).
# "point": the renderer's own raster (pixel centres), "area": pixel coverage (anything resampled). yuv420p video
# (H.264) keeps one colour per 2x2 block; resizing and decoders blur.
_LOOKS: tuple[tuple[str, float, bool], ...] = (("point", 0.0, False), ("point", 0.0, True), ("area", 0.0, False), ("area", 0.5, False),
                            ("area", 0.8, False), ("area", 1.2, False), ("area", 1.8, False), ("area", 0.0, True))
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)  # (6, 3) in [0, 1]


@dataclass(frozen=True)
class ClipAttributes:
    """What one clip shows. The class fields are None when no object was found (e.g. a blank generated video).

    centroids: (T, 2) float64 (x, y) centre of mass of the soft object mask, in pixels with pixel (row i, column j)
    covering [j, j + 1) x [i, i + 1) (the renderer's convention: its shape centres are in the same units); NaN in the
    frames without the object. area: (T,) soft mask area in pixels (0 where not found).
    """

    color: str | None
    shape: str | None
    direction: str | None
    centroids: np.ndarray  # (T, 2) pixels, NaN where not found
    area: np.ndarray  # (T,) pixels
    object_rgb: tuple[float, float, float] | None  # the object's median colour, [0, 1]
    color_distance: float  # RGB distance from object_rgb to the chosen palette colour; inf when not found
    shape_errors: tuple[float, ...]  # per SHAPES: L1 mismatch / mask area, 0 = exact, inf when not found
    velocity: tuple[float, float]  # (dx, dy) pixels per frame, least squares on the track; NaN when < 2 frames

    @property
    def found(self) -> int:
        """Number of frames where the object was found."""
        return int(np.isfinite(self.centroids[:, 0]).sum())

    @property
    def shape_margin(self) -> float:
        """Second-best minus best shape error: >= 0, larger is surer."""
        best, second = np.sort(np.asarray(self.shape_errors))[:2]
        return float(second - best)


@dataclass(frozen=True)
class CaptionAttributes:
    """The attributes a caption names; a field is None when the caption names none or several of its words."""

    color: str | None
    shape: str | None
    direction: str | None
    texture: str | None


class Attributed(Protocol):
    """Anything with the three class attributes: ClassSpec, ClipAttributes, CaptionAttributes."""

    @property
    def color(self) -> str | None: ...

    @property
    def shape(self) -> str | None: ...

    @property
    def direction(self) -> str | None: ...


@dataclass(frozen=True)
class AttributeAccuracy:
    """Fractions in [0, 1] of items whose attribute matches (None never matches); all_three: every one matches."""

    color: float
    shape: float
    direction: float
    all_three: float
    count: int

    def __str__(self) -> str:
        return (f"all three {self.all_three:.1%} (colour {self.color:.1%}, shape {self.shape:.1%}, "
                f"direction {self.direction:.1%}; {self.count} items)")


# ----------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------
def _as_float_array(frames: torch.Tensor | np.ndarray, ndim: int, layout: str) -> np.ndarray:
    """uint8 in [0, 255] or float in [0, 1], channels first -> float64 numpy in [0, 1], same shape."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = (frames.float() if frames.dtype in (torch.float16, torch.bfloat16) else frames).numpy()
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"expected a torch.Tensor or numpy array {layout}, got {type(frames).__name__}")
    channel_axis = ndim - 4
    if frames.ndim != ndim or frames.shape[channel_axis] != 3:
        hint = "; channels-last frames: move the channel axis first" if frames.ndim == ndim \
            and frames.shape[-1] == 3 else ""
        raise ValueError(f"expected frames {layout} with 3 RGB channels, got shape {tuple(frames.shape)}{hint}")
    t, h, w = frames.shape[-3:]
    if t < 2 or h < 8 or w < 8:
        raise ValueError(f"expected frames {layout} with T >= 2 and H, W >= 8, got shape {tuple(frames.shape)}")
    if frames.dtype == np.uint8:
        return frames.astype(np.float64) / 255.0
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"expected uint8 frames in [0, 255] or float frames in [0, 1], got dtype {frames.dtype}")
    frames = frames.astype(np.float64)
    lo, hi = float(np.min(frames)), float(np.max(frames))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
        raise ValueError(f"expected float frames in [0, 1] (clamp a decoder's output first), got values in "
                         f"[{lo:.4g}, {hi:.4g}]")
    return frames


# ----------------------------------------------------------------------------------------------------------------
# Segmentation: the soft object mask
# ----------------------------------------------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _segment(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """pixels (T, H, W, 3) in [0, 1] -> (soft object mask (T, H, W) in [0, 1], object colour (3,)), or None when no
    pixel is far enough from the background's tint line."""
    flat = pixels.reshape(-1, 3)  # (T*H*W, 3)
    norms = np.linalg.norm(flat, axis=1)
    lit = flat[norms > 0.05] / norms[norms > 0.05, None]  # unit-length pixels bright enough to have a direction
    tint = _unit(np.median(lit, axis=0) if len(lit) else np.ones(3))  # (3,)
    off_line = np.linalg.norm(flat - (flat @ tint)[:, None] * tint, axis=1)  # (T*H*W,) distance from the tint line
    peak = float(np.quantile(off_line, 0.999))
    if peak < _MIN_CHROMA:
        return None
    core = flat[off_line >= 0.7 * peak]  # the object's most saturated pixels
    rgb = np.median(core, axis=0)  # (3,)
    basis = np.stack([rgb, tint], axis=1)  # (3, 2): pixel ~ m * rgb + g * tint
    m = flat @ np.linalg.pinv(basis)[0]  # (T*H*W,) least-squares object fraction
    m = np.clip(m, 0.0, 1.0).reshape(pixels.shape[:3])  # (T, H, W)
    m[m < _MASK_FLOOR] = 0.0
    return _keep_object(m), rgb


def _keep_object(mask: np.ndarray) -> np.ndarray:
    """mask (T, H, W) -> the same with, in each frame, everything outside the heaviest connected region of
    ``mask > 0.5`` (grown by _MARGIN pixels for the soft edge) set to 0: isolated noise pixels are not the object."""
    kept = np.zeros_like(mask)
    for t, frame in enumerate(mask):
        labels, count = ndimage.label(frame > 0.5)  # (H, W) int, 4-connected
        if count == 0:
            continue
        heaviest = 1 + int(np.argmax(ndimage.sum(frame, labels, index=np.arange(1, count + 1))))
        region = ndimage.binary_dilation(labels == heaviest, iterations=_MARGIN)  # (H, W) bool
        kept[t] = np.where(region, frame, 0.0)
    return kept


def _centroids(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mask (T, H, W) -> centroids (T, 2) (x, y) in pixels (pixel centres at +0.5; NaN without object), area (T,)."""
    _, h, w = mask.shape
    area = mask.sum(axis=(1, 2))  # (T,)
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (mask.sum(axis=1) @ (np.arange(w) + 0.5)) / area  # (T,)
        y = (mask.sum(axis=2) @ (np.arange(h) + 0.5)) / area
    centroids = np.stack([x, y], axis=1)  # (T, 2)
    missing = area < _MIN_AREA
    centroids[missing] = np.nan
    area[missing] = 0.0
    return centroids, area


# ----------------------------------------------------------------------------------------------------------------
# Shape: the renderer's masks, fitted to the soft masks
# ----------------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _geometry(shape: str) -> tuple[float, float, float]:
    """(area / r^2, centroid offset x / r, centroid offset y / r) of the renderer's ``shape`` mask of radius r."""
    size, r = 512, 200.0
    mask = _shape_mask(shape, size, size / 2, size / 2, r)  # (size, size) bool
    ys, xs = np.nonzero(mask)
    return float(mask.sum()) / r**2, float((xs + 0.5).mean() - size / 2) / r, float((ys + 0.5).mean() - size / 2) / r


def _coverage(shape: str, cx: float, cy: float, r: float, x0: int, y0: int, n: int, k: int) -> np.ndarray:
    """Fraction of each pixel of the window [x0, x0 + n) x [y0, y0 + n) that the renderer's shape covers, sampled at
    k x k points per pixel (k = 1: the renderer's own raster, pixel centres), (n, n) in [0, 1]."""
    fine = _shape_mask(shape, n * k, (cx - x0) * k, (cy - y0) * k, r * k)  # (n*k, n*k): samples j + (m + .5)/k
    return fine.reshape(n, k, n, k).mean(axis=(1, 3))  # (n, n)


def _blocks(x: np.ndarray) -> np.ndarray:
    """Each 2x2 block of x (n, n), n even, replaced by its mean: the chroma resolution of yuv420p."""
    n = x.shape[0]
    means = x.reshape(n // 2, 2, n // 2, 2).mean(axis=(1, 3))  # (n/2, n/2)
    return np.repeat(np.repeat(means, 2, axis=0), 2, axis=1)  # (n, n)


def _window_errors(window: np.ndarray, outside: float, shape: str, centroid: np.ndarray, r0: float,
                   origin: tuple[int, int]) -> np.ndarray:
    """L1 distances (len(_RADIUS_SCALES), len(_LOOKS)) between one frame's soft mask and the shape's templates.

    window: (n, n) the mask around the object, its pixel (0, 0) at frame pixel ``origin`` (x0, y0); outside: mask
    area outside the window (a mismatch for every template); centroid: (2,) (x, y) pixels; r0: the equal-area radius."""
    n = window.shape[0]
    _, off_x, off_y = _geometry(shape)
    errors = np.zeros((len(_RADIUS_SCALES), len(_LOOKS)))
    for a, scale in enumerate(_RADIUS_SCALES):
        r = r0 * scale
        cx, cy = centroid[0] - off_x * r, centroid[1] - off_y * r  # the shape's centre
        sharp = {raster: _coverage(shape, cx, cy, r, origin[0], origin[1], n, 1 if raster == "point" else 4)
                 for raster in ("point", "area")}  # raster -> (n, n)
        for b, (raster, sigma, blocks) in enumerate(_LOOKS):
            template = _blocks(sharp[raster]) if blocks else sharp[raster]
            template = ndimage.gaussian_filter(template, sigma, mode="constant") if sigma > 0 else template
            template = np.where(template < _MASK_FLOOR, 0.0, template)  # floored as the mask is
            errors[a, b] = float(np.abs(window - template).sum()) + outside
    return errors


def _shape_errors(mask: np.ndarray, centroids: np.ndarray, area: np.ndarray) -> tuple[float, ...]:
    """Per SHAPES: the L1 distance between the soft masks and the shape's template on the same centroid, summed over
    (up to _MAX_SHAPE_FRAMES) frames and divided by the summed mask area. The template's look (_LOOKS: raster, codec
    chroma blocks, blur) is fitted per shape and clip, its radius (around the one of equal area) per frame."""
    frames = np.flatnonzero(area > 0)
    frames = frames[np.linspace(0, len(frames) - 1, min(len(frames), _MAX_SHAPE_FRAMES)).round().astype(int)]
    typical_area = float(np.median(area[frames]))
    errors = []
    for shape in SHAPES:
        r0 = np.sqrt(typical_area / _geometry(shape)[0])
        n = 2 * int(np.ceil(1.3 * r0 * max(_RADIUS_SCALES) + 2 * max(s for _, s, _ in _LOOKS))) + 4  # even
        padded = np.pad(mask[frames], ((0, 0), (n, n), (n, n)))  # (F, H + 2n, W + 2n): the window may leave the frame
        error = np.zeros(len(_LOOKS))
        for i, t in enumerate(frames):
            x0 = 2 * ((int(np.floor(centroids[t, 0])) - n // 2) // 2)  # even: 2x2 chroma blocks stay aligned
            y0 = 2 * ((int(np.floor(centroids[t, 1])) - n // 2) // 2)
            window = padded[i, y0 + n : y0 + 2 * n, x0 + n : x0 + 2 * n]  # (n, n)
            frame_errors = _window_errors(window, float(area[t] - window.sum()), shape, centroids[t], r0,
                                          (x0, y0))  # (len(_RADIUS_SCALES), len(_LOOKS))
            error += frame_errors.min(axis=0)  # (len(_LOOKS),): the radius per frame (a raster's area varies)
        errors.append(float(error.min()) / float(area[frames].sum()))
    return tuple(errors)


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def _direction(centroids: np.ndarray) -> tuple[str | None, tuple[float, float]]:
    """The DIRECTIONS entry best aligned with the least-squares velocity (pixels / frame) of the track."""
    t = np.flatnonzero(np.isfinite(centroids[:, 0]))
    if len(t) < 2:
        return None, (float("nan"), float("nan"))
    velocity = np.polyfit(t.astype(np.float64), centroids[t], 1)[0]  # (2,) slope of x and y
    name = max(DIRECTIONS, key=lambda d: float(np.dot(DIRECTIONS[d], velocity)))
    return name, (float(velocity[0]), float(velocity[1]))


def _read(pixels: np.ndarray) -> ClipAttributes:
    """pixels (T, H, W, 3) float in [0, 1] -> ClipAttributes."""
    t = pixels.shape[0]
    segmented = _segment(pixels)
    centroids, area = _centroids(segmented[0]) if segmented is not None else (np.full((t, 2), np.nan), np.zeros(t))
    if segmented is None or not area.any():
        return ClipAttributes(color=None, shape=None, direction=None, centroids=centroids, area=area, object_rgb=None,
                              color_distance=float("inf"), shape_errors=(float("inf"),) * len(SHAPES),
                              velocity=(float("nan"), float("nan")))
    mask, rgb = segmented
    distances = np.linalg.norm(_PALETTE - rgb, axis=1)  # (6,)
    shape_errors = _shape_errors(mask, centroids, area)
    direction, velocity = _direction(centroids)
    return ClipAttributes(
        color=list(COLORS)[int(np.argmin(distances))], shape=SHAPES[int(np.argmin(shape_errors))],
        direction=direction, centroids=centroids, area=area, object_rgb=(float(rgb[0]), float(rgb[1]), float(rgb[2])),
        color_distance=float(distances.min()), shape_errors=shape_errors, velocity=velocity)


def read_attributes(frames: torch.Tensor | np.ndarray) -> ClipAttributes:
    """Read one clip. frames: (3, T, H, W), uint8 in [0, 255] or float in [0, 1] (as ``render_clip`` and
    ``read_video`` return them), T >= 2, H, W >= 8. ValueError for any other shape, dtype or range."""
    pixels = _as_float_array(frames, 4, "(3, T, H, W)")
    return _read(np.moveaxis(pixels, 0, -1))  # (T, H, W, 3)


def read_batch(videos: torch.Tensor | np.ndarray) -> list[ClipAttributes]:
    """Read a batch. videos: (B, 3, T, H, W), uint8 in [0, 255] or float in [0, 1] (e.g. ``decode_codes`` clamped)."""
    pixels = _as_float_array(videos, 5, "(B, 3, T, H, W)")
    return [_read(np.moveaxis(clip, 0, -1)) for clip in pixels]  # each (T, H, W, 3)


# ----------------------------------------------------------------------------------------------------------------
# Names, captions, accuracy
# ----------------------------------------------------------------------------------------------------------------
_CLASS_NAME = re.compile(r"([A-Z][a-z]+)([A-Z][a-z]+)Moving([A-Z][a-z]+)")


def parse_class_name(name: str) -> ClassSpec:
    """"RedCircleMovingRight" -> ClassSpec("red", "circle", "right") (the inverse of ``ClassSpec.name``)."""
    match = _CLASS_NAME.fullmatch(name)
    parts = [p.lower() for p in match.groups()] if match else []
    if not match or parts[0] not in COLORS or parts[1] not in SHAPES or parts[2] not in DIRECTIONS:
        raise ValueError(f"expected a class name <Colour><Shape>Moving<Direction> with colour in {list(COLORS)}, "
                         f"shape in {list(SHAPES)}, direction in {list(DIRECTIONS)}, e.g. 'RedCircleMovingRight'; "
                         f"got {name!r}")
    return ClassSpec(*parts)


def parse_caption(text: str) -> CaptionAttributes:
    """The colour, shape, direction and background a caption names ("a red circle moving right over a striped
    background"), case-insensitive. A field is None when no word of its vocabulary appears, or several different
    ones do; the direction is the word after "moving" when there is one."""
    words = re.findall(r"[a-z]+", text.lower())

    def unique(vocab: Sequence[str]) -> str | None:
        found = {w for w in words if w in vocab}
        return found.pop() if len(found) == 1 else None

    after_moving = [b for a, b in zip(words, words[1:]) if a == "moving" and b in DIRECTIONS]
    direction = after_moving[0] if len(set(after_moving)) == 1 else unique(list(DIRECTIONS))
    return CaptionAttributes(color=unique(list(COLORS)), shape=unique(SHAPES), direction=direction,
                             texture=unique((*TEXTURES, "plain")))


def attribute_accuracy(predicted: Sequence[Attributed], expected: Sequence[Attributed]) -> AttributeAccuracy:
    """Per-attribute and all-three accuracy of ``predicted`` (ClipAttributes, CaptionAttributes, ClassSpec) against
    ``expected`` (typically ClassSpec from ``class_specs`` / ``parse_class_name``). A None prediction is wrong; an
    expected item must name all three attributes."""
    if len(predicted) != len(expected) or not expected:
        raise ValueError(f"expected two non-empty sequences of equal length, got {len(predicted)} predictions and "
                         f"{len(expected)} expected items")
    hits = np.zeros((len(expected), 3), dtype=bool)  # (N, colour / shape / direction)
    for i, (p, e) in enumerate(zip(predicted, expected)):
        truth = (e.color, e.shape, e.direction)
        if None in truth:
            raise ValueError(f"expected item {i} must name colour, shape and direction, got {truth}")
        hits[i] = [p.color == e.color, p.shape == e.shape, p.direction == e.direction]
    color, shape, direction = hits.mean(axis=0)
    return AttributeAccuracy(color=float(color), shape=float(shape), direction=float(direction),
                             all_three=float(hits.all(axis=1).mean()), count=len(expected))
