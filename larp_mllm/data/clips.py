"""Clip datasets: a ``ClipDataset`` that reads clips of a list of ``VideoRecord`` (larp_mllm.data.records).

    records = ucf101_records("data/UCF-101", "data/ucfTrainTestlist", split=1, subset="train")
    ds = ClipDataset(records, num_frames=16, size=128, mode="random", seed=0, flip=True)
    loader = DataLoader(ds, batch_size=8, collate_fn=collate_clips, **loader_workers(2))  # spawned workers
    skips = SkipCounter()
    for epoch in range(epochs):
        ds.set_epoch(epoch)                      # new windows and flips every epoch, same for any worker count
        for batch in loader:                     # ClipBatch: video (B, 3, 16, 128, 128) float in [0, 1]
            skips.update(batch)                  # counted from the collated batches, so correct with workers
        skips.end_epoch(epoch)                   # logs "epoch 0: skipped 2 corrupt/short files (...)"

Sampling follows the reference (``datasets/video_dataset.py``): ``mode="random"`` takes one window of ``num_frames``
consecutive frames at a uniformly random start per video; ``mode="chunks"`` takes every non-overlapping chunk
(``n // num_frames`` per video), indexed once and cached in a JSON file. Short clips are replicate-padded at the end
(``pad_short=True``, as the reference does) or skipped; in chunk mode a short video gives one padded chunk (the
reference's all-frames index drops it). Unreadable files are never fatal: ``__getitem__`` returns a ``Skipped``
marker that ``collate_clips`` drops and counts. The per-item randomness comes from ``(seed, epoch, index)``, so a
run is reproducible with any number of DataLoader workers (set the epoch before iterating; with
``persistent_workers=True`` the workers keep the epoch they started with).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from larp_mllm.data.records import VideoRecord, class_names_of
from larp_mllm.data.video_io import Backend, VideoReader, pad_frames
from larp_mllm.runtime.files import atomic_write_text, build_once

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Items and batches
# ----------------------------------------------------------------------------------------------------------------
class Clip(NamedTuple):
    """A clip: video (3, T, H, W) float in [0, 1], label (-1 if none), record index, chunk index (-1 in random mode)."""

    video: torch.Tensor
    label: int
    index: int
    chunk: int


class Skipped(NamedTuple):
    """Marker for an item that could not be read (corrupt, missing or, with pad_short=False, too short)."""

    index: int
    chunk: int
    path: str
    reason: str
    shape: tuple[int, int, int, int]  # the (3, T, H, W) a good clip would have had


@dataclass
class ClipBatch:
    """Collated clips: video (B, 3, T, H, W), label/index/chunk (B,); B may be 0 when every item was skipped."""

    video: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
    chunk: torch.Tensor
    num_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason" of the skipped items

    def pin_memory(self) -> "ClipBatch":
        return ClipBatch(self.video.pin_memory(), self.label.pin_memory(), self.index.pin_memory(),
                         self.chunk.pin_memory(), self.num_skipped, self.skipped)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ClipBatch":
        return ClipBatch(self.video.to(device, non_blocking=non_blocking), self.label.to(device),
                         self.index.to(device), self.chunk.to(device), self.num_skipped, self.skipped)


def collate_clips(batch: Sequence[Clip | Skipped]) -> ClipBatch:
    """Stack the good clips, drop and count the ``Skipped`` markers."""
    good = [b for b in batch if isinstance(b, Clip)]
    bad = [b for b in batch if isinstance(b, Skipped)]
    if good:
        video = torch.stack([c.video for c in good])  # (B, 3, T, H, W)
    else:
        video = torch.empty((0, *bad[0].shape)) if bad else torch.empty(0)
    return ClipBatch(
        video=video,
        label=torch.tensor([c.label for c in good], dtype=torch.long),
        index=torch.tensor([c.index for c in good], dtype=torch.long),
        chunk=torch.tensor([c.chunk for c in good], dtype=torch.long),
        num_skipped=len(bad),
        skipped=[f"{b.path}: {b.reason}" for b in bad],
    )


@dataclass
class SkipCounter:
    """Counts skipped items from collated batches (correct with any number of workers) and reports per epoch."""

    num_skipped: int = 0
    examples: list[str] = field(default_factory=list)  # the first few "path: reason"
    max_examples: int = 5

    def update(self, batch: ClipBatch) -> None:
        self.num_skipped += batch.num_skipped
        self.examples.extend(batch.skipped[: self.max_examples - len(self.examples)])

    def end_epoch(self, epoch: int | None = None, log: logging.Logger | None = None) -> str:
        """Log "skipped N corrupt/short files" (warning when N > 0), reset the count, and return the message."""
        head = "" if epoch is None else f"epoch {epoch}: "
        msg = f"{head}skipped {self.num_skipped} corrupt/short files"
        if self.examples:
            msg += " (e.g. " + "; ".join(self.examples) + ")"
        (log or logger).log(logging.WARNING if self.num_skipped else logging.INFO, msg)
        self.num_skipped, self.examples = 0, []
        return msg


# ----------------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ChunkIndex:
    """All non-overlapping chunks: ``entries[i] = (record index, chunk index)``; unreadable records listed apart."""

    entries: list[tuple[int, int]]
    frame_counts: list[int]  # per record, -1 when unreadable
    errors: dict[int, str]  # record index -> reason


def _index_key(records: Sequence[VideoRecord], num_frames: int, pad_short: bool, backend: str) -> str:
    h = hashlib.sha256(f"v1|{num_frames}|{pad_short}|{backend}".encode())
    for r in records:
        size = r.path.stat().st_size if r.path.is_file() else -1
        h.update(f"|{r.path}|{size}".encode())
    return h.hexdigest()


def _read_index_cache(cache: Path, key: str) -> tuple[list[int], dict[int, str]] | None:
    """(frame counts, errors) from a chunk-index cache written for `key`; None if it is missing, stale or unreadable."""
    if not cache.is_file():
        return None
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["frame_counts"], {int(k): v for k, v in cached["errors"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        logger.warning("ignoring an unreadable chunk-index cache at %s", cache)
    return None


def _count_frames(records: Sequence[VideoRecord], backend: Backend) -> tuple[list[int], dict[int, str]]:
    """Frame count per record (-1: unreadable) and the unreadable ones' errors by record index."""
    counts: list[int] = []
    errors: dict[int, str] = {}
    for i, r in enumerate(tqdm(records, desc="indexing videos", disable=None, leave=False)):
        try:
            with VideoReader(r.path, backend) as reader:
                counts.append(reader.num_frames)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable", never fatal
            counts.append(-1)
            errors[i] = f"{type(e).__name__}: {e}"
    return counts, errors


def build_chunk_index(
    records: Sequence[VideoRecord],
    num_frames: int,
    pad_short: bool = True,
    backend: Backend = "auto",
    cache_path: str | os.PathLike | None = None,
) -> ChunkIndex:
    """Count frames once per video and list every chunk; cached as JSON at ``cache_path`` (atomic write).

    The cache is keyed by the record paths, file sizes, ``num_frames``, ``pad_short`` and backend; a stale cache
    is rebuilt. Processes that build the same cache at once (every rank of a run) count the frames in one process
    only, under a lock file beside the cache; the others read what it wrote. A video with ``n`` frames gives
    ``n // num_frames`` chunks (one padded chunk when 0 < n < num_frames and ``pad_short``).
    """
    key = _index_key(records, num_frames, pad_short, backend)
    if cache_path is None:
        counts, errors = _count_frames(records, backend)
    else:
        cache = Path(cache_path)
        read: dict[str, tuple[list[int], dict[int, str]] | None] = {}

        def fresh(path: Path) -> bool:  # build_once asks before and after taking the lock; keep what it read
            read["index"] = _read_index_cache(path, key)
            return read["index"] is not None

        def build() -> tuple[list[int], dict[int, str]]:
            counts, errors = _count_frames(records, backend)
            atomic_write_text(cache, json.dumps({"key": key, "num_frames": num_frames, "frame_counts": counts,
                                                 "errors": {str(k): v for k, v in errors.items()}}))
            return counts, errors

        built = build_once(cache, build, done=fresh)
        counts, errors = built if built is not None else read["index"]
    entries = []
    for i, n in enumerate(counts):
        num_chunks = n // num_frames if n >= num_frames else int(pad_short and n > 0)
        if n == 0 or (0 < n < num_frames and not pad_short):
            errors.setdefault(i, f"short: {n} frames < {num_frames}")
        entries.extend((i, c) for c in range(num_chunks))
    return ChunkIndex(entries, counts, errors)


class ClipDataset(Dataset):
    """Clips of ``num_frames`` frames, resized + center-cropped to ``size``, from a list of ``VideoRecord``.

    Items are ``Clip`` or ``Skipped``; use ``collate_clips`` as the DataLoader's ``collate_fn``.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        num_frames: int = 16,
        size: int = 128,
        mode: Literal["random", "chunks"] = "random",
        seed: int = 0,
        flip: bool = False,
        pad_short: bool = True,
        cache_path: str | os.PathLike | None = None,
        backend: Backend = "auto",
    ):
        if mode not in ("random", "chunks"):
            raise ValueError(f"mode must be 'random' or 'chunks', got {mode!r}")
        if num_frames <= 0 or size <= 0:
            raise ValueError(f"num_frames and size must be positive, got {num_frames} and {size}")
        if not records:
            raise ValueError("ClipDataset needs at least one record")
        self.records = list(records)
        self.num_frames, self.size, self.mode = num_frames, size, mode
        self.seed, self.flip, self.pad_short, self.backend = seed, flip, pad_short, backend
        self.epoch = 0
        self.class_names = class_names_of(self.records)
        self.chunk_index = build_chunk_index(self.records, num_frames, pad_short, backend, cache_path) \
            if mode == "chunks" else None
        if self.chunk_index is not None and self.chunk_index.errors:
            logger.warning("chunk index: %d of %d videos unreadable or too short, left out",
                           len(self.chunk_index.errors), len(self.records))

    @property
    def num_index_skipped(self) -> int:
        """Videos left out of the chunk index (unreadable or too short); 0 in random mode."""
        return 0 if self.chunk_index is None else len(self.chunk_index.errors)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose windows and flips ``__getitem__`` draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records) if self.chunk_index is None else len(self.chunk_index.entries)

    def __getitem__(self, i: int) -> Clip | Skipped:
        if self.chunk_index is None:
            record_index, chunk = i, -1
        else:
            record_index, chunk = self.chunk_index.entries[i]
        record = self.records[record_index]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        shape = (3, self.num_frames, self.size, self.size)
        try:
            with VideoReader(record.path, self.backend) as reader:
                n = reader.num_frames
                if n <= 0:
                    raise ValueError("the video has no frames")
                start = int(rng.integers(0, max(n - self.num_frames, 0) + 1)) if chunk < 0 else chunk * self.num_frames
                video = reader.read(start, self.num_frames, self.size)  # (3, t, size, size)
        except Exception as e:  # noqa: BLE001 - a corrupt file must never stop the job
            return Skipped(record_index, chunk, str(record.path), f"{type(e).__name__}: {e}", shape)
        if video.shape[1] < self.num_frames:
            if not self.pad_short:
                return Skipped(record_index, chunk, str(record.path), f"short: {video.shape[1]} frames", shape)
            video = pad_frames(video, self.num_frames)  # (3, num_frames, size, size)
        if self.flip and rng.random() < 0.5:
            video = video.flip(-1)  # one horizontal flip per clip
        return Clip(video, record.label, record_index, chunk)
