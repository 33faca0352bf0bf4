"""PSNR / SSIM / perceptual metrics on videos (B, 3, T, H, W)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from larp_mllm.eval.metrics import mse, perceptual_distance, psnr, reconstruction_metrics, ssim


def _videos(seed: int = 0, shape=(2, 3, 2, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=gen)
    pred = (target + 0.1 * torch.randn(shape, generator=gen)).clamp(0, 1)
    return pred, target


def test_psnr_is_per_video_and_clamps():
    target = torch.full((2, 3, 2, 8, 8), 0.5)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 -> 20 dB
    pred[1] += 0.01  # MSE 1e-4 -> 40 dB
    torch.testing.assert_close(psnr(pred, target), torch.tensor([20.0, 40.0]))
    # MSE floored at 1e-10; log10 may be rounded an ulp apart by the vectorised and the scalar math library
    assert psnr(target, target).tolist() == pytest.approx([100.0, 100.0], rel=1e-6)
    over = target.clone()
    over[0] = 3.0  # clamped to 1 -> MSE 0.25 -> 6.02 dB
    assert psnr(over, target)[0].item() == pytest.approx(-10 * math.log10(0.25), rel=1e-6)
    # the dataset figure is the mean of per-video PSNRs, not the PSNR of the mean MSE
    assert psnr(pred, target).mean().item() == pytest.approx(30.0)
    assert -10 * math.log10(mse(pred, target).mean().item()) != pytest.approx(30.0)


def _ssim_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Textbook SSIM of two 2-D images: 11x11 Gaussian window (sigma 1.5), every valid position, data range 1."""
    coords = np.arange(11) - 5
    g = np.exp(-coords**2 / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
            cov = (w * px * py).sum() - mx * my
            vals.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_textbook_formula_per_frame_and_channel():
    pred, target = _videos(seed=1, shape=(2, 3, 2, 14, 15))
    expected = [np.mean([_ssim_direct(pred[b, c, t].double().numpy(), target[b, c, t].double().numpy())
                         for c in range(3) for t in range(2)]) for b in range(2)]
    torch.testing.assert_close(ssim(pred, target), torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)
    assert torch.allclose(ssim(target, target), torch.ones(2))
    noisier = (target + 0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert torch.all(ssim(noisier, target) < ssim(pred, target))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 2, 8, 8), torch.rand(1, 3, 2, 8, 8))


def test_reconstruction_metrics_and_perceptual():
    from larp_mllm.eval.perceptual import load_perceptual

    net = load_perceptual()
    pred, target = _videos(seed=3, shape=(2, 3, 2, 32, 32))
    m = reconstruction_metrics(pred, target, net)
    torch.testing.assert_close(m.psnr, psnr(pred, target))
    torch.testing.assert_close(m.ssim, ssim(pred, target))
    torch.testing.assert_close(m.perceptual, perceptual_distance(pred, target, net))
    assert m.perceptual.shape == (2,) and torch.all(m.perceptual > 0)
    # a video against itself: its frames sit at two places of one batch, which conv kernels may round apart (~1e-7
    # on unit-norm features, ~1e-14 once squared); a 1e-3 pixel noise already gives ~1e-6
    torch.testing.assert_close(perceptual_distance(target, target, net), torch.zeros(2), atol=1e-9, rtol=0)
    assert reconstruction_metrics(pred, target).perceptual is None
    with pytest.raises(ValueError, match="equal shape"):
        psnr(pred, target[:1])
