"""Speed and peak memory of one LARP tokenizer training step (generator and discriminator).

    python bench/train_speed.py --preset larp-tiny --batch 4 --dtype fp32            # CPU
    python bench/train_speed.py --preset larp-l-long --batch 16 --dtype bf16         # GPU (vs benchmarks.md)
    python bench/train_speed.py --preset larp-l-long --batch 16 --dtype bf16 --compile

Plain torch (no DeepSpeed engine: one process, nothing to shard), the trainer's own loss and models, Adam.
Prints one JSON line per figure:
  g_step_ref_objective  L1 + VQ + prior (the objective of the reference measurement in benchmarks.md)
  g_step_full           + perceptual + the adversarial term through the frozen discriminator
  d_step                discriminator on real clips and detached reconstructions
each as videos/s and peak memory (GPU: max allocated; CPU: the process's peak RSS so far). On a CPU the ratio of
each figure to `g_step_ref_objective` is printed as well (bare CPU seconds depend on the machine's load).
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from contextlib import nullcontext
from functools import partial

import torch

from larp_mllm import LARPTokenizer
from larp_mllm.eval.perceptual import build_perceptual
from tokenizer_training.arguments import LossArguments
from tokenizer_training.discriminator import DiscriminatorConfig, TransformerDiscriminator
from tokenizer_training.losses import LeCamEMA, TokenizerLoss

REFERENCE_H200 = {"eager": 75.7, "compile": 98.8}  # videos/s, LARP-L-Long batch 16 bf16 (benchmarks.md)
DISC_SIZES = {"larp-l-long": (512, 12, 8), "larp-tiny": (64, 2, 4)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="larp-tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--perceptual", default="none", choices=["none", "stlpips"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    tok = LARPTokenizer.from_preset(args.preset).to(device).train()
    tok.check_inputs = False
    c = tok.config
    dim, depth, heads = DISC_SIZES.get(args.preset, (512, 12, 8))
    disc = TransformerDiscriminator(DiscriminatorConfig(c.input_size, c.frame_num, c.in_channels, c.patch_size,
                                                        c.temporal_patch_size, dim, depth, heads)).to(device)
    fwd_tok, fwd_disc = (torch.compile(tok), torch.compile(disc)) if args.compile else (tok, disc)
    opt_g = torch.optim.Adam(tok.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=3e-5, betas=(0.5, 0.9))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    amp = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if amp_dtype else nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    ref_loss = TokenizerLoss(LossArguments(perceptual_weight=0.0, gan_weight=0.0, perceptual_backend="none"))
    full_loss = TokenizerLoss(LossArguments(perceptual_backend=args.perceptual),
                              build_perceptual(args.perceptual, device=device))
    video = torch.rand(args.batch, *tok.video_shape, device=device)

    def g_step(loss_fn: TokenizerLoss, with_gan: bool) -> None:
        with amp():
            out = fwd_tok(video, ss_ratio=0.3)
            fake = None
            if with_gan:
                disc.requires_grad_(False)
                fake = fwd_disc(out.recon)
            loss = loss_fn.generator(video, out, fake).total
        opt_g.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt_g)
        scaler.update()
        disc.requires_grad_(True)

    with torch.no_grad(), amp():
        recon = tok(video).recon.detach()

    def d_step() -> None:
        with amp():
            loss = full_loss.discriminator(fwd_disc, video, recon, LeCamEMA()).total
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt_d)
        scaler.update()

    phases = {
        "g_step_ref_objective": partial(g_step, ref_loss, False),
        "g_step_full": partial(g_step, full_loss, True),
        "d_step": d_step,
    }
    base = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for phase, fn in phases.items():
        sec = timed(fn, args.steps, args.warmup, device)
        vps = args.batch / sec
        base = base or vps
        common = {"bench": "train_speed", "device": name, "preset": args.preset, "batch": args.batch,
                  "dtype": args.dtype, "compile": args.compile, "phase": phase, "perceptual": args.perceptual}
        print(json.dumps({**common, "metric": "videos_per_s", "value": round(vps, 3), "unit": "videos/s"}))
        print(json.dumps({**common, "metric": "step_time", "value": round(sec, 4), "unit": "s"}))
        print(json.dumps({**common, "metric": "peak_memory", "value": round(peak_memory_mb(device), 1),
                          "unit": "MiB" + ("" if device.type == "cuda" else " (process peak RSS)")}))
        if device.type == "cpu":
            print(json.dumps({**common, "metric": "speed_vs_g_step_ref_objective", "value": round(vps / base, 3),
                              "unit": "ratio"}))
        if device.type == "cuda" and phase == "g_step_ref_objective" and args.preset == "larp-l-long":
            ref = REFERENCE_H200["compile" if args.compile else "eager"]
            print(json.dumps({**common, "metric": "speed_vs_reference_h200", "value": round(vps / ref, 3),
                              "unit": "ratio", "reference_videos_per_s": ref}))


if __name__ == "__main__":
    main()
