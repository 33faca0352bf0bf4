"""Writing videos: mp4 (H.264) / mkv / avi (MPEG-4 part 2) / webm (VP9) through PyAV, gif through Pillow, and PNG
contact sheets. Frames are float tensors (3, T, H, W) in [0, 1], the layout larp_mllm.data.video_io reads.

    write_video(video, "clip.mp4", fps=8)                                # H.264, yuv420p
    write_video_grid([video, video.flip(-1)], "sheet.png", labels=["orig", "flipped"])

Every file is written atomically; the same frames give the same mp4 / avi bytes (see `rgb_to_yuv420p`, `_write_av`).
"""
from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from larp_mllm.runtime.files import atomic_write

# suffix -> (container format, encoder, pixel format) for the PyAV writer
_ENCODERS = {
    ".mp4": ("mp4", "libx264", "yuv420p"),
    ".mkv": ("matroska", "libx264", "yuv420p"),
    ".avi": ("avi", "mpeg4", "yuv420p"),
    ".webm": ("webm", "libvpx-vp9", "yuv420p"),
}


# ----------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------
def _to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) or (B, 3, T, H, W) float in [0, 1] -> uint8 (T, H', W', 3); a batch is tiled in a grid."""
    frames = frames.detach().float().cpu()
    if frames.dim() == 5:
        b, c, t, h, w = frames.shape
        cols = math.ceil(math.sqrt(b))
        rows = math.ceil(b / cols)
        grid = frames.new_zeros(rows * cols, c, t, h, w)
        grid[:b] = frames
        # (rows*cols, 3, T, H, W) -> (3, T, rows*H, cols*W)
        frames = grid.view(rows, cols, c, t, h, w).permute(2, 3, 0, 4, 1, 5).reshape(c, t, rows * h, cols * w)
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"expected frames of shape (3, T, H, W) or (B, 3, T, H, W), got {tuple(frames.shape)}")
    out = frames.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 3, 0)  # (T, H, W, 3)
    return out.numpy()


def rgb_to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB (T, H, W, 3), H and W even -> uint8 yuv420p planes (T, 3H/2, W) as PyAV lays them out (Y, then U
    and V flattened), BT.601 limited range with each chroma sample the mean of its 2x2 block.

    Done in numpy, not by FFmpeg's converter, whose rounding depends on the memory alignment of the input.
    """
    t, h, w, _ = frames.shape
    rgb = frames.astype(np.float64)

    def mix(x: np.ndarray, cr: float, cg: float, cb: float) -> np.ndarray:  # elementwise: the same on every CPU
        return (x[..., 0] * cr + x[..., 1] * cg + x[..., 2] * cb) / 255

    y = 16 + mix(rgb, 65.481, 128.553, 24.966)  # (T, H, W)
    # (T, H, W, 3) -> (T, H/2, 2, W/2, 2, 3) -> 2x2 block sums / 4 (T, H/2, W/2, 3)
    block = rgb.reshape(t, h // 2, 2, w // 2, 2, 3).sum(axis=(2, 4)) / 4
    u = 128 + mix(block, -37.797, -74.203, 112.0)
    v = 128 + mix(block, 112.0, -93.786, -18.214)
    flat = [np.clip(np.rint(p), 0, 255).astype(np.uint8).reshape(t, -1) for p in (y, u, v)]
    return np.concatenate(flat, axis=1).reshape(t, h * 3 // 2, w)  # Y, then U, then V, as PyAV lays them out


def write_video(frames: torch.Tensor, path: str | os.PathLike, fps: float = 8, crf: int = 18) -> Path:
    """Write frames (3, T, H, W) or a batch (B, 3, T, H, W) tiled in a grid, float in [0, 1], to ``path``.

    ``.mp4`` / ``.mkv``: H.264 (yuv420p, ``crf`` quality, odd sizes padded to even by repeating the last row/column);
    ``.avi``: MPEG-4 part 2; ``.webm``: VP9; ``.gif``: Pillow, looping. The file is written atomically.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _ENCODERS and suffix != ".gif":
        raise ValueError(f"write_video writes .mp4, .mkv, .avi, .webm or .gif files, got {path.name!r}")
    array = _to_uint8_frames(frames)  # (T, H, W, 3)
    if suffix == ".gif":
        return atomic_write(path, lambda tmp: _write_gif(array, tmp, fps))  # the temporary name keeps the extension
    return atomic_write(path, lambda tmp: _write_av(array, tmp, fps, crf, *_ENCODERS[suffix]))


def _write_gif(array: np.ndarray, path: Path, fps: float) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in array]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(1, int(round(1000 / fps))), loop=0)


def _write_av(array: np.ndarray, path: Path, fps: float, crf: int, fmt: str, codec: str, pix_fmt: str) -> None:
    import av

    t, h, w, _ = array.shape
    array = np.pad(array, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # yuv420p needs even sizes
    planes = rgb_to_yuv420p(array)  # (T, 3H/2, W)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = array.shape[2], array.shape[1], pix_fmt
        if codec == "libx264":
            # one thread, no lookahead: x264's lookahead thread made the same frames encode to different bytes
            # from run to run on a loaded machine (up to 6 distinct files in 20 encodes of one clip)
            stream.options = {"crf": str(crf), "threads": "1", "x264-params": "mbtree=0:rc-lookahead=0"}
        elif codec == "libvpx-vp9":
            stream.options = {"crf": str(crf), "b": "0"}
        else:  # MPEG-4 part 2 has no crf: a generous bit rate instead
            stream.bit_rate = max(1_000_000, int(8 * array.shape[1] * array.shape[2] * float(rate)))
        for i, frame in enumerate(planes):
            video_frame = av.VideoFrame.from_ndarray(frame, format=pix_fmt)
            video_frame.pts = i
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())


def write_video_grid(
    videos: Sequence[torch.Tensor] | torch.Tensor,
    path: str | os.PathLike,
    frames_per_video: int = 8,
    labels: Sequence[str] | None = None,
    gap: int = 2,
) -> Path:
    """PNG contact sheet: one row per video, ``frames_per_video`` evenly spaced frames per row, optional row labels.

    videos: list of (3, T, H, W) or a (B, 3, T, H, W) tensor, float in [0, 1]; rows of other sizes are resized to the
    first video's (H, W). Labels are drawn in a left margin.
    """
    from PIL import Image, ImageDraw, ImageFont

    rows = list(videos) if not isinstance(videos, torch.Tensor) else list(videos.unbind(0))
    if not rows or any(v.dim() != 4 or v.shape[0] != 3 for v in rows):
        raise ValueError("write_video_grid expects a non-empty list of (3, T, H, W) videos or a (B, 3, T, H, W) tensor")
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"got {len(labels)} labels for {len(rows)} videos")
    h, w = rows[0].shape[-2:]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = 0 if labels is None else int(max(probe.textlength(str(s), font=font) for s in labels)) + 8
    sheet = Image.new("RGB", (margin + frames_per_video * (w + gap) + gap, len(rows) * (h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for r, video in enumerate(rows):
        video = video.detach().float().cpu()
        idx = torch.linspace(0, video.shape[1] - 1, frames_per_video).round().long()
        cells = video[:, idx].permute(1, 0, 2, 3)  # (F, 3, h', w')
        if cells.shape[-2:] != (h, w):
            cells = F.interpolate(cells, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        cells = cells.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (F, h, w, 3)
        y = gap + r * (h + gap)
        for c, cell in enumerate(cells):
            sheet.paste(Image.fromarray(cell), (margin + gap + c * (w + gap), y))
        if labels is not None:
            draw.text((4, y + h // 2), str(labels[r]), fill="black", font=font, anchor="lm")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"write_video_grid writes a .png file, got {path.name!r}")
    return atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
