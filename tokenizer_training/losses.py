"""Losses of LARP tokenizer training (larp-spec 3.1).

Generator:      L = l1 * mean|x - x^| + l2 * mean (x - x^)^2 + perceptual * LPIPS(x, x^) + gan * L_G + vq * loss_q
                    + prior * L_prior + entropy * L_entropy (codebook usage; off in the reference)
Discriminator:  L_D = BCE(D(x), 1 - |N(0,1)| s, >= 0.7) + BCE(D(x^), |N(0,1)| s, <= 0.3) + lecam * R_LeCam

`ns_smooth` is the non-saturating GAN loss with noisy labels; the generator term is -mean(logsigmoid(D(x^))) with a
fixed weight (no adaptive VQGAN weight). LeCam (Yu et al. 2021) keeps EMAs of the mean real/fake logits; the
reference multiplies its weight in twice (0.001 -> effectively 1e-6); `lecam_reference_double_weight` reproduces that.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from larp_mllm import TokenizerOutput

__all__ = [
    "GeneratorLosses", "DiscriminatorLosses", "LeCamEMA", "TokenizerLoss",
    "d_loss_ns_smooth", "g_loss_nonsaturating", "lecam_regularizer",
]


@dataclass
class GeneratorLosses:
    """Weighted total (the tensor to backpropagate) and the unweighted terms (scalars, for logging)."""

    total: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor
    perceptual: torch.Tensor
    gan: torch.Tensor
    vq: torch.Tensor
    prior: torch.Tensor
    entropy: torch.Tensor


@dataclass
class DiscriminatorLosses:
    total: torch.Tensor
    gan: torch.Tensor
    lecam: torch.Tensor
    logits_real: torch.Tensor  # mean D logit on real clips (detached)
    logits_fake: torch.Tensor  # mean D logit on reconstructions (detached)


# ----------------------------------------------------------------------------------------------------------------------
# GAN terms
# ----------------------------------------------------------------------------------------------------------------------
def d_loss_ns_smooth(logits_real: torch.Tensor, logits_fake: torch.Tensor, noise: float = 0.15) -> torch.Tensor:
    """Discriminator BCE with noisy labels: real targets 1 - |N(0,1)|*noise clamped >= 0.7, fake targets
    |N(0,1)|*noise clamped <= 0.3 (one draw per logit from the global torch RNG). Logits (B,) -> scalar."""
    logits_real, logits_fake = logits_real.float(), logits_fake.float()
    t_real = (1.0 - torch.randn_like(logits_real).abs() * noise).clamp(min=0.7)
    t_fake = (torch.randn_like(logits_fake).abs() * noise).clamp(max=0.3)
    return (F.binary_cross_entropy_with_logits(logits_real, t_real)
            + F.binary_cross_entropy_with_logits(logits_fake, t_fake))


def g_loss_nonsaturating(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator non-saturating loss -mean(log sigmoid(D(x^)))."""
    return -F.logsigmoid(logits_fake.float()).mean()


@dataclass
class LeCamEMA:
    """EMAs of the mean discriminator logits on real and fake clips (start at 0, as the LeCam paper's code)."""

    real: float = 0.0
    fake: float = 0.0
    decay: float = 0.999

    def update(self, mean_real: float, mean_fake: float) -> None:
        self.real = self.decay * self.real + (1.0 - self.decay) * float(mean_real)
        self.fake = self.decay * self.fake + (1.0 - self.decay) * float(mean_fake)


def lecam_regularizer(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema: LeCamEMA) -> torch.Tensor:
    """R = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x^))^2)."""
    return (F.relu(logits_real.float() - ema.fake).pow(2).mean()
            + F.relu(ema.real - logits_fake.float()).pow(2).mean())


# ----------------------------------------------------------------------------------------------------------------------
# Perceptual (the network itself: larp_mllm.eval.perceptual.build_perceptual)
# ----------------------------------------------------------------------------------------------------------------------
def perceptual_video(net: nn.Module, video: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean per-frame perceptual distance; videos (B, 3, T, H, W) in [0, 1] (recon unclamped)."""
    return net(recon.float(), video.float()).mean()


# ----------------------------------------------------------------------------------------------------------------------
# The whole objective
# ----------------------------------------------------------------------------------------------------------------------
class TokenizerLoss(nn.Module):
    """Holds the weights and the frozen perceptual network; computes both players' losses."""

    def __init__(self, args, perceptual: Optional[nn.Module] = None):
        """`args`: a LossArguments (weights, GAN/LeCam settings)."""
        super().__init__()
        self.args = args
        self.perceptual = perceptual if args.perceptual_weight > 0 else None
        w = args.lecam_weight
        self.lecam_weight = w * w if args.lecam_reference_double_weight else w

    def generator(
        self, video: torch.Tensor, out: TokenizerOutput, fake_logits: Optional[torch.Tensor] = None
    ) -> GeneratorLosses:
        """video (B,3,T,H,W) in [0,1]; `fake_logits` = D(out.recon) (B,) with D frozen, or None (no GAN term)."""
        a = self.args
        recon = out.recon
        zero = recon.new_zeros((), dtype=torch.float32)
        diff = video.float() - recon.float()
        l1, l2 = diff.abs().mean(), diff.square().mean()
        perc = perceptual_video(self.perceptual, video, recon) if self.perceptual is not None else zero
        prior = out.prior_loss.float() if out.prior_loss is not None and a.prior_weight > 0 else zero
        entropy = out.entropy_loss.float() if out.entropy_loss is not None and a.entropy_weight > 0 else zero
        vq = out.vq_loss.float()
        total = (a.l1_weight * l1 + a.l2_weight * l2 + a.perceptual_weight * perc + a.vq_weight * vq
                 + a.prior_weight * prior + a.entropy_weight * entropy)
        base = GeneratorLosses(total, l1.detach(), l2.detach(), perc.detach(), zero, vq.detach(), prior.detach(),
                               entropy.detach())
        return self.add_adversarial(base, fake_logits)

    def add_adversarial(self, losses: GeneratorLosses, fake_logits: Optional[torch.Tensor]) -> GeneratorLosses:
        """`losses` plus gan_weight * (-mean log sigmoid D(x^)); unchanged when `fake_logits` is None."""
        if fake_logits is None or self.args.gan_weight == 0:
            return losses
        gan = g_loss_nonsaturating(fake_logits)
        return dataclasses.replace(losses, total=losses.total + self.args.gan_weight * gan, gan=gan.detach())

    def discriminator(
        self, disc: nn.Module, video: torch.Tensor, recon: torch.Tensor, ema: LeCamEMA
    ) -> DiscriminatorLosses:
        """D loss on real clips and detached reconstructions (B,3,T,H,W). `ema` is read, not updated."""
        logits_real = disc(video)  # (B,)
        logits_fake = disc(recon.detach())  # (B,)
        gan = d_loss_ns_smooth(logits_real, logits_fake, self.args.gan_label_noise)
        lecam = lecam_regularizer(logits_real, logits_fake, ema) if self.lecam_weight > 0 else gan.new_zeros(())
        total = gan + self.lecam_weight * lecam
        return DiscriminatorLosses(total, gan.detach(), lecam.detach(),
                                   logits_real.detach().float().mean(), logits_fake.detach().float().mean())
