"""Where the tokenizer's GPU time goes: torch.profiler tables for encode, decode and the training step.

    python bench/tokenizer_profile.py --preset larp-l-long --batch 64 --train-batch 16 --dtype bf16 [--compile]

Prints, per phase, the top CUDA kernels by total time (one table each) and one JSON line per phase with the share
of GEMM, attention and other kernels. A development tool: the figures to report come from tokenizer_speed.py.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from tokenizer_speed import DTYPES, build_tokenizer, reference_train_step  # bench/ is on sys.path when run as a script


def kind(name: str) -> str:
    n = name.lower()
    if "flash" in n or "fmha" in n or "attention" in n or "sdpa" in n:
        return "attention"
    if "gemm" in n or "cutlass" in n or "sm90_xmma" in n or "nvjet" in n or "matmul" in n:
        return "gemm"
    return "other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="larp-l-long")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tokenizer_profile.py needs a CUDA GPU")
    dev = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    tok = build_tokenizer(args.preset, dev, args.compile).eval()
    video = torch.rand(args.batch, *tok.video_shape, device=dev)
    ac = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    codes = tok.tokenize(video)
    # phase -> a factory of the function to profile (the train step puts the model in training mode)
    phases = {"encode": lambda: lambda: tok.tokenize(video), "decode": lambda: lambda: tok.decode_codes(codes),
              "train_step": lambda: reference_train_step(
                  tok, torch.rand(args.train_batch, *tok.video_shape, device=dev), ac)}
    for name, make in phases.items():
        fn = make()
        with ac:
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof, ac:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.device_time_total for e in events)
        shares: dict[str, float] = {}
        for e in events:
            shares[kind(e.key)] = shares.get(kind(e.key), 0.0) + e.device_time_total / total
        print(f"\n== {name}: {total / 3 / 1e3:.1f} ms of kernels per iteration")
        for e in sorted(events, key=lambda e: -e.device_time_total)[: args.rows]:
            print(f"{100 * e.device_time_total / total:5.1f}%  {e.count // 3:5d}x  {e.key[:110]}")
        print(json.dumps({"bench": "tokenizer_profile", "phase": name, "kernel_ms_per_iter": round(total / 3e3, 2),
                          **{f"share_{k}": round(v, 3) for k, v in sorted(shares.items())},
                          "compile": args.compile, "device": torch.cuda.get_device_name(dev)}), flush=True)


if __name__ == "__main__":
    main()
