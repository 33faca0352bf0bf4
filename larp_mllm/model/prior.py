"""The small causal prior LARP trains jointly with the tokenizer (the reference's `gptc`).

A minGPT-style transformer over *continuous* code vectors: it reads the quantized (unit-norm) vectors of
positions 0..N-2 and predicts a unit vector for positions 1..N-1. Its logits over the codebook are the cosine
similarity with the detached, normalised codebook divided by a temperature. The loss is cross-entropy against the
sampled code indices, averaged over rounds of scheduled sampling (`prior_loss`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizer import safe_probs

# (layers, width, heads) of the reference's sizes, plus a CPU-size one for tests and demos.
PRIOR_PRESETS: dict[str, tuple[int, int, int]] = {
    "gptc-B": (12, 768, 12),
    "gptc-M": (12, 512, 8),
    "gptc-S": (12, 384, 6),
    "gptc-XS": (6, 384, 6),
    "gptc-XXS": (6, 256, 4),
    "gptc-tiny": (2, 128, 4),
}


class CausalSelfAttention(nn.Module):
    """Separate key/query/value/proj Linears (reference key names), causal SDPA."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"prior width {width} is not divisible by {heads} heads")
        self.key = nn.Linear(width, width)
        self.query = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.heads = heads
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        shape = (b, n, self.heads, c // self.heads)
        k = self.key(x).view(shape).transpose(1, 2)  # (B, H, N, hd)
        q = self.query(x).view(shape).transpose(1, 2)  # (B, H, N, hd)
        v = self.value(x).view(shape).transpose(1, 2)  # (B, H, N, hd)
        # The reference keeps attention dropout on in eval mode (a bug); we apply it only in training.
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, H, N, hd)
        y = y.transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.resid_drop(self.proj(y))


class PriorBlock(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.ln2 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ContinuousPrior(nn.Module):
    """Causal transformer: code vectors (B, n, d) -> unit-norm next-vector predictions (B, n, d)."""

    def __init__(self, code_dim: int, layers: int, width: int, heads: int, max_len: int, dropout: float = 0.1):
        super().__init__()
        self.max_len = max_len
        self.input_proj = nn.Linear(code_dim, width)
        self.pos_emb = nn.Parameter(torch.randn(1, max_len, width) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[PriorBlock(width, heads, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, code_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n > self.max_len:
            raise ValueError(f"prior sequence of {n} vectors exceeds its maximum length {self.max_len}")
        h = self.drop(self.input_proj(x) + self.pos_emb[:, :n])  # (B, n, W)
        h = self.ln_f(self.blocks(h))
        return F.normalize(self.head(h), dim=-1)  # (B, n, d)


@dataclass
class PriorLossOutput:
    loss: torch.Tensor  # CE averaged over positions 1..N-1 and rounds
    top1: torch.Tensor  # round-1 top-1 accuracy (fraction)
    top5: torch.Tensor  # round-1 top-5 accuracy (fraction)


def prior_logits_from_vectors(
    prior: ContinuousPrior, vectors: torch.Tensor, codebook: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Teacher-forced logits: vectors (B, N, d) -> (B, N-1, K) for positions 1..N-1."""
    pred = prior(vectors[:, :-1])  # (B, N-1, d)
    return (pred.float() @ codebook.detach().t()) / temperature  # (B, N-1, K)


def prior_loss(
    prior: ContinuousPrior,
    vectors: torch.Tensor,
    targets: torch.Tensor,
    codebook: torch.Tensor,
    ss_ratio: float,
    temperature: float = 1.0,
    n_rounds: int = 2,
) -> PriorLossOutput:
    """Scheduled-sampling prior loss (the reference's "mix_ss").

    vectors: (B, N, d) straight-through code vectors (the gradient reaches the encoder through them);
    targets: (B, N) sampled code indices; codebook: (K, d) normalised (detached here).
    Round 1 is teacher-forced; each later round replaces the input at positions j >= 1, with probability
    `ss_ratio` (one mask for all rounds, shared across the d dims), by a code sampled from the previous round's
    prediction for j. The CE is averaged over rounds with equal weight.
    """
    codebook = codebook.detach()
    b, n, d = vectors.shape
    labels = targets[:, 1:]  # (B, N-1)
    mask = (torch.rand(b, n - 1, 1, device=vectors.device) < ss_ratio).expand(-1, -1, d)  # (B, N-1, d)
    inputs = vectors
    losses, first_logits = [], None
    for round_idx in range(n_rounds):
        logits = prior_logits_from_vectors(prior, inputs, codebook, temperature)  # (B, N-1, K)
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))
        if first_logits is None:
            first_logits = logits
        if round_idx < n_rounds - 1:
            with torch.autocast(device_type=vectors.device.type, enabled=False):
                probs = safe_probs(F.softmax(logits.detach().float(), dim=-1))
                sampled = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(b, n - 1)
            mixed = torch.where(mask, F.embedding(sampled, codebook).to(vectors.dtype), vectors[:, 1:])
            inputs = torch.cat([vectors[:, :1], mixed], dim=1)  # (B, N, d)
    with torch.no_grad():
        top5 = first_logits.topk(min(5, first_logits.shape[-1]), dim=-1).indices  # (B, N-1, 5)
        top1_acc = (top5[..., 0] == labels).float().mean()
        top5_acc = (top5 == labels.unsqueeze(-1)).any(-1).float().mean()
    return PriorLossOutput(torch.stack(losses).mean(), top1_acc, top5_acc)
