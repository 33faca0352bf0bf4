"""Does the prior loss make LARP codes easier for an AR model? A with / without ablation on the synthetic set.

    OMP_NUM_THREADS=1 python bench/prior_ablation.py --output-dir runs/prior_ablation --seed 0   # ~20 min on 2 CPU cores
    python bench/prior_ablation.py --aggregate runs/seed*.log          # pool the printed lines of several seeds

1. Tiny tokenizers are trained with `larp-train-tokenizer` (configs/tokenizer/larp_tiny_cpu.yaml), same seed and
   steps: one without the prior loss (weight 0, prior frozen) and one per `--prior_weights` (default: the recipe's
   0.06). Every arm adds the same codebook-usage term (`--entropy_weight`, default 0.01): without it the arm without
   the prior collapsed onto ~5 codes in 3 of 4 seeds, and a low-entropy code stream has a low NLL for that reason
   alone, so the arms were not comparable.
2. Held-out synthetic clips (never seen by the tokenizers) are tokenized deterministically: every non-overlapping
   window, plain and flipped. Two small causal transformers (the "AR models", identical seed and schedule for every
   arm) are fitted on the codes of half of the held-out clips and scored on the other half, then the halves swap
   (cross-fitting: every clip is scored once, by a model that never saw it); each is early-stopped on a tenth of its
   fitting half. One reads codes as plain learned embeddings (as the reference's AR generator does), the other
   through MLPs over the frozen code vectors, as our LLM adapter does (`llm_adapters.adapter`).
Prints JSON lines per arm: held-out NLL under both AR models (nats/token), the NLL of the code frequencies alone
(unigram) and of the per-position frequencies, the AR gain (unigram NLL - NLL), the codes' entropy and perplexity
(usage), code usage and the deterministic reconstruction PSNR; then one summary line per prior arm: NLL with /
without, the usage (perplexity) ratio, the PSNR gap, whether they are comparable (ratio in [0.8, 1.25], gap <= 1 dB)
and whether the prior lowered the NLL. `--aggregate` pairs the arms of several seeds and fits the change in NLL
against the change in PSNR: its intercept is the NLL change at equal reconstruction quality.
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
TINY_CONFIG = REPO / "configs/tokenizer/larp_tiny_cpu.yaml"


class TinyAR(nn.Module):
    """Causal transformer over code ids with a learned BOS: codes (B, N) -> logits (B, N, K).

    With `codebook` (K, d) it reads and writes codes the way our LLM adapter does (llm_adapters.adapter): input rows
    and output rows are MLPs over the frozen code vectors, logits carry a learned temperature. Without it, codes
    are plain learned embeddings and a linear head (the reference's AR generator)."""

    def __init__(self, vocab: int, length: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 codebook: torch.Tensor | None = None):
        super().__init__()
        if codebook is None:
            self.embed, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)
        else:
            from llm_adapters.adapter import VideoTokenEmbedding, VideoTokenHead

            zeros, ones = torch.zeros(dim), torch.ones(dim)  # rows start RMS-normalised (shift 0, scale 1)
            self.embed = VideoTokenEmbedding(codebook, dim, zeros, ones)
            self.head = VideoTokenHead(codebook, dim, zeros, ones)
        self.bos = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, n = codes.shape
        x = torch.cat([self.bos.expand(b, 1, -1), self.embed(codes[:, :-1])], dim=1)  # (B, N, D)
        mask = nn.Transformer.generate_square_subsequent_mask(n)
        h = self.blocks(x + self.pos[:n], mask=mask, is_causal=True)  # (B, N, D)
        return self.head(self.norm(h))  # (B, N, K)


def fit_ar(fit_codes: torch.Tensor, eval_codes: torch.Tensor, vocab: int, steps: int, seed: int,
           codebook: torch.Tensor | None = None) -> float:
    """Fit TinyAR (codebook-aware when `codebook` is given) on `fit_codes` (M, N); return the mean NLL
    (nats/token) on `eval_codes`.

    A tenth of `fit_codes` is held back for early stopping: the weights with the lowest NLL there (checked every 25
    steps) are the ones evaluated, so neither variant is judged on an overfitted model."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(fit_codes.shape[0], generator=g)
    n_val = max(1, fit_codes.shape[0] // 10)
    val_codes, train_codes = fit_codes[order[:n_val]], fit_codes[order[n_val:]]
    model = TinyAR(vocab, train_codes.shape[1], codebook=codebook)
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


def position_unigram_nll(fit_codes: torch.Tensor, eval_codes: torch.Tensor, vocab: int) -> float:
    """NLL of `eval_codes` (M, N) under add-one-smoothed per-position code frequencies of `fit_codes`: what the
    position alone predicts (the AR model's gain beyond this is what the context of earlier codes adds)."""
    n = fit_codes.shape[1]
    counts = torch.stack([torch.bincount(fit_codes[:, i], minlength=vocab) for i in range(n)]).double() + 1.0
    log_p = (counts / counts.sum(-1, keepdim=True)).log()  # (N, K)
    return -log_p.gather(1, eval_codes.t()).mean().item()


def cross_fitted(metric, codes: torch.Tensor, clip: torch.Tensor, *args, fit_every: int = 1) -> float:
    """Mean of `metric(fit, eval, *args)` over the two halves of the held-out clips (even / odd clip ids), each
    half fitting once and evaluating once: every held-out clip is scored, by a model that never saw it. With
    `fit_every` n > 1 only every n-th clip of the fitting half is fitted on (a data-limited fit)."""
    half = clip % 2 == 0
    used = (clip // 2) % fit_every == 0  # (2M,) every n-th clip id within each half
    return 0.5 * (metric(codes[half & used], codes[~half], *args) + metric(codes[~half & used], codes[half], *args))


@torch.no_grad()
def heldout_codes(folder: Path, csv: Path, frames: int):
    """Deterministic codes of every window (plain + flipped) of the held-out clips, grouped by clip."""
    from larp_mllm import LARPTokenizer
    from larp_mllm.data.records import csv_records
    from larp_mllm.data.clips import ClipDataset, collate_clips
    from larp_mllm.eval.metrics import psnr

    tok = LARPTokenizer.from_pretrained(folder).eval()
    ds = ClipDataset(csv_records(csv), frames, tok.config.input_size, mode="chunks")
    batch = collate_clips([ds[i] for i in range(len(ds))])
    video = torch.cat([batch.video, batch.video.flip(-1)])  # (2M, 3, T, H, W)
    clip = torch.cat([batch.index, batch.index])  # (2M,) held-out clip of each window
    codes = torch.cat([tok.tokenize(v, deterministic=True) for v in video.split(16)])  # (2M, N)
    recon = torch.cat([tok.decode_codes(c) for c in codes[: len(batch.video)].split(16)])
    return codes, clip, psnr(recon, batch.video).mean().item(), tok.codebook()


def train_tokenizer(run: Path, train_csv: Path, heldout_csv: Path, prior_weight: float, args) -> Path:
    """One arm: the tiny config with `prior_weight` (0 freezes the prior) and the shared overrides; skipped when
    its final export exists (a rerun only re-measures)."""
    if not (run / "final" / "model.safetensors").is_file():
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        cmd = [sys.executable, "-m", "tokenizer_training.train", "--config",
               str(TINY_CONFIG), "--output_dir", str(run),
               "--train_data", str(train_csv), "--val_data", str(heldout_csv), "--max_steps", str(args.steps),
               "--checkpoint_every", str(args.steps), "--val_every", "0", "--seed", str(66667 + args.seed),
               "--entropy_weight", str(args.entropy_weight), "--prior_weight", str(prior_weight), *args.extra]
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return run / "final"


def measure(folder: Path, heldout_csv: Path, frames: int, args) -> dict[str, tuple[float, str]]:
    """The ablation's figures for one trained tokenizer: {metric: (value, unit)}."""
    codes, clip, rec_psnr, codebook = heldout_codes(folder, heldout_csv, frames)
    k = codebook.shape[0]
    every = dict(fit_every=args.ar_fit_every)
    nll = cross_fitted(fit_ar, codes, clip, k, args.ar_steps, args.seed, **every)
    nll_codebook = cross_fitted(fit_ar, codes, clip, k, args.ar_steps, args.seed, codebook, **every)
    unigram = cross_fitted(unigram_nll, codes, clip, k, **every)
    positional = cross_fitted(position_unigram_nll, codes, clip, k, **every)
    hist = torch.bincount(codes.flatten(), minlength=k).double()
    prob = hist[hist > 0] / hist.sum()
    entropy = -(prob * prob.log()).sum().item()
    return {"heldout_nll": (nll, "nats/token"), "heldout_nll_codebook_ar": (nll_codebook, "nats/token"),
            "code_entropy": (entropy, "nats"),
            "code_perplexity": (math.exp(entropy), "codes"), "heldout_unigram_nll": (unigram, "nats/token"),
            "heldout_position_unigram_nll": (positional, "nats/token"), "ar_gain": (unigram - nll, "nats/token"),
            "code_usage": ((hist > 0).double().mean().item(), "fraction"), "recon_psnr": (rec_psnr, "dB"),
            "heldout_sequences": (float(codes.shape[0]), "sequences")}


def comparable(perplexity_ratio, psnr_gap_db):
    """The criterion's "comparable usage and reconstruction": perplexity ratio in [0.8, 1.25], PSNR gap <= 1 dB
    (floats or tensors)."""
    return (perplexity_ratio >= 0.8) & (perplexity_ratio <= 1.25) & (abs(psnr_gap_db) <= 1.0)


def aggregate(logs: list[Path]) -> None:
    """Pool the per-arm lines of several runs (one seed each) and print, per prior arm, the paired changes
    (with - without) over seeds: NLL under both AR models, PSNR, how many seeds are comparable and how many of those
    the prior wins, and the least-squares line dNLL = a + b * dPSNR over seeds, whose intercept `a` is the NLL change
    expected at equal reconstruction quality (the prior can always buy NLL by reconstructing worse)."""
    table: dict[tuple[int, str], dict[str, float]] = {}
    for path in logs:
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.startswith('{"bench": "prior_ablation"') else {}
            if "value" in row and "seed" in row:
                table.setdefault((row["seed"], row["variant"]), {})[row["metric"]] = row["value"]
    for variant in sorted({v for _, v in table if v != "without_prior"}):
        pairs = [(table[s, variant], table[s, "without_prior"]) for s, v in sorted(table)
                 if v == variant and (s, "without_prior") in table]
        d_psnr = torch.tensor([a["recon_psnr"] - b["recon_psnr"] for a, b in pairs], dtype=torch.float64)
        ratio = torch.tensor([a["code_perplexity"] / b["code_perplexity"] for a, b in pairs], dtype=torch.float64)
        same = comparable(ratio, d_psnr)  # (S,) bool
        out = {"bench": "prior_ablation", "metric": "aggregate", "variant": variant, "seeds": len(pairs),
               "mean_psnr_gap_db": round(d_psnr.mean().item(), 3), "comparable_seeds": int(same.sum())}
        for ar, key in (("ids", "heldout_nll"), ("codebook", "heldout_nll_codebook_ar")):
            if not all(key in a and key in b for a, b in pairs):
                continue
            d = torch.tensor([a[key] - b[key] for a, b in pairs], dtype=torch.float64)  # (S,)
            design = torch.stack([torch.ones_like(d_psnr), d_psnr], dim=1)  # (S, 2)
            coef = torch.linalg.lstsq(design, d.unsqueeze(1)).solution.squeeze(1) if len(d) >= 3 else \
                torch.full((2,), float("nan"), dtype=torch.float64)  # (2,) intercept, slope: a line needs 3 seeds
            sd = d.std().item() if len(d) > 1 else 0.0
            out.update({f"mean_dnll_{ar}": round(d.mean().item(), 4), f"sd_dnll_{ar}": round(sd, 4),
                        f"paired_t_{ar}": round(d.mean().item() / (sd / math.sqrt(len(d))), 2) if sd > 0 else None,
                        f"prior_lower_{ar}": int((d < 0).sum()),
                        f"comparable_and_lower_{ar}": int(((d < 0) & same).sum()),
                        f"dnll_at_equal_psnr_{ar}": None if coef.isnan().any() else round(coef[0].item(), 4),
                        f"dnll_per_db_{ar}": None if coef.isnan().any() else round(coef[1].item(), 4)})
        print(json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/prior_ablation")
    p.add_argument("--steps", type=int, default=2000, help="tokenizer training steps (each variant)")
    p.add_argument("--prior_weights", type=float, nargs="+", default=[0.06],
                   help="prior loss weight of each 'with prior' arm (the recipe's 0.06; several give a dose-response)")
    p.add_argument("--entropy_weight", type=float, default=0.01,
                   help="codebook-usage term of every arm (0 = the tiny config as is: then the arm without the prior "
                        "often collapses onto a handful of codes, and usage is no longer comparable)")
    p.add_argument("--ar_steps", type=int, default=1000, help="AR fitting steps (early-stopped on a held-back tenth)")
    p.add_argument("--ar_fit_every", type=int, default=1,
                   help="fit the AR models on every n-th clip of each half only (a data-limited check; 1 = all)")
    p.add_argument("--per_class", type=int, default=64, help="synthetic training clips per class")
    p.add_argument("--heldout_per_class", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aggregate", nargs="+", type=Path, metavar="LOG",
                   help="only pool the printed lines of earlier runs (one setting, one seed per run) and print per-arm "
                        "aggregates")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more trainer overrides (every arm)")
    args = p.parse_args()
    if args.aggregate:
        return aggregate(args.aggregate)
    if args.ar_fit_every < 1:
        p.error(f"--ar_fit_every must be >= 1, got {args.ar_fit_every}")
    if any(w <= 0 for w in args.prior_weights):
        p.error(f"--prior_weights must be > 0 (the arm without the prior always runs), got {args.prior_weights}")
    from larp_mllm.data.synthetic import make_synthetic_dataset
    from tokenizer_training.arguments import parse_config

    data_cfg = parse_config(["--config", str(TINY_CONFIG)]).data  # the tiny config's synthetic set style
    style = dict(background=data_cfg.synthetic_background, object_size=data_cfg.synthetic_object_size)
    out = Path(args.output_dir)
    frames = 8
    train_csv = out / "data" / "train" / "synthetic.csv"
    heldout_csv = out / "data" / f"heldout_{args.heldout_per_class}" / "synthetic.csv"
    if not train_csv.is_file():
        make_synthetic_dataset(train_csv.parent, 4, args.per_class, seed=args.seed, frames=2 * frames, size=32,
                               **style)
    if not heldout_csv.is_file():
        make_synthetic_dataset(heldout_csv.parent, 4, args.heldout_per_class, seed=args.seed + 1000,
                               frames=2 * frames, size=32, **style)
    arms = [("without_prior", 0.0)] + [(f"prior_{w:g}", w) for w in args.prior_weights]
    results = {}
    for variant, weight in arms:
        folder = train_tokenizer(out / variant, train_csv, heldout_csv, weight, args)
        results[variant] = measure(folder, heldout_csv, frames, args)
        common = {"bench": "prior_ablation", "variant": variant, "prior_weight": weight, "device": "cpu",
                  "tokenizer_steps": args.steps, "entropy_weight": args.entropy_weight, "seed": args.seed,
                  "ar_fit_every": args.ar_fit_every, "extra": " ".join(args.extra)}
        for metric, (value, unit) in results[variant].items():
            print(json.dumps({**common, "metric": metric, "value": round(value, 4), "unit": unit}), flush=True)
    base = results["without_prior"]
    for variant, weight in arms[1:]:  # the criterion: lower NLL at comparable usage and reconstruction
        r = results[variant]
        usage_ratio = r["code_perplexity"][0] / base["code_perplexity"][0]
        psnr_gap = r["recon_psnr"][0] - base["recon_psnr"][0]
        nll = {ar: (r[key][0], base[key][0]) for ar, key in (("ids", "heldout_nll"),
                                                              ("codebook", "heldout_nll_codebook_ar"))}
        print(json.dumps({"bench": "prior_ablation", "metric": "summary", "variant": variant, "seed": args.seed,
                          "extra": " ".join(args.extra),
                          **{f"nll_{ar}_{side}": round(v[i], 4) for ar, v in nll.items()
                             for i, side in enumerate(("with", "without"))},
                          "perplexity_ratio": round(usage_ratio, 3), "psnr_gap_db": round(psnr_gap, 2),
                          "comparable": bool(comparable(usage_ratio, psnr_gap)),
                          **{f"prior_lowers_nll_{ar}": v[0] < v[1] for ar, v in nll.items()}}), flush=True)


if __name__ == "__main__":
    main()
