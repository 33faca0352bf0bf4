"""Tokenizer throughput: encode (tokenize), decode (decode_codes) and the training step, in videos/s + peak memory.

    python bench/tokenizer_speed.py --preset larp-tiny --batch 8 --dtype fp32            # CPU
    python bench/tokenizer_speed.py --preset larp-l-long --batch 64 --train-batch 16 --dtype bf16 --compile  # GPU

The training step is the reference's measured one: forward + L1 + VQ + prior loss + backward + Adam step (no
perceptual/GAN terms), so that the figures compare with `benchmarks.md` (H200: 98.8 / 674 / 760 videos/s compiled
train / eager encode / eager decode). One JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Callable

import torch

from larp_mllm import LARPTokenizer, TOKENIZER_PRESETS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call of fn()."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_mem_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def build_tokenizer(preset: str, device: torch.device, compile: bool) -> LARPTokenizer:
    """A randomly initialised tokenizer on `device`, input checks off (no host syncs), optionally compiled."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    tok = LARPTokenizer.from_preset(preset).to(device)
    tok.check_inputs = False
    if compile:
        tok.encoder = torch.compile(tok.encoder)
        tok.decoder = torch.compile(tok.decoder)
        if tok.prior_model is not None:
            tok.prior_model = torch.compile(tok.prior_model)
    return tok


def reference_train_step(tok: LARPTokenizer, video: torch.Tensor, autocast) -> Callable[[], None]:
    """The step of the reference's measurement: forward + L1 + 0.1 VQ + 0.06 prior + backward + Adam (0.5, 0.9).

    Puts `tok` in training mode."""
    tok.train()
    opt = torch.optim.Adam(tok.parameters(), lr=1e-4, betas=(0.5, 0.9), fused=video.device.type == "cuda")

    def step() -> None:
        with autocast:
            out = tok(video, ss_ratio=0.3)
            loss = (out.recon.float() - video).abs().mean() + 0.1 * out.vq_loss
            if out.prior_loss is not None:
                loss = loss + 0.06 * out.prior_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="larp-tiny", choices=sorted(TOKENIZER_PRESETS))
    ap.add_argument("--batch", type=int, default=8, help="batch for encode/decode")
    ap.add_argument("--train-batch", type=int, default=None, help="batch for the training step (default: --batch)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (fp32 = none)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder/decoder/prior")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["encode", "decode", "train"])
    args = ap.parse_args()

    device = torch.device(args.device)
    tok = build_tokenizer(args.preset, device, args.compile)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    common = {"preset": args.preset, "dtype": args.dtype, "compile": args.compile, "device": card}

    def emit(metric: str, batch: int, seconds: float) -> None:
        row = {"bench": "tokenizer_speed", "metric": metric, "batch": batch, "videos_per_s": batch / seconds,
               "seconds_per_iter": seconds, "peak_mem_gb": peak_mem_gb(device), **common}
        print(json.dumps(row), flush=True)

    video = torch.rand(args.batch, *tok.video_shape, device=device)
    tok.eval()
    codes = tok.tokenize(video)
    if "encode" not in args.skip:
        reset_mem(device)
        with autocast:
            emit("encode", args.batch, timed(lambda: tok.tokenize(video), device, args.warmup, args.iters))
    if "decode" not in args.skip:
        reset_mem(device)
        with autocast:
            emit("decode", args.batch, timed(lambda: tok.decode_codes(codes), device, args.warmup, args.iters))
    if "train" not in args.skip:
        tb = args.train_batch or args.batch
        train_video = torch.rand(tb, *tok.video_shape, device=device)
        step = reference_train_step(tok, train_video, autocast)
        reset_mem(device)
        emit("train_step", tb, timed(step, device, args.warmup, args.iters))


if __name__ == "__main__":
    main()
