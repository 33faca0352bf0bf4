"""Does the prior loss make LARP codes easier for an AR model? A with / without ablation on the synthetic set.

    OMP_NUM_THREADS=1 python bench/prior_ablation.py --out runs/prior_ablation    # ~15 min on 2 CPU cores

1. Two tiny tokenizers are trained with `larp-train-tokenizer` (configs/tokenizer/larp_tiny_cpu.yaml), same seed
   and steps, one with the prior loss (weight 0.06) and one without (weight 0, prior frozen).
2. Held-out synthetic clips (never seen by the tokenizers) are tokenized deterministically: every non-overlapping
   window, plain and flipped. The held-out clips are split in two: a small causal transformer (the "AR model",
   identical seed and schedule for both variants) is fitted on the codes of one half, and its next-token NLL is
   measured on the other half (the AR model is early-stopped on a tenth of its fitting half).
Prints JSON lines per variant: held-out NLL (nats/token), the held-out NLL of the code frequencies alone (unigram),
the AR gain (unigram NLL - NLL: what the AR model learns beyond code frequencies), the codes' entropy and perplexity
(usage), code usage, and the deterministic reconstruction PSNR of the held-out clips.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SET_STYLE = dict(background="plain", object_size="large")  # the tiny config's synthetic set


class TinyAR(nn.Module):
    """Causal transformer over code ids with a BOS token: codes (B, N) -> logits (B, N, K)."""

    def __init__(self, vocab: int, length: int, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.bos = vocab
        self.embed = nn.Embedding(vocab + 1, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(dim, vocab)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, n = codes.shape
        inputs = torch.cat([torch.full((b, 1), self.bos, dtype=codes.dtype), codes[:, :-1]], dim=1)  # (B, N)
        mask = nn.Transformer.generate_square_subsequent_mask(n)
        h = self.blocks(self.embed(inputs) + self.pos[:n], mask=mask, is_causal=True)  # (B, N, D)
        return self.head(h)  # (B, N, K)


def fit_ar(fit_codes: torch.Tensor, eval_codes: torch.Tensor, vocab: int, steps: int, seed: int) -> float:
    """Fit TinyAR on `fit_codes` (M, N); return the mean NLL (nats/token) on `eval_codes`.

    A tenth of `fit_codes` is held back for early stopping: the weights with the lowest NLL there (checked every 25
    steps) are the ones evaluated, so neither variant is judged on an overfitted model."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(fit_codes.shape[0], generator=g)
    n_val = max(1, fit_codes.shape[0] // 10)
    val_codes, train_codes = fit_codes[order[:n_val]], fit_codes[order[n_val:]]
    model = TinyAR(vocab, train_codes.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)

    def nll(codes: torch.Tensor) -> float:
        model.eval()
        with torch.no_grad():
            value = F.cross_entropy(model(codes).reshape(-1, vocab), codes.reshape(-1)).item()
        model.train()
        return value

    best, best_state = float("inf"), None
    for step in range(steps):
        idx = torch.randint(0, train_codes.shape[0], (min(64, train_codes.shape[0]),), generator=g)
        batch = train_codes[idx]
        loss = F.cross_entropy(model(batch).reshape(-1, vocab), batch.reshape(-1))
        for group in opt.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            v = nll(val_codes)
            if v < best:
                best, best_state = v, {k: t.clone() for k, t in model.state_dict().items()}
    model.load_state_dict(best_state)
    return nll(eval_codes)


def unigram_nll(fit_codes: torch.Tensor, eval_codes: torch.Tensor, vocab: int) -> float:
    """NLL of `eval_codes` under the add-one-smoothed code frequencies of `fit_codes` (no context at all)."""
    counts = torch.bincount(fit_codes.flatten(), minlength=vocab).double() + 1.0
    return -(counts / counts.sum()).log()[eval_codes.flatten()].mean().item()


@torch.no_grad()
def heldout_codes(folder: Path, csv: Path, frames: int):
    """Deterministic codes of every window (plain + flipped) of the held-out clips, grouped by clip."""
    from larp_mllm import LARPTokenizer
    from larp_mllm.data import ClipDataset, collate_clips, csv_records
    from larp_mllm.metrics import psnr

    tok = LARPTokenizer.from_pretrained(folder).eval()
    ds = ClipDataset(csv_records(csv), frames, tok.config.input_size, mode="chunks")
    batch = collate_clips([ds[i] for i in range(len(ds))])
    video = torch.cat([batch.video, batch.video.flip(-1)])  # (2M, 3, T, H, W)
    clip = torch.cat([batch.index, batch.index])  # (2M,) held-out clip of each window
    codes = torch.cat([tok.tokenize(v, deterministic=True) for v in video.split(16)])  # (2M, N)
    recon = torch.cat([tok.decode_codes(c) for c in codes[: len(batch.video)].split(16)])
    return codes, clip, psnr(recon, batch.video).mean().item(), tok.codebook_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/prior_ablation")
    p.add_argument("--steps", type=int, default=2000, help="tokenizer training steps (each variant); the tiny "
                   "tokenizer starts using its codes after ~1200 steps")
    p.add_argument("--ar_steps", type=int, default=1000, help="AR fitting steps (early-stopped on a held-back tenth)")
    p.add_argument("--per_class", type=int, default=64, help="synthetic training clips per class")
    p.add_argument("--heldout_per_class", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more trainer overrides")
    args = p.parse_args()
    from larp_mllm.synthetic import make_synthetic_dataset

    out = Path(args.out)
    frames = 8
    train_csv = out / "data" / "train" / "synthetic.csv"
    heldout_csv = out / "data" / f"heldout_{args.heldout_per_class}" / "synthetic.csv"
    if not train_csv.is_file():
        make_synthetic_dataset(train_csv.parent, 4, args.per_class, seed=args.seed, frames=2 * frames, size=32,
                               **SET_STYLE)
    if not heldout_csv.is_file():
        make_synthetic_dataset(heldout_csv.parent, 4, args.heldout_per_class, seed=args.seed + 1000,
                               frames=2 * frames, size=32, **SET_STYLE)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    for variant, weight in (("with_prior", "0.06"), ("without_prior", "0")):
        run = out / variant
        if not (run / "final" / "model.safetensors").is_file():
            cmd = [sys.executable, "-m", "tokenizer_training.train", "--config",
                   str(REPO / "configs/tokenizer/larp_tiny_cpu.yaml"), "--output_dir", str(run),
                   "--train_data", str(train_csv), "--val_data", str(heldout_csv), "--max_steps", str(args.steps),
                   "--checkpoint_every", str(args.steps), "--val_every", "0", "--seed", str(66667 + args.seed),
                   "--prior_weight", weight, *args.extra]
            subprocess.run(cmd, cwd=REPO, env=env, check=True)
        codes, clip, rec_psnr, k = heldout_codes(run / "final", heldout_csv, frames)
        fit = clip % 2 == 0  # half of the held-out clips fit the AR model, the other half evaluate it
        nll = fit_ar(codes[fit], codes[~fit], k, args.ar_steps, args.seed)
        unigram = unigram_nll(codes[fit], codes[~fit], k)
        hist = torch.bincount(codes.flatten(), minlength=k).double()
        prob = hist[hist > 0] / hist.sum()
        entropy = -(prob * prob.log()).sum().item()
        common = {"bench": "prior_ablation", "variant": variant, "device": "cpu", "tokenizer_steps": args.steps,
                  "heldout_sequences": int(codes.shape[0])}
        for metric, value, unit in (("heldout_nll", nll, "nats/token"), ("code_entropy", entropy, "nats"),
                                    ("code_perplexity", math.exp(entropy), "codes"),
                                    ("heldout_unigram_nll", unigram, "nats/token"),
                                    ("ar_gain", unigram - nll, "nats/token"),
                                    ("code_usage", (hist > 0).double().mean().item(), "fraction"),
                                    ("recon_psnr", rec_psnr, "dB")):
            print(json.dumps({**common, "metric": metric, "value": round(value, 4), "unit": unit}), flush=True)


if __name__ == "__main__":
    main()
