"""Reconstruction metrics on videos (B, 3, T, H, W) in [0, 1]: MSE, PSNR, SSIM, perceptual distance.

Every function returns one value per video (B,), so callers can average over a dataset or keep the spread.
Predictions and targets are clamped to [0, 1] first (the decoder output is unclamped).

* PSNR, as the LARP reference (``eval/rfvd_evaluator.py``): per video, -10 log10(MSE over C, T, H, W); the dataset
  figure is the mean of the per-video values (not the PSNR of the mean MSE). MSE is floored at 1e-10 (100 dB).
* SSIM (Wang et al. 2004): Gaussian window 11, sigma 1.5, "valid" filtering (no padding), K1 = 0.01, K2 = 0.03,
  data range 1, computed on each frame and each RGB channel separately and averaged over pixels, channels and
  frames. This equals the reference trainer's ``pytorch_msssim.ssim`` on (B*C, T, H, W), which treats frames as
  channels and averages them.
* Perceptual: the LPIPS-family distance of ``larp_mllm.eval.perceptual`` per frame, averaged over frames (the reference
  reports LPIPS-VGG; the offline default here is ST-LPIPS-VGG, so the numbers are close to but not LPIPS).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
_MSE_FLOOR = 1e-10


def _check_videos(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape or pred.ndim != 5 or pred.shape[1] != 3:
        raise ValueError(f"expected two videos (B, 3, T, H, W) of equal shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    return pred.float().clamp(0, 1), target.float().clamp(0, 1)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Per-video mean squared error on [0, 1]-clamped videos (B, 3, T, H, W) -> (B,)."""
    pred, target = _check_videos(pred, target)
    return (pred - target).pow(2).flatten(1).mean(dim=1)


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Per-video PSNR in dB, -10 log10(MSE) with peak 1 -> (B,)."""
    return -10.0 * torch.log10(mse(pred, target).clamp_min(_MSE_FLOOR))


def _gaussian_window(size: int, sigma: float, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def _blur_valid(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian filter without padding on (N, 1, H, W) -> (N, 1, H-10, W-10)."""
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    return F.conv2d(x, g.view(1, 1, 1, -1))


def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Per-video SSIM (mean over frames, channels and valid pixels) -> (B,). Frames must be >= 11x11."""
    pred, target = _check_videos(pred, target)
    b, c, t, h, w = pred.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    x = pred.reshape(b * c * t, 1, h, w)  # (B*C*T, 1, H, W): every channel of every frame on its own
    y = target.reshape(b * c * t, 1, h, w)
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, pred.device)
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = _blur_valid(x, g), _blur_valid(y, g)
    var_x = _blur_valid(x * x, g) - mu_x.pow(2)
    var_y = _blur_valid(y * y, g) - mu_y.pow(2)
    cov = _blur_valid(x * y, g) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return ssim_map.reshape(b, -1).mean(dim=1)  # (B,)


def perceptual_distance(pred: Tensor, target: Tensor, net: nn.Module) -> Tensor:
    """Per-video perceptual distance with `net` (a ``larp_mllm.eval.perceptual.PerceptualDistance``), mean over
    frames -> (B,). No gradient (use the module directly as a loss)."""
    pred, target = _check_videos(pred, target)
    device = next(net.buffers()).device
    with torch.no_grad():
        return net(pred.to(device), target.to(device)).to(pred.device)


@dataclass
class ReconMetrics:
    """Per-video metrics of one batch, each (B,); `perceptual` is None when no network was given."""

    mse: Tensor
    psnr: Tensor
    ssim: Tensor
    perceptual: Tensor | None = None


@torch.no_grad()
def reconstruction_metrics(pred: Tensor, target: Tensor, perceptual_net: nn.Module | None = None) -> ReconMetrics:
    """MSE, PSNR, SSIM (and perceptual distance) of videos (B, 3, T, H, W) against their targets."""
    per_video_mse = mse(pred, target)
    return ReconMetrics(
        mse=per_video_mse,
        psnr=-10.0 * torch.log10(per_video_mse.clamp_min(_MSE_FLOOR)),
        ssim=ssim(pred, target),
        perceptual=None if perceptual_net is None else perceptual_distance(pred, target, perceptual_net),
    )
