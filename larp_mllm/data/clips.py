"""Clip datasets: a ``ClipDataset`` that reads clips of a list of ``VideoRecord`` (larp_mllm.data.records).

    records = ucf101_records("data/UCF-101", "data/ucfTrainTestlist", split=1, subset="train")
    ds = ClipDataset(records, num_frames=16, size=128, mode="random", seed=0, flip=True)
    loader = DataLoader(ds, batch_size=8, collate_fn=collate_clips, **loader_workers(2))  # spawned workers
    faults = DataFaults(max_bad_fraction=0.5, name="training data")   # larp_mllm.data.faults
    for epoch in range(epochs):
        ds.set_epoch(epoch)                      # new windows and flips every epoch, same for any worker count
        for batch in loader:                     # ClipBatch: video (B, 3, 16, 128, 128) float in [0, 1]
            faults.update(batch)                 # counted from the collated batches, so correct with workers
        faults.end_epoch(epoch)                  # logs "training data, epoch 0: 98 good, 2 missing, ..."

Sampling follows the reference (``datasets/video_dataset.py``): ``mode="random"`` takes one window of ``num_frames``
consecutive frames at a uniformly random start per video; ``mode="chunks"`` takes every non-overlapping chunk
(``n // num_frames`` per video), indexed once and cached in a JSON file. Short clips are replicate-padded at the end
(``pad_short=True``, as the reference does) or skipped; in chunk mode a short video gives one padded chunk (the
reference's all-frames index drops it). A file that cannot be used never raises: ``__getitem__`` returns a
``Skipped`` marker with the fault's kind (missing, unreadable, too_short, wrong_size: ``larp_mllm.data.faults``) and
a reason naming the file, which ``collate_clips`` moves into the batch's ``faults`` for a ``DataFaults``. The
per-item randomness comes from ``(seed, epoch, index)``, so a run is reproducible with any number of DataLoader
workers (set the epoch before iterating; with ``persistent_workers=True`` the workers keep the epoch they started
with).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from larp_mllm.data.faults import DataFaultError, DataFaults, FaultKind
from larp_mllm.data.records import VideoRecord, class_names_of
from larp_mllm.data.video_io import Backend, VideoReader, pad_frames
from larp_mllm.runtime.files import atomic_write_text, build_once

__all__ = ["Clip", "Skipped", "ClipBatch", "collate_clips", "ChunkIndex", "build_chunk_index", "ClipDataset",
           "DataFaults", "DataFaultError"]

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
    """Marker for an item that could not be used: its fault's kind (larp_mllm.data.faults.FAULT_KINDS) and reason."""

    index: int
    chunk: int
    path: str
    kind: FaultKind
    reason: str
    shape: tuple[int, int, int, int]  # the (3, T, H, W) a good clip would have had


@dataclass
class ClipBatch:
    """Collated clips: video (B, 3, T, H, W), label/index/chunk (B,); B may be 0 when every item was skipped."""

    video: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
    chunk: torch.Tensor
    faults: list[Skipped] = field(default_factory=list)  # the items of this batch that could not be used

    @property
    def num_skipped(self) -> int:
        return len(self.faults)

    def fault_counts(self) -> dict[str, int]:
        """{kind: number} of this batch's faults (kinds with none left out)."""
        counts: dict[str, int] = {}
        for f in self.faults:
            counts[f.kind] = counts.get(f.kind, 0) + 1
        return counts

    def pin_memory(self) -> "ClipBatch":
        return ClipBatch(self.video.pin_memory(), self.label.pin_memory(), self.index.pin_memory(),
                         self.chunk.pin_memory(), self.faults)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "ClipBatch":
        return ClipBatch(self.video.to(device, non_blocking=non_blocking), self.label.to(device),
                         self.index.to(device), self.chunk.to(device), self.faults)


def collate_clips(batch: Sequence[Clip | Skipped]) -> ClipBatch:
    """Stack the good clips; the ``Skipped`` markers go to ``faults``."""
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
        faults=bad,
    )


def _error_text(err: BaseException) -> str:
    """One line "Type: message" for a decoder error, without FFmpeg's trailing path or decord's "[time] file.cc:n:"."""
    message = getattr(err, "strerror", None) or str(err)
    message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", message.strip().splitlines()[0] if message.strip() else "")
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _read_fault(path: Path, err: BaseException) -> tuple[FaultKind, str]:
    """The kind and reason of a failure to open or decode `path`: missing when the file is gone, else unreadable."""
    if isinstance(err, FileNotFoundError) and not path.exists():
        return "missing", "no such file"
    return "unreadable", f"not a readable video ({_error_text(err)})"


# ----------------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ChunkIndex:
    """All non-overlapping chunks: ``entries[i] = (record index, chunk index)``; unreadable records listed apart."""

    entries: list[tuple[int, int]]
    frame_counts: list[int]  # per record, -1 when unreadable
    errors: dict[int, tuple[FaultKind, str]]  # record index -> (fault kind, reason)


def _index_key(records: Sequence[VideoRecord], num_frames: int, pad_short: bool, backend: str) -> str:
    h = hashlib.sha256(f"v2|{num_frames}|{pad_short}|{backend}".encode())
    for r in records:
        size = r.path.stat().st_size if r.path.is_file() else -1
        h.update(f"|{r.path}|{size}".encode())
    return h.hexdigest()


def _read_index_cache(cache: Path, key: str) -> tuple[list[int], dict[int, tuple[FaultKind, str]]] | None:
    """(frame counts, errors) from a chunk-index cache written for `key`; None if it is missing, stale or unreadable."""
    if not cache.is_file():
        return None
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["frame_counts"], {int(k): (kind, reason) for k, (kind, reason) in cached["errors"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        logger.warning("ignoring an unreadable chunk-index cache at %s", cache)
    return None


def _count_frames(records: Sequence[VideoRecord],
                  backend: Backend) -> tuple[list[int], dict[int, tuple[FaultKind, str]]]:
    """Frame count per record (-1: unreadable) and the unreadable ones' (fault kind, reason) by record index."""
    counts: list[int] = []
    errors: dict[int, tuple[FaultKind, str]] = {}
    for i, r in enumerate(tqdm(records, desc="indexing videos", disable=None, leave=False)):
        try:
            with VideoReader(r.path, backend) as reader:
                counts.append(reader.num_frames)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable", never fatal
            counts.append(-1)
            errors[i] = _read_fault(r.path, e)
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
        read: dict[str, tuple[list[int], dict[int, tuple[FaultKind, str]]] | None] = {}

        def fresh(path: Path) -> bool:  # build_once asks before and after taking the lock; keep what it read
            read["index"] = _read_index_cache(path, key)
            return read["index"] is not None

        def build() -> tuple[list[int], dict[int, tuple[FaultKind, str]]]:
            counts, errors = _count_frames(records, backend)
            atomic_write_text(cache, json.dumps({"key": key, "num_frames": num_frames, "frame_counts": counts,
                                                 "errors": {str(k): list(v) for k, v in errors.items()}}))
            return counts, errors

        built = build_once(cache, build, done=fresh)
        counts, errors = built if built is not None else read["index"]
    entries = []
    for i, n in enumerate(counts):
        num_chunks = n // num_frames if n >= num_frames else int(pad_short and n > 0)
        if n == 0:
            errors.setdefault(i, ("unreadable", "not a readable video (no frames)"))
        elif 0 < n < num_frames and not pad_short:
            errors.setdefault(i, ("too_short", f"{n} frames, fewer than the {num_frames} of a clip"))
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

    def index_faults(self) -> list[Skipped]:
        """The videos left out of the chunk index, as faults (for ``DataFaults.add_index_faults``); [] in random
        mode."""
        errors = {} if self.chunk_index is None else self.chunk_index.errors
        shape = (3, self.num_frames, self.size, self.size)
        return [Skipped(i, -1, str(self.records[i].path), kind, reason, shape) for i, (kind, reason) in
                sorted(errors.items())]

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

        def skip(kind: FaultKind, reason: str) -> Skipped:
            return Skipped(record_index, chunk, str(record.path), kind, reason, shape)

        # The one place where a fault gets its kind. Nothing raises: a bad file must never stop a long job.
        if not record.path.exists():
            return skip("missing", "no such file")
        try:
            with VideoReader(record.path, self.backend) as reader:
                n = reader.num_frames
                if n <= 0:
                    raise ValueError("no frames")
                start = int(rng.integers(0, max(n - self.num_frames, 0) + 1)) if chunk < 0 else chunk * self.num_frames
                video = reader.read(start, self.num_frames, self.size)  # (3, t, size, size)
        except Exception as e:  # noqa: BLE001 - corrupt, not a video, a container no decoder reads, gone meanwhile
            return skip(*_read_fault(record.path, e))
        if video.shape[0] != 3 or video.shape[2:] != shape[2:]:
            return skip("wrong_size", f"decoded to {tuple(video.shape)}, not (3, t, {self.size}, {self.size})")
        if video.shape[1] < self.num_frames:
            if not self.pad_short:
                return skip("too_short", f"{video.shape[1]} frames, fewer than the {self.num_frames} of a clip")
            video = pad_frames(video, self.num_frames)  # (3, num_frames, size, size)
        if self.flip and rng.random() < 0.5:
            video = video.flip(-1)  # one horizontal flip per clip
        return Clip(video, record.label, record_index, chunk)
