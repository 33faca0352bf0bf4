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

from larp_mllm import LARPTokenizer


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
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tokenizer_profile.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    tok = LARPTokenizer.from_preset(args.preset).to(dev)
    tok.check_inputs = False
    if args.compile:
        tok.encoder, tok.decoder = torch.compile(tok.encoder), torch.compile(tok.decoder)
    video = torch.rand(args.batch, *tok.video_shape, device=dev)
    train_video = torch.rand(args.train_batch, *tok.video_shape, device=dev)
    opt = torch.optim.Adam(tok.parameters(), lr=1e-4, betas=(0.5, 0.9), fused=True)
    ac = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    codes = tok.eval().tokenize(video)

    def train_step() -> None:
        tok.train()
        with ac:
            out = tok(train_video, ss_ratio=0.3)
            loss = (out.recon.float() - train_video).abs().mean() + 0.1 * out.vq_loss + 0.06 * out.prior_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    phases = {"encode": lambda: tok.eval().tokenize(video), "decode": lambda: tok.eval().decode_codes(codes),
              "train_step": train_step}
    for name, fn in phases.items():
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
